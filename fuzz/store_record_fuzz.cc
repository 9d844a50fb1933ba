// Fuzzes the store's record codec: how a run stored on disk is read back (SQLite store,
// src/store/sql/sql_store.cc). One SQLite store in a temporary directory for the whole
// run holds one run with one step checkpoint, its events and one task; for each input,
// the run's stored columns are overwritten directly with sqlite3 (as an older keel, a
// disk fault or a bug elsewhere could leave them), then read back through the Store API:
// GetRun, ListRuns, ListEvents, LeaseRun (and ReleaseLease), LeaseTask, GetStats.
//
// The input is up to ten parts separated by "\n@@\n", in this order:
//   runs.status, runs.input, runs.output, runs.error, runs.waiting, runs.signals,
//   steps.output, steps.error, definitions.body, events.data
// A missing part keeps the value the store wrote; a part "NULL" writes SQL NULL.
// Property: no crash; a record that cannot be decoded is an error, not a crash.

#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "keel/core/clock.h"
#include "keel/core/random.h"
#include "keel/store/sqlite_store.h"

namespace {

constexpr const char* kRun = "run-fuzz";

struct Fixture {
  std::string dir;
  std::unique_ptr<keel::Random> random;
  std::unique_ptr<keel::store::Store> store;
  sqlite3* db = nullptr;
};

void Exec(sqlite3* db, const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    keel::fuzz::Fail("fixture SQL failed", err ? err : sql);
  }
}

Fixture& Get() {
  static Fixture* f = [] {
    auto* fx = new Fixture;
    // KEEL_FUZZ_TMP (scripts/fuzz.sh sets it), else /dev/shm, else /tmp.
    const char* base = std::getenv("KEEL_FUZZ_TMP");
    if (base == nullptr) base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = std::string(base) + "/keel-store-fuzz-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) keel::fuzz::Fail("mkdtemp failed");
    fx->dir = tmpl;
    // The directory goes when the process ends normally; a crashed run leaves it in
    // /dev/shm (scripts/fuzz.sh removes its KEEL_FUZZ_TMP).
    std::atexit([] {
      Fixture& f = Get();
      if (f.db != nullptr) sqlite3_close(f.db);
      f.store.reset();  // joins the writer thread before static destructors run
      std::error_code ec;
      std::filesystem::remove_all(f.dir, ec);
    });
    fx->random = std::make_unique<keel::SeededRandom>(1);
    keel::store::SqliteOptions o;
    o.path = fx->dir + "/keel.db";
    o.read_connections = 1;
    auto opened = keel::store::OpenSqliteStore(o, *keel::SystemClock::Instance(), *fx->random);
    if (!opened.ok()) keel::fuzz::Fail("cannot open the store", opened.error().message);
    fx->store = std::move(opened).value();
    keel::store::NewRun run;
    run.id = kRun;
    run.pipeline = "p";
    run.input = keel::json::object{{"text", "hello"}};
    run.definition = keel::json::object{{"name", "p"}, {"steps", keel::json::array{}}};
    auto submitted = fx->store->SubmitRun(run);
    if (!submitted.ok())
      keel::fuzz::Fail("cannot submit the fixture run", submitted.error().message);
    if (sqlite3_open(o.path.c_str(), &fx->db) != SQLITE_OK)
      keel::fuzz::Fail("cannot open the database");
    sqlite3_busy_timeout(fx->db, 10000);
    Exec(fx->db,
         "INSERT INTO steps(run_id, step_id, seq, status, attempts, output, started_at, "
         "finished_at) "
         "VALUES('run-fuzz', 'outline', 0, 'succeeded', 1, '{\"text\":\"x\"}', 1, 2);"
         "INSERT INTO steps(run_id, step_id, seq, status, attempts, output, started_at, "
         "finished_at) "
         "VALUES('run-fuzz', 'map#0', 1, 'succeeded', 1, '1', 1, 2);"
         "INSERT INTO tasks(token, run_id, step_id, attempt, queue, input, status, "
         "heartbeat_timeout, created_at) "
         "VALUES('tok', 'run-fuzz', 'outline', 1, 'q', '{\"a\":1}', 'queued', 30000, 1);");
    return fx;
  }();
  return *f;
}

// Writes `value` ("NULL": SQL NULL) into `sql`'s one parameter.
void Write(sqlite3* db, const char* sql, std::string_view value) {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK)
    keel::fuzz::Fail("prepare failed", sql);
  if (value == "NULL")
    sqlite3_bind_null(st, 1);
  else
    sqlite3_bind_text(st, 1, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT);
  const int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  // A NOT NULL column refuses NULL: keep what was there.
  if (rc != SQLITE_DONE && rc != SQLITE_CONSTRAINT)
    keel::fuzz::Fail("write failed", sqlite3_errmsg(db));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  Fixture& fx = Get();
  std::vector<std::string_view> parts;
  std::string_view rest = fuzz::AsText(data, size);
  while (parts.size() < 10) {
    const auto at = rest.find(fuzz::kSeparator);
    parts.push_back(rest.substr(0, at));
    if (at == std::string_view::npos) break;
    rest.remove_prefix(at + fuzz::kSeparator.size());
  }
  static const char* const kWrites[] = {
      "UPDATE runs SET status = ?1 WHERE id = 'run-fuzz'",
      "UPDATE runs SET input = ?1 WHERE id = 'run-fuzz'",
      "UPDATE runs SET output = ?1 WHERE id = 'run-fuzz'",
      "UPDATE runs SET error = ?1 WHERE id = 'run-fuzz'",
      "UPDATE runs SET waiting = ?1 WHERE id = 'run-fuzz'",
      "UPDATE runs SET signals = ?1 WHERE id = 'run-fuzz'",
      "UPDATE steps SET output = ?1 WHERE run_id = 'run-fuzz' AND step_id = 'outline'",
      "UPDATE steps SET error = ?1 WHERE run_id = 'run-fuzz' AND step_id = 'outline'",
      "UPDATE definitions SET body = ?1",
      "UPDATE events SET data = ?1 WHERE run_id = 'run-fuzz'",
  };
  // Back to a leasable state, then this input's columns.
  Exec(fx.db,
       "BEGIN; UPDATE runs SET status = 'queued', input = '{}', output = NULL, error = NULL, "
       "waiting = NULL, "
       "signals = NULL WHERE id = 'run-fuzz'; UPDATE queue SET due_at = 0, lease_token = NULL, "
       "lease_owner = NULL; "
       "INSERT OR IGNORE INTO queue(run_id, due_at) VALUES('run-fuzz', 0); "
       "UPDATE steps SET output = '{}', error = NULL WHERE run_id = 'run-fuzz'; "
       "UPDATE tasks SET status = 'queued', worker_id = NULL, lease_expires = NULL; COMMIT;");
  for (std::size_t i = 0; i < parts.size(); ++i) Write(fx.db, kWrites[i], parts[i]);

  auto run = fx.store->GetRun(kRun);
  if (run.ok()) (void)run->steps.size();
  store::RunFilter filter;
  (void)fx.store->ListRuns(filter);
  filter.pipeline = "p";
  filter.status = store::RunStatus::kQueued;
  (void)fx.store->ListRuns(filter);
  (void)fx.store->ListEvents(kRun, 0, 100);
  auto leased = fx.store->LeaseRun("fuzz-worker", Duration(30000));
  if (leased.ok() && leased->has_value()) (void)fx.store->ReleaseLease((*leased)->lease);
  (void)fx.store->LeaseTask("q", "fuzz-worker");
  (void)fx.store->GetStats();
  return 0;
}
