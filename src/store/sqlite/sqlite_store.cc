#include "keel/store/sqlite_store.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "keel/obs/log.h"
#include "keel/store/sql/sql_store.h"

namespace keel::store {
namespace {

using sql::Conn;
using sql::SqlError;
using sql::Stmt;
using sql::Txn;

constexpr int kSchemaVersion = 4;

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
  interrupted INTEGER NOT NULL DEFAULT 0,
  prior_attempts INTEGER NOT NULL DEFAULT 0,
  item_of     TEXT,
  PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS steps_by_item ON steps(run_id, item_of, seq);
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

// One prepared statement of a connection's cache.
class SqliteStmt final : public sql::StmtImpl {
 public:
  SqliteStmt(sqlite3* db, sqlite3_stmt* s) : db_(db), s_(s) {}
  ~SqliteStmt() override { sqlite3_finalize(s_); }

  void BindInt(int i, int64_t v) override { Check(sqlite3_bind_int64(s_, i, v)); }
  void BindText(int i, std::string_view v) override {
    Check(sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
  }
  void BindNull(int i) override { Check(sqlite3_bind_null(s_, i)); }
  bool Step() override {
    const int rc = sqlite3_step(s_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw SqlError(std::string("sqlite: ") + sqlite3_errmsg(db_));
  }
  bool IsNull(int c) const override { return sqlite3_column_type(s_, c) == SQLITE_NULL; }
  int64_t Int(int c) const override { return sqlite3_column_int64(s_, c); }
  std::string Text(int c) const override {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, c));
    return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, c))) : std::string();
  }
  void Reset() override {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }

 private:
  void Check(int rc) {
    if (rc != SQLITE_OK) throw SqlError(std::string("sqlite bind: ") + sqlite3_errmsg(db_));
  }
  sqlite3* db_;
  sqlite3_stmt* s_;
};

// One connection with its cache of prepared statements. Used by one thread at a time.
// Writes are serial (one writer thread), so it needs no locks.
class Db final : public Conn {
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
  ~Db() override {
    cache_.clear();
    sqlite3_close_v2(db_);
  }

  Stmt Prepare(const std::string& sql) override {
    auto it = cache_.find(sql);
    if (it == cache_.end()) {
      sqlite3_stmt* s = nullptr;
      if (sqlite3_prepare_v3(db_, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT, &s, nullptr) != SQLITE_OK) {
        throw SqlError(std::string("sqlite prepare: ") + sqlite3_errmsg(db_) + " in: " + sql);
      }
      it = cache_.emplace(sql, std::make_unique<SqliteStmt>(db_, s)).first;
    }
    return Stmt(it->second.get());
  }

  void Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : sqlite3_errmsg(db_);
      sqlite3_free(err);
      throw SqlError("sqlite: " + msg);
    }
  }

  int64_t Changes() const override { return sqlite3_changes(db_); }
  void Lock(std::string_view, bool) override {}
  bool TryLock(std::string_view) override { return true; }
  std::string_view SkipLocked() const override { return ""; }
  sqlite3* raw() const { return db_; }

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_;
  std::unordered_map<std::string, std::unique_ptr<SqliteStmt>> cache_;
};

struct WriteOp {
  // Runs inside a savepoint with the op's own Txn; false rolls the op back.
  std::function<bool(Conn&, Txn&)> run;
  Txn* txn = nullptr;
  // Called (by the notifier thread) after the batch committed (commit_error null) or failed.
  std::function<void(const Error* commit_error)> done;
};

// Schema migrations: kMigrations[v - 1] takes a database from version v to v + 1.
constexpr const char* kMigrations[] = {
    // 1 -> 2: waiting runs, signals, child runs.
    "ALTER TABLE runs ADD COLUMN waiting TEXT; ALTER TABLE runs ADD COLUMN signals TEXT; "
    "ALTER TABLE runs ADD COLUMN parent TEXT; ALTER TABLE queue ADD COLUMN woken INTEGER NOT NULL "
    "DEFAULT 0;",
    // 2 -> 3: attempts cut short by a lost node, counted apart (StepRecord::interrupted).
    // and attempts made before a redrive, kept for their numbering (prior_attempts).
    "ALTER TABLE steps ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0; "
    "ALTER TABLE steps ADD COLUMN prior_attempts INTEGER NOT NULL DEFAULT 0;",
    // 3 -> 4: a map's items say whose they are (read in pages, never with their run).
    "ALTER TABLE steps ADD COLUMN item_of TEXT; "
    "UPDATE steps SET item_of = substr(step_id, 1, instr(step_id, '#') - 1) WHERE instr(step_id, '#') > 0;",
};
static_assert(std::size(kMigrations) == kSchemaVersion - 1);


class SqliteStore final : public sql::SqlStore {
 public:
  SqliteStore(SqliteOptions options, const Clock& clock, Random& random)
      : SqlStore(clock, random), options_(std::move(options)) {}

  ~SqliteStore() override {
    Close();
    if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the lock
  }

  void Close() {
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

  // One process at a time: the group-committing writer and its queue count assume it
  // (several nodes share PostgreSQL instead). An flock on PATH.lock, released by the
  // kernel when the process dies, however it dies.
  Result<void> LockFile() {
    const std::string path = options_.path + ".lock";
    lock_fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd_ < 0) return Error(ErrorCode::kUnavailable, "cannot open " + path + ": " + std::strerror(errno));
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      char pid[32] = {0};
      const auto n = ::pread(lock_fd_, pid, sizeof pid - 1, 0);
      std::string holder = n > 0 ? std::string(pid, static_cast<std::size_t>(n)) : std::string("?");
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      return Error(ErrorCode::kUnavailable,
                   "the database " + options_.path + " is in use by another keel process (pid " + holder +
                       "); SQLite serves one node: stop the other one, or share a postgres:// storage between nodes");
    }
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(lock_fd_, 0) == 0) (void)!::pwrite(lock_fd_, pid.data(), pid.size(), 0);
    return Ok();
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
      KEEL_RETURN_IF_ERROR(LockFile());
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


 protected:
  // Queues `fn` for the writer and waits until its batch committed.
  Result<void> Transact(const std::function<bool(Conn&, Txn&)>& fn, Txn& txn) override {
    std::optional<Error> commit_error;
    std::promise<void> finished;
    WriteOp op;
    op.txn = &txn;
    op.run = [&fn](Conn& db, Txn& t) {
      try {
        return fn(db, t);
      } catch (const std::exception& e) {  // only statement errors reach here: roll the op back
        obs::LogError("sqlite write failed", {{"error", e.what()}});
        return false;
      }
    };
    op.done = [&](const Error* e) {
      if (e) commit_error = *e;
      finished.set_value();
    };
    {
      std::lock_guard lock(mu_);
      if (stopping_) return Error(ErrorCode::kUnavailable, "the store is closing");
      pending_.push_back(std::move(op));
    }
    cv_.notify_one();
    finished.get_future().wait();
    if (commit_error) return *commit_error;
    return Ok();
  }

  // Runs `fn` on a read connection in one read transaction (a consistent snapshot).
  Result<void> Snapshot(const std::function<void(Conn&)>& fn) override {
    std::unique_ptr<Db> db;
    {
      std::unique_lock lock(readers_mu_);
      readers_cv_.wait(lock, [this] { return !readers_.empty(); });
      db = std::move(readers_.back());
      readers_.pop_back();
    }
    Result<void> out = Ok();
    try {
      db->Exec("BEGIN");
      fn(*db);
      db->Exec("COMMIT");
    } catch (const std::exception& e) {
      try { db->Exec("ROLLBACK"); } catch (const SqlError&) {}
      out = Error(ErrorCode::kUnavailable, e.what());
    }
    {
      std::lock_guard lock(readers_mu_);
      readers_.push_back(std::move(db));
    }
    readers_cv_.notify_one();
    return out;
  }

 private:
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
    std::optional<Error> commit_error;
    try {
      writer_->Prepare("BEGIN IMMEDIATE").Run();
      const Timestamp now = clock_.Now();
      for (auto& op : batch) {
        writer_->Prepare("SAVEPOINT op").Run();
        Txn& txn = *op.txn;
        txn = Txn{};
        txn.now = now;
        txn.queue_rows = queue_rows_ + delta;
        const bool ok = op.run(*writer_, txn);
        if (ok) {
          writer_->Prepare("RELEASE op").Run();
          delta += txn.queue_delta;
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
    if (!commit_error) queue_rows_ += delta;
    return commit_error;
  }

  SqliteOptions options_;
  int lock_fd_ = -1;

  std::unique_ptr<Db> writer_;  // used by the writer thread only (after Open)
  int64_t queue_rows_ = 0;      // writer thread only
  int commits_since_checkpoint_ = 0;                   // writer thread only
  int wal_frames_ = 0;                                 // writer thread only (WAL hook)
  static constexpr int kWalRestartFrames = 16384;      // 64 MiB of 4 KiB pages
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
