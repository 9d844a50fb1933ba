#include "keel/store/postgres_store.h"

#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "keel/core/config.h"
#include "keel/core/ids.h"
#include "keel/obs/log.h"
#include "keel/store/sql/sql_store.h"

namespace keel::store {
namespace {

using sql::Conn;
using sql::SqlError;
using sql::Stmt;
using sql::Txn;

constexpr int kSchemaVersion = 4;
// The advisory lock under which nodes create or migrate the schema, one at a time.
constexpr int64_t kMigrationLock = 0x6b65656c5f736368;  // "keel_sch"

// The schema of version 2: the same tables as SQLite's, in PostgreSQL's types. Keys that
// are compared or ordered (run ids for cursors) use the "C" collation, so that order is
// byte order whatever the database's locale.
constexpr const char* kSchema = R"sql(
CREATE TABLE runs (
  id              text COLLATE "C" PRIMARY KEY,
  pipeline        text COLLATE "C" NOT NULL,
  status          text COLLATE "C" NOT NULL,
  input           text NOT NULL,
  output          text,
  error           text,
  definition_id   text NOT NULL,
  idempotency_key text UNIQUE,
  fingerprint     text,
  created_at      bigint NOT NULL,
  updated_at      bigint NOT NULL,
  started_at      bigint,
  finished_at     bigint,
  waiting         text,
  signals         text,
  parent          text
);
CREATE TABLE definitions (
  id   text PRIMARY KEY,
  body text NOT NULL
);
CREATE INDEX runs_by_status ON runs(status, id);
CREATE INDEX runs_by_pipeline ON runs(pipeline, id);
CREATE TABLE steps (
  run_id      text NOT NULL,
  step_id     text NOT NULL,
  seq         bigint NOT NULL,
  status      text NOT NULL,
  attempts    integer NOT NULL,
  output      text,
  error       text,
  started_at  bigint,
  finished_at bigint,
  interrupted integer NOT NULL DEFAULT 0,
  prior_attempts integer NOT NULL DEFAULT 0,
  item_of     text,
  PRIMARY KEY (run_id, step_id)
);
CREATE INDEX steps_by_item ON steps(run_id, item_of, seq);
CREATE TABLE events (
  seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  run_id  text NOT NULL,
  type    text NOT NULL,
  step_id text,
  attempt integer,
  at      bigint NOT NULL,
  data    text
);
CREATE INDEX events_by_run ON events(run_id, seq);
CREATE TABLE queue (
  run_id      text PRIMARY KEY,
  due_at      bigint NOT NULL,
  lease_token text,
  lease_owner text,
  deliveries  integer NOT NULL DEFAULT 0,
  woken       integer NOT NULL DEFAULT 0
);
CREATE INDEX queue_by_due ON queue(due_at);
CREATE TABLE tasks (
  token             text PRIMARY KEY,
  run_id            text NOT NULL,
  step_id           text NOT NULL,
  attempt           integer NOT NULL,
  queue             text NOT NULL,
  input             text NOT NULL,
  status            text NOT NULL,
  worker_id         text,
  lease_expires     bigint,
  heartbeat_timeout bigint NOT NULL,
  output            text,
  error             text,
  retryable         integer NOT NULL DEFAULT 1,
  created_at        bigint NOT NULL,
  UNIQUE (run_id, step_id, attempt)
);
CREATE INDEX tasks_by_queue ON tasks(queue, status, created_at);
)sql";

// Migrations: kMigrations[v - 2] takes a database from version v to v + 1 (PostgreSQL
// databases start at version 2).
constexpr std::array<const char*, kSchemaVersion - 2> kMigrations{
    // 2 -> 3: attempts cut short by a lost node, counted apart (StepRecord::interrupted).
    // and attempts made before a redrive, kept for their numbering (prior_attempts).
    "ALTER TABLE steps ADD COLUMN interrupted integer NOT NULL DEFAULT 0; "
    "ALTER TABLE steps ADD COLUMN prior_attempts integer NOT NULL DEFAULT 0",
    // 3 -> 4: a map's items say whose they are (read in pages, never with their run).
    "ALTER TABLE steps ADD COLUMN item_of text; "
    "UPDATE steps SET item_of = split_part(step_id, '#', 1) WHERE strpos(step_id, '#') > 0; "
    "CREATE INDEX steps_by_item ON steps(run_id, item_of, seq)",
};

// Channels of the notifications between nodes.
constexpr const char* kWorkChannel = "keel_work";
constexpr const char* kTaskChannel = "keel_tasks";

std::string OneLine(std::string s) {
  for (auto& c : s) {
    if (c == '\n' || c == '\t') c = ' ';
  }
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// What a failed command means for the transaction and the connection.
SqlError::Kind KindOf(PGconn* conn, const PGresult* res) {
  if (PQstatus(conn) != CONNECTION_OK) return SqlError::Kind::kConnection;
  const char* state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : nullptr;
  if (state == nullptr) return SqlError::Kind::kConnection;  // no answer from the server
  const std::string_view s(state);
  if (s == "40001" || s == "40P01") return SqlError::Kind::kRetry;  // serialization failure, deadlock
  // connection_exception, admin/crash shutdown, cannot_connect_now
  if (s.substr(0, 2) == "08" || s == "57P01" || s == "57P02" || s == "57P03") return SqlError::Kind::kConnection;
  return SqlError::Kind::kStatement;
}

[[noreturn]] void Throw(PGconn* conn, const PGresult* res, std::string_view what) {
  std::string msg = res ? PQresultErrorMessage(res) : "";
  if (msg.empty()) msg = PQerrorMessage(conn);
  throw SqlError("postgres: " + OneLine(msg) + (what.empty() ? "" : " (in: " + std::string(what.substr(0, 120)) + ")"),
                 KindOf(conn, res));
}

class PgConn;

// Frees a PGresult when it goes out of scope.
struct ResultGuard {
  PGresult* r;
  ~ResultGuard() { PQclear(r); }
};

// A server-side prepared statement of one connection. Statements are written with ?N
// parameters (sql.h); the ones used are renumbered $1..$k in order of their numbers, so
// that a statement may leave numbers out (every $k must be used for PostgreSQL to infer
// its type).
class PgStmt final : public sql::StmtImpl {
 public:
  PgStmt(PgConn& conn, std::string name, std::vector<int> position, int count)
      : conn_(conn), name_(std::move(name)), position_(std::move(position)), values_(static_cast<std::size_t>(count)) {}
  ~PgStmt() override { Reset(); }

  void BindInt(int i, int64_t v) override { Set(i, std::to_string(v)); }
  void BindText(int i, std::string_view v) override { Set(i, std::string(v)); }
  void BindNull(int i) override {
    if (const int p = Pos(i); p >= 0) values_[static_cast<std::size_t>(p)].reset();
  }
  bool Step() override;
  void Send() override;
  bool IsNull(int c) const override { return PQgetisnull(res_, row_, c) != 0; }
  int64_t Int(int c) const override {
    if (IsNull(c)) return 0;  // as SQLite reads NULL
    const char* v = PQgetvalue(res_, row_, c);
    const int n = PQgetlength(res_, row_, c);
    int64_t out = 0;
    const auto [p, ec] = std::from_chars(v, v + n, out);
    if (ec != std::errc() || p != v + n) {
      throw SqlError("postgres: column " + std::to_string(c) + " is not an integer: " + std::string(v, static_cast<std::size_t>(n)));
    }
    return out;
  }
  std::string Text(int c) const override {
    return std::string(PQgetvalue(res_, row_, c), static_cast<std::size_t>(PQgetlength(res_, row_, c)));
  }
  void Reset() override {
    if (res_) PQclear(res_);
    res_ = nullptr;
    row_ = -1;
    rows_ = 0;
    for (auto& v : values_) v.reset();
  }

 private:
  int Pos(int i) const {
    return i >= 0 && static_cast<std::size_t>(i) < position_.size() ? position_[static_cast<std::size_t>(i)] : -1;
  }
  void Set(int i, std::string v) {
    if (const int p = Pos(i); p >= 0) values_[static_cast<std::size_t>(p)] = std::move(v);
  }
  std::vector<const char*> Params() const {
    std::vector<const char*> params(values_.size());
    for (std::size_t i = 0; i < values_.size(); ++i) params[i] = values_[i] ? values_[i]->c_str() : nullptr;
    return params;
  }

  PgConn& conn_;
  std::string name_;
  std::vector<int> position_;  // ?N -> index of $k (k - 1), or -1 when unused
  std::vector<std::optional<std::string>> values_;
  PGresult* res_ = nullptr;
  int row_ = -1;
  int rows_ = 0;
};

// One connection with its prepared statements. Used by one thread at a time.
//
// A pooled connection runs in libpq's pipeline mode: statements whose results are not
// needed (Stmt::Send: an event appended, a row updated) are sent without waiting, and go
// to the server with the next statement whose result is needed, or with the COMMIT. A
// transaction thus costs a round trip per statement that is read, not per statement.
// Errors of a sent statement surface at that next read (the transaction is lost either
// way). The listener's and the notifier's connections stay in the ordinary mode.
class PgConn final : public Conn {
 public:
  // Opens a connection; nullptr with `error` set on failure.
  static std::unique_ptr<PgConn> Connect(const PostgresOptions& o, std::string& error) {
    const std::string connect_timeout = std::to_string(std::max<int64_t>(2, (o.connect_timeout.count() + 999) / 1000));
    // Ours first: what the URL says overrides them.
    const char* keys[] = {"connect_timeout", "application_name", "keepalives", "keepalives_idle",
                          "keepalives_interval", "keepalives_count", "dbname", nullptr};
    const char* values[] = {connect_timeout.c_str(), "keel", "1", "10", "5", "3", o.url.c_str(), nullptr};
    PGconn* raw = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
    if (raw == nullptr) {
      error = "out of memory";
      return nullptr;
    }
    if (PQstatus(raw) != CONNECTION_OK) {
      error = OneLine(PQerrorMessage(raw));
      PQfinish(raw);
      return nullptr;
    }
    // Notices ("relation ... already exists, skipping") are not for keel's users.
    PQsetNoticeProcessor(raw, [](void*, const char*) {}, nullptr);
    auto conn = std::unique_ptr<PgConn>(new PgConn(raw));
    try {
      // A statement (lock waits included) is bounded; a node that stalls inside a
      // transaction loses it rather than holding its locks for ever.
      conn->Exec(("SET statement_timeout = " + std::to_string(o.statement_timeout.count())).c_str());
      conn->Exec("SET idle_in_transaction_session_timeout = 60000");
    } catch (const SqlError& e) {
      error = e.what();
      return nullptr;
    }
    return conn;
  }

  ~PgConn() override {
    cache_.clear();
    PQfinish(conn_);
  }

  // Switches to pipeline mode (a pooled connection, idle).
  void EnterPipeline() {
    if (PQenterPipelineMode(conn_) != 1) throw SqlError("postgres: cannot enter pipeline mode: " + OneLine(PQerrorMessage(conn_)), SqlError::Kind::kConnection);
    pipeline_ = true;
  }

  Stmt Prepare(const std::string& sql) override {
    auto it = cache_.find(sql);
    if (it == cache_.end()) {
      // ?N -> $k, numbered in order of N.
      std::vector<int> used;
      for (std::size_t i = 0; i < sql.size(); ++i) {
        if (sql[i] != '?') continue;
        int n = 0;
        std::size_t j = i + 1;
        while (j < sql.size() && sql[j] >= '0' && sql[j] <= '9') n = n * 10 + (sql[j++] - '0');
        if (j > i + 1) used.push_back(n);
      }
      std::sort(used.begin(), used.end());
      used.erase(std::unique(used.begin(), used.end()), used.end());
      std::vector<int> position(used.empty() ? 1 : static_cast<std::size_t>(used.back()) + 1, -1);
      for (std::size_t k = 0; k < used.size(); ++k) position[static_cast<std::size_t>(used[k])] = static_cast<int>(k);
      std::string text;
      for (std::size_t i = 0; i < sql.size(); ++i) {
        if (sql[i] == '?' && i + 1 < sql.size() && sql[i + 1] >= '0' && sql[i + 1] <= '9') {
          int n = 0;
          std::size_t j = i + 1;
          while (j < sql.size() && sql[j] >= '0' && sql[j] <= '9') n = n * 10 + (sql[j++] - '0');
          text += "$" + std::to_string(position[static_cast<std::size_t>(n)] + 1);
          i = j - 1;
        } else {
          text += sql[i];
        }
      }
      const std::string name = "k" + std::to_string(cache_.size() + 1);
      if (pipeline_) {
        if (PQsendPrepare(conn_, name.c_str(), text.c_str(), static_cast<int>(used.size()), nullptr) != 1) LostConnection();
        ++unread_;
        ResultGuard done{Read(text)};
      } else {
        ResultGuard res{PQprepare(conn_, name.c_str(), text.c_str(), static_cast<int>(used.size()), nullptr)};
        if (PQresultStatus(res.r) != PGRES_COMMAND_OK) Throw(conn_, res.r, text);
      }
      it = cache_.emplace(sql, std::make_unique<PgStmt>(*this, name, std::move(position), static_cast<int>(used.size())))
               .first;
    }
    return Stmt(it->second.get());
  }

  int64_t Changes() const override { return changes_; }

  void Lock(std::string_view key, bool shared) override {
    auto s = Prepare(shared ? "SELECT 1 FROM (SELECT pg_advisory_xact_lock_shared(?1)) AS l"
                            : "SELECT 1 FROM (SELECT pg_advisory_xact_lock(?1)) AS l");
    s.Bind(1, static_cast<int64_t>(Fnv1a64(key)));
    // The statements after it wait for it on the server: no need to wait here.
    s.Send();
  }

  bool TryLock(std::string_view key) override {
    auto s = Prepare("SELECT CASE WHEN pg_try_advisory_xact_lock(?1) THEN 1 ELSE 0 END");
    s.Bind(1, static_cast<int64_t>(Fnv1a64(key)));
    return s.Step() && s.Int(0) == 1;
  }

  std::string_view SkipLocked() const override { return " FOR UPDATE SKIP LOCKED"; }

  // Starts a transaction: in pipeline mode its BEGIN goes with the first statement read.
  void Begin(const char* begin = "BEGIN") {
    if (!pipeline_) return Exec(begin);
    SendSimple(begin);
  }
  // COMMIT or ROLLBACK, with whatever is still unsent or unread.
  void End(bool commit) { Exec(commit ? "COMMIT" : "ROLLBACK"); }

  // Runs one statement without parameters (BEGIN, COMMIT, SET, DDL; several only outside
  // pipeline mode) and waits for it.
  void Exec(const char* sql) {
    if (pipeline_) {
      SendSimple(sql);
      ResultGuard done{Read(sql)};
      return;
    }
    ResultGuard res{PQexec(conn_, sql)};
    const auto st = PQresultStatus(res.r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) Throw(conn_, res.r, sql);
  }

  // Executes a prepared statement and returns its result (the caller frees it).
  PGresult* Execute(const std::string& name, const std::vector<const char*>& params) {
    if (!pipeline_) {
      PGresult* res = PQexecPrepared(conn_, name.c_str(), static_cast<int>(params.size()), params.data(), nullptr, nullptr, 0);
      const auto st = PQresultStatus(res);
      if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        ResultGuard failed{res};
        Throw(conn_, res, name);
      }
      NoteChanges(res);
      return res;
    }
    SendPrepared(name, params);
    PGresult* res = Read(name);
    NoteChanges(res);
    return res;
  }

  // Sends a prepared statement whose result is not needed (pipeline mode; otherwise it
  // runs at once).
  void SendPrepared(const std::string& name, const std::vector<const char*>& params) {
    if (!pipeline_) {
      PQclear(Execute(name, params));
      return;
    }
    if (PQsendQueryPrepared(conn_, name.c_str(), static_cast<int>(params.size()), params.data(), nullptr, nullptr, 0) != 1) {
      LostConnection();
    }
    ++unread_;
  }

  // Whether the connection can go back to the pool.
  bool Reusable() const {
    return PQstatus(conn_) == CONNECTION_OK && PQtransactionStatus(conn_) == PQTRANS_IDLE && unread_ == 0;
  }
  PGconn* raw() const { return conn_; }

 private:
  explicit PgConn(PGconn* conn) : conn_(conn) {}

  void SendSimple(const char* sql) {
    if (PQsendQueryParams(conn_, sql, 0, nullptr, nullptr, nullptr, nullptr, 0) != 1) LostConnection();
    ++unread_;
  }

  [[noreturn]] void LostConnection() {
    throw SqlError("postgres: " + OneLine(PQerrorMessage(conn_)), SqlError::Kind::kConnection);
  }

  void NoteChanges(const PGresult* res) {
    const char* changed = PQcmdTuples(const_cast<PGresult*>(res));
    if (changed != nullptr && *changed != '\0') changes_ = std::atoll(changed);
  }

  // Pipeline mode: sends what is pending with a sync point, reads the results of
  // everything sent, and returns the last one's (the caller frees it). The first error
  // among them is thrown once the sync point is read, so the connection stays usable.
  PGresult* Read(std::string_view what) {
    if (PQpipelineSync(conn_) != 1) LostConnection();
    PGresult* last = nullptr;
    std::optional<SqlError> error;
    const int expected = std::exchange(unread_, 0);
    for (int i = 0; i < expected; ++i) {
      PGresult* r = PQgetResult(conn_);
      if (r == nullptr || PQstatus(conn_) != CONNECTION_OK) {
        PQclear(r);
        PQclear(last);
        LostConnection();
      }
      const auto st = PQresultStatus(r);
      if (st == PGRES_FATAL_ERROR || st == PGRES_PIPELINE_ABORTED) {
        if (!error) {
          try {
            Throw(conn_, r, st == PGRES_FATAL_ERROR ? what : std::string_view());
          } catch (const SqlError& e) {
            error = e;
          }
        }
        PQclear(r);
      } else if (i + 1 == expected) {
        last = r;
      } else {
        PQclear(r);
      }
      // Each statement's results end with a null.
      while (PGresult* extra = PQgetResult(conn_)) PQclear(extra);
    }
    ResultGuard sync{PQgetResult(conn_)};
    if (sync.r == nullptr || PQresultStatus(sync.r) != PGRES_PIPELINE_SYNC) {
      PQclear(last);
      LostConnection();
    }
    if (error) {
      PQclear(last);
      throw *error;
    }
    return last;
  }

  PGconn* conn_;
  std::unordered_map<std::string, std::unique_ptr<PgStmt>> cache_;
  int64_t changes_ = 0;
  bool pipeline_ = false;
  int unread_ = 0;  // statements sent whose results are not read yet
};

bool PgStmt::Step() {
  if (res_ == nullptr) {
    res_ = conn_.Execute(name_, Params());
    rows_ = PQntuples(res_);
    row_ = -1;
  }
  return ++row_ < rows_;
}

void PgStmt::Send() { conn_.SendPrepared(name_, Params()); }

// Connections opened on demand up to a bound; a connection that failed is dropped, and
// with it every idle one (after a server restart they are all dead).
class Pool {
 public:
  explicit Pool(PostgresOptions options) : options_(std::move(options)) {}

  Result<std::unique_ptr<PgConn>> Acquire() {
    const auto deadline = std::chrono::steady_clock::now() + options_.pool_timeout;
    {
      std::unique_lock lock(mu_);
      auto free = [&] { return !idle_.empty() || open_ < options_.pool_size; };
      if (!free()) {
        ++waits_;
        if (!cv_.wait_until(lock, deadline, free)) {
          ++timeouts_;
          Error e(ErrorCode::kUnavailable, "all " + std::to_string(options_.pool_size) +
                                               " database connections are busy (postgres.pool_size); retry later");
          e.retry_after = Duration(1000);
          return e;
        }
      }
      ++in_use_;
      if (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
      ++open_;
    }
    std::string error;
    auto c = PgConn::Connect(options_, error);
    if (c) {
      try {
        c->EnterPipeline();
      } catch (const SqlError& e) {
        error = e.what();
        c.reset();
      }
    }
    if (!c) {
      {
        std::lock_guard lock(mu_);
        --open_;
        --in_use_;
      }
      cv_.notify_one();
      Error e(ErrorCode::kUnavailable, "cannot connect to PostgreSQL at " + RedactUrl(options_.url) + ": " + error);
      e.retry_after = Duration(1000);
      return e;
    }
    return c;
  }

  void Release(std::unique_ptr<PgConn> c) {
    {
      std::lock_guard lock(mu_);
      --in_use_;
      if (c && c->Reusable()) {
        idle_.push_back(std::move(c));
      } else {
        --open_;
      }
    }
    cv_.notify_one();
  }

  // After a connection error: the idle connections are likely dead too.
  void DropIdle() {
    std::vector<std::unique_ptr<PgConn>> dead;
    {
      std::lock_guard lock(mu_);
      dead.swap(idle_);
      open_ -= static_cast<int>(dead.size());
    }
    cv_.notify_all();
  }

  // Adds a connection that is open and idle, switching it to pipeline mode.
  void Put(std::unique_ptr<PgConn> c) {
    c->EnterPipeline();
    std::lock_guard lock(mu_);
    ++open_;
    idle_.push_back(std::move(c));
  }

  const PostgresOptions& options() const { return options_; }

  PoolStats Stats() const {
    std::lock_guard lock(mu_);
    return PoolStats{options_.pool_size, open_, in_use_, waits_, timeouts_};
  }

 private:
  PostgresOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<PgConn>> idle_;  // GUARDED_BY(mu_)
  int open_ = 0;                               // GUARDED_BY(mu_): idle and in use
  int in_use_ = 0;                             // GUARDED_BY(mu_): lent out
  int64_t waits_ = 0;                          // GUARDED_BY(mu_)
  int64_t timeouts_ = 0;                       // GUARDED_BY(mu_)
};

// Creates or migrates the schema on `c`; returns the version found before.
Result<int> Migrate(PgConn& c) {
  try {
    c.Exec("BEGIN");
    c.Exec(("SELECT pg_advisory_xact_lock(" + std::to_string(kMigrationLock) + ")").c_str());
    c.Exec("CREATE TABLE IF NOT EXISTS keel_schema (version integer NOT NULL)");
    int version = 0;
    {
      auto s = c.Prepare("SELECT coalesce(max(version), 0) FROM keel_schema");
      if (s.Step()) version = static_cast<int>(s.Int(0));
    }
    if (version > kSchemaVersion) {
      c.Exec("ROLLBACK");
      return Error(ErrorCode::kUnavailable, "the database has keel schema version " + std::to_string(version) +
                                                ", newer than this keel understands (" + std::to_string(kSchemaVersion) +
                                                "); run a newer keel");
    }
    if (version == 0) {
      {
        auto s = c.Prepare("SELECT CASE WHEN to_regclass('runs') IS NULL THEN 0 ELSE 1 END");
        if (s.Step() && s.Int(0) == 1) {
          s.Run();
          c.Exec("ROLLBACK");
          return Error(ErrorCode::kUnavailable,
                       "the database already has a table \"runs\" that keel did not create; give keel a database "
                       "(or a schema, with ?options=-csearch_path%3DNAME) of its own");
        }
      }
      c.Exec(kSchema);
      c.Exec(("INSERT INTO keel_schema(version) VALUES(" + std::to_string(kSchemaVersion) + ")").c_str());
    } else if (version < kSchemaVersion) {
      for (int v = version; v < kSchemaVersion; ++v) c.Exec(kMigrations[static_cast<std::size_t>(v - 2)]);
      c.Exec(("UPDATE keel_schema SET version = " + std::to_string(kSchemaVersion)).c_str());
    }
    c.Exec("COMMIT");
    return version;
  } catch (const SqlError& e) {
    try {
      c.Exec("ROLLBACK");
    } catch (const SqlError&) {
    }
    return Error(ErrorCode::kUnavailable, std::string("cannot create or migrate the schema: ") + e.what());
  }
}

class PostgresStore final : public sql::SqlStore {
 public:
  PostgresStore(const PostgresOptions& options, const Clock& clock, Random& random)
      : SqlStore(clock, random), pool_(options) {}

  ~PostgresStore() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (notifier_.joinable()) notifier_.join();
    if (listener_.joinable()) listener_.join();
  }

  Result<void> Open() {
    const std::string& url = pool_.options().url;
    if (url.rfind("postgres://", 0) != 0 && url.rfind("postgresql://", 0) != 0) {
      return Error(ErrorCode::kInvalidRequest, "a PostgreSQL URL starts with postgres:// or postgresql://, not \"" +
                                                   RedactUrl(url) + "\"");
    }
    std::string error;
    auto c = PgConn::Connect(pool_.options(), error);
    if (!c) return Error(ErrorCode::kUnavailable, "cannot connect to PostgreSQL at " + RedactUrl(url) + ": " + error);
    auto migrated = Migrate(*c);
    if (!migrated.ok()) return std::move(migrated).error();
    try {
      pool_.Put(std::move(c));
    } catch (const SqlError& e) {
      return Error(ErrorCode::kUnavailable, e.what());
    }
    notifier_ = std::thread([this] { NotifierLoop(); });
    if (pool_.options().listen) {
      // Listening before Open returns: a node that says it is up hears every submit.
      auto listening = Listen();
      if (!listening) return Error(ErrorCode::kUnavailable, "cannot listen for notifications on " + RedactUrl(url));
      listener_ = std::thread([this, l = std::move(listening)]() mutable { ListenLoop(std::move(l)); });
    }
    return Ok();
  }

  PoolStats GetPoolStats() const override { return pool_.Stats(); }

 protected:
  Result<void> Transact(const std::function<bool(Conn&, Txn&)>& fn, Txn& txn) override {
    return InTransaction("BEGIN", /*writes=*/true, [&](PgConn& c) {
      txn = Txn{};
      txn.now = clock_.Now();
      return fn(c, txn);
    });
  }

  Result<void> Snapshot(const std::function<void(Conn&)>& fn) override {
    return InTransaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", /*writes=*/false, [&](PgConn& c) {
      fn(c);
      return true;
    });
  }

  // Runs `body` in one transaction on a pooled connection: COMMIT when it returns true,
  // ROLLBACK when false. A deadlock or serialization failure runs it again (up to 5
  // times); a connection lost before the commit, once more on a fresh connection (the
  // server may be back). A write whose COMMIT got no answer is not run again: its outcome
  // is unknown.
  Result<void> InTransaction(const char* begin, bool writes, const std::function<bool(PgConn&)>& body) {
    for (int attempt = 1;; ++attempt) {
      auto acquired = pool_.Acquire();
      if (!acquired.ok()) return std::move(acquired).error();
      std::unique_ptr<PgConn> c = std::move(acquired).value();
      bool committing = false;
      try {
        c->Begin(begin);
        const bool ok = body(*c);
        committing = ok && writes;
        c->End(ok);
        pool_.Release(std::move(c));
        return Ok();
      } catch (const SqlError& e) {
        const bool connection = e.kind == SqlError::Kind::kConnection;
        if (!connection) {
          try {
            c->Exec("ROLLBACK");
          } catch (const SqlError&) {
          }
        }
        pool_.Release(std::move(c));
        if (connection) pool_.DropIdle();
        if (connection && committing) {
          return Error(ErrorCode::kUnavailable, std::string("the database connection was lost while committing; the "
                                                            "outcome is unknown: ") + e.what());
        }
        const int max_attempts = connection ? 2 : 5;
        if (e.kind == SqlError::Kind::kStatement || attempt >= max_attempts) {
          Error err(ErrorCode::kUnavailable, e.what());
          err.retry_after = Duration(1000);
          return err;
        }
      }
    }
  }

  void Committed(const Txn& txn) override {
    SqlStore::Committed(txn);
    if (!txn.work_due && !txn.task_queued) return;
    {
      std::lock_guard lock(mu_);
      notify_work_ = notify_work_ || txn.work_due;
      notify_tasks_ = notify_tasks_ || txn.task_queued;
    }
    cv_.notify_all();
  }

 private:
  // Tells the other nodes, coalescing: while one NOTIFY is on its way, commits gather
  // behind it and go in the next one.
  void NotifierLoop() {
    std::unique_ptr<PgConn> c;
    while (true) {
      bool work, tasks;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || notify_work_ || notify_tasks_; });
        if (stopping_) return;
        work = std::exchange(notify_work_, false);
        tasks = std::exchange(notify_tasks_, false);
      }
      if (!c) {
        std::string error;
        c = PgConn::Connect(pool_.options(), error);
        if (!c) continue;  // the database is away: the nodes poll until it is back
      }
      try {
        std::string sql = "SELECT ";
        if (work) sql += std::string("pg_notify('") + kWorkChannel + "', '')";
        if (tasks) sql += std::string(work ? ", " : "") + "pg_notify('" + kTaskChannel + "', '')";
        c->Exec(sql.c_str());
      } catch (const SqlError& e) {
        obs::LogDebug("postgres notify failed", {{"error", e.what()}});
        c.reset();
      }
    }
  }

  // A connection that listens on both channels; null when the server cannot be reached.
  std::unique_ptr<PgConn> Listen() {
    std::string error;
    auto c = PgConn::Connect(pool_.options(), error);
    if (!c) return nullptr;
    try {
      c->Exec((std::string("LISTEN ") + kWorkChannel + "; LISTEN " + kTaskChannel).c_str());
    } catch (const SqlError&) {
      return nullptr;
    }
    return c;
  }

  // Listens on a connection of its own; after each reconnect it also reports work, in
  // case a notification went by while it was away.
  void ListenLoop(std::unique_ptr<PgConn> c) {
    Duration backoff{100};
    while (!Stopping()) {
      if (!c) {
        c = Listen();
        if (!c) {
          WaitStop(backoff);
          backoff = std::min(backoff * 2, Duration(5000));
          continue;
        }
        backoff = Duration(100);
        obs::LogInfo("postgres listener reconnected");
        WorkArrived();
        TasksArrived();
      }
      pollfd p{PQsocket(c->raw()), POLLIN, 0};
      const int n = ::poll(&p, 1, 250);
      if (n < 0) continue;
      if (n > 0 && PQconsumeInput(c->raw()) == 0) {
        obs::LogWarn("postgres listener lost its connection; reconnecting", {{"error", OneLine(PQerrorMessage(c->raw()))}});
        c.reset();
        continue;
      }
      bool work = false, tasks = false;
      while (PGnotify* note = PQnotifies(c->raw())) {
        const std::string_view channel(note->relname);
        work = work || channel == kWorkChannel;
        tasks = tasks || channel == kTaskChannel;
        PQfreemem(note);
      }
      if (work) WorkArrived();
      if (tasks) TasksArrived();
    }
  }

  bool Stopping() {
    std::lock_guard lock(mu_);
    return stopping_;
  }
  void WaitStop(Duration d) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, d, [&] { return stopping_; });
  }

  Pool pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;      // GUARDED_BY(mu_)
  bool notify_work_ = false;   // GUARDED_BY(mu_)
  bool notify_tasks_ = false;  // GUARDED_BY(mu_)
  std::thread notifier_;
  std::thread listener_;
};

}  // namespace

int PostgresSchemaVersion() { return kSchemaVersion; }

Result<int> ReadPostgresSchemaVersion(const PostgresOptions& options) {
  std::string error;
  auto c = PgConn::Connect(options, error);
  if (!c) return Error(ErrorCode::kUnavailable, "cannot connect to PostgreSQL at " + RedactUrl(options.url) + ": " + error);
  try {
    {
      auto s = c->Prepare("SELECT CASE WHEN to_regclass('keel_schema') IS NULL THEN 0 ELSE 1 END");
      if (!s.Step() || s.Int(0) == 0) return 0;
    }
    auto s = c->Prepare("SELECT coalesce(max(version), 0) FROM keel_schema");
    return s.Step() ? static_cast<int>(s.Int(0)) : 0;
  } catch (const SqlError& e) {
    return Error(ErrorCode::kUnavailable, std::string("cannot read the schema version: ") + e.what());
  }
}

Result<std::unique_ptr<Store>> OpenPostgresStore(const PostgresOptions& options, const Clock& clock, Random& random) {
  auto store = std::make_unique<PostgresStore>(options, clock, random);
  auto opened = store->Open();
  if (!opened.ok()) return std::move(opened).error();
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace keel::store
