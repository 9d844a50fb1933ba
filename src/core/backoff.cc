#include "keel/core/backoff.h"

#include <algorithm>
#include <cmath>

namespace keel {

Duration ComputeBackoff(const BackoffPolicy& policy, int retry, std::optional<Duration> retry_after,
                        Random& random) {
  const double max_ms = static_cast<double>(policy.max.count());
  const int exponent = std::max(0, retry - 1);
  double delay = static_cast<double>(policy.initial.count()) *
                 std::pow(std::max(1.0, policy.multiplier), exponent);
  delay = std::min(delay, max_ms);
  switch (policy.jitter) {
    case JitterMode::kNone:
      break;
    case JitterMode::kFull:
      delay = random.Uniform() * delay;
      break;
    case JitterMode::kProportional: {
      const double f = std::clamp(policy.jitter_fraction, 0.0, 1.0);
      delay = delay * (1.0 - f + 2.0 * f * random.Uniform());
      delay = std::min(delay, max_ms);
      break;
    }
  }
  auto result = Duration(static_cast<int64_t>(std::llround(std::max(0.0, delay))));
  if (retry_after && *retry_after > result) result = *retry_after;
  return result;
}

}  // namespace keel
