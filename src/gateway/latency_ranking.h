#pragma once
// The `latency` strategy's memory of a route (docs/gateway.md, "How a call is served"),
// private to keel_gateway: per target, a time-decayed average of its answers' latency, and
// the order it gives: fastest first, unmeasured targets before any. So that one slow call
// (a cold connection, a hiccup) does not exile a target for good, a target whose latest
// sample is older than `reprobe_after` is due for a re-measure: the next call goes to it
// first (one call per due target per `reprobe_after`, however many calls run at once), and
// its answer replaces the stale average (a sample newer than that is blended in, its
// weight growing with the time since the previous one: half after one half-life). A target that
// keeps failing stays due, at the same pace, and its failures fail over as any other.
//
// Thread-safe (one mutex). Time comes from the caller (the gateway's clock), so the
// re-measure is tested on a ManualClock.

#include <cstddef>
#include <mutex>
#include <optional>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/ewma.h"

namespace keel::gateway::detail {

class LatencyRanking {
 public:
  /// The average's half-life. Default: 10s.
  static constexpr Duration kHalfLife{10000};
  /// Age of a target's latest sample after which it gets a call to measure it again.
  /// Default: 10s.
  static constexpr Duration kReprobeAfter{10000};

  /// `targets` >= 1, indexed 0..targets-1 in the route's order.
  explicit LatencyRanking(std::size_t targets, Duration reprobe_after = kReprobeAfter,
                          Duration half_life = kHalfLife);

  /// A call to `target` answered after `ms` milliseconds (or timed out after `ms`: a lower
  /// bound that counts as a sample too). A sample that comes reprobe_after or more after
  /// the previous one replaces the average instead of being blended in.
  void Observe(std::size_t target, double ms, Timestamp now);

  /// The targets in the order to try them at `now`: a due target first (the one measured
  /// longest ago; it is then not due again before reprobe_after has passed), then the
  /// unmeasured ones in route order, then the measured ones fastest first. Marks the due
  /// target as probed.
  std::vector<std::size_t> Order(Timestamp now);

  /// The average of `target` in milliseconds; nullopt before its first sample.
  std::optional<double> Average(std::size_t target) const;

 private:
  struct Target {
    Ewma average;
    Timestamp measured_at{};  // the latest sample
    Timestamp probed_at{};    // the latest call Order put first for being due
    bool measured = false;
    explicit Target(Duration half_life) : average(half_life) {}
  };

  const Duration reprobe_after_;
  const Duration half_life_;
  mutable std::mutex mu_;
  std::vector<Target> targets_;  // GUARDED_BY(mu_)
};

}  // namespace keel::gateway::detail
