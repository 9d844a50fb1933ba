#pragma once
// The long polls of POST /v1/tasks/poll, private to keel_api: a poll that finds no task
// waits here holding no thread (docs/api.md, "Tasks"). A waiting poll is a record with a
// timer on its connection's executor; it is answered when a task is queued on its queue
// (the store's task listener, Store::SetTaskListener, or a look once a second for stores
// that do not notify), when its wait_ms ends (204), or when the node drains (204). A
// poller that hung up is forgotten at once and gets no task.
//
// Polls of one queue are served in the order they began. The store calls (LeaseTask) run
// on the API's handler pool, never on an I/O thread.
//
// Thread-safe. Stop() before destruction; the server's I/O threads must be stopped (or
// stop running the timers) before this object goes.

#include <atomic>
#include <chrono>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "keel/core/result.h"
#include "keel/net/http_server.h"
#include "keel/net/worker_pool.h"
#include "keel/store/store.h"

namespace keel::api {

class TaskPolls {
 public:
  /// What a poll comes to: a task, none (204), or a store error.
  using Outcome = Result<std::optional<store::TaskRecord>>;
  /// Answers `respond` with the outcome (the API's JSON and metrics); runs once per poll,
  /// on a pool thread or an I/O thread.
  using Answer = std::function<void(const net::Responder& respond, Outcome outcome)>;

  /// `store` and `pool` must outlive this object.
  TaskPolls(store::Store& store, net::WorkerPool& pool, Answer answer);
  ~TaskPolls();
  TaskPolls(const TaskPolls&) = delete;
  TaskPolls& operator=(const TaskPolls&) = delete;

  /// A poll of `queue` by `worker_id` that found no task, waiting at most `wait`. After
  /// Stop(), answered at once with none.
  void Wait(std::string queue, std::string worker_id, std::chrono::milliseconds wait,
            net::Responder respond);

  /// A task may have been queued: the waiting polls look again (soon, on the pool).
  /// Cheap; callable from any thread, store threads included.
  void Notify();

  /// Answers every waiting poll with none (a drain) and every later one at once.
  /// Idempotent.
  void Stop();

  /// Polls waiting now.
  std::size_t waiting() const;

 private:
  struct Waiter;
  using Queue = std::list<std::shared_ptr<Waiter>>;

  // Forgets `w` if it is still listed. Caller holds mu_.
  void Unlist(Waiter& w);
  // The poll's hang-up watch, to Remove outside mu_ (0 once taken).
  uint64_t TakeGoneHandle(Waiter& w);
  void ArmTimer(const std::shared_ptr<Waiter>& w);
  // On the pool: each queue with waiters, its oldest live waiter gets a lease attempt,
  // until the queue has no task or no waiter.
  void Sweep();

  store::Store& store_;
  net::WorkerPool& pool_;
  const Answer answer_;
  mutable std::mutex mu_;
  std::map<std::string, Queue> queues_;  // GUARDED_BY(mu_); no empty queue is kept
  std::size_t waiting_ = 0;              // GUARDED_BY(mu_)
  bool stopped_ = false;                 // GUARDED_BY(mu_)
  // A sweep is queued or running; a Notify during one asks for another after it.
  std::atomic<bool> sweep_queued_{false};
  std::atomic<bool> sweep_again_{false};
};

}  // namespace keel::api
