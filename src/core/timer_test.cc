#include "keel/core/timer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <thread>
#include <vector>

namespace keel {
namespace {

using std::chrono::milliseconds;

TEST(ManualTimerTest, RunsEachCallbackAtItsDueTimeInOrder) {
  ManualClock clock;
  ManualTimer timer(clock);
  const Timestamp t0 = clock.Now();
  std::vector<std::pair<int, Duration>> ran;  // which, and the clock's time when it ran
  auto record = [&](int which) {
    return [&, which] { ran.emplace_back(which, clock.Now() - t0); };
  };
  timer.After(milliseconds(300), record(3));
  timer.After(milliseconds(100), record(1));
  timer.After(milliseconds(200), record(2));
  timer.After(milliseconds(100), record(11));  // same due time: after the one scheduled first
  EXPECT_EQ(timer.pending(), 4u);
  EXPECT_EQ(timer.next_due(), t0 + milliseconds(100));
  EXPECT_EQ(timer.Advance(milliseconds(99)), 0);
  EXPECT_TRUE(ran.empty());
  EXPECT_EQ(timer.Advance(milliseconds(151)), 3);
  ASSERT_EQ(ran.size(), 3u);
  EXPECT_EQ(ran[0], std::make_pair(1, Duration(100)));
  EXPECT_EQ(ran[1], std::make_pair(11, Duration(100)));
  EXPECT_EQ(ran[2], std::make_pair(2, Duration(200)));
  EXPECT_EQ(clock.Now() - t0, milliseconds(250));  // the end of the move, not a due time
  EXPECT_EQ(timer.pending(), 1u);
}

TEST(ManualTimerTest, CallbacksMayScheduleMoreWithinTheSameMove) {
  ManualClock clock;
  ManualTimer timer(clock);
  const Timestamp t0 = clock.Now();
  std::vector<Duration> at;
  std::function<void()> again = [&] {
    at.push_back(clock.Now() - t0);
    if (at.size() < 5) timer.After(milliseconds(10), again);
  };
  timer.After(milliseconds(10), again);
  EXPECT_EQ(timer.Advance(milliseconds(35)), 3);
  EXPECT_EQ(at, (std::vector<Duration>{milliseconds(10), milliseconds(20), milliseconds(30)}));
  EXPECT_EQ(timer.Advance(milliseconds(1000)), 2);
  EXPECT_EQ(timer.pending(), 0u);
}

TEST(ManualTimerTest, AdvanceToNextJumpsToTheEarliestAndNeverMovesTheClockBack) {
  ManualClock clock;
  ManualTimer timer(clock);
  EXPECT_FALSE(timer.AdvanceToNext());
  const Timestamp t0 = clock.Now();
  int ran = 0;
  timer.After(milliseconds(500), [&] { ++ran; });
  timer.After(milliseconds(900), [&] { ++ran; });
  ASSERT_TRUE(timer.AdvanceToNext());
  EXPECT_EQ(ran, 1);
  EXPECT_EQ(clock.Now() - t0, milliseconds(500));
  // A clock moved directly runs nothing until RunDue.
  clock.Advance(milliseconds(1000));
  EXPECT_EQ(ran, 1);
  ASSERT_TRUE(timer.AdvanceToNext());  // due in the past: runs, the clock stays
  EXPECT_EQ(ran, 2);
  EXPECT_EQ(clock.Now() - t0, milliseconds(1500));
}

TEST(ManualTimerTest, RunDueRunsWhatAClockMovedDirectlyMadeDue) {
  ManualClock clock;
  ManualTimer timer(clock);
  int ran = 0;
  timer.After(milliseconds(0), [&] { ++ran; });  // never inside After
  timer.After(milliseconds(50), [&] { ++ran; });
  EXPECT_EQ(ran, 0);
  EXPECT_EQ(timer.RunDue(), 1);
  clock.Advance(milliseconds(50));
  EXPECT_EQ(timer.RunDue(), 1);
  EXPECT_EQ(ran, 2);
}

TEST(ManualTimerTest, SleepMovesTheClockAtOnceAndACallbackThatMovesItIsFine) {
  ManualClock clock;
  ManualTimer timer(clock);
  const Timestamp t0 = clock.Now();
  bool ran = false;
  timer.After(milliseconds(20), [&] {
    clock.Advance(milliseconds(100));  // a fake's simulated latency
    ran = true;
  });
  timer.Sleep(milliseconds(50));
  EXPECT_TRUE(ran);
  EXPECT_EQ(clock.Now() - t0, milliseconds(120));  // not moved back to 50
  timer.Sleep(milliseconds(-5));
  EXPECT_EQ(clock.Now() - t0, milliseconds(120));
}

TEST(ManualTimerTest, PendingCallbacksAreDroppedWithTheTimer) {
  ManualClock clock;
  int ran = 0;
  {
    ManualTimer timer(clock);
    timer.After(milliseconds(1), [&] { ++ran; });
  }
  clock.Advance(milliseconds(10));
  EXPECT_EQ(ran, 0);
}

TEST(ManualTimerTest, SchedulingFromManyThreadsWhileAnotherMovesTheClock) {
  ManualClock clock;
  ManualTimer timer(clock);
  std::atomic<int> ran{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) timer.After(milliseconds(i % 7), [&] { ran.fetch_add(1); });
    });
  }
  for (int i = 0; i < 50; ++i) timer.Advance(milliseconds(1));
  for (auto& t : threads) t.join();
  timer.Advance(milliseconds(10));
  EXPECT_EQ(ran.load(), 400);
  EXPECT_EQ(timer.pending(), 0u);
}

TEST(SystemTimerTest, RunsCallbacksOnItsOwnThreadAndSleepBlocksTheCaller) {
  SystemTimer timer;
  std::promise<std::thread::id> where;
  timer.After(milliseconds(0), [&] { where.set_value(std::this_thread::get_id()); });
  auto ran_on = where.get_future();
  ASSERT_EQ(ran_on.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_NE(ran_on.get(), std::this_thread::get_id());
  const auto t0 = std::chrono::steady_clock::now();
  timer.Sleep(milliseconds(2));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, milliseconds(2));
  // Destroyed with a callback pending far in the future: dropped, and the destructor returns.
  timer.After(std::chrono::hours(1), [] { ADD_FAILURE() << "ran"; });
}

TEST(TimerTest, TheDefaultSleepWaitsForItsCallback) {
  // A timer that implements only After: Sleep waits for the callback it schedules.
  class Deferred final : public Timer {
   public:
    void After(Duration, std::function<void()> fn) override {
      std::lock_guard lock(mu);
      fns.push_back(std::move(fn));
    }
    std::mutex mu;
    std::vector<std::function<void()>> fns;
  } timer;
  std::atomic<bool> woke{false};
  std::thread sleeper([&] {
    timer.Sleep(milliseconds(5));
    woke = true;
  });
  while (true) {
    std::lock_guard lock(timer.mu);
    if (!timer.fns.empty()) break;
  }
  EXPECT_FALSE(woke.load());
  timer.fns.front()();
  sleeper.join();
  EXPECT_TRUE(woke.load());
}

}  // namespace
}  // namespace keel
