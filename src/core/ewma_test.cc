#include "keel/core/ewma.h"

#include <gtest/gtest.h>

#include <cmath>

#include "keel/core/clock.h"

namespace keel {
namespace {

using std::chrono::milliseconds;

const Timestamp kT0 = FromMillis(1'700'000'000'000);

TEST(EwmaTest, NoValueBeforeTheFirstSample) {
  Ewma e;
  EXPECT_FALSE(e.value().has_value());
}

TEST(EwmaTest, TheFirstSampleIsTheValue) {
  Ewma e;
  e.Observe(123.5, kT0);
  ASSERT_TRUE(e.value().has_value());
  EXPECT_DOUBLE_EQ(*e.value(), 123.5);
}

TEST(EwmaTest, AfterOneHalfLifeTheOldAverageAndANewSampleWeighEqually) {
  Ewma e;  // 10s
  e.Observe(100, kT0);
  e.Observe(200, kT0 + milliseconds(10000));
  EXPECT_DOUBLE_EQ(*e.value(), 150);
}

TEST(EwmaTest, AfterTwoHalfLivesTheOldAverageKeepsAQuarter) {
  Ewma e(milliseconds(10000));
  e.Observe(100, kT0);
  e.Observe(200, kT0 + milliseconds(20000));
  EXPECT_DOUBLE_EQ(*e.value(), 175);
}

TEST(EwmaTest, HonoursTheHalfLife) {
  Ewma e(milliseconds(1000));
  e.Observe(10, kT0);
  e.Observe(20, kT0 + milliseconds(1000));
  EXPECT_DOUBLE_EQ(*e.value(), 15);
}

TEST(EwmaTest, ASampleSoonAfterMovesTheAverageLittle) {
  Ewma e;
  e.Observe(100, kT0);
  e.Observe(200, kT0 + milliseconds(100));
  const double w = std::exp2(-100.0 / 10000.0);
  EXPECT_NEAR(*e.value(), 100 * w + 200 * (1 - w), 1e-9);
  EXPECT_GT(*e.value(), 100.5);
  EXPECT_LT(*e.value(), 101);
}

TEST(EwmaTest, ALongGapMakesTheNewSampleDominate) {
  Ewma e;
  e.Observe(5000, kT0);
  e.Observe(5000, kT0 + milliseconds(1000));
  e.Observe(20, kT0 + milliseconds(601'000));  // 60 half-lives later
  EXPECT_NEAR(*e.value(), 20, 1e-9);
}

TEST(EwmaTest, DecaysWithTimeNotWithTheNumberOfSamples) {
  // Two steps of half a half-life each weigh the first sample as one step of a half-life.
  Ewma stepped;
  stepped.Observe(0, kT0);
  stepped.Observe(100, kT0 + milliseconds(5000));
  stepped.Observe(100, kT0 + milliseconds(10000));
  Ewma once;
  once.Observe(0, kT0);
  once.Observe(100, kT0 + milliseconds(10000));
  EXPECT_NEAR(*stepped.value(), 50, 1e-9);
  EXPECT_NEAR(*stepped.value(), *once.value(), 1e-9);
}

TEST(EwmaTest, ASteadyInputIsItsOwnAverage) {
  Ewma e;
  for (int i = 0; i < 50; ++i) e.Observe(42, kT0 + milliseconds(i * 777));
  EXPECT_NEAR(*e.value(), 42, 1e-9);
}

TEST(EwmaTest, ASampleAtTheSameOrAnEarlierInstantHasNoWeight) {
  Ewma e;
  e.Observe(100, kT0 + milliseconds(1000));
  e.Observe(900, kT0 + milliseconds(1000));
  e.Observe(900, kT0);
  EXPECT_DOUBLE_EQ(*e.value(), 100);
  // And the clock is not moved back: the next gap is measured from +1s.
  e.Observe(200, kT0 + milliseconds(11000));
  EXPECT_DOUBLE_EQ(*e.value(), 150);
}

}  // namespace
}  // namespace keel
