#pragma once
// A retry budget (Finagle's RetryBudget, Envoy's retry_budget): retries may not exceed a
// share of requests over a sliding window, with a floor so that low traffic can still
// retry. During a full outage this caps the extra load retries add to `ratio`, instead of
// multiplying it by max_attempts. Pure; not thread-safe.

#include <array>
#include <cstdint>

#include "keel/core/clock.h"
#include "keel/core/sliding_window.h"

namespace keel {

struct RetryBudgetOptions {
  /// Retries allowed per request in the window. Default: 0.2. Range: [0, 10].
  double ratio = 0.2;
  /// Retries allowed per second whatever the traffic. Default: 5. Range: >= 0.
  double min_per_second = 5;
  /// Window over which requests and retries are counted. Default: 10s. Range: >= 100ms.
  Duration window{10000};
};

class RetryBudget {
 public:
  explicit RetryBudget(RetryBudgetOptions options = {});

  /// Counts a first attempt.
  void OnRequest(Timestamp now);
  /// If the budget allows one more retry now, counts it and returns true.
  bool TryRetry(Timestamp now);
  /// Retries the budget would allow in the window at `now`, and retries counted.
  double Allowed(Timestamp now) const;
  int64_t Retries(Timestamp now) const;

 private:
  RetryBudgetOptions options_;
  SlidingWindowCounts window_;  // first: requests, second: retries
};

}  // namespace keel
