#pragma once
// Two counters over a sliding time window, kept as a ring of 10 slices of window/10 each,
// so old counts age out without storing each event (used by the circuit breaker and the
// retry budget). Counts may drop out up to one slice early. Pure; not thread-safe.

#include <array>
#include <cstdint>

#include "keel/core/clock.h"

namespace keel {

class SlidingWindowCounts {
 public:
  struct Totals {
    int64_t first = 0;
    int64_t second = 0;
  };

  /// window > 0; a window under 10ms still works (slices of 1ms).
  explicit SlidingWindowCounts(Duration window);

  /// Adds to the slice of `now`. A time older than the newest slice (a clock stepping
  /// back) counts in the newer slice rather than wiping it.
  void Add(Timestamp now, int64_t first, int64_t second);
  /// The sums over the window ending at `now`.
  Totals Sum(Timestamp now) const;
  void Clear();

 private:
  static constexpr int64_t kSlices = 10;
  struct Slice {
    int64_t epoch = -1;  // which window slice this counts
    Totals counts;
  };
  int64_t EpochOf(Timestamp now) const;

  int64_t slice_ms_;
  std::array<Slice, kSlices> slices_{};
};

}  // namespace keel
