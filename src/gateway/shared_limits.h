#pragma once
// rpm/tpm token buckets kept in Redis, shared by every keel node (docs/gateway.md,
// "Redis"). Private to keel_gateway. The same semantics as the local TokenBucket
// (keel/core/token_bucket.h): a bucket holds at most `limit` tokens, refills at limit/60
// per second, starts full, and may go below zero after a correction. Each operation is
// one atomic Lua script, timed by the Redis server's TIME, so the nodes' clocks do not
// matter.
//
// Keys: KEY_PREFIX "rate:{" PROVIDER "}:rpm" and ":tpm" (one hash slot per provider), hashes
// {tokens, at}. Each expires when its bucket would be full again: a missing key is a full
// bucket, so nothing lingers.
//
// Thread-safe (the RedisClient is). Every operation fails with kUnavailable when Redis is
// not usable: the caller then decides with its local buckets.

#include <string>

#include "keel/core/clock.h"
#include "keel/core/result.h"
#include "redis_client.h"

namespace keel::gateway::detail {

class SharedLimits {
 public:
  /// `redis` must outlive this.
  explicit SharedLimits(RedisClient& redis);

  /// Takes one request from the rpm bucket and `tokens` from the tpm bucket of `provider`,
  /// both or neither (`rpm`, `tpm`: the limits; 0: none, that bucket is not touched).
  /// `tokens` must be at most `tpm`. Returns 0 when taken, otherwise how long until both
  /// would hold enough (for Retry-After), having taken nothing.
  Result<Duration> Take(const std::string& provider, int64_t rpm, int64_t tpm, double tokens);

  /// Adds `requests` to the rpm bucket and `tokens` to the tpm bucket, each capped at its
  /// limit; negative values take more, down below zero if need be. For a call whose
  /// usage differed from its estimate (tokens: estimate - usage), and for an admission
  /// whose call was not made (requests 1, tokens: the estimate).
  Result<void> Adjust(const std::string& provider, int64_t rpm, int64_t tpm, double requests,
                      double tokens);

 private:
  std::string Key(const std::string& provider, const char* which) const;
  RedisClient& redis_;
};

}  // namespace keel::gateway::detail
