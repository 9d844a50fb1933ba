#include "keel/gateway/mock_llm.h"

#include <charconv>

#include "keel/core/ids.h"

namespace keel::gateway {
namespace {

struct Directives {
  std::optional<int64_t> sleep_ms;
  std::string fail;  // "503", "429", "context_length", ...
  int retry_after = 0;
  std::optional<int64_t> times;
  bool hang = false;
  bool malformed = false;
  bool reset = false;
  std::optional<std::string> reply;
};

int64_t ToInt(std::string_view s, int64_t fallback) {
  int64_t v = 0;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && p == s.data() + s.size() ? v : fallback;
}

Directives ParseDirectives(std::string_view prompt) {
  Directives d;
  std::size_t pos = 0;
  while (pos <= prompt.size()) {
    auto end = prompt.find('\n', pos);
    if (end == std::string_view::npos) end = prompt.size();
    std::string_view line = prompt.substr(pos, end - pos);
    pos = end + 1;
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (line.rfind("#mock", 0) != 0 || (line.size() > 5 && line[5] != ' ' && line[5] != '\t')) continue;
    line.remove_prefix(5);
    // reply= takes the rest of the line.
    if (const auto r = line.find("reply="); r != std::string_view::npos) {
      d.reply = std::string(line.substr(r + 6));
      line = line.substr(0, r);
    }
    std::size_t p = 0;
    while (p < line.size()) {
      while (p < line.size() && line[p] == ' ') ++p;
      auto q = line.find(' ', p);
      if (q == std::string_view::npos) q = line.size();
      const std::string_view word = line.substr(p, q - p);
      p = q;
      if (word.empty()) continue;
      const auto eq = word.find('=');
      const std::string_view key = word.substr(0, eq);
      const std::string_view val = eq == std::string_view::npos ? std::string_view() : word.substr(eq + 1);
      if (key == "sleep") d.sleep_ms = ToInt(val, 0);
      else if (key == "fail") d.fail = std::string(val);
      else if (key == "retry_after") d.retry_after = static_cast<int>(ToInt(val, 1));
      else if (key == "times") d.times = ToInt(val, 1);
      else if (key == "hang") d.hang = true;
      else if (key == "malformed") d.malformed = true;
      else if (key == "reset") d.reset = true;
    }
    if (end == prompt.size()) break;
  }
  return d;
}

std::string ErrorJson(std::string_view type, std::string_view code, std::string_view message) {
  json::object err{{"message", message}, {"type", type}, {"code", code.empty() ? json::value(nullptr) : json::value(code)}};
  return json::serialize(json::object{{"error", std::move(err)}});
}

}  // namespace

int64_t EstimateTokens(std::string_view text) { return static_cast<int64_t>(text.size() + 3) / 4; }

MockLlm::MockLlm(MockOptions options) : options_(options), rng_(options.seed) {}

MockDecision MockLlm::HandleChat(std::string_view body, std::chrono::steady_clock::time_point now) {
  MockDecision out;
  out.delay = options_.latency;
  json::value req;
  boost::system::error_code ec;
  req = json::parse(body, ec);
  if (ec || !req.is_object()) {
    out.kind = MockDecision::Kind::kError;
    out.status = 400;
    out.body = ErrorJson("invalid_request_error", "", "the body is not a JSON object");
    return out;
  }
  const auto* messages = req.get_object().if_contains("messages");
  if (messages == nullptr || !messages->is_array() || messages->get_array().empty()) {
    out.kind = MockDecision::Kind::kError;
    out.status = 400;
    out.body = ErrorJson("invalid_request_error", "", "messages must be a non-empty array");
    return out;
  }
  std::string prompt;
  int64_t prompt_chars = 0;
  for (const auto& m : messages->get_array()) {
    if (!m.is_object()) continue;
    const auto* content = m.get_object().if_contains("content");
    const auto* role = m.get_object().if_contains("role");
    if (content && content->is_string()) {
      prompt_chars += static_cast<int64_t>(content->get_string().size());
      if (role && role->is_string() && role->get_string() == "user") prompt = content->get_string();
    }
  }
  std::string model = "mock-1";
  if (const auto* mdl = req.get_object().if_contains("model"); mdl && mdl->is_string()) model = mdl->get_string();
  const Directives d = ParseDirectives(prompt);
  const int64_t prompt_tokens = (prompt_chars + 3) / 4;

  int64_t seen = 0;
  bool random_fail = false;
  bool limited = false;
  {
    std::lock_guard lock(mu_);
    ++total_;
    seen = by_prompt_[prompt]++;  // calls with this prompt before this one
    if (options_.fail_rate > 0) {
      random_fail = std::uniform_real_distribution<double>(0, 1)(rng_) < options_.fail_rate;
    }
    if (options_.rpm > 0 || options_.tpm > 0) {
      if (now - window_start_ >= std::chrono::minutes(1)) {
        window_start_ = now;
        window_requests_ = 0;
        window_tokens_ = 0;
      }
      if ((options_.rpm > 0 && window_requests_ + 1 > options_.rpm) ||
          (options_.tpm > 0 && window_tokens_ + prompt_tokens > options_.tpm)) {
        limited = true;
      } else {
        ++window_requests_;
        window_tokens_ += prompt_tokens;
      }
    }
  }
  if (d.sleep_ms) out.delay = std::chrono::milliseconds(*d.sleep_ms);
  if (limited) {
    out.kind = MockDecision::Kind::kError;
    out.status = 429;
    out.retry_after_s = 1;
    out.body = ErrorJson("rate_limit_error", "rate_limit_exceeded", "mock rate limit reached (rpm/tpm)");
    return out;
  }
  const bool directed = !d.times || seen < *d.times;
  if (directed && d.hang) {
    out.kind = MockDecision::Kind::kHang;
    out.delay = options_.hang;
    return out;
  }
  if (directed && d.reset) {
    out.kind = MockDecision::Kind::kReset;
    return out;
  }
  if (directed && d.malformed) {
    out.kind = MockDecision::Kind::kMalformed;
    out.body = R"({"id":"chatcmpl-mock","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"trunc)";
    return out;
  }
  if ((directed && !d.fail.empty()) || random_fail) {
    out.kind = MockDecision::Kind::kError;
    const std::string fail = random_fail && d.fail.empty() ? std::to_string(options_.fail_status) : d.fail;
    if (fail == "context_length") {
      out.status = 400;
      out.body = ErrorJson("invalid_request_error", "context_length_exceeded",
                           "This model's maximum context length was exceeded (mock)");
      return out;
    }
    out.status = static_cast<int>(ToInt(fail, 500));
    if (out.status < 400 || out.status > 599) out.status = 500;
    if (out.status == 429) out.retry_after_s = d.retry_after > 0 ? d.retry_after : 1;
    out.body = ErrorJson(out.status == 429 ? "rate_limit_error" : out.status >= 500 ? "server_error" : "invalid_request_error",
                         "", "mock failure " + std::to_string(out.status));
    return out;
  }
  // A deterministic answer: the same prompt always gets the same text.
  std::string text;
  if (d.reply) {
    text = *d.reply;
  } else {
    std::string gist = prompt.substr(0, 200);
    for (auto& c : gist) {
      if (c == '\n') c = ' ';
    }
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(Fnv1a64(prompt)));
    text = "mock answer " + std::string(hex, 8) + ": " + gist;
  }
  const int64_t completion_tokens = EstimateTokens(text);
  json::object resp{
      {"id", "chatcmpl-" + std::to_string(Fnv1a64(prompt) ^ static_cast<uint64_t>(seen))},
      {"object", "chat.completion"},
      {"created", 1700000000},
      {"model", model},
      {"choices", json::array{json::object{{"index", 0},
                                           {"message", json::object{{"role", "assistant"}, {"content", text}}},
                                           {"finish_reason", "stop"}}}},
      {"usage", json::object{{"prompt_tokens", prompt_tokens},
                             {"completion_tokens", completion_tokens},
                             {"total_tokens", prompt_tokens + completion_tokens}}}};
  out.body = json::serialize(resp);
  return out;
}

json::value MockLlm::Stats() const {
  std::lock_guard lock(mu_);
  json::object by;
  for (const auto& [prompt, n] : by_prompt_) by[prompt] = n;
  return json::object{{"total", total_}, {"by_prompt", std::move(by)}};
}

void MockLlm::Reset() {
  std::lock_guard lock(mu_);
  total_ = 0;
  by_prompt_.clear();
  window_start_ = {};
  window_requests_ = 0;
  window_tokens_ = 0;
}

}  // namespace keel::gateway
