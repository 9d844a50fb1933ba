#include "keel/core/cancel.h"

#include <thread>

namespace keel {

void CancelSignal::Cancel() {
  std::lock_guard run(run_mu_);
  std::map<uint64_t, std::function<void()>> fns;
  {
    std::lock_guard lock(mu_);
    if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
    fns.swap(fns_);
  }
  running_.store(std::this_thread::get_id());
  for (auto& [id, fn] : fns) fn();
  running_.store(std::thread::id());
}

uint64_t CancelSignal::OnCancel(std::function<void()> fn) {
  {
    std::lock_guard lock(mu_);
    if (!cancelled_.load(std::memory_order_acquire)) {
      const uint64_t id = next_++;
      fns_.emplace(id, std::move(fn));
      return id;
    }
  }
  fn();
  return 0;
}

void CancelSignal::Remove(uint64_t handle) {
  if (handle == 0) return;
  {
    std::lock_guard lock(mu_);
    if (fns_.erase(handle) > 0) return;
  }
  // Cancel() may be running it now: wait until it is done, unless this thread is the one
  // running it (a callback that let the last reference of a signal made by Either() go).
  if (running_.load() == std::this_thread::get_id()) return;
  std::lock_guard run(run_mu_);
}

std::shared_ptr<CancelSignal> CancelSignal::Either(const std::shared_ptr<CancelSignal>& a,
                                                   const std::shared_ptr<CancelSignal>& b) {
  auto out = std::make_shared<CancelSignal>();
  std::weak_ptr<CancelSignal> weak = out;
  auto forward = [weak] {
    if (auto s = weak.lock()) s->Cancel();
  };
  if (a) {
    out->parent_a_ = a;
    out->handle_a_ = a->OnCancel(forward);
  }
  if (b) {
    out->parent_b_ = b;
    out->handle_b_ = b->OnCancel(forward);
  }
  return out;
}

CancelSignal::~CancelSignal() {
  if (parent_a_) parent_a_->Remove(handle_a_);
  if (parent_b_) parent_b_->Remove(handle_b_);
}

}  // namespace keel
