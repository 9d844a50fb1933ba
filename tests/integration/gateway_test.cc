// The OpenAI-compatible gateway against real keel mock-llm processes on loopback.

#include <gtest/gtest.h>

#include <mutex>

#include "keel/net/http_server.h"

#include "helpers.h"

namespace keel::testing {
namespace {

std::string Provider(const std::string& name, const std::string& url, const std::string& extra = "") {
  return "  " + name + ": {type: openai, base_url: " + url + "/v1, model: " + name + "-model, timeout: {connect: 1s, total: 5s}" +
         extra + "}\n";
}

class GatewayTest : public ::testing::Test {
 protected:
  void Start(const std::string& providers, const std::string& routes) {
    server_ = std::make_unique<KeelServer>(dir_.path(), "storage: sqlite://data/keel.db\nproviders:\n" + providers +
                                                            "routes:\n" + routes);
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }
  JsonResponse Call(const std::string& model, const std::string& content, net::Headers h = {}) {
    return HttpPostJson(server_->url() + "/v1/chat/completions", Chat(model, content), std::move(h));
  }
  TempDir dir_;
  std::unique_ptr<KeelServer> server_;
};

TEST_F(GatewayTest, FailsOverOn503AndNamesTheModelThatAnswered) {
  MockLlm down({"--fail-rate", "1", "--fail-status", "503"});
  MockLlm up;
  Start(Provider("down", down.url()) + Provider("up", up.url()),
        "  smart: {strategy: priority, targets: [{provider: down}, {provider: up, tier: 2}]}\n");
  auto r = Call("smart", "hello");
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body.at("model").as_string(), "up-model");
  EXPECT_EQ(r.body.at("object").as_string(), "chat.completion");
  EXPECT_TRUE(r.body.at("choices").as_array()[0].at("message").at("content").is_string());
  EXPECT_TRUE(r.body.at("usage").at("total_tokens").is_int64());
  EXPECT_EQ(r.Header("x-keel-provider"), "up");
  EXPECT_EQ(r.Header("x-keel-route"), "smart");
  EXPECT_EQ(r.Header("x-keel-attempts"), "2");
  EXPECT_EQ(r.Header("x-keel-failovers"), "1");
  EXPECT_EQ(MockTotal(down.url()), 1);
  EXPECT_EQ(MockTotal(up.url()), 1);
}

// The loop's backoff and Retry-After are tested on a manual clock (attempt_loop_test.cc);
// here, what needs a process: the Retry-After header of a real 429 read and waited out by
// the real timer of an I/O thread (a lower bound, whatever the machine's speed).
TEST_F(GatewayTest, RetryAfterIsHonouredOnTheSameTarget) {
  MockLlm only;
  Start(Provider("only", only.url()), "  r: {targets: [{provider: only}], retry: {max_attempts: 3, initial_backoff: 10ms}}\n");
  auto r = Call("r", "#mock fail=429 retry_after=1 times=1");
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_GE(std::stoll(std::string(r.Header("x-keel-duration-ms"))), 1000);
  EXPECT_EQ(r.Header("x-keel-attempts"), "2");
  EXPECT_EQ(MockTotal(only.url()), 2);
}

TEST_F(GatewayTest, FourXxFailsFastAndIsNeverRetried) {
  MockLlm a, b;
  Start(Provider("a", a.url()) + Provider("b", b.url()), "  r: {targets: [{provider: a}, {provider: b}]}\n");
  auto r = Call("r", "#mock fail=401");
  EXPECT_EQ(r.status, 401) << r.raw;
  EXPECT_EQ(r.body.at("error").at("type").as_string(), "auth");
  EXPECT_EQ(MockTotal(a.url()) + MockTotal(b.url()), 1);
}

// Half-open after open_for, and the trial, are tested on a manual clock
// (attempt_loop_test.cc); here, real 500s open the circuit and /metrics shows it.
TEST_F(GatewayTest, BreakerOpensAtItsThreshold) {
  MockLlm bad({"--fail-rate", "1", "--fail-status", "500"});
  MockLlm good;
  Start(Provider("bad", bad.url()) + Provider("good", good.url()),
        "  r:\n    targets: [{provider: bad}, {provider: good, tier: 2}]\n"
        "    circuit_breaker: {failure_rate: 0.5, min_requests: 4, consecutive_failures: 0, open_for: 1h}\n"
        "    retry_budget: {ratio: 10, min_per_second: 1000}\n");
  for (int i = 0; i < 4; ++i) ASSERT_EQ(Call("r", "x").status, 200);
  EXPECT_EQ(MockTotal(bad.url()), 4);  // the 4th failure reaches min_requests: open
  for (int i = 0; i < 10; ++i) ASSERT_EQ(Call("r", "y").status, 200);
  EXPECT_EQ(MockTotal(bad.url()), 4) << "calls went to a target whose circuit is open";
  auto m = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(m.find("keel_gateway_circuit_state{provider=\"bad\",route=\"r\"} 2"), std::string::npos) << m;
}

TEST_F(GatewayTest, ActiveHealthChecksCloseARecoveredCircuitWithoutUserTraffic) {
  MockLlm a;
  Start("  a: {type: openai, base_url: " + a.url() + "/v1, health_check: {interval: 100ms}}\n",
        "  r:\n    targets: [{provider: a}]\n    retry: {max_attempts: 1}\n"
        "    circuit_breaker: {consecutive_failures: 2, min_requests: 1000, open_for: 200ms}\n");
  // Two failures in a row open a's circuit; then calls are refused without reaching it.
  for (int i = 0; i < 2; ++i) ASSERT_EQ(Call("r", "#mock fail=500").status, 502);
  EXPECT_EQ(Call("r", "refused").status, 503);
  EXPECT_EQ(MockCount(a.url(), "refused"), 0);
  const std::string open_gauge = "keel_gateway_circuit_state{provider=\"a\",route=\"r\"} 2";
  const std::string closed_gauge = "keel_gateway_circuit_state{provider=\"a\",route=\"r\"} 0";
  EXPECT_NE(HttpGet(server_->url() + "/metrics").raw.find(open_gauge), std::string::npos);
  // With no user call at all, the prober's trial closes it again.
  ASSERT_TRUE(Eventually([&] {
    return HttpGet(server_->url() + "/metrics").raw.find(closed_gauge) != std::string::npos;
  }, std::chrono::seconds(5)));
  EXPECT_EQ(MockCount(a.url(), "ping"), 1);
  EXPECT_NE(HttpGet(server_->url() + "/metrics").raw.find("keel_gateway_health_probes_total{outcome=\"ok\",provider=\"a\"} 1"),
            std::string::npos);
  auto r = Call("r", "hello");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.Header("x-keel-provider"), "a");
}

TEST_F(GatewayTest, CostIsAttributedToTheProviderThatAnswered) {
  MockLlm down({"--fail-rate", "1", "--fail-status", "503"});
  MockLlm up;
  Start(Provider("down", down.url(), ", cost: {input_per_mtok: 100000, output_per_mtok: 100000}") +
            Provider("up", up.url(), ", cost: {input_per_mtok: 100000, output_per_mtok: 200000}"),
        "  r: {targets: [{provider: down}, {provider: up}]}\n");
  auto r = Call("r", "price me");
  ASSERT_EQ(r.status, 200) << r.raw;
  const double in = static_cast<double>(r.body.at("usage").at("prompt_tokens").as_int64());
  const double out = static_cast<double>(r.body.at("usage").at("completion_tokens").as_int64());
  const auto m = HttpGet(server_->url() + "/metrics").raw;
  // At 0.1 per input token and 0.2 per output token.
  const std::string name = "keel_llm_cost_total{provider=\"up\"} ";
  const auto at = m.find(name);
  ASSERT_NE(at, std::string::npos) << m;
  EXPECT_NEAR(std::stod(m.substr(at + name.size())), 0.1 * in + 0.2 * out, 1e-9);
  // Every provider's series exists from the start; the one that failed cost nothing.
  EXPECT_NE(m.find("keel_llm_cost_total{provider=\"down\"} 0\n"), std::string::npos) << m;
  EXPECT_NE(m.find("keel_llm_tokens_total{direction=\"output\",provider=\"up\"}"), std::string::npos);
}

TEST_F(GatewayTest, WeightedSplitIsWithinTolerance) {
  MockLlm a, b;
  Start(Provider("a", a.url()) + Provider("b", b.url()),
        "  r: {strategy: weighted, targets: [{provider: a, weight: 80}, {provider: b, weight: 20}]}\n");
  constexpr int kCalls = 300;
  for (int i = 0; i < kCalls; ++i) ASSERT_EQ(Call("r", "w" + std::to_string(i)).status, 200);
  const double share = static_cast<double>(MockTotal(a.url())) / kCalls;
  EXPECT_GT(share, 0.70);
  EXPECT_LT(share, 0.90);
  EXPECT_EQ(MockTotal(a.url()) + MockTotal(b.url()), kCalls);
}

// The latency strategy's averages, as /metrics shows them; -1 when absent.
double LatencyAverage(const std::string& metrics, const std::string& provider) {
  const std::string series = "keel_gateway_latency_average_seconds{provider=\"" + provider + "\",route=\"r\"} ";
  const auto at = metrics.find(series);
  return at == std::string::npos ? -1 : std::stod(metrics.substr(at + series.size()));
}

// The latency strategy's order (the faster first, re-measuring a stale target) is tested on
// a manual clock (attempt_loop_test.cc: RouteStrategyTest). Here, what does not depend on
// the machine's speed: unmeasured targets go first in route order, and /metrics shows each
// target's average from its first sample, the slow one's at least its injected 60 ms.
TEST_F(GatewayTest, LatencyStrategyMeasuresEachTarget) {
  MockLlm slow({"--latency-ms", "60"});
  MockLlm fast;
  Start(Provider("slow", slow.url()) + Provider("fast", fast.url()),
        "  r: {strategy: latency, targets: [{provider: slow}, {provider: fast}]}\n");
  EXPECT_EQ(LatencyAverage(HttpGet(server_->url() + "/metrics").raw, "slow"), -1);
  auto first = Call("r", "warm 1");
  ASSERT_EQ(first.status, 200) << first.raw;
  EXPECT_EQ(first.Header("x-keel-provider"), "slow");
  auto second = Call("r", "warm 2");
  ASSERT_EQ(second.status, 200) << second.raw;
  EXPECT_EQ(second.Header("x-keel-provider"), "fast");
  const auto m = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_GE(LatencyAverage(m, "slow"), 0.060) << m;
  EXPECT_GE(LatencyAverage(m, "fast"), 0) << m;
}

TEST_F(GatewayTest, RoundRobinAlternates) {
  MockLlm a, b;
  Start(Provider("a", a.url()) + Provider("b", b.url()),
        "  r: {strategy: round_robin, targets: [{provider: a}, {provider: b}]}\n");
  for (int i = 0; i < 10; ++i) ASSERT_EQ(Call("r", "x").status, 200);
  EXPECT_EQ(MockTotal(a.url()), 5);
  EXPECT_EQ(MockTotal(b.url()), 5);
}

TEST_F(GatewayTest, EveryTargetRateLimitedAnswers429WithRetryAfter) {
  MockLlm a;
  Start(Provider("a", a.url(), ", limits: {rpm: 2}"), "  r: {targets: [{provider: a}]}\n");
  EXPECT_EQ(Call("r", "1").status, 200);
  EXPECT_EQ(Call("r", "2").status, 200);
  auto r = Call("r", "3");
  EXPECT_EQ(r.status, 429) << r.raw;
  EXPECT_FALSE(r.Header("retry-after").empty());
  EXPECT_EQ(r.body.at("error").at("type").as_string(), "rate_limited");
  EXPECT_EQ(MockTotal(a.url()), 2);
}

TEST_F(GatewayTest, ContextLengthGoesToALargerWindow) {
  MockLlm small, large;
  Start(Provider("small", small.url(), ", context_window: 1000") + Provider("large", large.url(), ", context_window: 100000"),
        "  r: {targets: [{provider: small}, {provider: large}]}\n");
  // About 2,000 tokens: too long for small's window, so only large is called.
  auto r = Call("r", std::string(8000, 'y'));
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.Header("x-keel-provider"), "large");
  EXPECT_EQ(MockTotal(small.url()), 0);
  // A prompt larger than every window is refused before any provider is called.
  auto big = Call("r", std::string(500000, 'x'));
  EXPECT_EQ(big.status, 400) << big.raw;
  EXPECT_EQ(big.body.at("error").at("type").as_string(), "context_length");
  EXPECT_EQ(MockTotal(small.url()) + MockTotal(large.url()), 1);
}

TEST_F(GatewayTest, BadRequestsGetOpenAiShapedErrorsAndNoProviderIsCalled) {
  MockLlm a;
  Start(Provider("a", a.url()), "  r: {targets: [{provider: a}]}\n");
  const std::string url = server_->url() + "/v1/chat/completions";
  auto unknown = Call("nope", "x");
  EXPECT_EQ(unknown.status, 404);
  EXPECT_EQ(unknown.body.at("error").at("param").as_string(), "model");
  EXPECT_TRUE(unknown.body.at("error").at("message").is_string());
  EXPECT_TRUE(unknown.body.at("error").at("code").is_string());
  // Names that are not routes come from clients: they share one metric series.
  EXPECT_EQ(Call("nope-2", "x").status, 404);
  const auto metrics = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(metrics.find("keel_gateway_requests_total{outcome=\"not_found\",route=\"(unknown)\"} 2"), std::string::npos)
      << metrics;
  EXPECT_EQ(metrics.find("nope"), std::string::npos);
  EXPECT_EQ(HttpPost(url, "{not json").status, 400);
  EXPECT_EQ(HttpPostJson(url, json::object{{"model", "r"}}).body.at("error").at("param").as_string(), "messages");
  EXPECT_EQ(HttpPostJson(url, json::object{{"model", "r"}, {"messages", json::array{}}}).status, 400);
  EXPECT_EQ(HttpPostJson(url, json::object{{"messages", json::array{json::object{{"role", "user"}, {"content", "x"}}}}})
                .body.at("error").at("param").as_string(), "model");
  EXPECT_EQ(HttpPostJson(url, json::object{{"model", "r"}, {"messages", json::array{json::object{{"content", "x"}}}}}).status,
            400);
  EXPECT_EQ(MockTotal(a.url()), 0);
  auto models = HttpGet(server_->url() + "/v1/models");
  ASSERT_EQ(models.status, 200);
  bool listed = false;
  for (const auto& m : models.body.at("data").as_array()) listed = listed || m.at("id").as_string() == "r";
  EXPECT_TRUE(listed);
}

TEST_F(GatewayTest, ProviderGarbageIsClassifiedAndFailedOver) {
  MockLlm a, b;
  Start(Provider("a", a.url()) + Provider("b", b.url()), "  r: {targets: [{provider: a}, {provider: b}]}\n");
  // Each mock garbles its first answer to this prompt: a, then b, then a again answers.
  auto r = Call("r", "#mock malformed times=1");
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.Header("x-keel-attempts"), "3");
  EXPECT_EQ(r.Header("x-keel-provider"), "a");
  auto m = HttpGet(server_->url() + "/metrics").raw;
  for (const char* p : {"a", "b"}) {
    EXPECT_NE(m.find("keel_llm_requests_total{outcome=\"invalid_output\",provider=\"" + std::string(p) +
                     "\",route=\"r\"} 1"),
              std::string::npos)
        << m;
  }
}

TEST_F(GatewayTest, EmbeddingsGoThroughTheSameChain) {
  MockLlm down({"--fail-rate", "1", "--fail-status", "503"});
  MockLlm up;
  Start(Provider("down", down.url()) + Provider("up", up.url()),
        "  embed: {targets: [{provider: down}, {provider: up}]}\n");
  const std::string url = server_->url() + "/v1/embeddings";
  auto r = HttpPostJson(url, json::object{{"model", "embed"}, {"input", json::array{"alpha", "beta"}}});
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body.at("object").as_string(), "list");
  ASSERT_EQ(r.body.at("data").as_array().size(), 2u);
  EXPECT_EQ(r.body.at("data").as_array()[1].at("index").as_int64(), 1);
  EXPECT_FALSE(r.body.at("data").as_array()[0].at("embedding").as_array().empty());
  EXPECT_EQ(r.Header("x-keel-provider"), "up");
  EXPECT_EQ(r.Header("x-keel-failovers"), "1");
  // Deterministic: the same input, the same vector.
  auto again = HttpPostJson(url, json::object{{"model", "embed"}, {"input", "alpha"}});
  ASSERT_EQ(again.status, 200);
  EXPECT_EQ(again.body.at("data").as_array()[0].at("embedding"), r.body.at("data").as_array()[0].at("embedding"));
  auto bad = HttpPostJson(url, json::object{{"model", "embed"}, {"input", json::array{}}});
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.body.at("error").at("param").as_string(), "input");
  EXPECT_EQ(HttpPostJson(url, json::object{{"model", "nope"}, {"input", "x"}}).status, 404);
}

TEST_F(GatewayTest, StreamingFailsOverBeforeTheFirstTokenInvisibly) {
  MockLlm down({"--fail-rate", "1", "--fail-status", "503"});
  Start(Provider("down", down.url()) + "  local: {type: mock, model: local-model}\n",
        "  r: {targets: [{provider: down}, {provider: local}]}\n");
  auto s = StreamCall(server_->url(), StreamBody("r", "stream me please", true));
  ASSERT_TRUE(s.transport_ok);
  ASSERT_EQ(s.status, 200) << s.raw;
  EXPECT_NE(net::FindHeader(s.headers, "content-type").find("text/event-stream"), std::string_view::npos);
  ASSERT_GE(s.data.size(), 3u);
  EXPECT_EQ(s.data.back(), "[DONE]");
  // The streamed text is the whole answer, the same as unstreamed.
  auto whole = Call("r", "stream me please");
  ASSERT_EQ(whole.status, 200);
  EXPECT_EQ(s.Text(), std::string(whole.body.at("choices").as_array()[0].at("message").at("content").as_string()));
  // include_usage: the last chunk before [DONE] has the usage and no choices.
  auto usage = json::parse(s.data[s.data.size() - 2]);
  EXPECT_TRUE(usage.at("choices").as_array().empty());
  EXPECT_TRUE(usage.at("usage").at("total_tokens").is_int64());
  EXPECT_EQ(MockTotal(down.url()), 2);
  auto m = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(m.find("keel_llm_time_to_first_token_seconds_count{provider=\"local\"} 1"), std::string::npos) << m;
}

TEST_F(GatewayTest, StreamingErrorsBeforeAnyTokenAreHttpErrors) {
  MockLlm down({"--fail-rate", "1", "--fail-status", "503"});
  Start(Provider("down", down.url()), "  r: {targets: [{provider: down}], retry: {max_attempts: 1}}\n");
  auto s = StreamCall(server_->url(), StreamBody("r", "x"));
  ASSERT_TRUE(s.transport_ok);
  EXPECT_EQ(s.status, 503) << s.raw;
  auto body = json::parse(s.raw);
  EXPECT_EQ(body.at("error").at("type").as_string(), "overloaded");
  auto bad = HttpPostJson(server_->url() + "/v1/chat/completions",
                          json::object{{"model", "r"}, {"stream", "yes"}, {"messages", json::array{json::object{{"role", "user"}, {"content", "x"}}}}});
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.body.at("error").at("param").as_string(), "stream");
}

TEST_F(GatewayTest, AStreamThatBreaksAfterItsFirstTokenEndsWithAnErrorEvent) {
  MockLlm a;
  Start(Provider("a", a.url()), "  r: {targets: [{provider: a}]}\n");
  for (const char* fault : {"#mock reset_after=2", "#mock truncate"}) {
    auto s = StreamCall(server_->url(), StreamBody("r", std::string("long answer please\n") + fault));
    ASSERT_TRUE(s.transport_ok) << fault;
    ASSERT_EQ(s.status, 200) << s.raw;
    ASSERT_GE(s.data.size(), 2u) << s.raw;
    EXPECT_NE(s.data.back(), "[DONE]") << fault;
    auto last = json::parse(s.data.back());
    ASSERT_TRUE(last.as_object().contains("error")) << s.raw;
    EXPECT_NE(std::string(last.at("error").at("message").as_string()).find("after its first token"), std::string::npos);
  }
}

TEST_F(GatewayTest, AStreamWithNoFirstByteInTimeFailsOver) {
  MockLlm slow;
  Start("  slow: {type: openai, base_url: " + slow.url() + "/v1, timeout: {connect: 1s, first_byte: 300ms, total: 10s}}\n" +
            "  local: {type: mock}\n",
        "  r: {targets: [{provider: slow}, {provider: local}]}\n");
  auto s = StreamCall(server_->url(), StreamBody("r", "#mock first_byte=5000"));
  ASSERT_EQ(s.status, 200) << s.raw;
  EXPECT_EQ(s.data.back(), "[DONE]");
  // The first-byte timeout fired (the total, 10s, would have let the 5s answer through).
  auto m = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(m.find("keel_llm_requests_total{outcome=\"timeout\",provider=\"slow\",route=\"r\"} 1"), std::string::npos) << m;
}

// An OpenAI-format upstream that answers what the test sets: `answer` (a chat.completion)
// to whole requests, `chunks` (as server-sent events, then [DONE]) to streamed ones, or
// `raw` as it is when set. Records the bodies it was sent.
class FakeUpstream {
 public:
  FakeUpstream() {
    auto s = net::HttpServer::Create(net::ServerOptions{}, [this](net::HttpRequest&& req, net::Responder respond) {
      net::HttpResponse r;
      std::lock_guard lock(mu_);
      bodies_.push_back(req.body);
      const bool stream = req.body.find("\"stream\":true") != std::string::npos;
      if (!raw_.empty()) {
        r.body = raw_;
      } else if (stream) {
        r.content_type = "text/event-stream";
        for (const auto& c : chunks_) r.body += "data: " + json::serialize(c) + "\n\n";
        r.body += "data: [DONE]\n\n";
      } else {
        r.body = json::serialize(answer_);
      }
      respond(std::move(r));
    });
    EXPECT_TRUE(s.ok());
    if (s.ok()) server_ = std::move(s).value();
  }
  ~FakeUpstream() {
    if (server_) server_->Stop();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(server_ ? server_->port() : 0); }
  void Answer(json::object a) {
    std::lock_guard lock(mu_);
    answer_ = std::move(a);
  }
  void Chunks(std::vector<json::object> c) {
    std::lock_guard lock(mu_);
    chunks_ = std::move(c);
  }
  void Raw(std::string raw) {
    std::lock_guard lock(mu_);
    raw_ = std::move(raw);
  }
  std::size_t Calls() {
    std::lock_guard lock(mu_);
    return bodies_.size();
  }

 private:
  std::mutex mu_;
  json::object answer_;             // GUARDED_BY(mu_)
  std::vector<json::object> chunks_;  // GUARDED_BY(mu_)
  std::string raw_;                 // GUARDED_BY(mu_)
  std::vector<std::string> bodies_;  // GUARDED_BY(mu_)
  std::unique_ptr<net::HttpServer> server_;
};

// What OpenAI answers to a request with tools, n: 2 and logprobs: content null with
// parallel tool calls, a refusal, content parts, usage details.
json::object RichCompletion() {
  return json::parse(R"({
    "id": "chatcmpl-rich", "object": "chat.completion", "created": 1700000000, "model": "up-model-2024",
    "system_fingerprint": "fp_1",
    "choices": [
      {"index": 0, "finish_reason": "tool_calls", "logprobs": null,
       "message": {"role": "assistant", "content": null, "refusal": null, "annotations": [],
                   "tool_calls": [
                     {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                     {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"CET\"}"}}]}},
      {"index": 1, "finish_reason": "stop",
       "logprobs": {"content": [{"token": "No", "logprob": -0.25, "bytes": [78, 111], "top_logprobs": []}], "refusal": null},
       "message": {"role": "assistant", "refusal": "I can't help with that.",
                   "content": [{"type": "text", "text": "No"}, {"type": "text", "text": "pe."}]}}],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99,
              "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 5, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
  })").as_object();
}

TEST_F(GatewayTest, AToolCallAnswerAndEveryOtherFieldPassThroughUnchanged) {
  FakeUpstream up;
  up.Answer(RichCompletion());
  Start(Provider("up", up.url()), "  r: {targets: [{provider: up}]}\n");
  json::value body = Chat("r", "weather and time in Paris?");
  body.as_object()["n"] = 2;
  body.as_object()["logprobs"] = true;
  body.as_object()["tools"] = json::array{json::object{
      {"type", "function"}, {"function", json::object{{"name", "get_weather"}, {"parameters", json::object{}}}}}};
  auto r = HttpPostJson(server_->url() + "/v1/chat/completions", body);
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body, json::value(RichCompletion()));
  EXPECT_EQ(r.Header("x-keel-attempts"), "1");
  EXPECT_EQ(up.Calls(), 1u);
  // Cost and limits come from the usage that came with it.
  const auto m = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(m.find("keel_llm_tokens_total{direction=\"input\",provider=\"up\"} 82"), std::string::npos) << m;
}

TEST_F(GatewayTest, StreamedToolCallDeltasAreRelayedChunkByChunk) {
  FakeUpstream up;
  auto chunk = [](json::object delta, json::value finish, int index = 0) {
    return json::object{{"id", "chatcmpl-s"}, {"object", "chat.completion.chunk"}, {"created", 1700000000},
                        {"model", "up-model-2024"},
                        {"choices", json::array{json::object{{"index", index}, {"delta", std::move(delta)},
                                                             {"logprobs", nullptr}, {"finish_reason", finish}}}}};
  };
  auto call_delta = [](int index, json::object fn, const char* id = nullptr) {
    json::object c{{"index", index}, {"function", std::move(fn)}};
    if (id != nullptr) {
      c["id"] = id;
      c["type"] = "function";
    }
    return json::object{{"tool_calls", json::array{c}}};
  };
  std::vector<json::object> chunks{
      chunk(json::object{{"role", "assistant"}, {"content", nullptr}, {"refusal", nullptr}}, nullptr),
      chunk(call_delta(0, json::object{{"name", "get_weather"}, {"arguments", ""}}, "call_a"), nullptr),
      chunk(call_delta(0, json::object{{"arguments", "{\"city\":"}}), nullptr),
      chunk(call_delta(0, json::object{{"arguments", "\"Paris\"}"}}), nullptr),
      chunk(call_delta(1, json::object{{"name", "get_time"}, {"arguments", "{}"}}, "call_b"), nullptr),
      chunk(json::object{}, "tool_calls"),
  };
  json::object usage = chunk(json::object{}, nullptr);
  usage["choices"] = json::array{};
  usage["usage"] = RichCompletion().at("usage");
  chunks.push_back(usage);
  up.Chunks(chunks);
  Start(Provider("up", up.url()), "  r: {targets: [{provider: up}]}\n");
  auto s = StreamCall(server_->url(), StreamBody("r", "weather?", /*include_usage=*/true));
  ASSERT_TRUE(s.transport_ok);
  ASSERT_EQ(s.status, 200) << s.raw;
  ASSERT_EQ(s.data.size(), chunks.size() + 1) << s.raw;
  for (std::size_t i = 0; i < chunks.size(); ++i) EXPECT_EQ(json::parse(s.data[i]), json::value(chunks[i])) << i;
  EXPECT_EQ(s.data.back(), "[DONE]");
  EXPECT_EQ(up.Calls(), 1u);
}

// A 200 that keel cannot read is the request's problem: retried and failed over within
// the call's bounds, but never held against the target's breaker.
TEST_F(GatewayTest, AnUnusableAnswerNeverOpensTheBreaker) {
  FakeUpstream up;
  up.Raw("<html>not a completion</html>");
  Start(Provider("up", up.url()),
        "  r:\n    targets: [{provider: up}]\n    retry: {max_attempts: 1}\n"
        "    circuit_breaker: {consecutive_failures: 2, min_requests: 2, failure_rate: 0.5, open_for: 1h}\n");
  for (int i = 0; i < 5; ++i) {
    auto r = Call("r", "x" + std::to_string(i));
    ASSERT_EQ(r.status, 502) << r.raw;
    EXPECT_EQ(r.body.at("error").at("type").as_string(), "invalid_output");
  }
  EXPECT_EQ(up.Calls(), 5u) << "no call was refused by an open circuit";
  const auto m = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(m.find("keel_gateway_circuit_state{provider=\"up\",route=\"r\"} 0"), std::string::npos) << m;
  up.Raw("");
  up.Answer(RichCompletion());
  EXPECT_EQ(Call("r", "now fine").status, 200);
}

TEST_F(GatewayTest, XKeelRouteNamesRoutesOnly) {
  MockLlm a, b;
  Start(Provider("a", a.url()) + Provider("b", b.url()), "  r: {targets: [{provider: a}]}\n");
  const std::string embeddings = server_->url() + "/v1/embeddings";
  // A route: called instead of `model`.
  auto ok = Call("nope", "x", {{"X-Keel-Route", "r"}});
  ASSERT_EQ(ok.status, 200) << ok.raw;
  EXPECT_EQ(ok.Header("x-keel-provider"), "a");
  // A provider that is not a route: refused, and named so.
  auto provider = Call("r", "y", {{"X-Keel-Route", "b"}});
  EXPECT_EQ(provider.status, 404) << provider.raw;
  EXPECT_EQ(provider.body.at("error").at("param").as_string(), "X-Keel-Route");
  EXPECT_NE(std::string(provider.body.at("error").at("message").as_string()).find("is a provider"), std::string::npos)
      << provider.raw;
  auto unknown = Call("r", "z", {{"X-Keel-Route", "zzz"}});
  EXPECT_EQ(unknown.status, 404) << unknown.raw;
  EXPECT_EQ(HttpPostJson(embeddings, json::object{{"model", "r"}, {"input", "e"}}, {{"X-Keel-Route", "b"}}).status, 404);
  EXPECT_EQ(HttpPostJson(embeddings, json::object{{"model", "x"}, {"input", "e"}}, {{"X-Keel-Route", "r"}}).status, 200);
  auto streamed = HttpPostJson(server_->url() + "/v1/chat/completions", StreamBody("r", "s"), {{"X-Keel-Route", "b"}});
  EXPECT_EQ(streamed.status, 404) << streamed.raw;
  EXPECT_EQ(MockTotal(b.url()), 0);
}

}  // namespace
}  // namespace keel::testing
