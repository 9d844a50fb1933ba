// What only the SQLite store has: its schema versions. Databases written by an older keel
// are migrated when opened, keeping their runs; a database written by a newer keel is
// refused rather than misread. (Behaviour common to every Store is in
// tests/conformance/.)

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <memory>
#include <set>
#include <unistd.h>
#include <stdexcept>
#include <string>

#include "keel/core/clock.h"
#include "keel/core/json.h"
#include "keel/core/random.h"
#include "keel/store/sqlite_store.h"
#include "keel/store/store.h"
#include "keel/testing/assert.h"
#include "keel/testing/process.h"

namespace keel::store {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

// The schema of user_version 1, as keel wrote it before waiting runs: frozen here, since
// the store's own schema moves on.
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE runs (
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
  finished_at     INTEGER
) WITHOUT ROWID;
CREATE TABLE definitions (
  id   TEXT PRIMARY KEY,
  body TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX runs_by_status ON runs(status, id);
CREATE INDEX runs_by_pipeline ON runs(pipeline, id);
CREATE TABLE steps (
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
CREATE TABLE events (
  seq     INTEGER PRIMARY KEY,
  run_id  TEXT NOT NULL,
  type    TEXT NOT NULL,
  step_id TEXT,
  attempt INTEGER,
  at      INTEGER NOT NULL,
  data    TEXT
);
CREATE INDEX events_by_run ON events(run_id, seq);
CREATE TABLE queue (
  run_id      TEXT PRIMARY KEY,
  due_at      INTEGER NOT NULL,
  lease_token TEXT,
  lease_owner TEXT,
  deliveries  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX queue_by_due ON queue(due_at);
)sql";

constexpr int64_t kCreatedMs = 1'700'000'000'000;
constexpr const char* kRunId = "run-v1-0001";

// A raw connection, for writing and inspecting database files behind the store's back.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
      throw std::runtime_error("cannot open " + path + ": " + sqlite3_errmsg(db_));
    }
  }
  ~RawDb() { sqlite3_close(db_); }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;

  void Exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      const std::string msg = err ? err : sqlite3_errmsg(db_);
      sqlite3_free(err);
      throw std::runtime_error("sqlite: " + msg + " in: " + sql);
    }
  }
  int64_t Int(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) != SQLITE_OK) {
      throw std::runtime_error(std::string("sqlite prepare: ") + sqlite3_errmsg(db_));
    }
    const int64_t v = sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_int64(s, 0) : -1;
    sqlite3_finalize(s);
    return v;
  }
  std::set<std::string> Columns(const std::string& table) {
    sqlite3_stmt* s = nullptr;
    const std::string sql = "SELECT name FROM pragma_table_info('" + table + "')";
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) != SQLITE_OK) {
      throw std::runtime_error(std::string("sqlite prepare: ") + sqlite3_errmsg(db_));
    }
    std::set<std::string> out;
    while (sqlite3_step(s) == SQLITE_ROW) out.insert(reinterpret_cast<const char*>(sqlite3_column_text(s, 0)));
    sqlite3_finalize(s);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
};

class SqliteSchemaTest : public ::testing::Test {
 protected:
  std::string DbPath() const { return dir_.path() + "/keel.db"; }

  // A database at user_version 1 holding one queued run, submitted a minute before the
  // clock's start.
  void WriteVersion1Database() {
    RawDb db(DbPath());
    db.Exec(kSchemaV1);
    const std::string t = std::to_string(kCreatedMs - 60'000);
    const std::string id = kRunId;
    db.Exec(R"(INSERT INTO definitions(id, body) VALUES('def-1', '{"name":"legacy","steps":["a"]}'))");
    db.Exec("INSERT INTO runs(id, pipeline, status, input, definition_id, idempotency_key, fingerprint, "
            "created_at, updated_at) VALUES('" + id + R"(', 'legacy', 'queued', '{"n":1}', 'def-1', )" +
            "'legacy-key', 'fp', " + t + ", " + t + ")");
    db.Exec("INSERT INTO queue(run_id, due_at) VALUES('" + id + "', " + t + ")");
    db.Exec("INSERT INTO events(run_id, type, at, data) VALUES('" + id + "', 'RunSubmitted', " + t +
            R"(, '{"pipeline":"legacy"}'))");
    // A map step with two items, as every version wrote them (ids STEP#INDEX, seq from
    // 2^40): the migration to version 4 makes them items of their step.
    db.Exec("INSERT INTO steps(run_id, step_id, seq, status, attempts, started_at) VALUES('" + id +
            "', 'fan', 0, 'running', 1, " + t + ")");
    for (int i = 0; i < 2; ++i) {
      db.Exec("INSERT INTO steps(run_id, step_id, seq, status, attempts, output, started_at, finished_at) VALUES('" +
              id + "', 'fan#" + std::to_string(i) + "', " + std::to_string((int64_t{1} << 40) + i) +
              ", 'succeeded', 1, '" + std::to_string(10 + i) + "', " + t + ", " + t + ")");
    }
    db.Exec("PRAGMA user_version=1");
  }

  Result<std::unique_ptr<Store>> Open() {
    SqliteOptions options;
    options.path = DbPath();
    return OpenSqliteStore(options, clock_, random_);
  }
  std::unique_ptr<Store> MustOpen() {
    auto opened = Open();
    if (!opened.ok()) throw std::runtime_error("OpenSqliteStore failed: " + opened.error().message);
    return std::move(opened).value();
  }

  keel::testing::TempDir dir_;
  ManualClock clock_{FromMillis(kCreatedMs)};
  SeededRandom random_{7};
};

TEST_F(SqliteSchemaTest, AVersion1DatabaseIsMigratedKeepingItsRuns) {
  WriteVersion1Database();
  {
    auto store = MustOpen();
    auto run = store->GetRun(kRunId);
    ASSERT_OK(run);
    EXPECT_EQ(run->pipeline, "legacy");
    EXPECT_EQ(RunStatusName(run->status), "queued");
    EXPECT_EQ(run->input, json::parse(R"({"n":1})"));
    EXPECT_EQ(run->definition, json::parse(R"({"name":"legacy","steps":["a"]})"));
    EXPECT_EQ(run->idempotency_key, "legacy-key");
    EXPECT_EQ(ToMillis(run->created_at), kCreatedMs - 60'000);
    EXPECT_TRUE(run->waiting.is_null());
    EXPECT_TRUE(run->signals.empty());
    EXPECT_EQ(run->parent, "");
    // The map step's items are its items: counted on it, listed in index order.
    ASSERT_EQ(run->steps.size(), 1u);
    EXPECT_EQ(run->steps[0].step_id, "fan");
    EXPECT_EQ(run->steps[0].items, 2);
    auto items = store->ListItems(kRunId, "fan", -1, 10, true);
    ASSERT_OK(items);
    ASSERT_EQ(items->size(), 2u);
    EXPECT_EQ((*items)[1].index, 1);
    EXPECT_EQ((*items)[1].output, json::value(11));
    auto events = store->ListEvents(kRunId, 0, 100);
    ASSERT_OK(events);
    ASSERT_EQ(events->size(), 1u);
    EXPECT_EQ((*events)[0].type, "RunSubmitted");
    auto stats = store->GetStats();
    ASSERT_OK(stats);
    EXPECT_EQ(stats->runs_by_status.at(RunStatus::kQueued), 1);
    EXPECT_EQ(stats->queue_ready, 1);
    // Its idempotency key still holds.
    NewRun replay;
    replay.id = "run-new";
    replay.pipeline = "legacy";
    replay.input = json::object{};
    replay.definition = json::object{};
    replay.idempotency_key = "legacy-key";
    replay.fingerprint = "fp";
    auto replayed = store->SubmitRun(replay);
    ASSERT_OK(replayed);
    EXPECT_FALSE(replayed->created);
    EXPECT_EQ(replayed->run.id, kRunId);

    // Leasable, and the new columns work: park it, signal it while parked (due again),
    // then signal it while leased (the mark makes the next park due at once).
    auto leased = store->LeaseRun("w1", 30s);
    ASSERT_OK(leased);
    ASSERT_TRUE(leased->has_value());
    const Lease lease = (*leased)->lease;
    EXPECT_EQ((*leased)->run.id, kRunId);
    EXPECT_EQ(lease.delivery, 1);
    EXPECT_EQ(RunStatusName((*leased)->run.status), "running");
    ASSERT_OK(store->StartStep(lease, "a"));
    ASSERT_OK(store->SuspendStep(lease, "a", std::nullopt, json::object{{"kind", "signal"}}));
    EXPECT_EQ(RunStatusName(store->GetRun(kRunId)->status), "waiting");
    auto none = store->LeaseRun("w1", 30s);
    ASSERT_OK(none);
    EXPECT_FALSE(none->has_value());
    ASSERT_OK(store->SendSignal(kRunId, "go", json::value(1)));
    auto again = store->LeaseRun("w1", 30s);
    ASSERT_OK(again);
    ASSERT_TRUE(again->has_value());
    EXPECT_EQ((*again)->run.signals.at("go").at("payload"), json::value(1));
    ASSERT_OK(store->StartStep((*again)->lease, "a"));
    ASSERT_OK(store->SendSignal(kRunId, "go", json::value(2)));
    ASSERT_OK(store->SuspendStep((*again)->lease, "a", clock_.Now() + 1h, json::object{{"kind", "signal"}}));
    auto third = store->LeaseRun("w1", 30s);
    ASSERT_OK(third);
    ASSERT_TRUE(third->has_value());
    EXPECT_EQ((*third)->lease.delivery, 3);
  }
  {
    RawDb db(DbPath());
    EXPECT_EQ(db.Int("PRAGMA user_version"), 4);
    const auto runs = db.Columns("runs");
    for (const char* c : {"waiting", "signals", "parent"}) EXPECT_EQ(runs.count(c), 1u) << c;
    EXPECT_EQ(db.Columns("queue").count("woken"), 1u);
    EXPECT_EQ(db.Columns("steps").count("interrupted"), 1u);
    EXPECT_EQ(db.Columns("steps").count("item_of"), 1u);
    EXPECT_EQ(db.Int("SELECT count(*) FROM sqlite_master WHERE name = 'steps_by_item'"), 1);
  }
  // Opened again (already at version 2): nothing is migrated twice, the run is intact.
  auto store = MustOpen();
  auto run = store->GetRun(kRunId);
  ASSERT_OK(run);
  EXPECT_EQ(RunStatusName(run->status), "running");
  EXPECT_EQ(run->signals.at("go").at("payload"), json::value(2));
}

TEST_F(SqliteSchemaTest, ANewerSchemaIsRefused) {
  {
    RawDb db(DbPath());
    db.Exec("CREATE TABLE future (x INTEGER)");
    db.Exec("PRAGMA user_version=99");
  }
  auto opened = Open();
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.error().code, ErrorCode::kUnavailable);
  EXPECT_THAT(opened.error().message, HasSubstr("99"));
  EXPECT_THAT(opened.error().message, HasSubstr("newer keel"));
  // Left as it was.
  RawDb db(DbPath());
  EXPECT_EQ(db.Int("PRAGMA user_version"), 99);
  EXPECT_EQ(db.Int("SELECT count(*) FROM sqlite_master WHERE name = 'runs'"), 0);
}

}  // namespace
}  // namespace keel::store

namespace keel::store {
namespace {

// SQLite serves one process: a second keel on the same file is refused, not let in to
// corrupt the first one's bookkeeping; the lock goes with the store (or the process).
TEST_F(SqliteSchemaTest, ASecondStoreOnTheSameFileIsRefusedUntilTheFirstCloses) {
  auto first = MustOpen();
  auto second = Open();
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, ErrorCode::kUnavailable);
  EXPECT_THAT(second.error().message, HasSubstr("in use by another keel process (pid " + std::to_string(getpid())));
  EXPECT_THAT(second.error().message, HasSubstr("postgres://"));
  first.reset();
  auto third = Open();
  EXPECT_OK(third);
}

}  // namespace
}  // namespace keel::store
