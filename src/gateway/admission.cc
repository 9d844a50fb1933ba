#include "admission.h"

#include <algorithm>

namespace keel::gateway::detail {

static_assert(static_cast<std::size_t>(Refusal::kRetryBudget) < LabelledCounters::kMaxValues);

std::string_view RefusalName(Refusal refusal) {
  switch (refusal) {
    case Refusal::kCircuitOpen:
      return "circuit_open";
    case Refusal::kConcurrency:
      return "concurrency";
    case Refusal::kRateLimited:
      return "rate_limited";
    case Refusal::kWindow:
      return "context_window";
    case Refusal::kRetryBudget:
      return "retry_budget";
    case Refusal::kNone:
      break;
  }
  return "none";
}

namespace {

// The tokens an admission takes from the tpm bucket: the estimate, at most the whole bucket.
double TpmTokens(const ProviderState& p, int64_t estimate) {
  return p.tpm ? static_cast<double>(std::min<int64_t>(estimate, p.config.limits.tpm)) : 0.0;
}

}  // namespace

Admission::Admission(const Clock& clock, Random& random, SharedLimits* shared)
    : clock_(clock), random_(random), shared_(shared) {}

Admitted Admission::Pick(RouteState& route, const AdmissionAsk& ask) {
  static const std::vector<TargetState*> kNone;
  const std::vector<TargetState*>& tried = ask.tried ? *ask.tried : kNone;
  const Timestamp now = clock_.Now();
  const auto order = Order(route, now, random_);
  const std::vector<TargetState*>& excluded = ask.excluded ? *ask.excluded : kNone;
  const bool may_add = static_cast<int>(tried.size()) < route.config.max_failover;
  auto is_in = [](const std::vector<TargetState*>& v, const TargetState* t) {
    return std::find(v.begin(), v.end(), t) != v.end();
  };
  Admitted out;
  // Pass 0: the preferred target; 1: untried ones; 2: tried ones again.
  for (int pass = ask.prefer ? 0 : 1; pass < (ask.may_repeat ? 3 : 2); ++pass) {
    for (auto* t : order) {
      if (is_in(excluded, t)) continue;
      const bool was_tried = is_in(tried, t);
      if (pass == 0) {
        if (t != ask.prefer) continue;
      } else if (t == ask.prefer) {
        continue;  // already asked
      } else if (pass == 1 ? (was_tried || !may_add) : !was_tried) {
        continue;
      }
      bool shared = false;
      const Refusal r = Admit(*t, ask, now, out.rate_wait, shared);
      if (r == Refusal::kNone) {
        out.target = t;
        out.shared = shared;
        return out;
      }
      if (out.why == Refusal::kNone || r == Refusal::kRateLimited) out.why = r;
      t->metrics.refusals.Increment(static_cast<std::size_t>(r), RefusalName(r));
    }
  }
  return out;
}

Refusal Admission::Admit(TargetState& t, const AdmissionAsk& ask, Timestamp now,
                         Duration& rate_wait, bool& shared) {
  auto& p = *t.provider;
  shared = false;
  if (p.config.context_window < ask.needed_window || p.config.context_window <= ask.min_window) {
    return Refusal::kWindow;
  }
  if (p.config.limits.max_concurrency > 0 &&
      p.in_flight.load() >= p.config.limits.max_concurrency) {
    return Refusal::kConcurrency;
  }
  if (shared_ != nullptr && (p.rpm || p.tpm)) {
    if (auto r = AdmitShared(t, ask.estimate, now, rate_wait, shared); r.has_value()) return *r;
    // Redis is not usable (counted as a fallback): this node's buckets decide.
  }
  const double tokens = TpmTokens(p, ask.estimate);
  {
    std::lock_guard lock(p.mu);
    Duration wait{0};
    if (p.rpm) wait = std::max(wait, p.rpm->TimeUntil(1, now));
    if (p.tpm) wait = std::max(wait, p.tpm->TimeUntil(tokens, now));
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
    if (p.tpm) p.tpm->TryTake(tokens, now);
  }
  p.in_flight.fetch_add(1);
  return Refusal::kNone;
}

// Admission by the buckets in Redis, shared by every node; nullopt when Redis is not usable.
// An open circuit is refused before Redis is asked (no round trip while a target is
// failing); a half-open one takes its trial only once the tokens are taken, and gives them
// back if another call has the trial. This node's buckets are charged too, so that they
// start from this node's own recent use whenever they have to decide alone.
std::optional<Refusal> Admission::AdmitShared(TargetState& t, int64_t estimate, Timestamp now,
                                              Duration& rate_wait, bool& shared) {
  auto& p = *t.provider;
  const auto& limits = p.config.limits;
  const double tokens = TpmTokens(p, estimate);
  {
    std::lock_guard lock(t.mu);
    if (t.breaker.state(now) == BreakerState::kOpen) return Refusal::kCircuitOpen;
  }
  auto wait =
      shared_->Take(t.target.provider, p.rpm ? limits.rpm : 0, p.tpm ? limits.tpm : 0, tokens);
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
    (void)shared_->Adjust(t.target.provider, limits.rpm, limits.tpm, 1, tokens);
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

void Admission::Release(TargetState& t, int64_t estimate, bool shared) {
  auto& p = *t.provider;
  p.in_flight.fetch_sub(1);
  const Timestamp now = clock_.Now();
  const double tokens = TpmTokens(p, estimate);
  {
    std::lock_guard lock(p.mu);
    if (p.rpm) p.rpm->Adjust(1, now);
    if (p.tpm) p.tpm->Adjust(tokens, now);
  }
  if (shared) {
    (void)shared_->Adjust(t.target.provider, p.config.limits.rpm, p.config.limits.tpm, 1, tokens);
  }
  std::lock_guard lock(t.mu);
  t.breaker.OnSuccess(now);
}

void Admission::Done(TargetState& t, int64_t estimate, bool shared,
                     std::optional<double> used_tokens) {
  auto& p = *t.provider;
  p.in_flight.fetch_sub(1);
  if (!used_tokens || !p.tpm) return;
  const double delta = TpmTokens(p, estimate) - *used_tokens;
  {
    std::lock_guard lock(p.mu);
    p.tpm->Adjust(delta, clock_.Now());
  }
  if (shared && delta != 0) {
    (void)shared_->Adjust(t.target.provider, 0, p.config.limits.tpm, 0, delta);
  }
}

Error Admission::NoTarget(RouteState& route, Refusal why, Duration rate_wait) const {
  const std::string name = "route \"" + route.config.name + "\"";
  switch (why) {
    case Refusal::kRateLimited: {
      Error e(ErrorCode::kRateLimited,
              name + ": every target is at its rate limit (rpm/tpm); retry later");
      e.retry_after =
          rate_wait == Duration::max() ? Duration(1000) : std::max(Duration(1), rate_wait);
      return e;
    }
    case Refusal::kConcurrency: {
      Error e(ErrorCode::kOverloaded,
              name + ": every target is at its max_concurrency; retry later");
      e.retry_after = Duration(1000);
      return e;
    }
    case Refusal::kCircuitOpen: {
      Error e(ErrorCode::kOverloaded,
              name + ": the circuit of every target is open (they have been failing); retry later");
      Timestamp soonest = Timestamp::max();
      for (auto& t : route.targets) {
        std::lock_guard lock(t->mu);
        soonest = std::min(soonest, t->breaker.open_until());
      }
      e.retry_after =
          std::max(Duration(1000), std::chrono::duration_cast<Duration>(soonest - clock_.Now()));
      return e;
    }
    default:
      return Error(ErrorCode::kContextLength,
                   name + ": no target has a context window large enough", "messages");
  }
}

}  // namespace keel::gateway::detail
