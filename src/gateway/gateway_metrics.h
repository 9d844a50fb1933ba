#pragma once
// The gateway's metrics, private to keel_gateway: every family declared once, here, and the
// series of each provider, route and route target resolved when the route table is built,
// so that a call reaches its counters without building a label map. The names, help texts
// and labels are a v1 contract (docs/operations.md, "Metrics"): add to them, rename none.
//
// A series whose label takes one of a closed set of values (an outcome, a refusal reason,
// a verdict) is made on its first count, so that /metrics shows only what happened; the
// others exist from the start.

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "keel/core/circuit_breaker.h"
#include "keel/core/error.h"
#include "keel/gateway/gateway.h"

namespace keel::gateway::detail {

/// A counter family's series for fixed labels plus one label (`key`) that takes one of at
/// most kMaxValues values, by index (an enum's): each series made at its first Increment.
/// Thread-safe.
class LabelledCounters {
 public:
  static constexpr std::size_t kMaxValues = 32;
  /// `family` must outlive this.
  LabelledCounters(prometheus::Family<prometheus::Counter>& family,
                   std::map<std::string, std::string> labels, std::string key);
  /// Counts one for value number `index` (< kMaxValues; others are not counted), whose
  /// label value is `value`: the same value for the same index every time.
  void Increment(std::size_t index, std::string_view value);

 private:
  prometheus::Family<prometheus::Counter>& family_;
  const std::map<std::string, std::string> labels_;
  const std::string key_;
  std::array<std::atomic<prometheus::Counter*>, kMaxValues> series_{};
};

/// A LabelledCounters on "outcome": "ok" or the error class. Thread-safe.
class OutcomeCounters {
 public:
  OutcomeCounters(prometheus::Family<prometheus::Counter>& family,
                  std::map<std::string, std::string> labels);
  /// `error`: null for ok.
  void Increment(const Error* error);

 private:
  LabelledCounters counters_;
};

/// Every family of the gateway, registered in the constructor. The registry must outlive
/// this.
struct GatewayMetrics {
  explicit GatewayMetrics(prometheus::Registry& registry);

  using Counters = prometheus::Family<prometheus::Counter>;
  using Gauges = prometheus::Family<prometheus::Gauge>;
  using Histograms = prometheus::Family<prometheus::Histogram>;

  Counters& calls;          // keel_gateway_requests_total{route, outcome}
  Counters& requests;       // keel_llm_requests_total{route, provider, outcome}
  Histograms& latency;      // keel_llm_request_duration_seconds{provider}
  Histograms& ttft;         // keel_llm_time_to_first_token_seconds{provider}
  Counters& tokens;         // keel_llm_tokens_total{provider, direction}
  Counters& cost;           // keel_llm_cost_total{provider}
  Counters& retries;        // keel_gateway_retries_total{route}
  Counters& failovers;      // keel_gateway_failovers_total{route}
  Counters& decisions;      // keel_gateway_decisions_total{route, verdict}
  Counters& refusals;       // keel_gateway_refusals_total{route, provider, reason}
  Gauges& breaker_state;    // keel_gateway_circuit_state{route, provider}
  Gauges& latency_average;  // keel_gateway_latency_average_seconds{route, provider}
  Counters& probes;         // keel_gateway_health_probes_total{provider, outcome}
  Counters& cache_total;    // keel_gateway_cache_total{route, result}
  Counters& cache_corrupt;  // keel_gateway_cache_corrupt_total{route}
  /// keel_gateway_requests_total for every name that is not a route: names from clients
  /// share one series ("(unknown)"), so that they cannot grow the registry without bound.
  OutcomeCounters unknown_route_calls;
};

/// A provider's series.
struct ProviderMetrics {
  ProviderMetrics(GatewayMetrics& m, const std::string& provider);
  prometheus::Histogram* latency;
  prometheus::Histogram* ttft;
  prometheus::Counter* tokens_in;
  prometheus::Counter* tokens_out;
  prometheus::Counter* cost;
  OutcomeCounters probes;
};

/// A route's series. `decisions` is indexed by Verdict (attempt_loop.h).
struct RouteMetrics {
  /// `cached`: the route has a response cache.
  RouteMetrics(GatewayMetrics& m, const std::string& route, bool cached);
  /// keel_gateway_cache_total{route, result}; nothing for kNone or a route without a cache.
  void CountCache(CacheStatus status);

  OutcomeCounters calls;
  prometheus::Counter* retries;
  prometheus::Counter* failovers;
  LabelledCounters decisions;
  prometheus::Counter* cache_corrupt =
      nullptr;  // a route with a cache: Redis values that did not decode
  std::array<prometheus::Counter*, 5> cache_results{};  // by CacheStatus; null for kNone
};

/// A route target's series. `refusals` is indexed by Refusal (admission.h).
struct TargetMetrics {
  TargetMetrics(GatewayMetrics& m, const std::string& route, const std::string& provider);
  /// keel_gateway_circuit_state: 0 closed, 1 half-open, 2 open.
  void SetBreaker(BreakerState state);
  /// keel_gateway_latency_average_seconds, made at the first sample.
  void SetLatencyAverage(double seconds);

  OutcomeCounters requests;
  LabelledCounters refusals;
  prometheus::Gauge* breaker;

 private:
  prometheus::Family<prometheus::Gauge>& latency_family_;
  const std::string route_;
  const std::string provider_;
  std::atomic<prometheus::Gauge*> latency_average_{nullptr};
};

}  // namespace keel::gateway::detail
