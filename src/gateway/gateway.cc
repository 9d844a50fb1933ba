#include "keel/gateway/gateway.h"

#include <charconv>
#include <chrono>
#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <condition_variable>
#include <map>
#include <mutex>
#include <prometheus/gauge.h>
#include <prometheus/counter.h>
#include <prometheus/histogram.h>
#include <thread>
#include <vector>

#include "keel/core/backoff.h"
#include "keel/core/circuit_breaker.h"
#include "keel/core/retry_budget.h"
#include "keel/core/secrets.h"
#include "keel/core/sse.h"
#include "keel/core/token_bucket.h"
#include "keel/gateway/mock_llm.h"
#include "keel/net/http_client.h"
#include "keel/net/worker_pool.h"
#include "keel/obs/log.h"
#include "keel/obs/metrics.h"

#include "latency_ranking.h"
#include "provider.h"
#include "redis_client.h"
#include "response_cache.h"
#include "shared_limits.h"

namespace keel::gateway {
namespace {

using detail::Provider;

// A counter family's series for fixed labels plus an "outcome" label (ok or an error
// class), made on first use and then reached without building label maps.
class OutcomeCounters {
 public:
  OutcomeCounters(prometheus::Family<prometheus::Counter>& family, std::map<std::string, std::string> labels)
      : family_(family), labels_(std::move(labels)) {}
  void Increment(const Error* e) {
    const std::size_t i = e == nullptr ? 0 : static_cast<std::size_t>(e->code) + 1;
    prometheus::Counter* c = series_[i].load(std::memory_order_acquire);
    if (c == nullptr) {
      auto labels = labels_;
      labels["outcome"] = e == nullptr ? std::string("ok") : std::string(ErrorCodeName(e->code));
      c = &family_.Add(labels);  // the family returns the same series for the same labels
      series_[i].store(c, std::memory_order_release);
    }
    c->Increment();
  }

 private:
  static constexpr std::size_t kSeries = static_cast<std::size_t>(ErrorCode::kInternal) + 2;
  prometheus::Family<prometheus::Counter>& family_;
  std::map<std::string, std::string> labels_;
  std::array<std::atomic<prometheus::Counter*>, kSeries> series_{};
};

// A provider's metric series, made once.
struct ProviderMetrics {
  prometheus::Histogram* latency;
  prometheus::Histogram* ttft;
  prometheus::Counter* tokens_in;
  prometheus::Counter* tokens_out;
  prometheus::Counter* cost;
};

// Per provider: its limits, shared by every route that targets it.
struct ProviderState {
  ProviderConfig config;
  std::unique_ptr<Provider> provider;
  std::mutex mu;
  std::optional<TokenBucket> rpm;  // GUARDED_BY(mu)
  std::optional<TokenBucket> tpm;  // GUARDED_BY(mu)
  std::atomic<int64_t> in_flight{0};
  ProviderMetrics metrics{};
};

// Per target of a route: its health as seen by that route.
struct TargetState {
  ProviderState* provider;
  RouteTarget target;
  std::string route;  // the route this target belongs to
  std::size_t index = 0;  // in the route's targets
  std::mutex mu;
  CircuitBreaker breaker;  // GUARDED_BY(mu)
  std::optional<OutcomeCounters> requests;  // keel_llm_requests_total{route, provider}
  prometheus::Gauge* breaker_gauge = nullptr;
  std::atomic<prometheus::Gauge*> latency_gauge{nullptr};  // latency strategy: made at the first sample
  TargetState(ProviderState* p, RouteTarget t, const CircuitBreakerOptions& o)
      : provider(p), target(std::move(t)), breaker(o) {}
};

struct RouteState {
  RouteConfig config;
  std::vector<std::unique_ptr<TargetState>> targets;
  std::unique_ptr<detail::RouteCache> cache;  // null: the route has no cache
  std::unique_ptr<detail::LatencyRanking> latency;  // the latency strategy's; null for others
  // keel_gateway_cache_total{route, result}, by CacheStatus (kNone unused).
  std::array<prometheus::Counter*, 5> cache_results{};
  std::mutex budget_mu;
  RetryBudget budget;  // GUARDED_BY(budget_mu)
  std::atomic<uint64_t> next{0};
  std::optional<OutcomeCounters> calls;  // keel_gateway_requests_total{route}
  prometheus::Counter* retries = nullptr;
  prometheus::Counter* failovers = nullptr;
  RouteState(RouteConfig c, RetryBudgetOptions b) : config(std::move(c)), budget(b) {}
};

// Whether a failed call says the target is unhealthy, for its circuit breaker: it did not
// answer in time, could not be reached, or answered that it is failing or overloaded. Not:
// a rate limit (it is up, only busy), a 4xx (the request's fault), nor an answer keel cannot
// use for this request (invalid_output: the provider answered; what it said is the
// request's problem, retried or failed over but never held against the target).
bool CountsAgainstBreaker(ErrorCode code) {
  return FailsOver(code) && code != ErrorCode::kRateLimited && code != ErrorCode::kInvalidOutput;
}

// Why a target did not take a call.
enum class Refusal { kNone, kCircuitOpen, kConcurrency, kRateLimited, kWindow };

}  // namespace

std::string_view CacheStatusName(CacheStatus status) {
  switch (status) {
    case CacheStatus::kNone: return "none";
    case CacheStatus::kHit: return "hit";
    case CacheStatus::kMiss: return "miss";
    case CacheStatus::kStale: return "stale";
    case CacheStatus::kBypass: return "bypass";
  }
  return "none";
}

int64_t EstimatePromptTokens(const json::object& body) {
  int64_t bytes = 0;
  if (const auto* input = body.if_contains("input")) {
    if (input->is_string()) bytes += static_cast<int64_t>(input->get_string().size());
    if (input->is_array()) {
      for (const auto& v : input->get_array()) {
        bytes += v.is_string() ? static_cast<int64_t>(v.get_string().size()) : static_cast<int64_t>(json::serialize(v).size());
      }
    }
  }
  if (const auto* msgs = body.if_contains("messages"); msgs && msgs->is_array()) {
    for (const auto& m : msgs->get_array()) {
      if (!m.is_object()) continue;
      if (const auto* c = m.get_object().if_contains("content")) {
        bytes += c->is_string() ? static_cast<int64_t>(c->get_string().size())
                                : static_cast<int64_t>(json::serialize(*c).size());
      }
    }
  }
  return (bytes + 3) / 4;
}

namespace {

class GatewayImpl final : public Gateway {
 public:
  GatewayImpl(prometheus::Registry& registry, const Clock& clock, Random& random)
      : registry_(registry),
        clock_(clock),
        random_(random),
        calls_(prometheus::BuildCounter()
                   .Name("keel_gateway_requests_total")
                   .Help("Calls to routes, by route and outcome (ok or the error class returned)")
                   .Register(registry)),
        requests_(prometheus::BuildCounter()
                      .Name("keel_llm_requests_total")
                      .Help("Provider calls by route, provider and outcome (ok or an error class)")
                      .Register(registry)),
        latency_(prometheus::BuildHistogram()
                     .Name("keel_llm_request_duration_seconds")
                     .Help("Latency of provider calls, by provider")
                     .Register(registry)),
        ttft_(prometheus::BuildHistogram()
                  .Name("keel_llm_time_to_first_token_seconds")
                  .Help("Streamed provider calls: time until the first chunk, by provider")
                  .Register(registry)),
        tokens_(prometheus::BuildCounter()
                    .Name("keel_llm_tokens_total")
                    .Help("Tokens reported by providers, by provider and direction (input, output)")
                    .Register(registry)),
        cost_(prometheus::BuildCounter()
                  .Name("keel_llm_cost_total")
                  .Help("Cost of answered calls by the providers' prices, by provider")
                  .Register(registry)),
        retries_(prometheus::BuildCounter()
                     .Name("keel_gateway_retries_total")
                     .Help("Attempts after the first, by route")
                     .Register(registry)),
        failovers_(prometheus::BuildCounter()
                       .Name("keel_gateway_failovers_total")
                       .Help("Moves to another target after a failure, by route")
                       .Register(registry)),
        refusals_(prometheus::BuildCounter()
                      .Name("keel_gateway_refusals_total")
                      .Help("Times a target was passed over, by route, provider and reason "
                            "(circuit_open, concurrency, rate_limited, context_window, retry_budget)")
                      .Register(registry)),
        breaker_state_(prometheus::BuildGauge()
                           .Name("keel_gateway_circuit_state")
                           .Help("Circuit breaker state by route and provider: 0 closed, 1 half-open, 2 open")
                           .Register(registry)),
        latency_average_(prometheus::BuildGauge()
                             .Name("keel_gateway_latency_average_seconds")
                             .Help("Routes with the latency strategy: the time-decayed average latency of each "
                                   "target, by route and provider (absent before its first sample)")
                             .Register(registry)),
        probes_(prometheus::BuildCounter()
                    .Name("keel_gateway_health_probes_total")
                    .Help("Active health probes of providers whose circuit was not closed, by provider and outcome")
                    .Register(registry)),
        cache_total_(prometheus::BuildCounter()
                         .Name("keel_gateway_cache_total")
                         .Help("Calls to routes with a response cache, by route and result (hit, miss, stale, bypass)")
                         .Register(registry)),
        cache_corrupt_(prometheus::BuildCounter()
                           .Name("keel_gateway_cache_corrupt_total")
                           .Help("Cached answers in Redis that did not decode (served as misses), by route")
                           .Register(registry)) {}

  ~GatewayImpl() override {
    {
      std::lock_guard lock(probe_mu_);
      probe_stop_ = true;
    }
    probe_cv_.notify_all();
    if (prober_.joinable()) prober_.join();
  }

  Result<void> Init(const Config& config) {
    if (config.redis) {
      redis_ = detail::RedisClient::Create(*config.redis, registry_, clock_);
      shared_limits_ = std::make_unique<detail::SharedLimits>(*redis_);
    }
    const Timestamp now = clock_.Now();
    for (const auto& [name, p] : config.providers) {
      auto st = std::make_unique<ProviderState>();
      st->config = p;
      if (p.type == "openai") st->provider = detail::MakeOpenAiProvider(p);
      else if (p.type == "anthropic") st->provider = detail::MakeAnthropicProvider(p);
      else st->provider = detail::MakeMockProvider(p);
      if (p.limits.rpm > 0) st->rpm.emplace(static_cast<double>(p.limits.rpm), p.limits.rpm / 60.0, now);
      if (p.limits.tpm > 0) st->tpm.emplace(static_cast<double>(p.limits.tpm), p.limits.tpm / 60.0, now);
      st->metrics = ProviderMetrics{&latency_.Add({{"provider", name}}, obs::LatencyBuckets()),
                                    &ttft_.Add({{"provider", name}}, obs::LatencyBuckets()),
                                    &tokens_.Add({{"provider", name}, {"direction", "input"}}),
                                    &tokens_.Add({{"provider", name}, {"direction", "output"}}),
                                    &cost_.Add({{"provider", name}})};
      providers_[name] = std::move(st);
    }
    auto add_route = [&](const RouteConfig& rc) {
      RetryBudgetOptions b;
      b.ratio = rc.retry_budget.ratio;
      b.min_per_second = rc.retry_budget.min_per_second;
      auto route = std::make_unique<RouteState>(rc, b);
      CircuitBreakerOptions o;
      o.failure_rate = rc.circuit_breaker.failure_rate;
      o.min_requests = rc.circuit_breaker.min_requests;
      o.window = rc.circuit_breaker.window;
      o.consecutive_failures = rc.circuit_breaker.consecutive_failures;
      o.open_for = rc.circuit_breaker.open_for;
      route->calls.emplace(calls_, std::map<std::string, std::string>{{"route", rc.name}});
      route->retries = &retries_.Add({{"route", rc.name}});
      route->failovers = &failovers_.Add({{"route", rc.name}});
      if (rc.cache) {
        route->cache = std::make_unique<detail::RouteCache>(*rc.cache, redis_.get(),
                                                            &cache_corrupt_.Add({{"route", rc.name}}));
        for (CacheStatus st : {CacheStatus::kHit, CacheStatus::kMiss, CacheStatus::kStale, CacheStatus::kBypass}) {
          route->cache_results[static_cast<std::size_t>(st)] =
              &cache_total_.Add({{"route", rc.name}, {"result", std::string(CacheStatusName(st))}});
        }
      }
      if (rc.strategy == "latency") route->latency = std::make_unique<detail::LatencyRanking>(rc.targets.size());
      for (const auto& t : rc.targets) {
        auto target = std::make_unique<TargetState>(providers_.at(t.provider).get(), t, o);
        target->route = rc.name;
        target->index = route->targets.size();
        target->requests.emplace(requests_, std::map<std::string, std::string>{{"route", rc.name}, {"provider", t.provider}});
        target->breaker_gauge = &breaker_state_.Add({{"route", rc.name}, {"provider", t.provider}});
        route->targets.push_back(std::move(target));
      }
      routes_[rc.name] = std::move(route);
    };
    for (const auto& [name, r] : config.routes) add_route(r);
    for (auto& [name, route] : routes_) {
      for (auto& t : route->targets) targets_by_provider_[t->target.provider].push_back(t.get());
    }
    for (const auto& [name, p] : config.providers) {
      if (routes_.count(name)) continue;
      RouteConfig rc;
      rc.name = name;
      rc.targets.push_back(RouteTarget{name, 1, 1});
      add_route(rc);
      for (auto& t : routes_.at(name)->targets) targets_by_provider_[name].push_back(t.get());
    }
    bool blocking = false;
    for (const auto& [name, p] : providers_) blocking = blocking || !p->provider->async();
    if (blocking) blocking_ = std::make_unique<net::WorkerPool>(config.server.handler_threads, 10000);
    bool probing = false;
    for (const auto& [name, p] : providers_) probing = probing || p->config.health_check_interval.count() > 0;
    if (probing) prober_ = std::thread([this] { ProbeLoop(); });
    return Ok();
  }

  std::vector<RouteInfo> Routes() const override {
    std::vector<RouteInfo> out;
    for (const auto& [name, r] : routes_) {
      RouteInfo info{name, r->config.strategy, {}};
      for (const auto& t : r->targets) info.providers.push_back(t->target.provider);
      out.push_back(std::move(info));
    }
    return out;
  }

  Result<ChatResult> Chat(const ChatRequest& req) override { return Run(req, nullptr); }

  Result<ChatResult> Embeddings(const ChatRequest& req) override { return Run(req, nullptr, /*embed=*/true); }

  Result<ChatResult> ChatStream(const ChatRequest& req, const ChunkSink& on_chunk) override {
    return Run(req, &on_chunk);
  }

  void ChatAsync(ChatRequest req, const boost::asio::any_io_executor& executor, Callback done) override {
    auto a = std::make_shared<AsyncCall>(std::move(req), executor, std::move(done));
    if (!Begin(a->call)) return a->Complete();
    Step(std::move(a));
  }

 private:
  // The state of one call through a route: the resilience loop's bookkeeping, shared by
  // the blocking path (Run) and the asynchronous one (Step). The loop: Begin, then Next
  // picks a target (and a backoff delay), the caller makes the call, OnResult folds its
  // outcome in, until one of them says the call is done and `result` holds its answer.
  struct Call {
    Call(const ChatRequest& r, const ChunkSink* s, bool e) : req(r), sink(s), embed(e) {}
    const ChatRequest& req;
    const ChunkSink* sink;  // null for a whole answer
    bool embed;
    RouteState* route = nullptr;
    std::chrono::steady_clock::time_point start, deadline;
    int64_t prompt_tokens = 0;
    int64_t estimate = 0;
    int max_attempts = 0;
    std::vector<TargetState*> tried;
    TargetState* previous = nullptr;
    std::optional<Error> last;
    int64_t min_window = 0;  // after a context_length error: a larger window is needed
    int attempts = 0;
    int failovers = 0;
    bool forwarded = false;  // a chunk reached the caller: no failover from here on
    Duration ttft{0};
    // The attempt Next chose: its target, the backoff to wait before it, and its body.
    TargetState* target = nullptr;
    Duration delay{0};
    json::object body;
    Duration left{0};
    std::chrono::steady_clock::time_point t0;
    bool shared = false;  // the attempt's rate tokens came from Redis, and go back there
    // The response cache: the key (empty when the call neither reads nor stores), what the
    // cache did, and an entry past its ttl to serve if every attempt fails over.
    std::string cache_key;
    CacheStatus cache = CacheStatus::kNone;
    std::optional<detail::CacheEntry> stale;
    std::optional<Result<ChatResult>> result;
  };

  struct AsyncCall {
    AsyncCall(ChatRequest r, boost::asio::any_io_executor e, Callback d)
        : req(std::move(r)), executor(std::move(e)), done(std::move(d)), call(req, nullptr, false) {}
    void Complete() { done(std::move(*call.result)); }
    ChatRequest req;
    boost::asio::any_io_executor executor;
    Callback done;
    Call call;
  };

  // One call through the route, blocking: the resilience loop shared by whole and
  // streamed answers. `sink` is null for a whole answer.
  Result<ChatResult> Run(const ChatRequest& req, const ChunkSink* sink, bool embed = false) {
    Call c(req, sink, embed);
    if (Begin(c)) {
      while (Next(c)) {
        if (c.delay.count() > 0) std::this_thread::sleep_for(c.delay);  // real time: the outbound call path
        if (OnResult(c, CallTarget(c))) break;
      }
    }
    return std::move(*c.result);
  }

  // The asynchronous loop: a backoff is a timer and a call holds no thread, unless the
  // provider can only block, in which case the call runs on the blocking pool.
  void Step(std::shared_ptr<AsyncCall> a) {
    Call& c = a->call;
    if (!Next(c)) return a->Complete();
    if (c.delay.count() > 0) {
      auto timer = std::make_shared<boost::asio::steady_timer>(a->executor, c.delay);
      timer->async_wait([this, a, timer](boost::system::error_code) { Attempt(a); });
      return;
    }
    Attempt(std::move(a));
  }

  void Attempt(std::shared_ptr<AsyncCall> a) {
    Call& c = a->call;
    Prepare(c);
    auto& provider = *c.target->provider->provider;
    auto on_result = [this, a](Result<ChatResult> r) {
      if (OnResult(a->call, Finish(a->call, std::move(r)))) return a->Complete();
      Step(a);
    };
    if (provider.async()) {
      provider.ChatAsync(c.body, a->req, c.left, a->executor, std::move(on_result));
      return;
    }
    const bool queued = blocking_ && blocking_->Submit([&provider, a, on_result]() mutable {
      auto r = provider.Chat(a->call.body, a->req, a->call.left);
      boost::asio::post(a->executor, [on_result = std::move(on_result), r = std::move(r)]() mutable { on_result(std::move(r)); });
    });
    if (!queued) {
      Error e(ErrorCode::kOverloaded, "keel is overloaded (too many blocking provider calls waiting); retry later");
      e.retry_after = Duration(1000);
      on_result(std::move(e));
    }
  }

  // Looks the route up and checks the prompt against the windows; false (with the
  // result set) when the call ends here.
  bool Begin(Call& c) {
    const ChatRequest& req = c.req;
    const auto it = routes_.find(req.route);
    if (it == routes_.end()) {
      c.result = Count(c, Error(ErrorCode::kNotFound, "no route or provider named \"" + req.route + "\"", "model"));
      return false;
    }
    RouteState& route = *it->second;
    c.route = &route;
    c.start = std::chrono::steady_clock::now();
    c.deadline = c.start + std::min(req.timeout, route.config.timeout);
    c.prompt_tokens = EstimatePromptTokens(req.body);
    c.estimate = c.prompt_tokens + static_cast<int64_t>(NumberOr(req.body.if_contains("max_tokens"), 0));

    int64_t largest = 0;
    for (const auto& t : route.targets) largest = std::max(largest, t->provider->config.context_window);
    if (c.prompt_tokens > largest) {
      c.result = Count(c, Error(ErrorCode::kContextLength,
                                        "the prompt (about " + std::to_string(c.prompt_tokens) +
                                            " tokens) is longer than the context window of every target of route \"" +
                                            req.route + "\" (largest: " + std::to_string(largest) + ")",
                                        "messages"));
      return false;
    }
    if (route.cache) {
      if (c.sink != nullptr || req.cache == CacheMode::kNoStore) {
        c.cache = CacheStatus::kBypass;  // streams are never cached
      } else {
        c.cache = CacheStatus::kMiss;
        c.cache_key = detail::CacheKey(c.embed ? "embeddings" : "chat", route.config.name, req.body);
        if (req.cache == CacheMode::kDefault) {
          const Timestamp now = clock_.Now();
          if (auto entry = route.cache->Lookup(c.cache_key, now)) {
            if (now - entry->stored_at < route.cache->config().ttl) {
              c.result = FromCache(c, *entry, CacheStatus::kHit, now);
              return false;
            }
            c.stale = std::move(entry);
          }
        }
      }
    }
    {
      std::lock_guard lock(route.budget_mu);
      route.budget.OnRequest(clock_.Now());
    }
    c.max_attempts = req.max_attempts > 0 ? std::min(req.max_attempts, 10) : route.config.retry.max_attempts;
    if (req.failover_only) {
      c.max_attempts = std::min<int>(route.config.max_failover, static_cast<int>(route.targets.size()));
    }
    return true;
  }

  // Chooses the next attempt: an admitted target and the backoff before calling it.
  // False (with the result set) when there is none.
  bool Next(Call& c) {
    const ChatRequest& req = c.req;
    RouteState& route = *c.route;
    c.target = nullptr;
    c.delay = Duration(0);
    if (req.cancelled != nullptr && req.cancelled->load()) {
      c.result = Count(c, Error(ErrorCode::kCancelled, "route \"" + req.route + "\": the call was cancelled"));
      return false;
    }
    if (c.attempts < c.max_attempts && std::chrono::steady_clock::now() < c.deadline) {
      Refusal why = Refusal::kNone;
      Duration rate_wait = Duration::max();
      bool shared = false;
      TargetState* target = Pick(route, c.tried, !req.failover_only, c.min_window,
                                 std::max(c.prompt_tokens, c.min_window + 1), c.estimate, why, rate_wait, shared);
      if (target == nullptr && !c.last) {
        c.result = Count(c, NoTarget(route, why, rate_wait));
        return false;
      }
      // Without a target, the last failure says more than "nothing is available".
      if (target != nullptr && c.attempts > 0) {
        bool allowed;
        {
          std::lock_guard lock(route.budget_mu);
          allowed = route.budget.TryRetry(clock_.Now());
        }
        if (!allowed) {
          Release(*target, c.estimate, shared);
          refusals_.Add({{"route", req.route}, {"provider", target->target.provider}, {"reason", "retry_budget"}}).Increment();
          c.last->message += " (no retry: the route's retry budget is spent)";
          target = nullptr;
        } else {
          route.retries->Increment();
          if (target == c.previous) {
            // The same target again: back off first, honouring its Retry-After.
            c.delay = ComputeBackoff(route.config.retry.backoff, c.attempts, c.last->retry_after, random_);
            if (std::chrono::steady_clock::now() + c.delay >= c.deadline) {
              Release(*target, c.estimate, shared);
              target = nullptr;
            }
          } else {
            ++c.failovers;
            route.failovers->Increment();
          }
        }
      }
      if (target != nullptr) {
        if (std::find(c.tried.begin(), c.tried.end(), target) == c.tried.end()) c.tried.push_back(target);
        c.previous = target;
        c.target = target;
        c.shared = shared;
        ++c.attempts;
        return true;
      }
    }
    c.result = End(c);
    return false;
  }

  // Folds an attempt's outcome in; true (with the result set) when the call is done.
  bool OnResult(Call& c, Result<ChatResult> r) {
    if (r.ok()) {
      r->attempts = c.attempts;
      r->failovers = c.failovers;
      r->duration = std::chrono::duration_cast<Duration>(std::chrono::steady_clock::now() - c.start);
      r->time_to_first_token = c.ttft;
      r->cache = c.cache;
      if (!c.cache_key.empty()) {
        auto answer = std::make_shared<detail::CachedAnswer>(
            detail::CachedAnswer{r->response, r->text, r->model, r->provider, r->usage});
        c.route->cache->Store(c.cache_key, detail::CacheEntry{std::move(answer), clock_.Now()});
      }
      CountCache(c, c.cache);
      c.route->calls->Increment(nullptr);
      c.result = std::move(r);
      return true;
    }
    c.last = std::move(r).error();
    if (c.forwarded) {
      // Part of the answer is out: it cannot be taken back or continued elsewhere.
      c.last->message = "the stream failed after its first token: " + c.last->message;
      c.result = Count(c, std::move(*c.last));
      return true;
    }
    if (c.last->code == ErrorCode::kContextLength) {
      c.min_window = std::max(c.min_window, c.target->provider->config.context_window);
      return false;
    }
    if (!FailsOver(c.last->code)) {
      c.result = End(c);
      return true;
    }
    return false;
  }

  // The answer of a call that ran out of attempts, time or targets.
  Result<ChatResult> End(Call& c) {
    const ChatRequest& req = c.req;
    if (!c.last) {
      return Count(c, Error(ErrorCode::kTimeout, "route \"" + req.route + "\": the deadline of " +
                                                             std::to_string(std::min(req.timeout, c.route->config.timeout).count()) +
                                                             "ms passed before any target answered"));
    }
    if (std::chrono::steady_clock::now() >= c.deadline && FailsOver(c.last->code)) {
      c.last->code = ErrorCode::kTimeout;
      c.last->message = "route \"" + req.route + "\": the deadline passed after " + std::to_string(c.attempts) +
                        " attempts; last failure: " + c.last->message;
    }
    return Count(c, std::move(*c.last));
  }

  // Probes each provider with health checks on whose targets a circuit is half-open, so a
  // recovered provider is back in rotation without a user call paying for the trial.
  void ProbeLoop() {
    std::map<std::string, std::chrono::steady_clock::time_point> next;
    std::unique_lock lock(probe_mu_);
    while (!probe_stop_) {
      probe_cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return probe_stop_; });
      if (probe_stop_) break;
      lock.unlock();
      const auto steady = std::chrono::steady_clock::now();
      for (auto& [name, p] : providers_) {
        const Duration interval = p->config.health_check_interval;
        if (interval.count() <= 0 || steady < next[name]) continue;
        next[name] = steady + interval;
        ProbeProvider(name, *p);
      }
      lock.lock();
    }
  }

  // Caller holds t.mu.
  void SetBreakerGauge(TargetState& t, Timestamp now) {
    const BreakerState st = t.breaker.state(now);
    t.breaker_gauge->Set(st == BreakerState::kOpen ? 2.0 : st == BreakerState::kHalfOpen ? 1.0 : 0.0);
  }

  void ProbeProvider(const std::string& name, ProviderState& p) {
    std::vector<TargetState*> trial;
    const Timestamp now = clock_.Now();
    for (auto* t : targets_by_provider_[name]) {
      std::lock_guard lock(t->mu);
      if (t->breaker.state(now) == BreakerState::kHalfOpen && t->breaker.Allow(now)) trial.push_back(t);
    }
    if (trial.empty()) return;
    json::object body{{"model", p.config.model},
                      {"messages", json::array{json::object{{"role", "user"}, {"content", "ping"}}}},
                      {"max_tokens", 1}};
    ChatRequest req;
    auto r = p.provider->Chat(body, req, std::min(p.config.timeout.total, Duration(10000)));
    const bool healthy = r.ok() || !CountsAgainstBreaker(r.error().code);
    probes_.Add({{"provider", name}, {"outcome", healthy ? "ok" : std::string(ErrorCodeName(r.error().code))}}).Increment();
    const Timestamp after = clock_.Now();
    for (auto* t : trial) {
      std::lock_guard lock(t->mu);
      if (healthy) t->breaker.OnSuccess(after);
      else t->breaker.OnFailure(after);
      SetBreakerGauge(*t, after);
    }
    obs::Log(healthy ? obs::LogLevel::kInfo : obs::LogLevel::kWarn, "health probe",
             {{"provider", name}, {"healthy", healthy}, {"targets", static_cast<int64_t>(trial.size())}});
  }

  // The call's outcome in keel_gateway_requests_total. Names of unknown routes come from
  // clients: they share one series, so that they cannot grow the registry without bound.
  // A call that ends with an error first serves its stale answer, when it has one and
  // the error is of a class that fails over (every attempt failed so, or none could be
  // made: rate limits, open circuits, the deadline).
  Result<ChatResult> Count(Call& c, Error e) {
    if (c.stale && FailsOver(e.code)) {
      obs::LogDebug("stale answer served", {{"route", c.route->config.name}, {"error", ErrorCodeName(e.code)}});
      return FromCache(c, *c.stale, CacheStatus::kStale, clock_.Now());
    }
    CountCache(c, c.cache);
    if (c.route != nullptr) c.route->calls->Increment(&e);
    else unknown_route_calls_.Increment(&e);
    return e;
  }

  // An answer from the route's cache (a hit, or a stale answer after failures).
  Result<ChatResult> FromCache(Call& c, const detail::CacheEntry& entry, CacheStatus status, Timestamp now) {
    ChatResult r;
    const detail::CachedAnswer& a = *entry.answer;
    r.response = a.response;
    r.text = a.text;
    r.model = a.model;
    r.provider = a.provider;
    r.usage = a.usage;
    r.attempts = c.attempts;
    r.failovers = c.failovers;
    r.duration = std::chrono::duration_cast<Duration>(std::chrono::steady_clock::now() - c.start);
    r.cache = status;
    r.cache_age = std::max(Duration(0), std::chrono::duration_cast<Duration>(now - entry.stored_at));
    CountCache(c, status);
    c.route->calls->Increment(nullptr);
    return r;
  }

  static void CountCache(const Call& c, CacheStatus status) {
    if (c.route == nullptr || status == CacheStatus::kNone) return;
    if (auto* counter = c.route->cache_results[static_cast<std::size_t>(status)]) counter->Increment();
  }

  // Orders the route's targets by its strategy.
  std::vector<TargetState*> Order(RouteState& route) {
    std::vector<TargetState*> order;
    for (auto& t : route.targets) order.push_back(t.get());
    const std::string& s = route.config.strategy;
    if (s == "priority") {
      std::stable_sort(order.begin(), order.end(),
                       [](const TargetState* a, const TargetState* b) { return a->target.tier < b->target.tier; });
    } else if (s == "round_robin") {
      const std::size_t shift = route.next.fetch_add(1) % order.size();
      std::rotate(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(shift), order.end());
    } else if (s == "weighted") {
      // Weighted random order: each next target is drawn with probability ~ its weight.
      std::vector<TargetState*> out;
      while (!order.empty()) {
        double total = 0;
        for (auto* t : order) total += t->target.weight;
        std::size_t pick = 0;
        if (total > 0) {
          double x = random_.Uniform() * total;
          for (; pick + 1 < order.size(); ++pick) {
            x -= order[pick]->target.weight;
            if (x < 0) break;
          }
        }
        out.push_back(order[pick]);
        order.erase(order.begin() + static_cast<std::ptrdiff_t>(pick));
      }
      order = std::move(out);
    } else if (s == "latency" && route.latency) {
      const auto ranked = route.latency->Order(clock_.Now());
      for (std::size_t i = 0; i < ranked.size() && i < order.size(); ++i) order[i] = route.targets[ranked[i]].get();
    } else if (s == "least_busy") {
      const Timestamp now = clock_.Now();
      std::vector<std::pair<double, TargetState*>> keyed;
      for (auto* t : order) {
        auto& p = *t->provider;
        const double cap = p.config.limits.max_concurrency > 0 ? static_cast<double>(p.config.limits.max_concurrency) : 1000.0;
        double load = static_cast<double>(p.in_flight.load()) / cap;
        {
          std::lock_guard lock(p.mu);
          if (p.rpm) load += 1.0 - std::max(0.0, p.rpm->Available(now)) / p.rpm->capacity();
        }
        keyed.emplace_back(load, t);
      }
      std::stable_sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      for (std::size_t i = 0; i < keyed.size(); ++i) order[i] = keyed[i].second;
    }
    return order;
  }

  // The first target, in strategy order, that admits a call: untried targets before tried
  // ones, and no new target once max_failover distinct targets were tried. Admission takes
  // a concurrency slot and rate tokens; Release gives them back if the call is not made.
  TargetState* Pick(RouteState& route, const std::vector<TargetState*>& tried, bool may_repeat, int64_t min_window,
                    int64_t needed_window, int64_t estimate, Refusal& why, Duration& rate_wait, bool& shared) {
    const auto order = Order(route);
    const bool may_add = static_cast<int>(tried.size()) < route.config.max_failover;
    for (int pass = 0; pass < (may_repeat ? 2 : 1); ++pass) {
      for (auto* t : order) {
        const bool was_tried = std::find(tried.begin(), tried.end(), t) != tried.end();
        if (pass == 0 ? (was_tried || !may_add) : !was_tried) continue;
        const Refusal r = Admit(*t, needed_window, min_window, estimate, rate_wait, shared);
        if (r == Refusal::kNone) return t;
        if (why == Refusal::kNone || r == Refusal::kRateLimited) why = r;
        refusals_.Add({{"route", route.config.name}, {"provider", t->target.provider}, {"reason", RefusalName(r)}}).Increment();
      }
    }
    return nullptr;
  }

  static const char* RefusalName(Refusal r) {
    switch (r) {
      case Refusal::kCircuitOpen: return "circuit_open";
      case Refusal::kConcurrency: return "concurrency";
      case Refusal::kRateLimited: return "rate_limited";
      case Refusal::kWindow: return "context_window";
      case Refusal::kNone: break;
    }
    return "none";
  }

  // `shared` says whether the rate tokens were taken from Redis (and must go back there).
  Refusal Admit(TargetState& t, int64_t needed_window, int64_t min_window, int64_t estimate, Duration& rate_wait,
                bool& shared) {
    auto& p = *t.provider;
    shared = false;
    if (p.config.context_window < needed_window || p.config.context_window <= min_window) return Refusal::kWindow;
    const Timestamp now = clock_.Now();
    if (p.config.limits.max_concurrency > 0 && p.in_flight.load() >= p.config.limits.max_concurrency) {
      return Refusal::kConcurrency;
    }
    if (shared_limits_ && (p.rpm || p.tpm)) {
      if (auto r = AdmitShared(t, estimate, now, rate_wait, shared); r.has_value()) return *r;
      // Redis is not usable (counted as a fallback): this node's buckets decide.
    }
    {
      std::lock_guard lock(p.mu);
      Duration wait{0};
      if (p.rpm) wait = std::max(wait, p.rpm->TimeUntil(1, now));
      if (p.tpm) wait = std::max(wait, p.tpm->TimeUntil(static_cast<double>(std::min<int64_t>(estimate, p.config.limits.tpm)), now));
      if (wait.count() > 0) {
        rate_wait = std::min(rate_wait, wait);
        return Refusal::kRateLimited;
      }
    }
    {
      std::lock_guard lock(t.mu);
      if (!t.breaker.Allow(now)) return Refusal::kCircuitOpen;
    }
    {
      std::lock_guard lock(p.mu);
      if (p.rpm) p.rpm->TryTake(1, now);
      if (p.tpm) p.tpm->TryTake(static_cast<double>(std::min<int64_t>(estimate, p.config.limits.tpm)), now);
    }
    p.in_flight.fetch_add(1);
    return Refusal::kNone;
  }

  // Admission by the buckets in Redis, shared by every node; nullopt when Redis is not
  // usable. An open circuit is refused before Redis is asked (no round trip while a target
  // is failing); a half-open one takes its trial only once the tokens are taken, and gives
  // them back if another call has the trial. This node's buckets are charged too, so that
  // they start from this node's own recent use whenever they have to decide alone.
  std::optional<Refusal> AdmitShared(TargetState& t, int64_t estimate, Timestamp now, Duration& rate_wait,
                                     bool& shared) {
    auto& p = *t.provider;
    const auto& limits = p.config.limits;
    const double tokens = p.tpm ? static_cast<double>(std::min<int64_t>(estimate, limits.tpm)) : 0.0;
    {
      std::lock_guard lock(t.mu);
      if (t.breaker.state(now) == BreakerState::kOpen) return Refusal::kCircuitOpen;
    }
    auto wait = shared_limits_->Take(t.target.provider, p.rpm ? limits.rpm : 0, p.tpm ? limits.tpm : 0, tokens);
    if (!wait.ok()) return std::nullopt;
    if (wait->count() > 0) {
      rate_wait = std::min(rate_wait, *wait);
      return Refusal::kRateLimited;
    }
    bool allowed;
    {
      std::lock_guard lock(t.mu);
      allowed = t.breaker.Allow(now);
    }
    if (!allowed) {
      (void)shared_limits_->Adjust(t.target.provider, limits.rpm, limits.tpm, 1, tokens);
      return Refusal::kCircuitOpen;
    }
    {
      std::lock_guard lock(p.mu);
      if (p.rpm) p.rpm->Adjust(-1, now);
      if (p.tpm) p.tpm->Adjust(-tokens, now);
    }
    p.in_flight.fetch_add(1);
    shared = true;
    return Refusal::kNone;
  }

  // Undoes an admission whose call was not made (the breaker counts it as a success: the
  // target did nothing wrong). `shared`: as Admit said.
  void Release(TargetState& t, int64_t estimate, bool shared) {
    auto& p = *t.provider;
    p.in_flight.fetch_sub(1);
    const Timestamp now = clock_.Now();
    const double tokens = p.tpm ? static_cast<double>(std::min<int64_t>(estimate, p.config.limits.tpm)) : 0.0;
    {
      std::lock_guard lock(p.mu);
      if (p.rpm) p.rpm->Adjust(1, now);
      if (p.tpm) p.tpm->Adjust(tokens, now);
    }
    if (shared) (void)shared_limits_->Adjust(t.target.provider, p.config.limits.rpm, p.config.limits.tpm, 1, tokens);
    std::lock_guard lock(t.mu);
    t.breaker.OnSuccess(now);
  }

  Error NoTarget(RouteState& route, Refusal why, Duration rate_wait) {
    const std::string name = "route \"" + route.config.name + "\"";
    switch (why) {
      case Refusal::kRateLimited: {
        Error e(ErrorCode::kRateLimited, name + ": every target is at its rate limit (rpm/tpm); retry later");
        e.retry_after = rate_wait == Duration::max() ? Duration(1000) : std::max(Duration(1), rate_wait);
        return e;
      }
      case Refusal::kConcurrency: {
        Error e(ErrorCode::kOverloaded, name + ": every target is at its max_concurrency; retry later");
        e.retry_after = Duration(1000);
        return e;
      }
      case Refusal::kCircuitOpen: {
        Error e(ErrorCode::kOverloaded, name + ": the circuit of every target is open (they have been failing); retry later");
        Timestamp soonest = Timestamp::max();
        for (auto& t : route.targets) {
          std::lock_guard lock(t->mu);
          soonest = std::min(soonest, t->breaker.open_until());
        }
        e.retry_after = std::max(Duration(1000), std::chrono::duration_cast<Duration>(soonest - clock_.Now()));
        return e;
      }
      default:
        return Error(ErrorCode::kContextLength, name + ": no target has a context window large enough", "messages");
    }
  }

  // Readies the attempt Next chose: the body naming the target's model, the time left.
  void Prepare(Call& c) {
    c.body = c.req.body;
    c.body["model"] = c.target->provider->config.model;
    c.t0 = std::chrono::steady_clock::now();
    c.left = std::max(Duration(1), std::chrono::duration_cast<Duration>(c.deadline - c.t0));
  }

  // Makes the attempt Next chose, blocking.
  Result<ChatResult> CallTarget(Call& c) {
    Prepare(c);
    const ChatRequest& req = c.req;
    TargetState& t = *c.target;
    auto& p = *t.provider;
    Result<ChatResult> r = Error(ErrorCode::kInternal, "not called");
    if (c.embed) {
      r = p.provider->Embed(c.body, req, c.left);
    } else if (c.sink == nullptr) {
      r = p.provider->Chat(c.body, req, c.left);
    } else {
      const json::value* opts = req.body.if_contains("stream_options");
      const json::value* wants = opts && opts->is_object() ? opts->get_object().if_contains("include_usage") : nullptr;
      const bool include_usage = wants && wants->is_bool() && wants->get_bool();
      r = p.provider->ChatStream(c.body, req, c.left, [&](const json::object& chunk) {
        const auto* choices = chunk.if_contains("choices");
        const bool usage_only = choices && choices->is_array() && choices->get_array().empty();
        if (usage_only && !include_usage) return true;
        if (!c.forwarded) {
          c.forwarded = true;
          c.ttft = std::chrono::duration_cast<Duration>(std::chrono::steady_clock::now() - c.start);
          p.metrics.ttft->Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - c.t0).count());
        }
        return (*c.sink)(chunk);
      });
    }
    return Finish(c, std::move(r));
  }

  // Accounts for an attempt's outcome: the target's concurrency slot, latency, breaker,
  // metrics, and the real usage instead of the estimate.
  Result<ChatResult> Finish(Call& c, Result<ChatResult> r) {
    TargetState& t = *c.target;
    auto& p = *t.provider;
    const int64_t estimate = c.estimate;
    const auto elapsed = std::chrono::steady_clock::now() - c.t0;
    p.in_flight.fetch_sub(1);
    const Timestamp now = clock_.Now();
    const double secs = std::chrono::duration<double>(elapsed).count();
    p.metrics.latency->Observe(secs);
    const bool unhealthy = !r.ok() && CountsAgainstBreaker(r.error().code);
    {
      std::lock_guard lock(t.mu);
      if (unhealthy) t.breaker.OnFailure(now);
      else t.breaker.OnSuccess(now);
      SetBreakerGauge(t, now);
    }
    // The latency strategy's sample: an answer's latency, or a timeout's (a lower bound).
    if (c.route->latency && (r.ok() || r.error().code == ErrorCode::kTimeout)) {
      c.route->latency->Observe(t.index, secs * 1000.0, now);
      if (const auto avg = c.route->latency->Average(t.index)) {
        prometheus::Gauge* g = t.latency_gauge.load(std::memory_order_acquire);
        if (g == nullptr) {
          g = &latency_average_.Add({{"route", t.route}, {"provider", t.target.provider}});  // same series each time
          t.latency_gauge.store(g, std::memory_order_release);
        }
        g->Set(*avg / 1000.0);
      }
    }
    t.requests->Increment(r.ok() ? nullptr : &r.error());
    if (!r.ok()) {
      // Foreign text (an upstream's error body, a transport message naming the URL) never
      // carries a configured secret further: client errors, run errors, events, logs.
      Error e = std::move(r).error();
      e.message = RedactSecrets(e.message);
      return e;
    }
    // Charge the real usage instead of the estimate.
    double in = 0, out = 0;
    if (r->usage.is_object()) {
      in = NumberOr(r->usage.get_object().if_contains("prompt_tokens"), 0);
      out = NumberOr(r->usage.get_object().if_contains("completion_tokens"), 0);
      p.metrics.tokens_in->Increment(in);
      p.metrics.tokens_out->Increment(out);
      if (p.tpm) {
        const double delta = static_cast<double>(std::min<int64_t>(estimate, p.config.limits.tpm)) - (in + out);
        {
          std::lock_guard lock(p.mu);
          p.tpm->Adjust(delta, now);
        }
        if (c.shared && delta != 0) (void)shared_limits_->Adjust(t.target.provider, 0, p.config.limits.tpm, 0, delta);
      }
    }
    r->cost = in / 1e6 * p.config.cost.input_per_mtok + out / 1e6 * p.config.cost.output_per_mtok;
    if (r->cost > 0) p.metrics.cost->Increment(r->cost);
    r->provider = t.target.provider;
    if (r->model.empty()) r->model = p.config.model;
    return r;
  }

  prometheus::Registry& registry_;
  const Clock& clock_;
  Random& random_;
  prometheus::Family<prometheus::Counter>& calls_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Family<prometheus::Histogram>& ttft_;
  prometheus::Family<prometheus::Counter>& tokens_;
  prometheus::Family<prometheus::Counter>& cost_;
  prometheus::Family<prometheus::Counter>& retries_;
  prometheus::Family<prometheus::Counter>& failovers_;
  prometheus::Family<prometheus::Counter>& refusals_;
  prometheus::Family<prometheus::Gauge>& breaker_state_;
  prometheus::Family<prometheus::Gauge>& latency_average_;
  prometheus::Family<prometheus::Counter>& probes_;
  prometheus::Family<prometheus::Counter>& cache_total_;
  prometheus::Family<prometheus::Counter>& cache_corrupt_;
  // With `redis` configured: the client, and the rpm/tpm buckets it keeps. Null without.
  std::unique_ptr<detail::RedisClient> redis_;
  std::unique_ptr<detail::SharedLimits> shared_limits_;
  std::map<std::string, std::unique_ptr<ProviderState>> providers_;
  std::map<std::string, std::unique_ptr<RouteState>> routes_;
  OutcomeCounters unknown_route_calls_{calls_, {{"route", "(unknown)"}}};

  // Active health checks.
  std::map<std::string, std::vector<TargetState*>> targets_by_provider_;
  std::mutex probe_mu_;
  std::condition_variable probe_cv_;
  bool probe_stop_ = false;  // GUARDED_BY(probe_mu_)
  std::thread prober_;

  // Where ChatAsync runs the calls of providers that can only block; none when every
  // provider is asynchronous.
  std::unique_ptr<net::WorkerPool> blocking_;
};

}  // namespace

Result<std::unique_ptr<Gateway>> Gateway::Create(const Config& config, prometheus::Registry& registry,
                                                 const Clock& clock, Random& random) {
  auto g = std::make_unique<GatewayImpl>(registry, clock, random);
  KEEL_RETURN_IF_ERROR(g->Init(config));
  return std::unique_ptr<Gateway>(std::move(g));
}

}  // namespace keel::gateway
