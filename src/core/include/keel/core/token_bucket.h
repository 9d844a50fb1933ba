#pragma once
// A token bucket: `capacity` tokens, refilled continuously at `refill_per_second`. Used for
// requests per minute (capacity rpm, refill rpm/60) and tokens per minute. Taking may be
// corrected afterwards (Adjust), so that a call charged with an estimate is re-charged
// with the usage the provider reported. Pure; not thread-safe.

#include "keel/core/clock.h"

namespace keel {

class TokenBucket {
 public:
  /// Starts full at `now`. capacity > 0, refill_per_second >= 0.
  TokenBucket(double capacity, double refill_per_second, Timestamp now);

  /// Takes `n` tokens if that many are available; otherwise takes none.
  bool TryTake(double n, Timestamp now);
  /// How long until `n` tokens are available (0 if they are now; Duration::max() if never,
  /// i.e. n > capacity or no refill).
  Duration TimeUntil(double n, Timestamp now) const;
  /// Adds `delta` tokens (negative: takes more, and may go below zero, so that an
  /// underestimate is paid back before the next call). Capped at capacity.
  void Adjust(double delta, Timestamp now);
  /// Tokens available at `now` (may be negative after an Adjust).
  double Available(Timestamp now) const;
  double capacity() const { return capacity_; }

 private:
  void Refill(Timestamp now);
  double capacity_;
  double refill_per_ms_;
  double tokens_;
  Timestamp last_;
};

}  // namespace keel
