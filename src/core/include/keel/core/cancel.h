#pragma once
// A cancellation signal shared by whoever may end a piece of work (a client that hung up,
// a run that was cancelled, a lease that was lost, a node that drains) and the work in
// flight that must stop (an outbound call, a timer). The work registers what stops it;
// Cancel() runs that at once, on the cancelling thread. Cheap to check: cancelled() is one
// atomic load.
//
// Thread-safe. Share it by std::shared_ptr: the work holds a reference while it runs.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

namespace keel {

class CancelSignal {
 public:
  /// Cancels: every registered callback runs once, here, in registration order; later
  /// registrations run at once. Idempotent.
  void Cancel();
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

  /// Runs `fn` when the signal is cancelled (at once, on this thread, if it already is).
  /// Returns a handle for Remove(); 0 when `fn` already ran. `fn` must not call
  /// OnCancel or Remove on this signal.
  uint64_t OnCancel(std::function<void()> fn);
  /// Forgets a callback (the work ended). Safe with 0 and with a handle already run; when
  /// Cancel() is running it on another thread, returns after it ran.
  void Remove(uint64_t handle);

  /// A signal cancelled when either `a` or `b` is (each may be null). The returned signal
  /// stays registered with its parents until it is destroyed.
  static std::shared_ptr<CancelSignal> Either(const std::shared_ptr<CancelSignal>& a,
                                              const std::shared_ptr<CancelSignal>& b);

  ~CancelSignal();

 private:
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  uint64_t next_ = 1;                                  // GUARDED_BY(mu_)
  std::map<uint64_t, std::function<void()>> fns_;      // GUARDED_BY(mu_)
  std::mutex run_mu_;  // held while Cancel() runs the callbacks, so Remove() can wait them out
  std::atomic<std::thread::id> running_{};  // the thread running the callbacks, if any
  // Either(): the parents and this signal's handles in them.
  std::shared_ptr<CancelSignal> parent_a_, parent_b_;
  uint64_t handle_a_ = 0, handle_b_ = 0;
};

}  // namespace keel
