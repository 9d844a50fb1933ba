#pragma once
// Admission of a call by a route's targets, private to keel_gateway (docs/gateway.md, "How
// a call is served", 2): a target takes a call only if the prompt fits its context window,
// it is below max_concurrency, its rpm/tpm buckets hold the request and its estimated
// tokens (this node's buckets, or Redis's when shared limits are configured and usable),
// and its circuit breaker lets the call through. Admitting takes a concurrency slot and
// the rate tokens; every admission is followed by exactly one Release (the call was not
// made) or Done (it was).
//
// Thread-safe: state is the route table's, under its locks.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/error.h"
#include "keel/core/random.h"
#include "route_table.h"
#include "shared_limits.h"

namespace keel::gateway::detail {

/// Why a target did not take a call: the `reason` of keel_gateway_refusals_total.
enum class Refusal {
  kNone,
  kCircuitOpen,  // "circuit_open"
  kConcurrency,  // "concurrency": at max_concurrency
  kRateLimited,  // "rate_limited": rpm or tpm
  kWindow,       // "context_window": the prompt does not fit, or a larger window is needed
  kRetryBudget,  // "retry_budget": not Admit's; the route's retry budget refused a retry
};
std::string_view RefusalName(Refusal refusal);

/// What a call asks of the targets of its route.
struct AdmissionAsk {
  /// Targets this call already tried, in the order tried.
  const std::vector<TargetState*>* tried = nullptr;
  /// Whether a tried target may take the call again (after the untried ones).
  bool may_repeat = true;
  /// Targets never to take the call again (one that timed out, one whose guessed window
  /// was too small); null: none.
  const std::vector<TargetState*>* excluded = nullptr;
  /// A target asked first, before the untried ones (the same-target rules of
  /// docs/gateway.md: a short Retry-After, a 5xx); null: the usual order.
  TargetState* prefer = nullptr;
  /// After a context_length error: only windows larger than this (0: any).
  int64_t min_window = 0;
  /// The window the prompt needs, in estimated tokens.
  int64_t needed_window = 0;
  /// The tokens to take from tpm buckets: the prompt's estimate plus max_tokens.
  int64_t estimate = 0;
};

/// The outcome of Pick: an admitted target, or why none was.
struct Admitted {
  TargetState* target = nullptr;  // null: no target admitted the call
  /// The rate tokens came from Redis, and go back there on Release or Done.
  bool shared = false;
  /// Without a target: the reason to report (a rate limit over any other; else the first).
  Refusal why = Refusal::kNone;
  /// Without a target, rate-limited: the shortest wait until a bucket holds enough.
  Duration rate_wait = Duration::max();
};

class Admission {
 public:
  /// `clock` and `random` must outlive this, as must `shared` (null: this node's buckets).
  Admission(const Clock& clock, Random& random, SharedLimits* shared);

  /// The first target of the route, in its strategy's order, that admits the call:
  /// ask.prefer first, then untried targets before tried ones (when ask.may_repeat), and
  /// no new target once max_failover distinct targets were tried; never an excluded one. Every
  /// target passed over is counted in keel_gateway_refusals_total.
  Admitted Pick(RouteState& route, const AdmissionAsk& ask);

  /// Undoes an admission whose call was not made: the slot and tokens go back, and the
  /// breaker counts it as a success (the target did nothing wrong).
  void Release(TargetState& t, int64_t estimate, bool shared);

  /// Ends an admission whose call was made: frees the concurrency slot and, when the
  /// provider reported it, charges the tpm bucket `used_tokens` instead of the estimate.
  void Done(TargetState& t, int64_t estimate, bool shared, std::optional<double> used_tokens);

  /// The error of a call that no target admitted before any attempt: kRateLimited with the
  /// wait as retry_after, kOverloaded (concurrency, retry after 1s; open circuits, retry
  /// after the soonest half-open, at least 1s), else kContextLength.
  Error NoTarget(RouteState& route, Refusal why, Duration rate_wait) const;

 private:
  Refusal Admit(TargetState& t, const AdmissionAsk& ask, Timestamp now, Duration& rate_wait,
                bool& shared);
  std::optional<Refusal> AdmitShared(TargetState& t, int64_t estimate, Timestamp now,
                                     Duration& rate_wait, bool& shared);

  const Clock& clock_;
  Random& random_;
  SharedLimits* const shared_;
};

}  // namespace keel::gateway::detail
