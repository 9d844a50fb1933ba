#include "keel/core/timer.h"

#include <algorithm>
#include <memory>

namespace keel {

void Timer::Sleep(Duration delay) {
  if (delay.count() <= 0) return;
  struct Wake {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;  // GUARDED_BY(mu)
  };
  // Shared with the callback, which may still be inside notify_all when the wait returns.
  auto wake = std::make_shared<Wake>();
  After(delay, [wake] {
    std::lock_guard lock(wake->mu);
    wake->done = true;
    wake->cv.notify_all();
  });
  std::unique_lock lock(wake->mu);
  wake->cv.wait(lock, [&] { return wake->done; });
}

SystemTimer::~SystemTimer() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void SystemTimer::After(Duration delay, std::function<void()> fn) {
  const auto due = std::chrono::steady_clock::now() + std::max(delay, Duration(0));
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    pending_.emplace(due, std::move(fn));
    if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
  }
  cv_.notify_all();
}

void SystemTimer::Sleep(Duration delay) {
  if (delay.count() > 0) std::this_thread::sleep_for(delay);
}

void SystemTimer::Loop() {
  std::unique_lock lock(mu_);
  while (!stop_) {
    if (pending_.empty()) {
      cv_.wait(lock);
      continue;
    }
    const auto due = pending_.begin()->first;
    if (std::chrono::steady_clock::now() < due) {
      cv_.wait_until(lock, due);  // an earlier After, or stop, wakes it sooner
      continue;
    }
    auto fn = std::move(pending_.begin()->second);
    pending_.erase(pending_.begin());
    lock.unlock();
    fn();
    lock.lock();
  }
}

SystemTimer* SystemTimer::Instance() {
  static auto* timer = new SystemTimer();
  return timer;
}

void ManualTimer::After(Duration delay, std::function<void()> fn) {
  const Timestamp due = clock_.Now() + std::max(delay, Duration(0));
  std::lock_guard lock(mu_);
  pending_.emplace(due, std::move(fn));  // after those due at the same time
}

int ManualTimer::Advance(Duration d) {
  std::lock_guard advancing(advance_mu_);
  const Timestamp until = clock_.Now() + std::max(d, Duration(0));
  const int ran = RunUntil(until);
  if (clock_.Now() < until) clock_.Set(until);
  return ran;
}

bool ManualTimer::AdvanceToNext() {
  std::lock_guard advancing(advance_mu_);
  const auto due = next_due();
  if (!due) return false;
  RunUntil(std::max(*due, clock_.Now()));
  return true;
}

int ManualTimer::RunDue() {
  std::lock_guard advancing(advance_mu_);
  return RunUntil(clock_.Now());
}

int ManualTimer::RunUntil(Timestamp until) {
  int ran = 0;
  while (true) {
    std::function<void()> fn;
    Timestamp due;
    {
      std::lock_guard lock(mu_);
      if (pending_.empty() || pending_.begin()->first > until) break;
      due = pending_.begin()->first;
      fn = std::move(pending_.begin()->second);
      pending_.erase(pending_.begin());
    }
    if (clock_.Now() < due) clock_.Set(due);
    fn();
    ++ran;
  }
  return ran;
}

std::size_t ManualTimer::pending() const {
  std::lock_guard lock(mu_);
  return pending_.size();
}

std::optional<Timestamp> ManualTimer::next_due() const {
  std::lock_guard lock(mu_);
  if (pending_.empty()) return std::nullopt;
  return pending_.begin()->first;
}

}  // namespace keel
