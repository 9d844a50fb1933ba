// Gateways that share a Redis, as keel nodes do: rpm limits and the response cache are
// shared; a corrupt cached value is a miss; with Redis gone, each gateway decides with its
// own limits and cache and no call fails for it.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>

#include "keel/core/config.h"
#include "keel/gateway/gateway.h"
#include "keel/obs/metrics.h"
#include "keel/testing/assert.h"
#include "keel/testing/process.h"
#include "keel/testing/services.h"
#include "redis_client.h"
#include "response_cache.h"

namespace keel::gateway {
namespace {

using std::chrono::milliseconds;

// One keel node: a gateway with its own registry.
struct Node {
  prometheus::Registry registry;
  std::unique_ptr<Gateway> gateway;
  double Metric(const std::string& series) {
    const std::string text = obs::RenderPrometheus(registry);
    const auto at = text.find("\n" + series + " ");  // a sample line, not the HELP line
    if (at == std::string::npos) return -1;
    return std::stod(text.substr(at + series.size() + 2));
  }
  double ProviderCalls() {
    const double v =
        Metric("keel_llm_requests_total{outcome=\"ok\",provider=\"mock\",route=\"r\"}");
    return v < 0 ? 0 : v;
  }
};

class GatewayRedisTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::signal(SIGPIPE, SIG_IGN);
    prefix_ =
        "gwtest:" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
        ":" + std::to_string(getpid()) + "-" +
        std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + ":";
  }

  // A node whose provider "mock" (in-process) has `limits` and whose route "r" caches.
  std::unique_ptr<Node> StartNode(const std::string& redis_url,
                                  const std::string& limits = "{rpm: 3}") {
    const std::string yaml =
        "redis: {url: \"" + redis_url + "\", key_prefix: \"" + prefix_ +
        "\", timeout: 200ms, retry_interval: 1s}\n"
        "providers:\n  mock: {type: mock, limits: " +
        limits +
        "}\n"
        "routes:\n  r: {targets: [{provider: mock}], retry: {max_attempts: 1}, cache: {ttl: 1h}}\n";
    auto config = ParseConfig(yaml, [](const std::string&) { return std::nullopt; });
    EXPECT_TRUE(config.ok()) << config.error().message;
    auto node = std::make_unique<Node>();
    auto g = Gateway::Create(*config, node->registry, clock_, random_);
    EXPECT_TRUE(g.ok());
    node->gateway = std::move(g).value();
    return node;
  }

  static ChatRequest Request(const std::string& content) {
    ChatRequest req;
    req.route = "r";
    req.body = json::object{
        {"messages", json::array{json::object{{"role", "user"}, {"content", content}}}}};
    return req;
  }

  std::string prefix_;
  ManualClock clock_;
  SeededRandom random_{3};
};

TEST_F(GatewayRedisTest, TwoNodesShareOneRpmLimit) {
  auto a = StartNode(testing::SharedRedisUrl());
  auto b = StartNode(testing::SharedRedisUrl());
  int admitted = 0;
  std::optional<Error> refusal;
  for (int i = 0; i < 4; ++i) {
    for (Node* node : {a.get(), b.get()}) {
      auto r =
          node->gateway->Chat(Request("call " + std::to_string(i) + (node == a.get() ? "a" : "b")));
      if (r.ok()) {
        ++admitted;
      } else {
        refusal = r.error();
      }
    }
  }
  EXPECT_EQ(admitted, 3);
  ASSERT_TRUE(refusal.has_value());
  EXPECT_EQ(refusal->code, ErrorCode::kRateLimited);
  ASSERT_TRUE(refusal->retry_after.has_value());
  EXPECT_GT(refusal->retry_after->count(), 10'000);  // one request refills in 20 s
  EXPECT_LE(refusal->retry_after->count(), 20'000);
  EXPECT_EQ(a->ProviderCalls() + b->ProviderCalls(), 3);
  EXPECT_EQ(a->Metric("keel_redis_fallbacks_total{op=\"rate_take\"}"), 0);
}

TEST_F(GatewayRedisTest, AnAnswerCachedByOneNodeIsAHitOnAnother) {
  auto a = StartNode(testing::SharedRedisUrl(), "{rpm: 100}");
  auto b = StartNode(testing::SharedRedisUrl(), "{rpm: 100}");
  auto first = a->gateway->Chat(Request("shared question"));
  ASSERT_OK(first);
  EXPECT_EQ(first->cache, CacheStatus::kMiss);
  clock_.Advance(milliseconds(250));
  auto second = b->gateway->Chat(Request("shared question"));
  ASSERT_OK(second);
  EXPECT_EQ(second->cache, CacheStatus::kHit);
  EXPECT_EQ(second->response, first->response);
  EXPECT_EQ(second->cache_age, milliseconds(250));
  EXPECT_EQ(b->ProviderCalls(), 0);
  EXPECT_EQ(b->Metric("keel_gateway_cache_total{result=\"hit\",route=\"r\"}"), 1);
}

TEST_F(GatewayRedisTest, ACorruptCachedValueIsAMissAndIsReplaced) {
  auto a = StartNode(testing::SharedRedisUrl(), "{rpm: 100}");
  auto req = Request("corrupt me");
  RedisConfig rc;
  rc.address = *ParseRedisUrl(testing::SharedRedisUrl());
  prometheus::Registry registry;
  auto raw = detail::RedisClient::Create(rc, registry, clock_);
  const std::string key = prefix_ + "cache:" + detail::CacheKey("chat", "r", req.body);
  ASSERT_OK(raw->Command(detail::RedisOp::kCacheSet,
                         {"SET", key, "{\"v\": 1, \"stored_at_ms\": \"garbage", "PX", "60000"}));
  auto r = a->gateway->Chat(req);
  ASSERT_OK(r);
  EXPECT_EQ(r->cache, CacheStatus::kMiss);
  EXPECT_EQ(a->ProviderCalls(), 1);
  EXPECT_EQ(a->Metric("keel_gateway_cache_corrupt_total{route=\"r\"}"), 1);
  // The answer replaced it: another node hits.
  auto b = StartNode(testing::SharedRedisUrl(), "{rpm: 100}");
  auto hit = b->gateway->Chat(req);
  ASSERT_OK(hit);
  EXPECT_EQ(hit->cache, CacheStatus::kHit);
}

TEST_F(GatewayRedisTest, WithRedisGoneLocalLimitsAndCacheServeAndNothingFails) {
  testing::TempDir dir;
  testing::RedisServer server(dir.path() + "/redis");
  auto node = StartNode(server.url());
  ASSERT_OK(node->gateway->Chat(
      Request("before")));  // shared: Redis's bucket and this node's both charged
  EXPECT_EQ(node->Metric("keel_redis_up"), 1);
  server.Stop();
  // This node's cache answers what it stored...
  auto hit = node->gateway->Chat(Request("before"));
  ASSERT_OK(hit);
  EXPECT_EQ(hit->cache, CacheStatus::kHit);
  // ...and its own buckets decide: 2 of rpm 3 left.
  auto second = node->gateway->Chat(Request("during 1"));
  ASSERT_OK(second);
  EXPECT_EQ(second->cache, CacheStatus::kMiss);
  EXPECT_EQ(node->Metric("keel_redis_up"), 0);
  ASSERT_OK(node->gateway->Chat(Request("during 2")));
  auto limited = node->gateway->Chat(Request("during 3"));
  ASSERT_FALSE(limited.ok());
  EXPECT_EQ(limited.error().code, ErrorCode::kRateLimited);
  EXPECT_GE(node->Metric("keel_redis_fallbacks_total{op=\"rate_take\"}"), 3);
  EXPECT_GE(node->Metric("keel_redis_fallbacks_total{op=\"cache_get\"}"), 3);
  EXPECT_EQ(node->Metric("keel_redis_errors_total{op=\"cache_get\"}"),
            1);  // one failure, then degraded
  // Back after the retry interval: shared again.
  server.Start();
  clock_.Advance(milliseconds(1000));
  auto back = node->gateway->Chat(Request("after"));
  ASSERT_OK(back);  // the restarted Redis holds no bucket (a full one), while this node's is empty
  EXPECT_EQ(node->Metric("keel_redis_up"), 1);
}

}  // namespace
}  // namespace keel::gateway
