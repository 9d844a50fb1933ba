#include "keel/core/sliding_window.h"

#include <gtest/gtest.h>

namespace keel {
namespace {

TEST(SlidingWindowCountsTest, CountsAgeOutWithTheWindowAndClearEmptiesIt) {
  SlidingWindowCounts w(Duration(1000));  // slices of 100 ms
  const Timestamp t0 = FromMillis(1'700'000'000'000);
  w.Add(t0, 1, 0);
  w.Add(t0 + Duration(450), 2, 1);
  auto sum = w.Sum(t0 + Duration(500));
  EXPECT_EQ(sum.first, 3);
  EXPECT_EQ(sum.second, 1);
  sum = w.Sum(t0 + Duration(1000));  // t0's slice is a window old
  EXPECT_EQ(sum.first, 2);
  EXPECT_EQ(w.Sum(t0 + Duration(1500)).first, 0);
  w.Add(t0 + Duration(1500), 5, 5);
  w.Add(t0 + Duration(1400), 1, 0);  // the clock stepped back: counted, nothing wiped
  EXPECT_EQ(w.Sum(t0 + Duration(1500)).first, 6);
  w.Clear();
  EXPECT_EQ(w.Sum(t0 + Duration(1500)).first, 0);
}

}  // namespace
}  // namespace keel
