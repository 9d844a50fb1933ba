#include "keel/core/circuit_breaker.h"

#include <gtest/gtest.h>

#include "keel/core/clock.h"

namespace keel {
namespace {

using std::chrono::milliseconds;

// A multiple of every window slice used below (window / 10), so slice edges are exact.
const Timestamp kT0 = FromMillis(1'700'000'010'000);

CircuitBreakerOptions RateOnly(double rate, int min_requests) {
  CircuitBreakerOptions o;
  o.failure_rate = rate;
  o.min_requests = min_requests;
  o.consecutive_failures = 0;
  return o;
}

// A breaker with options `o` that opened at `at`, after failing every call.
CircuitBreaker OpenedAt(Timestamp at, const CircuitBreakerOptions& o) {
  CircuitBreaker b(o);
  for (int i = 0; i < 100'000 && b.state(at) == BreakerState::kClosed; ++i) {
    EXPECT_TRUE(b.Allow(at));
    b.OnFailure(at);
  }
  EXPECT_EQ(b.state(at), BreakerState::kOpen);
  EXPECT_EQ(b.opened_count(), 1);
  return b;
}

TEST(CircuitBreakerTest, DefaultsMatchTheContract) {
  const CircuitBreakerOptions o;
  EXPECT_EQ(o.failure_rate, 0.5);
  EXPECT_EQ(o.min_requests, 20);
  EXPECT_EQ(o.window, milliseconds(30000));
  EXPECT_EQ(o.consecutive_failures, 5);
  EXPECT_EQ(o.open_for, milliseconds(15000));
  EXPECT_EQ(o.half_open_requests, 1);
}

TEST(CircuitBreakerTest, StartsClosed) {
  CircuitBreaker b;
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);
  EXPECT_TRUE(b.Allow(kT0));
  EXPECT_EQ(b.opened_count(), 0);
}

TEST(CircuitBreakerTest, StaysClosedBelowMinRequestsEvenAtAllFailures) {
  CircuitBreaker b(RateOnly(0.5, 20));
  for (int i = 0; i < 19; ++i) {
    ASSERT_TRUE(b.Allow(kT0)) << i;
    b.OnFailure(kT0);
  }
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);
  EXPECT_TRUE(b.Allow(kT0));
  b.OnFailure(kT0);  // the 20th: min_requests reached at 100% failures
  EXPECT_EQ(b.state(kT0), BreakerState::kOpen);
  EXPECT_FALSE(b.Allow(kT0));
  EXPECT_EQ(b.opened_count(), 1);
}

TEST(CircuitBreakerTest, OpensAtExactlyTheFailureRate) {
  CircuitBreaker b(RateOnly(0.5, 20));
  for (int i = 0; i < 11; ++i) b.OnSuccess(kT0);
  for (int i = 0; i < 9; ++i) b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);  // 9 of 20
  b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);  // 10 of 21: just below 0.5
  b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kOpen);  // 11 of 22: exactly 0.5
}

TEST(CircuitBreakerTest, ThresholdIsExactForRatesThatAreNotBinaryFractions) {
  // 0.28 * 25 is 7.000000000000001 in doubles; 7 failures of 25 is still exactly 0.28.
  CircuitBreaker b(RateOnly(0.28, 25));
  for (int i = 0; i < 18; ++i) b.OnSuccess(kT0);
  for (int i = 0; i < 6; ++i) b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);  // 6 of 24: below min_requests
  b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kOpen);  // 7 of 25
}

TEST(CircuitBreakerTest, SuccessesKeepTheRateBelowTheThreshold) {
  CircuitBreaker b(RateOnly(0.5, 20));
  for (int i = 0; i < 100; ++i) {
    b.OnSuccess(kT0);
    b.OnFailure(kT0);
    b.OnSuccess(kT0);
  }
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);  // a third failing
  EXPECT_EQ(b.opened_count(), 0);
}

TEST(CircuitBreakerTest, ConsecutiveFailuresOpenBelowMinRequests) {
  CircuitBreakerOptions o;  // min_requests 20, consecutive_failures 5
  CircuitBreaker b(o);
  for (int i = 0; i < 4; ++i) b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);
  b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kOpen);
}

TEST(CircuitBreakerTest, ConsecutiveFailuresOpenAtALowRate) {
  CircuitBreakerOptions o;
  o.min_requests = 1;
  o.failure_rate = 0.9;
  CircuitBreaker b(o);
  for (int i = 0; i < 100; ++i) b.OnSuccess(kT0);
  for (int i = 0; i < 4; ++i) b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);
  b.OnFailure(kT0);  // 5 of 105 failed, but 5 in a row
  EXPECT_EQ(b.state(kT0), BreakerState::kOpen);
}

TEST(CircuitBreakerTest, ASuccessBreaksTheRun) {
  CircuitBreakerOptions o;
  o.min_requests = 1000;
  CircuitBreaker b(o);
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < 4; ++i) b.OnFailure(kT0);
    b.OnSuccess(kT0);
  }
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);  // 40 failures, never 5 in a row
}

TEST(CircuitBreakerTest, ZeroConsecutiveFailuresIsOff) {
  CircuitBreakerOptions o;
  o.consecutive_failures = 0;
  o.min_requests = 1000;
  CircuitBreaker b(o);
  for (int i = 0; i < 500; ++i) b.OnFailure(kT0);
  EXPECT_EQ(b.state(kT0), BreakerState::kClosed);
  EXPECT_TRUE(b.Allow(kT0));
}

TEST(CircuitBreakerTest, FailuresOlderThanTheWindowNoLongerCount) {
  auto o = RateOnly(0.5, 4);
  o.window = milliseconds(1000);
  CircuitBreaker b(o);
  b.OnFailure(kT0);
  b.OnFailure(kT0);
  b.OnFailure(kT0 + milliseconds(500));
  // The two at kT0 are older than the window; the one at +500 is not. (+1100 is in another
  // slice of the ring than kT0, so the old failures are not simply overwritten.)
  const Timestamp later = kT0 + milliseconds(1100);
  b.OnFailure(later);
  EXPECT_EQ(b.state(later), BreakerState::kClosed);  // 2 in the window, not 4
  b.OnFailure(later);
  EXPECT_EQ(b.state(later), BreakerState::kClosed);  // 3
  b.OnFailure(later + milliseconds(1));
  EXPECT_EQ(b.state(later), BreakerState::kOpen);  // 4, counting the one at +500
}

TEST(CircuitBreakerTest, FailuresWithinTheWindowStillCount) {
  auto o = RateOnly(0.5, 4);
  o.window = milliseconds(1000);
  CircuitBreaker b(o);
  for (int i = 0; i < 3; ++i) b.OnFailure(kT0);
  b.OnFailure(kT0 + milliseconds(899));
  EXPECT_EQ(b.state(kT0 + milliseconds(899)), BreakerState::kOpen);
}

TEST(CircuitBreakerTest, SuccessesAgeOutToo) {
  auto o = RateOnly(0.5, 4);
  o.window = milliseconds(1000);
  CircuitBreaker b(o);
  for (int i = 0; i < 10; ++i) b.OnSuccess(kT0);
  const Timestamp later = kT0 + milliseconds(1000);
  for (int i = 0; i < 4; ++i) b.OnFailure(later);
  // With the old successes still counted this would be 4 of 14.
  EXPECT_EQ(b.state(later), BreakerState::kOpen);
}

TEST(CircuitBreakerTest, OpenRefusesCallsUntilOpenFor) {
  ManualClock clock(kT0);
  CircuitBreakerOptions o;
  o.open_for = milliseconds(15000);
  CircuitBreaker b = OpenedAt(clock.Now(), o);
  EXPECT_EQ(b.open_until(), kT0 + milliseconds(15000));
  EXPECT_FALSE(b.Allow(clock.Now()));
  clock.Advance(milliseconds(14999));
  EXPECT_EQ(b.state(clock.Now()), BreakerState::kOpen);
  EXPECT_FALSE(b.Allow(clock.Now()));
  clock.Advance(milliseconds(1));
  EXPECT_EQ(b.state(clock.Now()), BreakerState::kHalfOpen);
  EXPECT_TRUE(b.Allow(clock.Now()));
}

TEST(CircuitBreakerTest, HalfOpenAdmitsExactlyOneTrialByDefault) {
  const Timestamp due = kT0 + milliseconds(15000);
  CircuitBreaker b = OpenedAt(kT0, {});
  EXPECT_TRUE(b.Allow(due));
  EXPECT_FALSE(b.Allow(due));
  EXPECT_FALSE(b.Allow(due + milliseconds(60000)));  // still waiting for the trial's outcome
  EXPECT_EQ(b.state(due), BreakerState::kHalfOpen);
}

TEST(CircuitBreakerTest, HalfOpenAdmitsExactlyHalfOpenRequestsTrials) {
  CircuitBreakerOptions o;
  o.half_open_requests = 3;
  const Timestamp due = kT0 + o.open_for;
  CircuitBreaker b = OpenedAt(kT0, o);
  EXPECT_TRUE(b.Allow(due));
  EXPECT_TRUE(b.Allow(due));
  EXPECT_TRUE(b.Allow(due));
  EXPECT_FALSE(b.Allow(due));
  b.OnSuccess(due);
  b.OnSuccess(due);
  // Two trials answered, one in flight: three in all, so no fourth.
  EXPECT_EQ(b.state(due), BreakerState::kHalfOpen);
  EXPECT_FALSE(b.Allow(due));
  b.OnSuccess(due);
  EXPECT_EQ(b.state(due), BreakerState::kClosed);
  EXPECT_TRUE(b.Allow(due));
  EXPECT_TRUE(b.Allow(due));
}

TEST(CircuitBreakerTest, ATrialFailureReopensForAnotherOpenFor) {
  CircuitBreakerOptions o;
  o.half_open_requests = 2;
  const Timestamp due = kT0 + o.open_for;
  CircuitBreaker b = OpenedAt(kT0, o);
  ASSERT_TRUE(b.Allow(due));
  ASSERT_TRUE(b.Allow(due));
  b.OnSuccess(due + milliseconds(10));
  const Timestamp failed = due + milliseconds(20);
  b.OnFailure(failed);
  EXPECT_EQ(b.state(failed), BreakerState::kOpen);
  EXPECT_EQ(b.open_until(), failed + o.open_for);
  EXPECT_FALSE(b.Allow(failed + o.open_for - milliseconds(1)));
  EXPECT_EQ(b.opened_count(), 2);
  // Then half-open again, with a fresh set of trials.
  EXPECT_TRUE(b.Allow(failed + o.open_for));
  EXPECT_TRUE(b.Allow(failed + o.open_for));
  EXPECT_FALSE(b.Allow(failed + o.open_for));
}

TEST(CircuitBreakerTest, TrialSuccessesCloseAndResetTheCounts) {
  auto o = RateOnly(0.5, 20);
  o.window = milliseconds(30000);
  o.open_for = milliseconds(15000);
  CircuitBreaker b(o);
  for (int i = 0; i < 20; ++i) b.OnFailure(kT0);
  ASSERT_EQ(b.state(kT0), BreakerState::kOpen);
  const Timestamp due = kT0 + o.open_for;
  ASSERT_TRUE(b.Allow(due));
  b.OnSuccess(due);
  ASSERT_EQ(b.state(due), BreakerState::kClosed);
  // The 20 failures are still inside the 30s window, but closing forgot them: one more
  // failure is 1 of 1, below min_requests, not 21 of 21.
  b.OnFailure(due);
  EXPECT_EQ(b.state(due), BreakerState::kClosed);
  for (int i = 0; i < 18; ++i) b.OnFailure(due);
  EXPECT_EQ(b.state(due), BreakerState::kClosed);  // 19
  b.OnFailure(due);
  EXPECT_EQ(b.state(due), BreakerState::kOpen);  // 20
}

TEST(CircuitBreakerTest, ClosingResetsTheRunOfFailures) {
  CircuitBreakerOptions o;  // consecutive_failures 5
  CircuitBreaker b = OpenedAt(kT0, o);
  const Timestamp due = kT0 + o.open_for;
  ASSERT_TRUE(b.Allow(due));
  b.OnSuccess(due);
  ASSERT_EQ(b.state(due), BreakerState::kClosed);
  for (int i = 0; i < 4; ++i) b.OnFailure(due);
  EXPECT_EQ(b.state(due), BreakerState::kClosed);
  b.OnFailure(due);
  EXPECT_EQ(b.state(due), BreakerState::kOpen);
}

TEST(CircuitBreakerTest, LateOutcomesWhileOpenAreIgnored) {
  CircuitBreakerOptions o;
  CircuitBreaker b = OpenedAt(kT0, o);
  b.OnFailure(kT0 + milliseconds(100));  // does not push open_until back
  b.OnSuccess(kT0 + milliseconds(200));  // does not close
  EXPECT_EQ(b.state(kT0 + milliseconds(200)), BreakerState::kOpen);
  EXPECT_EQ(b.open_until(), kT0 + o.open_for);
  EXPECT_EQ(b.opened_count(), 1);
}

TEST(CircuitBreakerTest, OpenedCountCountsEveryOpening) {
  CircuitBreakerOptions o;
  o.consecutive_failures = 1;
  CircuitBreaker b(o);
  Timestamp t = kT0;
  EXPECT_EQ(b.opened_count(), 0);
  b.OnFailure(t);  // closed -> open
  EXPECT_EQ(b.opened_count(), 1);
  t += o.open_for;
  ASSERT_TRUE(b.Allow(t));
  b.OnFailure(t);  // half-open -> open
  EXPECT_EQ(b.opened_count(), 2);
  t += o.open_for;
  ASSERT_TRUE(b.Allow(t));
  b.OnSuccess(t);  // half-open -> closed
  EXPECT_EQ(b.opened_count(), 2);
  b.OnFailure(t);  // closed -> open
  EXPECT_EQ(b.opened_count(), 3);
}

TEST(CircuitBreakerTest, StateNames) {
  EXPECT_EQ(BreakerStateName(BreakerState::kClosed), "closed");
  EXPECT_EQ(BreakerStateName(BreakerState::kOpen), "open");
  EXPECT_EQ(BreakerStateName(BreakerState::kHalfOpen), "half_open");
}

}  // namespace
}  // namespace keel
