#include "keel/core/circuit_breaker.h"

#include <algorithm>

namespace keel {
namespace {

constexpr int64_t kBuckets = 10;

// Width of one window slice in ms; never 0, so a window below the 10ms minimum still works.
int64_t SliceMs(Duration window) { return std::max<int64_t>(1, window.count() / kBuckets); }

// Floor division, so that timestamps before the epoch still map to consecutive slices.
int64_t EpochOf(Timestamp now, int64_t slice_ms) {
  const int64_t ms = ToMillis(now);
  int64_t q = ms / slice_ms;
  if (ms % slice_ms != 0 && ms < 0) --q;
  return q;
}

size_t IndexOf(int64_t epoch) {
  return static_cast<size_t>(((epoch % kBuckets) + kBuckets) % kBuckets);
}

}  // namespace

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

CircuitBreaker::CircuitBreaker(CircuitBreakerOptions options) : options_(options) {
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
      ++BucketAt(now).requests;
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
      Bucket& b = BucketAt(now);
      ++b.requests;
      ++b.failures;
      ++consecutive_;
      if (options_.consecutive_failures > 0 && consecutive_ >= options_.consecutive_failures) {
        Open(now);
        return;
      }
      int64_t requests = 0;
      int64_t failures = 0;
      Totals(now, requests, failures);
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

CircuitBreaker::Bucket& CircuitBreaker::BucketAt(Timestamp now) {
  const int64_t epoch = EpochOf(now, SliceMs(options_.window));
  Bucket& b = buckets_[IndexOf(epoch)];
  // Only a newer slice recycles the bucket. A timestamp more than a window older than the
  // bucket's slice (a caller's clock stepping back) is counted in the newer slice rather
  // than wiping it.
  if (b.epoch < epoch) b = Bucket{epoch, 0, 0};
  return b;
}

void CircuitBreaker::Totals(Timestamp now, int64_t& requests, int64_t& failures) const {
  const int64_t epoch = EpochOf(now, SliceMs(options_.window));
  requests = 0;
  failures = 0;
  for (const Bucket& b : buckets_) {
    if (b.epoch > epoch - kBuckets && b.epoch <= epoch) {
      requests += b.requests;
      failures += b.failures;
    }
  }
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
  buckets_.fill(Bucket{});
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
