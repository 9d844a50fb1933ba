#include "keel/core/ewma.h"

#include <cmath>

namespace keel {

Ewma::Ewma(Duration half_life) : half_life_(half_life) {}

void Ewma::Observe(double value, Timestamp now) {
  if (!has_value_) {
    value_ = value;
    has_value_ = true;
    last_ = now;
    return;
  }
  // The old average keeps 2^(-elapsed / half_life) of its weight; the sample takes the rest.
  // A timestamp older than the last one counts as no time elapsed.
  double old_weight = 0;
  if (half_life_.count() > 0 && now > last_) {
    const double elapsed = static_cast<double>((now - last_).count());
    old_weight = std::exp2(-elapsed / static_cast<double>(half_life_.count()));
  } else if (half_life_.count() > 0) {
    old_weight = 1;
  }
  value_ = old_weight * value_ + (1 - old_weight) * value;
  if (now > last_) last_ = now;
}

}  // namespace keel
