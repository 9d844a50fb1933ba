#include "keel/core/retry_budget.h"

#include <gtest/gtest.h>

#include "keel/core/clock.h"

namespace keel {
namespace {

using std::chrono::milliseconds;

// A multiple of every window slice used below (window / 10), so slice edges are exact.
const Timestamp kT0 = FromMillis(1'700'000'000'000);

RetryBudgetOptions Options(double ratio, double min_per_second, Duration window) {
  RetryBudgetOptions o;
  o.ratio = ratio;
  o.min_per_second = min_per_second;
  o.window = window;
  return o;
}

int RetriesGranted(RetryBudget& budget, Timestamp now, int tries) {
  int granted = 0;
  for (int i = 0; i < tries; ++i) granted += budget.TryRetry(now) ? 1 : 0;
  return granted;
}

TEST(RetryBudgetTest, DefaultsMatchTheContract) {
  const RetryBudgetOptions o;
  EXPECT_EQ(o.ratio, 0.2);
  EXPECT_EQ(o.min_per_second, 5);
  EXPECT_EQ(o.window, milliseconds(10000));
}

TEST(RetryBudgetTest, TheFloorAllowsRetriesWithNoTraffic) {
  RetryBudget b;  // 5 a second over 10s
  EXPECT_DOUBLE_EQ(b.Allowed(kT0), 50);
  EXPECT_EQ(RetriesGranted(b, kT0, 50), 50);
  EXPECT_FALSE(b.TryRetry(kT0));
  EXPECT_EQ(b.Retries(kT0), 50);
}

TEST(RetryBudgetTest, TheFloorScalesWithTheWindow) {
  RetryBudget b(Options(0, 2, milliseconds(3000)));
  EXPECT_DOUBLE_EQ(b.Allowed(kT0), 6);
  EXPECT_EQ(RetriesGranted(b, kT0, 10), 6);
}

TEST(RetryBudgetTest, NoFloorAndNoTrafficAllowsNone) {
  RetryBudget b(Options(0.2, 0, milliseconds(10000)));
  EXPECT_DOUBLE_EQ(b.Allowed(kT0), 0);
  EXPECT_FALSE(b.TryRetry(kT0));
  EXPECT_EQ(b.Retries(kT0), 0);
}

TEST(RetryBudgetTest, RatioOfRequestsAboveTheFloor) {
  RetryBudget b(Options(0.2, 1, milliseconds(10000)));  // floor 10
  for (int i = 0; i < 100; ++i) b.OnRequest(kT0);
  EXPECT_DOUBLE_EQ(b.Allowed(kT0), 30);
  EXPECT_EQ(RetriesGranted(b, kT0, 100), 30);
  EXPECT_EQ(b.Retries(kT0), 30);
  // Each 5 more requests earn one more retry.
  for (int i = 0; i < 4; ++i) b.OnRequest(kT0);
  EXPECT_FALSE(b.TryRetry(kT0));
  b.OnRequest(kT0);
  EXPECT_TRUE(b.TryRetry(kT0));
  EXPECT_FALSE(b.TryRetry(kT0));
}

TEST(RetryBudgetTest, RatioIsExactForProductsThatRoundDown) {
  // 0.29 * 100 is 28.999999999999996 in doubles; the budget is still 29.
  RetryBudget b(Options(0.29, 0, milliseconds(10000)));
  for (int i = 0; i < 100; ++i) b.OnRequest(kT0);
  EXPECT_EQ(RetriesGranted(b, kT0, 100), 29);
}

TEST(RetryBudgetTest, RetriesAgeOutWithTheWindow) {
  RetryBudget b(Options(0, 2, milliseconds(1000)));  // floor 2
  EXPECT_EQ(RetriesGranted(b, kT0, 5), 2);
  EXPECT_FALSE(b.TryRetry(kT0 + milliseconds(899)));
  EXPECT_EQ(b.Retries(kT0 + milliseconds(899)), 2);
  EXPECT_EQ(b.Retries(kT0 + milliseconds(1000)), 0);
  EXPECT_EQ(RetriesGranted(b, kT0 + milliseconds(1000), 5), 2);
}

TEST(RetryBudgetTest, RetriesAgeOutSliceBySlice) {
  RetryBudget b(Options(0, 2, milliseconds(1000)));
  ASSERT_TRUE(b.TryRetry(kT0));
  ASSERT_TRUE(b.TryRetry(kT0 + milliseconds(500)));
  EXPECT_FALSE(b.TryRetry(kT0 + milliseconds(999)));
  // The first has left the window, the second has not.
  EXPECT_EQ(b.Retries(kT0 + milliseconds(1000)), 1);
  EXPECT_TRUE(b.TryRetry(kT0 + milliseconds(1000)));
  EXPECT_FALSE(b.TryRetry(kT0 + milliseconds(1000)));
}

TEST(RetryBudgetTest, RequestsAgeOutWithTheWindow) {
  RetryBudget b(Options(1, 0, milliseconds(1000)));
  for (int i = 0; i < 3; ++i) b.OnRequest(kT0);
  EXPECT_DOUBLE_EQ(b.Allowed(kT0 + milliseconds(899)), 3);
  EXPECT_DOUBLE_EQ(b.Allowed(kT0 + milliseconds(1000)), 0);
  EXPECT_FALSE(b.TryRetry(kT0 + milliseconds(1000)));
}

TEST(RetryBudgetTest, TryRetryCountsOnlyWhenItReturnsTrue) {
  RetryBudget b(Options(0.5, 0, milliseconds(10000)));
  b.OnRequest(kT0);
  b.OnRequest(kT0);  // one retry allowed
  EXPECT_TRUE(b.TryRetry(kT0));
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(b.TryRetry(kT0));
  EXPECT_EQ(b.Retries(kT0), 1);
  b.OnRequest(kT0);
  b.OnRequest(kT0);  // one more: refused tries did not use it up
  EXPECT_TRUE(b.TryRetry(kT0));
  EXPECT_EQ(b.Retries(kT0), 2);
}

TEST(RetryBudgetTest, CapsRetriesDuringAnOutage) {
  // Every request fails and wants 2 retries; the budget grants 20% + the floor.
  ManualClock clock(kT0);
  RetryBudget b;  // ratio 0.2, 5/s, 10s
  int granted = 0;
  for (int i = 0; i < 1000; ++i) {
    b.OnRequest(clock.Now());
    granted += RetriesGranted(b, clock.Now(), 2);
    clock.Advance(milliseconds(5));  // 1000 requests over 5s, all in the window
  }
  EXPECT_EQ(granted, 250);  // 50 + 0.2 * 1000
  EXPECT_EQ(b.Retries(clock.Now()), 250);
}

}  // namespace
}  // namespace keel
