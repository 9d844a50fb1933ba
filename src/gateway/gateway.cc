#include "keel/gateway/gateway.h"

#include <charconv>
#include <chrono>
#include <map>
#include <prometheus/counter.h>
#include <prometheus/histogram.h>
#include <thread>
#include <vector>

#include "keel/gateway/mock_llm.h"
#include "keel/net/http_client.h"
#include "keel/obs/log.h"
#include "keel/obs/metrics.h"

namespace keel::gateway {
namespace {

// Reads an OpenAI-shaped error body: {"error": {"message", "type", "code"}}.
Error UpstreamError(int status, const net::Headers& headers, std::string_view body, const std::string& provider) {
  ErrorCode code = ClassifyHttpStatus(status);
  std::string message;
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  if (!ec && v.is_object()) {
    if (const auto* e = v.get_object().if_contains("error"); e && e->is_object()) {
      const auto& eo = e->get_object();
      if (const auto* m = eo.if_contains("message"); m && m->is_string()) message = m->get_string();
      std::string c;
      if (const auto* cv = eo.if_contains("code"); cv && cv->is_string()) c = cv->get_string();
      if (c == "context_length_exceeded") code = ErrorCode::kContextLength;
      if (c == "content_filter" || c == "content_policy_violation") code = ErrorCode::kContentPolicy;
    }
  }
  if (message.empty()) message = std::string(body.substr(0, 200));
  Error err(code, "provider " + provider + " answered " + std::to_string(status) + ": " + message);
  const auto ra = net::FindHeader(headers, "retry-after");
  int64_t secs = 0;
  if (!ra.empty()) {
    const auto [p, rc] = std::from_chars(ra.data(), ra.data() + ra.size(), secs);
    if (rc == std::errc() && secs >= 0) err.retry_after = Duration(secs * 1000);
  }
  return err;
}

// Reads a chat-completions success body; garbage is an invalid_output of this target.
Result<ChatResult> ParseCompletion(std::string_view body, const std::string& provider) {
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  auto bad = [&](std::string_view why) {
    return Error(ErrorCode::kInvalidOutput, "provider " + provider + " answered an unusable completion: " + std::string(why));
  };
  if (ec) return bad("not JSON (" + ec.message() + ")");
  if (!v.is_object()) return bad("not a JSON object");
  const auto& o = v.get_object();
  const auto* choices = o.if_contains("choices");
  if (!choices || !choices->is_array() || choices->get_array().empty()) return bad("no choices");
  const auto& first = choices->get_array()[0];
  const json::value* content = first.is_object() ? FindPath(first, "message.content") : nullptr;
  if (!content || !content->is_string()) return bad("choices[0].message.content is not a string");
  ChatResult r;
  r.text = content->get_string();
  if (const auto* m = o.if_contains("model"); m && m->is_string()) r.model = m->get_string();
  if (const auto* u = o.if_contains("usage"); u && u->is_object()) r.usage = *u;
  r.provider = provider;
  return r;
}

class Provider {
 public:
  virtual ~Provider() = default;
  virtual Result<ChatResult> Chat(const json::object& body, const ChatRequest& req, Duration timeout) = 0;
};

class OpenAiProvider final : public Provider {
 public:
  explicit OpenAiProvider(ProviderConfig config) : config_(std::move(config)), url_(config_.base_url + "/chat/completions") {}

  Result<ChatResult> Chat(const json::object& body, const ChatRequest& req, Duration timeout) override {
    net::ClientRequest http;
    http.method = "POST";
    http.url = url_;
    http.headers = {{"Content-Type", "application/json"}, {"Accept", "application/json"}};
    if (!config_.api_key.empty()) http.headers.emplace_back("Authorization", "Bearer " + config_.api_key);
    if (!req.idempotency_key.empty()) http.headers.emplace_back("Idempotency-Key", req.idempotency_key);
    for (const auto& [k, v] : config_.headers) http.headers.emplace_back(k, v);
    json::object b = body;
    b["model"] = config_.model;
    http.body = json::serialize(b);
    http.connect_timeout = std::min(config_.timeout.connect, timeout);
    http.total_timeout = std::min(config_.timeout.total, timeout);
    auto resp = net::SendHttp(http);
    if (!resp.ok()) {
      Error e = std::move(resp).error();
      e.message = "provider " + config_.name + ": " + e.message;
      return e;
    }
    if (resp->status < 200 || resp->status >= 300) return UpstreamError(resp->status, resp->headers, resp->body, config_.name);
    return ParseCompletion(resp->body, config_.name);
  }

 private:
  ProviderConfig config_;
  std::string url_;
};

// The built-in mock, answered in-process: the default provider when keel starts with no
// configuration, so that the example pipelines run with no network at all.
class MockProvider final : public Provider {
 public:
  explicit MockProvider(ProviderConfig config) : config_(std::move(config)), mock_(MockOptions{}) {}

  Result<ChatResult> Chat(const json::object& body, const ChatRequest&, Duration timeout) override {
    json::object b = body;
    b["model"] = config_.model;
    const auto d = mock_.HandleChat(json::serialize(b), std::chrono::steady_clock::now());
    const auto wait = std::min<Duration>(std::chrono::duration_cast<Duration>(d.delay), timeout);
    // Simulated provider latency, bounded by the call's timeout.
    if (wait.count() > 0) std::this_thread::sleep_for(wait);
    if (d.delay > timeout || d.kind == MockDecision::Kind::kHang) {
      return Error(ErrorCode::kTimeout, "provider " + config_.name + ": timed out after " + std::to_string(timeout.count()) + "ms");
    }
    switch (d.kind) {
      case MockDecision::Kind::kReset:
        return Error(ErrorCode::kNetwork, "provider " + config_.name + ": connection reset (mock)");
      case MockDecision::Kind::kError: {
        net::Headers h;
        if (d.retry_after_s > 0) h.emplace_back("retry-after", std::to_string(d.retry_after_s));
        return UpstreamError(d.status, h, d.body, config_.name);
      }
      default:
        return ParseCompletion(d.body, config_.name);
    }
  }

 private:
  ProviderConfig config_;
  MockLlm mock_;
};

class GatewayImpl final : public Gateway {
 public:
  GatewayImpl(prometheus::Registry& registry)
      : requests_(prometheus::BuildCounter()
                      .Name("keel_llm_requests_total")
                      .Help("Provider calls by route, provider and outcome (ok or an error class)")
                      .Register(registry)),
        latency_(prometheus::BuildHistogram()
                     .Name("keel_llm_request_duration_seconds")
                     .Help("Latency of provider calls")
                     .Register(registry)),
        tokens_(prometheus::BuildCounter()
                    .Name("keel_llm_tokens_total")
                    .Help("Tokens reported by providers, by direction (input, output)")
                    .Register(registry)) {}

  Result<void> Init(const Config& config) {
    for (const auto& [name, p] : config.providers) {
      if (p.type == "openai") providers_[name] = std::make_unique<OpenAiProvider>(p);
      else providers_[name] = std::make_unique<MockProvider>(p);
    }
    for (const auto& [name, r] : config.routes) routes_[name] = r.targets;
    // A provider's name is also a route of one target.
    for (const auto& [name, p] : config.providers) {
      if (!routes_.count(name)) routes_[name] = {name};
    }
    return Ok();
  }

  Result<ChatResult> Chat(const ChatRequest& req) override {
    const auto it = routes_.find(req.route);
    if (it == routes_.end()) {
      return Error(ErrorCode::kNotFound, "no route or provider named \"" + req.route + "\"", "model");
    }
    json::object body;
    body["messages"] = req.messages;
    if (req.temperature) body["temperature"] = *req.temperature;
    if (req.max_tokens) body["max_tokens"] = *req.max_tokens;
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + req.timeout;
    std::optional<Error> last;
    int attempts = 0;
    for (const auto& target : it->second) {
      if (attempts >= kMaxFailoverChain) break;
      const auto left = std::chrono::duration_cast<Duration>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      ++attempts;
      auto& provider = *providers_.at(target);
      const auto t0 = std::chrono::steady_clock::now();
      auto r = provider.Chat(body, req, left);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      latency_.Add({{"provider", target}}, obs::LatencyBuckets()).Observe(secs);
      if (r.ok()) {
        requests_.Add({{"route", req.route}, {"provider", target}, {"outcome", "ok"}}).Increment();
        if (r->usage.is_object()) {
          const auto& u = r->usage.get_object();
          if (const auto* p = u.if_contains("prompt_tokens"); p && p->is_int64())
            tokens_.Add({{"provider", target}, {"direction", "input"}}).Increment(static_cast<double>(p->get_int64()));
          if (const auto* c = u.if_contains("completion_tokens"); c && c->is_int64())
            tokens_.Add({{"provider", target}, {"direction", "output"}}).Increment(static_cast<double>(c->get_int64()));
        }
        r->attempts = attempts;
        if (r->model.empty()) r->model = target;
        return r;
      }
      requests_.Add({{"route", req.route}, {"provider", target}, {"outcome", std::string(ErrorCodeName(r.error().code))}})
          .Increment();
      last = std::move(r).error();
      if (!FailsOver(last->code)) break;
    }
    if (!last) {
      return Error(ErrorCode::kTimeout, "route \"" + req.route + "\": the deadline passed before any target answered");
    }
    return *last;
  }

 private:
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Family<prometheus::Counter>& tokens_;
  std::map<std::string, std::unique_ptr<Provider>> providers_;
  std::map<std::string, std::vector<std::string>> routes_;
};

}  // namespace

Result<std::unique_ptr<Gateway>> Gateway::Create(const Config& config, prometheus::Registry& registry) {
  auto g = std::make_unique<GatewayImpl>(registry);
  KEEL_RETURN_IF_ERROR(g->Init(config));
  return std::unique_ptr<Gateway>(std::move(g));
}

}  // namespace keel::gateway
