#pragma once
// A circuit breaker per upstream target (the Hystrix / Envoy outlier-detection model):
//
//   closed ──(failure rate >= failure_rate over `window` with >= min_requests,
//             or consecutive_failures in a row)──> open
//   open ──(open_for elapsed)──> half_open
//   half_open ──(half_open_requests trial calls all succeed)──> closed
//   half_open ──(a trial call fails)──> open (for open_for again)
//
// The window is a SlidingWindowCounts: old outcomes age out without storing each call. Pure: time comes from the caller. Not thread-safe: one owner, or the
// caller locks.

#include <array>
#include <cstdint>
#include <string_view>

#include "keel/core/clock.h"
#include "keel/core/sliding_window.h"

namespace keel {

struct CircuitBreakerOptions {
  /// Share of failed calls in the window that opens the breaker. Default: 0.5. Range: (0, 1].
  double failure_rate = 0.5;
  /// Calls in the window before the failure rate is judged. Default: 20. Range: >= 1.
  int min_requests = 20;
  /// Sliding window of the failure rate. Default: 30s. Range: >= 10ms.
  Duration window{30000};
  /// Failures in a row that open the breaker whatever the rate (0: off). Default: 5.
  int consecutive_failures = 5;
  /// How long the breaker stays open before letting trial calls through. Default: 15s.
  Duration open_for{15000};
  /// Trial calls in half-open; all must succeed to close. Default: 1. Range: >= 1.
  int half_open_requests = 1;
};

enum class BreakerState { kClosed, kOpen, kHalfOpen };
std::string_view BreakerStateName(BreakerState s);

class CircuitBreaker {
 public:
  explicit CircuitBreaker(CircuitBreakerOptions options = {});

  /// Whether a call may go out now. In half-open, admits at most half_open_requests calls
  /// until their outcomes are known; each admitted call must be followed by exactly one
  /// OnSuccess or OnFailure.
  bool Allow(Timestamp now);
  void OnSuccess(Timestamp now);
  void OnFailure(Timestamp now);

  /// The state at `now` (an open breaker whose open_for has passed reads half-open).
  BreakerState state(Timestamp now) const;
  /// When an open breaker lets trial calls through; meaningful in kOpen only.
  Timestamp open_until() const { return open_until_; }
  /// Times the breaker has opened.
  int64_t opened_count() const { return opened_count_; }

 private:
  void Open(Timestamp now);
  void Close();
  void Advance(Timestamp now);  // open -> half-open when due

  CircuitBreakerOptions options_;
  BreakerState state_ = BreakerState::kClosed;
  SlidingWindowCounts window_;  // first: requests, second: failures
  int consecutive_ = 0;
  Timestamp open_until_{};
  int half_open_in_flight_ = 0;
  int half_open_successes_ = 0;
  int64_t opened_count_ = 0;
};

}  // namespace keel
