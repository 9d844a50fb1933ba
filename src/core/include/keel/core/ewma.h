#pragma once
// An exponentially weighted moving average that decays with time rather than with the
// number of samples: a sample's weight halves every `half_life`. Used for the latency
// strategy (the fastest target over its recent calls). Pure; not thread-safe.

#include <optional>

#include "keel/core/clock.h"

namespace keel {

class Ewma {
 public:
  /// half_life > 0. Default: 10s.
  explicit Ewma(Duration half_life = Duration(10000));

  /// The first sample becomes the average. A later one, `elapsed` after the previous, is
  /// blended as avg = w * avg + (1 - w) * value with w = 2^(-elapsed / half_life): after one
  /// half-life the old average and the sample weigh equally. A sample at the same millisecond
  /// as the previous one (or earlier) has no weight.
  void Observe(double value, Timestamp now);
  /// The average, or nullopt before the first sample.
  std::optional<double> value() const {
    return has_value_ ? std::optional<double>(value_) : std::nullopt;
  }

 private:
  Duration half_life_;
  double value_ = 0;
  bool has_value_ = false;
  Timestamp last_{};
};

}  // namespace keel
