#include "gateway_metrics.h"

#include "keel/obs/metrics.h"

namespace keel::gateway::detail {

LabelledCounters::LabelledCounters(prometheus::Family<prometheus::Counter>& family,
                                   std::map<std::string, std::string> labels, std::string key)
    : family_(family), labels_(std::move(labels)), key_(std::move(key)) {}

void LabelledCounters::Increment(std::size_t index, std::string_view value) {
  if (index >= kMaxValues) return;
  prometheus::Counter* c = series_[index].load(std::memory_order_acquire);
  if (c == nullptr) {
    auto labels = labels_;
    labels[key_] = std::string(value);
    c = &family_.Add(labels);  // the family returns the same series for the same labels
    series_[index].store(c, std::memory_order_release);
  }
  c->Increment();
}

namespace {
constexpr std::size_t kOutcomes =
    static_cast<std::size_t>(ErrorCode::kInternal) + 2;  // ok + classes
static_assert(kOutcomes <= LabelledCounters::kMaxValues);
}  // namespace

OutcomeCounters::OutcomeCounters(prometheus::Family<prometheus::Counter>& family,
                                 std::map<std::string, std::string> labels)
    : counters_(family, std::move(labels), "outcome") {}

void OutcomeCounters::Increment(const Error* error) {
  if (error == nullptr) return counters_.Increment(0, "ok");
  counters_.Increment(static_cast<std::size_t>(error->code) + 1, ErrorCodeName(error->code));
}

GatewayMetrics::GatewayMetrics(prometheus::Registry& registry)
    : calls(prometheus::BuildCounter()
                .Name("keel_gateway_requests_total")
                .Help("Calls to routes, by route and outcome (ok or the error class returned)")
                .Register(registry)),
      requests(prometheus::BuildCounter()
                   .Name("keel_llm_requests_total")
                   .Help("Provider calls by route, provider and outcome (ok or an error class)")
                   .Register(registry)),
      latency(prometheus::BuildHistogram()
                  .Name("keel_llm_request_duration_seconds")
                  .Help("Latency of provider calls, by provider")
                  .Register(registry)),
      ttft(prometheus::BuildHistogram()
               .Name("keel_llm_time_to_first_token_seconds")
               .Help("Streamed provider calls: time until the first chunk, by provider")
               .Register(registry)),
      tokens(prometheus::BuildCounter()
                 .Name("keel_llm_tokens_total")
                 .Help("Tokens reported by providers, by provider and direction (input, output)")
                 .Register(registry)),
      cost(prometheus::BuildCounter()
               .Name("keel_llm_cost_total")
               .Help("Cost of answered calls by the providers' prices, by provider")
               .Register(registry)),
      retries(prometheus::BuildCounter()
                  .Name("keel_gateway_retries_total")
                  .Help("Attempts after the first, by route")
                  .Register(registry)),
      failovers(prometheus::BuildCounter()
                    .Name("keel_gateway_failovers_total")
                    .Help("Moves to another target after a failure, by route")
                    .Register(registry)),
      decisions(prometheus::BuildCounter()
                    .Name("keel_gateway_decisions_total")
                    .Help("Decisions of the gateway's attempt loop, by route and verdict "
                          "(first_attempt, retry_same_target, failover, answered, "
                          "not_retryable, stream_broken, no_attempts_left, deadline_passed, "
                          "deadline_too_short, no_budget, no_target, cancelled)")
                    .Register(registry)),
      refusals(prometheus::BuildCounter()
                   .Name("keel_gateway_refusals_total")
                   .Help("Times a target was passed over, by route, provider and reason "
                         "(circuit_open, concurrency, rate_limited, context_window, retry_budget)")
                   .Register(registry)),
      breaker_state(
          prometheus::BuildGauge()
              .Name("keel_gateway_circuit_state")
              .Help("Circuit breaker state by route and provider: 0 closed, 1 half-open, 2 open")
              .Register(registry)),
      latency_average(
          prometheus::BuildGauge()
              .Name("keel_gateway_latency_average_seconds")
              .Help("Routes with the latency strategy: the time-decayed average latency of each "
                    "target, by route and provider (absent before its first sample)")
              .Register(registry)),
      probes(prometheus::BuildCounter()
                 .Name("keel_gateway_health_probes_total")
                 .Help("Active health probes of providers whose circuit was not closed, by "
                       "provider and outcome")
                 .Register(registry)),
      cache_total(prometheus::BuildCounter()
                      .Name("keel_gateway_cache_total")
                      .Help("Calls to routes with a response cache, by route and result (hit, "
                            "miss, stale, bypass)")
                      .Register(registry)),
      cache_corrupt(
          prometheus::BuildCounter()
              .Name("keel_gateway_cache_corrupt_total")
              .Help("Cached answers in Redis that did not decode (served as misses), by route")
              .Register(registry)),
      unknown_route_calls(calls, {{"route", "(unknown)"}}) {}

ProviderMetrics::ProviderMetrics(GatewayMetrics& m, const std::string& provider)
    : latency(&m.latency.Add({{"provider", provider}}, obs::LatencyBuckets())),
      ttft(&m.ttft.Add({{"provider", provider}}, obs::LatencyBuckets())),
      tokens_in(&m.tokens.Add({{"provider", provider}, {"direction", "input"}})),
      tokens_out(&m.tokens.Add({{"provider", provider}, {"direction", "output"}})),
      cost(&m.cost.Add({{"provider", provider}})),
      probes(m.probes, {{"provider", provider}}) {}

RouteMetrics::RouteMetrics(GatewayMetrics& m, const std::string& route, bool cached)
    : calls(m.calls, {{"route", route}}),
      retries(&m.retries.Add({{"route", route}})),
      failovers(&m.failovers.Add({{"route", route}})),
      decisions(m.decisions, {{"route", route}}, "verdict") {
  if (!cached) return;
  cache_corrupt = &m.cache_corrupt.Add({{"route", route}});
  for (CacheStatus st :
       {CacheStatus::kHit, CacheStatus::kMiss, CacheStatus::kStale, CacheStatus::kBypass}) {
    cache_results[static_cast<std::size_t>(st)] =
        &m.cache_total.Add({{"route", route}, {"result", std::string(CacheStatusName(st))}});
  }
}

void RouteMetrics::CountCache(CacheStatus status) {
  if (auto* counter = cache_results[static_cast<std::size_t>(status)]) counter->Increment();
}

TargetMetrics::TargetMetrics(GatewayMetrics& m, const std::string& route,
                             const std::string& provider)
    : requests(m.requests, {{"route", route}, {"provider", provider}}),
      refusals(m.refusals, {{"route", route}, {"provider", provider}}, "reason"),
      breaker(&m.breaker_state.Add({{"route", route}, {"provider", provider}})),
      latency_family_(m.latency_average),
      route_(route),
      provider_(provider) {}

void TargetMetrics::SetBreaker(BreakerState state) {
  breaker->Set(state == BreakerState::kOpen ? 2.0 : state == BreakerState::kHalfOpen ? 1.0 : 0.0);
}

void TargetMetrics::SetLatencyAverage(double seconds) {
  prometheus::Gauge* g = latency_average_.load(std::memory_order_acquire);
  if (g == nullptr) {
    g = &latency_family_.Add(
        {{"route", route_}, {"provider", provider_}});  // same series each time
    latency_average_.store(g, std::memory_order_release);
  }
  g->Set(seconds);
}

}  // namespace keel::gateway::detail
