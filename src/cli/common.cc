#include <csignal>
#include <charconv>

#include <algorithm>
#include <cctype>

#include "commands.h"
#include "keel/core/secrets.h"

namespace keel::cli {
namespace {

// Headers whose values are protocol settings, not credentials: masking them would only
// mangle logs ("application/json", a version date).
bool CarriesNoSecret(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  static const char* const kPlain[] = {"content-type", "accept", "accept-encoding", "accept-language", "user-agent",
                                       "anthropic-version", "anthropic-beta", "openai-beta", "openai-organization",
                                       "openai-project", "cache-control", "connection"};
  return std::find(std::begin(kPlain), std::end(kPlain), name) != std::end(kPlain);
}

void AddHeaderValue(const std::string& name, std::string_view value) {
  if (CarriesNoSecret(name) || value.find("{{") != std::string_view::npos) return;
  Secrets().Add(value);
  // "Bearer TOKEN", "Basic CREDENTIALS": an echo may carry the credentials alone.
  if (const auto space = value.find(' '); space != std::string_view::npos) Secrets().Add(value.substr(space + 1));
}

// The literal headers of every http step, wherever it is nested (map, agent tools, ...).
void AddStepHeaders(const json::value& v) {
  if (v.is_array()) {
    for (const auto& e : v.get_array()) AddStepHeaders(e);
    return;
  }
  if (!v.is_object()) return;
  for (const auto& [key, value] : v.get_object()) {
    if (key == "http" && value.is_object()) {
      if (const auto* h = value.get_object().if_contains("headers"); h && h->is_object()) {
        for (const auto& [name, hv] : h->get_object()) {
          if (hv.is_string()) AddHeaderValue(std::string(name), hv.get_string());
        }
      }
    }
    AddStepHeaders(value);
  }
}

}  // namespace

void RegisterConfigSecrets(const Config& config) {
  SecretRedactor& secrets = Secrets();
  secrets.AddUrlPasswords(config.storage);
  if (config.redis) secrets.Add(config.redis->address.password);
  for (const auto& [name, p] : config.providers) {
    secrets.Add(p.api_key);
    secrets.AddUrlPasswords(p.base_url);
    for (const auto& [h, v] : p.headers) AddHeaderValue(h, v);
    for (const auto& [k, v] : p.query) {
      std::string key = k;
      std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      if (key.find("key") != std::string::npos || key.find("token") != std::string::npos ||
          key.find("secret") != std::string::npos || key.find("sig") != std::string::npos) {
        secrets.Add(v);
      }
    }
  }
  for (const auto& [name, pipeline] : config.pipelines) {
    for (const auto& step : pipeline.steps) {
      if (step.kind == StepKind::kHttp) AddStepHeaders(json::object{{"http", step.spec}});  // the spec is the http body
      else AddStepHeaders(step.spec);
    }
  }
}

bool ParseListen(const std::string& listen, std::string& host, uint16_t& port, std::string& error) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    error = "listen address \"" + listen + "\" must be HOST:PORT, e.g. 127.0.0.1:7420";
    return false;
  }
  host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const std::string p = listen.substr(colon + 1);
  unsigned v = 0;
  const auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
  if (ec != std::errc() || ptr != p.data() + p.size() || v > 65535) {
    error = "listen port \"" + p + "\" must be a number from 0 to 65535";
    return false;
  }
  port = static_cast<uint16_t>(v);
  return true;
}

void BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
}

const char* WaitForStopSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  sigwait(&set, &sig);
  return sig == SIGINT ? "SIGINT" : "SIGTERM";
}

}  // namespace keel::cli
