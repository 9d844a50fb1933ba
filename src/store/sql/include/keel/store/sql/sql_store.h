#pragma once
// The Store on SQL, written once for every SQL backend (SQLite, PostgreSQL): runs, step
// checkpoints, events, the queue with leases, tasks, signals. A backend supplies
// transactions (Transact, Snapshot) over its connections (sql.h) and may act on commits
// (Committed: e.g. tell other nodes that work is due).
//
// Concurrency: every write that acts on a run takes the run's lock (Conn::Lock) before it
// reads anything of it, so that backends with concurrent transactions see the same
// serial order of a run's writes as a single writer does. Leasing skips rows and runs
// locked by others instead of waiting for them. docs/storage.md has the protocol.

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/random.h"
#include "keel/store/sql/sql.h"
#include "keel/store/store.h"

namespace keel::store::sql {

/// What one write transaction sees and leaves behind.
struct Txn {
  /// The store's clock when the transaction began.
  Timestamp now{};
  /// Queue rows as of this write, when the backend knows them without a query (SQLite's
  /// single writer keeps the count); -1: count them.
  int64_t queue_rows = -1;
  /// This write's change to the queue row count.
  int64_t queue_delta = 0;
  /// Definition ids this write inserted.
  std::vector<std::string> new_definitions;
  /// A run became due at once (queued, woken, released, redriven): workers should look.
  bool work_due = false;
  /// A task became pending: long polls should look.
  bool task_queued = false;
  /// Events this write appends, written together when its work is done.
  struct Event {
    std::string run_id;
    std::string type;
    std::string step_id;
    int attempt = 0;
    json::value data;
  };
  std::vector<Event> events;
};

class SqlStore : public Store {
 public:
  ~SqlStore() override = default;

  Result<SubmitResult> SubmitRun(const NewRun& run) override;
  Result<RunRecord> GetRun(const std::string& run_id) override;
  Result<RunPage> ListRuns(const RunFilter& filter) override;
  Result<std::vector<Event>> ListEvents(const std::string& run_id, int64_t after_seq, int limit) override;
  Result<std::optional<LeasedRun>> LeaseRun(const std::string& worker_id, Duration lease_for) override;
  Result<Timestamp> Heartbeat(const Lease& lease, Duration lease_for) override;
  Result<int> StartStep(const Lease& lease, const std::string& step_id) override;
  Result<int> RestartInterruptedStep(const Lease& lease, const std::string& step_id) override;
  Result<int> CompleteStep(const Lease& lease, const std::string& step_id, const json::value& output,
                           const std::optional<std::string>& next_step,
                           const std::optional<json::value>& run_output) override;
  Result<void> FailStep(const Lease& lease, const std::string& step_id, const Error& error,
                        const FailureDisposition& disposition) override;
  Result<void> SuspendStep(const Lease& lease, const std::string& step_id, std::optional<Timestamp> wake_at,
                           const json::value& waiting) override;
  Result<void> CompleteItem(const Lease& lease, const std::string& step_id, int64_t index,
                            const json::value& output) override;
  Result<std::vector<ItemRecord>> ListItems(const std::string& run_id, const std::string& step_id,
                                            int64_t after_index, int limit, bool with_outputs) override;
  Result<RunRecord> SendSignal(const std::string& run_id, const std::string& name, const json::value& payload) override;
  Result<TaskRecord> EnsureTask(const Lease& lease, const std::string& step_id, int attempt, const std::string& queue,
                                const json::value& input, Duration heartbeat_timeout) override;
  Result<std::optional<TaskRecord>> LeaseTask(const std::string& queue, const std::string& worker_id) override;
  Result<TaskRecord> HeartbeatTask(const std::string& token) override;
  Result<TaskRecord> CompleteTask(const std::string& token, const json::value& output) override;
  Result<TaskRecord> FailTask(const std::string& token, const Error& error, bool retryable) override;
  void WaitForTask(const std::string& queue, Duration max) override;
  uint64_t AddTaskListener(std::function<void()> listener) override;
  void RemoveTaskListener(uint64_t handle) override;
  Result<void> ExpireTask(const Lease& lease, const std::string& token) override;
  Result<void> FailRun(const Lease& lease, const Error& error) override;
  Result<void> ReleaseLease(const Lease& lease) override;
  Result<RunRecord> CancelRun(const std::string& run_id) override;
  Result<RunRecord> RedriveRun(const std::string& run_id) override;
  Result<StoreStats> GetStats() override;
  Result<std::optional<Timestamp>> NextDueAt() override;
  void SetWorkListener(std::function<void()> listener) override;

 protected:
  /// `clock` and `random` must outlive the store.
  SqlStore(const Clock& clock, Random& random) : clock_(clock), random_(random) {}

  /// Runs `fn` in one write transaction and returns once it committed (or the error that
  /// kept it from committing). `fn` returns false to roll its work back (the call then
  /// still succeeds: the error is the op's). Before each call of `fn` the backend sets
  /// `txn` afresh (now, and queue_rows when it knows them); a backend may call `fn` again
  /// after an SqlError of kind kRetry or kConnection raised before the commit.
  virtual Result<void> Transact(const std::function<bool(Conn&, Txn&)>& fn, Txn& txn) = 0;

  /// Runs `fn` in one read-only transaction: a consistent snapshot.
  virtual Result<void> Snapshot(const std::function<void(Conn&)>& fn) = 0;

  /// Called after a write committed: wakes this process's workers and task waiters. A
  /// backend shared by several nodes also tells the others (and calls this base).
  virtual void Committed(const Txn& txn);

  /// For backends: work became due, or a task was queued, on another node.
  void WorkArrived();
  void TasksArrived();

  const Clock& clock_;
  Random& random_;

 private:
  struct Unit {};
  template <typename T, typename R = std::conditional_t<std::is_same_v<T, Unit>, void, T>>
  Result<R> Write(const std::function<Result<T>(Conn&, Txn&)>& fn);
  template <typename T>
  Result<T> Read(const std::function<Result<T>(Conn&)>& fn);

  // Runs `fn` on the task of `token` under its run's lock.
  Result<TaskRecord> WithHeldTask(const std::string& token,
                                  const std::function<Result<TaskRecord>(Conn&, Txn&, const TaskRecord&)>& fn);
  bool KnownDefinition(const std::string& id);

  std::mutex definitions_mu_;
  std::unordered_set<std::string> known_definitions_;  // GUARDED_BY(definitions_mu_); committed ids

  // The last count of the queue, for submits far from max_queue_depth (SubmitRun).
  struct QueueCount {
    int64_t rows = 0;
    std::chrono::steady_clock::time_point at;
    int64_t submitted_since = 0;  // queue rows this store added since
  };
  static constexpr std::chrono::milliseconds kCountFor{100};
  std::mutex queue_count_mu_;
  std::optional<QueueCount> queue_count_;  // GUARDED_BY(queue_count_mu_)

  std::mutex listener_mu_;
  std::function<void()> listener_;  // GUARDED_BY(listener_mu_)

  std::mutex task_mu_;
  std::condition_variable task_cv_;
  uint64_t task_seq_ = 0;  // GUARDED_BY(task_mu_): task arrivals so far
  // Held while the task listeners run, so that RemoveTaskListener can wait them out.
  std::mutex task_listeners_mu_;
  std::map<uint64_t, std::function<void()>> task_listeners_;  // GUARDED_BY(task_listeners_mu_)
  uint64_t next_task_listener_ = 1;                           // GUARDED_BY(task_listeners_mu_)
};

}  // namespace keel::store::sql
