#pragma once
// Time for keel. All waiting and every timestamp that logic depends on goes through a
// Clock, so that backoff, leases and timers are tested by advancing a ManualClock
// instead of sleeping (DESIGN.md, "Deterministic time in tests").

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace keel {

using Duration = std::chrono::milliseconds;
/// Wall-clock time with millisecond precision: what keel stores and compares.
using Timestamp = std::chrono::sys_time<std::chrono::milliseconds>;
/// A reading of a monotonic clock, for deadlines and elapsed times: it never goes back when
/// the wall clock is set, and has sub-millisecond resolution. Its epoch is arbitrary:
/// compare readings of one Clock only, never store them.
using SteadyTime = std::chrono::steady_clock::time_point;

/// Source of the current time. Implementations are thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual Timestamp Now() const = 0;
  /// The monotonic reading. Default: Now() (so a ManualClock moves both together).
  virtual SteadyTime SteadyNow() const { return SteadyTime(Now().time_since_epoch()); }
};

/// The real wall clock.
class SystemClock final : public Clock {
 public:
  Timestamp Now() const override;
  /// std::chrono::steady_clock.
  SteadyTime SteadyNow() const override;
  /// A process-wide instance; never destroyed.
  static SystemClock* Instance();
};

/// A clock that moves only when told to. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(Timestamp start = Timestamp(std::chrono::milliseconds(1'700'000'000'000)))
      : now_ms_(start.time_since_epoch().count()) {}
  Timestamp Now() const override { return Timestamp(Duration(now_ms_.load())); }
  void Advance(Duration d) { now_ms_.fetch_add(d.count()); }
  void Set(Timestamp t) { now_ms_.store(t.time_since_epoch().count()); }

 private:
  std::atomic<int64_t> now_ms_;
};

inline int64_t ToMillis(Timestamp t) { return t.time_since_epoch().count(); }
inline Timestamp FromMillis(int64_t ms) { return Timestamp(Duration(ms)); }

/// RFC 3339 in UTC with milliseconds: "2026-11-25T01:45:50.123Z".
std::string FormatRfc3339(Timestamp t);

}  // namespace keel
