#pragma once
// The gateway's resilience loop, private to keel_gateway (docs/gateway.md, "How a call is
// served"): the bookkeeping of one call through a route, shared by the blocking driver
// and the asynchronous one (gateway.cc), which only make the provider calls and wait out
// the backoffs on the injected Timer. The loop:
//
//   if Begin(call):                       route, windows, cache, budget, max attempts
//     while MakesAttempt(Next(call)):     one decision, one Verdict, counted
//       wait call.delay on the timer      > 0 only before a retry of the same target
//       Prepare(call); provider call with call.body, call.left, call.attempt_request(),
//                      its stream's chunks through Relay (and Flush once it answered)
//       OnResult(call, result)            accounts for the attempt, keeps its outcome
//   call.result holds the answer
//
// Next is the one function that decides, and each decision is a Verdict from a closed set,
// counted in keel_gateway_decisions_total{route, verdict}: so every retry that was not
// made says why. Time comes from the injected Clock only: the deadline and the time left
// for an attempt from Clock::SteadyNow(), breakers, buckets, budgets, the cache and the
// latency ranking from Clock::Now().
//
// AttemptLoop is thread-safe (calls run through it concurrently); a Call is not: one
// driver runs it, one step after the other (the asynchronous driver from thread to thread,
// each step ordered after the previous one).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "admission.h"
#include "call_cache.h"
#include "gateway_metrics.h"
#include "keel/core/cancel.h"
#include "keel/core/clock.h"
#include "keel/core/random.h"
#include "keel/core/result.h"
#include "keel/core/timer.h"
#include "keel/gateway/gateway.h"
#include "route_table.h"

namespace keel::gateway::detail {

/// What the loop decided, once per Next. The first three make an attempt; every other
/// ends the call with call.result set.
enum class Verdict {
  kFirstAttempt,      // the call's first attempt, on the first target that admitted it
  kRetrySameTarget,   // after a failure, the same target again (only one admits it), after
                      // a backoff of at least its Retry-After
  kFailover,          // after a failure, another target, at once
  kAnswered,          // the last attempt answered: the call succeeded
  kNotRetryable,      // the last failure's class is never retried (invalid_request, auth,
                      // content_policy, ...): returned as it is
  kStreamBroken,      // a stream failed after its first chunk reached the caller
  kNoAttemptsLeft,    // max_attempts made (retry.max_attempts, X-Keel-Max-Attempts, or
                      // failover_only's bound)
  kDeadlinePassed,    // the call's deadline passed (kTimeout when the last failure failed
                      // over, or when no attempt was made)
  kDeadlineTooShort,  // the backoff before a retry of the same target would pass the
                      // deadline: the last failure is returned without waiting
  kNoBudget,          // the route's retry budget refused the retry
  kNoTarget,          // no target admitted the call (limits, circuits, windows, max_failover,
                      // failover_only): before any attempt, the error names the limit;
                      // after one, the last failure is returned
  kCancelled,         // the request was cancelled (ChatRequest::cancelled or ::cancel)
};
inline constexpr std::size_t kVerdictCount = static_cast<std::size_t>(Verdict::kCancelled) + 1;
/// snake_case: "first_attempt", "retry_same_target", ..., the `verdict` label.
std::string_view VerdictName(Verdict verdict);
/// kFirstAttempt, kRetrySameTarget and kFailover.
bool MakesAttempt(Verdict verdict);

/// A streamed attempt's first_token timeout (timeout.first_token of its provider): the
/// timer and the relay race to move `state` from kWaiting, once. Shared with the timer's
/// callback, which may outlive the call. Thread-safe.
struct FirstTokenWatch {
  static constexpr int kWaiting = 0, kSeen = 1, kExpired = 2;
  std::atomic<int> state{kWaiting};
  /// Cancelled when the timeout expires: the attempt's own signal, under the request's.
  std::shared_ptr<CancelSignal> own = std::make_shared<CancelSignal>();
};

/// Whether a chat.completion.chunk carries part of the answer: content, a tool call, a
/// refusal or a finish reason (not a role-only chunk, nor the usage chunk).
bool CarriesToken(const json::object& chunk);

/// The state of one call through a route. The drivers read the attempt's fields (target,
/// delay, body, left) after Next and Prepare; the rest is the loop's.
struct Call {
  /// `req` must outlive the call. `stream`: the answer is streamed; `embed`: embeddings.
  Call(const ChatRequest& r, bool s, bool e) : req(r), stream(s), embed(e) {}

  const ChatRequest& req;
  bool stream;
  bool embed;
  RouteState* route = nullptr;
  SteadyTime start{}, deadline{};
  int64_t prompt_tokens = 0;
  int64_t estimate = 0;  // prompt tokens plus max_tokens
  int max_attempts = 0;
  std::vector<TargetState*> tried;  // distinct targets, in the order tried
  // Never called again by this call: a target that timed out, one whose guessed window
  // answered context_length.
  std::vector<TargetState*> excluded;
  int same_5xx = 0;                 // retries of `previous` in a row after a server_error
  TargetState* previous = nullptr;  // the last attempt's
  std::optional<Error> last;        // the last attempt's failure
  int64_t min_window = 0;           // after a context_length error: a larger window is needed
  int attempts = 0;
  int failovers = 0;
  bool forwarded = false;  // a chunk reached the caller: no failover from here on
  Duration ttft{0};
  // The attempt Next chose: its target, the backoff to wait before it, its body and the
  // time left for it (set by Prepare, after the backoff).
  TargetState* target = nullptr;
  bool shared = false;  // the attempt's rate tokens came from Redis, and go back there
  Duration delay{0};
  json::object body;
  Duration left{0};
  SteadyTime t0{};
  // A stream under first_token: the watch, the request the attempt is made with (its
  // cancel signal the watch's), and the chunks held back until the first token.
  std::shared_ptr<FirstTokenWatch> watch;
  std::optional<ChatRequest> attempt_req;
  std::vector<json::object> prelude;
  CallCache cache;
  /// The request to pass to the provider for the attempt Prepare readied.
  const ChatRequest& attempt_request() const { return attempt_req ? *attempt_req : req; }
  /// Set when the call is done: by Begin (false), by OnResult (an answer), by Next (a
  /// Verdict that makes no attempt).
  std::optional<Result<ChatResult>> result;
};

class AttemptLoop {
 public:
  /// Everything must outlive the loop.
  AttemptLoop(const RouteTable& table, Admission& admission, GatewayMetrics& metrics,
              const Clock& clock, Random& random);

  /// Looks the route up, checks the prompt against the windows, consults the cache and
  /// counts the request in the retry budget; false (with c.result set) when the call ends
  /// here: an unknown route (kNotFound), a prompt larger than every window
  /// (kContextLength), a cache hit. Such calls make no decision.
  bool Begin(Call& c);

  /// Decides what comes next; see Verdict. For an attempt, sets c.target (admitted: its
  /// slot and tokens are taken) and c.delay; otherwise sets c.result.
  Verdict Next(Call& c);

  /// Readies the attempt Next chose, once its delay has passed: the body naming the
  /// target's model, and the time left until the deadline (at least 1ms). A stream to a
  /// provider with timeout.first_token arms it on `timer`: past it with no token relayed,
  /// the attempt's request (attempt_request()) is cancelled and its failure becomes a
  /// kTimeout. `timer` must outlive the callback it schedules, or drop it.
  void Prepare(Call& c, Timer& timer);

  /// Gives back the admission of the attempt Next chose, which will not be made (the call
  /// was cancelled during its backoff); the next Next decides kCancelled.
  void Abandon(Call& c);

  /// Whether the call's request was cancelled (ChatRequest::cancelled or ::cancel).
  static bool Cancelled(const ChatRequest& req);

  /// A stream's first chunk is about to reach the caller: from here on no failover.
  void OnFirstChunk(Call& c);

  /// Passes a stream's chunk on to `out` (the caller's sink): under first_token, chunks
  /// that carry no token are held back until one does (or the stream ends: Flush), so a
  /// failover stays invisible; the first one relayed marks the first chunk. False: stop
  /// the stream (`out` refused, or the first_token timeout expired first).
  using ChunkOut = std::function<bool(const json::object&)>;
  bool Relay(Call& c, const json::object& chunk, const ChunkOut& out);
  /// After a stream answered: the chunks still held back go to `out`.
  void Flush(Call& c, const ChunkOut& out);

  /// Accounts for the attempt's outcome (the target's slot, latency, breaker, metrics, the
  /// real usage instead of the estimate, secrets redacted from errors) and keeps it for
  /// the next decision; an answer sets c.result and is stored in the cache.
  void OnResult(Call& c, Result<ChatResult> r);

 private:
  Verdict Decide(Call& c);
  // Whether the last failure asks for the same target first (docs/gateway.md, "Same
  // target or another"): a 429 with a short Retry-After, or a server_error under
  // retry.same_target_on_5xx.
  bool SameTargetFirst(const Call& c) const;
  Result<ChatResult> Finish(Call& c, Result<ChatResult> r);
  // The answer of a call that ran out of attempts, time or targets: its last failure.
  Result<ChatResult> End(Call& c);
  // The call ends with `e`, unless it holds a stale answer and `e` fails over: then that
  // answer is served instead. Counts the call's outcome either way.
  Result<ChatResult> FailOrServeStale(Call& c, Error e);
  // An answer from the cache (a hit, or a stale answer after failures) at `now`, counted.
  Result<ChatResult> ServeCached(Call& c, const CacheEntry& entry, CacheStatus status,
                                 Timestamp now);
  Duration Elapsed(const Call& c) const;

  const RouteTable& table_;
  Admission& admission_;
  GatewayMetrics& metrics_;
  const Clock& clock_;
  Random& random_;
};

}  // namespace keel::gateway::detail
