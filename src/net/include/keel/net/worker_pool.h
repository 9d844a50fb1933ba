#pragma once
// A fixed pool of threads running submitted tasks in FIFO order: where blocking work
// (storage calls) runs so that it never stalls an I/O thread.

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace keel::net {

class WorkerPool {
 public:
  /// Starts `threads` threads. `max_queue` bounds tasks waiting (0: unbounded).
  WorkerPool(int threads, std::size_t max_queue = 0);
  /// Stop()s.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// Queues `task`; false (task dropped) when the queue is full or the pool stopped.
  bool Submit(std::function<void()> task);
  /// Runs what is queued, then joins the threads. Idempotent.
  void Stop();

 private:
  void Loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // GUARDED_BY(mu_)
  bool stopping_ = false;                    // GUARDED_BY(mu_)
  std::size_t max_queue_;
  std::vector<std::thread> threads_;
};

}  // namespace keel::net
