#pragma once
// Waiting, behind an interface, so that code that backs off or times out is driven by a
// ManualTimer in tests instead of sleeping (DESIGN.md, "Deterministic time in tests").
// A Timer pairs with a Clock: the clock says what time it is, the timer acts when a time
// comes. Code that waits takes both, injected.
//
//   SystemTimer   real time: callbacks on a thread of its own, Sleep blocks the caller.
//   ManualTimer   test time: callbacks run when a ManualClock is moved past their due time
//                 through the timer; Sleep moves the clock at once.
//
// (An executor's timer, for code that runs on Asio event loops, lives with that code:
// gateway/executor_timer.h. core does no I/O.)

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "keel/core/clock.h"

namespace keel {

/// Runs callbacks later, and blocks for a while. Implementations are thread-safe.
class Timer {
 public:
  virtual ~Timer() = default;

  /// Calls `fn` once, `delay` from now (a delay <= 0: as soon as the timer gets to it, never
  /// inside After itself), on a thread the implementation names. Callbacks still pending
  /// when the timer is destroyed are dropped, not run: whoever schedules on a timer keeps
  /// what the callback touches alive until it has run, or outlives the timer.
  virtual void After(Duration delay, std::function<void()> fn) = 0;

  /// Blocks the calling thread for `delay` (nothing for a delay <= 0). Default: After, then
  /// waits for the callback on a condition variable; so it must not be called from the
  /// thread that runs this timer's callbacks.
  virtual void Sleep(Duration delay);
};

/// Real time. Callbacks run one after the other on one thread of the timer's own, started
/// by the first After (keep them short: post longer work elsewhere); Sleep is
/// std::this_thread::sleep_for on the caller's thread and needs no thread of the timer's.
/// Times are std::chrono::steady_clock's. Thread-safe.
class SystemTimer final : public Timer {
 public:
  SystemTimer() = default;
  /// Stops and joins the timer's thread; pending callbacks are dropped.
  ~SystemTimer() override;
  SystemTimer(const SystemTimer&) = delete;
  SystemTimer& operator=(const SystemTimer&) = delete;

  void After(Duration delay, std::function<void()> fn) override;
  void Sleep(Duration delay) override;

  /// A process-wide instance; never destroyed.
  static SystemTimer* Instance();

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<std::chrono::steady_clock::time_point, std::function<void()>>
      pending_;         // GUARDED_BY(mu_)
  bool stop_ = false;   // GUARDED_BY(mu_)
  std::thread thread_;  // started under mu_ by the first After
};

/// Test time, on a ManualClock that moves only when told to. A callback is due at the
/// clock's Now() when After was called plus its delay. Moving the clock through the timer
/// (Advance, AdvanceToNext, Sleep) stops at each due time in order, sets the clock to it
/// and runs what is due then (callbacks due at the same time in the order they were
/// scheduled), so a callback sees the time it asked for; a callback may schedule more, and
/// those run in the same move when they fall due before its end. The clock is never moved
/// back: a callback that moves the clock itself (a fake that simulates latency) is fine.
///
/// Moving the clock directly (ManualClock::Advance) runs nothing: call RunDue afterwards.
///
/// Thread-safe. After, pending() and next_due() may be called from any thread, callbacks
/// included. Callbacks run on the thread that moves the clock, with no lock of the timer's
/// held but one that serialises the moves: moves from several threads take turns, and a
/// callback may move the clock again (it nests), but must not wait for another thread that
/// moves it.
class ManualTimer final : public Timer {
 public:
  /// `clock` must outlive the timer.
  explicit ManualTimer(ManualClock& clock) : clock_(clock) {}
  /// Pending callbacks are dropped.
  ~ManualTimer() override = default;
  ManualTimer(const ManualTimer&) = delete;
  ManualTimer& operator=(const ManualTimer&) = delete;

  void After(Duration delay, std::function<void()> fn) override;
  /// Simulated time: Advance(delay) on the caller's thread; returns at once.
  void Sleep(Duration delay) override { Advance(delay); }

  /// Moves the clock `d` forward (nothing for d <= 0 but RunDue), running every callback
  /// that falls due on the way. Returns how many ran.
  int Advance(Duration d);
  /// Moves the clock to the earliest pending due time (not back, if it is past) and runs
  /// what is due then. False, with nothing moved, when nothing is pending.
  bool AdvanceToNext();
  /// Runs the callbacks due at the clock's Now(), for a clock that was moved directly.
  /// Returns how many ran.
  int RunDue();

  /// Callbacks scheduled and not yet run.
  std::size_t pending() const;
  /// The earliest due time of a pending callback; nullopt when none is pending.
  std::optional<Timestamp> next_due() const;

 private:
  // Runs, in order, what falls due until `until`; the caller holds advance_mu_.
  int RunUntil(Timestamp until);

  ManualClock& clock_;
  std::recursive_mutex advance_mu_;  // serialises moves of the clock; held while callbacks run
  mutable std::mutex mu_;
  std::multimap<Timestamp, std::function<void()>> pending_;  // GUARDED_BY(mu_)
};

}  // namespace keel
