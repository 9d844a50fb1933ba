#include "keel/store/sqlite_store.h"

#include <sqlite3.h>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "keel/core/ids.h"
#include "keel/obs/log.h"

namespace keel::store {
namespace {

constexpr int kSchemaVersion = 2;

// SQLite failures inside this file travel as SqlError and become a Result at the edge of
// each Store call (Write/Read below); no exception leaves this translation unit.
struct SqlError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS runs (
  id              TEXT PRIMARY KEY,
  pipeline        TEXT NOT NULL,
  status          TEXT NOT NULL,
  input           TEXT NOT NULL,
  output          TEXT,
  error           TEXT,
  definition_id   TEXT NOT NULL,
  idempotency_key TEXT UNIQUE,
  fingerprint     TEXT,
  created_at      INTEGER NOT NULL,
  updated_at      INTEGER NOT NULL,
  started_at      INTEGER,
  finished_at     INTEGER,
  waiting         TEXT,
  signals         TEXT,
  parent          TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS definitions (
  id   TEXT PRIMARY KEY,
  body TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status, id);
CREATE INDEX IF NOT EXISTS runs_by_pipeline ON runs(pipeline, id);
CREATE TABLE IF NOT EXISTS steps (
  run_id      TEXT NOT NULL,
  step_id     TEXT NOT NULL,
  seq         INTEGER NOT NULL,
  status      TEXT NOT NULL,
  attempts    INTEGER NOT NULL,
  output      TEXT,
  error       TEXT,
  started_at  INTEGER,
  finished_at INTEGER,
  PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
  seq     INTEGER PRIMARY KEY,
  run_id  TEXT NOT NULL,
  type    TEXT NOT NULL,
  step_id TEXT,
  attempt INTEGER,
  at      INTEGER NOT NULL,
  data    TEXT
);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id, seq);
CREATE TABLE IF NOT EXISTS queue (
  run_id      TEXT PRIMARY KEY,
  due_at      INTEGER NOT NULL,
  lease_token TEXT,
  lease_owner TEXT,
  deliveries  INTEGER NOT NULL DEFAULT 0,
  woken       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_by_due ON queue(due_at);
CREATE TABLE IF NOT EXISTS tasks (
  token             TEXT PRIMARY KEY,
  run_id            TEXT NOT NULL,
  step_id           TEXT NOT NULL,
  attempt           INTEGER NOT NULL,
  queue             TEXT NOT NULL,
  input             TEXT NOT NULL,
  status            TEXT NOT NULL,
  worker_id         TEXT,
  lease_expires     INTEGER,
  heartbeat_timeout INTEGER NOT NULL,
  output            TEXT,
  error             TEXT,
  retryable         INTEGER NOT NULL DEFAULT 1,
  created_at        INTEGER NOT NULL,
  UNIQUE (run_id, step_id, attempt)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_queue ON tasks(queue, status, created_at);
)sql";

// A prepared statement in use; resets itself when it goes out of scope.
class Stmt {
 public:
  Stmt(sqlite3* db, sqlite3_stmt* s) : db_(db), s_(s) {}
  ~Stmt() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  Stmt& Bind(int i, int64_t v) { return Check(sqlite3_bind_int64(s_, i, v)); }
  Stmt& Bind(int i, int v) { return Check(sqlite3_bind_int64(s_, i, v)); }
  Stmt& Bind(int i, std::string_view v) {
    return Check(sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
  }
  Stmt& Bind(int i, const std::string& v) { return Bind(i, std::string_view(v)); }
  Stmt& Bind(int i, const char* v) { return Bind(i, std::string_view(v)); }
  Stmt& BindNull(int i) { return Check(sqlite3_bind_null(s_, i)); }
  Stmt& BindJson(int i, const json::value& v) {
    if (v.is_null()) return BindNull(i);
    return Bind(i, json::serialize(v));
  }
  Stmt& BindOptText(int i, std::string_view v) { return v.empty() ? BindNull(i) : Bind(i, v); }

  // Steps once; true when a row is available.
  bool Step() {
    const int rc = sqlite3_step(s_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw SqlError(std::string("sqlite: ") + sqlite3_errmsg(db_));
  }
  void Run() {
    while (Step()) {
    }
  }

  bool IsNull(int c) const { return sqlite3_column_type(s_, c) == SQLITE_NULL; }
  int64_t Int(int c) const { return sqlite3_column_int64(s_, c); }
  std::string Text(int c) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, c));
    return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, c))) : std::string();
  }
  json::value Json(int c) const {
    if (IsNull(c)) return nullptr;
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, c));
    return json::parse(std::string_view(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, c))));
  }
  std::optional<Timestamp> OptTime(int c) const {
    if (IsNull(c)) return std::nullopt;
    return FromMillis(Int(c));
  }

 private:
  Stmt& Check(int rc) {
    if (rc != SQLITE_OK) throw SqlError(std::string("sqlite bind: ") + sqlite3_errmsg(db_));
    return *this;
  }
  sqlite3* db_;
  sqlite3_stmt* s_;
};

// One connection with its cache of prepared statements. Used by one thread at a time.
class Db {
 public:
  static std::unique_ptr<Db> Open(const std::string& path, bool read_only) {
    sqlite3* raw = nullptr;
    const int flags = (read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) |
                      SQLITE_OPEN_NOMUTEX;
    const int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
    auto db = std::unique_ptr<Db>(new Db(raw));
    if (rc != SQLITE_OK) {
      throw SqlError("cannot open " + path + ": " + (raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
    }
    sqlite3_busy_timeout(raw, 5000);
    return db;
  }
  ~Db() {
    for (auto& [sql, s] : cache_) sqlite3_finalize(s);
    sqlite3_close_v2(db_);
  }

  Stmt Prepare(const std::string& sql) {
    auto it = cache_.find(sql);
    if (it == cache_.end()) {
      sqlite3_stmt* s = nullptr;
      if (sqlite3_prepare_v3(db_, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT, &s, nullptr) != SQLITE_OK) {
        throw SqlError(std::string("sqlite prepare: ") + sqlite3_errmsg(db_) + " in: " + sql);
      }
      it = cache_.emplace(sql, s).first;
    }
    return Stmt(db_, it->second);
  }

  void Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : sqlite3_errmsg(db_);
      sqlite3_free(err);
      throw SqlError("sqlite: " + msg);
    }
  }

  int Changes() const { return sqlite3_changes(db_); }
  sqlite3* raw() const { return db_; }

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_;
  std::unordered_map<std::string, sqlite3_stmt*> cache_;
};

// What one write sees of the batch it is committed in.
struct Txn {
  Timestamp now;
  int64_t queue_rows = 0;   // queue rows as of this op (earlier ops of the batch included)
  int64_t queue_delta = 0;  // this op's change to the queue row count
  std::vector<std::string> new_definitions;  // definition ids this op inserted
};



struct WriteOp {
  // Runs inside a savepoint; false rolls the op back.
  std::function<bool(Db&, Txn&)> run;
  // Called (by the notifier thread) after the batch committed (commit_error null) or failed.
  std::function<void(const Error* commit_error)> done;
};

// Schema migrations: kMigrations[v - 1] takes a database from version v to v + 1.
constexpr const char* kMigrations[] = {
    // 1 -> 2: waiting runs, signals, child runs.
    "ALTER TABLE runs ADD COLUMN waiting TEXT; ALTER TABLE runs ADD COLUMN signals TEXT; "
    "ALTER TABLE runs ADD COLUMN parent TEXT; ALTER TABLE queue ADD COLUMN woken INTEGER NOT NULL DEFAULT 0;",
};
static_assert(std::size(kMigrations) == kSchemaVersion - 1);

constexpr const char* kRunColumns =
    "id, pipeline, status, input, output, error, idempotency_key, created_at, updated_at, "
    "started_at, finished_at, definition_id, waiting, signals, parent";
RunRecord ReadRunRow(const Stmt& s, bool with_definition) {
  RunRecord r;
  r.id = s.Text(0);
  r.pipeline = s.Text(1);
  r.status = RunStatusFromName(s.Text(2)).value_or(RunStatus::kQueued);
  r.input = s.Json(3);
  r.output = s.Json(4);
  if (!s.IsNull(5)) r.error = ErrorFromJson(s.Json(5));
  r.idempotency_key = s.Text(6);
  r.created_at = FromMillis(s.Int(7));
  r.updated_at = FromMillis(s.Int(8));
  r.started_at = s.OptTime(9);
  r.finished_at = s.OptTime(10);
  if (with_definition) {
    r.definition_id = s.Text(11);
    r.waiting = s.Json(12);
    if (!s.IsNull(13)) {
      json::value sig = s.Json(13);
      if (sig.is_object()) r.signals = std::move(sig.as_object());
    }
    r.parent = s.Text(14);
  }
  return r;
}

std::optional<RunRecord> LoadRun(Db& db, const std::string& id, bool with_steps) {
  std::optional<RunRecord> run;
  {
    auto s = db.Prepare(std::string("SELECT ") + kRunColumns + " FROM runs WHERE id = ?1");
    s.Bind(1, id);
    if (!s.Step()) return std::nullopt;
    run = ReadRunRow(s, true);
  }
  {
    auto s = db.Prepare("SELECT body FROM definitions WHERE id = ?1");
    s.Bind(1, run->definition_id);
    if (s.Step()) run->definition = s.Json(0);
  }
  if (with_steps) {
    auto s = db.Prepare(
        "SELECT step_id, status, attempts, output, error, started_at, finished_at FROM steps "
        "WHERE run_id = ?1 ORDER BY seq");
    s.Bind(1, id);
    while (s.Step()) {
      StepRecord st;
      st.step_id = s.Text(0);
      const std::string status = s.Text(1);
      st.status = status == "succeeded" ? StepStatus::kSucceeded
                  : status == "retrying" ? StepStatus::kRetrying
                  : status == "failed"   ? StepStatus::kFailed
                  : status == "waiting"  ? StepStatus::kWaiting
                                         : StepStatus::kRunning;
      st.attempts = static_cast<int>(s.Int(2));
      st.output = s.Json(3);
      if (!s.IsNull(4)) st.error = ErrorFromJson(s.Json(4));
      st.started_at = s.OptTime(5);
      st.finished_at = s.OptTime(6);
      run->steps.push_back(std::move(st));
    }
  }
  return run;
}

void AppendEvent(Db& db, Timestamp now, const std::string& run_id, std::string_view type,
                 std::string_view step_id = {}, int attempt = 0, const json::value& data = nullptr) {
  auto s = db.Prepare("INSERT INTO events(run_id, type, step_id, attempt, at, data) VALUES(?1, ?2, ?3, ?4, ?5, ?6)");
  s.Bind(1, run_id).Bind(2, type).BindOptText(3, step_id).Bind(5, ToMillis(now)).BindJson(6, data);
  if (attempt > 0) s.Bind(4, attempt); else s.BindNull(4);
  s.Run();
}

// kLeaseLost unless `lease` is the run's current, unexpired lease.
std::optional<Error> CheckLease(Db& db, const Lease& lease, Timestamp now) {
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
std::optional<int> StartStepRow(Db& db, Timestamp now, const std::string& run_id, const std::string& step_id) {
  std::optional<int> attempt;
  {
    auto s = db.Prepare(
        "INSERT INTO steps(run_id, step_id, seq, status, attempts, started_at) "
        "VALUES(?1, ?2, (SELECT count(*) FROM steps WHERE run_id = ?1), 'running', 1, ?3) "
        "ON CONFLICT(run_id, step_id) DO UPDATE SET status = 'running', "
        "attempts = attempts + (status != 'waiting') WHERE status != 'succeeded' RETURNING attempts");
    s.Bind(1, run_id).Bind(2, step_id).Bind(3, ToMillis(now));
    if (s.Step()) attempt = static_cast<int>(s.Int(0));
    while (s.Step()) {
    }
  }
  if (!attempt) return std::nullopt;
  {
    auto s = db.Prepare("UPDATE runs SET updated_at = ?2 WHERE id = ?1");
    s.Bind(1, run_id).Bind(2, ToMillis(now)).Run();
  }
  AppendEvent(db, now, run_id, "StepStarted", step_id, *attempt);
  return attempt;
}

Error StepAlreadySucceeded(const std::string& run_id, const std::string& step_id) {
  return Error(ErrorCode::kConflict, "step \"" + step_id + "\" of run " + run_id +
                                         " already succeeded; a checkpointed step never runs again");
}

// Something a parked run waits for happened (a signal, a child run's end): a waiting run
// is due at once; a leased one is marked, so that parking it again makes it due at once
// instead (SuspendStep); any other run will look when it next runs.
void Wake(Db& db, Timestamp now, const std::string& run_id) {
  std::string status;
  {
    auto s = db.Prepare("SELECT status FROM runs WHERE id = ?1");
    s.Bind(1, run_id);
    if (!s.Step()) return;
    status = s.Text(0);
  }
  if (status == "waiting") {
    auto s = db.Prepare("UPDATE queue SET due_at = min(due_at, ?2) WHERE run_id = ?1 AND lease_token IS NULL");
    s.Bind(1, run_id).Bind(2, ToMillis(now)).Run();
    if (db.Changes() > 0) return;
  }
  auto s = db.Prepare("UPDATE queue SET woken = 1 WHERE run_id = ?1 AND lease_token IS NOT NULL");
  s.Bind(1, run_id).Run();
}

// The `seq` of map items: after every step's, in index order.
constexpr int64_t kItemSeqBase = int64_t{1} << 40;

constexpr const char* kTaskColumns =
    "token, run_id, step_id, attempt, queue, input, status, worker_id, lease_expires, heartbeat_timeout, output, "
    "error, retryable, created_at";

TaskRecord ReadTaskRow(const Stmt& s) {
  TaskRecord t;
  t.token = s.Text(0);
  t.run_id = s.Text(1);
  t.step_id = s.Text(2);
  t.attempt = static_cast<int>(s.Int(3));
  t.queue = s.Text(4);
  t.input = s.Json(5);
  const std::string st = s.Text(6);
  t.status = st == "leased"      ? TaskRecord::Status::kLeased
             : st == "completed" ? TaskRecord::Status::kCompleted
             : st == "failed"    ? TaskRecord::Status::kFailed
                                 : TaskRecord::Status::kPending;
  t.worker_id = s.Text(7);
  t.lease_expires = s.OptTime(8);
  t.heartbeat_timeout = Duration(s.Int(9));
  t.output = s.Json(10);
  if (!s.IsNull(11)) t.error = ErrorFromJson(s.Json(11));
  t.retryable = s.Int(12) != 0;
  t.created_at = FromMillis(s.Int(13));
  return t;
}

std::optional<TaskRecord> LoadTask(Db& db, const std::string& token) {
  auto s = db.Prepare(std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE token = ?1");
  s.Bind(1, token);
  if (!s.Step()) return std::nullopt;
  return ReadTaskRow(s);
}

// The task of `token` if a worker holds it now; else why not.
Result<TaskRecord> HeldTask(Db& db, const std::string& token, Timestamp now) {
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

void EndRun(Db& db, Txn& txn, const std::string& run_id, RunStatus status, const json::value& output,
            const std::optional<Error>& error) {
  {
    auto s = db.Prepare(
        "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_at = ?5, updated_at = ?5 WHERE id = ?1");
    s.Bind(1, run_id).Bind(2, RunStatusName(status)).BindJson(3, output).Bind(5, ToMillis(txn.now));
    if (error) s.BindJson(4, ErrorToJson(*error)); else s.BindNull(4);
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
  AppendEvent(db, txn.now, run_id, type, {}, 0, data);
  std::string parent;
  {
    auto s = db.Prepare("SELECT parent FROM runs WHERE id = ?1");
    s.Bind(1, run_id);
    if (s.Step() && !s.IsNull(0)) parent = s.Text(0);
  }
  if (!parent.empty()) Wake(db, txn.now, parent.substr(0, parent.find('/')));
}

class SqliteStore final : public Store {
 public:
  SqliteStore(SqliteOptions options, const Clock& clock, Random& random)
      : options_(std::move(options)), clock_(clock), random_(random) {}

  ~SqliteStore() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (writer_thread_.joinable()) writer_thread_.join();
    {
      std::lock_guard lock(notify_mu_);
      notifier_stopping_ = true;
    }
    notify_cv_.notify_all();
    if (notifier_thread_.joinable()) notifier_thread_.join();
    {
      std::lock_guard lock(checkpoint_mu_);
      checkpoint_stopping_ = true;
    }
    checkpoint_cv_.notify_all();
    if (checkpoint_thread_.joinable()) checkpoint_thread_.join();
  }

  Result<void> Open() {
    try {
      const auto parent = std::filesystem::path(options_.path).parent_path();
      if (!parent.empty()) {
        std::error_code ec;
        std::filesystem::create_directories(parent, ec);
        if (ec) {
          return Error(ErrorCode::kUnavailable, "cannot create directory " + parent.string() + ": " + ec.message());
        }
      }
      writer_ = Db::Open(options_.path, false);
      writer_->Exec("PRAGMA journal_mode=WAL");
      writer_->Exec("PRAGMA synchronous=FULL");
      // Savepoint journals stay in memory (they spilled to temp files, one write per page).
      writer_->Exec("PRAGMA temp_store=MEMORY");
      // Checkpoints run on their own connection and thread, not inside group commits.
      writer_->Exec("PRAGMA wal_autocheckpoint=0");
      // After a checkpoint resets the WAL, its file is cut back to 64 MiB.
      writer_->Exec("PRAGMA journal_size_limit=67108864");
      sqlite3_wal_hook(
          writer_->raw(),
          [](void* self, sqlite3*, const char*, int frames) {
            static_cast<SqliteStore*>(self)->wal_frames_ = frames;
            return SQLITE_OK;
          },
          this);
      writer_->Exec("PRAGMA foreign_keys=OFF");
      int version = 0;
      {
        auto s = writer_->Prepare("PRAGMA user_version");
        if (s.Step()) version = static_cast<int>(s.Int(0));
      }
      if (version > kSchemaVersion) {
        return Error(ErrorCode::kUnavailable,
                     "the database " + options_.path + " has schema version " + std::to_string(version) +
                         ", newer than this keel understands (" + std::to_string(kSchemaVersion) +
                         "); run a newer keel");
      }
      writer_->Exec("BEGIN IMMEDIATE");
      if (version > 0) {
        for (int v = version; v < kSchemaVersion; ++v) writer_->Exec(kMigrations[v - 1]);
      }
      writer_->Exec(kSchema);
      writer_->Exec(("PRAGMA user_version=" + std::to_string(kSchemaVersion)).c_str());
      writer_->Exec("COMMIT");
      {
        auto s = writer_->Prepare("SELECT count(*) FROM queue");
        if (s.Step()) queue_rows_ = s.Int(0);
      }
      for (int i = 0; i < std::max(1, options_.read_connections); ++i) {
        auto db = Db::Open(options_.path, true);
        readers_.push_back(std::move(db));
      }
    } catch (const SqlError& e) {
      return Error(ErrorCode::kUnavailable, e.what());
    }
    try {
      checkpointer_ = Db::Open(options_.path, false);
    } catch (const SqlError& e) {
      return Error(ErrorCode::kUnavailable, e.what());
    }
    writer_thread_ = std::thread([this] { WriterLoop(); });
    notifier_thread_ = std::thread([this] { NotifierLoop(); });
    checkpoint_thread_ = std::thread([this] { CheckpointLoop(); });
    return Ok();
  }

  Result<SubmitResult> SubmitRun(const NewRun& run) override {
    return Write<SubmitResult>([&](Db& db, Txn& txn) -> Result<SubmitResult> {
      if (!run.idempotency_key.empty()) {
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
                                                   "\" was already used with a different request (run " +
                                                   existing_id + "); use a new key for a new request");
          }
          return SubmitResult{*LoadRun(db, existing_id, true), false};
        }
      }
      {
        auto s = db.Prepare("SELECT 1 FROM runs WHERE id = ?1");
        s.Bind(1, run.id);
        if (s.Step()) return Error(ErrorCode::kConflict, "a run with id " + run.id + " already exists");
      }
      if (txn.queue_rows >= run.max_queue_depth) {
        Error e(ErrorCode::kQueueFull, "the run queue is full (" + std::to_string(txn.queue_rows) +
                                           " runs queued or in flight); retry later");
        e.retry_after = Duration(1000);
        return e;
      }
      const int64_t now = ToMillis(txn.now);
      // Definitions are stored once, by id; the writer remembers the ids it committed.
      std::string definition_id = run.definition_id;
      std::string definition_body;
      if (definition_id.empty()) {
        definition_body = json::serialize(run.definition);
        definition_id = "fnv-" + std::to_string(Fnv1a64(definition_body));
      }
      if (!known_definitions_.count(definition_id)) {
        if (definition_body.empty()) definition_body = json::serialize(run.definition);
        auto s = db.Prepare("INSERT OR IGNORE INTO definitions(id, body) VALUES(?1, ?2)");
        s.Bind(1, definition_id).Bind(2, definition_body).Run();
        txn.new_definitions.push_back(definition_id);
      }
      {
        auto s = db.Prepare(
            "INSERT INTO runs(id, pipeline, status, input, definition_id, idempotency_key, fingerprint, "
            "created_at, updated_at, parent) VALUES(?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?8)");
        s.Bind(1, run.id).Bind(2, run.pipeline).Bind(3, json::serialize(run.input))
            .Bind(4, definition_id).BindOptText(5, run.idempotency_key)
            .BindOptText(6, run.fingerprint).Bind(7, now).BindOptText(8, run.parent);
        s.Run();
      }
      {
        auto s = db.Prepare("INSERT INTO queue(run_id, due_at) VALUES(?1, ?2)");
        s.Bind(1, run.id).Bind(2, now).Run();
        txn.queue_delta += 1;
      }
      AppendEvent(db, txn.now, run.id, "RunSubmitted", {}, 0, json::object{{"pipeline", run.pipeline}});
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

  Result<RunRecord> GetRun(const std::string& run_id) override {
    return Read<RunRecord>([&](Db& db) -> Result<RunRecord> {
      auto run = LoadRun(db, run_id, true);
      if (!run) return Error(ErrorCode::kNotFound, "no run with id \"" + run_id + "\"", "run_id");
      return std::move(*run);
    });
  }

  Result<RunPage> ListRuns(const RunFilter& filter) override {
    const int limit = std::clamp(filter.limit, 1, 1000);
    std::string sql = std::string("SELECT ") + kRunColumns + " FROM runs";
    std::vector<std::string> where;
    if (filter.status) where.push_back("status = ?1");
    if (!filter.pipeline.empty()) where.push_back("pipeline = ?2");
    if (!filter.cursor.empty()) where.push_back("id < ?3");
    for (std::size_t i = 0; i < where.size(); ++i) sql += (i == 0 ? " WHERE " : " AND ") + where[i];
    sql += " ORDER BY id DESC LIMIT ?4";
    return Read<RunPage>([&](Db& db) -> Result<RunPage> {
      RunPage page;
      auto s = db.Prepare(sql);
      if (filter.status) s.Bind(1, RunStatusName(*filter.status));
      if (!filter.pipeline.empty()) s.Bind(2, filter.pipeline);
      if (!filter.cursor.empty()) s.Bind(3, filter.cursor);
      s.Bind(4, limit + 1);
      while (s.Step()) page.runs.push_back(ReadRunRow(s, true));
      if (static_cast<int>(page.runs.size()) > limit) {
        page.runs.pop_back();
        page.next_cursor = page.runs.back().id;
      }
      return page;
    });
  }

  Result<std::vector<Event>> ListEvents(const std::string& run_id, int64_t after_seq, int limit) override {
    return Read<std::vector<Event>>([&](Db& db) -> Result<std::vector<Event>> {
      {
        auto s = db.Prepare("SELECT 1 FROM runs WHERE id = ?1");
        s.Bind(1, run_id);
        if (!s.Step()) return Error(ErrorCode::kNotFound, "no run with id \"" + run_id + "\"", "run_id");
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
        e.data = s.Json(5);
        out.push_back(std::move(e));
      }
      return out;
    });
  }

  Result<std::optional<LeasedRun>> LeaseRun(const std::string& worker_id, Duration lease_for) override {
    return Write<std::optional<LeasedRun>>([&](Db& db, Txn& txn) -> Result<std::optional<LeasedRun>> {
      const int64_t now = ToMillis(txn.now);
      // A terminal run left in the queue (not expected) is removed and the next one tried.
      for (int tries = 0; tries < 8; ++tries) {
        std::string run_id;
        bool was_leased = false;
        int deliveries = 0;
        {
          auto s = db.Prepare(
              "SELECT run_id, lease_token IS NOT NULL, deliveries FROM queue WHERE due_at <= ?1 "
              "ORDER BY due_at LIMIT 1");
          s.Bind(1, now);
          if (!s.Step()) return std::optional<LeasedRun>();
          run_id = s.Text(0);
          was_leased = s.Int(1) != 0;
          deliveries = static_cast<int>(s.Int(2));
        }
        auto run = LoadRun(db, run_id, true);
        if (!run || IsTerminal(run->status)) {
          auto s = db.Prepare("DELETE FROM queue WHERE run_id = ?1");
          s.Bind(1, run_id).Run();
          txn.queue_delta -= db.Changes();
          continue;
        }
        Lease lease{run_id, NewToken(random_), txn.now + lease_for, deliveries + 1};
        {
          auto s = db.Prepare(
              "UPDATE queue SET due_at = ?2, lease_token = ?3, lease_owner = ?4, deliveries = deliveries + 1 "
              "WHERE run_id = ?1");
          s.Bind(1, run_id).Bind(2, ToMillis(lease.expires_at)).Bind(3, lease.token).Bind(4, worker_id).Run();
        }
        if (was_leased) {
          AppendEvent(db, txn.now, run_id, "LeaseExpired", {}, 0, json::object{{"delivery", deliveries}});
        }
        if (run->status == RunStatus::kQueued || run->status == RunStatus::kWaiting) {
          auto s = db.Prepare(
              "UPDATE runs SET status = 'running', waiting = NULL, started_at = coalesce(started_at, ?2), "
              "updated_at = ?2 WHERE id = ?1");
          s.Bind(1, run_id).Bind(2, now).Run();
          run->status = RunStatus::kRunning;
          run->waiting = nullptr;
          if (!run->started_at) run->started_at = txn.now;
        }
        AppendEvent(db, txn.now, run_id, "RunLeased", {}, 0,
                    json::object{{"worker", worker_id}, {"delivery", lease.delivery}});
        return std::optional<LeasedRun>(LeasedRun{std::move(lease), std::move(*run)});
      }
      return std::optional<LeasedRun>();
    });
  }

  Result<Timestamp> Heartbeat(const Lease& lease, Duration lease_for) override {
    return Write<Timestamp>([&](Db& db, Txn& txn) -> Result<Timestamp> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      const Timestamp expires = txn.now + lease_for;
      auto s = db.Prepare("UPDATE queue SET due_at = ?2 WHERE run_id = ?1");
      s.Bind(1, lease.run_id).Bind(2, ToMillis(expires)).Run();
      return expires;
    });
  }

  Result<int> StartStep(const Lease& lease, const std::string& step_id) override {
    return Write<int>([&](Db& db, Txn& txn) -> Result<int> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      const auto attempt = StartStepRow(db, txn.now, lease.run_id, step_id);
      if (!attempt) return StepAlreadySucceeded(lease.run_id, step_id);
      return *attempt;
    });
  }

  Result<int> CompleteStep(const Lease& lease, const std::string& step_id, const json::value& output,
                           const std::optional<std::string>& next_step,
                           const std::optional<json::value>& run_output) override {
    return Write<int>([&](Db& db, Txn& txn) -> Result<int> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      int attempt = 0;
      {
        auto s = db.Prepare(
            "UPDATE steps SET status = 'succeeded', output = ?3, error = NULL, finished_at = ?4 "
            "WHERE run_id = ?1 AND step_id = ?2 AND status = 'running' RETURNING attempts");
        s.Bind(1, lease.run_id).Bind(2, step_id).Bind(3, json::serialize(output)).Bind(4, ToMillis(txn.now));
        if (!s.Step()) {
          return Error(ErrorCode::kConflict, "step \"" + step_id + "\" of run " + lease.run_id + " is not running");
        }
        attempt = static_cast<int>(s.Int(0));
        while (s.Step()) {
        }
      }
      AppendEvent(db, txn.now, lease.run_id, "StepSucceeded", step_id, attempt);
      if (run_output) {
        EndRun(db, txn, lease.run_id, RunStatus::kSucceeded, *run_output, std::nullopt);
        return 0;
      }
      if (next_step) {
        const auto next = StartStepRow(db, txn.now, lease.run_id, *next_step);
        if (!next) return StepAlreadySucceeded(lease.run_id, *next_step);
        return *next;
      }
      return 0;
    });
  }

  Result<void> FailStep(const Lease& lease, const std::string& step_id, const Error& error,
                        const FailureDisposition& disposition) override {
    return Write<Unit>([&](Db& db, Txn& txn) -> Result<Unit> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      const bool retry = disposition.kind == FailureDisposition::Kind::kRetry;
      int attempt = 0;
      {
        auto s = db.Prepare(
            "UPDATE steps SET status = ?3, error = ?4, finished_at = ?5 WHERE run_id = ?1 AND step_id = ?2 "
            "AND status = 'running' RETURNING attempts");
        s.Bind(1, lease.run_id).Bind(2, step_id).Bind(3, retry ? "retrying" : "failed")
            .BindJson(4, ErrorToJson(error));
        if (retry) s.BindNull(5); else s.Bind(5, ToMillis(txn.now));
        if (!s.Step()) {
          return Error(ErrorCode::kConflict, "step \"" + step_id + "\" of run " + lease.run_id + " is not running");
        }
        attempt = static_cast<int>(s.Int(0));
        while (s.Step()) {
        }
      }
      json::object data{{"error", ErrorToJson(error)}};
      if (retry) data["retry_in_ms"] = disposition.delay.count();
      AppendEvent(db, txn.now, lease.run_id, "AttemptFailed", step_id, attempt, data);
      if (retry) {
        auto s = db.Prepare("UPDATE queue SET due_at = ?2, lease_token = NULL, lease_owner = NULL WHERE run_id = ?1");
        s.Bind(1, lease.run_id).Bind(2, ToMillis(txn.now + disposition.delay)).Run();
        auto r = db.Prepare("UPDATE runs SET updated_at = ?2 WHERE id = ?1");
        r.Bind(1, lease.run_id).Bind(2, ToMillis(txn.now)).Run();
      } else {
        EndRun(db, txn, lease.run_id,
               disposition.kind == FailureDisposition::Kind::kFail ? RunStatus::kFailed : RunStatus::kDeadLettered,
               nullptr, error);
      }
      return Unit{};
    });
  }

  Result<void> SuspendStep(const Lease& lease, const std::string& step_id, std::optional<Timestamp> wake_at,
                           const json::value& waiting) override {
    return Write<Unit>([&](Db& db, Txn& txn) -> Result<Unit> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      int attempt = 0;
      {
        auto s = db.Prepare(
            "UPDATE steps SET status = 'waiting' WHERE run_id = ?1 AND step_id = ?2 AND status = 'running' "
            "RETURNING attempts");
        s.Bind(1, lease.run_id).Bind(2, step_id);
        if (!s.Step()) {
          return Error(ErrorCode::kConflict, "step \"" + step_id + "\" of run " + lease.run_id + " is not running");
        }
        attempt = static_cast<int>(s.Int(0));
        while (s.Step()) {
        }
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
      {
        auto s = db.Prepare(
            "UPDATE queue SET due_at = ?2, lease_token = NULL, lease_owner = NULL, woken = 0 WHERE run_id = ?1");
        s.Bind(1, lease.run_id).Bind(2, due).Run();
      }
      {
        auto s = db.Prepare("UPDATE runs SET status = 'waiting', waiting = ?2, updated_at = ?3 WHERE id = ?1");
        s.Bind(1, lease.run_id).BindJson(2, waiting).Bind(3, ToMillis(txn.now)).Run();
      }
      json::object data{{"waiting", waiting}};
      if (wake_at) data["wake_at_ms"] = ToMillis(*wake_at);
      AppendEvent(db, txn.now, lease.run_id, "StepWaiting", step_id, attempt, data);
      return Unit{};
    });
  }

  Result<void> CompleteItem(const Lease& lease, const std::string& step_id, int64_t index,
                            const json::value& output) override {
    return Write<Unit>([&](Db& db, Txn& txn) -> Result<Unit> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      auto s = db.Prepare(
          "INSERT INTO steps(run_id, step_id, seq, status, attempts, output, started_at, finished_at) "
          "VALUES(?1, ?2, ?5, 'succeeded', 1, ?3, ?4, ?4) "
          "ON CONFLICT(run_id, step_id) DO UPDATE SET status = 'succeeded', output = ?3, error = NULL, finished_at = ?4 "
          "WHERE status != 'succeeded'");
      // Items order after the steps by their index: no count over the run's records (a
      // cost per item that grew with the map).
      s.Bind(1, lease.run_id).Bind(2, ItemStepId(step_id, index)).Bind(3, json::serialize(output))
          .Bind(4, ToMillis(txn.now)).Bind(5, kItemSeqBase + index).Run();
      return Unit{};
    });
  }

  Result<RunRecord> SendSignal(const std::string& run_id, const std::string& name, const json::value& payload) override {
    return Write<RunRecord>([&](Db& db, Txn& txn) -> Result<RunRecord> {
      auto run = LoadRun(db, run_id, false);
      if (!run) return Error(ErrorCode::kNotFound, "no run with id \"" + run_id + "\"", "run_id");
      if (IsTerminal(run->status)) {
        return Error(ErrorCode::kConflict, "run " + run_id + " already ended (" +
                                               std::string(RunStatusName(run->status)) + "); it takes no signals");
      }
      run->signals[name] = json::object{{"payload", payload}, {"at_ms", ToMillis(txn.now)}};
      {
        auto s = db.Prepare("UPDATE runs SET signals = ?2, updated_at = ?3 WHERE id = ?1");
        s.Bind(1, run_id).Bind(2, json::serialize(run->signals)).Bind(3, ToMillis(txn.now)).Run();
      }
      AppendEvent(db, txn.now, run_id, "SignalReceived", {}, 0, json::object{{"name", name}, {"payload", payload}});
      Wake(db, txn.now, run_id);
      return *LoadRun(db, run_id, true);
    });
  }

  // Any queue's new task wakes every waiter: each then looks at its own queue again.
  void WaitForTask(const std::string&, Duration max) override {
    std::unique_lock lock(task_mu_);
    const uint64_t seen = task_seq_;
    task_cv_.wait_for(lock, max, [&] { return task_seq_ != seen; });
  }

  Result<TaskRecord> EnsureTask(const Lease& lease, const std::string& step_id, int attempt, const std::string& queue,
                                const json::value& input, Duration heartbeat_timeout) override {
    auto r = EnsureTaskRow(lease, step_id, attempt, queue, input, heartbeat_timeout);
    if (r.ok() && r->status == TaskRecord::Status::kPending) {
      {
        std::lock_guard lock(task_mu_);
        ++task_seq_;
      }
      task_cv_.notify_all();
    }
    return r;
  }

  Result<TaskRecord> EnsureTaskRow(const Lease& lease, const std::string& step_id, int attempt, const std::string& queue,
                                   const json::value& input, Duration heartbeat_timeout) {
    return Write<TaskRecord>([&](Db& db, Txn& txn) -> Result<TaskRecord> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      {
        auto s = db.Prepare(std::string("SELECT ") + kTaskColumns +
                            " FROM tasks WHERE run_id = ?1 AND step_id = ?2 AND attempt = ?3");
        s.Bind(1, lease.run_id).Bind(2, step_id).Bind(3, attempt);
        if (s.Step()) return ReadTaskRow(s);
      }
      const std::string token = NewToken(random_);
      auto s = db.Prepare(
          "INSERT INTO tasks(token, run_id, step_id, attempt, queue, input, status, heartbeat_timeout, created_at) "
          "VALUES(?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8)");
      s.Bind(1, token).Bind(2, lease.run_id).Bind(3, step_id).Bind(4, attempt).Bind(5, queue)
          .Bind(6, json::serialize(input)).Bind(7, heartbeat_timeout.count()).Bind(8, ToMillis(txn.now)).Run();
      AppendEvent(db, txn.now, lease.run_id, "TaskQueued", step_id, attempt, json::object{{"queue", queue}});
      return *LoadTask(db, token);
    });
  }

  Result<std::optional<TaskRecord>> LeaseTask(const std::string& queue, const std::string& worker_id) override {
    return Write<std::optional<TaskRecord>>([&](Db& db, Txn& txn) -> Result<std::optional<TaskRecord>> {
      std::string token;
      {
        auto s = db.Prepare(
            "SELECT token FROM tasks WHERE queue = ?1 AND status = 'pending' ORDER BY created_at LIMIT 1");
        s.Bind(1, queue);
        if (!s.Step()) return std::optional<TaskRecord>();
        token = s.Text(0);
      }
      {
        auto s = db.Prepare(
            "UPDATE tasks SET status = 'leased', worker_id = ?2, lease_expires = ?3 + heartbeat_timeout WHERE token = ?1");
        s.Bind(1, token).Bind(2, worker_id).Bind(3, ToMillis(txn.now)).Run();
      }
      auto t = LoadTask(db, token);
      AppendEvent(db, txn.now, t->run_id, "TaskLeased", t->step_id, t->attempt, json::object{{"worker", worker_id}});
      // The run, parked while the task was pending, now also waits for this lease's end.
      Wake(db, txn.now, t->run_id);
      return std::optional<TaskRecord>(std::move(*t));
    });
  }

  Result<TaskRecord> HeartbeatTask(const std::string& token) override {
    return Write<TaskRecord>([&](Db& db, Txn& txn) -> Result<TaskRecord> {
      auto t = HeldTask(db, token, txn.now);
      if (!t.ok()) return t;
      auto s = db.Prepare("UPDATE tasks SET lease_expires = ?2 + heartbeat_timeout WHERE token = ?1");
      s.Bind(1, token).Bind(2, ToMillis(txn.now)).Run();
      return *LoadTask(db, token);
    });
  }

  Result<TaskRecord> CompleteTask(const std::string& token, const json::value& output) override {
    return Write<TaskRecord>([&](Db& db, Txn& txn) -> Result<TaskRecord> {
      auto t = HeldTask(db, token, txn.now);
      if (!t.ok()) return t;
      auto s = db.Prepare("UPDATE tasks SET status = 'completed', output = ?2, lease_expires = NULL WHERE token = ?1");
      s.Bind(1, token).Bind(2, json::serialize(output)).Run();
      AppendEvent(db, txn.now, t->run_id, "TaskCompleted", t->step_id, t->attempt, json::object{{"worker", t->worker_id}});
      Wake(db, txn.now, t->run_id);
      return *LoadTask(db, token);
    });
  }

  Result<TaskRecord> FailTask(const std::string& token, const Error& error, bool retryable) override {
    return Write<TaskRecord>([&](Db& db, Txn& txn) -> Result<TaskRecord> {
      auto t = HeldTask(db, token, txn.now);
      if (!t.ok()) return t;
      auto s = db.Prepare(
          "UPDATE tasks SET status = 'failed', error = ?2, retryable = ?3, lease_expires = NULL WHERE token = ?1");
      s.Bind(1, token).BindJson(2, ErrorToJson(error)).Bind(3, retryable ? 1 : 0).Run();
      AppendEvent(db, txn.now, t->run_id, "TaskFailed", t->step_id, t->attempt,
                  json::object{{"worker", t->worker_id}, {"error", ErrorToJson(error)}, {"retryable", retryable}});
      Wake(db, txn.now, t->run_id);
      return *LoadTask(db, token);
    });
  }

  Result<void> ExpireTask(const Lease& lease, const std::string& token) override {
    return Write<Unit>([&](Db& db, Txn& txn) -> Result<Unit> {
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
        return Error(ErrorCode::kConflict, "task " + token + " already ended (" +
                                               std::string(TaskStatusName(t->status)) + "); nothing to expire");
      }
      AppendEvent(db, txn.now, lease.run_id, "TaskExpired", t->step_id, t->attempt, json::object{{"worker", t->worker_id}});
      return Unit{};
    });
  }

  Result<void> FailRun(const Lease& lease, const Error& error) override {
    return Write<Unit>([&](Db& db, Txn& txn) -> Result<Unit> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      EndRun(db, txn, lease.run_id, RunStatus::kFailed, nullptr, error);
      return Unit{};
    });
  }

  Result<void> ReleaseLease(const Lease& lease) override {
    return Write<Unit>([&](Db& db, Txn& txn) -> Result<Unit> {
      if (auto e = CheckLease(db, lease, txn.now)) return *e;
      auto s = db.Prepare("UPDATE queue SET due_at = ?2, lease_token = NULL, lease_owner = NULL WHERE run_id = ?1");
      s.Bind(1, lease.run_id).Bind(2, ToMillis(txn.now)).Run();
      AppendEvent(db, txn.now, lease.run_id, "LeaseReleased");
      return Unit{};
    });
  }

  Result<RunRecord> CancelRun(const std::string& run_id) override {
    return Write<RunRecord>([&](Db& db, Txn& txn) -> Result<RunRecord> {
      auto run = LoadRun(db, run_id, false);
      if (!run) return Error(ErrorCode::kNotFound, "no run with id \"" + run_id + "\"", "run_id");
      if (IsTerminal(run->status)) {
        return Error(ErrorCode::kConflict, "run " + run_id + " already ended (" +
                                               std::string(RunStatusName(run->status)) + "); nothing to cancel");
      }
      EndRun(db, txn, run_id, RunStatus::kCancelled, nullptr, std::nullopt);
      return *LoadRun(db, run_id, true);
    });
  }

  Result<RunRecord> RedriveRun(const std::string& run_id) override {
    return Write<RunRecord>([&](Db& db, Txn& txn) -> Result<RunRecord> {
      auto run = LoadRun(db, run_id, false);
      if (!run) return Error(ErrorCode::kNotFound, "no run with id \"" + run_id + "\"", "run_id");
      if (run->status != RunStatus::kDeadLettered && run->status != RunStatus::kFailed) {
        return Error(ErrorCode::kConflict, "run " + run_id + " is " + std::string(RunStatusName(run->status)) +
                                               "; only dead_lettered or failed runs can be redriven");
      }
      const int64_t now = ToMillis(txn.now);
      {
        auto s = db.Prepare("DELETE FROM steps WHERE run_id = ?1 AND status != 'succeeded'");
        s.Bind(1, run_id).Run();
      }
      {
        auto s = db.Prepare(
            "UPDATE runs SET status = 'queued', error = NULL, output = NULL, finished_at = NULL, updated_at = ?2 "
            "WHERE id = ?1");
        s.Bind(1, run_id).Bind(2, now).Run();
      }
      {
        auto s = db.Prepare(
            "INSERT INTO queue(run_id, due_at) VALUES(?1, ?2) ON CONFLICT(run_id) DO UPDATE SET "
            "due_at = ?2, lease_token = NULL, lease_owner = NULL");
        s.Bind(1, run_id).Bind(2, now).Run();
        txn.queue_delta += 1;
      }
      json::object data;
      if (run->error) data["previous_error"] = ErrorToJson(*run->error);
      AppendEvent(db, txn.now, run_id, "RunRedriven", {}, 0, data);
      return *LoadRun(db, run_id, true);
    });
  }

  Result<StoreStats> GetStats() override {
    const int64_t now = ToMillis(clock_.Now());
    return Read<StoreStats>([&](Db& db) -> Result<StoreStats> {
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
            "SELECT coalesce(sum(lease_token IS NULL AND due_at <= ?1), 0), "
            "coalesce(sum(lease_token IS NOT NULL AND due_at > ?1), 0), "
            "coalesce(sum(lease_token IS NULL AND due_at > ?1), 0), "
            "coalesce(sum(lease_token IS NOT NULL AND due_at <= ?1), 0) FROM queue");
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

  Result<std::optional<Timestamp>> NextDueAt() override {
    const Timestamp now = clock_.Now();
    return Read<std::optional<Timestamp>>([&](Db& db) -> Result<std::optional<Timestamp>> {
      auto s = db.Prepare("SELECT min(due_at) FROM queue");
      if (!s.Step() || s.IsNull(0)) return std::optional<Timestamp>();
      // "now if one is due", not the moment it became due.
      return std::optional<Timestamp>(std::max(FromMillis(s.Int(0)), now));
    });
  }

 private:
  struct Unit {};

  // Queues `fn` for the writer and waits until its batch committed.
  template <typename T, typename R = std::conditional_t<std::is_same_v<T, Unit>, void, T>>
  Result<R> Write(const std::function<Result<T>(Db&, Txn&)>& fn) {
    std::optional<Result<T>> out;
    std::promise<void> finished;
    WriteOp op;
    op.run = [&](Db& db, Txn& txn) {
      try {
        out.emplace(fn(db, txn));
      } catch (const SqlError& e) {
        out.emplace(Error(ErrorCode::kUnavailable, e.what()));
      } catch (const std::exception& e) {
        out.emplace(Error(ErrorCode::kInternal, e.what()));
      }
      return out->ok();
    };
    op.done = [&](const Error* commit_error) {
      if (commit_error) out.emplace(*commit_error);
      finished.set_value();
    };
    {
      std::lock_guard lock(mu_);
      if (stopping_) return Error(ErrorCode::kUnavailable, "the store is closing");
      pending_.push_back(std::move(op));
    }
    cv_.notify_one();
    finished.get_future().wait();
    if constexpr (std::is_same_v<T, Unit>) {
      if (!out->ok()) return std::move(*out).error();
      return Ok();
    } else {
      return std::move(*out);
    }
  }

  // Runs `fn` on a read connection in one read transaction (a consistent snapshot).
  template <typename T>
  Result<T> Read(const std::function<Result<T>(Db&)>& fn) {
    std::unique_ptr<Db> db;
    {
      std::unique_lock lock(readers_mu_);
      readers_cv_.wait(lock, [this] { return !readers_.empty(); });
      db = std::move(readers_.back());
      readers_.pop_back();
    }
    std::optional<Result<T>> out;
    try {
      db->Exec("BEGIN");
      out.emplace(fn(*db));
      db->Exec("COMMIT");
    } catch (const SqlError& e) {
      try { db->Exec("ROLLBACK"); } catch (const SqlError&) {}
      out.emplace(Error(ErrorCode::kUnavailable, e.what()));
    } catch (const std::exception& e) {
      try { db->Exec("ROLLBACK"); } catch (const SqlError&) {}
      out.emplace(Error(ErrorCode::kInternal, e.what()));
    }
    {
      std::lock_guard lock(readers_mu_);
      readers_.push_back(std::move(db));
    }
    readers_cv_.notify_one();
    return std::move(*out);
  }

  void WriterLoop() {
    std::vector<WriteOp> batch;
    while (true) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
        if (pending_.empty()) return;
        const std::size_t n = std::min<std::size_t>(pending_.size(), std::max(1, options_.max_batch));
        batch.clear();
        for (std::size_t i = 0; i < n; ++i) {
          batch.push_back(std::move(pending_.front()));
          pending_.pop_front();
        }
      }
      const std::optional<Error> commit_error = CommitBatch(batch);
      // Waking the callers is left to the notifier so the next batch can start at once.
      {
        std::lock_guard lock(notify_mu_);
        for (auto& op : batch) {
          to_notify_.push_back([done = std::move(op.done), commit_error] {
            done(commit_error ? &*commit_error : nullptr);
          });
        }
      }
      notify_cv_.notify_one();
      if (++commits_since_checkpoint_ >= 64) {
        commits_since_checkpoint_ = 0;
        checkpoint_cv_.notify_one();
      }
      // Under steady writes a passive checkpoint never catches up with the end of the
      // WAL, so the WAL would grow without bound. Past kWalRestartFrames the writer
      // finishes the checkpoint and restarts the WAL from its beginning; the passive
      // checkpoints have already copied most of it.
      if (wal_frames_ >= kWalRestartFrames) {
        try {
          writer_->Exec("PRAGMA wal_checkpoint(RESTART)");
        } catch (const SqlError& e) {
          obs::LogWarn("sqlite checkpoint failed", {{"error", e.what()}});
        }
        wal_frames_ = 0;
      }
    }
  }

  void NotifierLoop() {
    std::vector<std::function<void()>> ready;
    while (true) {
      {
        std::unique_lock lock(notify_mu_);
        notify_cv_.wait(lock, [this] { return notifier_stopping_ || !to_notify_.empty(); });
        if (to_notify_.empty()) return;
        ready.swap(to_notify_);
      }
      for (auto& fn : ready) fn();
      ready.clear();
    }
  }

  // Copies the WAL into the database (PASSIVE: never blocks the writer or readers) after
  // every 64 commits, and at least every second while there is traffic.
  void CheckpointLoop() {
    std::unique_lock lock(checkpoint_mu_);
    while (!checkpoint_stopping_) {
      checkpoint_cv_.wait_for(lock, std::chrono::seconds(1));
      if (checkpoint_stopping_) break;
      lock.unlock();
      try {
        checkpointer_->Exec("PRAGMA wal_checkpoint(PASSIVE)");
      } catch (const SqlError& e) {
        obs::LogWarn("sqlite checkpoint failed", {{"error", e.what()}});
      }
      lock.lock();
    }
  }

  // Runs the batch in one transaction, a savepoint per write, and records the outcome in
  // each op's `done` (called later by the notifier).
  std::optional<Error> CommitBatch(std::vector<WriteOp>& batch) {
    int64_t delta = 0;
    std::vector<std::string> new_definitions;
    std::optional<Error> commit_error;
    try {
      writer_->Prepare("BEGIN IMMEDIATE").Run();
      const Timestamp now = clock_.Now();
      for (auto& op : batch) {
        writer_->Prepare("SAVEPOINT op").Run();
        Txn txn{now, queue_rows_ + delta, 0, {}};
        bool ok = op.run(*writer_, txn);
        if (ok) {
          writer_->Prepare("RELEASE op").Run();
          delta += txn.queue_delta;
          for (auto& d : txn.new_definitions) new_definitions.push_back(std::move(d));
        } else {
          writer_->Prepare("ROLLBACK TO op").Run();
          writer_->Prepare("RELEASE op").Run();
        }
      }
      writer_->Prepare("COMMIT").Run();
    } catch (const SqlError& e) {
      try { writer_->Exec("ROLLBACK"); } catch (const SqlError&) {}
      commit_error = Error(ErrorCode::kUnavailable, std::string("commit failed: ") + e.what());
      obs::LogError("sqlite commit failed", {{"error", e.what()}, {"writes", batch.size()}});
    }
    if (!commit_error) {
      queue_rows_ += delta;
      for (auto& d : new_definitions) known_definitions_.insert(std::move(d));
    }
    return commit_error;
  }

  SqliteOptions options_;
  const Clock& clock_;
  Random& random_;

  std::unique_ptr<Db> writer_;  // used by the writer thread only (after Open)
  int64_t queue_rows_ = 0;      // writer thread only
  std::unordered_set<std::string> known_definitions_;  // writer thread only; committed ids
  int commits_since_checkpoint_ = 0;                   // writer thread only
  int wal_frames_ = 0;                                 // writer thread only (WAL hook)
  static constexpr int kWalRestartFrames = 16384;      // 64 MiB of 4 KiB pages
  std::mutex task_mu_;
  std::condition_variable task_cv_;
  uint64_t task_seq_ = 0;  // GUARDED_BY(task_mu_): tasks queued so far
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WriteOp> pending_;  // GUARDED_BY(mu_)
  bool stopping_ = false;        // GUARDED_BY(mu_)
  std::thread writer_thread_;

  std::mutex notify_mu_;
  std::condition_variable notify_cv_;
  std::vector<std::function<void()>> to_notify_;  // GUARDED_BY(notify_mu_)
  bool notifier_stopping_ = false;                // GUARDED_BY(notify_mu_)
  std::thread notifier_thread_;

  std::unique_ptr<Db> checkpointer_;  // checkpoint thread only
  std::mutex checkpoint_mu_;
  std::condition_variable checkpoint_cv_;
  bool checkpoint_stopping_ = false;  // GUARDED_BY(checkpoint_mu_)
  std::thread checkpoint_thread_;

  std::mutex readers_mu_;
  std::condition_variable readers_cv_;
  std::vector<std::unique_ptr<Db>> readers_;  // GUARDED_BY(readers_mu_)
};

}  // namespace

int SqliteSchemaVersion() { return kSchemaVersion; }

Result<int> ReadSqliteSchemaVersion(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return 0;
  try {
    auto db = Db::Open(path, true);
    auto s = db->Prepare("PRAGMA user_version");
    return s.Step() ? static_cast<int>(s.Int(0)) : 0;
  } catch (const SqlError& e) {
    return Error(ErrorCode::kUnavailable, "cannot read the schema version of " + path + ": " + e.what());
  }
}

Result<std::unique_ptr<Store>> OpenSqliteStore(const SqliteOptions& options, const Clock& clock,
                                               Random& random) {
  if (options.path.empty() || options.path == ":memory:") {
    return Error(ErrorCode::kInvalidRequest, "the SQLite store needs a file path");
  }
  auto store = std::make_unique<SqliteStore>(options, clock, random);
  auto opened = store->Open();
  if (!opened.ok()) return std::move(opened).error();
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace keel::store
