#include "keel/core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <fstream>
#include <cctype>
#include <charconv>
#include <cmath>
#include <functional>
#include <set>
#include <stdexcept>

#include "keel/core/json_schema.h"
#include "keel/core/regex.h"
#include "keel/core/template.h"

namespace keel {

std::string_view StepKindName(StepKind kind) {
  switch (kind) {
    case StepKind::kLlm: return "llm";
    case StepKind::kTransform: return "transform";
    case StepKind::kHttp: return "http";
    case StepKind::kTask: return "task";
    case StepKind::kValidate: return "validate";
    case StepKind::kChoice: return "choice";
    case StepKind::kMap: return "map";
    case StepKind::kWaitForSignal: return "wait_for_signal";
    case StepKind::kSleep: return "sleep";
    case StepKind::kPipeline: return "pipeline";
  }
  return "unknown";
}

std::optional<StepKind> StepKindFromName(std::string_view name) {
  for (auto k : {StepKind::kLlm, StepKind::kTransform, StepKind::kHttp, StepKind::kTask, StepKind::kValidate,
                 StepKind::kChoice, StepKind::kMap, StepKind::kWaitForSignal, StepKind::kSleep, StepKind::kPipeline}) {
    if (StepKindName(k) == name) return k;
  }
  return std::nullopt;
}

bool IsSignalName(std::string_view name) {
  return !name.empty() && name.size() <= 128 &&
         name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") == std::string_view::npos;
}

std::string UrlHost(std::string_view url) {
  const auto scheme = url.find("://");
  if (scheme == std::string_view::npos) return {};
  auto rest = url.substr(scheme + 3);
  rest = rest.substr(0, rest.find_first_of("/?#"));
  if (const auto at = rest.rfind('@'); at != std::string_view::npos) rest = rest.substr(at + 1);
  std::string host(rest);
  for (auto& c : host) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return host;
}

std::string RedactUrl(std::string_view url) {
  std::string out(url);
  const auto scheme = out.find("://");
  if (scheme != std::string::npos) {
    const std::size_t start = scheme + 3;
    const std::size_t end = std::min(out.find_first_of("/?#", start), out.size());
    const auto at = out.rfind('@', end == 0 ? 0 : end - 1);
    if (at != std::string::npos && at >= start) {
      const auto colon = out.find(':', start);
      if (colon != std::string::npos && colon < at) out.replace(colon + 1, at - colon - 1, "***");
    }
  }
  // A password given as a query parameter (libpq's ?password=...).
  for (std::size_t p = out.find("password="); p != std::string::npos; p = out.find("password=", p + 1)) {
    if (p > 0 && out[p - 1] != '?' && out[p - 1] != '&' && out[p - 1] != ' ') continue;
    const std::size_t v = p + 9;
    const std::size_t e = std::min(out.find_first_of("& #", v), out.size());
    out.replace(v, e - v, "***");
  }
  return out;
}

Result<Duration> ParseDuration(std::string_view text) {
  auto bad = [&] {
    return Error(ErrorCode::kInvalidRequest,
                 "\"" + std::string(text) + "\" is not a duration; write e.g. 500ms, 2s, 5m, 1h");
  };
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0 || i == text.size()) return bad();
  double n = 0;
  const auto [p, ec] = std::from_chars(text.data(), text.data() + i, n);
  if (ec != std::errc() || p != text.data() + i || n < 0) return bad();
  const std::string_view unit = text.substr(i);
  double ms_per = 0;
  if (unit == "ms") ms_per = 1;
  else if (unit == "s") ms_per = 1000;
  else if (unit == "m") ms_per = 60'000;
  else if (unit == "h") ms_per = 3'600'000;
  else if (unit == "d") ms_per = 86'400'000;
  else return bad();
  const double ms = n * ms_per;
  if (ms > 365.0 * 86'400'000) return bad();
  return Duration(static_cast<int64_t>(ms));
}

Result<RedisAddress> ParseRedisUrl(std::string_view url) {
  auto bad = [](const std::string& why) {
    return Error(ErrorCode::kInvalidRequest, why + " (write redis://[:PASSWORD@]HOST[:PORT][/DB])");
  };
  // Percent-decoding for user and password, which may hold '@', ':' or '/'.
  auto decode = [](std::string_view in, std::string& out) {
    out.clear();
    for (std::size_t i = 0; i < in.size(); ++i) {
      if (in[i] != '%') {
        out.push_back(in[i]);
        continue;
      }
      unsigned v = 0;
      if (i + 2 >= in.size()) return false;
      const auto [p, ec] = std::from_chars(in.data() + i + 1, in.data() + i + 3, v, 16);
      if (ec != std::errc() || p != in.data() + i + 3) return false;
      out.push_back(static_cast<char>(v));
      i += 2;
    }
    return true;
  };
  constexpr std::string_view kScheme = "redis://";
  if (url.rfind("rediss://", 0) == 0) return bad("TLS to Redis (rediss://) is not supported");
  if (url.rfind(kScheme, 0) != 0) return bad("the URL must start with redis://");
  std::string_view rest = url.substr(kScheme.size());
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return bad("the URL takes no query or fragment (set timeout and the rest as keys of redis)");
  }
  RedisAddress a;
  std::string_view path;
  if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
    path = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
  }
  if (const auto at = rest.rfind('@'); at != std::string_view::npos) {
    const std::string_view info = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const auto colon = info.find(':');
    if (colon == std::string_view::npos) return bad("a user without a password");
    if (!decode(info.substr(0, colon), a.username) || !decode(info.substr(colon + 1), a.password)) {
      return bad("a bad %-escape in the user or password");
    }
    if (a.password.empty()) return bad("an empty password");
  }
  std::string_view port;
  if (!rest.empty() && rest.front() == '[') {  // [IPv6]:port
    const auto close = rest.find(']');
    if (close == std::string_view::npos) return bad("an IPv6 host without its closing ]");
    a.host = std::string(rest.substr(1, close - 1));
    rest = rest.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return bad("junk after the IPv6 host");
      port = rest.substr(1);
      if (port.empty()) return bad("an empty port");
    }
  } else {
    const auto colon = rest.find(':');
    a.host = std::string(rest.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = rest.substr(colon + 1);
      if (port.empty()) return bad("an empty port");
    }
  }
  if (a.host.empty()) return bad("no host");
  if (a.host.find_first_of(" \t@/") != std::string::npos) return bad("a malformed host");
  auto number = [](std::string_view s, int lo, int hi, int& out) {
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    return ec == std::errc() && p == s.data() + s.size() && out >= lo && out <= hi;
  };
  if (!port.empty() && !number(port, 1, 65535, a.port)) return bad("the port must be a number from 1 to 65535");
  if (!path.empty() && !number(path, 0, 65535, a.db)) return bad("the database must be a number from 0 to 65535");
  return a;
}

Result<std::size_t> ParseByteSize(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  uint64_t n = 0;
  const auto [p, ec] = std::from_chars(text.data(), text.data() + i, n);
  const std::string_view unit = text.substr(i);
  uint64_t mul = 0;
  if (unit.empty() || unit == "B") mul = 1;
  else if (unit == "KiB") mul = 1024;
  else if (unit == "MiB") mul = 1024 * 1024;
  if (i == 0 || ec != std::errc() || mul == 0 || n > (uint64_t{1} << 40)) {
    return Error(ErrorCode::kInvalidRequest,
                 "\"" + std::string(text) + "\" is not a size; write e.g. 65536, 64KiB, 1MiB");
  }
  return static_cast<std::size_t>(n * mul);
}

namespace {

// Thrown inside the parser only; ParseConfig turns it into an Error.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An HTTP header name (RFC 9110 token): letters, digits and !#$%&'*+-.^_`|~.
bool IsHttpToken(std::string_view s) {
  if (s.empty()) return false;
  for (const char c : s) {
    const bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!alnum && std::string_view("!#$%&'*+-.^_`|~").find(c) == std::string_view::npos) return false;
  }
  return true;
}

int LineOf(const YAML::Node& n) { return n.Mark().line + 1; }

[[noreturn]] void Fail(const YAML::Node& n, const std::string& msg) {
  throw ConfigError("line " + std::to_string(LineOf(n)) + ": " + msg);
}

// yaml-cpp keeps both entries of a repeated key and lookups see only the first, so a
// repeated key would be silently ignored: refuse it.
void NoDuplicateKeys(const YAML::Node& n, const std::string& what) {
  std::set<std::string> seen;
  for (const auto& kv : n) {
    const auto key = kv.first.as<std::string>();
    if (!seen.insert(key).second) Fail(kv.first, "key \"" + key + "\" appears twice in " + what);
  }
}

class Reader {
 public:
  explicit Reader(const EnvLookup& env) : env_(env) {}

  // Checks that `n` is a map whose keys are all in `allowed`.
  void Keys(const YAML::Node& n, const std::string& what, std::initializer_list<const char*> allowed) {
    if (!n.IsMap()) Fail(n, what + " must be a mapping");
    NoDuplicateKeys(n, what);
    for (const auto& kv : n) {
      const auto key = kv.first.as<std::string>();
      bool ok = false;
      for (const char* a : allowed) ok = ok || key == a;
      if (!ok) {
        std::string list;
        for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
        Fail(kv.first, "unknown key \"" + key + "\" in " + what + " (allowed: " + list + ")");
      }
    }
  }

  std::string Str(const YAML::Node& n, const std::string& what) {
    if (!n.IsScalar()) Fail(n, what + " must be a string");
    return Interpolate(n, n.Scalar());
  }

  int64_t Int(const YAML::Node& n, const std::string& what, int64_t lo, int64_t hi) {
    if (!n.IsScalar()) Fail(n, what + " must be a whole number");
    const std::string s = Interpolate(n, n.Scalar());
    int64_t v = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size()) Fail(n, what + " must be a whole number, not \"" + s + "\"");
    if (v < lo || v > hi) {
      Fail(n, what + " must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                  ", not " + s);
    }
    return v;
  }

  double Double(const YAML::Node& n, const std::string& what, double lo, double hi) {
    if (!n.IsScalar()) Fail(n, what + " must be a number");
    const std::string s = Interpolate(n, n.Scalar());
    double v = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size()) Fail(n, what + " must be a number, not \"" + s + "\"");
    if (v < lo || v > hi) Fail(n, what + " must be between " + Fmt(lo) + " and " + Fmt(hi));
    return v;
  }

  // A duration of at least `min` (default 0: any).
  Duration Dur(const YAML::Node& n, const std::string& what, Duration min = Duration(0)) {
    if (!n.IsScalar()) Fail(n, what + " must be a duration such as 2s");
    auto d = ParseDuration(Interpolate(n, n.Scalar()));
    if (!d.ok()) Fail(n, what + ": " + d.error().message);
    if (*d < min) Fail(n, what + " must be at least " + std::to_string(min.count()) + "ms");
    return *d;
  }

  // A YAML subtree as JSON. Quoted scalars stay strings; plain ones become null, booleans
  // or numbers when they read as such.
  json::value ToJson(const YAML::Node& n, std::size_t depth = 0) {
    // Aliases share nodes, so a small file can name an exponential tree ("billion
    // laughs"): the values read are bounded in count, text and depth.
    if (++nodes_ > kMaxNodes) {
      Fail(n, "the config expands to more than " + std::to_string(kMaxNodes) +
                  " values (YAML aliases that repeat each other?); write it out, or use fewer aliases");
    }
    if (depth >= JsonLimits::kMaxDepth) Fail(n, "values nest deeper than " + std::to_string(JsonLimits::kMaxDepth) + " levels");
    switch (n.Type()) {
      case YAML::NodeType::Null:
      case YAML::NodeType::Undefined:
        return nullptr;
      case YAML::NodeType::Sequence: {
        json::array arr;
        for (const auto& e : n) arr.push_back(ToJson(e, depth + 1));
        return arr;
      }
      case YAML::NodeType::Map: {
        json::object obj;
        for (const auto& kv : n) {
          const auto key = kv.first.as<std::string>();
          if (!IsValidUtf8(key)) Fail(kv.first, "the key is not valid UTF-8");
          obj[key] = ToJson(kv.second, depth + 1);
        }
        return obj;
      }
      case YAML::NodeType::Scalar:
        break;
    }
    const std::string s = Interpolate(n, n.Scalar());
    if ((text_ += s.size()) > kMaxText) {
      Fail(n, "the config expands to more than " + std::to_string(kMaxText >> 20) +
                  " MiB of text (YAML aliases that repeat each other?)");
    }
    if (!IsValidUtf8(s)) Fail(n, "the value is not valid UTF-8");
    if (n.Tag() == "!") return json::value(s);  // quoted
    if (s == "null" || s == "~") return nullptr;
    if (s == "true") return true;
    if (s == "false") return false;
    int64_t i = 0;
    auto [pi, eci] = std::from_chars(s.data(), s.data() + s.size(), i);
    if (!s.empty() && eci == std::errc() && pi == s.data() + s.size()) return i;
    double d = 0;
    auto [pd, ecd] = std::from_chars(s.data(), s.data() + s.size(), d);
    // "inf" and "nan" read as doubles too, and JSON has neither: they stay text.
    if (!s.empty() && ecd == std::errc() && pd == s.data() + s.size() && std::isfinite(d)) return d;
    return json::value(s);
  }

 private:
  static std::string Fmt(double v) {
    std::string s = std::to_string(v);
    while (!s.empty() && s.back() == '0') s.pop_back();
    if (!s.empty() && s.back() == '.') s.pop_back();
    return s;
  }

  // Replaces ${NAME} by the environment's value. An unset variable is an error.
  std::string Interpolate(const YAML::Node& n, const std::string& s) {
    if (s.find("${") == std::string::npos) return s;
    std::string out;
    std::size_t pos = 0;
    while (true) {
      const auto open = s.find("${", pos);
      if (open == std::string::npos) break;
      const auto close = s.find('}', open);
      if (close == std::string::npos) Fail(n, "\"${\" without a closing \"}\"");
      const std::string name = s.substr(open + 2, close - open - 2);
      const auto value = env_ ? env_(name) : std::nullopt;
      if (!value) Fail(n, "environment variable " + name + " is not set");
      out += s.substr(pos, open - pos);
      out += *value;
      pos = close + 1;
    }
    out += s.substr(pos);
    return out;
  }

  // Bounds on what ToJson reads from the whole file (aliases counted each time).
  static constexpr std::size_t kMaxNodes = 1'000'000;
  static constexpr std::size_t kMaxText = std::size_t{64} << 20;

  const EnvLookup& env_;
  std::size_t nodes_ = 0;
  std::size_t text_ = 0;
};

// `route`: a route's retry, which also holds the same-target rules (read by ReadRoute).
RetryConfig ReadRetry(Reader& r, const YAML::Node& n, RetryConfig base, const std::string& what, bool route = false) {
  if (route) {
    r.Keys(n, what, {"max_attempts", "initial_backoff", "multiplier", "max_backoff", "jitter",
                     "same_target_retry_after_max", "same_target_on_5xx"});
  } else {
    r.Keys(n, what, {"max_attempts", "initial_backoff", "multiplier", "max_backoff", "jitter"});
  }
  if (n["max_attempts"]) base.max_attempts = static_cast<int>(r.Int(n["max_attempts"], what + ".max_attempts", 1, 100));
  if (n["initial_backoff"]) base.backoff.initial = r.Dur(n["initial_backoff"], what + ".initial_backoff");
  if (n["multiplier"]) base.backoff.multiplier = r.Double(n["multiplier"], what + ".multiplier", 1.0, 100.0);
  if (n["max_backoff"]) base.backoff.max = r.Dur(n["max_backoff"], what + ".max_backoff");
  if (n["jitter"]) {
    base.backoff.jitter_fraction = r.Double(n["jitter"], what + ".jitter", 0.0, 1.0);
    base.backoff.jitter = base.backoff.jitter_fraction == 0 ? JitterMode::kNone : JitterMode::kProportional;
  }
  if (base.backoff.max < base.backoff.initial) {
    Fail(n, what + ".max_backoff must not be shorter than initial_backoff");
  }
  return base;
}

// A `tls` block: {ca_file, client_cert, client_key}, each a readable file; a client
// certificate comes with its key.
TlsSettings ReadTls(Reader& r, const YAML::Node& n, const std::string& what) {
  r.Keys(n, what, {"ca_file", "client_cert", "client_key"});
  TlsSettings t;
  auto file = [&](const char* key, std::string& out) {
    if (!n[key]) return;
    out = r.Str(n[key], what + "." + key);
    std::ifstream in(out);
    if (out.empty() || !in.good()) Fail(n[key], what + "." + key + " \"" + out + "\" cannot be read (it must name a PEM file)");
  };
  file("ca_file", t.ca_file);
  file("client_cert", t.client_cert);
  file("client_key", t.client_key);
  if (t.client_cert.empty() != t.client_key.empty()) {
    Fail(n, what + " needs both client_cert and client_key (mTLS), or neither");
  }
  return t;
}

ProviderConfig ReadProvider(Reader& r, const std::string& name, const YAML::Node& n) {
  const std::string what = "provider \"" + name + "\"";
  r.Keys(n, what, {"type", "base_url", "api_key", "model", "context_window", "timeout", "headers", "query", "limits", "cost", "health_check", "tls"});
  ProviderConfig p;
  p.name = name;
  p.line = LineOf(n);
  if (!n["type"]) Fail(n, what + " needs a type (openai, anthropic or mock)");
  p.type = r.Str(n["type"], what + ".type");
  if (p.type != "openai" && p.type != "anthropic" && p.type != "mock") {
    Fail(n["type"], what + ".type must be openai, anthropic or mock, not \"" + p.type + "\"");
  }
  if (n["base_url"]) p.base_url = r.Str(n["base_url"], what + ".base_url");
  if (p.type == "anthropic" && !n["base_url"]) p.base_url = "https://api.anthropic.com/v1";
  if (p.type == "openai" || p.type == "anthropic") {
    if (p.base_url.rfind("http://", 0) != 0 && p.base_url.rfind("https://", 0) != 0) {
      Fail(n["base_url"] ? n["base_url"] : n, what + ".base_url must be an http:// or https:// URL");
    }
    while (!p.base_url.empty() && p.base_url.back() == '/') p.base_url.pop_back();
  }
  if (n["api_key"]) p.api_key = r.Str(n["api_key"], what + ".api_key");
  p.model = n["model"] ? r.Str(n["model"], what + ".model") : name;
  if (n["context_window"]) {
    p.context_window = r.Int(n["context_window"], what + ".context_window", 1, 100'000'000);
    p.context_window_set = true;
  }
  if (const auto t = n["timeout"]) {
    r.Keys(t, what + ".timeout", {"connect", "total", "first_byte", "idle", "first_token"});
    if (t["first_token"]) p.timeout.first_token = r.Dur(t["first_token"], what + ".timeout.first_token");
    if (t["first_byte"]) p.timeout.first_byte = r.Dur(t["first_byte"], what + ".timeout.first_byte", Duration(1));
    if (t["idle"]) p.timeout.idle = r.Dur(t["idle"], what + ".timeout.idle", Duration(1));
    if (t["connect"]) p.timeout.connect = r.Dur(t["connect"], what + ".timeout.connect", Duration(1));
    if (t["total"]) p.timeout.total = r.Dur(t["total"], what + ".timeout.total", Duration(1));
  }
  if (const auto l = n["limits"]) {
    r.Keys(l, what + ".limits", {"rpm", "tpm", "max_concurrency"});
    if (l["rpm"]) p.limits.rpm = r.Int(l["rpm"], what + ".limits.rpm", 0, 1'000'000'000);
    if (l["tpm"]) p.limits.tpm = r.Int(l["tpm"], what + ".limits.tpm", 0, 1'000'000'000'000);
    if (l["max_concurrency"]) p.limits.max_concurrency = r.Int(l["max_concurrency"], what + ".limits.max_concurrency", 0, 1'000'000);
  }
  if (const auto q = n["query"]) {
    if (!q.IsMap()) Fail(q, what + ".query must be a mapping of parameter names to values");
    for (const auto& kv : q) p.query[kv.first.as<std::string>()] = r.Str(kv.second, what + ".query");
  }
  if (const auto h = n["health_check"]) {
    r.Keys(h, what + ".health_check", {"interval"});
    if (h["interval"]) p.health_check_interval = r.Dur(h["interval"], what + ".health_check.interval", Duration(100));
  }
  if (const auto c = n["cost"]) {
    r.Keys(c, what + ".cost", {"input_per_mtok", "output_per_mtok"});
    if (c["input_per_mtok"]) p.cost.input_per_mtok = r.Double(c["input_per_mtok"], what + ".cost.input_per_mtok", 0, 1e6);
    if (c["output_per_mtok"]) p.cost.output_per_mtok = r.Double(c["output_per_mtok"], what + ".cost.output_per_mtok", 0, 1e6);
  }
  if (const auto h = n["headers"]) {
    if (!h.IsMap()) Fail(h, what + ".headers must be a mapping of header names to values");
    for (const auto& kv : h) p.headers[kv.first.as<std::string>()] = r.Str(kv.second, what + ".headers");
  }
  if (const auto t = n["tls"]) {
    if (!t.IsMap()) Fail(t, what + ".tls must be a mapping {ca_file, client_cert, client_key}");
    p.tls = ReadTls(r, t, what + ".tls");
  }
  return p;
}

RouteConfig ReadRoute(Reader& r, const std::string& name, const YAML::Node& n) {
  const std::string what = "route \"" + name + "\"";
  r.Keys(n, what, {"strategy", "targets", "retry", "retry_budget", "circuit_breaker", "max_failover", "timeout", "cache"});
  RouteConfig route;
  route.name = name;
  route.line = LineOf(n);
  if (n["strategy"]) {
    route.strategy = r.Str(n["strategy"], what + ".strategy");
    if (route.strategy != "priority" && route.strategy != "round_robin" && route.strategy != "weighted" &&
        route.strategy != "latency" && route.strategy != "least_busy") {
      Fail(n["strategy"], what + ".strategy must be round_robin, weighted, latency, priority or least_busy, not \"" +
                              route.strategy + "\"");
    }
  }
  const auto targets = n["targets"];
  if (!targets || !targets.IsSequence() || targets.size() == 0) {
    Fail(targets ? targets : n, what + " needs targets: a list of {provider: NAME}");
  }
  for (const auto& t : targets) {
    r.Keys(t, what + " target", {"provider", "weight", "tier"});
    if (!t["provider"]) Fail(t, what + " target needs a provider");
    RouteTarget target;
    target.provider = r.Str(t["provider"], what + " target provider");
    if (t["weight"]) target.weight = static_cast<int>(r.Int(t["weight"], what + " target weight", 0, 1'000'000));
    if (t["tier"]) target.tier = static_cast<int>(r.Int(t["tier"], what + " target tier", 1, 100));
    route.targets.push_back(std::move(target));
  }
  if (const auto rt = n["retry"]) {
    route.retry = ReadRetry(r, rt, route.retry, what + ".retry", /*route=*/true);
    if (rt["same_target_retry_after_max"]) {
      route.same_target_retry_after_max =
          r.Dur(rt["same_target_retry_after_max"], what + ".retry.same_target_retry_after_max");
      if (route.same_target_retry_after_max > Duration(3'600'000)) {
        Fail(rt["same_target_retry_after_max"], what + ".retry.same_target_retry_after_max must be at most 1h");
      }
    }
    if (rt["same_target_on_5xx"]) {
      route.same_target_on_5xx = static_cast<int>(r.Int(rt["same_target_on_5xx"], what + ".retry.same_target_on_5xx", 0, 10));
    }
  }
  if (route.retry.max_attempts > 10) Fail(n["retry"], what + ".retry.max_attempts must be at most 10");
  if (const auto b = n["retry_budget"]) {
    r.Keys(b, what + ".retry_budget", {"ratio", "min_per_second"});
    if (b["ratio"]) route.retry_budget.ratio = r.Double(b["ratio"], what + ".retry_budget.ratio", 0, 10);
    if (b["min_per_second"]) route.retry_budget.min_per_second = r.Double(b["min_per_second"], what + ".retry_budget.min_per_second", 0, 1e6);
  }
  if (const auto b = n["circuit_breaker"]) {
    const std::string w = what + ".circuit_breaker";
    r.Keys(b, w, {"failure_rate", "min_requests", "window", "consecutive_failures", "open_for"});
    auto& cb = route.circuit_breaker;
    if (b["failure_rate"]) cb.failure_rate = r.Double(b["failure_rate"], w + ".failure_rate", 0.01, 1);
    if (b["min_requests"]) cb.min_requests = static_cast<int>(r.Int(b["min_requests"], w + ".min_requests", 1, 1'000'000));
    if (b["window"]) cb.window = r.Dur(b["window"], w + ".window", Duration(10));
    if (b["consecutive_failures"]) cb.consecutive_failures = static_cast<int>(r.Int(b["consecutive_failures"], w + ".consecutive_failures", 0, 1'000'000));
    if (b["open_for"]) cb.open_for = r.Dur(b["open_for"], w + ".open_for", Duration(1));
  }
  if (n["max_failover"]) route.max_failover = static_cast<int>(r.Int(n["max_failover"], what + ".max_failover", 1, 10));
  if (n["timeout"]) route.timeout = r.Dur(n["timeout"], what + ".timeout", Duration(1));
  if (const auto c = n["cache"]) {
    const std::string w = what + ".cache";
    r.Keys(c, w, {"ttl", "stale_if_error", "max_entries"});
    if (!c["ttl"]) Fail(c, w + " needs ttl: how long an answer is served from the cache, such as 1h");
    RouteCacheConfig cache;
    cache.ttl = r.Dur(c["ttl"], w + ".ttl", Duration(1));
    if (c["stale_if_error"]) cache.stale_if_error = r.Dur(c["stale_if_error"], w + ".stale_if_error");
    if (c["max_entries"]) cache.max_entries = r.Int(c["max_entries"], w + ".max_entries", 1, 10'000'000);
    route.cache = cache;
  }
  return route;
}

RedisConfig ReadRedis(Reader& r, const YAML::Node& n) {
  r.Keys(n, "redis", {"url", "timeout", "key_prefix", "retry_interval", "pool_size"});
  if (!n["url"]) Fail(n, "redis needs url: redis://[:PASSWORD@]HOST[:PORT][/DB]");
  RedisConfig c;
  auto address = ParseRedisUrl(r.Str(n["url"], "redis.url"));
  if (!address.ok()) Fail(n["url"], "redis.url is not usable: " + address.error().message);
  c.address = std::move(address).value();
  if (n["timeout"]) {
    c.timeout = r.Dur(n["timeout"], "redis.timeout", Duration(1));
    if (c.timeout > Duration(10000)) Fail(n["timeout"], "redis.timeout must be at most 10s (it bounds a wait on the gateway's I/O threads)");
  }
  if (n["key_prefix"]) {
    c.key_prefix = n["key_prefix"].IsNull() ? std::string() : r.Str(n["key_prefix"], "redis.key_prefix");
    if (c.key_prefix.size() > 128) Fail(n["key_prefix"], "redis.key_prefix must be at most 128 bytes");
  }
  if (n["retry_interval"]) {
    c.retry_interval = r.Dur(n["retry_interval"], "redis.retry_interval", Duration(10));
    if (c.retry_interval > Duration(3'600'000)) Fail(n["retry_interval"], "redis.retry_interval must be at most 1h");
  }
  if (n["pool_size"]) c.pool_size = static_cast<int>(r.Int(n["pool_size"], "redis.pool_size", 1, 256));
  return c;
}

const char* const kStepKinds[] = {"llm", "transform", "http", "task", "validate", "choice", "map",
                                  "wait_for_signal", "sleep", "pipeline"};

// A JSON Schema in the config, compiled now so that a bad one is refused with its line.
json::value ReadSchema(Reader& r, const YAML::Node& n, const std::string& what) {
  json::value schema = r.ToJson(n);
  auto compiled = JsonSchema::Compile(schema);
  if (!compiled.ok()) Fail(n, what + " is not a usable JSON Schema: " + compiled.error().message);
  return schema;
}

// A condition of a choice: {value: "{{ref}}", equals|not_equals|gt|gte|lt|lte|in|contains|
// matches|exists: X}, or {all: [...]}, {any: [...]}, {not: COND}.
void CheckCondition(Reader& r, const YAML::Node& n, const std::string& what, int depth = 0) {
  if (depth > 16) Fail(n, what + ": conditions nest too deeply (16 levels at most)");
  if (!n.IsMap()) Fail(n, what + " must be a mapping such as {value: \"{{steps.x.output}}\", equals: yes}");
  if (n["all"] || n["any"]) {
    const char* k = n["all"] ? "all" : "any";
    r.Keys(n, what, {k});
    if (!n[k].IsSequence() || n[k].size() == 0) Fail(n[k], what + "." + k + " must be a non-empty list of conditions");
    for (const auto& c : n[k]) CheckCondition(r, c, what + "." + k, depth + 1);
    return;
  }
  if (n["not"]) {
    r.Keys(n, what, {"not"});
    CheckCondition(r, n["not"], what + ".not", depth + 1);
    return;
  }
  r.Keys(n, what, {"value", "equals", "not_equals", "gt", "gte", "lt", "lte", "in", "contains", "matches", "exists"});
  if (!n["value"]) Fail(n, what + " needs value: the template to test, such as \"{{steps.classify.output}}\"");
  int ops = 0;
  for (const char* op : {"equals", "not_equals", "gt", "gte", "lt", "lte", "in", "contains", "matches", "exists"}) {
    if (n[op]) ++ops;
  }
  if (ops != 1) Fail(n, what + " needs exactly one test: equals, not_equals, gt, gte, lt, lte, in, contains, matches or exists");
  for (const char* op : {"gt", "gte", "lt", "lte"}) {
    if (n[op]) r.Double(n[op], what + "." + op, -1e300, 1e300);
  }
  if (n["in"] && !n["in"].IsSequence()) Fail(n["in"], what + ".in must be a list");
  if (n["matches"]) {
    // A string as the step runner will see it: `matches: 123` reads as a number.
    const json::value re = r.ToJson(n["matches"]);
    if (!re.is_string()) {
      Fail(n["matches"], what + ".matches must be a string (a regular expression), not " + std::string(JsonKindName(re)) +
                             "; quote it: matches: \"" + r.Str(n["matches"], what + ".matches") + "\"");
    }
    if (auto compiled = Regex::Compile(re.get_string()); !compiled.ok()) {
      Fail(n["matches"], what + ".matches is not a valid regular expression: " + compiled.error().message);
    }
  }
}

// The kind-specific body of a step (or of a map's item step), checked; returns it as JSON.
json::value ReadStepBody(Reader& r, const YAML::Node& body, StepKind kind, const std::string& id, bool in_map) {
  const std::string what = "step \"" + id + "\" " + std::string(StepKindName(kind));
  switch (kind) {
    case StepKind::kLlm: {
      r.Keys(body, what, {"route", "messages", "temperature", "max_tokens", "response_format", "repair_attempts"});
      if (!body["route"]) Fail(body, what + " needs a route");
      const auto msgs = body["messages"];
      if (!msgs || !msgs.IsSequence() || msgs.size() == 0) {
        Fail(msgs ? msgs : body, what + " needs messages: a list of {role, content}");
      }
      for (const auto& m : msgs) {
        r.Keys(m, "a message of step \"" + id + "\"", {"role", "content"});
        if (!m["role"] || !m["content"]) Fail(m, "a message of step \"" + id + "\" needs role and content");
        const auto role = r.Str(m["role"], "role");
        if (role != "system" && role != "user" && role != "assistant") {
          Fail(m["role"], "role must be system, user or assistant, not \"" + role + "\"");
        }
      }
      json::value spec = r.ToJson(body);
      // A route is a name even when it reads as a number ("route: 5").
      spec.as_object()["route"] = r.Str(body["route"], what + " route");
      if (const auto rf = body["response_format"]) {
        r.Keys(rf, what + " response_format", {"type", "schema", "json_schema"});
        const std::string type = rf["type"] ? r.Str(rf["type"], what + " response_format.type") : "";
        if (type != "json_schema" && type != "json_object") {
          Fail(rf, what + " response_format.type must be json_schema or json_object");
        }
        YAML::Node schema = rf["schema"];
        if (!schema && rf["json_schema"]) schema = rf["json_schema"]["schema"];
        if (type == "json_schema") {
          if (!schema) Fail(rf, what + " response_format needs schema: the JSON Schema of the answer");
          spec.as_object()["response_format"] =
              json::object{{"type", "json_schema"}, {"schema", ReadSchema(r, schema, what + " response_format.schema")}};
        } else {
          spec.as_object()["response_format"] = json::object{{"type", "json_object"}};
        }
      }
      if (body["repair_attempts"]) {
        spec.as_object()["repair_attempts"] = r.Int(body["repair_attempts"], what + " repair_attempts", 0, 5);
      }
      return spec;
    }
    case StepKind::kTransform:
      return r.ToJson(body);
    case StepKind::kHttp: {
      r.Keys(body, what, {"url", "method", "headers", "body", "timeout", "max_response_bytes"});
      if (!body["url"]) Fail(body, what + " needs a url");
      const std::string url = r.Str(body["url"], what + " url");
      if (url.rfind("http://", 0) != 0 && url.rfind("https://", 0) != 0 && url.rfind("{{", 0) != 0) {
        Fail(body["url"], what + " url must start with http:// or https://");
      }
      json::value spec = r.ToJson(body);
      auto& o = spec.as_object();
      o["url"] = url;
      std::string method = body["method"] ? r.Str(body["method"], what + " method") : (body["body"] ? "POST" : "GET");
      if (method != "GET" && method != "POST" && method != "PUT" && method != "PATCH" && method != "DELETE") {
        Fail(body["method"], what + " method must be GET, POST, PUT, PATCH or DELETE");
      }
      o["method"] = method;
      if (body["headers"] && !body["headers"].IsMap()) Fail(body["headers"], what + " headers must be a mapping");
      if (const auto h = body["headers"]) {
        for (const auto& kv : h) {
          const std::string name = kv.first.as<std::string>();
          if (!IsHttpToken(name)) {
            Fail(kv.first, what + " header name \"" + name + "\" is not a valid HTTP header name");
          }
          if (kv.second.IsScalar() && kv.second.Scalar().find_first_of(std::string_view("\r\n\0", 3)) != std::string::npos) {
            Fail(kv.second, what + " header " + name + " holds a CR, LF or NUL");
          }
        }
      }
      if (body["max_response_bytes"]) {
        o["max_response_bytes"] = r.Int(body["max_response_bytes"], what + " max_response_bytes", 1024, int64_t{1} << 30);
      }
      if (body["timeout"]) o["timeout_ms"] = r.Dur(body["timeout"], what + " timeout", Duration(1)).count();
      o.erase("timeout");
      return spec;
    }
    case StepKind::kTask: {
      if (in_map) Fail(body, what + ": a map's item step cannot be a task");
      r.Keys(body, what, {"queue", "input", "heartbeat_timeout"});
      if (!body["queue"]) Fail(body, what + " needs a queue: the name external workers poll");
      json::value spec = r.ToJson(body);
      spec.as_object()["queue"] = r.Str(body["queue"], what + " queue");
      spec.as_object()["heartbeat_timeout_ms"] =
          body["heartbeat_timeout"] ? r.Dur(body["heartbeat_timeout"], what + " heartbeat_timeout", Duration(100)).count()
                                    : int64_t{30000};
      spec.as_object().erase("heartbeat_timeout");
      return spec;
    }
    case StepKind::kValidate: {
      r.Keys(body, what, {"value", "schema"});
      if (!body["value"] || !body["schema"]) Fail(body, what + " needs value (a template) and schema (a JSON Schema)");
      return json::object{{"value", r.ToJson(body["value"])}, {"schema", ReadSchema(r, body["schema"], what + " schema")}};
    }
    case StepKind::kChoice: {
      if (in_map) Fail(body, what + ": a map's item step cannot be a choice");
      r.Keys(body, what, {"cases", "default"});
      if (!body["default"]) Fail(body, what + " needs a default: the step to go to when no case matches");
      if (!body["cases"] || !body["cases"].IsSequence() || body["cases"].size() == 0) {
        Fail(body["cases"] ? body["cases"] : body, what + " needs cases: a list of {when, goto}");
      }
      json::array cases;
      for (const auto& c : body["cases"]) {
        r.Keys(c, "a case of " + what, {"when", "goto"});
        if (!c["when"] || !c["goto"]) Fail(c, "a case of " + what + " needs when and goto");
        CheckCondition(r, c["when"], "a case of " + what + ": when");
        cases.push_back(json::object{{"when", r.ToJson(c["when"])}, {"goto", r.Str(c["goto"], "goto")}, {"line", LineOf(c)}});
      }
      return json::object{{"cases", std::move(cases)}, {"default", r.Str(body["default"], what + " default")}};
    }
    case StepKind::kMap: {
      if (in_map) Fail(body, what + ": maps do not nest");
      r.Keys(body, what, {"over", "concurrency", "step"});
      if (!body["over"]) Fail(body, what + " needs over: a template giving the array, such as \"{{input.items}}\"");
      if (!body["step"] || !body["step"].IsMap()) Fail(body["step"] ? body["step"] : body, what + " needs step: {KIND: ...}, run for each item");
      const auto item = body["step"];
      std::optional<StepKind> item_kind;
      for (const auto& kv : item) {
        const auto k = kv.first.as<std::string>();
        auto sk = StepKindFromName(k);
        if (!sk) Fail(kv.first, what + " step: unknown step kind \"" + k + "\"");
        if (item_kind) Fail(kv.first, what + " step must have exactly one kind");
        item_kind = sk;
      }
      if (!item_kind) Fail(item, what + " step must have exactly one kind");
      if (*item_kind != StepKind::kLlm && *item_kind != StepKind::kHttp && *item_kind != StepKind::kTransform &&
          *item_kind != StepKind::kValidate) {
        Fail(item, what + " step must be llm, http, transform or validate");
      }
      const std::string kind_name(StepKindName(*item_kind));
      json::value inner = ReadStepBody(r, item[kind_name], *item_kind, id, true);
      const int64_t concurrency = body["concurrency"] ? r.Int(body["concurrency"], what + " concurrency", 1, 256) : 8;
      return json::object{{"over", r.ToJson(body["over"])},
                          {"concurrency", concurrency},
                          {"step", json::object{{"kind", kind_name}, {"spec", std::move(inner)}}}};
    }
    case StepKind::kWaitForSignal: {
      if (in_map) Fail(body, what + ": a map's item step cannot wait");
      r.Keys(body, what, {"name", "timeout", "default"});
      if (!body["name"]) Fail(body, what + " needs name: the signal to wait for");
      const std::string name = r.Str(body["name"], what + " name");
      if (!IsSignalName(name)) {
        Fail(body["name"], what + " name may hold only letters, digits, _, - and . (128 at most)");
      }
      json::object spec{{"name", name}};
      if (body["timeout"]) spec["timeout_ms"] = r.Dur(body["timeout"], what + " timeout", Duration(1)).count();
      if (body["default"]) spec["default"] = r.ToJson(body["default"]);
      return spec;
    }
    case StepKind::kSleep: {
      if (in_map) Fail(body, what + ": a map's item step cannot sleep");
      r.Keys(body, what, {"for"});
      if (!body["for"]) Fail(body, what + " needs for: a duration such as 10s");
      return json::object{{"for_ms", r.Dur(body["for"], what + " for").count()}};
    }
    case StepKind::kPipeline: {
      if (in_map) Fail(body, what + ": a map's item step cannot be a pipeline");
      r.Keys(body, what, {"name", "input"});
      if (!body["name"]) Fail(body, what + " needs name: the pipeline to run as a child");
      json::object spec{{"name", r.Str(body["name"], what + " name")}};
      spec["input"] = body["input"] ? r.ToJson(body["input"]) : json::value(json::object{});
      spec["line"] = LineOf(body);
      return spec;
    }
  }
  return nullptr;
}

StepConfig ReadStep(Reader& r, const YAML::Node& n, const RetryConfig& pipeline_retry,
                    const std::string& pipeline) {
  const std::string what = "a step of pipeline \"" + pipeline + "\"";
  r.Keys(n, what, {"id", "llm", "transform", "http", "task", "validate", "choice", "map", "wait_for_signal", "sleep",
                   "pipeline", "retry", "timeout", "on_error", "next"});
  StepConfig s;
  s.line = LineOf(n);
  if (!n["id"]) Fail(n, what + " needs an id");
  s.id = r.Str(n["id"], "step id");
  if (s.id.empty() || s.id == "end" ||
      s.id.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") != std::string::npos) {
    Fail(n["id"], "step id \"" + s.id + "\" may hold only letters, digits, _ and - (and is not \"end\")");
  }
  std::optional<StepKind> kind;
  for (const char* k : kStepKinds) {
    if (!n[k]) continue;
    if (kind) Fail(n, "step \"" + s.id + "\" must have exactly one kind, not both " + std::string(StepKindName(*kind)) + " and " + k);
    kind = StepKindFromName(k);
  }
  if (!kind) {
    Fail(n, "step \"" + s.id + "\" needs a kind: llm, http, task, transform, validate, choice, map, wait_for_signal, sleep or pipeline");
  }
  s.kind = *kind;
  s.spec = ReadStepBody(r, n[std::string(StepKindName(s.kind))], s.kind, s.id, false);
  s.retry = n["retry"] ? ReadRetry(r, n["retry"], pipeline_retry, "step \"" + s.id + "\" retry") : pipeline_retry;
  if (n["timeout"]) s.timeout = r.Dur(n["timeout"], "step \"" + s.id + "\" timeout", Duration(1));
  if (s.kind == StepKind::kHttp && s.spec.as_object().contains("timeout_ms") && !n["timeout"]) {
    s.timeout = Duration(s.spec.as_object().at("timeout_ms").as_int64());
  }
  if (const auto oe = n["on_error"]) {
    const std::string w = "step \"" + s.id + "\" on_error";
    if (oe.IsScalar()) {
      if (r.Str(oe, w) != "fail") Fail(oe, w + " must be fail, {output: VALUE} or {goto: STEP}");
    } else {
      r.Keys(oe, w, {"output", "goto"});
      if (static_cast<bool>(oe["output"]) == static_cast<bool>(oe["goto"])) {
        Fail(oe, w + " must be fail, {output: VALUE} or {goto: STEP}");
      }
      if (oe["output"]) s.on_error = json::object{{"output", r.ToJson(oe["output"])}};
      else s.on_error = json::object{{"goto", r.Str(oe["goto"], w + ".goto")}};
    }
  }
  if (n["next"]) s.next = r.Str(n["next"], "step \"" + s.id + "\" next");
  return s;
}

// Where a step may go next (by name, "end" for the end of the run).
std::vector<std::string> Successors(const PipelineConfig& p, std::size_t i) {
  const StepConfig& s = p.steps[i];
  std::vector<std::string> out;
  if (s.kind == StepKind::kChoice) {
    for (const auto& c : s.spec.at("cases").as_array()) out.push_back(std::string(c.at("goto").as_string()));
    out.push_back(std::string(s.spec.at("default").as_string()));
  } else if (!s.next.empty()) {
    out.push_back(s.next);
  } else {
    out.push_back(i + 1 < p.steps.size() ? p.steps[i + 1].id : "end");
  }
  if (s.on_error.is_object() && s.on_error.as_object().contains("goto")) {
    out.push_back(std::string(s.on_error.at("goto").as_string()));
  }
  return out;
}

// The graph of a pipeline: every jump names a step, there is no cycle, and every
// template references the input or a step that can have run before (an ancestor).
void CheckPipelineGraph(const YAML::Node& steps, PipelineConfig& p) {
  std::map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < p.steps.size(); ++i) index[p.steps[i].id] = i;
  const std::size_t n = p.steps.size();
  std::vector<std::vector<std::size_t>> edges(n);
  for (std::size_t i = 0; i < n; ++i) {
    for (const auto& to : Successors(p, i)) {
      if (to == "end") continue;
      const auto it = index.find(to);
      if (it == index.end()) {
        Fail(steps[i], "step \"" + p.steps[i].id + "\" goes to \"" + to + "\", which is not a step of pipeline \"" +
                           p.name + "\" (nor \"end\")");
      }
      edges[i].push_back(it->second);
    }
  }
  // Cycles: a depth-first search finding a back edge.
  std::vector<int> state(n, 0);  // 0 new, 1 on the path, 2 done
  std::function<void(std::size_t)> visit = [&](std::size_t i) {
    state[i] = 1;
    for (auto j : edges[i]) {
      if (state[j] == 1) {
        Fail(steps[j], "pipeline \"" + p.name + "\" has a cycle: step \"" + p.steps[i].id + "\" goes back to \"" +
                           p.steps[j].id + "\" (a run would never end; steps run at most once per run)");
      }
      if (state[j] == 0) visit(j);
    }
    state[i] = 2;
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (state[i] == 0) visit(i);
  }
  // Ancestors: the steps from which a step can be reached.
  std::vector<std::set<std::size_t>> ancestors(n);
  std::vector<std::size_t> order;  // topological, from the DFS above redone iteratively
  {
    std::vector<int> seen(n, 0);
    std::function<void(std::size_t)> post = [&](std::size_t i) {
      seen[i] = 1;
      for (auto j : edges[i]) {
        if (!seen[j]) post(j);
      }
      order.push_back(i);
    };
    for (std::size_t i = 0; i < n; ++i) {
      if (!seen[i]) post(i);
    }
    std::reverse(order.begin(), order.end());
  }
  for (auto i : order) {
    for (auto j : edges[i]) {
      ancestors[j].insert(i);
      ancestors[j].insert(ancestors[i].begin(), ancestors[i].end());
    }
  }
  std::set<std::string> signal_names;
  for (std::size_t i = 0; i < n; ++i) {
    const StepConfig& s = p.steps[i];
    if (s.kind == StepKind::kWaitForSignal) {
      const std::string name(s.spec.at("name").as_string());
      if (!signal_names.insert(name).second) {
        Fail(steps[i], "two steps of pipeline \"" + p.name + "\" wait for the signal \"" + name +
                           "\"; give each wait its own signal name");
      }
    }
    json::value refs_of = s.spec;
    if (s.on_error.is_object()) refs_of = json::array{s.spec, s.on_error};
    auto refs = TemplateReferences(refs_of);
    if (!refs.ok()) Fail(steps[i], "step \"" + s.id + "\": " + refs.error().message);
    for (const auto& ref : *refs) {
      if (ref == "input" || ref.rfind("input.", 0) == 0) continue;
      if (s.kind == StepKind::kMap && (ref == "item" || ref.rfind("item.", 0) == 0 || ref == "index")) continue;
      if (ref.rfind("steps.", 0) == 0) {
        const auto rest = ref.substr(6);
        const auto id = rest.substr(0, rest.find('.'));
        if (id == s.id) Fail(steps[i], "step \"" + s.id + "\" references its own result {{" + ref + "}}");
        const auto it = index.find(id);
        if (it == index.end()) {
          Fail(steps[i], "step \"" + s.id + "\" references {{" + ref + "}}, but pipeline \"" + p.name +
                             "\" has no step \"" + id + "\"");
        }
        if (!ancestors[i].count(it->second)) {
          Fail(steps[i], "step \"" + s.id + "\" references {{" + ref + "}}, but \"" + id +
                             "\" cannot have run before it (it is not on any path leading to \"" + s.id + "\")");
        }
        continue;
      }
      Fail(steps[i], "step \"" + s.id + "\" references {{" + ref + "}}: a reference starts with input. or steps.ID." +
                         (s.kind == StepKind::kMap ? " (or item, index inside a map)" : ""));
    }
  }
}

PipelineConfig ReadPipeline(Reader& r, const std::string& name, const YAML::Node& n) {
  const std::string what = "pipeline \"" + name + "\"";
  r.Keys(n, what, {"description", "steps", "retry", "input_schema"});
  PipelineConfig p;
  p.name = name;
  p.line = LineOf(n);
  if (n["description"]) p.description = r.Str(n["description"], what + ".description");
  if (n["input_schema"]) p.input_schema = ReadSchema(r, n["input_schema"], what + ".input_schema");
  RetryConfig retry;
  if (n["retry"]) retry = ReadRetry(r, n["retry"], retry, what + ".retry");
  const auto steps = n["steps"];
  if (!steps || !steps.IsSequence() || steps.size() == 0) {
    Fail(steps ? steps : n, what + " needs steps: a non-empty list");
  }
  std::set<std::string> seen;
  for (const auto& sn : steps) {
    StepConfig s = ReadStep(r, sn, retry, name);
    if (!seen.insert(s.id).second) Fail(sn["id"], "step id \"" + s.id + "\" is used twice in " + what);
    p.steps.push_back(std::move(s));
  }
  CheckPipelineGraph(steps, p);
  return p;
}

Config ReadConfig(Reader& r, const YAML::Node& root) {
  Config c;
  if (!root || root.IsNull()) return c;
  r.Keys(root, "the top level",
         {"listen", "storage", "postgres", "log_level", "server", "engine", "providers", "routes", "pipelines", "http",
          "redis"});
  if (root["listen"]) c.listen = r.Str(root["listen"], "listen");
  if (root["storage"]) {
    c.storage = r.Str(root["storage"], "storage");
    const bool sqlite = c.storage.rfind("sqlite://", 0) == 0 && c.storage.size() > 9;
    const bool postgres = c.storage.rfind("postgres://", 0) == 0 || c.storage.rfind("postgresql://", 0) == 0;
    if (!sqlite && !postgres) {
      Fail(root["storage"], "storage must be sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE, not \"" +
                                RedactUrl(c.storage) + "\"");
    }
    if (postgres) {
      const auto rest = std::string_view(c.storage).substr(c.storage.find("://") + 3);
      const auto authority = rest.substr(0, rest.find_first_of("/?"));
      if (authority.empty() || authority.back() == '@' || rest.find('/') == std::string_view::npos ||
          rest.find_first_of(" \t\n") != std::string_view::npos) {
        Fail(root["storage"], "storage: \"" + RedactUrl(c.storage) +
                                  "\" is not a PostgreSQL URL; write postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE");
      }
    }
  }
  if (const auto pg = root["postgres"]) {
    r.Keys(pg, "postgres", {"pool_size", "connect_timeout", "pool_timeout", "statement_timeout"});
    if (pg["pool_size"]) c.postgres.pool_size = static_cast<int>(r.Int(pg["pool_size"], "postgres.pool_size", 1, 1000));
    if (pg["connect_timeout"]) {
      c.postgres.connect_timeout = r.Dur(pg["connect_timeout"], "postgres.connect_timeout", Duration(1000));
    }
    if (pg["pool_timeout"]) c.postgres.pool_timeout = r.Dur(pg["pool_timeout"], "postgres.pool_timeout", Duration(1));
    if (pg["statement_timeout"]) c.postgres.statement_timeout = r.Dur(pg["statement_timeout"], "postgres.statement_timeout");
  }
  if (root["log_level"]) {
    c.log_level = r.Str(root["log_level"], "log_level");
    if (c.log_level != "debug" && c.log_level != "info" && c.log_level != "warn" && c.log_level != "error") {
      Fail(root["log_level"], "log_level must be debug, info, warn or error");
    }
  }
  if (const auto s = root["server"]) {
    r.Keys(s, "server", {"max_body_bytes", "max_model_body_bytes", "max_connections", "handler_threads", "io_threads", "idle_timeout",
                         "max_connections_per_ip", "header_timeout"});
    if (s["max_body_bytes"]) {
      if (!s["max_body_bytes"].IsScalar()) Fail(s["max_body_bytes"], "server.max_body_bytes must be a size");
      auto v = ParseByteSize(s["max_body_bytes"].Scalar());
      if (!v.ok()) Fail(s["max_body_bytes"], "server.max_body_bytes: " + v.error().message);
      if (*v < 1024 || *v > (64u << 20)) Fail(s["max_body_bytes"], "server.max_body_bytes must be between 1KiB and 64MiB");
      c.server.max_body_bytes = *v;
    }
    if (const auto m = s["max_model_body_bytes"]) {
      if (!m.IsScalar()) Fail(m, "server.max_model_body_bytes must be a size");
      auto v = ParseByteSize(m.Scalar());
      if (!v.ok()) Fail(m, "server.max_model_body_bytes: " + v.error().message);
      if (*v < 1024 || *v > (256u << 20)) Fail(m, "server.max_model_body_bytes must be between 1KiB and 256MiB");
      c.server.max_model_body_bytes = *v;
    }
    if (s["max_connections"]) c.server.max_connections = static_cast<int>(r.Int(s["max_connections"], "server.max_connections", 1, 65536));
    if (s["handler_threads"]) c.server.handler_threads = static_cast<int>(r.Int(s["handler_threads"], "server.handler_threads", 1, 1024));
    if (s["io_threads"]) c.server.io_threads = static_cast<int>(r.Int(s["io_threads"], "server.io_threads", 1, 64));
    if (s["idle_timeout"]) c.server.idle_timeout = r.Dur(s["idle_timeout"], "server.idle_timeout", Duration(1000));
    c.server.max_connections_per_ip =
        s["max_connections_per_ip"]
            ? static_cast<int>(r.Int(s["max_connections_per_ip"], "server.max_connections_per_ip", 1, 65536))
            : std::max(1, c.server.max_connections / 4);
    if (s["header_timeout"]) c.server.header_timeout = r.Dur(s["header_timeout"], "server.header_timeout", Duration(100));
  }
  if (const auto e = root["engine"]) {
    r.Keys(e, "engine",
           {"workers", "lease_timeout", "heartbeat_interval", "poll_interval", "max_queue_depth", "drain_timeout",
            "max_interrupted_attempts", "stall_timeout"});
    if (e["workers"]) c.engine.workers = static_cast<int>(r.Int(e["workers"], "engine.workers", 0, 100000));
    if (e["lease_timeout"]) {
      c.engine.lease_timeout = r.Dur(e["lease_timeout"], "engine.lease_timeout");
      if (c.engine.lease_timeout < Duration(1000)) Fail(e["lease_timeout"], "engine.lease_timeout must be at least 1s");
    }
    c.engine.heartbeat_interval = e["heartbeat_interval"]
                                      ? r.Dur(e["heartbeat_interval"], "engine.heartbeat_interval")
                                      : c.engine.lease_timeout / 3;
    if (c.engine.heartbeat_interval >= c.engine.lease_timeout || c.engine.heartbeat_interval.count() <= 0) {
      Fail(e, "engine.heartbeat_interval must be shorter than engine.lease_timeout");
    }
    if (e["poll_interval"]) c.engine.poll_interval = r.Dur(e["poll_interval"], "engine.poll_interval", Duration(1));
    if (e["max_queue_depth"]) c.engine.max_queue_depth = r.Int(e["max_queue_depth"], "engine.max_queue_depth", 1, 1'000'000'000);
    if (e["drain_timeout"]) c.engine.drain_timeout = r.Dur(e["drain_timeout"], "engine.drain_timeout");
    if (e["max_interrupted_attempts"]) {
      c.engine.max_interrupted_attempts =
          static_cast<int>(r.Int(e["max_interrupted_attempts"], "engine.max_interrupted_attempts", 1, 100));
    }
    if (e["stall_timeout"]) c.engine.stall_timeout = r.Dur(e["stall_timeout"], "engine.stall_timeout", Duration(1000));
  }
  if (const auto ps = root["providers"]) {
    if (!ps.IsMap()) Fail(ps, "providers must be a mapping of names to providers");
    NoDuplicateKeys(ps, "providers");
    for (const auto& kv : ps) {
      const auto name = kv.first.as<std::string>();
      c.providers[name] = ReadProvider(r, name, kv.second);
    }
  }
  if (const auto rs = root["routes"]) {
    if (!rs.IsMap()) Fail(rs, "routes must be a mapping of names to routes");
    NoDuplicateKeys(rs, "routes");
    for (const auto& kv : rs) {
      const auto name = kv.first.as<std::string>();
      RouteConfig route = ReadRoute(r, name, kv.second);
      for (std::size_t i = 0; i < route.targets.size(); ++i) {
        if (!c.providers.count(route.targets[i].provider)) {
          Fail(kv.second["targets"][i], "route \"" + name + "\" names provider \"" + route.targets[i].provider +
                                            "\", which is not defined under providers");
        }
      }
      c.routes[name] = std::move(route);
    }
  }
  if (const auto ps = root["pipelines"]) {
    if (!ps.IsMap()) Fail(ps, "pipelines must be a mapping of names to pipelines");
    NoDuplicateKeys(ps, "pipelines");
    for (const auto& kv : ps) {
      const auto name = kv.first.as<std::string>();
      PipelineConfig p = ReadPipeline(r, name, kv.second);
      for (const auto& s : p.steps) {
        const json::value* llm = s.kind == StepKind::kLlm ? &s.spec : nullptr;
        if (s.kind == StepKind::kMap && s.spec.at("step").at("kind") == "llm") llm = &s.spec.at("step").at("spec");
        if (llm == nullptr) continue;
        const std::string route = json::value_to<std::string>(llm->at("route"));
        if (!c.routes.count(route) && !c.providers.count(route)) {
          throw ConfigError("line " + std::to_string(s.line) + ": step \"" + s.id + "\" uses route \"" +
                            route + "\", which is not defined under routes or providers");
        }
      }
      c.pipelines[name] = std::move(p);
    }
    // Child pipelines exist, and no pipeline runs itself, directly or through others.
    // `line`: the step that runs `name` (0 for a pipeline visited at the top).
    std::function<void(const std::string&, std::vector<std::string>&, int)> visit = [&](const std::string& name,
                                                                                        std::vector<std::string>& path,
                                                                                        int line) {
      if (std::find(path.begin(), path.end(), name) != path.end()) {
        std::string chain;
        for (const auto& x : path) chain += x + " -> ";
        throw ConfigError("line " + std::to_string(line) + ": pipeline \"" + path.front() + "\" runs itself as a child (" +
                          chain + name + "): a run would never end");
      }
      path.push_back(name);
      for (const auto& s : c.pipelines.at(name).steps) {
        if (s.kind != StepKind::kPipeline) continue;
        const std::string child(s.spec.at("name").as_string());
        if (!c.pipelines.count(child)) {
          throw ConfigError("line " + std::to_string(s.line) + ": step \"" + s.id + "\" runs pipeline \"" + child +
                            "\", which is not defined under pipelines");
        }
        visit(child, path, s.line);
      }
      path.pop_back();
    };
    for (const auto& [name, p] : c.pipelines) {
      std::vector<std::string> path;
      visit(name, path, p.line);
    }
  }
  if (const auto rd = root["redis"]) c.redis = ReadRedis(r, rd);
  if (const auto h = root["http"]) {
    r.Keys(h, "http", {"allow_hosts", "max_response_bytes"});
    if (const auto m = h["max_response_bytes"]) {
      c.engine.http.max_response_bytes = r.Int(m, "http.max_response_bytes", 1024, int64_t{1} << 30);
    }
    if (const auto a = h["allow_hosts"]) {
      if (!a.IsSequence()) Fail(a, "http.allow_hosts must be a list of hosts (host or host:port)");
      for (const auto& x : a) {
        std::string host = r.Str(x, "a host of http.allow_hosts");
        std::transform(host.begin(), host.end(), host.begin(), [](unsigned char ch) { return std::tolower(ch); });
        if (host.empty() || host.find('/') != std::string::npos) Fail(x, "http.allow_hosts holds hosts such as api.example.com or 127.0.0.1:9000, not URLs");
        c.engine.http.allow_hosts.push_back(host);
      }
    }
  }
  return c;
}

}  // namespace

Result<Config> ParseConfig(std::string_view yaml, const EnvLookup& env, std::string_view source) {
  const std::string prefix = std::string(source) + ": ";
  // Every name and value may end up in a stored definition, which holds valid UTF-8 only.
  if (!IsValidUtf8(yaml)) {
    std::size_t good = 0;  // the longest valid prefix
    for (std::size_t lo = 0, hi = yaml.size(); lo < hi;) {
      const std::size_t mid = (lo + hi + 1) / 2;
      if (IsValidUtf8(yaml.substr(0, mid))) lo = mid; else hi = mid - 1;
      good = lo;
    }
    const auto line = 1 + std::count(yaml.begin(), yaml.begin() + static_cast<std::ptrdiff_t>(good), '\n');
    return Error(ErrorCode::kInvalidRequest, prefix + "line " + std::to_string(line) + ": the file is not valid UTF-8 (byte " +
                                                 std::to_string(good) + ")");
  }
  try {
    const YAML::Node root = YAML::Load(std::string(yaml));
    Reader reader(env);
    return ReadConfig(reader, root);
  } catch (const ConfigError& e) {
    return Error(ErrorCode::kInvalidRequest, prefix + e.what());
  } catch (const YAML::Exception& e) {
    return Error(ErrorCode::kInvalidRequest, prefix + "line " + std::to_string(e.mark.line + 1) +
                                                 ": " + e.msg);
  } catch (const std::exception& e) {
    return Error(ErrorCode::kInvalidRequest, prefix + e.what());
  }
}

}  // namespace keel
