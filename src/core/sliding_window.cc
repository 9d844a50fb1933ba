#include "keel/core/sliding_window.h"

#include <algorithm>

namespace keel {

SlidingWindowCounts::SlidingWindowCounts(Duration window)
    : slice_ms_(std::max<int64_t>(1, window.count() / kSlices)) {}

// Floor division, so that timestamps before the epoch still map to consecutive slices.
int64_t SlidingWindowCounts::EpochOf(Timestamp now) const {
  const int64_t ms = ToMillis(now);
  int64_t q = ms / slice_ms_;
  if (ms % slice_ms_ != 0 && ms < 0) --q;
  return q;
}

void SlidingWindowCounts::Add(Timestamp now, int64_t first, int64_t second) {
  const int64_t epoch = EpochOf(now);
  Slice& s = slices_[static_cast<size_t>(((epoch % kSlices) + kSlices) % kSlices)];
  // Only a newer slice recycles the slot.
  if (s.epoch < epoch) s = Slice{epoch, {}};
  s.counts.first += first;
  s.counts.second += second;
}

SlidingWindowCounts::Totals SlidingWindowCounts::Sum(Timestamp now) const {
  const int64_t epoch = EpochOf(now);
  Totals t;
  for (const Slice& s : slices_) {
    if (s.epoch > epoch - kSlices && s.epoch <= epoch) {
      t.first += s.counts.first;
      t.second += s.counts.second;
    }
  }
  return t;
}

void SlidingWindowCounts::Clear() { slices_.fill(Slice{}); }

}  // namespace keel
