// The response cache and the shared Redis against real keel serve and keel mock-llm
// processes on loopback: hits that call no provider (the mock's per-prompt counts prove
// it), ttl expiry, stale answers when the upstream fails, Cache-Control, streams, two
// nodes sharing limits and answers through one Redis, and Redis failing under them.

#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "helpers.h"
#include "keel/testing/services.h"

namespace keel::testing {
namespace {

// The value of a metric's sample line in a /metrics text; -1 when absent.
double MetricValue(const std::string& text, const std::string& series) {
  const auto at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

std::string Provider(const std::string& url, const std::string& extra = "") {
  return "  llm: {type: openai, base_url: " + url +
         "/v1, model: mock-1, timeout: {connect: 1s, total: 5s}" + extra + "}\n";
}

class CacheTest : public ::testing::Test {
 protected:
  // A keel node in its own directory, over the providers and routes given.
  std::unique_ptr<KeelServer> StartNode(const std::string& providers, const std::string& routes,
                                        const std::string& top = "") {
    dirs_.push_back(std::make_unique<TempDir>());
    auto node = std::make_unique<KeelServer>(
        dirs_.back()->path(), "storage: sqlite://data/keel.db\n" + top + "providers:\n" +
                                  providers + "routes:\n" + routes);
    EXPECT_NE(node->port(), 0) << "keel serve did not start";
    return node;
  }
  JsonResponse Call(const KeelServer& node, const std::string& content, net::Headers h = {}) {
    return HttpPostJson(node.url() + "/v1/chat/completions", Chat("r", content), std::move(h));
  }
  std::string Metrics(const KeelServer& node) { return HttpGet(node.url() + "/metrics").raw; }
  // A key prefix of this test's own on the shared Redis.
  static std::string Prefix() {
    return "it:" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
           ":" + std::to_string(getpid()) + "-" +
           std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + ":";
  }
  static std::string Redis(const std::string& url, const std::string& prefix,
                           const std::string& extra = "") {
    return "redis: {url: \"" + url + "\", key_prefix: \"" + prefix +
           "\", timeout: 200ms, retry_interval: 1s" + extra + "}\n";
  }

  std::vector<std::unique_ptr<TempDir>> dirs_;
};

TEST_F(CacheTest, ASecondIdenticalCallIsAHitThatNoProviderSees) {
  MockLlm mock;
  auto node =
      StartNode(Provider(mock.url()), "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n");
  auto first = Call(*node, "what is a cache?");
  ASSERT_EQ(first.status, 200) << first.raw;
  EXPECT_EQ(first.Header("x-keel-cache"), "miss");
  EXPECT_TRUE(first.Header("age").empty());
  auto second = Call(*node, "what is a cache?");
  ASSERT_EQ(second.status, 200) << second.raw;
  EXPECT_EQ(second.Header("x-keel-cache"), "hit");
  EXPECT_EQ(second.Header("x-keel-attempts"), "0");
  EXPECT_EQ(second.Header("x-keel-provider"), "llm");
  EXPECT_EQ(second.Header("age"), "0");
  EXPECT_EQ(second.body.at("id"), first.body.at("id"));  // the stored answer, not a new one
  EXPECT_EQ(second.body.at("model").as_string(), "mock-1");
  EXPECT_EQ(MockCount(mock.url(), "what is a cache?"), 1);
  // Key order, `user` and `stream: false` do not make another request.
  json::value reordered =
      json::parse(R"({"messages": [{"content": "what is a cache?", "role": "user"}],
                                          "user": "someone", "stream": false, "model": "r"})");
  auto third = HttpPostJson(node->url() + "/v1/chat/completions", reordered);
  EXPECT_EQ(third.Header("x-keel-cache"), "hit");
  EXPECT_EQ(MockCount(mock.url(), "what is a cache?"), 1);
  const auto m = Metrics(*node);
  EXPECT_EQ(MetricValue(m, "keel_gateway_cache_total{result=\"hit\",route=\"r\"}"), 2) << m;
  EXPECT_EQ(MetricValue(m, "keel_gateway_cache_total{result=\"miss\",route=\"r\"}"), 1);
}

TEST_F(CacheTest, AnAnswerExpiresAfterItsTtl) {
  MockLlm mock;
  auto node =
      StartNode(Provider(mock.url()), "  r: {targets: [{provider: llm}], cache: {ttl: 300ms}}\n");
  ASSERT_EQ(Call(*node, "short-lived").Header("x-keel-cache"), "miss");
  // Hits until the ttl passes (by the server's clock), then a provider is called again.
  ASSERT_TRUE(
      Eventually([&] { return Call(*node, "short-lived").Header("x-keel-cache") == "miss"; },
                 std::chrono::seconds(10)));
  EXPECT_EQ(MockCount(mock.url(), "short-lived"), 2);
}

TEST_F(CacheTest, StaleIfErrorServesTheExpiredAnswerWhenTheUpstreamFails) {
  MockLlm mock;
  auto node = StartNode(
      Provider(mock.url()),
      "  r:\n    targets: [{provider: llm}]\n    cache: {ttl: 200ms, stale_if_error: 1h}\n"
      "    retry: {max_attempts: 2, initial_backoff: 1ms, max_backoff: 2ms}\n");
  // The mock answers this prompt once, then answers 503 to it.
  const std::string prompt = "ask once\n#mock fail=503 after=1";
  auto first = Call(*node, prompt);
  ASSERT_EQ(first.status, 200) << first.raw;
  JsonResponse stale;
  ASSERT_TRUE(Eventually(
      [&] {
        stale = Call(*node, prompt);
        return stale.Header("x-keel-cache") != "hit";
      },
      std::chrono::seconds(10)));
  ASSERT_EQ(stale.status, 200) << stale.raw;
  EXPECT_EQ(stale.Header("x-keel-cache"), "stale");
  EXPECT_EQ(stale.Header("x-keel-attempts"), "2");
  EXPECT_EQ(stale.body.at("id"), first.body.at("id"));
  EXPECT_EQ(MockCount(mock.url(), prompt), 3);  // the answer, then two 503s
  // Without a stored answer the failure is the answer.
  auto uncached = Call(*node, "never answered\n#mock fail=503");
  EXPECT_EQ(uncached.status, 503) << uncached.raw;
  const auto m = Metrics(*node);
  EXPECT_EQ(MetricValue(m, "keel_gateway_cache_total{result=\"stale\",route=\"r\"}"), 1) << m;
  // A stale answer is an answer: the call counts as ok (the first, the hits, the stale one).
  EXPECT_EQ(MetricValue(m, "keel_gateway_requests_total{outcome=\"ok\",route=\"r\"}"),
            MetricValue(m, "keel_gateway_cache_total{result=\"hit\",route=\"r\"}") + 2);
}

TEST_F(CacheTest, CacheControlNoCacheAndNoStore) {
  MockLlm mock;
  auto node =
      StartNode(Provider(mock.url()), "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n");
  // no-store: neither read nor stored.
  auto bypass = Call(*node, "q", {{"Cache-Control", "no-store"}});
  ASSERT_EQ(bypass.status, 200);
  EXPECT_EQ(bypass.Header("x-keel-cache"), "bypass");
  EXPECT_EQ(Call(*node, "q").Header("x-keel-cache"), "miss");
  EXPECT_EQ(Call(*node, "q", {{"Cache-Control", "max-age=0, No-Store"}}).Header("x-keel-cache"),
            "bypass");
  EXPECT_EQ(MockCount(mock.url(), "q"), 3);
  // no-cache: a provider answers although the answer is stored, and the new one is kept.
  auto fresh = Call(*node, "q", {{"Cache-Control", "no-cache"}});
  EXPECT_EQ(fresh.Header("x-keel-cache"), "miss");
  EXPECT_EQ(MockCount(mock.url(), "q"), 4);
  auto hit = Call(*node, "q");
  EXPECT_EQ(hit.Header("x-keel-cache"), "hit");
  EXPECT_EQ(hit.body.at("id"), fresh.body.at("id"));
  EXPECT_EQ(MockCount(mock.url(), "q"), 4);
}

TEST_F(CacheTest, StreamsBypassTheCacheAndEmbeddingsUseIt) {
  MockLlm mock;
  auto node =
      StartNode(Provider(mock.url()), "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n");
  for (int i = 0; i < 2; ++i) {
    auto s = StreamCall(node->url(), StreamBody("r", "streamed"));
    ASSERT_EQ(s.status, 200) << s.raw;
    EXPECT_EQ(s.data.back(), "[DONE]");
  }
  EXPECT_EQ(MockCount(mock.url(), "streamed"), 2);
  EXPECT_EQ(Call(*node, "streamed").Header("x-keel-cache"), "miss");  // streams stored nothing
  EXPECT_EQ(MockCount(mock.url(), "streamed"), 3);
  EXPECT_EQ(MetricValue(Metrics(*node), "keel_gateway_cache_total{result=\"bypass\",route=\"r\"}"),
            2);

  const std::string url = node->url() + "/v1/embeddings";
  const json::value body = json::object{{"model", "r"}, {"input", json::array{"alpha", "beta"}}};
  auto first = HttpPostJson(url, body);
  ASSERT_EQ(first.status, 200) << first.raw;
  EXPECT_EQ(first.Header("x-keel-cache"), "miss");
  const int64_t calls = MockTotal(mock.url());
  auto second = HttpPostJson(url, body);
  ASSERT_EQ(second.status, 200) << second.raw;
  EXPECT_EQ(second.Header("x-keel-cache"), "hit");
  EXPECT_EQ(second.body.at("data"), first.body.at("data"));
  EXPECT_EQ(MockTotal(mock.url()), calls);
}

TEST_F(CacheTest, PipelineLlmStepsRecordTheCacheResult) {
  MockLlm mock;
  auto node =
      StartNode(Provider(mock.url()), "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n",
                "engine: {workers: 2, poll_interval: 50ms}\n"
                "pipelines:\n  ask:\n    steps:\n"
                "      - id: answer\n        llm: {route: r, messages: [{role: user, content: "
                "\"{{input.q}}\"}]}\n");
  std::vector<std::string> seen;
  for (int i = 0; i < 2; ++i) {
    auto submitted = HttpPostJson(
        node->url() + "/v1/runs",
        json::object{{"pipeline", "ask"}, {"input", json::object{{"q", "cached step"}}}});
    ASSERT_EQ(submitted.status, 201) << submitted.raw;
    auto run = WaitForTerminal(node->url(), std::string(submitted.body.at("id").as_string()));
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
    seen.push_back(std::string(run.at("steps").as_array()[0].at("cache").as_string()));
  }
  EXPECT_EQ(seen, (std::vector<std::string>{"miss", "hit"}));
  EXPECT_EQ(MockCount(mock.url(), "cached step"), 1);
}

// ---- Redis shared by nodes -------------------------------------------------------------

TEST_F(CacheTest, TwoNodesOnOneRedisShareAnRpmLimit) {
  MockLlm mock;
  const std::string top = Redis(SharedRedisUrl(), Prefix());
  auto a = StartNode(Provider(mock.url(), ", limits: {rpm: 4}"),
                     "  r: {targets: [{provider: llm}]}\n", top);
  auto b = StartNode(Provider(mock.url(), ", limits: {rpm: 4}"),
                     "  r: {targets: [{provider: llm}]}\n", top);
  int ok = 0;
  JsonResponse refused;
  for (int i = 0; i < 4; ++i) {
    for (KeelServer* node : {a.get(), b.get()}) {
      auto r = Call(*node, "call " + std::to_string(i) + (node == a.get() ? " on a" : " on b"));
      if (r.status == 200) {
        ++ok;
      } else {
        refused = r;
      }
    }
  }
  EXPECT_EQ(ok, 4);  // each node alone would have admitted 4
  EXPECT_EQ(MockTotal(mock.url()), 4);
  ASSERT_EQ(refused.status, 429) << refused.raw;
  EXPECT_EQ(refused.body.at("error").at("type").as_string(), "rate_limited");
  ASSERT_FALSE(refused.Header("retry-after").empty());
  const int retry_after = std::stoi(std::string(refused.Header("retry-after")));
  EXPECT_GE(retry_after, 1);
  EXPECT_LE(retry_after, 15);  // one request refills in 15 s
  for (KeelServer* node : {a.get(), b.get()}) {
    const auto m = Metrics(*node);
    EXPECT_EQ(MetricValue(m, "keel_redis_up"), 1) << m;
    EXPECT_EQ(MetricValue(m, "keel_redis_fallbacks_total{op=\"rate_take\"}"), 0);
  }
}

TEST_F(CacheTest, AnAnswerCachedByOneNodeIsAHitOnTheOther) {
  MockLlm mock;
  const std::string top = Redis(SharedRedisUrl(), Prefix());
  const std::string routes = "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n";
  auto a = StartNode(Provider(mock.url()), routes, top);
  auto b = StartNode(Provider(mock.url()), routes, top);
  auto first = Call(*a, "asked on a");
  ASSERT_EQ(first.status, 200) << first.raw;
  EXPECT_EQ(first.Header("x-keel-cache"), "miss");
  auto second = Call(*b, "asked on a");
  ASSERT_EQ(second.status, 200) << second.raw;
  EXPECT_EQ(second.Header("x-keel-cache"), "hit");
  EXPECT_EQ(second.body.at("id"), first.body.at("id"));
  EXPECT_EQ(MockCount(mock.url(), "asked on a"), 1);
}

TEST_F(CacheTest, RedisStoppedMidTestDegradesToLocalLimitsAndCache) {
  MockLlm mock;
  TempDir redis_dir;
  RedisServer redis(redis_dir.path() + "/redis");
  auto node = StartNode(Provider(mock.url(), ", limits: {rpm: 100}"),
                        "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n",
                        Redis(redis.url(), Prefix()));
  ASSERT_EQ(Call(*node, "before").status, 200);
  EXPECT_EQ(MetricValue(Metrics(*node), "keel_redis_up"), 1);
  redis.Stop();
  // Every request still succeeds: this node's cache answers what it stored, its own
  // buckets admit the rest.
  auto hit = Call(*node, "before");
  ASSERT_EQ(hit.status, 200) << hit.raw;
  EXPECT_EQ(hit.Header("x-keel-cache"), "hit");
  for (int i = 0; i < 5; ++i) {
    auto r = Call(*node, "during " + std::to_string(i));
    ASSERT_EQ(r.status, 200) << r.raw;
    EXPECT_EQ(r.Header("x-keel-cache"), "miss");
  }
  EXPECT_EQ(Call(*node, "during 0").Header("x-keel-cache"), "hit");
  const auto m = Metrics(*node);
  EXPECT_EQ(MetricValue(m, "keel_redis_up"), 0) << m;
  EXPECT_GE(MetricValue(m, "keel_redis_fallbacks_total{op=\"rate_take\"}"), 4);
  EXPECT_GE(MetricValue(m, "keel_redis_fallbacks_total{op=\"cache_get\"}"), 4);
  EXPECT_GE(MetricValue(m, "keel_redis_errors_total{op=\"cache_get\"}"), 1);
  // One warn line says so, with the reason.
  int warned = 0;
  for (const auto& line : node->process().Lines()) {
    if (line.find("\"redis unavailable") != std::string::npos) {
      ++warned;
      EXPECT_NE(line.find("\"level\":\"warning\""), std::string::npos) << line;
      EXPECT_NE(line.find("Connection refused"), std::string::npos) << line;
    }
  }
  EXPECT_EQ(warned, 1);
  // Back: after retry_interval a request finds Redis again, and says so once.
  redis.Start();
  int n = 0;  // new prompts: a call this node's cache answers asks Redis nothing
  ASSERT_TRUE(Eventually(
      [&] {
        EXPECT_EQ(Call(*node, "after " + std::to_string(n++)).status, 200);
        return MetricValue(Metrics(*node), "keel_redis_up") == 1;
      },
      std::chrono::seconds(10)));
  EXPECT_FALSE(node->process()
                   .WaitForLine([](const std::string& l) {
                     return l.find("redis available again") != std::string::npos;
                   })
                   .empty());
}

TEST_F(CacheTest, ARedisThatRefusesKeelIsADegradedModeNotAnOutage) {
  MockLlm mock;
  // The shared server has no password: AUTH with one is answered with an error.
  const std::string url = SharedRedisUrl().insert(8, ":wrong-password@");
  auto node =
      StartNode(Provider(mock.url(), ", limits: {rpm: 100}"),
                "  r: {targets: [{provider: llm}], cache: {ttl: 1h}}\n", Redis(url, Prefix()));
  // The start says so at once.
  const std::string warn = node->process().WaitForLine(
      [](const std::string& l) { return l.find("redis unavailable") != std::string::npos; });
  ASSERT_FALSE(warn.empty());
  EXPECT_NE(warn.find("AUTH"), std::string::npos) << warn;
  EXPECT_EQ(warn.find("wrong-password"), std::string::npos) << warn;
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Call(*node, "q " + std::to_string(i)).status, 200);
  EXPECT_EQ(Call(*node, "q 0").Header("x-keel-cache"), "hit");  // this node's cache
  const auto m = Metrics(*node);
  EXPECT_EQ(MetricValue(m, "keel_redis_up"), 0) << m;
  EXPECT_EQ(MetricValue(m, "keel_redis_errors_total{op=\"ping\"}"), 1);
  EXPECT_GE(MetricValue(m, "keel_redis_fallbacks_total{op=\"rate_take\"}"), 1);
}

TEST_F(CacheTest, AMalformedRedisUrlIsAConfigErrorWithItsLine) {
  TempDir dir;
  const std::string path = dir.path() + "/keel.yaml";
  {
    std::ofstream out(path);
    out << "storage: sqlite://data/keel.db\nredis:\n  url: \"redis://:secret@h:99999\"\n";
  }
  Process check({KEEL_BINARY, "config", "check", path});
  EXPECT_NE(check.Wait(), 0);
  std::string all;
  for (const auto& l : check.Lines()) all += l + "\n";
  EXPECT_NE(all.find("line 3"), std::string::npos) << all;
  EXPECT_NE(all.find("redis.url"), std::string::npos) << all;
  EXPECT_EQ(all.find("secret"), std::string::npos) << all;
}

}  // namespace
}  // namespace keel::testing
