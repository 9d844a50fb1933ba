#include "keel/core/cancel.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace keel {
namespace {

TEST(CancelSignalTest, RunsEachCallbackOnceInOrder) {
  CancelSignal s;
  std::vector<int> ran;
  s.OnCancel([&] { ran.push_back(1); });
  s.OnCancel([&] { ran.push_back(2); });
  EXPECT_FALSE(s.cancelled());
  s.Cancel();
  s.Cancel();
  EXPECT_TRUE(s.cancelled());
  EXPECT_EQ(ran, (std::vector<int>{1, 2}));
}

TEST(CancelSignalTest, ARegistrationAfterCancelRunsAtOnce) {
  CancelSignal s;
  s.Cancel();
  bool ran = false;
  EXPECT_EQ(s.OnCancel([&] { ran = true; }), 0u);
  EXPECT_TRUE(ran);
}

TEST(CancelSignalTest, ARemovedCallbackDoesNotRun) {
  CancelSignal s;
  bool ran = false;
  const auto h = s.OnCancel([&] { ran = true; });
  s.Remove(h);
  s.Remove(h);
  s.Remove(0);
  s.Cancel();
  EXPECT_FALSE(ran);
}

TEST(CancelSignalTest, EitherParentCancelsTheChild) {
  auto a = std::make_shared<CancelSignal>();
  auto b = std::make_shared<CancelSignal>();
  auto child = CancelSignal::Either(a, b);
  bool ran = false;
  child->OnCancel([&] { ran = true; });
  b->Cancel();
  EXPECT_TRUE(child->cancelled());
  EXPECT_TRUE(ran);
  EXPECT_FALSE(a->cancelled());
  auto lone = CancelSignal::Either(nullptr, a);
  a->Cancel();
  EXPECT_TRUE(lone->cancelled());
}

TEST(CancelSignalTest, AChildWhoseLastReferenceGoesInsideTheParentsCancelDoesNotDeadlock) {
  auto parent = std::make_shared<CancelSignal>();
  std::shared_ptr<CancelSignal> child = CancelSignal::Either(parent, nullptr);
  child->OnCancel([&child] { child.reset(); });  // the child ends while the parent cancels
  parent->Cancel();
  EXPECT_EQ(child, nullptr);
}

TEST(CancelSignalTest, RemoveWaitsForACallbackRunningOnAnotherThread) {
  CancelSignal s;
  std::atomic<bool> entered{false}, release{false}, finished{false};
  const auto h = s.OnCancel([&] {
    entered = true;
    while (!release) std::this_thread::yield();
    finished = true;
  });
  std::thread t([&] { s.Cancel(); });
  while (!entered) std::this_thread::yield();
  std::thread remover([&] {
    s.Remove(h);
    EXPECT_TRUE(finished.load());
  });
  release = true;
  remover.join();
  t.join();
}

}  // namespace
}  // namespace keel
