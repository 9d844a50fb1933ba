#include "keel/core/lru.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

namespace keel {
namespace {

TEST(LruMapTest, KeepsTheMostRecentlyUsedWithinItsBound) {
  LruMap<int> lru(2);
  lru.Put("a", 1);
  lru.Put("b", 2);
  ASSERT_EQ(lru.Get("a"), 1);  // a is now the most recently used
  lru.Put("c", 3);             // so b goes
  EXPECT_EQ(lru.Get("b"), std::nullopt);
  EXPECT_EQ(lru.Get("a"), 1);
  EXPECT_EQ(lru.Get("c"), 3);
  EXPECT_EQ(lru.size(), 2u);
}

TEST(LruMapTest, PutReplacesAndEraseForgets) {
  LruMap<std::string> lru(3);
  lru.Put("k", "old");
  lru.Put("k", "new");
  EXPECT_EQ(lru.size(), 1u);
  EXPECT_EQ(lru.Get("k"), "new");
  lru.Erase("k");
  lru.Erase("never there");
  EXPECT_EQ(lru.Get("k"), std::nullopt);
  EXPECT_EQ(lru.size(), 0u);
}

TEST(LruMapTest, ABoundBelowOneKeepsOne) {
  LruMap<int> lru(0);
  lru.Put("a", 1);
  lru.Put("b", 2);
  EXPECT_EQ(lru.size(), 1u);
  EXPECT_EQ(lru.Get("b"), 2);
}

TEST(LruMapTest, ConcurrentUseStaysWithinTheBound) {
  LruMap<int> lru(50);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        lru.Put(std::to_string(t * 10000 + i), i);
        (void)lru.Get(std::to_string(t * 10000 + i / 2));
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(lru.size(), 50u);
}

}  // namespace
}  // namespace keel
