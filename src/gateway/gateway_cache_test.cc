// The gateway's response cache without Redis, on a manual clock, with the in-process mock
// provider (its `#mock` directives script failures).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <optional>

#include "keel/core/config.h"
#include "keel/gateway/gateway.h"
#include "keel/obs/metrics.h"
#include "keel/testing/assert.h"

namespace keel::gateway {
namespace {

using std::chrono::milliseconds;

class GatewayCacheTest : public ::testing::Test {
 protected:
  // Two mock providers ("mock", "other") and the routes of `routes_yaml`.
  void Start(const std::string& routes_yaml, const std::string& providers_extra = "") {
    auto config = ParseConfig("providers:\n  mock: {type: mock" + providers_extra +
                                  "}\n  other: {type: mock}\nroutes:\n" + routes_yaml,
                              [](const std::string&) { return std::nullopt; });
    ASSERT_OK(config);
    auto g = Gateway::Create(*config, registry_, clock_, random_);
    ASSERT_OK(g);
    gateway_ = std::move(g).value();
  }

  static ChatRequest Request(const std::string& route, const std::string& content,
                             CacheMode mode = CacheMode::kDefault) {
    ChatRequest req;
    req.route = route;
    req.body = json::object{
        {"messages", json::array{json::object{{"role", "user"}, {"content", content}}}}};
    req.cache = mode;
    return req;
  }

  // A value of the registry, by its series as rendered ("name{label=\"v\",...}"); -1 when absent.
  double Metric(const std::string& series) {
    const std::string text = obs::RenderPrometheus(registry_);
    const auto at = text.find("\n" + series + " ");  // a sample line, not the HELP line
    if (at == std::string::npos) return -1;
    return std::stod(text.substr(at + series.size() + 2));
  }
  double Calls(const std::string& route, const std::string& provider,
               const std::string& outcome = "ok") {
    const double v = Metric("keel_llm_requests_total{outcome=\"" + outcome + "\",provider=\"" +
                            provider + "\",route=\"" + route + "\"}");
    return v < 0 ? 0 : v;
  }
  double CacheResults(const std::string& route, const std::string& result) {
    const double v =
        Metric("keel_gateway_cache_total{result=\"" + result + "\",route=\"" + route + "\"}");
    return v < 0 ? 0 : v;
  }

  ManualClock clock_;
  SeededRandom random_{7};
  prometheus::Registry registry_;
  std::unique_ptr<Gateway> gateway_;
};

TEST_F(GatewayCacheTest, ASecondIdenticalCallIsAHitThatCallsNoProvider) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 1h}}\n");
  auto first = gateway_->Chat(Request("r", "hello"));
  ASSERT_OK(first);
  EXPECT_EQ(first->cache, CacheStatus::kMiss);
  EXPECT_EQ(first->attempts, 1);
  clock_.Advance(milliseconds(1500));
  auto second = gateway_->Chat(Request("r", "hello"));
  ASSERT_OK(second);
  EXPECT_EQ(second->cache, CacheStatus::kHit);
  EXPECT_EQ(second->attempts, 0);
  EXPECT_EQ(second->cache_age, milliseconds(1500));
  EXPECT_EQ(second->cost, 0);
  EXPECT_EQ(second->provider, "mock");
  EXPECT_EQ(second->text, first->text);
  EXPECT_EQ(second->response, first->response);  // the same answer, id included
  EXPECT_EQ(second->usage, first->usage);
  EXPECT_EQ(Calls("r", "mock"), 1);
  EXPECT_EQ(CacheResults("r", "miss"), 1);
  EXPECT_EQ(CacheResults("r", "hit"), 1);
  EXPECT_EQ(Metric("keel_gateway_requests_total{outcome=\"ok\",route=\"r\"}"), 2);
  // Another prompt is another entry.
  ASSERT_EQ(gateway_->Chat(Request("r", "hello again"))->cache, CacheStatus::kMiss);
  EXPECT_EQ(Calls("r", "mock"), 2);
}

TEST_F(GatewayCacheTest, RoutesWithoutACacheAndOtherRoutesAreUntouched) {
  Start(
      "  plain: {targets: [{provider: mock}]}\n  a: {targets: [{provider: mock}], cache: {ttl: "
      "1h}}\n"
      "  b: {targets: [{provider: mock}], cache: {ttl: 1h}}\n");
  for (int i = 0; i < 2; ++i) {
    auto r = gateway_->Chat(Request("plain", "x"));
    ASSERT_OK(r);
    EXPECT_EQ(r->cache, CacheStatus::kNone);
  }
  EXPECT_EQ(Calls("plain", "mock"), 2);
  EXPECT_EQ(Metric("keel_gateway_cache_total{result=\"miss\",route=\"plain\"}"), -1);
  ASSERT_EQ(gateway_->Chat(Request("a", "x"))->cache, CacheStatus::kMiss);
  ASSERT_EQ(gateway_->Chat(Request("b", "x"))->cache, CacheStatus::kMiss);  // keyed by route too
  ASSERT_EQ(gateway_->Chat(Request("a", "x"))->cache, CacheStatus::kHit);
  // A provider's name is a route of its own, without a cache.
  ASSERT_EQ(gateway_->Chat(Request("mock", "x"))->cache, CacheStatus::kNone);
}

TEST_F(GatewayCacheTest, AnEntryExpiresAfterItsTtl) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 10s}}\n");
  ASSERT_EQ(gateway_->Chat(Request("r", "q"))->cache, CacheStatus::kMiss);
  clock_.Advance(milliseconds(9999));
  ASSERT_EQ(gateway_->Chat(Request("r", "q"))->cache, CacheStatus::kHit);
  clock_.Advance(milliseconds(1));
  auto expired = gateway_->Chat(Request("r", "q"));
  ASSERT_OK(expired);
  EXPECT_EQ(expired->cache, CacheStatus::kMiss);
  EXPECT_EQ(Calls("r", "mock"), 2);
  // The new answer is stored from now on.
  clock_.Advance(milliseconds(5000));
  ASSERT_EQ(gateway_->Chat(Request("r", "q"))->cache, CacheStatus::kHit);
}

TEST_F(GatewayCacheTest, StaleIfErrorServesAnExpiredAnswerWhenEveryAttemptFailsOver) {
  Start(
      "  r: {targets: [{provider: mock}], cache: {ttl: 10s, stale_if_error: 1m}, retry: "
      "{max_attempts: 2, "
      "initial_backoff: 1ms, max_backoff: 1ms}}\n");
  // The mock answers this prompt once, then fails it with 503.
  const std::string prompt = "breaks later\n#mock fail=503 after=1";
  auto first = gateway_->Chat(Request("r", prompt));
  ASSERT_OK(first);
  clock_.Advance(milliseconds(10'000));  // past ttl: a fresh answer is wanted
  auto stale = gateway_->Chat(Request("r", prompt));
  ASSERT_OK(stale);
  EXPECT_EQ(stale->cache, CacheStatus::kStale);
  EXPECT_EQ(stale->attempts, 2);  // both failed
  EXPECT_EQ(stale->cache_age, milliseconds(10'000));
  EXPECT_EQ(stale->response, first->response);
  EXPECT_EQ(Calls("r", "mock", "overloaded"), 2);
  EXPECT_EQ(CacheResults("r", "stale"), 1);
  EXPECT_EQ(Metric("keel_gateway_requests_total{outcome=\"ok\",route=\"r\"}"), 2);
  // Past ttl + stale_if_error the failure is the answer.
  clock_.Advance(milliseconds(60'000));
  auto failed = gateway_->Chat(Request("r", prompt));
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, ErrorCode::kOverloaded);
  EXPECT_EQ(CacheResults("r", "miss"), 2);  // the first call and this one
}

TEST_F(GatewayCacheTest, StaleIsNotServedForAnErrorThatDoesNotFailOver) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 1s, stale_if_error: 1h}}\n");
  const std::string prompt = "then refused\n#mock fail=401 after=1";
  ASSERT_OK(gateway_->Chat(Request("r", prompt)));
  clock_.Advance(milliseconds(2000));
  auto r = gateway_->Chat(Request("r", prompt));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kAuth);
}

TEST_F(GatewayCacheTest, StaleIsServedWhenEveryTargetIsAtItsRateLimit) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 1s, stale_if_error: 1h}}\n",
        ", limits: {rpm: 1}");
  ASSERT_OK(gateway_->Chat(Request("r", "limited")));
  clock_.Advance(milliseconds(2000));  // 2/60 of a request refilled: still limited
  auto r = gateway_->Chat(Request("r", "limited"));
  ASSERT_OK(r);
  EXPECT_EQ(r->cache, CacheStatus::kStale);
  EXPECT_EQ(r->attempts, 0);
  // Without an entry, the same call is a 429.
  auto other = gateway_->Chat(Request("r", "not cached"));
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.error().code, ErrorCode::kRateLimited);
}

TEST_F(GatewayCacheTest, NoCacheDoesNotReadButStoresAndNoStoreDoesNeither) {
  Start(
      "  r: {targets: [{provider: mock}], cache: {ttl: 1h, stale_if_error: 1h}, retry: "
      "{initial_backoff: 1ms, "
      "max_backoff: 1ms}}\n");
  // no-store: a provider answers and nothing is kept.
  auto bypass = gateway_->Chat(Request("r", "q", CacheMode::kNoStore));
  ASSERT_OK(bypass);
  EXPECT_EQ(bypass->cache, CacheStatus::kBypass);
  ASSERT_EQ(gateway_->Chat(Request("r", "q"))->cache, CacheStatus::kMiss);
  EXPECT_EQ(Calls("r", "mock"), 2);
  // Now cached; no-store does not read it either.
  ASSERT_EQ(gateway_->Chat(Request("r", "q", CacheMode::kNoStore))->cache, CacheStatus::kBypass);
  EXPECT_EQ(Calls("r", "mock"), 3);
  // no-cache: a provider answers although an entry is there, and its answer is stored.
  ASSERT_EQ(gateway_->Chat(Request("r", "q", CacheMode::kNoCache))->cache, CacheStatus::kMiss);
  EXPECT_EQ(Calls("r", "mock"), 4);
  auto hit = gateway_->Chat(Request("r", "q"));
  ASSERT_OK(hit);
  EXPECT_EQ(hit->cache, CacheStatus::kHit);
  EXPECT_EQ(Calls("r", "mock"), 4);
  // A no-cache call whose attempts fail gets the failure, not the stored answer.
  const std::string breaking = "b\n#mock fail=503 after=1";
  ASSERT_OK(gateway_->Chat(Request("r", breaking)));
  EXPECT_FALSE(gateway_->Chat(Request("r", breaking, CacheMode::kNoCache)).ok());
  EXPECT_EQ(CacheResults("r", "bypass"), 2);
}

TEST_F(GatewayCacheTest, StreamsBypassTheCache) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 1h}}\n");
  ASSERT_EQ(gateway_->Chat(Request("r", "s"))->cache, CacheStatus::kMiss);
  int chunks = 0;
  auto streamed =
      gateway_->ChatStream(Request("r", "s"), [&](const json::object&) { return ++chunks > 0; });
  ASSERT_OK(streamed);
  EXPECT_GT(chunks, 0);
  EXPECT_EQ(streamed->cache, CacheStatus::kBypass);
  EXPECT_EQ(Calls("r", "mock"), 2);
  EXPECT_EQ(CacheResults("r", "bypass"), 1);
}

TEST_F(GatewayCacheTest, EmbeddingsAreCachedApartFromChats) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 1h}}\n");
  ChatRequest req;
  req.route = "r";
  req.body = json::object{{"input", json::array{"alpha", "beta"}}};
  auto first = gateway_->Embeddings(req);
  ASSERT_OK(first);
  EXPECT_EQ(first->cache, CacheStatus::kMiss);
  auto second = gateway_->Embeddings(req);
  ASSERT_OK(second);
  EXPECT_EQ(second->cache, CacheStatus::kHit);
  EXPECT_EQ(second->response, first->response);
  EXPECT_EQ(Calls("r", "mock"), 1);
}

TEST_F(GatewayCacheTest, TheAsynchronousPathReadsAndStoresTheSameCache) {
  Start("  r: {targets: [{provider: mock}], cache: {ttl: 1h}}\n");
  boost::asio::io_context io;
  std::vector<CacheStatus> seen;
  auto call = [&] {
    std::optional<Result<ChatResult>> out;
    auto working =
        boost::asio::make_work_guard(io);  // the blocking mock runs on the gateway's pool meanwhile
    gateway_->ChatAsync(Request("r", "async"), io.get_executor(), [&](Result<ChatResult> r) {
      out = std::move(r);
      working.reset();
    });
    io.restart();
    io.run();
    ASSERT_TRUE(out.has_value());
    ASSERT_OK(*out);
    seen.push_back((*out)->cache);
  };
  call();
  call();
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0], CacheStatus::kMiss);
  EXPECT_EQ(seen[1], CacheStatus::kHit);
  ASSERT_EQ(gateway_->Chat(Request("r", "async"))->cache, CacheStatus::kHit);
}

}  // namespace
}  // namespace keel::gateway
