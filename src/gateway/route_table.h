#pragma once
// The gateway's routes and providers as state, private to keel_gateway
// (docs/gateway.md, "How a call is served"): per provider its limits, per route target its
// health as that route sees it, per route its strategy, retry budget and cache, all built
// once from the validated config; and the strategies' ordering of a route's targets.
//
// The table's shape never changes after BuildRouteTable: maps and target lists are read
// without a lock. What changes is guarded per object (see each field).

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gateway_metrics.h"
#include "keel/core/circuit_breaker.h"
#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/random.h"
#include "keel/core/result.h"
#include "keel/core/retry_budget.h"
#include "keel/core/token_bucket.h"
#include "latency_ranking.h"
#include "provider.h"
#include "response_cache.h"

namespace keel::gateway::detail {

class RedisClient;

/// A route's strategy, parsed once from its config string.
enum class Strategy {
  kPriority,    // "priority": by tier (1 first), then as listed
  kRoundRobin,  // "round_robin": the first target rotates call by call
  kWeighted,    // "weighted": a weighted random order by weight
  kLatency,     // "latency": fastest first by a time-decayed average (latency_ranking.h)
  kLeastBusy,   // "least_busy": fewest calls in flight and most rpm headroom first
};
/// The config string of a strategy, and back (nullopt for an unknown one).
std::string_view StrategyName(Strategy strategy);
std::optional<Strategy> ParseStrategy(std::string_view name);

/// Per provider: its limits, shared by every route that targets it.
struct ProviderState {
  std::string name;
  ProviderConfig config;
  std::unique_ptr<Provider> provider;
  std::mutex mu;
  std::optional<TokenBucket> rpm;  // GUARDED_BY(mu)
  std::optional<TokenBucket> tpm;  // GUARDED_BY(mu)
  std::atomic<int64_t> in_flight{0};
  ProviderMetrics metrics;

  ProviderState(std::string n, ProviderConfig c, std::unique_ptr<Provider> p, GatewayMetrics& m,
                Timestamp now);
};

/// Per target of a route: its health as seen by that route.
struct TargetState {
  ProviderState* provider;
  RouteTarget target;
  std::string route;      // the route this target belongs to
  std::size_t index = 0;  // in the route's targets
  std::mutex mu;
  CircuitBreaker breaker;  // GUARDED_BY(mu)
  TargetMetrics metrics;

  TargetState(ProviderState* p, RouteTarget t, std::string r, std::size_t i,
              const CircuitBreakerOptions& o, GatewayMetrics& m);
};

struct RouteState {
  RouteConfig config;
  Strategy strategy;
  std::vector<std::unique_ptr<TargetState>> targets;
  std::unique_ptr<RouteCache> cache;        // null: the route has no cache
  std::unique_ptr<LatencyRanking> latency;  // the latency strategy's; null for the others
  std::mutex budget_mu;
  RetryBudget budget;             // GUARDED_BY(budget_mu)
  std::atomic<uint64_t> next{0};  // round_robin's rotation
  RouteMetrics metrics;

  RouteState(RouteConfig c, Strategy s, GatewayMetrics& m);
};

struct RouteTable {
  std::map<std::string, std::unique_ptr<ProviderState>> providers;
  /// The configured routes, and a route of one target per provider that is not also the
  /// name of a route.
  std::map<std::string, std::unique_ptr<RouteState>> routes;
  /// Every route's targets of each provider (for its health probes).
  std::map<std::string, std::vector<TargetState*>> targets_by_provider;

  /// Null for an unknown name.
  RouteState* Find(const std::string& route) const;
};

/// Makes the provider of a config; may return null for "the built-in one of its type".
using ProviderFactory = std::function<std::unique_ptr<Provider>(const ProviderConfig&)>;

/// Builds the table from a validated config, its buckets full at `now`. `make_provider`
/// (may be empty) comes before the built-in providers (openai, anthropic, mock); `redis`
/// (may be null) backs the route caches; `metrics` must outlive the table, as must `redis`.
/// Fails kInvalidRequest on a strategy the config check should have refused.
Result<std::unique_ptr<RouteTable>> BuildRouteTable(const Config& config, GatewayMetrics& metrics,
                                                    const ProviderFactory& make_provider,
                                                    RedisClient* redis, Timestamp now);

/// The route's targets in the order its strategy tries them at `now` (docs/gateway.md):
/// priority by tier then as listed; round_robin rotated by one per call; weighted drawn one
/// after the other with probability by weight from `random`; latency by the route's
/// LatencyRanking (which it updates: a due target is marked as probed); least_busy by calls
/// in flight relative to max_concurrency (1000 when unlimited) plus the share of the rpm
/// bucket used, ties as listed. Thread-safe.
std::vector<TargetState*> Order(RouteState& route, Timestamp now, Random& random);

/// Whether a failed call says the target is unhealthy, for its circuit breaker: it did
/// not answer in time, could not be reached, or answered that it is failing or
/// overloaded. Not: a rate limit (it is up, only busy), a 4xx (the request's fault), nor
/// an answer keel cannot use for this request (invalid_output: the provider answered; what
/// it said is the request's problem, retried or failed over but never held against it).
bool CountsAgainstBreaker(ErrorCode code);

/// Folds a call's (or a probe's) outcome into the target's breaker at `now` and publishes
/// the breaker's state. Takes t.mu.
void RecordHealth(TargetState& t, bool healthy, Timestamp now);

}  // namespace keel::gateway::detail
