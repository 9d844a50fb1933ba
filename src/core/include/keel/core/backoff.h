#pragma once
// Exponential backoff with jitter (the "exponential backoff and jitter" of the AWS
// Architecture Blog, 2015): delay(n) = min(max, initial * multiplier^(n-1)), then jittered.

#include <optional>

#include "keel/core/clock.h"
#include "keel/core/random.h"

namespace keel {

enum class JitterMode {
  kNone,         // the exact exponential delay.
  kFull,         // uniform in [0, delay]: spreads retries best, may retry at once.
  kProportional  // uniform in [delay * (1 - fraction), delay * (1 + fraction)], capped at max.
};

struct BackoffPolicy {
  /// Delay before the first retry. Default: 1s. Range: >= 0.
  Duration initial{1000};
  /// Growth per retry. Default: 2. Range: >= 1.
  double multiplier = 2.0;
  /// Cap on any single delay, jitter included. Default: 30s. Range: >= initial.
  Duration max{30000};
  /// Default: proportional.
  JitterMode jitter = JitterMode::kProportional;
  /// With kProportional, the +- share of the delay. Default: 0.2. Range: [0, 1].
  double jitter_fraction = 0.2;
};

/// The delay before retry number `retry` (1 for the first retry). When the failed call
/// answered with a Retry-After, the delay is at least that long, even past `max`: a
/// server that names its own recovery time is never hammered sooner.
Duration ComputeBackoff(const BackoffPolicy& policy, int retry, std::optional<Duration> retry_after,
                        Random& random);

}  // namespace keel
