#pragma once
// The Store: everything keel must not lose. Runs, their step checkpoints, the append-only
// event log, the run queue with leases, idempotency keys and the dead-letter queue.
// docs/storage.md describes the schema and the lease protocol.
//
// Contract shared by every implementation (tests/conformance/ checks it):
//  - Every mutating call returns only after its effect is durably committed.
//  - Calls are thread-safe; implementations may group concurrent commits.
//  - Calls bound to a Lease fail with kLeaseLost when the lease expired (by the store's
//    clock), was superseded, or the run was cancelled; they then change nothing.
//  - Records returned are copies owned by the caller.

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel::store {

enum class RunStatus { kQueued, kRunning, kWaiting, kSucceeded, kFailed, kCancelled, kDeadLettered };
std::string_view RunStatusName(RunStatus s);
std::optional<RunStatus> RunStatusFromName(std::string_view name);
bool IsTerminal(RunStatus s);
inline constexpr RunStatus kAllRunStatuses[] = {RunStatus::kQueued,    RunStatus::kRunning,
                                                RunStatus::kWaiting,   RunStatus::kSucceeded,
                                                RunStatus::kFailed,    RunStatus::kCancelled,
                                                RunStatus::kDeadLettered};

enum class StepStatus {
  kRunning,    // an attempt is in flight (or was, at a crash)
  kRetrying,   // the last attempt failed; the next waits for its backoff
  kSucceeded,  // checkpointed: never executed again for this run
  kFailed,     // the run ended on this step's error
  kWaiting,    // parked (a timer, a signal, an external task, a child run): the attempt goes on
};
std::string_view StepStatusName(StepStatus s);

struct StepRecord {
  std::string step_id;
  StepStatus status = StepStatus::kRunning;
  int attempts = 0;  // attempts started, the current one included
  /// Of `attempts`, those cut short because their node was lost (its lease expired with
  /// the attempt in flight: a crash, a wedged worker) or drained: they count against the
  /// engine's max_interrupted_attempts, not the step's max_attempts.
  int interrupted = 0;
  /// Of `attempts`, those made before the run's last redrive: they count for nothing
  /// now, but numbering goes on past them, so that each attempt's task and child run are
  /// its own (a redriven task step queues a new task; a redriven pipeline step makes a new
  /// child run). The step's attempts that count are attempts - prior_attempts - interrupted.
  int prior_attempts = 0;
  std::optional<Timestamp> started_at;   // of the first attempt
  std::optional<Timestamp> finished_at;  // when it succeeded or failed for good
  json::value output;                    // null until succeeded
  std::optional<Error> error;            // the last attempt's error, if it failed
  /// For a map step: how many of its items are checkpointed (ListItems reads them).
  int64_t items = 0;
};

/// One checkpointed item of a map step.
struct ItemRecord {
  int64_t index = 0;
  json::value output;  // null when listed without outputs
};

struct RunRecord {
  std::string id;
  std::string pipeline;
  RunStatus status = RunStatus::kQueued;
  json::value input;
  json::value output;          // null until succeeded
  std::optional<Error> error;  // the error the run ended with (failed, dead_lettered)
  json::value definition;      // the pipeline as it was when the run was submitted
  std::string definition_id;   // identifies `definition`; runs of one version share it
  std::string idempotency_key;
  Timestamp created_at{};
  Timestamp updated_at{};
  std::optional<Timestamp> started_at;
  std::optional<Timestamp> finished_at;
  /// Filled by GetRun and LeaseRun (in the order steps first started); empty in lists.
  /// A map step's items are not here (a map may have millions): StepRecord::items counts
  /// them and ListItems reads them, a page at a time.
  std::vector<StepRecord> steps;
  /// While `waiting`: what the run waits for (the waiting step's description); else null.
  json::value waiting;
  /// Signals received, by name: {"approval": {"payload": ..., "at_ms": ms}}.
  json::object signals;
  /// Set for a child run (a `pipeline` step): "RUN_ID/STEP_ID" of the parent's step.
  std::string parent;
  /// Set when a stored JSON value of the run (its input, definition, output, error,
  /// signals, waiting, or a step's output or error) cannot be decoded: which one and
  /// why. That value reads as null, and `error` shows this when the run has none of its
  /// own. LeaseRun never hands such a run out: it ends it `failed` with this error.
  std::optional<Error> unreadable;
};

/// The record id of item `index` of map step `step_id`.
std::string ItemStepId(const std::string& step_id, int64_t index);

struct NewRun {
  std::string id;  // unique, chosen by the caller (NewRunId)
  std::string pipeline;
  json::value input;
  json::value definition;
  /// Identifies `definition` (the same id must always mean the same definition); stored
  /// once per id. Empty: the store derives one from the definition's text.
  std::string definition_id;
  /// Empty: no idempotency. Otherwise the same key returns the same run.
  std::string idempotency_key;
  /// Identifies the request body; the same key with another fingerprint is a kConflict.
  std::string fingerprint;
  /// A submit while this many runs are queued or in flight is refused (kQueueFull).
  int64_t max_queue_depth = 100000;
  /// For a child run: "RUN_ID/STEP_ID" of the parent's `pipeline` step, which is woken
  /// (made due) when this run ends.
  std::string parent;
};

struct SubmitResult {
  RunRecord run;
  bool created = false;  // false: an existing run returned for its idempotency key
};

struct Lease {
  std::string run_id;
  std::string token;
  Timestamp expires_at{};
  int delivery = 0;  // how many times the run has been leased, this lease included
};

struct LeasedRun {
  Lease lease;
  RunRecord run;  // with steps
};

struct Event {
  int64_t seq = 0;  // increasing across the whole log
  std::string run_id;
  std::string type;  // docs/storage.md lists them: RunSubmitted, RunLeased, StepStarted, ...
  std::string step_id;
  int attempt = 0;
  Timestamp at{};
  json::value data;
};

struct RunFilter {
  std::optional<RunStatus> status;
  std::string pipeline;  // empty: any
  int limit = 50;        // 1..1000
  std::string cursor;    // a run id from a previous page's next_cursor; empty: first page
};

struct RunPage {
  std::vector<RunRecord> runs;  // newest first
  std::string next_cursor;      // empty on the last page
};

struct StoreStats {
  std::map<RunStatus, int64_t> runs_by_status;
  int64_t queue_ready = 0;   // due now and not leased
  int64_t queue_leased = 0;  // held under a valid lease
  int64_t queue_delayed = 0; // waiting for a backoff
};

/// The store's connections to its database server, for metrics (no I/O to get them).
struct PoolStats {
  int64_t size = 0;      // connections allowed at most (0: the store has no pool)
  int64_t open = 0;      // connections open, idle or in use
  int64_t in_use = 0;    // connections lent to a call now
  int64_t waits = 0;     // calls that had to wait for a free connection, so far
  int64_t timeouts = 0;  // calls refused because none became free in time, so far
};

/// One attempt of a `task` step, executed by an external worker.
struct TaskRecord {
  std::string token;  // the worker's handle on it (random, per attempt)
  std::string run_id;
  std::string step_id;
  int attempt = 0;
  std::string queue;
  json::value input;
  enum class Status { kPending, kLeased, kCompleted, kFailed } status = Status::kPending;
  std::string worker_id;
  std::optional<Timestamp> lease_expires;  // while leased
  Duration heartbeat_timeout{30000};
  json::value output;          // completed
  std::optional<Error> error;  // failed
  bool retryable = true;       // failed: whether the step may try again
  Timestamp created_at{};      // when the attempt queued it
};
std::string_view TaskStatusName(TaskRecord::Status s);

/// What happens to a run whose step attempt failed.
struct FailureDisposition {
  enum class Kind {
    kRetry,         // the step is retried after `delay`; the lease is given up
    kFail,          // the run ends `failed` (a non-retryable error)
    kDeadLetter,    // the run ends `dead_lettered` (retries exhausted)
  };
  Kind kind = Kind::kRetry;
  Duration delay{0};
  /// The attempt was cut short by its node (a drain), not failed by its step: counted
  /// in StepRecord::interrupted too.
  bool interrupted = false;
};

class Store {
 public:
  virtual ~Store() = default;

  /// Creates a queued run, or returns the existing run of its idempotency key
  /// (created=false). Errors: kConflict (key reused with another fingerprint, or the id
  /// is taken),
  /// kQueueFull (max_queue_depth reached).
  virtual Result<SubmitResult> SubmitRun(const NewRun& run) = 0;

  /// The run with its steps. kNotFound for an unknown id.
  virtual Result<RunRecord> GetRun(const std::string& run_id) = 0;

  /// Runs, newest first, filtered; without steps and definitions.
  virtual Result<RunPage> ListRuns(const RunFilter& filter) = 0;

  /// A run's events with seq > after_seq, oldest first, at most `limit`.
  /// kNotFound for an unknown run.
  virtual Result<std::vector<Event>> ListEvents(const std::string& run_id, int64_t after_seq,
                                                int limit) = 0;

  /// Leases the queued run that has been due longest: one never leased, one whose backoff
  /// has passed, or one whose lease expired. Empty when none is due. A due run that
  /// cannot be decoded (RunRecord::unreadable) is not handed out: it ends `failed` with
  /// that error (a RunFailed event) and the next one is tried, so one damaged record
  /// never stops the queue.
  virtual Result<std::optional<LeasedRun>> LeaseRun(const std::string& worker_id,
                                                    Duration lease_for) = 0;

  /// Extends a lease to now + lease_for; returns the new expiry.
  virtual Result<Timestamp> Heartbeat(const Lease& lease, Duration lease_for) = 0;

  /// Records the start of an attempt of `step_id`; returns its attempt number (1-based).
  /// kConflict when the step already succeeded.
  virtual Result<int> StartStep(const Lease& lease, const std::string& step_id) = 0;

  /// Records that the attempt of `step_id` in flight was interrupted (the run was leased
  /// again while the step was still `running`: its node was lost), with a
  /// StepInterrupted event and StepRecord::interrupted + 1, then starts the next attempt
  /// and returns its number. kConflict when the step is not running.
  virtual Result<int> RestartInterruptedStep(const Lease& lease, const std::string& step_id) = 0;

  /// Checkpoints `step_id` as succeeded with `output`. Then, in the same commit: when
  /// `run_output` is given the run succeeds with it and leaves the queue; otherwise, when
  /// `next_step` is given, that step's next attempt starts and its number is returned.
  virtual Result<int> CompleteStep(const Lease& lease, const std::string& step_id,
                                   const json::value& output,
                                   const std::optional<std::string>& next_step,
                                   const std::optional<json::value>& run_output) = 0;

  /// Records a failed attempt of `step_id` (which must be running) with `error`, then
  /// retries or ends the run as `disposition` says. The lease is given up in every case.
  /// kConflict when the step is not running.
  virtual Result<void> FailStep(const Lease& lease, const std::string& step_id, const Error& error,
                                const FailureDisposition& disposition) = 0;

  /// Parks the run on `step_id` (which must be running): the step's attempt goes on
  /// (StartStep on a waiting step does not count another attempt), the run is `waiting`
  /// with `waiting` saying what for, and the lease is given up, so the run holds no
  /// worker. It is due again at `wake_at`, or at once when a signal arrives or a child run
  /// ends; without `wake_at`, only then. kConflict when the step is not running.
  virtual Result<void> SuspendStep(const Lease& lease, const std::string& step_id,
                                   std::optional<Timestamp> wake_at, const json::value& waiting) = 0;

  /// Checkpoints one item of a map step (a record ItemStepId(step_id, index)) while the
  /// run's lease is held; an item checkpointed once is never executed again.
  virtual Result<void> CompleteItem(const Lease& lease, const std::string& step_id, int64_t index,
                                    const json::value& output) = 0;

  /// The checkpointed items of map step `step_id` of a run with index > after_index, in
  /// index order, at most `limit` (clamped to 1..10000): how a map's items are read,
  /// never with the run. Without `with_outputs`, only their indexes. kNotFound for an
  /// unknown run; an item whose output cannot be decoded is kInternal, naming it.
  virtual Result<std::vector<ItemRecord>> ListItems(const std::string& run_id, const std::string& step_id,
                                                    int64_t after_index, int limit, bool with_outputs) = 0;

  /// Delivers signal `name` to a run that has not ended: kept in RunRecord::signals (a
  /// second signal of one name replaces the first), logged (SignalReceived), and a
  /// waiting run is due at once. kNotFound for an unknown run, kConflict when it ended.
  virtual Result<RunRecord> SendSignal(const std::string& run_id, const std::string& name,
                                       const json::value& payload) = 0;

  /// The task of attempt `attempt` of `step_id`, created (pending on `queue`) when it does
  /// not exist yet: what a `task` step asks each time its run wakes.
  virtual Result<TaskRecord> EnsureTask(const Lease& lease, const std::string& step_id, int attempt,
                                        const std::string& queue, const json::value& input,
                                        Duration heartbeat_timeout) = 0;

  /// Hands the oldest pending task of `queue` to `worker_id` for its heartbeat timeout;
  /// empty when there is none.
  virtual Result<std::optional<TaskRecord>> LeaseTask(const std::string& queue, const std::string& worker_id) = 0;

  /// Extends a leased task's lease by its heartbeat timeout. kConflict (the task is
  /// someone else's by now) when its lease expired or it already ended; kNotFound for an
  /// unknown token.
  virtual Result<TaskRecord> HeartbeatTask(const std::string& token) = 0;

  /// Ends a leased task: completed with `output`, or failed with `error` (retryable or
  /// not). The run is woken. Same errors as HeartbeatTask.
  virtual Result<TaskRecord> CompleteTask(const std::string& token, const json::value& output) = 0;
  virtual Result<TaskRecord> FailTask(const std::string& token, const Error& error, bool retryable) = 0;

  /// Returns when a task may have been queued on `queue` since the call began, or after
  /// `max` (for long polls). The default looks again every 50 ms.
  virtual void WaitForTask(const std::string& queue, Duration max);

  /// Registers `listener`, called when a task may have been queued (on any queue): by
  /// this process, or, for a store that several nodes share, by any node. It runs on a
  /// store thread and must return quickly. Returns a handle for RemoveTaskListener; the
  /// default store never calls listeners (long polls then look once a second) and
  /// returns 0. Thread-safe.
  virtual uint64_t AddTaskListener(std::function<void()> listener);
  /// Forgets a listener; once it returns, the listener is not running and will not run.
  /// Safe with 0.
  virtual void RemoveTaskListener(uint64_t handle);

  /// Fails a task whose worker stopped heartbeating (its lease expired), under the run's
  /// lease; a late complete is then refused. kConflict (nothing changed, nothing logged)
  /// when the task already ended: its answer stands.
  virtual Result<void> ExpireTask(const Lease& lease, const std::string& token) = 0;

  /// Ends a run `failed` without a step to blame (e.g. its definition cannot execute).
  virtual Result<void> FailRun(const Lease& lease, const Error& error) = 0;

  /// Gives the lease up so that another worker may take the run at once (drain).
  virtual Result<void> ReleaseLease(const Lease& lease) = 0;

  /// Cancels a run that has not ended. kConflict when it already ended.
  virtual Result<RunRecord> CancelRun(const std::string& run_id) = 0;

  /// Queues a dead-lettered or failed run again. Its succeeded steps stay checkpointed;
  /// the others start afresh: `retrying`, their error, timers (started_at) and
  /// interrupted count cleared, their attempts so far kept as prior_attempts. kConflict
  /// for a run in any other state.
  virtual Result<RunRecord> RedriveRun(const std::string& run_id) = 0;

  /// Counts for metrics.
  virtual Result<StoreStats> GetStats() = 0;

  /// When the next queued run becomes due (now if one is due); empty when the queue is
  /// empty. Lets idle workers sleep exactly as long as needed.
  virtual Result<std::optional<Timestamp>> NextDueAt() = 0;

  /// Registers `listener`, called when a run may have become due at once (queued, woken
  /// by a signal, a task's answer or a child's end, released, redriven): by this process,
  /// or, for a store that several nodes share, by any node. It runs on a store thread and
  /// must return quickly (e.g. Engine::Notify). Replaces any earlier listener; an empty
  /// function removes it. The default does nothing (workers then poll).
  virtual void SetWorkListener(std::function<void()> listener);

  /// The connection pool's counts; the default (a store without one) is all zeros.
  /// Thread-safe.
  virtual PoolStats GetPoolStats() const { return {}; }
};

/// JSON of an error in the stored shape {"type","message"[,"param"]}.
json::value ErrorToJson(const Error& error);
/// Inverse of ErrorToJson; unknown types read as kInternal.
Error ErrorFromJson(const json::value& v);

}  // namespace keel::store
