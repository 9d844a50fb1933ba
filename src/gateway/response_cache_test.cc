// The response cache's pure parts: keys, the Redis encoding, the LRU, and a route's cache
// without Redis, on a manual clock.

#include "response_cache.h"

#include <gtest/gtest.h>

#include "keel/testing/assert.h"

namespace keel::gateway::detail {
namespace {

using std::chrono::milliseconds;

json::object Body(std::string_view json_text) { return json::parse(json_text).as_object(); }

CacheEntry Entry(const std::string& text, Timestamp at) {
  auto a = std::make_shared<CachedAnswer>();
  a->response = json::object{
      {"id", "chatcmpl-1"},
      {"object", "chat.completion"},
      {"choices", json::array{json::object{{"message", json::object{{"content", text}}}}}}};
  a->text = text;
  a->model = "model-1";
  a->provider = "p";
  a->usage = json::object{{"prompt_tokens", 3}, {"completion_tokens", 5}, {"total_tokens", 8}};
  return CacheEntry{std::move(a), at};
}

const Timestamp kT0 = FromMillis(1'700'000'000'000);

TEST(CacheKeyTest, IsTheSameForTheSameRequestWhateverTheKeyOrder) {
  const auto a = Body(
      R"({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5})");
  const auto b = Body(
      R"({"max_tokens": 5, "temperature": 0, "messages": [{"content": "hi", "role": "user"}]})");
  EXPECT_EQ(CacheKey("chat", "r", a), CacheKey("chat", "r", b));
  EXPECT_EQ(CacheKey("chat", "r", a).size(), 64u);
  EXPECT_EQ(CacheKey("chat", "r", a).find_first_not_of("0123456789abcdef"), std::string::npos);
}

TEST(CacheKeyTest, IgnoresStreamUserAndModelOnly) {
  const auto base = Body(R"({"messages": [{"role": "user", "content": "hi"}]})");
  const auto extra = Body(R"({"messages": [{"role": "user", "content": "hi"}], "stream": false,
                              "stream_options": {"include_usage": true}, "user": "u-42", "model": "r"})");
  EXPECT_EQ(CacheKey("chat", "r", base), CacheKey("chat", "r", extra));
  const std::string key = CacheKey("chat", "r", base);
  EXPECT_NE(key, CacheKey("chat", "other", base));
  EXPECT_NE(key, CacheKey("embeddings", "r", base));
  EXPECT_NE(key,
            CacheKey("chat", "r", Body(R"({"messages": [{"role": "user", "content": "hi!"}]})")));
  EXPECT_NE(
      key,
      CacheKey("chat", "r",
               Body(R"({"messages": [{"role": "user", "content": "hi"}], "temperature": 1})")));
  EXPECT_NE(key, CacheKey("chat", "r",
                          Body(R"({"messages": [{"role": "user", "content": "hi"}], "seed": 1})")));
  // Lengths keep parts apart: route "ab" + kind "c" is not route "a" + kind "bc".
  EXPECT_NE(CacheKey("c", "ab", base), CacheKey("bc", "a", base));
}

TEST(CacheEntryCodingTest, RoundTrips) {
  const CacheEntry e = Entry("an answer", kT0 + milliseconds(7));
  auto back = DecodeCacheEntry(EncodeCacheEntry(e));
  ASSERT_OK(back);
  EXPECT_EQ(back->stored_at, kT0 + milliseconds(7));
  EXPECT_EQ(back->answer->text, "an answer");
  EXPECT_EQ(back->answer->model, "model-1");
  EXPECT_EQ(back->answer->provider, "p");
  EXPECT_EQ(back->answer->usage, e.answer->usage);
  EXPECT_EQ(back->answer->response, e.answer->response);
}

TEST(CacheEntryCodingTest, AnythingElseIsRefused) {
  const std::string good = EncodeCacheEntry(Entry("x", kT0));
  auto without = [&](const char* field) {
    auto o = json::parse(good).as_object();
    o.erase(field);
    return json::serialize(o);
  };
  for (
      const std::string& bad :
      {std::string(""), std::string("not json"), std::string("[]"), std::string("{}"),
       good.substr(0, good.size() / 2),
       std::string(
           R"({"v": 2, "stored_at_ms": 1, "provider": "p", "model": "m", "text": "", "usage": null, "response": {}})"),
       std::string(
           R"({"v": 1, "stored_at_ms": "1", "provider": "p", "model": "m", "text": "", "usage": null, "response": {}})"),
       std::string(
           R"({"v": 1, "stored_at_ms": 1, "provider": "p", "model": "m", "text": "", "usage": null, "response": []})"),
       without("stored_at_ms"), without("response"), without("provider"), without("usage")}) {
    auto r = DecodeCacheEntry(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidOutput);
  }
}

TEST(LruCacheTest, ForgetsTheLeastRecentlyUsedBeyondItsBound) {
  LruCache lru(2);
  const Duration keep(60'000);
  lru.Put("a", Entry("A", kT0));
  lru.Put("b", Entry("B", kT0));
  ASSERT_TRUE(lru.Get("a", kT0, keep));  // a is now the most recently used
  lru.Put("c", Entry("C", kT0));         // so b goes
  EXPECT_EQ(lru.size(), 2u);
  EXPECT_FALSE(lru.Get("b", kT0, keep));
  EXPECT_EQ(lru.Get("a", kT0, keep)->answer->text, "A");
  EXPECT_EQ(lru.Get("c", kT0, keep)->answer->text, "C");
  // Replacing keeps one entry per key.
  lru.Put("c", Entry("C2", kT0 + milliseconds(1)));
  EXPECT_EQ(lru.size(), 2u);
  EXPECT_EQ(lru.Get("c", kT0, keep)->answer->text, "C2");
}

TEST(LruCacheTest, DropsEntriesOlderThanKeep) {
  LruCache lru(10);
  lru.Put("a", Entry("A", kT0));
  EXPECT_TRUE(lru.Get("a", kT0 + milliseconds(999), Duration(1000)));
  EXPECT_FALSE(lru.Get("a", kT0 + milliseconds(1000), Duration(1000)));
  EXPECT_EQ(lru.size(), 0u);
}

TEST(RouteCacheTest, WithoutRedisServesThisNodesEntriesUntilTtlPlusStaleIfError) {
  RouteCacheConfig config;
  config.ttl = Duration(1000);
  config.stale_if_error = Duration(500);
  RouteCache cache(config, nullptr, nullptr);
  EXPECT_EQ(cache.keep(), Duration(1500));
  EXPECT_FALSE(cache.Lookup("k", kT0));
  cache.Store("k", Entry("A", kT0));
  auto fresh = cache.Lookup("k", kT0 + milliseconds(999));
  ASSERT_TRUE(fresh);
  EXPECT_EQ(fresh->stored_at, kT0);
  EXPECT_TRUE(cache.Lookup("k", kT0 + milliseconds(1499)));  // the gateway serves it only as stale
  EXPECT_FALSE(cache.Lookup("k", kT0 + milliseconds(1500)));
}

TEST(RouteCacheTest, MaxEntriesBoundsTheLocalCache) {
  RouteCacheConfig config;
  config.ttl = Duration(60'000);
  config.max_entries = 3;
  RouteCache cache(config, nullptr, nullptr);
  for (int i = 0; i < 10; ++i) cache.Store("k" + std::to_string(i), Entry(std::to_string(i), kT0));
  int kept = 0;
  for (int i = 0; i < 10; ++i) kept += cache.Lookup("k" + std::to_string(i), kT0) ? 1 : 0;
  EXPECT_EQ(kept, 3);
  EXPECT_TRUE(cache.Lookup("k9", kT0));
}

}  // namespace
}  // namespace keel::gateway::detail
