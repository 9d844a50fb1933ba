#include "keel/core/token_bucket.h"

#include <algorithm>
#include <cmath>

namespace keel {
namespace {

// Waits longer than this (about 285 years) are reported as never.
constexpr double kMaxWaitMs = 9e12;

// Whether `available` covers `n`. Refilling in steps (0.5 + 0.498 + 0.002) may land a
// rounding below the whole number that one step would reach; a take that is due by the
// clock is not refused for that.
double Tolerance(double capacity) { return 1e-9 * std::max(1.0, capacity); }

bool Covers(double available, double n, double capacity) {
  return available + Tolerance(capacity) >= n;
}

}  // namespace

TokenBucket::TokenBucket(double capacity, double refill_per_second, Timestamp now)
    : capacity_(capacity),
      refill_per_ms_(std::max(0.0, refill_per_second) / 1000.0),
      tokens_(capacity),
      last_(now) {}

bool TokenBucket::TryTake(double n, Timestamp now) {
  Refill(now);
  if (n > capacity_ || !Covers(tokens_, n, capacity_)) return false;
  tokens_ -= n;
  return true;
}

Duration TokenBucket::TimeUntil(double n, Timestamp now) const {
  if (n > capacity_) return Duration::max();
  const double available = Available(now);
  if (Covers(available, n, capacity_)) return Duration(0);
  if (refill_per_ms_ <= 0) return Duration::max();
  const double estimate = std::ceil((n - Tolerance(capacity_) - available) / refill_per_ms_);
  if (!(estimate < kMaxWaitMs)) return Duration::max();
  // The quotient may be a rounding off the whole millisecond at which Available() first
  // covers n; settle on that millisecond so that TryTake(n, now + TimeUntil(n, now))
  // succeeds and a millisecond earlier would not.
  auto wait = Duration(static_cast<int64_t>(estimate));
  while (wait > Duration(1) && Covers(Available(now + wait - Duration(1)), n, capacity_)) {
    wait -= Duration(1);
  }
  while (!Covers(Available(now + wait), n, capacity_)) wait += Duration(1);
  return wait;
}

void TokenBucket::Adjust(double delta, Timestamp now) {
  Refill(now);
  tokens_ = std::min(capacity_, tokens_ + delta);
}

double TokenBucket::Available(Timestamp now) const {
  if (now <= last_) return tokens_;
  const double elapsed_ms = static_cast<double>((now - last_).count());
  return std::min(capacity_, tokens_ + elapsed_ms * refill_per_ms_);
}

void TokenBucket::Refill(Timestamp now) {
  // A timestamp older than the last one (a caller's clock stepping back) refills nothing
  // and does not move `last_` back, so no time is counted twice.
  if (now <= last_) return;
  tokens_ = Available(now);
  last_ = now;
}

}  // namespace keel
