#include "keel/store/sql/sql_store.h"

#include <algorithm>

#include "keel/core/ids.h"

namespace keel::store::sql {
namespace {

// The key of a run's lock (Conn::Lock).
std::string RunKey(std::string_view run_id) { return "run:" + std::string(run_id); }

// The columns ReadRunRow reads, of `runs r`.
constexpr const char* kRunColumns =
    "r.id, r.pipeline, r.status, r.input, r.output, r.error, r.idempotency_key, r.created_at, r.updated_at, "
    "r.started_at, r.finished_at, r.definition_id, r.waiting, r.signals, r.parent";

// Reads the JSON columns of one record through the store's codec (Stmt::DecodeJson). A
// column that cannot be decoded reads as null and the first such column is kept as
// `damage`, an error naming the record and the column: a record that cannot be read is
// data about that record, never an outage of the store (docs/storage.md, "Records that
// cannot be read").
class ColumnReader {
 public:
  // `what` names the record in messages: "run 0001...", "task tok...".
  ColumnReader(const Stmt& s, std::string what) : s_(s), what_(std::move(what)) {}

  json::value Json(int c, std::string_view column) {
    auto v = s_.DecodeJson(c);
    if (v.ok()) return std::move(v).value();
    if (!damage) {
      damage = Error(ErrorCode::kInternal,
                     what_ + ": its stored " + std::string(column) + " cannot be decoded (" +
                         v.error().message +
                         "); it reads as null. The data was damaged or written by another "
                         "version; repair the row or cancel the run");
    }
    return nullptr;
  }

  std::optional<Error> damage;

 private:
  const Stmt& s_;
  std::string what_;
};

RunRecord ReadRunRow(const Stmt& s) {
  RunRecord r;
  r.id = s.Text(0);
  ColumnReader cols(s, "run " + r.id);
  r.pipeline = s.Text(1);
  r.status = RunStatusFromName(s.Text(2)).value_or(RunStatus::kQueued);
  r.input = cols.Json(3, "runs.input");
  r.output = cols.Json(4, "runs.output");
  if (!s.IsNull(5)) {
    json::value e = cols.Json(5, "runs.error");
    if (!e.is_null()) r.error = ErrorFromJson(e);
  }
  r.idempotency_key = s.Text(6);
  r.created_at = FromMillis(s.Int(7));
  r.updated_at = FromMillis(s.Int(8));
  r.started_at = s.OptTime(9);
  r.finished_at = s.OptTime(10);
  r.definition_id = s.Text(11);
  r.waiting = cols.Json(12, "runs.waiting");
  if (!s.IsNull(13)) {
    json::value sig = cols.Json(13, "runs.signals");
    if (sig.is_object()) r.signals = std::move(sig.as_object());
  }
  r.parent = s.Text(14);
  r.unreadable = std::move(cols.damage);
  return r;
}

// Marks `run` unreadable with `damage` (the first wins) and, when it has no error of its
// own, shows the damage as its error, so that GET /v1/runs/{id} says what is wrong.
void NoteDamage(RunRecord& run, std::optional<Error> damage) {
  if (!damage) return;
  if (!run.unreadable) run.unreadable = std::move(damage);
}
void ShowDamage(RunRecord& run) {
  if (run.unreadable && !run.error) run.error = run.unreadable;
}

std::optional<RunRecord> LoadRun(Conn& db, const std::string& id, bool with_steps) {
  std::optional<RunRecord> run;
  {
    auto s = db.Prepare(std::string("SELECT ") + kRunColumns +
                        ", d.body FROM runs r LEFT JOIN definitions d ON d.id = r.definition_id WHERE r.id = ?1");
    s.Bind(1, id);
    if (!s.Step()) return std::nullopt;
    run = ReadRunRow(s);
    ColumnReader cols(s, "run " + id);
    run->definition = cols.Json(15, "definition (definitions.body of " + run->definition_id + ")");
    NoteDamage(*run, std::move(cols.damage));
  }
  if (with_steps) {
    auto s = db.Prepare(
        "SELECT step_id, status, attempts, output, error, started_at, finished_at, interrupted, "
        "prior_attempts, "
        // A map's items are counted, not loaded: an index range per step.
        "(SELECT count(*) FROM steps i WHERE i.run_id = ?1 AND i.item_of = s.step_id) "
        "FROM steps s "
        "WHERE run_id = ?1 AND item_of IS NULL ORDER BY seq");
    s.Bind(1, id);
    while (s.Step()) {
      StepRecord st;
      st.step_id = s.Text(0);
      ColumnReader cols(s, "run " + id + ", step \"" + st.step_id + "\"");
      const std::string status = s.Text(1);
      st.status = status == "succeeded" ? StepStatus::kSucceeded
                  : status == "retrying" ? StepStatus::kRetrying
                  : status == "failed"   ? StepStatus::kFailed
                  : status == "waiting"  ? StepStatus::kWaiting
                                         : StepStatus::kRunning;
      st.attempts = static_cast<int>(s.Int(2));
      st.output = cols.Json(3, "steps.output");
      if (!s.IsNull(4)) {
        json::value e = cols.Json(4, "steps.error");
        if (!e.is_null()) st.error = ErrorFromJson(e);
      }
      st.started_at = s.OptTime(5);
      st.finished_at = s.OptTime(6);
      st.interrupted = static_cast<int>(s.Int(7));
      st.prior_attempts = static_cast<int>(s.Int(8));
      st.items = s.Int(9);
      NoteDamage(*run, std::move(cols.damage));
      run->steps.push_back(std::move(st));
    }
  }
  ShowDamage(*run);
  return run;
}

Error NoRun(const std::string& run_id) { return Error(ErrorCode::kNotFound, "no run with id \"" + run_id + "\"", "run_id"); }

// Takes the run's lock and loads it (without its steps); kNotFound for an unknown id.
Result<RunRecord> LockedRun(Conn& db, const std::string& run_id) {
  db.Lock(RunKey(run_id));
  auto run = LoadRun(db, run_id, false);
  if (!run) return NoRun(run_id);
  return std::move(*run);
}

// Appends an event to the write's log: written with the write's other events in one
// statement when its work is done (FlushEvents), in the order appended.
void AppendEvent(Txn& txn, const std::string& run_id, std::string_view type, std::string_view step_id = {},
                 int attempt = 0, const json::value& data = nullptr) {
  txn.events.push_back(Txn::Event{run_id, std::string(type), std::string(step_id), attempt, data});
}

void FlushEvents(Conn& db, Txn& txn) {
  constexpr std::size_t kPerStatement = 8;
  for (std::size_t i = 0; i < txn.events.size(); i += kPerStatement) {
    const std::size_t n = std::min(kPerStatement, txn.events.size() - i);
    std::string sql = "INSERT INTO events(run_id, type, step_id, attempt, at, data) VALUES";
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t b = k * 6;
      sql += (k ? ", (?" : " (?") + std::to_string(b + 1) + ", ?" + std::to_string(b + 2) + ", ?" + std::to_string(b + 3) +
             ", ?" + std::to_string(b + 4) + ", ?" + std::to_string(b + 5) + ", ?" + std::to_string(b + 6) + ")";
    }
    auto s = db.Prepare(sql);
    for (std::size_t k = 0; k < n; ++k) {
      const auto& e = txn.events[i + k];
      const int b = static_cast<int>(k * 6);
      s.Bind(b + 1, e.run_id).Bind(b + 2, e.type).BindOptText(b + 3, e.step_id).Bind(b + 5, ToMillis(txn.now))
          .BindJson(b + 6, e.data);
      if (e.attempt > 0) s.Bind(b + 4, e.attempt); else s.BindNull(b + 4);
    }
    s.Send();
  }
  txn.events.clear();
}

// Takes the run's lock, then: kLeaseLost unless `lease` is the run's current, unexpired
// lease. `shared`: for writes that leave the lease alone and may run side by side (map
// items, heartbeats).
std::optional<Error> CheckLease(Conn& db, const Lease& lease, Timestamp now, bool shared = false) {
  db.Lock(RunKey(lease.run_id), shared);
  auto s = db.Prepare("SELECT lease_token, due_at FROM queue WHERE run_id = ?1");
  s.Bind(1, lease.run_id);
  if (!s.Step()) {
    return Error(ErrorCode::kLeaseLost, "run " + lease.run_id + " is no longer queued (ended or cancelled)");
  }
  if (s.IsNull(0) || s.Text(0) != lease.token) {
    return Error(ErrorCode::kLeaseLost, "the lease on run " + lease.run_id + " was taken over");
  }
  if (FromMillis(s.Int(1)) <= now) {
    return Error(ErrorCode::kLeaseLost, "the lease on run " + lease.run_id + " expired");
  }
  return std::nullopt;
}

// Starts the next attempt of a step; nullopt when the step already succeeded (a
// checkpointed step never runs again).
std::optional<int> StartStepRow(Conn& db, Txn& txn, const std::string& run_id, const std::string& step_id) {
  const Timestamp now = txn.now;
  std::optional<int> attempt;
  {
    auto s = db.Prepare(
        "INSERT INTO steps(run_id, step_id, seq, status, attempts, started_at) "
        "VALUES(?1, ?2, (SELECT count(*) FROM steps WHERE run_id = ?1 AND item_of IS NULL), 'running', 1, ?3) "
        "ON CONFLICT(run_id, step_id) DO UPDATE SET status = 'running', started_at = "
        "coalesce(steps.started_at, ?3), "
        "attempts = steps.attempts + CASE WHEN steps.status <> 'waiting' THEN 1 ELSE 0 END "
        "WHERE steps.status <> 'succeeded' RETURNING attempts");
    s.Bind(1, run_id).Bind(2, step_id).Bind(3, ToMillis(now));
    if (s.Step()) attempt = static_cast<int>(s.Int(0));
    s.Run();
  }
  if (!attempt) return std::nullopt;
  {
    auto s = db.Prepare("UPDATE runs SET updated_at = ?2 WHERE id = ?1");
    s.Bind(1, run_id).Bind(2, ToMillis(now)).Send();
  }
  AppendEvent(txn, run_id, "StepStarted", step_id, *attempt);
  return attempt;
}

Error StepAlreadySucceeded(const std::string& run_id, const std::string& step_id) {
  return Error(ErrorCode::kConflict, "step \"" + step_id + "\" of run " + run_id +
                                         " already succeeded; a checkpointed step never runs again");
}

Error StepNotRunning(const std::string& run_id, const std::string& step_id) {
  return Error(ErrorCode::kConflict, "step \"" + step_id + "\" of run " + run_id + " is not running");
}

// Something a parked run waits for happened (a signal, a child run's end): a waiting run
// is due at once; a leased one is marked, so that parking it again makes it due at once
// instead (SuspendStep); any other run will look when it next runs. The caller holds the
// run's lock. `urgent`: tell idle workers at once (not for a wake that only re-arms the
// run's timer, which a worker's next look serves as well).
void Wake(Conn& db, Txn& txn, const std::string& run_id, bool urgent = true) {
  std::string status;
  {
    auto s = db.Prepare("SELECT status FROM runs WHERE id = ?1");
    s.Bind(1, run_id);
    if (!s.Step()) return;
    status = s.Text(0);
  }
  if (status == "waiting") {
    auto s = db.Prepare(
        "UPDATE queue SET due_at = CASE WHEN due_at < ?2 THEN due_at ELSE ?2 END "
        "WHERE run_id = ?1 AND lease_token IS NULL");
    s.Bind(1, run_id).Bind(2, ToMillis(txn.now)).Run();
    if (db.Changes() > 0) {
      txn.work_due = txn.work_due || urgent;
      return;
    }
  }
  auto s = db.Prepare("UPDATE queue SET woken = 1 WHERE run_id = ?1 AND lease_token IS NOT NULL");
  s.Bind(1, run_id).Send();
}

// The `seq` of map items: after every step's, in index order.
constexpr int64_t kItemSeqBase = int64_t{1} << 40;

constexpr const char* kTaskColumns =
    "token, run_id, step_id, attempt, queue, input, status, worker_id, lease_expires, heartbeat_timeout, output, "
    "error, retryable, created_at";

// A task whose stored input, output or error cannot be decoded reads as failed for good
// with what is wrong (its run's step then fails, on_error applies); `damage` says so.
TaskRecord ReadTaskRow(const Stmt& s, std::optional<Error>* damage = nullptr) {
  TaskRecord t;
  t.token = s.Text(0);
  t.run_id = s.Text(1);
  t.step_id = s.Text(2);
  ColumnReader cols(s, "task " + t.token + " (run " + t.run_id + ", step \"" + t.step_id + "\")");
  t.attempt = static_cast<int>(s.Int(3));
  t.queue = s.Text(4);
  t.input = cols.Json(5, "tasks.input");
  const std::string st = s.Text(6);
  t.status = st == "leased"      ? TaskRecord::Status::kLeased
             : st == "completed" ? TaskRecord::Status::kCompleted
             : st == "failed"    ? TaskRecord::Status::kFailed
                                 : TaskRecord::Status::kPending;
  t.worker_id = s.Text(7);
  t.lease_expires = s.OptTime(8);
  t.heartbeat_timeout = Duration(s.Int(9));
  t.output = cols.Json(10, "tasks.output");
  if (!s.IsNull(11)) {
    json::value e = cols.Json(11, "tasks.error");
    if (!e.is_null()) t.error = ErrorFromJson(e);
  }
  t.retryable = s.Int(12) != 0;
  t.created_at = FromMillis(s.Int(13));
  if (cols.damage) {
    t.status = TaskRecord::Status::kFailed;
    t.error = cols.damage;
    t.retryable = false;
  }
  if (damage) *damage = std::move(cols.damage);
  return t;
}

std::optional<TaskRecord> LoadTask(Conn& db, const std::string& token,
                                   std::optional<Error>* damage = nullptr) {
  auto s = db.Prepare(std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE token = ?1");
  s.Bind(1, token);
  if (!s.Step()) return std::nullopt;
  return ReadTaskRow(s, damage);
}

// The task of `token` if a worker holds it now; else why not.
Result<TaskRecord> HeldTask(Conn& db, const std::string& token, Timestamp now) {
  auto t = LoadTask(db, token);
  if (!t) return Error(ErrorCode::kNotFound, "no task with token \"" + token + "\"", "token");
  if (t->status != TaskRecord::Status::kLeased) {
    return Error(ErrorCode::kConflict, "task " + token + " is " + std::string(TaskStatusName(t->status)) +
                                           ", not held by a worker; the result is dropped");
  }
  if (!t->lease_expires || *t->lease_expires <= now) {
    return Error(ErrorCode::kConflict, "the lease on task " + token +
                                           " expired (no heartbeat in time); it is someone else's now and the result is dropped");
  }
  return *t;
}

void EndRun(Conn& db, Txn& txn, const std::string& run_id, RunStatus status, const json::value& output,
            const std::optional<Error>& error) {
  std::string parent;
  {
    auto s = db.Prepare(
        "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_at = ?5, updated_at = ?5 WHERE id = ?1 "
        "RETURNING parent");
    s.Bind(1, run_id).Bind(2, RunStatusName(status)).BindJson(3, output).Bind(5, ToMillis(txn.now));
    if (error) s.BindJson(4, ErrorToJson(*error)); else s.BindNull(4);
    if (s.Step() && !s.IsNull(0)) parent = s.Text(0);
    s.Run();
  }
  {
    auto s = db.Prepare("DELETE FROM queue WHERE run_id = ?1");
    s.Bind(1, run_id).Run();
    txn.queue_delta -= db.Changes();
  }
  const char* type = status == RunStatus::kSucceeded   ? "RunSucceeded"
                     : status == RunStatus::kFailed    ? "RunFailed"
                     : status == RunStatus::kCancelled ? "RunCancelled"
                                                       : "RunDeadLettered";
  json::value data = nullptr;
  if (error) data = json::object{{"error", ErrorToJson(*error)}};
  AppendEvent(txn, run_id, type, {}, 0, data);
  if (!parent.empty()) {
    // A child's lock is always taken before its parent's, never the other way round.
    const std::string parent_id = parent.substr(0, parent.find('/'));
    db.Lock(RunKey(parent_id));
    Wake(db, txn, parent_id);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Transactions.

template <typename T, typename R>
Result<R> SqlStore::Write(const std::function<Result<T>(Conn&, Txn&)>& fn) {
  std::optional<Result<T>> out;
  Txn txn;
  auto committed = Transact(
      [&](Conn& db, Txn& t) {
        try {
          out.emplace(fn(db, t));
          if (out->ok()) FlushEvents(db, t);
        } catch (const SqlError& e) {
          if (e.kind != SqlError::Kind::kStatement) throw;  // the backend retries or gives up
          out.emplace(Error(ErrorCode::kUnavailable, e.what()));
        } catch (const std::exception& e) {
          out.emplace(Error(ErrorCode::kInternal, e.what()));
        }
        return out->ok();
      },
      txn);
  if (!committed.ok()) return committed.error();
  if (out->ok()) Committed(txn);
  if constexpr (std::is_same_v<T, Unit>) {
    if (!out->ok()) return std::move(*out).error();
    return Ok();
  } else {
    return std::move(*out);
  }
}

template <typename T>
Result<T> SqlStore::Read(const std::function<Result<T>(Conn&)>& fn) {
  std::optional<Result<T>> out;
  auto done = Snapshot([&](Conn& db) {
    try {
      out.emplace(fn(db));
    } catch (const SqlError& e) {
      if (e.kind != SqlError::Kind::kStatement) throw;
      out.emplace(Error(ErrorCode::kUnavailable, e.what()));
    } catch (const std::exception& e) {
      out.emplace(Error(ErrorCode::kInternal, e.what()));
    }
  });
  if (!done.ok()) return done.error();
  return std::move(*out);
}

void SqlStore::Committed(const Txn& txn) {
  if (txn.queue_delta > 0) {
    std::lock_guard lock(queue_count_mu_);
    if (queue_count_) queue_count_->submitted_since += txn.queue_delta;
  }
  if (!txn.new_definitions.empty()) {
    std::lock_guard lock(definitions_mu_);
    if (known_definitions_.size() > 100000) known_definitions_.clear();  // bound: ids are per version
    for (const auto& d : txn.new_definitions) known_definitions_.insert(d);
  }
  if (txn.work_due) WorkArrived();
  if (txn.task_queued) TasksArrived();
}

bool SqlStore::KnownDefinition(const std::string& id) {
  std::lock_guard lock(definitions_mu_);
  return known_definitions_.count(id) > 0;
}

void SqlStore::WorkArrived() {
  std::function<void()> listener;
  {
    std::lock_guard lock(listener_mu_);
    listener = listener_;
  }
  if (listener) listener();
}

void SqlStore::TasksArrived() {
  {
    std::lock_guard lock(task_mu_);
    ++task_seq_;
  }
  task_cv_.notify_all();
  std::lock_guard lock(task_listeners_mu_);
  for (const auto& [handle, listener] : task_listeners_) listener();
}

uint64_t SqlStore::AddTaskListener(std::function<void()> listener) {
  std::lock_guard lock(task_listeners_mu_);
  const uint64_t handle = next_task_listener_++;
  task_listeners_.emplace(handle, std::move(listener));
  return handle;
}

void SqlStore::RemoveTaskListener(uint64_t handle) {
  std::lock_guard lock(task_listeners_mu_);
  task_listeners_.erase(handle);
}

void SqlStore::SetWorkListener(std::function<void()> listener) {
  std::lock_guard lock(listener_mu_);
  listener_ = std::move(listener);
}

// Any queue's new task wakes every waiter: each then looks at its own queue again.
void SqlStore::WaitForTask(const std::string&, Duration max) {
  std::unique_lock lock(task_mu_);
  const uint64_t seen = task_seq_;
  task_cv_.wait_for(lock, max, [&] { return task_seq_ != seen; });
}

// ---------------------------------------------------------------------------------------
// Runs.

Result<SubmitResult> SqlStore::SubmitRun(const NewRun& run) {
  return Write<SubmitResult>([&](Conn& db, Txn& txn) -> Result<SubmitResult> {
    if (!run.idempotency_key.empty()) {
      db.Lock("idempotency:" + run.idempotency_key);
      std::string existing_id, fingerprint;
      {
        auto s = db.Prepare("SELECT id, fingerprint FROM runs WHERE idempotency_key = ?1");
        s.Bind(1, run.idempotency_key);
        if (s.Step()) {
          existing_id = s.Text(0);
          fingerprint = s.Text(1);
        }
      }
      if (!existing_id.empty()) {
        if (fingerprint != run.fingerprint) {
          return Error(ErrorCode::kConflict, "Idempotency-Key \"" + run.idempotency_key +
                                                 "\" was already used with a different request (run " + existing_id +
                                                 "); use a new key for a new request");
        }
        return SubmitResult{*LoadRun(db, existing_id, true), false};
      }
    }
    int64_t queued = txn.queue_rows;
    if (queued < 0) {
      // Concurrent submits (several nodes, or a pool of connections). Far from the bound
      // they go side by side under a shared lock, trusting a recent count (at most
      // kCountFor old, plus this node's submits since): to pass the bound together they
      // would need `exact_within` submits in flight, or made elsewhere within kCountFor.
      // Near it they go one at a time under the exclusive lock, which waits for the shared
      // holders to commit, and count again. A count stops at the bound, so it stays cheap
      // however long the queue is.
      const int64_t exact_within = std::max<int64_t>(1000, run.max_queue_depth / 10);
      auto count = [&] {
        auto s = db.Prepare("SELECT count(*) FROM (SELECT 1 FROM queue LIMIT ?1) AS q");
        s.Bind(1, std::max<int64_t>(run.max_queue_depth, 0));
        const int64_t n = s.Step() ? s.Int(0) : 0;
        std::lock_guard lock(queue_count_mu_);
        queue_count_ = QueueCount{n, std::chrono::steady_clock::now(), 0};
        return n;
      };
      std::optional<int64_t> recent;
      {
        std::lock_guard lock(queue_count_mu_);
        if (queue_count_ && std::chrono::steady_clock::now() - queue_count_->at < kCountFor) {
          recent = queue_count_->rows + queue_count_->submitted_since;
        }
      }
      queued = recent && *recent < run.max_queue_depth - exact_within ? *recent : count();
      if (queued >= run.max_queue_depth - exact_within) {
        db.Lock("queue-depth");
        queued = count();
      } else {
        db.Lock("queue-depth", /*shared=*/true);
      }
    }
    if (queued >= run.max_queue_depth) {
      Error e(ErrorCode::kQueueFull,
              "the run queue is full (" + std::to_string(queued) + " runs queued or in flight); retry later");
      e.retry_after = Duration(1000);
      return e;
    }
    const int64_t now = ToMillis(txn.now);
    // Definitions are stored once, by id; the store remembers the ids it committed.
    std::string definition_id = run.definition_id;
    std::string definition_body;
    if (definition_id.empty()) {
      definition_body = json::serialize(run.definition);
      definition_id = "fnv-" + std::to_string(Fnv1a64(definition_body));
    }
    if (!KnownDefinition(definition_id)) {
      if (definition_body.empty()) definition_body = json::serialize(run.definition);
      auto s = db.Prepare("INSERT INTO definitions(id, body) VALUES(?1, ?2) ON CONFLICT DO NOTHING");
      s.Bind(1, definition_id).Bind(2, definition_body).Send();
      txn.new_definitions.push_back(definition_id);
    }
    {
      // A taken id inserts nothing (and returns no row) rather than failing the write.
      auto s = db.Prepare(
          "INSERT INTO runs(id, pipeline, status, input, definition_id, idempotency_key, fingerprint, "
          "created_at, updated_at, parent) VALUES(?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?8) "
          "ON CONFLICT(id) DO NOTHING RETURNING id");
      s.Bind(1, run.id).Bind(2, run.pipeline).Bind(3, json::serialize(run.input))
          .Bind(4, definition_id).BindOptText(5, run.idempotency_key)
          .BindOptText(6, run.fingerprint).Bind(7, now).BindOptText(8, run.parent);
      if (!s.Step()) return Error(ErrorCode::kConflict, "a run with id " + run.id + " already exists");
      s.Run();
    }
    {
      auto s = db.Prepare("INSERT INTO queue(run_id, due_at) VALUES(?1, ?2)");
      s.Bind(1, run.id).Bind(2, now).Send();
      txn.queue_delta += 1;
    }
    AppendEvent(txn, run.id, "RunSubmitted", {}, 0, json::object{{"pipeline", run.pipeline}});
    txn.work_due = true;
    RunRecord r;
    r.id = run.id;
    r.pipeline = run.pipeline;
    r.status = RunStatus::kQueued;
    r.input = run.input;
    r.definition = run.definition;
    r.definition_id = definition_id;
    r.idempotency_key = run.idempotency_key;
    r.parent = run.parent;
    r.created_at = r.updated_at = txn.now;
    return SubmitResult{std::move(r), true};
  });
}

Result<RunRecord> SqlStore::GetRun(const std::string& run_id) {
  return Read<RunRecord>([&](Conn& db) -> Result<RunRecord> {
    auto run = LoadRun(db, run_id, true);
    if (!run) return NoRun(run_id);
    return std::move(*run);
  });
}

Result<RunPage> SqlStore::ListRuns(const RunFilter& filter) {
  const int limit = std::clamp(filter.limit, 1, 1000);
  std::string sql = std::string("SELECT ") + kRunColumns + " FROM runs r";
  std::vector<std::string> where;
  if (filter.status) where.push_back("status = ?1");
  if (!filter.pipeline.empty()) where.push_back("pipeline = ?2");
  if (!filter.cursor.empty()) where.push_back("id < ?3");
  for (std::size_t i = 0; i < where.size(); ++i) sql += (i == 0 ? " WHERE " : " AND ") + where[i];
  sql += " ORDER BY id DESC LIMIT ?4";
  return Read<RunPage>([&](Conn& db) -> Result<RunPage> {
    RunPage page;
    auto s = db.Prepare(sql);
    if (filter.status) s.Bind(1, RunStatusName(*filter.status));
    if (!filter.pipeline.empty()) s.Bind(2, filter.pipeline);
    if (!filter.cursor.empty()) s.Bind(3, filter.cursor);
    s.Bind(4, limit + 1);
    while (s.Step()) {
      page.runs.push_back(ReadRunRow(s));
      ShowDamage(page.runs.back());
    }
    if (static_cast<int>(page.runs.size()) > limit) {
      page.runs.pop_back();
      page.next_cursor = page.runs.back().id;
    }
    return page;
  });
}

Result<std::vector<Event>> SqlStore::ListEvents(const std::string& run_id, int64_t after_seq, int limit) {
  return Read<std::vector<Event>>([&](Conn& db) -> Result<std::vector<Event>> {
    {
      auto s = db.Prepare("SELECT 1 FROM runs WHERE id = ?1");
      s.Bind(1, run_id);
      if (!s.Step()) return NoRun(run_id);
    }
    std::vector<Event> out;
    auto s = db.Prepare(
        "SELECT seq, type, step_id, attempt, at, data FROM events WHERE run_id = ?1 AND seq > ?2 "
        "ORDER BY seq LIMIT ?3");
    s.Bind(1, run_id).Bind(2, after_seq).Bind(3, std::clamp(limit, 1, 10000));
    while (s.Step()) {
      Event e;
      e.seq = s.Int(0);
      e.run_id = run_id;
      e.type = s.Text(1);
      e.step_id = s.Text(2);
      e.attempt = static_cast<int>(s.Int(3));
      e.at = FromMillis(s.Int(4));
      ColumnReader cols(s, "event " + std::to_string(e.seq) + " of run " + run_id);
      e.data = cols.Json(5, "events.data");
      if (cols.damage) e.data = json::object{{"unreadable", cols.damage->message}};
      out.push_back(std::move(e));
    }
    return out;
  });
}

// ---------------------------------------------------------------------------------------
// Leases and steps.

Result<std::optional<LeasedRun>> SqlStore::LeaseRun(const std::string& worker_id, Duration lease_for) {
  return Write<std::optional<LeasedRun>>([&](Conn& db, Txn& txn) -> Result<std::optional<LeasedRun>> {
    const int64_t now = ToMillis(txn.now);
    const std::string select =
        "SELECT run_id, CASE WHEN lease_token IS NULL THEN 0 ELSE 1 END, deliveries FROM queue "
        "WHERE due_at <= ?1 ORDER BY due_at LIMIT 1 OFFSET ?2" + std::string(db.SkipLocked());
    // Rows another transaction holds are skipped; so is a run whose lock is taken (a
    // signal or a heartbeat in progress): `busy` of them were passed over. A terminal run
    // left in the queue (not expected) is removed and the next one tried.
    int64_t busy = 0;
    for (int tries = 0; tries < 8; ++tries) {
      std::string run_id;
      bool was_leased = false;
      int deliveries = 0;
      {
        auto s = db.Prepare(select);
        s.Bind(1, now).Bind(2, busy);
        if (!s.Step()) return std::optional<LeasedRun>();
        run_id = s.Text(0);
        was_leased = s.Int(1) != 0;
        deliveries = static_cast<int>(s.Int(2));
      }
      if (!db.TryLock(RunKey(run_id))) {
        ++busy;
        continue;
      }
      auto run = LoadRun(db, run_id, true);
      if (!run || IsTerminal(run->status)) {
        auto s = db.Prepare("DELETE FROM queue WHERE run_id = ?1");
        s.Bind(1, run_id).Run();
        txn.queue_delta -= db.Changes();
        continue;
      }
      if (run->unreadable) {
        // A record that cannot be read is that run's failure, not the queue's: it ends
        // `failed` with what is wrong, and the next run is tried.
        Error damage = *run->unreadable;
        damage.message = "the run cannot execute: " + damage.message;
        EndRun(db, txn, run_id, RunStatus::kFailed, nullptr, damage);
        continue;
      }
      Lease lease{run_id, NewToken(random_), txn.now + lease_for, deliveries + 1};
      {
        auto s = db.Prepare(
            "UPDATE queue SET due_at = ?2, lease_token = ?3, lease_owner = ?4, deliveries = deliveries + 1 "
            "WHERE run_id = ?1");
        s.Bind(1, run_id).Bind(2, ToMillis(lease.expires_at)).Bind(3, lease.token).Bind(4, worker_id).Send();
      }
      if (was_leased) {
        AppendEvent(txn, run_id, "LeaseExpired", {}, 0, json::object{{"delivery", deliveries}});
      }
      if (run->status == RunStatus::kQueued || run->status == RunStatus::kWaiting) {
        auto s = db.Prepare(
            "UPDATE runs SET status = 'running', waiting = NULL, started_at = coalesce(started_at, ?2), "
            "updated_at = ?2 WHERE id = ?1");
        s.Bind(1, run_id).Bind(2, now).Send();
        run->status = RunStatus::kRunning;
        run->waiting = nullptr;
        if (!run->started_at) run->started_at = txn.now;
      }
      AppendEvent(txn, run_id, "RunLeased", {}, 0,
                  json::object{{"worker", worker_id}, {"delivery", lease.delivery}});
      return std::optional<LeasedRun>(LeasedRun{std::move(lease), std::move(*run)});
    }
    return std::optional<LeasedRun>();
  });
}

Result<Timestamp> SqlStore::Heartbeat(const Lease& lease, Duration lease_for) {
  return Write<Timestamp>([&](Conn& db, Txn& txn) -> Result<Timestamp> {
    if (auto e = CheckLease(db, lease, txn.now, /*shared=*/true)) return *e;
    const Timestamp expires = txn.now + lease_for;
    auto s = db.Prepare("UPDATE queue SET due_at = ?2 WHERE run_id = ?1");
    s.Bind(1, lease.run_id).Bind(2, ToMillis(expires)).Send();
    return expires;
  });
}

Result<int> SqlStore::StartStep(const Lease& lease, const std::string& step_id) {
  return Write<int>([&](Conn& db, Txn& txn) -> Result<int> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    const auto attempt = StartStepRow(db, txn, lease.run_id, step_id);
    if (!attempt) return StepAlreadySucceeded(lease.run_id, step_id);
    return *attempt;
  });
}

Result<int> SqlStore::RestartInterruptedStep(const Lease& lease, const std::string& step_id) {
  return Write<int>([&](Conn& db, Txn& txn) -> Result<int> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    int attempt = 0;
    {
      auto s = db.Prepare(
          "UPDATE steps SET interrupted = interrupted + 1 WHERE run_id = ?1 AND step_id = ?2 AND "
          "status = 'running' "
          "RETURNING attempts, interrupted");
      s.Bind(1, lease.run_id).Bind(2, step_id);
      if (!s.Step()) return StepNotRunning(lease.run_id, step_id);
      attempt = static_cast<int>(s.Int(0));
      const int64_t interrupted = s.Int(1);
      s.Run();
      AppendEvent(txn, lease.run_id, "StepInterrupted", step_id, attempt,
                  json::object{{"interrupted", interrupted}, {"delivery", lease.delivery}});
    }
    const auto next = StartStepRow(db, txn, lease.run_id, step_id);
    if (!next) return StepAlreadySucceeded(lease.run_id, step_id);
    return *next;
  });
}

Result<int> SqlStore::CompleteStep(const Lease& lease, const std::string& step_id, const json::value& output,
                                   const std::optional<std::string>& next_step,
                                   const std::optional<json::value>& run_output) {
  return Write<int>([&](Conn& db, Txn& txn) -> Result<int> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    int attempt = 0;
    {
      auto s = db.Prepare(
          "UPDATE steps SET status = 'succeeded', output = ?3, error = NULL, finished_at = ?4 "
          "WHERE run_id = ?1 AND step_id = ?2 AND status = 'running' RETURNING attempts");
      s.Bind(1, lease.run_id).Bind(2, step_id).Bind(3, json::serialize(output)).Bind(4, ToMillis(txn.now));
      if (!s.Step()) return StepNotRunning(lease.run_id, step_id);
      attempt = static_cast<int>(s.Int(0));
      s.Run();
    }
    AppendEvent(txn, lease.run_id, "StepSucceeded", step_id, attempt);
    if (run_output) {
      EndRun(db, txn, lease.run_id, RunStatus::kSucceeded, *run_output, std::nullopt);
      return 0;
    }
    if (next_step) {
      const auto next = StartStepRow(db, txn, lease.run_id, *next_step);
      if (!next) return StepAlreadySucceeded(lease.run_id, *next_step);
      return *next;
    }
    return 0;
  });
}

Result<void> SqlStore::FailStep(const Lease& lease, const std::string& step_id, const Error& error,
                                const FailureDisposition& disposition) {
  return Write<Unit>([&](Conn& db, Txn& txn) -> Result<Unit> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    const bool retry = disposition.kind == FailureDisposition::Kind::kRetry;
    int attempt = 0;
    {
      auto s = db.Prepare(
          "UPDATE steps SET status = ?3, error = ?4, finished_at = ?5, interrupted = interrupted + "
          "?6 "
          "WHERE run_id = ?1 AND step_id = ?2 AND status = 'running' RETURNING attempts");
      s.Bind(1, lease.run_id).Bind(2, step_id).Bind(3, retry ? "retrying" : "failed").BindJson(4, ErrorToJson(error));
      s.Bind(6, disposition.interrupted ? 1 : 0);
      if (retry) s.BindNull(5); else s.Bind(5, ToMillis(txn.now));
      if (!s.Step()) return StepNotRunning(lease.run_id, step_id);
      attempt = static_cast<int>(s.Int(0));
      s.Run();
    }
    json::object data{{"error", ErrorToJson(error)}};
    if (retry) data["retry_in_ms"] = disposition.delay.count();
    if (disposition.interrupted) data["interrupted"] = true;
    AppendEvent(txn, lease.run_id, "AttemptFailed", step_id, attempt, data);
    if (retry) {
      auto s = db.Prepare("UPDATE queue SET due_at = ?2, lease_token = NULL, lease_owner = NULL WHERE run_id = ?1");
      s.Bind(1, lease.run_id).Bind(2, ToMillis(txn.now + disposition.delay)).Send();
      auto r = db.Prepare("UPDATE runs SET updated_at = ?2 WHERE id = ?1");
      r.Bind(1, lease.run_id).Bind(2, ToMillis(txn.now)).Send();
      if (disposition.delay.count() <= 0) txn.work_due = true;
    } else {
      EndRun(db, txn, lease.run_id,
             disposition.kind == FailureDisposition::Kind::kFail ? RunStatus::kFailed : RunStatus::kDeadLettered,
             nullptr, error);
    }
    return Unit{};
  });
}

Result<void> SqlStore::SuspendStep(const Lease& lease, const std::string& step_id, std::optional<Timestamp> wake_at,
                                   const json::value& waiting) {
  return Write<Unit>([&](Conn& db, Txn& txn) -> Result<Unit> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    int attempt = 0;
    {
      auto s = db.Prepare(
          "UPDATE steps SET status = 'waiting' WHERE run_id = ?1 AND step_id = ?2 AND status = 'running' "
          "RETURNING attempts");
      s.Bind(1, lease.run_id).Bind(2, step_id);
      if (!s.Step()) return StepNotRunning(lease.run_id, step_id);
      attempt = static_cast<int>(s.Int(0));
      s.Run();
    }
    bool woken = false;
    {
      auto s = db.Prepare("SELECT woken FROM queue WHERE run_id = ?1");
      s.Bind(1, lease.run_id);
      woken = s.Step() && s.Int(0) != 0;
    }
    // Without a timer, "never" by itself: far in the future, yet a plain number.
    constexpr int64_t kNever = int64_t{1} << 52;
    const int64_t due = woken ? ToMillis(txn.now) : wake_at ? ToMillis(*wake_at) : kNever;
    if (woken) txn.work_due = true;
    {
      auto s = db.Prepare(
          "UPDATE queue SET due_at = ?2, lease_token = NULL, lease_owner = NULL, woken = 0 WHERE run_id = ?1");
      s.Bind(1, lease.run_id).Bind(2, due).Send();
    }
    {
      auto s = db.Prepare("UPDATE runs SET status = 'waiting', waiting = ?2, updated_at = ?3 WHERE id = ?1");
      s.Bind(1, lease.run_id).BindJson(2, waiting).Bind(3, ToMillis(txn.now)).Send();
    }
    json::object data{{"waiting", waiting}};
    if (wake_at) data["wake_at_ms"] = ToMillis(*wake_at);
    AppendEvent(txn, lease.run_id, "StepWaiting", step_id, attempt, data);
    return Unit{};
  });
}

Result<void> SqlStore::CompleteItem(const Lease& lease, const std::string& step_id, int64_t index,
                                    const json::value& output) {
  return Write<Unit>([&](Conn& db, Txn& txn) -> Result<Unit> {
    // Items of one map commit side by side: each is a row of its own.
    if (auto e = CheckLease(db, lease, txn.now, /*shared=*/true)) return *e;
    auto s = db.Prepare(
        "INSERT INTO steps(run_id, step_id, seq, status, attempts, output, started_at, finished_at, item_of) "
        "VALUES(?1, ?2, ?5, 'succeeded', 1, ?3, ?4, ?4, ?6) "
        "ON CONFLICT(run_id, step_id) DO UPDATE SET status = 'succeeded', output = ?3, error = NULL, finished_at = ?4, "
        "seq = ?5, item_of = ?6 "
        "WHERE steps.status <> 'succeeded'");
    // Items order after the steps by their index: no count over the run's records (a
    // cost per item that grew with the map).
    s.Bind(1, lease.run_id).Bind(2, ItemStepId(step_id, index)).Bind(3, json::serialize(output))
        .Bind(4, ToMillis(txn.now)).Bind(5, kItemSeqBase + index).Bind(6, step_id).Send();
    return Unit{};
  });
}

Result<std::vector<ItemRecord>> SqlStore::ListItems(const std::string& run_id, const std::string& step_id,
                                                    int64_t after_index, int limit, bool with_outputs) {
  return Read<std::vector<ItemRecord>>([&](Conn& db) -> Result<std::vector<ItemRecord>> {
    {
      auto s = db.Prepare("SELECT 1 FROM runs WHERE id = ?1");
      s.Bind(1, run_id);
      if (!s.Step()) return NoRun(run_id);
    }
    std::vector<ItemRecord> out;
    auto s = db.Prepare(std::string("SELECT seq, ") + (with_outputs ? "output" : "NULL") +
                        " FROM steps WHERE run_id = ?1 AND item_of = ?2 AND seq > ?3 AND status = 'succeeded' "
                        "ORDER BY seq LIMIT ?4");
    s.Bind(1, run_id).Bind(2, step_id).Bind(3, kItemSeqBase + std::max<int64_t>(after_index, -1))
        .Bind(4, std::clamp(limit, 1, 10000));
    while (s.Step()) {
      ItemRecord item;
      item.index = s.Int(0) - kItemSeqBase;
      if (with_outputs) {
        ColumnReader cols(s, "run " + run_id + ", item " + std::to_string(item.index) + " of step \"" + step_id + "\"");
        item.output = cols.Json(1, "steps.output");
        if (cols.damage) return *cols.damage;
      }
      out.push_back(std::move(item));
    }
    return out;
  });
}

Result<void> SqlStore::FailRun(const Lease& lease, const Error& error) {
  return Write<Unit>([&](Conn& db, Txn& txn) -> Result<Unit> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    EndRun(db, txn, lease.run_id, RunStatus::kFailed, nullptr, error);
    return Unit{};
  });
}

Result<void> SqlStore::ReleaseLease(const Lease& lease) {
  return Write<Unit>([&](Conn& db, Txn& txn) -> Result<Unit> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    auto s = db.Prepare("UPDATE queue SET due_at = ?2, lease_token = NULL, lease_owner = NULL WHERE run_id = ?1");
    s.Bind(1, lease.run_id).Bind(2, ToMillis(txn.now)).Send();
    AppendEvent(txn, lease.run_id, "LeaseReleased");
    txn.work_due = true;
    return Unit{};
  });
}

// ---------------------------------------------------------------------------------------
// Signals, cancellation, redrive.

Result<RunRecord> SqlStore::SendSignal(const std::string& run_id, const std::string& name, const json::value& payload) {
  return Write<RunRecord>([&](Conn& db, Txn& txn) -> Result<RunRecord> {
    auto run = LockedRun(db, run_id);
    if (!run.ok()) return std::move(run).error();
    if (IsTerminal(run->status)) {
      return Error(ErrorCode::kConflict, "run " + run_id + " already ended (" + std::string(RunStatusName(run->status)) +
                                             "); it takes no signals");
    }
    run->signals[name] = json::object{{"payload", payload}, {"at_ms", ToMillis(txn.now)}};
    {
      auto s = db.Prepare("UPDATE runs SET signals = ?2, updated_at = ?3 WHERE id = ?1");
      s.Bind(1, run_id).Bind(2, json::serialize(run->signals)).Bind(3, ToMillis(txn.now)).Send();
    }
    AppendEvent(txn, run_id, "SignalReceived", {}, 0, json::object{{"name", name}, {"payload", payload}});
    Wake(db, txn, run_id);
    return *LoadRun(db, run_id, true);
  });
}

Result<RunRecord> SqlStore::CancelRun(const std::string& run_id) {
  return Write<RunRecord>([&](Conn& db, Txn& txn) -> Result<RunRecord> {
    auto run = LockedRun(db, run_id);
    if (!run.ok()) return std::move(run).error();
    if (IsTerminal(run->status)) {
      return Error(ErrorCode::kConflict, "run " + run_id + " already ended (" + std::string(RunStatusName(run->status)) +
                                             "); nothing to cancel");
    }
    EndRun(db, txn, run_id, RunStatus::kCancelled, nullptr, std::nullopt);
    return *LoadRun(db, run_id, true);
  });
}

Result<RunRecord> SqlStore::RedriveRun(const std::string& run_id) {
  return Write<RunRecord>([&](Conn& db, Txn& txn) -> Result<RunRecord> {
    auto run = LockedRun(db, run_id);
    if (!run.ok()) return std::move(run).error();
    if (run->status != RunStatus::kDeadLettered && run->status != RunStatus::kFailed) {
      return Error(ErrorCode::kConflict, "run " + run_id + " is " + std::string(RunStatusName(run->status)) +
                                             "; only dead_lettered or failed runs can be redriven");
    }
    const int64_t now = ToMillis(txn.now);
    {
      // Not deleted: the attempts made stay numbered (their tasks and child runs are
      // theirs), and the next attempt is a new one with a new task, child and timer.
      auto s = db.Prepare(
          "UPDATE steps SET status = 'retrying', error = NULL, started_at = NULL, finished_at = "
          "NULL, "
          "interrupted = 0, prior_attempts = attempts WHERE run_id = ?1 AND status <> 'succeeded'");
      s.Bind(1, run_id).Send();
    }
    {
      auto s = db.Prepare(
          "UPDATE runs SET status = 'queued', error = NULL, output = NULL, finished_at = NULL, updated_at = ?2 "
          "WHERE id = ?1");
      s.Bind(1, run_id).Bind(2, now).Send();
    }
    {
      auto s = db.Prepare(
          "INSERT INTO queue(run_id, due_at) VALUES(?1, ?2) ON CONFLICT(run_id) DO UPDATE SET "
          "due_at = ?2, lease_token = NULL, lease_owner = NULL");
      s.Bind(1, run_id).Bind(2, now).Send();
      txn.queue_delta += 1;
    }
    json::object data;
    if (run->error) data["previous_error"] = ErrorToJson(*run->error);
    AppendEvent(txn, run_id, "RunRedriven", {}, 0, data);
    txn.work_due = true;
    return *LoadRun(db, run_id, true);
  });
}

// ---------------------------------------------------------------------------------------
// Tasks.

Result<TaskRecord> SqlStore::EnsureTask(const Lease& lease, const std::string& step_id, int attempt,
                                        const std::string& queue, const json::value& input,
                                        Duration heartbeat_timeout) {
  return Write<TaskRecord>([&](Conn& db, Txn& txn) -> Result<TaskRecord> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    {
      auto s = db.Prepare(std::string("SELECT ") + kTaskColumns +
                          " FROM tasks WHERE run_id = ?1 AND step_id = ?2 AND attempt = ?3");
      s.Bind(1, lease.run_id).Bind(2, step_id).Bind(3, attempt);
      if (s.Step()) {
        TaskRecord t = ReadTaskRow(s);
        if (t.status == TaskRecord::Status::kPending) txn.task_queued = true;
        return t;
      }
    }
    const std::string token = NewToken(random_);
    auto s = db.Prepare(
        "INSERT INTO tasks(token, run_id, step_id, attempt, queue, input, status, heartbeat_timeout, created_at) "
        "VALUES(?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8)");
    s.Bind(1, token).Bind(2, lease.run_id).Bind(3, step_id).Bind(4, attempt).Bind(5, queue)
        .Bind(6, json::serialize(input)).Bind(7, heartbeat_timeout.count()).Bind(8, ToMillis(txn.now)).Send();
    AppendEvent(txn, lease.run_id, "TaskQueued", step_id, attempt, json::object{{"queue", queue}});
    txn.task_queued = true;
    return *LoadTask(db, token);
  });
}

Result<std::optional<TaskRecord>> SqlStore::LeaseTask(const std::string& queue, const std::string& worker_id) {
  return Write<std::optional<TaskRecord>>([&](Conn& db, Txn& txn) -> Result<std::optional<TaskRecord>> {
    const std::string select =
        "SELECT token, run_id FROM tasks WHERE queue = ?1 AND status = 'pending' ORDER BY created_at "
        "LIMIT 1 OFFSET ?2" + std::string(db.SkipLocked());
    for (int64_t busy = 0; busy < 8; ++busy) {
      std::string token, run_id;
      {
        auto s = db.Prepare(select);
        s.Bind(1, queue).Bind(2, busy);
        if (!s.Step()) return std::optional<TaskRecord>();
        token = s.Text(0);
        run_id = s.Text(1);
      }
      // The run's lock is taken after the task's row: waiting for it could deadlock with
      // a write of that run that waits for the row, so a busy run is passed over.
      if (!db.TryLock(RunKey(run_id))) continue;
      std::optional<Error> damage;
      if (auto t = LoadTask(db, token, &damage); t && damage) {
        // A task that cannot be read is failed for good, not handed out; its run learns
        // why when it wakes, and the queue goes on.
        auto s = db.Prepare(
            "UPDATE tasks SET status = 'failed', error = ?2, retryable = 0, lease_expires = NULL "
            "WHERE token = ?1");
        s.Bind(1, token).BindJson(2, ErrorToJson(*damage)).Send();
        AppendEvent(txn, run_id, "TaskFailed", t->step_id, t->attempt,
                    json::object{{"error", ErrorToJson(*damage)}, {"retryable", false}});
        Wake(db, txn, run_id);
        --busy;  // the row is no longer pending: the next one takes its place
        continue;
      }
      {
        auto s = db.Prepare(
            "UPDATE tasks SET status = 'leased', worker_id = ?2, lease_expires = ?3 + heartbeat_timeout "
            "WHERE token = ?1");
        s.Bind(1, token).Bind(2, worker_id).Bind(3, ToMillis(txn.now)).Send();
      }
      auto t = LoadTask(db, token);
      AppendEvent(txn, t->run_id, "TaskLeased", t->step_id, t->attempt, json::object{{"worker", worker_id}});
      // The run, parked while the task was pending, now also waits for this lease's end:
      // it parks again with the lease's expiry as its timer. Nothing waits on that, so
      // no worker is woken for it (a worker's next look takes it): a run re-parking at the
      // moment of a crash counts an interrupted attempt and hands out a new task, and
      // waking a worker at once would put that moment right after every take.
      Wake(db, txn, t->run_id, /*urgent=*/false);
      return std::optional<TaskRecord>(std::move(*t));
    }
    return std::optional<TaskRecord>();
  });
}

Result<TaskRecord> SqlStore::WithHeldTask(const std::string& token,
                                          const std::function<Result<TaskRecord>(Conn&, Txn&, const TaskRecord&)>& fn) {
  return Write<TaskRecord>([&](Conn& db, Txn& txn) -> Result<TaskRecord> {
    std::string run_id;
    {
      auto s = db.Prepare("SELECT run_id FROM tasks WHERE token = ?1");
      s.Bind(1, token);
      if (!s.Step()) return Error(ErrorCode::kNotFound, "no task with token \"" + token + "\"", "token");
      run_id = s.Text(0);
    }
    db.Lock(RunKey(run_id));
    auto t = HeldTask(db, token, txn.now);
    if (!t.ok()) return t;
    return fn(db, txn, *t);
  });
}

Result<TaskRecord> SqlStore::HeartbeatTask(const std::string& token) {
  return WithHeldTask(token, [&](Conn& db, Txn& txn, const TaskRecord&) -> Result<TaskRecord> {
    auto s = db.Prepare("UPDATE tasks SET lease_expires = ?2 + heartbeat_timeout WHERE token = ?1");
    s.Bind(1, token).Bind(2, ToMillis(txn.now)).Send();
    return *LoadTask(db, token);
  });
}

Result<TaskRecord> SqlStore::CompleteTask(const std::string& token, const json::value& output) {
  return WithHeldTask(token, [&](Conn& db, Txn& txn, const TaskRecord& t) -> Result<TaskRecord> {
    auto s = db.Prepare("UPDATE tasks SET status = 'completed', output = ?2, lease_expires = NULL WHERE token = ?1");
    s.Bind(1, token).Bind(2, json::serialize(output)).Send();
    AppendEvent(txn, t.run_id, "TaskCompleted", t.step_id, t.attempt, json::object{{"worker", t.worker_id}});
    Wake(db, txn, t.run_id);
    return *LoadTask(db, token);
  });
}

Result<TaskRecord> SqlStore::FailTask(const std::string& token, const Error& error, bool retryable) {
  return WithHeldTask(token, [&](Conn& db, Txn& txn, const TaskRecord& t) -> Result<TaskRecord> {
    auto s = db.Prepare(
        "UPDATE tasks SET status = 'failed', error = ?2, retryable = ?3, lease_expires = NULL WHERE token = ?1");
    s.Bind(1, token).BindJson(2, ErrorToJson(error)).Bind(3, retryable ? 1 : 0).Send();
    AppendEvent(txn, t.run_id, "TaskFailed", t.step_id, t.attempt,
                json::object{{"worker", t.worker_id}, {"error", ErrorToJson(error)}, {"retryable", retryable}});
    Wake(db, txn, t.run_id);
    return *LoadTask(db, token);
  });
}

Result<void> SqlStore::ExpireTask(const Lease& lease, const std::string& token) {
  return Write<Unit>([&](Conn& db, Txn& txn) -> Result<Unit> {
    if (auto e = CheckLease(db, lease, txn.now)) return *e;
    auto t = LoadTask(db, token);
    if (!t || t->run_id != lease.run_id) return Error(ErrorCode::kNotFound, "no task " + token + " of run " + lease.run_id);
    const Error err(ErrorCode::kTimeout, "worker " + t->worker_id + " sent no heartbeat within " +
                                             std::to_string(t->heartbeat_timeout.count()) + "ms");
    auto s = db.Prepare(
        "UPDATE tasks SET status = 'failed', error = ?2, retryable = 1, lease_expires = NULL "
        "WHERE token = ?1 AND status IN ('leased', 'pending')");
    s.Bind(1, token).BindJson(2, ErrorToJson(err)).Run();
    if (db.Changes() == 0) {
      return Error(ErrorCode::kConflict, "task " + token + " already ended (" + std::string(TaskStatusName(t->status)) +
                                             "); nothing to expire");
    }
    AppendEvent(txn, lease.run_id, "TaskExpired", t->step_id, t->attempt, json::object{{"worker", t->worker_id}});
    return Unit{};
  });
}

// ---------------------------------------------------------------------------------------
// Counts.

Result<StoreStats> SqlStore::GetStats() {
  const int64_t now = ToMillis(clock_.Now());
  return Read<StoreStats>([&](Conn& db) -> Result<StoreStats> {
    StoreStats stats;
    for (auto st : kAllRunStatuses) stats.runs_by_status[st] = 0;
    {
      auto s = db.Prepare("SELECT status, count(*) FROM runs GROUP BY status");
      while (s.Step()) {
        if (auto st = RunStatusFromName(s.Text(0))) stats.runs_by_status[*st] = s.Int(1);
      }
    }
    {
      auto s = db.Prepare(
          "SELECT coalesce(sum(CASE WHEN lease_token IS NULL AND due_at <= ?1 THEN 1 ELSE 0 END), 0), "
          "coalesce(sum(CASE WHEN lease_token IS NOT NULL AND due_at > ?1 THEN 1 ELSE 0 END), 0), "
          "coalesce(sum(CASE WHEN lease_token IS NULL AND due_at > ?1 THEN 1 ELSE 0 END), 0), "
          "coalesce(sum(CASE WHEN lease_token IS NOT NULL AND due_at <= ?1 THEN 1 ELSE 0 END), 0) FROM queue");
      s.Bind(1, now);
      if (s.Step()) {
        stats.queue_ready = s.Int(0) + s.Int(3);  // expired leases are ready again
        stats.queue_leased = s.Int(1);
        stats.queue_delayed = s.Int(2);
      }
    }
    return stats;
  });
}

Result<std::optional<Timestamp>> SqlStore::NextDueAt() {
  const Timestamp now = clock_.Now();
  return Read<std::optional<Timestamp>>([&](Conn& db) -> Result<std::optional<Timestamp>> {
    auto s = db.Prepare("SELECT min(due_at) FROM queue");
    if (!s.Step() || s.IsNull(0)) return std::optional<Timestamp>();
    // "now if one is due", not the moment it became due.
    return std::optional<Timestamp>(std::max(FromMillis(s.Int(0)), now));
  });
}

}  // namespace keel::store::sql
