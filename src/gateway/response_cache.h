#pragma once
// The gateway's response cache (docs/gateway.md, "Response cache"), private to
// keel_gateway: answers of non-streamed chat completions and embeddings, per route, keyed
// by the route and the request body. Each route's cache is a bounded LRU in this node's
// memory and, when Redis is configured, entries in Redis shared by every node; the LRU is
// then a near cache in front of Redis and what serves alone while Redis is not usable.

#include <prometheus/counter.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/lru.h"
#include "keel/core/result.h"

namespace keel::gateway::detail {

class RedisClient;

/// What a hit gives back: the provider's answer as it was, and who gave it.
struct CachedAnswer {
  json::object response;
  std::string text;
  std::string model;
  std::string provider;
  json::value usage;
};

struct CacheEntry {
  std::shared_ptr<const CachedAnswer> answer;  // shared by every hit; never modified
  Timestamp stored_at;
};

/// The key of a request: the lower-case hex SHA-256 of `kind` ("chat", "embeddings"),
/// `route` and the canonical form (keys sorted) of `body` without `model`, `stream`,
/// `stream_options` and `user`.
std::string CacheKey(std::string_view kind, std::string_view route, const json::object& body);

/// An entry as a Redis value: a JSON object with a format version and the store time
/// (milliseconds since the epoch, by the storing node's clock). DecodeCacheEntry fails
/// (kInvalidOutput) on anything else.
std::string EncodeCacheEntry(const CacheEntry& entry);
Result<CacheEntry> DecodeCacheEntry(std::string_view value);

/// A bounded map of entries that forgets the least recently used first, and entries past
/// their keep time when read. Thread-safe.
class LruCache {
 public:
  /// max_entries >= 1.
  explicit LruCache(std::size_t max_entries) : map_(max_entries) {}

  /// The entry of `key` when it is younger than `keep` at `now` (marked most recently
  /// used); an older one is dropped.
  std::optional<CacheEntry> Get(const std::string& key, Timestamp now, Duration keep);
  /// Stores (or replaces) the entry of `key`, dropping the least recently used beyond
  /// max_entries.
  void Put(const std::string& key, CacheEntry entry) { map_.Put(key, std::move(entry)); }
  std::size_t size() const { return map_.size(); }

 private:
  LruMap<CacheEntry> map_;
};

/// One route's cache. Thread-safe.
class RouteCache {
 public:
  /// `redis`: null for a cache of this node only; else it must outlive this, as must
  /// `corrupt` (counts Redis values that do not decode; may be null).
  RouteCache(const RouteCacheConfig& config, RedisClient* redis, prometheus::Counter* corrupt);

  /// The freshest entry of `key` younger than ttl + stale_if_error at `now`: this node's
  /// when it is younger than ttl; otherwise Redis's (when usable; stored here too) or this
  /// node's, whichever is younger. A Redis value that does not decode is a miss (counted).
  std::optional<CacheEntry> Lookup(const std::string& key, Timestamp now);

  /// Stores here and, when usable, in Redis with an expiry of ttl + stale_if_error.
  void Store(const std::string& key, const CacheEntry& entry);

  const RouteCacheConfig& config() const { return config_; }
  /// ttl + stale_if_error: how long an entry may be served at all.
  Duration keep() const { return config_.ttl + config_.stale_if_error; }

 private:
  std::string RedisKey(const std::string& key) const;

  const RouteCacheConfig config_;
  RedisClient* const redis_;
  prometheus::Counter* const corrupt_;
  LruCache local_;
};

}  // namespace keel::gateway::detail
