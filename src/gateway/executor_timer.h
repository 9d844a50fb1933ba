#pragma once
// A Timer (keel/core/timer.h) on an Asio executor, private to keel_gateway: the real timer
// of the gateway's asynchronous path, so that a backoff holds no thread and its callback
// runs on the call's own executor (an I/O thread), as the rest of the call does.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <functional>
#include <memory>

#include "keel/core/timer.h"

namespace keel::gateway::detail {

/// Callbacks run on `executor` (a pending wait keeps its io_context running), after
/// std::chrono::steady_clock's `delay`; cheap to make, one per call. Thread-safe. Sleep
/// (the default: After, then a wait) must not be called from a thread that runs
/// `executor`. A pending callback keeps only what it captures alive; the timer object may
/// go first.
class ExecutorTimer final : public Timer {
 public:
  explicit ExecutorTimer(boost::asio::any_io_executor executor) : executor_(std::move(executor)) {}

  void After(Duration delay, std::function<void()> fn) override {
    auto timer = std::make_shared<boost::asio::steady_timer>(executor_, delay);
    timer->async_wait([timer, fn = std::move(fn)](boost::system::error_code) { fn(); });
  }

 private:
  boost::asio::any_io_executor executor_;
};

}  // namespace keel::gateway::detail
