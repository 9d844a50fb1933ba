#include "keel/core/circuit_breaker.h"

#include <algorithm>

namespace keel {

std::string_view BreakerStateName(BreakerState s) {
  switch (s) {
    case BreakerState::kClosed:
      return "closed";
    case BreakerState::kOpen:
      return "open";
    case BreakerState::kHalfOpen:
      return "half_open";
  }
  return "unknown";
}

CircuitBreaker::CircuitBreaker(CircuitBreakerOptions options) : options_(options), window_(options.window) {
  options_.min_requests = std::max(1, options_.min_requests);
  options_.half_open_requests = std::max(1, options_.half_open_requests);
  options_.consecutive_failures = std::max(0, options_.consecutive_failures);
}

bool CircuitBreaker::Allow(Timestamp now) {
  Advance(now);
  switch (state_) {
    case BreakerState::kClosed:
      return true;
    case BreakerState::kOpen:
      return false;
    case BreakerState::kHalfOpen:
      // Trials already answered count too: half_open_requests trials in all, not at a time.
      if (half_open_in_flight_ + half_open_successes_ >= options_.half_open_requests) {
        return false;
      }
      ++half_open_in_flight_;
      return true;
  }
  return false;
}

void CircuitBreaker::OnSuccess(Timestamp now) {
  Advance(now);
  switch (state_) {
    case BreakerState::kClosed:
      window_.Add(now, 1, 0);
      consecutive_ = 0;
      return;
    case BreakerState::kOpen:
      // The outcome of a call let through before the breaker opened: it does not count.
      return;
    case BreakerState::kHalfOpen:
      if (half_open_in_flight_ == 0) return;  // not a trial call
      --half_open_in_flight_;
      ++half_open_successes_;
      if (half_open_successes_ >= options_.half_open_requests) Close();
      return;
  }
}

void CircuitBreaker::OnFailure(Timestamp now) {
  Advance(now);
  switch (state_) {
    case BreakerState::kClosed: {
      window_.Add(now, 1, 1);
      ++consecutive_;
      if (options_.consecutive_failures > 0 && consecutive_ >= options_.consecutive_failures) {
        Open(now);
        return;
      }
      const auto [requests, failures] = window_.Sum(now);
      // A quotient, not failures >= rate * requests: 3/30 rounds to the same double as the
      // literal 0.1, whereas 0.1 * 30 rounds above 3 and would miss the exact threshold.
      if (requests >= options_.min_requests &&
          static_cast<double>(failures) / static_cast<double>(requests) >= options_.failure_rate) {
        Open(now);
      }
      return;
    }
    case BreakerState::kOpen:
      return;  // a late outcome from before the breaker opened
    case BreakerState::kHalfOpen:
      if (half_open_in_flight_ == 0) return;  // not a trial call
      --half_open_in_flight_;
      Open(now);
      return;
  }
}

BreakerState CircuitBreaker::state(Timestamp now) const {
  if (state_ == BreakerState::kOpen && now >= open_until_) return BreakerState::kHalfOpen;
  return state_;
}

void CircuitBreaker::Open(Timestamp now) {
  state_ = BreakerState::kOpen;
  open_until_ = now + options_.open_for;
  ++opened_count_;
  consecutive_ = 0;
  half_open_in_flight_ = 0;
  half_open_successes_ = 0;
}

void CircuitBreaker::Close() {
  state_ = BreakerState::kClosed;
  window_.Clear();
  consecutive_ = 0;
  half_open_in_flight_ = 0;
  half_open_successes_ = 0;
}

void CircuitBreaker::Advance(Timestamp now) {
  if (state_ == BreakerState::kOpen && now >= open_until_) {
    state_ = BreakerState::kHalfOpen;
    half_open_in_flight_ = 0;
    half_open_successes_ = 0;
  }
}

}  // namespace keel
