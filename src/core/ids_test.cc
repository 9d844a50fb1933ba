#include "keel/core/ids.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/random.h"

namespace keel {
namespace {

constexpr std::string_view kCrockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

bool AllIn(std::string_view s, std::string_view alphabet) {
  return std::all_of(s.begin(), s.end(),
                     [&](char c) { return alphabet.find(c) != std::string_view::npos; });
}

// Decodes the 10 time characters of a ULID back to milliseconds.
int64_t UlidMillis(std::string_view ulid) {
  int64_t ms = 0;
  for (char c : ulid.substr(0, 10)) ms = ms * 32 + static_cast<int64_t>(kCrockford.find(c));
  return ms;
}

TEST(IdsTest, UlidHasTwentySixCrockfordChars) {
  SeededRandom random(1);
  ManualClock clock;
  for (int i = 0; i < 100; ++i) {
    const std::string id = NewUlid(clock.Now(), random);
    ASSERT_EQ(id.size(), 26u) << id;
    ASSERT_TRUE(AllIn(id, kCrockford)) << id;
  }
}

TEST(IdsTest, UlidEncodesTheTimestamp) {
  SeededRandom random(1);
  const Timestamp t = FromMillis(1'700'000'123'456);
  const std::string id = NewUlid(t, random);
  EXPECT_EQ(UlidMillis(id), 1'700'000'123'456);
  EXPECT_EQ(NewUlid(FromMillis(0), random).substr(0, 10), "0000000000");
  // The largest 48-bit time is "7ZZZZZZZZZ".
  EXPECT_EQ(NewUlid(FromMillis((int64_t{1} << 48) - 1), random).substr(0, 10), "7ZZZZZZZZZ");
}

TEST(IdsTest, LaterTimestampSortsAfter) {
  SeededRandom random(5);
  ManualClock clock;
  std::string prev = NewUlid(clock.Now(), random);
  for (int i = 0; i < 1000; ++i) {
    // Steps of 1 ms and of larger amounts, so that carries across characters happen.
    clock.Advance(Duration(i % 7 == 0 ? 1 : 37 * i));
    const std::string next = NewUlid(clock.Now(), random);
    ASSERT_LT(prev, next) << "at step " << i;
    prev = next;
  }
}

TEST(IdsTest, RunIdsSortByTime) {
  SeededRandom random(5);
  const std::string a = NewRunId(FromMillis(1'700'000'000'000), random);
  const std::string b = NewRunId(FromMillis(1'700'000'000'001), random);
  const std::string c = NewRunId(FromMillis(1'800'000'000'000), random);
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
}

TEST(IdsTest, RunIdIsPrefixedUlid) {
  SeededRandom random(9);
  const std::string id = NewRunId(FromMillis(1'700'000'000'000), random);
  ASSERT_EQ(id.size(), 30u);
  EXPECT_EQ(id.substr(0, 4), "run_");
  EXPECT_TRUE(AllIn(id.substr(4), kCrockford)) << id;
  EXPECT_EQ(UlidMillis(id.substr(4)), 1'700'000'000'000);
}

TEST(IdsTest, UlidsAreUniqueAtTheSameMillisecond) {
  SeededRandom random(11);
  const Timestamp t = FromMillis(1'700'000'000'000);
  std::set<std::string> ids;
  for (int i = 0; i < 20000; ++i) ids.insert(NewUlid(t, random));
  EXPECT_EQ(ids.size(), 20000u);
}

TEST(IdsTest, RandomPartUsesTheWholeAlphabet) {
  // 80 random bits: over many ids every character position of the random part takes
  // many values (a stuck or shifted-out part would not).
  SeededRandom random(13);
  const Timestamp t = FromMillis(1'700'000'000'000);
  std::vector<std::set<char>> per_position(16);
  for (int i = 0; i < 2000; ++i) {
    const std::string id = NewUlid(t, random);
    for (int p = 0; p < 16; ++p) per_position[p].insert(id[10 + p]);
  }
  for (int p = 0; p < 16; ++p) EXPECT_EQ(per_position[p].size(), 32u) << "position " << 10 + p;
}

TEST(IdsTest, SameSeedSameIds) {
  SeededRandom a(21);
  SeededRandom b(21);
  const Timestamp t = FromMillis(1'700'000'000'000);
  EXPECT_EQ(NewUlid(t, a), NewUlid(t, b));
  EXPECT_EQ(NewToken(a), NewToken(b));
}

TEST(IdsTest, TokenIsThirtyTwoLowercaseHex) {
  SeededRandom random(17);
  std::set<std::string> tokens;
  for (int i = 0; i < 10000; ++i) {
    const std::string token = NewToken(random);
    ASSERT_EQ(token.size(), 32u) << token;
    ASSERT_TRUE(AllIn(token, "0123456789abcdef")) << token;
    tokens.insert(token);
  }
  EXPECT_EQ(tokens.size(), 10000u);
}

}  // namespace
}  // namespace keel

namespace keel {
namespace {

TEST(Fnv1a64Test, MatchesTheReferenceValuesAndIsStable) {
  EXPECT_EQ(Fnv1a64(""), 0xcbf29ce484222325ull);  // the FNV-1a 64 offset basis
  EXPECT_EQ(Fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(Fnv1a64("foobar"), 0x85944171f73967e8ull);
  EXPECT_NE(Fnv1a64("ab"), Fnv1a64("ba"));
}

}  // namespace
}  // namespace keel
