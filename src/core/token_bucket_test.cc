#include "keel/core/token_bucket.h"

#include <gtest/gtest.h>

#include "keel/core/clock.h"

namespace keel {
namespace {

using std::chrono::milliseconds;

const Timestamp kT0 = FromMillis(1'700'000'000'000);

TEST(TokenBucketTest, StartsFull) {
  TokenBucket b(10, 1, kT0);
  EXPECT_EQ(b.capacity(), 10);
  EXPECT_DOUBLE_EQ(b.Available(kT0), 10);
  EXPECT_TRUE(b.TryTake(10, kT0));
  EXPECT_FALSE(b.TryTake(1, kT0));
}

TEST(TokenBucketTest, RefillsContinuously) {
  ManualClock clock(kT0);
  TokenBucket b(10, 2, clock.Now());  // 2 tokens a second: one every 500ms
  ASSERT_TRUE(b.TryTake(10, clock.Now()));
  clock.Advance(milliseconds(250));
  EXPECT_DOUBLE_EQ(b.Available(clock.Now()), 0.5);  // not in whole-token steps
  EXPECT_FALSE(b.TryTake(1, clock.Now()));
  clock.Advance(milliseconds(249));
  EXPECT_FALSE(b.TryTake(1, clock.Now()));
  clock.Advance(milliseconds(1));
  EXPECT_TRUE(b.TryTake(1, clock.Now()));
  EXPECT_NEAR(b.Available(clock.Now()), 0, 1e-12);
}

TEST(TokenBucketTest, RefillStopsAtCapacity) {
  TokenBucket b(10, 2, kT0);
  ASSERT_TRUE(b.TryTake(4, kT0));
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(1000)), 8);
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(3600'000)), 10);
  EXPECT_TRUE(b.TryTake(10, kT0 + milliseconds(3600'000)));
  EXPECT_FALSE(b.TryTake(0.01, kT0 + milliseconds(3600'000)));
}

TEST(TokenBucketTest, TryTakeIsAllOrNothing) {
  TokenBucket b(10, 0, kT0);
  ASSERT_TRUE(b.TryTake(7, kT0));
  EXPECT_FALSE(b.TryTake(5, kT0));
  EXPECT_DOUBLE_EQ(b.Available(kT0), 3);  // the refused take took nothing
  EXPECT_TRUE(b.TryTake(3, kT0));
  EXPECT_DOUBLE_EQ(b.Available(kT0), 0);
}

TEST(TokenBucketTest, TimeUntilIsZeroWhenAvailable) {
  TokenBucket b(10, 2, kT0);
  EXPECT_EQ(b.TimeUntil(10, kT0), milliseconds(0));
  EXPECT_EQ(b.TimeUntil(0.5, kT0), milliseconds(0));
}

TEST(TokenBucketTest, TimeUntilIsExact) {
  TokenBucket b(10, 2, kT0);
  ASSERT_TRUE(b.TryTake(10, kT0));
  EXPECT_EQ(b.TimeUntil(1, kT0), milliseconds(500));
  EXPECT_EQ(b.TimeUntil(3, kT0), milliseconds(1500));
  EXPECT_EQ(b.TimeUntil(10, kT0), milliseconds(5000));
  // 0.2 refilled after 100ms; 0.3 more takes 150ms.
  EXPECT_EQ(b.TimeUntil(0.5, kT0 + milliseconds(100)), milliseconds(150));
  // A partial millisecond rounds up: 0.001 tokens take 0.5ms, so 1ms.
  EXPECT_EQ(b.TimeUntil(0.001, kT0), milliseconds(1));
}

TEST(TokenBucketTest, TimeUntilIsTheFirstMillisecondATakeSucceeds) {
  // 10 requests a minute: refill_per_second is 1/6, not exact in binary.
  const TokenBucket empty = [] {
    TokenBucket b(10, 10.0 / 60.0, kT0);
    EXPECT_TRUE(b.TryTake(10, kT0));
    return b;
  }();
  for (double n : {0.1, 0.3, 1.0, 2.0, 3.0, 7.0, 9.9, 10.0}) {
    const Duration wait = empty.TimeUntil(n, kT0);
    ASSERT_GT(wait, milliseconds(0)) << n;
    ASSERT_LT(wait, Duration::max()) << n;
    TokenBucket early = empty;
    EXPECT_FALSE(early.TryTake(n, kT0 + wait - milliseconds(1))) << n;
    TokenBucket on_time = empty;
    EXPECT_TRUE(on_time.TryTake(n, kT0 + wait)) << n;
  }
  EXPECT_EQ(empty.TimeUntil(1, kT0), milliseconds(6000));
  EXPECT_EQ(empty.TimeUntil(10, kT0), milliseconds(60000));
}

TEST(TokenBucketTest, PollingDoesNotPushATakePastItsTime) {
  // 10 requests a minute. Each refused take refills in a step; the steps' rounding must not
  // leave the bucket a hair short of the token that TimeUntil promised at +6s.
  TokenBucket b(10, 10.0 / 60.0, kT0);
  ASSERT_TRUE(b.TryTake(10, kT0));
  ASSERT_EQ(b.TimeUntil(1, kT0), milliseconds(6000));
  for (int s = 1; s < 6; ++s) EXPECT_FALSE(b.TryTake(1, kT0 + milliseconds(1000 * s))) << s;
  EXPECT_TRUE(b.TryTake(1, kT0 + milliseconds(6000)));
}

TEST(TokenBucketTest, TimeUntilIsNeverWhenMoreThanCapacity) {
  TokenBucket b(10, 2, kT0);
  EXPECT_EQ(b.TimeUntil(10.5, kT0), Duration::max());
  EXPECT_EQ(b.TimeUntil(1000, kT0), Duration::max());
}

TEST(TokenBucketTest, TimeUntilIsNeverWithoutRefill) {
  TokenBucket b(10, 0, kT0);
  EXPECT_EQ(b.TimeUntil(10, kT0), milliseconds(0));
  ASSERT_TRUE(b.TryTake(6, kT0));
  EXPECT_EQ(b.TimeUntil(4, kT0), milliseconds(0));
  EXPECT_EQ(b.TimeUntil(5, kT0), Duration::max());
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(3600'000)), 4);
}

TEST(TokenBucketTest, NegativeAdjustGoesBelowZeroAndDelaysTheNextTake) {
  TokenBucket b(10, 1, kT0);       // one token a second
  ASSERT_TRUE(b.TryTake(5, kT0));  // charged an estimate of 5
  b.Adjust(-8, kT0);               // the call really cost 13
  EXPECT_DOUBLE_EQ(b.Available(kT0), -3);
  EXPECT_FALSE(b.TryTake(1, kT0));
  EXPECT_EQ(b.TimeUntil(1, kT0), milliseconds(4000));  // pays back 3, then 1
  EXPECT_FALSE(b.TryTake(1, kT0 + milliseconds(3999)));
  EXPECT_TRUE(b.TryTake(1, kT0 + milliseconds(4000)));
}

TEST(TokenBucketTest, PositiveAdjustIsCappedAtCapacity) {
  TokenBucket b(10, 1, kT0);
  ASSERT_TRUE(b.TryTake(6, kT0));
  b.Adjust(2, kT0);  // refund of an overestimate
  EXPECT_DOUBLE_EQ(b.Available(kT0), 6);
  b.Adjust(100, kT0);
  EXPECT_DOUBLE_EQ(b.Available(kT0), 10);
  EXPECT_FALSE(b.TryTake(10.5, kT0));
}

TEST(TokenBucketTest, AdjustRefillsUpToNowFirst) {
  TokenBucket b(10, 1, kT0);
  ASSERT_TRUE(b.TryTake(10, kT0));
  b.Adjust(-1, kT0 + milliseconds(2000));  // 2 refilled, then 1 taken
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(2000)), 1);
}

TEST(TokenBucketTest, AnEarlierTimestampRefillsNothing) {
  TokenBucket b(10, 1, kT0);
  ASSERT_TRUE(b.TryTake(10, kT0 + milliseconds(5000)));  // full at +5s: 10 -> 0
  EXPECT_FALSE(b.TryTake(1, kT0 + milliseconds(4000)));
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(4000)), 0);
  // The time from +4s to +5s is not counted again.
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(6000)), 1);
}

}  // namespace
}  // namespace keel
