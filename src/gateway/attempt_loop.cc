#include "attempt_loop.h"

#include <algorithm>

#include "keel/core/backoff.h"
#include "keel/core/secrets.h"
#include "keel/obs/log.h"

namespace keel::gateway::detail {

static_assert(kVerdictCount <= LabelledCounters::kMaxValues);

std::string_view VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kFirstAttempt:
      return "first_attempt";
    case Verdict::kRetrySameTarget:
      return "retry_same_target";
    case Verdict::kFailover:
      return "failover";
    case Verdict::kAnswered:
      return "answered";
    case Verdict::kNotRetryable:
      return "not_retryable";
    case Verdict::kStreamBroken:
      return "stream_broken";
    case Verdict::kNoAttemptsLeft:
      return "no_attempts_left";
    case Verdict::kDeadlinePassed:
      return "deadline_passed";
    case Verdict::kDeadlineTooShort:
      return "deadline_too_short";
    case Verdict::kNoBudget:
      return "no_budget";
    case Verdict::kNoTarget:
      return "no_target";
    case Verdict::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

bool MakesAttempt(Verdict verdict) {
  return verdict == Verdict::kFirstAttempt || verdict == Verdict::kRetrySameTarget ||
         verdict == Verdict::kFailover;
}

bool CarriesToken(const json::object& chunk) {
  const json::value* choices = chunk.if_contains("choices");
  if (choices == nullptr || !choices->is_array()) return false;
  for (const auto& ch : choices->get_array()) {
    if (!ch.is_object()) continue;
    const auto& o = ch.get_object();
    if (const auto* f = o.if_contains("finish_reason"); f && !f->is_null()) return true;
    const auto* d = o.if_contains("delta");
    if (d == nullptr || !d->is_object()) continue;
    const auto& delta = d->get_object();
    if (!MessageText(delta.if_contains("content")).empty()) return true;
    if (const auto* t = delta.if_contains("tool_calls");
        t && t->is_array() && !t->get_array().empty())
      return true;
    if (const auto* r = delta.if_contains("refusal");
        r && r->is_string() && !r->get_string().empty())
      return true;
  }
  return false;
}

namespace {

// The attempt goes to the target Pick admitted.
void Take(Call& c, const Admitted& a) {
  if (std::find(c.tried.begin(), c.tried.end(), a.target) == c.tried.end())
    c.tried.push_back(a.target);
  if (a.target == c.previous && c.last && c.last->code == ErrorCode::kServerError) {
    ++c.same_5xx;
  } else {
    c.same_5xx = 0;
  }
  c.previous = a.target;
  c.target = a.target;
  c.shared = a.shared;
  ++c.attempts;
}

}  // namespace

AttemptLoop::AttemptLoop(const RouteTable& table, Admission& admission, GatewayMetrics& metrics,
                         const Clock& clock, Random& random)
    : table_(table), admission_(admission), metrics_(metrics), clock_(clock), random_(random) {}

bool AttemptLoop::Begin(Call& c) {
  const ChatRequest& req = c.req;
  RouteState* route = table_.Find(req.route);
  if (route == nullptr) {
    c.result = FailOrServeStale(
        c,
        Error(ErrorCode::kNotFound, "no route or provider named \"" + req.route + "\"", "model"));
    return false;
  }
  c.route = route;
  c.start = clock_.SteadyNow();
  c.deadline = c.start + std::min(req.timeout, route->config.timeout);
  c.prompt_tokens = EstimatePromptTokens(req.body);
  c.estimate =
      c.prompt_tokens + static_cast<int64_t>(NumberOr(req.body.if_contains("max_tokens"), 0));

  int64_t largest = 0;
  for (const auto& t : route->targets)
    largest = std::max(largest, t->provider->config.context_window);
  if (c.prompt_tokens > largest) {
    c.result = FailOrServeStale(
        c, Error(ErrorCode::kContextLength,
                 "the prompt (about " + std::to_string(c.prompt_tokens) +
                     " tokens) is longer than the context window of every target of route \"" +
                     req.route + "\" (largest: " + std::to_string(largest) + ")",
                 "messages"));
    return false;
  }
  const Timestamp now = clock_.Now();
  if (auto hit = c.cache.Open(*route, req, c.stream, c.embed, now)) {
    c.result = ServeCached(c, *hit, CacheStatus::kHit, now);
    return false;
  }
  {
    std::lock_guard lock(route->budget_mu);
    route->budget.OnRequest(clock_.Now());
  }
  c.max_attempts =
      req.max_attempts > 0 ? std::min(req.max_attempts, 10) : route->config.retry.max_attempts;
  if (req.failover_only) {
    c.max_attempts =
        std::min<int>(route->config.max_failover, static_cast<int>(route->targets.size()));
  }
  return true;
}

Verdict AttemptLoop::Next(Call& c) {
  const Verdict v = Decide(c);
  c.route->metrics.decisions.Increment(static_cast<std::size_t>(v), VerdictName(v));
  return v;
}

Verdict AttemptLoop::Decide(Call& c) {
  const ChatRequest& req = c.req;
  RouteState& route = *c.route;
  c.target = nullptr;
  c.delay = Duration(0);
  if (c.result) return Verdict::kAnswered;  // OnResult kept the answer
  if (c.last) {
    if (c.forwarded) {
      // Part of the answer is out: it cannot be taken back or continued elsewhere.
      c.last->message = "the stream failed after its first token: " + c.last->message;
      c.result = FailOrServeStale(c, std::move(*c.last));
      return Verdict::kStreamBroken;
    }
    if (c.last->code != ErrorCode::kContextLength && !FailsOver(c.last->code)) {
      c.result = End(c);
      return Verdict::kNotRetryable;
    }
  }
  if (Cancelled(req)) {
    c.result = FailOrServeStale(
        c, Error(ErrorCode::kCancelled, "route \"" + req.route + "\": the call was cancelled"));
    return Verdict::kCancelled;
  }
  if (c.attempts >= c.max_attempts) {
    c.result = End(c);
    return Verdict::kNoAttemptsLeft;
  }
  if (clock_.SteadyNow() >= c.deadline) {
    c.result = End(c);
    return Verdict::kDeadlinePassed;
  }
  AdmissionAsk ask;
  ask.tried = &c.tried;
  ask.excluded = &c.excluded;
  ask.may_repeat = !req.failover_only;
  ask.prefer = SameTargetFirst(c) ? c.previous : nullptr;
  ask.min_window = c.min_window;
  ask.needed_window = std::max(c.prompt_tokens, c.min_window + 1);
  ask.estimate = c.estimate;
  const Admitted a = admission_.Pick(route, ask);
  if (a.target == nullptr) {
    // After a failure, the last failure says more than "nothing is available".
    c.result =
        c.last ? End(c) : FailOrServeStale(c, admission_.NoTarget(route, a.why, a.rate_wait));
    return Verdict::kNoTarget;
  }
  if (c.attempts == 0) {
    Take(c, a);
    return Verdict::kFirstAttempt;
  }
  const bool same = a.target == c.previous;
  Duration delay{0};
  if (same) {
    // The same target again: back off first, honouring its Retry-After, if the deadline
    // leaves time for it.
    delay = ComputeBackoff(route.config.retry.backoff, c.attempts, c.last->retry_after, random_);
    if (clock_.SteadyNow() + delay >= c.deadline) {
      admission_.Release(*a.target, c.estimate, a.shared);
      c.result = End(c);
      return Verdict::kDeadlineTooShort;
    }
  }
  bool allowed;
  {
    std::lock_guard lock(route.budget_mu);
    allowed = route.budget.TryRetry(clock_.Now());
  }
  if (!allowed) {
    admission_.Release(*a.target, c.estimate, a.shared);
    a.target->metrics.refusals.Increment(static_cast<std::size_t>(Refusal::kRetryBudget),
                                         RefusalName(Refusal::kRetryBudget));
    c.last->message += " (no retry: the route's retry budget is spent)";
    c.result = End(c);
    return Verdict::kNoBudget;
  }
  route.metrics.retries->Increment();
  Take(c, a);
  if (same) {
    c.delay = delay;
    return Verdict::kRetrySameTarget;
  }
  ++c.failovers;
  route.metrics.failovers->Increment();
  return Verdict::kFailover;
}

bool AttemptLoop::SameTargetFirst(const Call& c) const {
  if (!c.last || c.previous == nullptr || c.req.failover_only) return false;
  const RouteConfig& rc = c.route->config;
  switch (c.last->code) {
    case ErrorCode::kRateLimited:
      // A short Retry-After that the deadline leaves time for: the target will be free
      // again soon, and it may be the one the caller prefers.
      return c.last->retry_after && *c.last->retry_after <= rc.same_target_retry_after_max &&
             clock_.SteadyNow() + *c.last->retry_after < c.deadline;
    case ErrorCode::kServerError:
      // One 500 or 502 is often a blip: the same target again, a bounded number of times.
      return c.same_5xx < rc.same_target_on_5xx;
    default:
      // overloaded (503, 529), network (resets), timeouts, invalid_output: elsewhere first.
      return false;
  }
}

void AttemptLoop::Prepare(Call& c, Timer& timer) {
  c.body = c.req.body;
  c.body["model"] = c.target->provider->config.model;
  c.t0 = clock_.SteadyNow();
  c.left = std::max(Duration(1), std::chrono::duration_cast<Duration>(c.deadline - c.t0));
  c.prelude.clear();
  c.watch.reset();
  c.attempt_req.reset();
  const Duration first_token = c.target->provider->config.timeout.first_token;
  if (c.stream && first_token.count() > 0 && first_token < c.left) {
    auto watch = std::make_shared<FirstTokenWatch>();
    c.attempt_req.emplace(c.req);
    c.attempt_req->cancel = CancelSignal::Either(c.req.cancel, watch->own);
    c.watch = watch;
    timer.After(first_token, [watch] {
      int waiting = FirstTokenWatch::kWaiting;
      if (watch->state.compare_exchange_strong(waiting, FirstTokenWatch::kExpired))
        watch->own->Cancel();
    });
  }
}

void AttemptLoop::Abandon(Call& c) {
  if (c.target == nullptr) return;
  admission_.Release(*c.target, c.estimate, c.shared);
  c.target = nullptr;
  c.delay = Duration(0);
}

bool AttemptLoop::Cancelled(const ChatRequest& req) {
  return (req.cancelled != nullptr && req.cancelled->load()) ||
         (req.cancel && req.cancel->cancelled());
}

void AttemptLoop::OnFirstChunk(Call& c) {
  c.forwarded = true;
  const SteadyTime now = clock_.SteadyNow();
  c.ttft = std::chrono::duration_cast<Duration>(now - c.start);
  c.target->provider->metrics.ttft->Observe(std::chrono::duration<double>(now - c.t0).count());
}

bool AttemptLoop::Relay(Call& c, const json::object& chunk, const ChunkOut& out) {
  if (!c.forwarded) {
    if (c.watch) {
      if (!CarriesToken(chunk)) {
        c.prelude.push_back(chunk);
        return c.watch->state.load() != FirstTokenWatch::kExpired;
      }
      int waiting = FirstTokenWatch::kWaiting;
      if (!c.watch->state.compare_exchange_strong(waiting, FirstTokenWatch::kSeen)) return false;
    }
    OnFirstChunk(c);
    for (const auto& held : c.prelude) {
      if (!out(held)) return false;
    }
    c.prelude.clear();
  }
  return out(chunk);
}

void AttemptLoop::Flush(Call& c, const ChunkOut& out) {
  if (c.prelude.empty()) return;
  if (!c.forwarded) OnFirstChunk(c);
  for (const auto& held : c.prelude) {
    if (!out(held)) break;
  }
  c.prelude.clear();
}

void AttemptLoop::OnResult(Call& c, Result<ChatResult> r) {
  if (c.watch) {
    // The attempt is over: a timer still pending does nothing.
    int waiting = FirstTokenWatch::kWaiting;
    const bool expired = !c.watch->state.compare_exchange_strong(waiting, FirstTokenWatch::kSeen) &&
                         waiting == FirstTokenWatch::kExpired;
    if (expired && !r.ok() && !c.forwarded && !Cancelled(c.req)) {
      r = Error(ErrorCode::kTimeout,
                "provider " + c.target->target.provider +
                    " sent no token within its first_token timeout of " +
                    std::to_string(c.target->provider->config.timeout.first_token.count()) + "ms");
    }
    c.watch.reset();
    c.attempt_req.reset();
  }
  r = Finish(c, std::move(r));
  if (r.ok()) {
    r->attempts = c.attempts;
    r->failovers = c.failovers;
    r->duration = Elapsed(c);
    r->time_to_first_token = c.ttft;
    r->cache = c.cache.status();
    c.cache.Store(*r, clock_.Now());
    c.route->metrics.CountCache(c.cache.status());
    c.route->metrics.calls.Increment(nullptr);
    c.result = std::move(r);
    return;
  }
  c.last = std::move(r).error();
  const ProviderConfig& pc = c.target->provider->config;
  if (c.last->code == ErrorCode::kContextLength) {
    if (pc.context_window_set) {
      c.min_window = std::max(c.min_window, pc.context_window);
    } else {
      // Its window is a guess: another target may well have a larger one, whatever its
      // own (guessed) window says; only this one is not asked again.
      c.excluded.push_back(c.target);
    }
  } else if (c.last->code == ErrorCode::kTimeout && !c.forwarded) {
    // It stayed silent (connect, first byte, first token, or the whole call): asking it
    // again within this call would spend the deadline on it twice.
    c.excluded.push_back(c.target);
  }
}

Result<ChatResult> AttemptLoop::Finish(Call& c, Result<ChatResult> r) {
  TargetState& t = *c.target;
  auto& p = *t.provider;
  const double secs = std::chrono::duration<double>(clock_.SteadyNow() - c.t0).count();
  std::optional<double> used;
  double in = 0, out = 0;
  if (r.ok() && r->usage.is_object()) {
    in = NumberOr(r->usage.get_object().if_contains("prompt_tokens"), 0);
    out = NumberOr(r->usage.get_object().if_contains("completion_tokens"), 0);
    used = in + out;
  }
  admission_.Done(t, c.estimate, c.shared, used);
  const Timestamp now = clock_.Now();
  p.metrics.latency->Observe(secs);
  RecordHealth(t, r.ok() || !CountsAgainstBreaker(r.error().code), now);
  // The latency strategy's sample: an answer's latency, or a timeout's (a lower bound).
  if (c.route->latency && (r.ok() || r.error().code == ErrorCode::kTimeout)) {
    c.route->latency->Observe(t.index, secs * 1000.0, now);
    if (const auto avg = c.route->latency->Average(t.index))
      t.metrics.SetLatencyAverage(*avg / 1000.0);
  }
  t.metrics.requests.Increment(r.ok() ? nullptr : &r.error());
  if (!r.ok()) {
    // Foreign text (an upstream's error body, a transport message naming the URL) never
    // carries a configured secret further: client errors, run errors, events, logs.
    Error e = std::move(r).error();
    e.message = RedactSecrets(e.message);
    return e;
  }
  if (used) {
    p.metrics.tokens_in->Increment(in);
    p.metrics.tokens_out->Increment(out);
  }
  r->cost = in / 1e6 * p.config.cost.input_per_mtok + out / 1e6 * p.config.cost.output_per_mtok;
  if (r->cost > 0) p.metrics.cost->Increment(r->cost);
  r->provider = t.target.provider;
  if (r->model.empty()) r->model = p.config.model;
  return r;
}

Result<ChatResult> AttemptLoop::End(Call& c) {
  const ChatRequest& req = c.req;
  if (!c.last) {
    return FailOrServeStale(
        c, Error(ErrorCode::kTimeout,
                 "route \"" + req.route + "\": the deadline of " +
                     std::to_string(std::min(req.timeout, c.route->config.timeout).count()) +
                     "ms passed before any target answered"));
  }
  if (clock_.SteadyNow() >= c.deadline && FailsOver(c.last->code)) {
    c.last->code = ErrorCode::kTimeout;
    c.last->message = "route \"" + req.route + "\": the deadline passed after " +
                      std::to_string(c.attempts) + " attempts; last failure: " + c.last->message;
  }
  return FailOrServeStale(c, std::move(*c.last));
}

Result<ChatResult> AttemptLoop::FailOrServeStale(Call& c, Error e) {
  if (const CacheEntry* stale = c.cache.stale(); stale != nullptr && FailsOver(e.code)) {
    obs::LogDebug("stale answer served",
                  {{"route", c.route->config.name}, {"error", ErrorCodeName(e.code)}});
    return ServeCached(c, *stale, CacheStatus::kStale, clock_.Now());
  }
  if (c.route == nullptr) {
    metrics_.unknown_route_calls.Increment(&e);
    return e;
  }
  c.route->metrics.CountCache(c.cache.status());
  c.route->metrics.calls.Increment(&e);
  return e;
}

Result<ChatResult> AttemptLoop::ServeCached(Call& c, const CacheEntry& entry, CacheStatus status,
                                            Timestamp now) {
  ChatResult r = CallCache::Answer(entry, status, now);
  r.attempts = c.attempts;
  r.failovers = c.failovers;
  r.duration = Elapsed(c);
  c.route->metrics.CountCache(status);
  c.route->metrics.calls.Increment(nullptr);
  return r;
}

Duration AttemptLoop::Elapsed(const Call& c) const {
  return std::chrono::duration_cast<Duration>(clock_.SteadyNow() - c.start);
}

}  // namespace keel::gateway::detail
