#pragma once
// What a route's response cache does for one call, private to keel_gateway
// (docs/gateway.md, "Response cache"): the glue between the attempt loop and RouteCache.
// A call is a bypass (a stream, no-store), or gets a key; with the default mode it reads
// first: an entry younger than ttl answers the call (a hit), an older one is kept to be
// served if every attempt fails with a class that fails over (stale). A successful answer
// is stored under the key.
//
// Not thread-safe: one per call, used by that call's loop.

#include <optional>
#include <string>

#include "keel/core/clock.h"
#include "keel/gateway/gateway.h"
#include "response_cache.h"
#include "route_table.h"

namespace keel::gateway::detail {

class CallCache {
 public:
  /// Decides what the cache does for a call to `route` (which must outlive this) and,
  /// when it may read, reads at `now`: returns the entry of a hit; an entry past its ttl
  /// (within stale_if_error) is kept as stale(). `stream`: the call streams its answer
  /// (never cached); `embed`: an embeddings call (its own key space).
  std::optional<CacheEntry> Open(RouteState& route, const ChatRequest& req, bool stream, bool embed,
                                 Timestamp now);

  /// kNone (the route has no cache), kBypass, or kMiss until a hit or stale answer is
  /// served.
  CacheStatus status() const { return status_; }
  /// An entry past its ttl to serve if every attempt fails over; null when there is none.
  const CacheEntry* stale() const { return stale_ ? &*stale_ : nullptr; }

  /// Stores a successful answer (nothing when the call neither reads nor stores).
  void Store(const ChatResult& answer, Timestamp now);

  /// The answer of `entry` as a result (kHit or kStale; its age at `now`): the stored
  /// response, text, model, provider and usage, and a cost of 0.
  static ChatResult Answer(const CacheEntry& entry, CacheStatus status, Timestamp now);

 private:
  RouteState* route_ = nullptr;
  std::string key_;  // empty: the call neither reads nor stores
  CacheStatus status_ = CacheStatus::kNone;
  std::optional<CacheEntry> stale_;
};

}  // namespace keel::gateway::detail
