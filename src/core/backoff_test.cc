#include "keel/core/backoff.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <set>

#include "keel/core/random.h"

namespace keel {
namespace {

using std::chrono::milliseconds;

BackoffPolicy Policy(JitterMode jitter, double fraction = 0.2) {
  BackoffPolicy p;
  p.initial = milliseconds(100);
  p.multiplier = 2.0;
  p.max = milliseconds(1000);
  p.jitter = jitter;
  p.jitter_fraction = fraction;
  return p;
}

TEST(BackoffTest, DefaultsMatchTheContract) {
  const BackoffPolicy p;
  EXPECT_EQ(p.initial, milliseconds(1000));
  EXPECT_EQ(p.multiplier, 2.0);
  EXPECT_EQ(p.max, milliseconds(30000));
  EXPECT_EQ(p.jitter, JitterMode::kProportional);
  EXPECT_EQ(p.jitter_fraction, 0.2);
}

TEST(BackoffTest, GrowsExponentiallyWithoutJitter) {
  SeededRandom random(1);
  const auto p = Policy(JitterMode::kNone);
  EXPECT_EQ(ComputeBackoff(p, 1, std::nullopt, random), milliseconds(100));
  EXPECT_EQ(ComputeBackoff(p, 2, std::nullopt, random), milliseconds(200));
  EXPECT_EQ(ComputeBackoff(p, 3, std::nullopt, random), milliseconds(400));
  EXPECT_EQ(ComputeBackoff(p, 4, std::nullopt, random), milliseconds(800));
}

TEST(BackoffTest, HonoursAFractionalMultiplier) {
  SeededRandom random(1);
  auto p = Policy(JitterMode::kNone);
  p.multiplier = 1.5;
  EXPECT_EQ(ComputeBackoff(p, 1, std::nullopt, random), milliseconds(100));
  EXPECT_EQ(ComputeBackoff(p, 2, std::nullopt, random), milliseconds(150));
  EXPECT_EQ(ComputeBackoff(p, 3, std::nullopt, random), milliseconds(225));
}

TEST(BackoffTest, CapsAtMax) {
  SeededRandom random(1);
  const auto p = Policy(JitterMode::kNone);
  EXPECT_EQ(ComputeBackoff(p, 5, std::nullopt, random), milliseconds(1000));  // 1600 capped
  EXPECT_EQ(ComputeBackoff(p, 6, std::nullopt, random), milliseconds(1000));
  EXPECT_EQ(ComputeBackoff(p, 100, std::nullopt, random), milliseconds(1000));
  // 2^4999 overflows a double to infinity: still the cap, not garbage.
  EXPECT_EQ(ComputeBackoff(p, 5000, std::nullopt, random), milliseconds(1000));
}

TEST(BackoffTest, RetryZeroOrNegativeIsTheFirstDelay) {
  SeededRandom random(1);
  const auto p = Policy(JitterMode::kNone);
  EXPECT_EQ(ComputeBackoff(p, 0, std::nullopt, random), milliseconds(100));
  EXPECT_EQ(ComputeBackoff(p, -3, std::nullopt, random), milliseconds(100));
}

TEST(BackoffTest, MultiplierBelowOneDoesNotShrinkTheDelay) {
  SeededRandom random(1);
  auto p = Policy(JitterMode::kNone);
  p.multiplier = 0.5;
  EXPECT_EQ(ComputeBackoff(p, 1, std::nullopt, random), milliseconds(100));
  EXPECT_EQ(ComputeBackoff(p, 4, std::nullopt, random), milliseconds(100));
}

TEST(BackoffTest, FullJitterStaysWithinZeroAndTheDelay) {
  SeededRandom random(42);
  const auto p = Policy(JitterMode::kFull);
  for (int retry = 1; retry <= 6; ++retry) {
    const milliseconds bound = std::min(milliseconds(100 << (retry - 1)), milliseconds(1000));
    std::set<int64_t> seen;
    int below_half = 0;
    for (int i = 0; i < 500; ++i) {
      const auto d = ComputeBackoff(p, retry, std::nullopt, random);
      ASSERT_GE(d.count(), 0) << "retry " << retry;
      ASSERT_LE(d, bound) << "retry " << retry;
      seen.insert(d.count());
      if (d < bound / 2) ++below_half;
    }
    // Uniform over [0, bound]: spread out, and about half of the draws in the lower half.
    EXPECT_GT(seen.size(), 50u) << "retry " << retry;
    EXPECT_GT(below_half, 150) << "retry " << retry;
    EXPECT_LT(below_half, 350) << "retry " << retry;
  }
}

TEST(BackoffTest, ProportionalJitterStaysWithinTheFraction) {
  SeededRandom random(7);
  const auto p = Policy(JitterMode::kProportional, 0.2);
  // retry 3: 400ms, so [320, 480].
  int64_t lo = 1'000'000;
  int64_t hi = 0;
  for (int i = 0; i < 1000; ++i) {
    const auto d = ComputeBackoff(p, 3, std::nullopt, random).count();
    ASSERT_GE(d, 320);
    ASSERT_LE(d, 480);
    lo = std::min(lo, d);
    hi = std::max(hi, d);
  }
  // The draws cover most of the range, on both sides of the exact delay.
  EXPECT_LT(lo, 340);
  EXPECT_GT(hi, 460);
}

TEST(BackoffTest, ProportionalJitterNeverExceedsMax) {
  SeededRandom random(7);
  const auto p = Policy(JitterMode::kProportional, 0.5);
  bool below_max = false;
  for (int i = 0; i < 1000; ++i) {
    // retry 10: capped at 1000 before jitter; the jitter may lower it but not raise it.
    const auto d = ComputeBackoff(p, 10, std::nullopt, random);
    ASSERT_GE(d, milliseconds(500));
    ASSERT_LE(d, milliseconds(1000));
    below_max = below_max || d < milliseconds(1000);
  }
  EXPECT_TRUE(below_max);
}

TEST(BackoffTest, ProportionalJitterWithZeroFractionIsExact) {
  SeededRandom random(7);
  const auto p = Policy(JitterMode::kProportional, 0.0);
  for (int i = 0; i < 100; ++i) {
    ASSERT_EQ(ComputeBackoff(p, 2, std::nullopt, random), milliseconds(200));
  }
}

TEST(BackoffTest, SameSeedSameSequence) {
  SeededRandom a(99);
  SeededRandom b(99);
  const auto p = Policy(JitterMode::kFull);
  for (int i = 0; i < 50; ++i) {
    ASSERT_EQ(ComputeBackoff(p, 4, std::nullopt, a), ComputeBackoff(p, 4, std::nullopt, b));
  }
}

TEST(BackoffTest, RetryAfterIsALowerBoundEvenPastMax) {
  SeededRandom random(3);
  for (const auto mode : {JitterMode::kNone, JitterMode::kFull, JitterMode::kProportional}) {
    const auto p = Policy(mode);
    // Longer than the cap: honoured exactly.
    EXPECT_EQ(ComputeBackoff(p, 1, milliseconds(5000), random), milliseconds(5000));
    EXPECT_EQ(ComputeBackoff(p, 20, milliseconds(3000), random), milliseconds(3000));
    for (int i = 0; i < 200; ++i) {
      // Shorter than the backoff: never sooner than Retry-After.
      ASSERT_GE(ComputeBackoff(p, 3, milliseconds(350), random), milliseconds(350));
    }
  }
}

TEST(BackoffTest, ShortRetryAfterDoesNotShortenTheBackoff) {
  SeededRandom random(3);
  const auto p = Policy(JitterMode::kNone);
  EXPECT_EQ(ComputeBackoff(p, 4, milliseconds(10), random), milliseconds(800));
  EXPECT_EQ(ComputeBackoff(p, 4, milliseconds(0), random), milliseconds(800));
}

}  // namespace
}  // namespace keel
