// The Store conformance suite (STYLE.md rule 8): one parameterised suite, written against
// keel/store/store.h alone, that every implementation must pass. To run it against a new
// implementation, add one StoreFactory to AllStores() below.
//
// Each test gets a fresh temporary directory, a ManualClock (time moves only when a test
// advances it: no sleeps) and a SeededRandom. Reopen() destroys the store and opens it
// again on the same directory, to prove that what was acknowledged is durable.

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/ids.h"
#include "keel/core/json.h"
#include "keel/core/random.h"
#include "keel/core/result.h"
#include "keel/store/postgres_store.h"
#include "keel/store/sqlite_store.h"
#include "keel/store/store.h"
#include "keel/testing/assert.h"
#include "keel/testing/process.h"
#include "keel/testing/services.h"

namespace keel::store {
namespace {

using namespace std::chrono_literals;
using Kind = FailureDisposition::Kind;

// ---------------------------------------------------------------------------------------
// The implementations under test.

struct StoreFactory {
  std::string name;
  std::function<Result<std::unique_ptr<Store>>(const std::string& dir, const Clock&, Random&)> open;
  // Removes what `open` made outside `dir` (after the store is gone); may be empty.
  std::function<void(const std::string& dir)> cleanup;
  // Runs one SQL statement straight on the database of `dir`, behind the store's back
  // (to damage a record as a disk fault or another version would); throws on failure.
  std::function<void(const std::string& dir, const std::string& sql)> exec;
};

// A database of its own per test directory, on the run's shared PostgreSQL server
// (tests/support/services.h): created on the first open, kept across reopens.
std::string PostgresDatabaseFor(const std::string& dir) {
  return "conformance_" + std::to_string(Fnv1a64(dir));
}

void PrintTo(const StoreFactory& f, std::ostream* os) { *os << f.name; }

std::vector<StoreFactory> AllStores() {
  return {
      {"sqlite",
       [](const std::string& dir, const Clock& clock, Random& random) {
         SqliteOptions options;
         options.path = dir + "/keel.db";
         return OpenSqliteStore(options, clock, random);
       },
       {},
       [](const std::string& dir, const std::string& sql) {
         const std::string file = dir + "/damage.sql";
         {
           std::FILE* f = std::fopen(file.c_str(), "w");
           if (f == nullptr) throw std::runtime_error("cannot write " + file);
           std::fprintf(f, ".timeout 5000\n%s;\n", sql.c_str());
           std::fclose(f);
         }
         const std::string cmd = "sqlite3 -bail '" + dir + "/keel.db' < '" + file + "'";
         if (std::system(cmd.c_str()) != 0) throw std::runtime_error("sqlite3 failed: " + sql);
       }},
      {"postgres",
       [](const std::string& dir, const Clock& clock, Random& random) {
         static std::mutex mu;
         static std::set<std::string> created;
         std::string url;
         {
           std::lock_guard lock(mu);
           const std::string admin = keel::testing::SharedPostgresUrl();
           const std::string name = PostgresDatabaseFor(dir);
           url = admin.substr(0, admin.rfind('/') + 1) + name;
           if (created.insert(dir).second) url = keel::testing::CreateDatabase(admin, name);
         }
         PostgresOptions options;
         options.url = url;
         options.pool_size = 8;
         return OpenPostgresStore(options, clock, random);
       },
       [](const std::string& dir) {
         keel::testing::Psql(keel::testing::SharedPostgresUrl(),
                             "DROP DATABASE IF EXISTS \"" + PostgresDatabaseFor(dir) + "\" WITH (FORCE)");
       },
       [](const std::string& dir, const std::string& sql) {
         const std::string admin = keel::testing::SharedPostgresUrl();
         keel::testing::Psql(admin.substr(0, admin.rfind('/') + 1) + PostgresDatabaseFor(dir), sql);
       }},
  };
}

// ---------------------------------------------------------------------------------------
// Helpers.

std::string Describe(const Error& e) { return std::string(ErrorCodeName(e.code)) + ": " + e.message; }

// The value of a Result that must succeed; otherwise the test fails (gtest reports the
// exception) without going on with a missing value.
template <typename T>
T Must(Result<T> r, const std::string& what) {
  if (!r.ok()) throw std::runtime_error(what + " failed: " + Describe(r.error()));
  return std::move(r).value();
}
void Must(Result<void> r, const std::string& what) {
  if (!r.ok()) throw std::runtime_error(what + " failed: " + Describe(r.error()));
}

template <typename R>
::testing::AssertionResult FailsWith(const R& r, ErrorCode code) {
  if (r.ok()) return ::testing::AssertionFailure() << "succeeded; expected " << ErrorCodeName(code);
  if (r.error().code != code) {
    return ::testing::AssertionFailure() << "failed with " << Describe(r.error()) << "; expected "
                                         << ErrorCodeName(code);
  }
  return ::testing::AssertionSuccess();
}

// Timestamps as milliseconds, so that failures print readably (-1: none).
int64_t Ms(Timestamp t) { return ToMillis(t); }
int64_t Ms(const std::optional<Timestamp>& t) { return t ? ToMillis(*t) : -1; }

std::vector<std::string> Types(const std::vector<Event>& events) {
  std::vector<std::string> out;
  for (const auto& e : events) out.push_back(e.type);
  return out;
}

std::vector<std::string> Ids(const std::vector<RunRecord>& runs) {
  std::vector<std::string> out;
  for (const auto& r : runs) out.push_back(r.id);
  return out;
}

void ExpectSameError(const std::optional<Error>& got, const std::optional<Error>& want) {
  ASSERT_EQ(got.has_value(), want.has_value());
  if (!got) return;
  EXPECT_EQ(ErrorCodeName(got->code), ErrorCodeName(want->code));
  EXPECT_EQ(got->message, want->message);
}

void ExpectSameRun(const RunRecord& got, const RunRecord& want, bool with_steps = true) {
  EXPECT_EQ(got.id, want.id);
  EXPECT_EQ(got.pipeline, want.pipeline);
  EXPECT_EQ(RunStatusName(got.status), RunStatusName(want.status));
  EXPECT_EQ(got.input, want.input);
  EXPECT_EQ(got.output, want.output);
  ExpectSameError(got.error, want.error);
  EXPECT_EQ(got.idempotency_key, want.idempotency_key);
  EXPECT_EQ(Ms(got.created_at), Ms(want.created_at));
  EXPECT_EQ(Ms(got.updated_at), Ms(want.updated_at));
  EXPECT_EQ(Ms(got.started_at), Ms(want.started_at));
  EXPECT_EQ(Ms(got.finished_at), Ms(want.finished_at));
  if (!with_steps) return;
  EXPECT_EQ(got.definition, want.definition);
  ASSERT_EQ(got.steps.size(), want.steps.size());
  for (std::size_t i = 0; i < got.steps.size(); ++i) {
    const auto& g = got.steps[i];
    const auto& w = want.steps[i];
    EXPECT_EQ(g.step_id, w.step_id);
    EXPECT_EQ(StepStatusName(g.status), StepStatusName(w.status));
    EXPECT_EQ(g.attempts, w.attempts);
    EXPECT_EQ(Ms(g.started_at), Ms(w.started_at));
    EXPECT_EQ(Ms(g.finished_at), Ms(w.finished_at));
    EXPECT_EQ(g.output, w.output);
    ExpectSameError(g.error, w.error);
  }
}

void ExpectSameEvents(const std::vector<Event>& got, const std::vector<Event>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].seq, want[i].seq);
    EXPECT_EQ(got[i].run_id, want[i].run_id);
    EXPECT_EQ(got[i].type, want[i].type);
    EXPECT_EQ(got[i].step_id, want[i].step_id);
    EXPECT_EQ(got[i].attempt, want[i].attempt);
    EXPECT_EQ(Ms(got[i].at), Ms(want[i].at));
    EXPECT_EQ(got[i].data, want[i].data);
  }
}

constexpr Duration kLeaseFor = 30s;

// ---------------------------------------------------------------------------------------
// The fixture.

class StoreConformance : public ::testing::TestWithParam<StoreFactory> {
 protected:
  void SetUp() override { Open(); }
  void TearDown() override {
    store_.reset();
    if (GetParam().cleanup) GetParam().cleanup(dir_.path());
  }

  void Open() {
    auto opened = GetParam().open(dir_.path(), clock_, random_);
    if (!opened.ok()) throw std::runtime_error("opening the store failed: " + Describe(opened.error()));
    store_ = std::move(opened).value();
  }
  // Destroys the store and opens it again on the same directory.
  void Reopen() {
    store_.reset();
    Open();
  }

  Store& store() { return *store_; }

  // Writes `value` (as text) into `column` of the `table` row whose `key_column` is `key`,
  // behind the store's back.
  void Damage(const std::string& table, const std::string& column, const std::string& key_column,
              const std::string& key, const std::string& value) {
    GetParam().exec(dir_.path(), "UPDATE " + table + " SET " + column + " = '" + value +
                                     "' WHERE " + key_column + " = '" + key + "'");
  }

  NewRun MakeRun(const std::string& pipeline = "pipe") {
    NewRun r;
    r.id = NewRunId(clock_.Now(), random_);
    r.pipeline = pipeline;
    r.input = json::object{{"n", ++runs_made_}};
    r.definition = json::object{{"name", pipeline}, {"steps", json::array{"a", "b"}}};
    return r;
  }
  std::string Submit(const std::string& pipeline = "pipe") {
    const NewRun r = MakeRun(pipeline);
    auto result = Must(store().SubmitRun(r), "SubmitRun");
    if (!result.created || result.run.id != r.id) throw std::runtime_error("SubmitRun did not create " + r.id);
    return r.id;
  }

  std::optional<LeasedRun> TryLease(const std::string& worker = "w1", Duration lease_for = kLeaseFor) {
    return Must(store().LeaseRun(worker, lease_for), "LeaseRun");
  }
  LeasedRun LeaseNext(const std::string& worker = "w1", Duration lease_for = kLeaseFor) {
    auto leased = TryLease(worker, lease_for);
    if (!leased) throw std::runtime_error("LeaseRun returned nothing");
    return std::move(*leased);
  }
  // Leases `run_id`, which must be the one run due.
  Lease LeaseOnly(const std::string& run_id, Duration lease_for = kLeaseFor) {
    auto leased = LeaseNext("w1", lease_for);
    if (leased.run.id != run_id) throw std::runtime_error("leased " + leased.run.id + ", expected " + run_id);
    return leased.lease;
  }

  RunRecord Get(const std::string& id) { return Must(store().GetRun(id), "GetRun " + id); }
  std::vector<Event> Events(const std::string& id, int64_t after_seq = 0, int limit = 1000) {
    return Must(store().ListEvents(id, after_seq, limit), "ListEvents " + id);
  }
  // Every run matching `filter`, following the cursor to the last page.
  std::vector<RunRecord> ListAll(RunFilter filter) {
    std::vector<RunRecord> out;
    for (int pages = 0; pages < 10000; ++pages) {
      auto page = Must(store().ListRuns(filter), "ListRuns");
      for (auto& r : page.runs) out.push_back(std::move(r));
      if (page.next_cursor.empty()) return out;
      filter.cursor = page.next_cursor;
    }
    throw std::runtime_error("ListRuns never reached its last page");
  }
  StoreStats Stats() { return Must(store().GetStats(), "GetStats"); }
  std::optional<Timestamp> NextDue() { return Must(store().NextDueAt(), "NextDueAt"); }
  // A run is due: NextDueAt says now.
  void ExpectDueNow() { EXPECT_EQ(Ms(NextDue()), Ms(clock_.Now())); }

  // A run that has ended `succeeded` after one step.
  std::string SucceededRun() {
    const std::string id = Submit();
    const Lease l = LeaseOnly(id);
    Must(store().StartStep(l, "a"), "StartStep");
    Must(store().CompleteStep(l, "a", json::object{{"a", 1}}, std::nullopt, json::value("done")), "CompleteStep");
    return id;
  }
  // A run that has ended with `kind` (kFail or kDeadLetter) on step "a".
  std::string EndedRun(Kind kind) {
    const std::string id = Submit();
    const Lease l = LeaseOnly(id);
    Must(store().StartStep(l, "a"), "StartStep");
    Must(store().FailStep(l, "a", Error(ErrorCode::kServerError, "boom"), {kind}), "FailStep");
    return id;
  }
  // A run parked on step `step_id` (its first attempt): submitted, leased (it must be the
  // one run due), the step started and suspended.
  std::string ParkedRun(std::optional<Timestamp> wake_at, const json::value& waiting,
                        const std::string& step_id = "wait") {
    const std::string id = Submit();
    const Lease l = LeaseOnly(id);
    if (Must(store().StartStep(l, step_id), "StartStep") != 1) throw std::runtime_error("not attempt 1");
    Must(store().SuspendStep(l, step_id, wake_at, waiting), "SuspendStep");
    return id;
  }
  // NextDueAt does not say that anything is due within `horizon`.
  ::testing::AssertionResult NothingDueWithin(Duration horizon) {
    const auto next = NextDue();
    if (!next || *next > clock_.Now() + horizon) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "NextDueAt says " << Ms(next) << ", now is " << Ms(clock_.Now());
  }

  // Declared first: destroyed after the store that lives in it.
  keel::testing::TempDir dir_;
  ManualClock clock_;
  SeededRandom random_{20240917};
  std::unique_ptr<Store> store_;
  int runs_made_ = 0;
};

// ---------------------------------------------------------------------------------------
// Submission.

TEST_P(StoreConformance, SubmitThenGetReturnsTheQueuedRunAndItsSubmittedEvent) {
  NewRun nr = MakeRun("summarize");
  nr.input = json::parse(R"({"text":"hello","numbers":[1,2,3],"nested":{"ok":true}})");
  nr.definition = json::parse(R"({"name":"summarize","steps":[{"id":"a","kind":"llm"}]})");
  const Timestamp t0 = clock_.Now();
  auto submitted = Must(store().SubmitRun(nr), "SubmitRun");
  EXPECT_TRUE(submitted.created);
  EXPECT_EQ(submitted.run.id, nr.id);
  EXPECT_EQ(submitted.run.pipeline, "summarize");
  EXPECT_EQ(RunStatusName(submitted.run.status), "queued");
  EXPECT_EQ(submitted.run.input, nr.input);
  EXPECT_EQ(Ms(submitted.run.created_at), Ms(t0));

  clock_.Advance(5s);
  const RunRecord got = Get(nr.id);
  EXPECT_EQ(got.id, nr.id);
  EXPECT_EQ(got.pipeline, "summarize");
  EXPECT_EQ(RunStatusName(got.status), "queued");
  EXPECT_EQ(got.input, nr.input);
  EXPECT_EQ(got.definition, nr.definition);
  EXPECT_TRUE(got.output.is_null());
  EXPECT_FALSE(got.error.has_value());
  EXPECT_EQ(got.idempotency_key, "");
  EXPECT_EQ(Ms(got.created_at), Ms(t0));
  EXPECT_EQ(Ms(got.updated_at), Ms(t0));
  EXPECT_FALSE(got.started_at.has_value());
  EXPECT_FALSE(got.finished_at.has_value());
  EXPECT_TRUE(got.steps.empty());

  const auto events = Events(nr.id);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, "RunSubmitted");
  EXPECT_EQ(events[0].run_id, nr.id);
  EXPECT_GT(events[0].seq, 0);
  EXPECT_EQ(Ms(events[0].at), Ms(t0));
  EXPECT_EQ(events[0].step_id, "");
}

TEST_P(StoreConformance, SameIdempotencyKeyAndFingerprintReturnsTheSameRun) {
  NewRun first = MakeRun();
  first.idempotency_key = "key-1";
  first.fingerprint = "fp-1";
  auto created = Must(store().SubmitRun(first), "SubmitRun");
  EXPECT_TRUE(created.created);
  EXPECT_EQ(created.run.idempotency_key, "key-1");

  // The run moves on; a replay returns it as it is now.
  clock_.Advance(1s);
  EXPECT_EQ(LeaseNext().run.id, first.id);

  NewRun replay = MakeRun();  // another id and another input, same key and fingerprint
  replay.idempotency_key = "key-1";
  replay.fingerprint = "fp-1";
  auto again = Must(store().SubmitRun(replay), "SubmitRun replay");
  EXPECT_FALSE(again.created);
  EXPECT_EQ(again.run.id, first.id);
  EXPECT_EQ(again.run.input, first.input);
  EXPECT_EQ(RunStatusName(again.run.status), "running");
  EXPECT_EQ(again.run.idempotency_key, "key-1");

  EXPECT_TRUE(FailsWith(store().GetRun(replay.id), ErrorCode::kNotFound));
  EXPECT_EQ(ListAll({}).size(), 1u);
  const auto types = Types(Events(first.id));
  EXPECT_EQ(std::count(types.begin(), types.end(), "RunSubmitted"), 1);

  // Keys are durable.
  Reopen();
  NewRun later = MakeRun();
  later.idempotency_key = "key-1";
  later.fingerprint = "fp-1";
  auto after_reopen = Must(store().SubmitRun(later), "SubmitRun after reopen");
  EXPECT_FALSE(after_reopen.created);
  EXPECT_EQ(after_reopen.run.id, first.id);
  EXPECT_EQ(ListAll({}).size(), 1u);
}

TEST_P(StoreConformance, SameIdempotencyKeyWithAnotherFingerprintConflicts) {
  NewRun first = MakeRun();
  first.idempotency_key = "key-2";
  first.fingerprint = "body-A";
  Must(store().SubmitRun(first), "SubmitRun");

  NewRun other = MakeRun();
  other.idempotency_key = "key-2";
  other.fingerprint = "body-B";
  EXPECT_TRUE(FailsWith(store().SubmitRun(other), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().GetRun(other.id), ErrorCode::kNotFound));
  EXPECT_EQ(Get(first.id).input, first.input);
  EXPECT_EQ(ListAll({}).size(), 1u);

  // Another key with the same fingerprint is another run: keys dedup, not bodies.
  NewRun third = MakeRun();
  third.idempotency_key = "key-3";
  third.fingerprint = "body-A";
  EXPECT_TRUE(Must(store().SubmitRun(third), "SubmitRun key-3").created);

  Reopen();
  other.id = NewRunId(clock_.Now(), random_);
  EXPECT_TRUE(FailsWith(store().SubmitRun(other), ErrorCode::kConflict));
  EXPECT_EQ(ListAll({}).size(), 2u);
}

TEST_P(StoreConformance, WithoutIdempotencyKeyEverySubmitCreatesARun) {
  NewRun a = MakeRun();
  NewRun b = MakeRun();
  b.input = a.input;
  a.fingerprint = b.fingerprint = "same-body";
  auto ra = Must(store().SubmitRun(a), "SubmitRun a");
  auto rb = Must(store().SubmitRun(b), "SubmitRun b");
  EXPECT_TRUE(ra.created);
  EXPECT_TRUE(rb.created);
  EXPECT_NE(ra.run.id, rb.run.id);
  EXPECT_EQ(rb.run.id, b.id);
  EXPECT_EQ(ListAll({}).size(), 2u);
}

TEST_P(StoreConformance, MaxQueueDepthRefusesAndARunEndingFreesRoom) {
  auto bounded = [&](const std::string& key = {}) {
    NewRun r = MakeRun();
    r.max_queue_depth = 3;
    r.idempotency_key = key;
    r.fingerprint = key.empty() ? "" : "fp";
    return r;
  };
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    const NewRun r = bounded(i == 0 ? "depth-key" : "");
    ids.push_back(Must(store().SubmitRun(r), "SubmitRun").run.id);
  }
  const NewRun refused = bounded();
  EXPECT_TRUE(FailsWith(store().SubmitRun(refused), ErrorCode::kQueueFull));
  EXPECT_TRUE(FailsWith(store().GetRun(refused.id), ErrorCode::kNotFound));

  // Runs in flight count too.
  const LeasedRun leased = LeaseNext();
  EXPECT_EQ(leased.run.id, ids[0]);
  EXPECT_TRUE(FailsWith(store().SubmitRun(bounded()), ErrorCode::kQueueFull));

  // A replay of an existing key is not a new run: it is answered even when full.
  auto replay = Must(store().SubmitRun(bounded("depth-key")), "SubmitRun replay");
  EXPECT_FALSE(replay.created);
  EXPECT_EQ(replay.run.id, ids[0]);

  // A run that succeeds frees room for exactly one.
  Must(store().StartStep(leased.lease, "a"), "StartStep");
  Must(store().CompleteStep(leased.lease, "a", json::object{}, std::nullopt, json::value(1)), "CompleteStep");
  EXPECT_TRUE(Must(store().SubmitRun(bounded()), "SubmitRun after success").created);
  EXPECT_TRUE(FailsWith(store().SubmitRun(bounded()), ErrorCode::kQueueFull));

  // So does a cancelled one.
  Must(store().CancelRun(ids[1]), "CancelRun");
  EXPECT_TRUE(Must(store().SubmitRun(bounded()), "SubmitRun after cancel").created);
  EXPECT_TRUE(FailsWith(store().SubmitRun(bounded()), ErrorCode::kQueueFull));

  // The depth is counted from the durable queue after a restart.
  Reopen();
  EXPECT_TRUE(FailsWith(store().SubmitRun(bounded()), ErrorCode::kQueueFull));
  NewRun roomy = MakeRun();
  roomy.max_queue_depth = 4;
  EXPECT_TRUE(Must(store().SubmitRun(roomy), "SubmitRun depth 4").created);
}

TEST_P(StoreConformance, RedrivenRunCountsTowardsQueueDepth) {
  auto bounded = [&] {
    NewRun r = MakeRun();
    r.max_queue_depth = 2;
    return r;
  };
  const std::string dead = EndedRun(Kind::kDeadLetter);
  Must(store().SubmitRun(bounded()), "SubmitRun");  // 1 in the queue
  Must(store().RedriveRun(dead), "RedriveRun");     // 2
  EXPECT_TRUE(FailsWith(store().SubmitRun(bounded()), ErrorCode::kQueueFull));
}

TEST_P(StoreConformance, ValuesRoundTripExactly) {
  const json::value input = json::parse(
      R"({"text":"h\u00e9llo \"quoted\" \\ \n\u0000 \ud83d\ude00","big":18446744073709551615,)"
      R"("neg":-9223372036854775808,"pi":3.141592653589793,"tiny":1e-300,"empty":{},"list":[[],null,true,false,""]})");
  const json::value step_output = json::parse(R"([{"a":[1,2,{"b":null}]},"x",0.1])");
  const json::value run_output = json::value("just a string");
  Error error(ErrorCode::kRateLimited, "429 from upstream: \"slow down\"", "messages[0]");
  error.retry_after = 1500ms;

  NewRun nr = MakeRun();
  nr.input = input;
  nr.definition = input;
  Must(store().SubmitRun(nr), "SubmitRun");
  const Lease l = LeaseOnly(nr.id);
  Must(store().StartStep(l, "s\u00e9p/1"), "StartStep");  // any string is a step id
  Must(store().CompleteStep(l, "s\u00e9p/1", step_output, std::string("two"), std::nullopt), "CompleteStep");
  Must(store().FailStep(l, "two", error, {Kind::kDeadLetter}), "FailStep");
  const std::string other = Submit();
  const Lease lo = LeaseOnly(other);
  Must(store().StartStep(lo, "a"), "StartStep");
  Must(store().CompleteStep(lo, "a", json::value(nullptr), std::nullopt, run_output), "CompleteStep");

  auto check = [&] {
    const RunRecord run = Get(nr.id);
    EXPECT_EQ(run.input, input);
    EXPECT_EQ(run.definition, input);
    ASSERT_EQ(run.steps.size(), 2u);
    EXPECT_EQ(run.steps[0].step_id, "s\u00e9p/1");
    EXPECT_EQ(run.steps[0].output, step_output);
    for (const auto& e : {run.error, run.steps[1].error}) {
      ASSERT_TRUE(e.has_value());
      EXPECT_EQ(e->code, ErrorCode::kRateLimited);
      EXPECT_EQ(e->message, error.message);
      EXPECT_EQ(e->param, "messages[0]");
      ASSERT_TRUE(e->retry_after.has_value());
      EXPECT_EQ(e->retry_after->count(), 1500);
    }
    const RunRecord done = Get(other);
    EXPECT_EQ(done.output, run_output);
    EXPECT_TRUE(done.steps.at(0).output.is_null());
  };
  check();
  Reopen();
  check();
}

TEST_P(StoreConformance, UnknownRunIsNotFound) {
  Submit();
  const std::string unknown = NewRunId(clock_.Now(), random_);
  EXPECT_TRUE(FailsWith(store().GetRun(unknown), ErrorCode::kNotFound));
  EXPECT_TRUE(FailsWith(store().ListEvents(unknown, 0, 100), ErrorCode::kNotFound));
  EXPECT_TRUE(FailsWith(store().CancelRun(unknown), ErrorCode::kNotFound));
  EXPECT_TRUE(FailsWith(store().RedriveRun(unknown), ErrorCode::kNotFound));
}

// ---------------------------------------------------------------------------------------
// Leases.

TEST_P(StoreConformance, LeaseOnAnEmptyQueueReturnsNothing) {
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_FALSE(NextDue().has_value());
  // Ended runs are not in the queue either.
  SucceededRun();
  Must(store().CancelRun(Submit()), "CancelRun");
  clock_.Advance(1h);
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_FALSE(NextDue().has_value());
}

TEST_P(StoreConformance, LeaseMarksTheRunRunningAndHandsItOut) {
  NewRun nr = MakeRun();
  Must(store().SubmitRun(nr), "SubmitRun");
  clock_.Advance(2s);
  const Timestamp t1 = clock_.Now();
  const LeasedRun leased = LeaseNext("worker-7", 45s);
  EXPECT_EQ(leased.lease.run_id, nr.id);
  EXPECT_FALSE(leased.lease.token.empty());
  EXPECT_EQ(Ms(leased.lease.expires_at), Ms(t1 + 45s));
  EXPECT_EQ(leased.lease.delivery, 1);
  EXPECT_EQ(leased.run.id, nr.id);
  EXPECT_EQ(RunStatusName(leased.run.status), "running");
  EXPECT_EQ(Ms(leased.run.started_at), Ms(t1));
  EXPECT_EQ(leased.run.input, nr.input);
  EXPECT_EQ(leased.run.definition, nr.definition);
  EXPECT_TRUE(leased.run.steps.empty());

  const RunRecord got = Get(nr.id);
  EXPECT_EQ(RunStatusName(got.status), "running");
  EXPECT_EQ(Ms(got.started_at), Ms(t1));
  EXPECT_FALSE(got.finished_at.has_value());

  // Nobody else gets it while the lease is valid.
  EXPECT_FALSE(TryLease("worker-8").has_value());
  clock_.Advance(45s - 1ms);
  EXPECT_FALSE(TryLease("worker-8").has_value());
}

TEST_P(StoreConformance, LeasesTheRunDueLongestFirst) {
  const std::string a = Submit();
  clock_.Advance(1ms);
  const std::string b = Submit();
  clock_.Advance(1ms);
  const std::string c = Submit();
  clock_.Advance(1ms);

  // In submission order while nothing else differs...
  const Lease la = LeaseOnly(a);
  EXPECT_EQ(LeaseNext().run.id, b);
  const Lease lb = Must(store().LeaseRun("w1", kLeaseFor), "LeaseRun").value().lease;
  ASSERT_EQ(lb.run_id, c);
  // ...and by when they became due, not when they were submitted: a retries after
  // 100 ms, c after 50 ms, b stays leased until its lease expires.
  Must(store().StartStep(la, "a"), "StartStep a");
  Must(store().FailStep(la, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 100ms}), "FailStep a");
  Must(store().StartStep(lb, "a"), "StartStep c");
  Must(store().FailStep(lb, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 50ms}), "FailStep c");
  EXPECT_FALSE(TryLease().has_value());
  const std::string d = Submit();  // due now: before a's and c's backoffs end
  clock_.Advance(200ms);
  EXPECT_EQ(LeaseNext().run.id, d);
  EXPECT_EQ(LeaseNext().run.id, c);
  EXPECT_EQ(LeaseNext().run.id, a);
  EXPECT_FALSE(TryLease().has_value());
  clock_.Advance(kLeaseFor);  // b's lease, taken 200 ms before the others, expires first
  EXPECT_EQ(LeaseNext().run.id, b);
}

TEST_P(StoreConformance, ExpiredLeaseRedeliversAndTheOldLeaseIsLost) {
  const std::string id = Submit();
  const Timestamp t_first = clock_.Now();
  const LeasedRun first = LeaseNext("w1", 30s);
  EXPECT_EQ(Must(store().StartStep(first.lease, "a"), "StartStep"), 1);

  clock_.Advance(30s - 1ms);
  EXPECT_FALSE(TryLease("w2").has_value());
  clock_.Advance(1ms);
  // Expired by the store's clock, even before anyone else took the run.
  EXPECT_TRUE(FailsWith(store().Heartbeat(first.lease, 30s), ErrorCode::kLeaseLost));
  EXPECT_EQ(Stats().queue_leased, 0);
  EXPECT_EQ(Stats().queue_ready, 1);

  const LeasedRun second = LeaseNext("w2", 30s);
  EXPECT_EQ(second.lease.run_id, id);
  EXPECT_EQ(second.lease.delivery, 2);
  EXPECT_NE(second.lease.token, first.lease.token);
  ASSERT_EQ(second.run.steps.size(), 1u);
  EXPECT_EQ(second.run.steps[0].step_id, "a");
  EXPECT_EQ(StepStatusName(second.run.steps[0].status), "running");
  EXPECT_EQ(second.run.steps[0].attempts, 1);
  EXPECT_EQ(Ms(second.run.started_at), Ms(t_first));  // the run started at its first lease
  EXPECT_EQ(Ms(Get(id).started_at), Ms(t_first));

  // Every call with the superseded lease fails and changes nothing.
  const auto events_before = Events(id);
  const RunRecord run_before = Get(id);
  const Lease& old = first.lease;
  EXPECT_TRUE(FailsWith(store().Heartbeat(old, 30s), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().StartStep(old, "b"), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().CompleteStep(old, "a", json::object{}, std::nullopt, json::value(1)),
                        ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().FailStep(old, "a", Error(ErrorCode::kTimeout, "x"), {Kind::kFail}),
                        ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().FailRun(old, Error(ErrorCode::kInternal, "x")), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().ReleaseLease(old), ErrorCode::kLeaseLost));
  EXPECT_EQ(Events(id).size(), events_before.size());
  ExpectSameRun(Get(id), run_before);
  EXPECT_FALSE(TryLease("w3").has_value());  // the release above did not free it

  // The current lease works: the interrupted attempt counts.
  EXPECT_EQ(Must(store().StartStep(second.lease, "a"), "StartStep"), 2);
  EXPECT_EQ(Must(store().CompleteStep(second.lease, "a", json::object{{"v", 1}}, std::nullopt, json::value(7)),
                 "CompleteStep"),
            0);
  EXPECT_EQ(RunStatusName(Get(id).status), "succeeded");
}

TEST_P(StoreConformance, HeartbeatExtendsTheLease) {
  const std::string id = Submit();
  const Timestamp t0 = clock_.Now();
  const Lease l = LeaseOnly(id, 10s);
  clock_.Advance(8s);
  EXPECT_EQ(Ms(Must(store().Heartbeat(l, 10s), "Heartbeat")), Ms(t0 + 18s));
  EXPECT_EQ(Ms(NextDue()), Ms(t0 + 18s));

  clock_.Advance(5s);  // past the first expiry, before the new one
  EXPECT_FALSE(TryLease("w2").has_value());
  EXPECT_EQ(Stats().queue_leased, 1);
  EXPECT_EQ(Must(store().StartStep(l, "a"), "StartStep"), 1);

  clock_.Advance(5s - 1ms);
  EXPECT_FALSE(TryLease("w2").has_value());
  clock_.Advance(1ms);
  EXPECT_TRUE(FailsWith(store().Heartbeat(l, 10s), ErrorCode::kLeaseLost));
  const LeasedRun again = LeaseNext("w2");
  EXPECT_EQ(again.run.id, id);
  EXPECT_EQ(again.lease.delivery, 2);
}

TEST_P(StoreConformance, ReleaseLeaseMakesTheRunLeasableAtOnce) {
  const std::string id = Submit();
  const LeasedRun first = LeaseNext("w1", 1h);
  Must(store().StartStep(first.lease, "a"), "StartStep");
  Must(store().CompleteStep(first.lease, "a", json::object{{"kept", true}}, std::nullopt, std::nullopt),
       "CompleteStep");
  Must(store().ReleaseLease(first.lease), "ReleaseLease");
  ExpectDueNow();

  const LeasedRun second = LeaseNext("w2", 1h);  // no time has passed
  EXPECT_EQ(second.run.id, id);
  EXPECT_EQ(second.lease.delivery, 2);
  ASSERT_EQ(second.run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(second.run.steps[0].status), "succeeded");
  EXPECT_EQ(second.run.steps[0].output, json::value(json::object{{"kept", true}}));
  EXPECT_TRUE(FailsWith(store().StartStep(first.lease, "b"), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().ReleaseLease(first.lease), ErrorCode::kLeaseLost));
  EXPECT_EQ(Must(store().StartStep(second.lease, "b"), "StartStep"), 1);
}

// ---------------------------------------------------------------------------------------
// Steps.

TEST_P(StoreConformance, StepAttemptsAreNumberedAcrossRetries) {
  const std::string id = Submit();
  const Lease l1 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l1, "a"), "StartStep"), 1);
  Must(store().FailStep(l1, "a", Error(ErrorCode::kRateLimited, "slow down"), {Kind::kRetry, 0ms}), "FailStep");

  const LeasedRun second = LeaseNext();
  ASSERT_EQ(second.run.id, id);
  ASSERT_EQ(second.run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(second.run.steps[0].status), "retrying");
  EXPECT_EQ(second.run.steps[0].attempts, 1);
  EXPECT_EQ(Must(store().StartStep(second.lease, "a"), "StartStep"), 2);
  const RunRecord run = Get(id);
  ASSERT_EQ(run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(run.steps[0].status), "running");
  EXPECT_EQ(run.steps[0].attempts, 2);
  // The next step starts at attempt 1.
  EXPECT_EQ(Must(store().CompleteStep(second.lease, "a", json::object{}, std::string("b"), std::nullopt),
                 "CompleteStep"),
            1);
  // The step succeeded: no error is left on it.
  const RunRecord after = Get(id);
  ASSERT_EQ(after.steps.size(), 2u);
  EXPECT_EQ(StepStatusName(after.steps[0].status), "succeeded");
  EXPECT_EQ(after.steps[0].attempts, 2);
  EXPECT_FALSE(after.steps[0].error.has_value());
}

TEST_P(StoreConformance, CompleteStepWithNextStepStartsIt) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  const Timestamp t_start = clock_.Now();
  EXPECT_EQ(Must(store().StartStep(l, "retrieve"), "StartStep"), 1);
  clock_.Advance(1500ms);
  const Timestamp t_done = clock_.Now();
  EXPECT_EQ(Must(store().CompleteStep(l, "retrieve", json::object{{"x", 1}}, std::string("generate"), std::nullopt),
                 "CompleteStep"),
            1);

  const RunRecord run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "running");
  ASSERT_EQ(run.steps.size(), 2u);
  EXPECT_EQ(run.steps[0].step_id, "retrieve");
  EXPECT_EQ(StepStatusName(run.steps[0].status), "succeeded");
  EXPECT_EQ(run.steps[0].attempts, 1);
  EXPECT_EQ(run.steps[0].output, json::value(json::object{{"x", 1}}));
  EXPECT_FALSE(run.steps[0].error.has_value());
  EXPECT_EQ(Ms(run.steps[0].started_at), Ms(t_start));
  EXPECT_EQ(Ms(run.steps[0].finished_at), Ms(t_done));
  EXPECT_EQ(run.steps[1].step_id, "generate");
  EXPECT_EQ(StepStatusName(run.steps[1].status), "running");
  EXPECT_EQ(run.steps[1].attempts, 1);
  EXPECT_TRUE(run.steps[1].output.is_null());
  EXPECT_EQ(Ms(run.steps[1].started_at), Ms(t_done));
  EXPECT_FALSE(run.steps[1].finished_at.has_value());

  const auto events = Events(id);
  ASSERT_GE(events.size(), 3u);
  const auto tail = std::vector<Event>(events.end() - 3, events.end());
  EXPECT_EQ(Types(tail), (std::vector<std::string>{"StepStarted", "StepSucceeded", "StepStarted"}));
  EXPECT_EQ(tail[1].step_id, "retrieve");
  EXPECT_EQ(tail[1].attempt, 1);
  EXPECT_EQ(tail[2].step_id, "generate");
  EXPECT_EQ(tail[2].attempt, 1);

  // Steps are listed in the order they first started, also after more attempts and a
  // restart.
  Must(store().FailStep(l, "generate", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}), "FailStep");
  Reopen();
  const Lease l2 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l2, "generate"), "StartStep"), 2);
  Must(store().CompleteStep(l2, "generate", json::object{}, std::string("check"), std::nullopt), "CompleteStep");
  std::vector<std::string> order;
  for (const auto& st : Get(id).steps) order.push_back(st.step_id);
  EXPECT_EQ(order, (std::vector<std::string>{"retrieve", "generate", "check"}));

  // The lease is kept.
  EXPECT_FALSE(TryLease("w2").has_value());
  EXPECT_OK(store().Heartbeat(l2, kLeaseFor));
}

TEST_P(StoreConformance, CompleteStepWithRunOutputSucceedsTheRun) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep");
  clock_.Advance(3s);
  const Timestamp t_done = clock_.Now();
  // run_output wins over next_step: the run ends, "b" never starts.
  Must(store().CompleteStep(l, "a", json::object{{"y", 2}}, std::string("b"), json::object{{"answer", 42}}),
       "CompleteStep");

  const RunRecord run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "succeeded");
  EXPECT_EQ(run.output, json::value(json::object{{"answer", 42}}));
  EXPECT_FALSE(run.error.has_value());
  EXPECT_EQ(Ms(run.finished_at), Ms(t_done));
  ASSERT_EQ(run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(run.steps[0].status), "succeeded");
  EXPECT_EQ(run.steps[0].output, json::value(json::object{{"y", 2}}));
  const auto events = Events(id);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events[events.size() - 2].type, "StepSucceeded");
  EXPECT_EQ(events.back().type, "RunSucceeded");

  // It left the queue: nothing to lease, ever; the lease is gone.
  EXPECT_FALSE(NextDue().has_value());
  EXPECT_TRUE(FailsWith(store().Heartbeat(l, kLeaseFor), ErrorCode::kLeaseLost));
  clock_.Advance(1h);
  EXPECT_FALSE(TryLease().has_value());
  const StoreStats stats = Stats();
  EXPECT_EQ(stats.runs_by_status.at(RunStatus::kSucceeded), 1);
  EXPECT_EQ(stats.queue_ready + stats.queue_leased + stats.queue_delayed, 0);
}

TEST_P(StoreConformance, CompleteStepOfAStepNotRunningConflicts) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  const size_t n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().CompleteStep(l, "a", json::object{}, std::nullopt, json::value(1)),
                        ErrorCode::kConflict));  // never started
  EXPECT_EQ(Events(id).size(), n_events);
  EXPECT_EQ(RunStatusName(Get(id).status), "running");  // and the run did not end

  Must(store().StartStep(l, "a"), "StartStep");
  Must(store().CompleteStep(l, "a", json::object{{"first", true}}, std::nullopt, std::nullopt), "CompleteStep");
  EXPECT_TRUE(FailsWith(store().CompleteStep(l, "a", json::object{{"second", true}}, std::nullopt, std::nullopt),
                        ErrorCode::kConflict));  // already succeeded
  EXPECT_EQ(Get(id).steps.at(0).output, json::value(json::object{{"first", true}}));

  Must(store().StartStep(l, "b"), "StartStep b");
  Must(store().FailStep(l, "b", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}), "FailStep");
  const Lease l2 = LeaseOnly(id);
  EXPECT_TRUE(FailsWith(store().CompleteStep(l2, "b", json::object{}, std::nullopt, json::value(1)),
                        ErrorCode::kConflict));  // retrying, not running
  EXPECT_EQ(StepStatusName(Get(id).steps.at(1).status), "retrying");
}

TEST_P(StoreConformance, ACheckpointedStepNeverStartsAgain) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep");
  Must(store().CompleteStep(l, "a", json::object{{"kept", true}}, std::nullopt, std::nullopt), "CompleteStep");
  EXPECT_TRUE(FailsWith(store().StartStep(l, "a"), ErrorCode::kConflict));
  // Naming it as the next step is refused too, and the whole call changes nothing.
  Must(store().StartStep(l, "b"), "StartStep b");
  EXPECT_TRUE(FailsWith(store().CompleteStep(l, "b", json::object{}, std::string("a"), std::nullopt),
                        ErrorCode::kConflict));
  const auto run = Get(id);
  EXPECT_EQ(StepStatusName(run.steps.at(0).status), "succeeded");
  EXPECT_EQ(run.steps.at(0).attempts, 1);
  EXPECT_EQ(run.steps.at(0).output, json::value(json::object{{"kept", true}}));
  EXPECT_EQ(StepStatusName(run.steps.at(1).status), "running");
}

TEST_P(StoreConformance, FailStepOfAStepNotRunningConflicts) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  EXPECT_TRUE(FailsWith(store().FailStep(l, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}),
                        ErrorCode::kConflict));  // never started
  Must(store().StartStep(l, "a"), "StartStep");
  Must(store().CompleteStep(l, "a", json::object{{"kept", true}}, std::nullopt, std::nullopt), "CompleteStep");
  EXPECT_TRUE(FailsWith(store().FailStep(l, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kDeadLetter}),
                        ErrorCode::kConflict));  // already succeeded
  const auto run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "running");
  EXPECT_EQ(StepStatusName(run.steps.at(0).status), "succeeded");
}

TEST_P(StoreConformance, SubmittingATakenRunIdConflicts) {
  NewRun r = MakeRun();
  Must(store().SubmitRun(r), "SubmitRun");
  r.input = json::object{{"other", true}};
  EXPECT_TRUE(FailsWith(store().SubmitRun(r), ErrorCode::kConflict));
  EXPECT_EQ(Get(r.id).input, json::value(json::object{{"n", runs_made_}}));
}

TEST_P(StoreConformance, FailStepRetryRequeuesAfterItsDelay) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep");
  clock_.Advance(1s);
  const Timestamp t_fail = clock_.Now();
  Must(store().FailStep(l, "a", Error(ErrorCode::kTimeout, "upstream timed out"), {Kind::kRetry, 5s}), "FailStep");

  const RunRecord run = Get(id);
  EXPECT_FALSE(IsTerminal(run.status));
  ASSERT_EQ(run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(run.steps[0].status), "retrying");
  EXPECT_EQ(run.steps[0].attempts, 1);
  ASSERT_TRUE(run.steps[0].error.has_value());
  EXPECT_EQ(run.steps[0].error->code, ErrorCode::kTimeout);
  EXPECT_EQ(run.steps[0].error->message, "upstream timed out");
  EXPECT_FALSE(run.steps[0].finished_at.has_value());

  const Event failed = Events(id).back();
  EXPECT_EQ(failed.type, "AttemptFailed");
  EXPECT_EQ(failed.step_id, "a");
  EXPECT_EQ(failed.attempt, 1);
  EXPECT_EQ(Ms(failed.at), Ms(t_fail));
  ASSERT_TRUE(failed.data.is_object() && failed.data.as_object().contains("error")) << failed.data;
  const Error logged = ErrorFromJson(failed.data.at("error"));
  EXPECT_EQ(logged.code, ErrorCode::kTimeout);
  EXPECT_EQ(logged.message, "upstream timed out");

  // The lease was given up; the run waits for its backoff.
  EXPECT_TRUE(FailsWith(store().Heartbeat(l, kLeaseFor), ErrorCode::kLeaseLost));
  EXPECT_EQ(Ms(NextDue()), Ms(t_fail + 5s));
  StoreStats stats = Stats();
  EXPECT_EQ(stats.queue_delayed, 1);
  EXPECT_EQ(stats.queue_ready, 0);
  EXPECT_EQ(stats.queue_leased, 0);
  clock_.Advance(5s - 1ms);
  EXPECT_FALSE(TryLease().has_value());
  clock_.Advance(1ms);
  const LeasedRun again = LeaseNext();
  EXPECT_EQ(again.run.id, id);
  EXPECT_EQ(again.lease.delivery, 2);
  EXPECT_EQ(RunStatusName(again.run.status), "running");
}

TEST_P(StoreConformance, FailStepFailEndsTheRunFailed) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep");
  clock_.Advance(2s);
  const Timestamp t_fail = clock_.Now();
  Must(store().FailStep(l, "a", Error(ErrorCode::kInvalidRequest, "bad prompt"), {Kind::kFail}), "FailStep");

  const RunRecord run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "failed");
  ASSERT_TRUE(run.error.has_value());
  EXPECT_EQ(run.error->code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(run.error->message, "bad prompt");
  EXPECT_TRUE(run.output.is_null());
  EXPECT_EQ(Ms(run.finished_at), Ms(t_fail));
  ASSERT_EQ(run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(run.steps[0].status), "failed");
  EXPECT_EQ(Ms(run.steps[0].finished_at), Ms(t_fail));
  ASSERT_TRUE(run.steps[0].error.has_value());
  EXPECT_EQ(run.steps[0].error->message, "bad prompt");
  const auto types = Types(Events(id));
  ASSERT_GE(types.size(), 2u);
  EXPECT_EQ(types[types.size() - 2], "AttemptFailed");
  EXPECT_EQ(types.back(), "RunFailed");

  EXPECT_TRUE(FailsWith(store().Heartbeat(l, kLeaseFor), ErrorCode::kLeaseLost));
  EXPECT_FALSE(NextDue().has_value());
  clock_.Advance(1h);
  EXPECT_FALSE(TryLease().has_value());
}

TEST_P(StoreConformance, FailStepDeadLetterKeepsTheErrorAndListsTheRun) {
  const std::string other = SucceededRun();
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep");
  Must(store().FailStep(l, "a", Error(ErrorCode::kServerError, "gave up after 3 attempts: 502"), {Kind::kDeadLetter}),
       "FailStep");

  auto check = [&] {
    const RunRecord run = Get(id);
    EXPECT_EQ(RunStatusName(run.status), "dead_lettered");
    ASSERT_TRUE(run.error.has_value());
    EXPECT_EQ(run.error->code, ErrorCode::kServerError);
    EXPECT_EQ(run.error->message, "gave up after 3 attempts: 502");
    EXPECT_TRUE(run.finished_at.has_value());
    ASSERT_EQ(run.steps.size(), 1u);
    EXPECT_EQ(StepStatusName(run.steps[0].status), "failed");
    EXPECT_EQ(Events(id).back().type, "RunDeadLettered");

    RunFilter dlq;
    dlq.status = RunStatus::kDeadLettered;
    const auto listed = ListAll(dlq);
    ASSERT_EQ(listed.size(), 1u);
    EXPECT_EQ(listed[0].id, id);
    ASSERT_TRUE(listed[0].error.has_value());
    EXPECT_EQ(listed[0].error->message, "gave up after 3 attempts: 502");
    RunFilter failed;
    failed.status = RunStatus::kFailed;
    EXPECT_TRUE(ListAll(failed).empty());
    EXPECT_FALSE(NextDue().has_value());
  };
  check();
  Reopen();
  check();
  (void)other;
}

TEST_P(StoreConformance, FailRunEndsTheRunFailed) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().FailRun(l, Error(ErrorCode::kInvalidRequest, "the definition cannot execute")), "FailRun");
  const RunRecord run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "failed");
  ASSERT_TRUE(run.error.has_value());
  EXPECT_EQ(run.error->code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(run.error->message, "the definition cannot execute");
  EXPECT_TRUE(run.finished_at.has_value());
  EXPECT_TRUE(run.steps.empty());
  EXPECT_EQ(Events(id).back().type, "RunFailed");
  EXPECT_TRUE(FailsWith(store().StartStep(l, "a"), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().FailRun(l, Error(ErrorCode::kInternal, "again")), ErrorCode::kLeaseLost));
  EXPECT_FALSE(NextDue().has_value());
}

// ---------------------------------------------------------------------------------------
// Cancel and redrive.

TEST_P(StoreConformance, CancelQueuedRun) {
  const std::string id = Submit();
  clock_.Advance(1s);
  const RunRecord cancelled = Must(store().CancelRun(id), "CancelRun");
  EXPECT_EQ(cancelled.id, id);
  EXPECT_EQ(RunStatusName(cancelled.status), "cancelled");
  EXPECT_EQ(Ms(cancelled.finished_at), Ms(clock_.Now()));
  EXPECT_EQ(RunStatusName(Get(id).status), "cancelled");
  EXPECT_EQ(Events(id).back().type, "RunCancelled");
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_FALSE(NextDue().has_value());
  EXPECT_TRUE(FailsWith(store().CancelRun(id), ErrorCode::kConflict));
}

TEST_P(StoreConformance, CancelLeasedRunTakesTheLeaseAway) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep");
  EXPECT_EQ(RunStatusName(Must(store().CancelRun(id), "CancelRun").status), "cancelled");

  const size_t n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().Heartbeat(l, kLeaseFor), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().StartStep(l, "b"), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().CompleteStep(l, "a", json::object{}, std::nullopt, json::value("late")),
                        ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().FailStep(l, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}),
                        ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().FailRun(l, Error(ErrorCode::kInternal, "x")), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().ReleaseLease(l), ErrorCode::kLeaseLost));
  EXPECT_EQ(Events(id).size(), n_events);
  const RunRecord run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "cancelled");
  EXPECT_TRUE(run.output.is_null());
  clock_.Advance(1h);
  EXPECT_FALSE(TryLease().has_value());
}

TEST_P(StoreConformance, CancelOfAnEndedRunConflicts) {
  const std::string succeeded = SucceededRun();
  const std::string failed = EndedRun(Kind::kFail);
  const std::string dead = EndedRun(Kind::kDeadLetter);
  const std::string cancelled = Submit();
  Must(store().CancelRun(cancelled), "CancelRun");
  for (const auto& [id, status] : std::vector<std::pair<std::string, std::string>>{
           {succeeded, "succeeded"}, {failed, "failed"}, {dead, "dead_lettered"}, {cancelled, "cancelled"}}) {
    EXPECT_TRUE(FailsWith(store().CancelRun(id), ErrorCode::kConflict)) << status;
    EXPECT_EQ(RunStatusName(Get(id).status), status);
  }
}

TEST_P(StoreConformance, RedriveKeepsSucceededStepsAndRestartsTheRest) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep a");
  Must(store().CompleteStep(l, "a", json::object{{"a", "out"}}, std::string("b"), std::nullopt), "CompleteStep a");
  Must(store().FailStep(l, "b", Error(ErrorCode::kRateLimited, "quota"), {Kind::kRetry, 0ms}), "FailStep b 1");
  const Lease l2 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l2, "b"), "StartStep b"), 2);
  Must(store().FailStep(l2, "b", Error(ErrorCode::kRateLimited, "quota"), {Kind::kDeadLetter}), "FailStep b 2");
  ASSERT_EQ(RunStatusName(Get(id).status), "dead_lettered");

  clock_.Advance(1min);
  const RunRecord redriven = Must(store().RedriveRun(id), "RedriveRun");
  auto check = [&](const RunRecord& run) {
    EXPECT_EQ(RunStatusName(run.status), "queued");
    EXPECT_FALSE(run.error.has_value());
    EXPECT_FALSE(run.finished_at.has_value());
    EXPECT_TRUE(run.output.is_null());
    ASSERT_EQ(run.steps.size(), 2u);
    EXPECT_EQ(run.steps[0].step_id, "a");
    EXPECT_EQ(StepStatusName(run.steps[0].status), "succeeded");
    EXPECT_EQ(run.steps[0].output, json::value(json::object{{"a", "out"}}));
    // The failed step starts afresh, its attempts kept for their numbering only.
    EXPECT_EQ(run.steps[1].step_id, "b");
    EXPECT_EQ(StepStatusName(run.steps[1].status), "retrying");
    EXPECT_EQ(run.steps[1].attempts, 2);
    EXPECT_EQ(run.steps[1].prior_attempts, 2);
    EXPECT_FALSE(run.steps[1].error.has_value());
    EXPECT_EQ(Ms(run.steps[1].started_at), -1);
  };
  check(redriven);
  check(Get(id));
  Reopen();
  check(Get(id));
  ExpectDueNow();

  const LeasedRun again = LeaseNext();
  ASSERT_EQ(again.run.id, id);
  ASSERT_EQ(again.run.steps.size(), 2u);
  EXPECT_EQ(again.run.steps[0].output, json::value(json::object{{"a", "out"}}));
  // Attempt 3: a new attempt (its own task, child run and timer), the first that counts.
  EXPECT_EQ(Must(store().StartStep(again.lease, "b"), "StartStep b afresh"), 3);
  EXPECT_EQ(Ms(Get(id).steps[1].started_at), Ms(clock_.Now()));
  Must(store().CompleteStep(again.lease, "b", json::object{{"b", "out"}}, std::nullopt, json::value("final")),
       "CompleteStep b");
  EXPECT_EQ(RunStatusName(Get(id).status), "succeeded");
  EXPECT_EQ(Get(id).output, json::value("final"));
  EXPECT_TRUE(FailsWith(store().RedriveRun(id), ErrorCode::kConflict));
  EXPECT_EQ(RunStatusName(Get(id).status), "succeeded");
}

TEST_P(StoreConformance, RedriveAcceptsFailedRunsOnly) {
  const std::string succeeded = SucceededRun();
  const std::string failed = EndedRun(Kind::kFail);
  const RunRecord redriven = Must(store().RedriveRun(failed), "RedriveRun failed");
  EXPECT_EQ(RunStatusName(redriven.status), "queued");
  ASSERT_EQ(redriven.steps.size(), 1u);  // the failed step starts afresh
  EXPECT_EQ(StepStatusName(redriven.steps[0].status), "retrying");
  EXPECT_EQ(redriven.steps[0].prior_attempts, 1);
  EXPECT_EQ(LeaseNext().run.id, failed);    // running now

  const std::string queued = Submit();
  const std::string cancelled = Submit();
  Must(store().CancelRun(cancelled), "CancelRun");
  for (const auto& id : {failed, queued, cancelled, succeeded}) {
    const auto before = Get(id);
    EXPECT_TRUE(FailsWith(store().RedriveRun(id), ErrorCode::kConflict)) << RunStatusName(before.status);
    EXPECT_EQ(RunStatusName(Get(id).status), RunStatusName(before.status));
  }
}

// ---------------------------------------------------------------------------------------
// Listing.

TEST_P(StoreConformance, ListRunsFiltersAndPagesNewestFirst) {
  std::vector<std::string> all;  // oldest first
  std::vector<std::string> alpha, beta;
  for (int i = 0; i < 9; ++i) {
    const std::string pipeline = i % 3 == 0 ? "beta" : "alpha";
    const std::string id = Submit(pipeline);
    all.push_back(id);
    (pipeline == "alpha" ? alpha : beta).push_back(id);
    clock_.Advance(1ms);
  }
  // Some states: cancel two (one per pipeline), run one with steps.
  Must(store().CancelRun(all[1]), "CancelRun");
  Must(store().CancelRun(all[3]), "CancelRun");
  const Lease l = LeaseOnly(all[0]);
  Must(store().StartStep(l, "a"), "StartStep");
  auto newest_first = [](std::vector<std::string> v) {
    std::reverse(v.begin(), v.end());
    return v;
  };

  const auto everything = ListAll({});
  EXPECT_EQ(Ids(everything), newest_first(all));
  for (const auto& r : everything) EXPECT_TRUE(r.steps.empty()) << r.id;  // lists carry no steps
  EXPECT_EQ(everything.back().pipeline, "beta");
  EXPECT_EQ(everything.back().input, Get(all[0]).input);

  RunFilter by_pipeline;
  by_pipeline.pipeline = "alpha";
  EXPECT_EQ(Ids(ListAll(by_pipeline)), newest_first(alpha));
  by_pipeline.pipeline = "nope";
  EXPECT_TRUE(ListAll(by_pipeline).empty());

  RunFilter by_status;
  by_status.status = RunStatus::kCancelled;
  EXPECT_EQ(Ids(ListAll(by_status)), (std::vector<std::string>{all[3], all[1]}));
  by_status.status = RunStatus::kRunning;
  EXPECT_EQ(Ids(ListAll(by_status)), (std::vector<std::string>{all[0]}));

  RunFilter both;
  both.status = RunStatus::kQueued;
  both.pipeline = "beta";
  EXPECT_EQ(Ids(ListAll(both)), (std::vector<std::string>{all[6]}));  // beta: 0 running, 3 cancelled, 6
  both.pipeline = "alpha";
  both.limit = 2;
  EXPECT_EQ(Ids(ListAll(both)), (std::vector<std::string>{all[8], all[7], all[5], all[4], all[2]}));

  // Pages of 4: 4, 4, 1; the cursor is opaque, the last page has none.
  RunFilter paged;
  paged.limit = 4;
  auto p1 = Must(store().ListRuns(paged), "ListRuns page 1");
  ASSERT_EQ(p1.runs.size(), 4u);
  ASSERT_FALSE(p1.next_cursor.empty());
  // A run submitted meanwhile is newer: it does not shift the later pages.
  const std::string newer = Submit();
  paged.cursor = p1.next_cursor;
  auto p2 = Must(store().ListRuns(paged), "ListRuns page 2");
  ASSERT_EQ(p2.runs.size(), 4u);
  ASSERT_FALSE(p2.next_cursor.empty());
  paged.cursor = p2.next_cursor;
  auto p3 = Must(store().ListRuns(paged), "ListRuns page 3");
  ASSERT_EQ(p3.runs.size(), 1u);
  EXPECT_TRUE(p3.next_cursor.empty());
  std::vector<std::string> visited = Ids(p1.runs);
  for (const auto& p : {p2, p3}) {
    for (const auto& r : p.runs) visited.push_back(r.id);
  }
  EXPECT_EQ(visited, newest_first(all));
  EXPECT_EQ(ListAll({}).front().id, newer);

  // An exact multiple of the page size ends without an empty extra page... or with one;
  // either way every run is visited once.
  RunFilter exact;
  exact.limit = 5;
  EXPECT_EQ(ListAll(exact).size(), all.size() + 1);
}

TEST_P(StoreConformance, ListEventsIsOrderedAndResumesAfterASeq) {
  const std::string id = Submit();
  clock_.Advance(1s);
  LeasedRun leased = LeaseNext();
  Must(store().StartStep(leased.lease, "a"), "StartStep a");
  clock_.Advance(1s);
  Must(store().CompleteStep(leased.lease, "a", json::object{}, std::string("b"), std::nullopt), "CompleteStep a");
  const std::string other = Submit();  // interleaves in the global log
  Must(store().CancelRun(other), "CancelRun other");  // (and must not be leased below)
  clock_.Advance(1s);
  Must(store().FailStep(leased.lease, "b", Error(ErrorCode::kOverloaded, "529"), {Kind::kRetry, 0ms}), "FailStep b");
  leased = LeaseNext();
  ASSERT_EQ(leased.run.id, id);
  Must(store().StartStep(leased.lease, "b"), "StartStep b");
  clock_.Advance(1s);
  Must(store().CompleteStep(leased.lease, "b", json::object{}, std::nullopt, json::value("out")), "CompleteStep b");

  const auto events = Events(id);
  EXPECT_EQ(Types(events), (std::vector<std::string>{"RunSubmitted", "RunLeased", "StepStarted", "StepSucceeded",
                                                     "StepStarted", "AttemptFailed", "RunLeased", "StepStarted",
                                                     "StepSucceeded", "RunSucceeded"}));
  for (std::size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].run_id, id);
    if (i > 0) {
      EXPECT_GT(events[i].seq, events[i - 1].seq);
      EXPECT_GE(Ms(events[i].at), Ms(events[i - 1].at));
    }
  }
  ASSERT_EQ(events.size(), 10u);
  EXPECT_EQ(events[2].step_id, "a");
  EXPECT_EQ(events[5].step_id, "b");
  EXPECT_EQ(events[5].attempt, 1);
  EXPECT_EQ(events[7].step_id, "b");
  EXPECT_EQ(events[7].attempt, 2);
  EXPECT_EQ(events[8].attempt, 2);

  // The seq is global: the other run's events sit between StepStarted(b) and the failure
  // of b.
  const auto other_events = Events(other);
  EXPECT_EQ(Types(other_events), (std::vector<std::string>{"RunSubmitted", "RunCancelled"}));
  ASSERT_EQ(other_events.size(), 2u);
  EXPECT_GT(other_events.front().seq, events[4].seq);
  EXPECT_LT(other_events.back().seq, events[5].seq);

  // after_seq and limit.
  const auto tail = Events(id, events[3].seq);
  ASSERT_EQ(tail.size(), events.size() - 4);
  EXPECT_EQ(tail.front().seq, events[4].seq);
  EXPECT_TRUE(Events(id, events.back().seq).empty());
  const auto two = Events(id, 0, 2);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[1].seq, events[1].seq);
  std::vector<Event> paged;
  int64_t after = 0;
  for (int i = 0; i < 100; ++i) {
    const auto page = Events(id, after, 3);
    if (page.empty()) break;
    EXPECT_LE(page.size(), 3u);
    paged.insert(paged.end(), page.begin(), page.end());
    after = page.back().seq;
  }
  ExpectSameEvents(paged, events);
}

// ---------------------------------------------------------------------------------------
// Stats and the queue clock.

TEST_P(StoreConformance, GetStatsCountsRunsAndTheQueue) {
  {
    const StoreStats empty = Stats();
    // Every status is present, zeros included (the metrics gauges are set from this map:
    // a status left out would keep its last value).
    for (auto s : kAllRunStatuses) {
      ASSERT_EQ(empty.runs_by_status.count(s), 1u) << RunStatusName(s);
      EXPECT_EQ(empty.runs_by_status.at(s), 0) << RunStatusName(s);
    }
    EXPECT_EQ(empty.queue_ready + empty.queue_leased + empty.queue_delayed, 0);
  }
  SucceededRun();
  EndedRun(Kind::kFail);
  EndedRun(Kind::kDeadLetter);
  EndedRun(Kind::kDeadLetter);
  Must(store().CancelRun(Submit()), "CancelRun");
  const std::string delayed = Submit();
  {
    const Lease l = LeaseOnly(delayed);
    Must(store().StartStep(l, "a"), "StartStep");
    Must(store().FailStep(l, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 60s}), "FailStep");
  }
  const std::string leased = Submit();
  LeaseOnly(leased, 1h);
  const std::string expiring = Submit();
  LeaseOnly(expiring, 1s);
  const std::string queued = Submit();
  clock_.Advance(2s);

  auto count = [](const StoreStats& s, RunStatus st) {
    return s.runs_by_status.count(st) ? s.runs_by_status.at(st) : 0;
  };
  auto check = [&](int64_t ready, int64_t leased_n, int64_t delayed_n) {
    const StoreStats s = Stats();
    EXPECT_EQ(count(s, RunStatus::kSucceeded), 1);
    EXPECT_EQ(count(s, RunStatus::kFailed), 1);
    EXPECT_EQ(count(s, RunStatus::kDeadLettered), 2);
    EXPECT_EQ(count(s, RunStatus::kCancelled), 1);
    EXPECT_EQ(count(s, RunStatus::kWaiting), 0);
    // `queued` was never leased; `leased` is held. The others are in flight or waiting
    // to be retried: either of the two non-terminal states.
    EXPECT_GE(count(s, RunStatus::kQueued), 1);
    EXPECT_GE(count(s, RunStatus::kRunning), 1);
    EXPECT_EQ(count(s, RunStatus::kQueued) + count(s, RunStatus::kRunning), 4);
    EXPECT_EQ(s.queue_ready, ready);
    EXPECT_EQ(s.queue_leased, leased_n);
    EXPECT_EQ(s.queue_delayed, delayed_n);
  };
  check(/*ready: queued + expired lease*/ 2, /*leased*/ 1, /*delayed*/ 1);
  Reopen();
  check(2, 1, 1);
  clock_.Advance(1min);  // the backoff has passed; the 1 h lease holds
  check(3, 1, 0);
  (void)queued;
}

TEST_P(StoreConformance, NextDueAtTracksTheEarliestDueRun) {
  EXPECT_FALSE(NextDue().has_value());
  const Timestamp t0 = clock_.Now();
  const std::string a = Submit();
  EXPECT_EQ(Ms(NextDue()), Ms(t0));
  clock_.Advance(5s);
  ExpectDueNow();

  const Lease la = LeaseOnly(a, 30s);
  EXPECT_EQ(Ms(NextDue()), Ms(t0 + 35s));  // due again when the lease would expire
  const std::string b = Submit();
  ExpectDueNow();
  const Lease lb = LeaseOnly(b);
  Must(store().StartStep(lb, "a"), "StartStep");
  Must(store().FailStep(lb, "a", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 10s}), "FailStep");
  EXPECT_EQ(Ms(NextDue()), Ms(t0 + 15s));  // b's backoff ends before a's lease
  Must(store().StartStep(la, "a"), "StartStep");
  Must(store().CompleteStep(la, "a", json::object{}, std::nullopt, json::value(1)), "CompleteStep");
  EXPECT_EQ(Ms(NextDue()), Ms(t0 + 15s));
  Must(store().CancelRun(b), "CancelRun");
  EXPECT_FALSE(NextDue().has_value());
}

// ---------------------------------------------------------------------------------------
// Waiting runs: timers, signals, map items and child runs.

int64_t CountStatus(const StoreStats& s, RunStatus st) {
  return s.runs_by_status.count(st) ? s.runs_by_status.at(st) : 0;
}

TEST_P(StoreConformance, SuspendStepParksTheRunUntilItsWakeAt) {
  const std::string id = Submit();
  const Timestamp t_lease = clock_.Now();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "a"), "StartStep a");
  EXPECT_EQ(Must(store().CompleteStep(l, "a", json::object{{"a", 1}}, std::string("nap"), std::nullopt),
                 "CompleteStep a"),
            1);
  clock_.Advance(1s);
  const Timestamp t_park = clock_.Now();
  const Timestamp wake_at = t_park + 10min;
  const json::value waiting = json::object{{"kind", "sleep"}, {"step_id", "nap"}, {"until_ms", Ms(wake_at)}};
  Must(store().SuspendStep(l, "nap", wake_at, waiting), "SuspendStep");

  const RunRecord parked = Get(id);
  EXPECT_EQ(RunStatusName(parked.status), "waiting");
  EXPECT_EQ(parked.waiting, waiting);
  EXPECT_EQ(Ms(parked.updated_at), Ms(t_park));
  EXPECT_EQ(Ms(parked.started_at), Ms(t_lease));
  EXPECT_FALSE(parked.finished_at.has_value());
  EXPECT_TRUE(parked.output.is_null());
  ASSERT_EQ(parked.steps.size(), 2u);
  EXPECT_EQ(StepStatusName(parked.steps[0].status), "succeeded");
  EXPECT_EQ(parked.steps[1].step_id, "nap");
  EXPECT_EQ(StepStatusName(parked.steps[1].status), "waiting");
  EXPECT_EQ(parked.steps[1].attempts, 1);
  EXPECT_FALSE(parked.steps[1].finished_at.has_value());
  EXPECT_TRUE(parked.steps[1].output.is_null());
  const Event parked_event = Events(id).back();
  EXPECT_EQ(parked_event.type, "StepWaiting");
  EXPECT_EQ(parked_event.step_id, "nap");
  EXPECT_EQ(parked_event.attempt, 1);
  EXPECT_EQ(Ms(parked_event.at), Ms(t_park));

  // The lease was given up: every use of it is refused and changes nothing.
  const auto n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().Heartbeat(l, kLeaseFor), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().StartStep(l, "nap"), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().SuspendStep(l, "nap", std::nullopt, waiting), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().CompleteStep(l, "nap", json::object{}, std::nullopt, json::value(1)),
                        ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().CompleteItem(l, "nap", 0, json::value(1)), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().FailRun(l, Error(ErrorCode::kInternal, "x")), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().ReleaseLease(l), ErrorCode::kLeaseLost));
  EXPECT_EQ(Events(id).size(), n_events);
  ExpectSameRun(Get(id), parked);
  EXPECT_EQ(Get(id).waiting, waiting);

  // Not due before wake_at; due at it.
  EXPECT_EQ(Ms(NextDue()), Ms(wake_at));
  EXPECT_FALSE(TryLease().has_value());
  clock_.Advance(10min - 1ms);
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_EQ(RunStatusName(Get(id).status), "waiting");
  clock_.Advance(1ms);
  ExpectDueNow();
  const LeasedRun woken = LeaseNext("w2");
  EXPECT_EQ(woken.run.id, id);
  EXPECT_EQ(woken.lease.delivery, 2);
  EXPECT_EQ(RunStatusName(woken.run.status), "running");
  EXPECT_TRUE(woken.run.waiting.is_null());
  ASSERT_EQ(woken.run.steps.size(), 2u);
  EXPECT_EQ(StepStatusName(woken.run.steps[1].status), "waiting");
  EXPECT_EQ(woken.run.steps[1].attempts, 1);
  const RunRecord running = Get(id);
  EXPECT_EQ(RunStatusName(running.status), "running");
  EXPECT_TRUE(running.waiting.is_null());
  EXPECT_EQ(Ms(running.started_at), Ms(t_lease));  // the run started at its first lease
  // Parking gave the lease up; it did not expire.
  const auto types = Types(Events(id));
  EXPECT_EQ(std::count(types.begin(), types.end(), "LeaseExpired"), 0);

  // The parked attempt goes on: no new attempt is counted.
  EXPECT_EQ(Must(store().StartStep(woken.lease, "nap"), "StartStep after the wake"), 1);
  const RunRecord resumed = Get(id);
  ASSERT_EQ(resumed.steps.size(), 2u);
  EXPECT_EQ(StepStatusName(resumed.steps[1].status), "running");
  EXPECT_EQ(resumed.steps[1].attempts, 1);
  EXPECT_EQ(Events(id).back().attempt, 1);
  Must(store().CompleteStep(woken.lease, "nap", json::object{{"slept", true}}, std::nullopt, json::value("done")),
       "CompleteStep nap");
  const RunRecord done = Get(id);
  EXPECT_EQ(RunStatusName(done.status), "succeeded");
  EXPECT_TRUE(done.waiting.is_null());
  ASSERT_EQ(done.steps.size(), 2u);
  EXPECT_EQ(done.steps[1].attempts, 1);
  EXPECT_EQ(done.steps[1].output, json::value(json::object{{"slept", true}}));
}

TEST_P(StoreConformance, SuspendWithAWakeAtAlreadyPassedIsDueAtOnce) {
  const std::string id = ParkedRun(clock_.Now() - 1s, json::object{{"kind", "sleep"}});
  EXPECT_EQ(RunStatusName(Get(id).status), "waiting");
  ExpectDueNow();
  EXPECT_EQ(Stats().queue_ready, 1);
  const LeasedRun again = LeaseNext();
  EXPECT_EQ(again.run.id, id);
  EXPECT_EQ(Must(store().StartStep(again.lease, "wait"), "StartStep"), 1);
}

TEST_P(StoreConformance, WithoutWakeAtOnlyASignalWakesTheRun) {
  const json::value waiting = json::object{{"kind", "signal"}, {"signal", "approval"}};
  const std::string id = ParkedRun(std::nullopt, waiting, "approve");
  EXPECT_EQ(Get(id).waiting, waiting);
  EXPECT_TRUE(Get(id).signals.empty());
  EXPECT_TRUE(NothingDueWithin(24h));
  clock_.Advance(24h);
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_TRUE(NothingDueWithin(24h));
  clock_.Advance(24h * 365);
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_EQ(Stats().queue_ready, 0);
  EXPECT_EQ(RunStatusName(Get(id).status), "waiting");

  const Timestamp t_signal = clock_.Now();
  const json::value payload = json::object{{"approved", true}, {"by", "ana"}};
  const RunRecord signalled = Must(store().SendSignal(id, "approval", payload), "SendSignal");
  EXPECT_EQ(signalled.id, id);
  ASSERT_EQ(signalled.signals.size(), 1u);
  ASSERT_TRUE(signalled.signals.contains("approval"));
  EXPECT_EQ(signalled.signals.at("approval").at("payload"), payload);
  EXPECT_EQ(signalled.signals.at("approval").at("at_ms"), json::value(Ms(t_signal)));
  const Event event = Events(id).back();
  EXPECT_EQ(event.type, "SignalReceived");
  EXPECT_EQ(Ms(event.at), Ms(t_signal));
  EXPECT_EQ(Get(id).signals.at("approval").at("payload"), payload);

  // Due at once, though it has no timer.
  ExpectDueNow();
  EXPECT_EQ(Stats().queue_ready, 1);
  const LeasedRun woken = LeaseNext();
  EXPECT_EQ(woken.run.id, id);
  EXPECT_EQ(RunStatusName(woken.run.status), "running");
  EXPECT_TRUE(woken.run.waiting.is_null());
  ASSERT_TRUE(woken.run.signals.contains("approval"));
  EXPECT_EQ(woken.run.signals.at("approval").at("payload"), payload);
  EXPECT_EQ(Must(store().StartStep(woken.lease, "approve"), "StartStep"), 1);
}

TEST_P(StoreConformance, ASignalWakesAParkedRunBeforeItsWakeAtAndReplacesOneOfTheSameName) {
  const Timestamp far = clock_.Now() + 24h * 7;
  const std::string id = ParkedRun(far, json::object{{"kind", "signal"}, {"signal", "go"}});
  EXPECT_EQ(Ms(NextDue()), Ms(far));
  Must(store().SendSignal(id, "go", json::value(1)), "SendSignal go 1");
  ExpectDueNow();
  clock_.Advance(1s);
  const Timestamp t2 = clock_.Now();
  Must(store().SendSignal(id, "go", json::value(2)), "SendSignal go 2");
  const RunRecord got = Must(store().SendSignal(id, "other", json::array{"x"}), "SendSignal other");
  for (const RunRecord& run : {got, Get(id)}) {
    ASSERT_EQ(run.signals.size(), 2u);
    EXPECT_EQ(run.signals.at("go").at("payload"), json::value(2));
    EXPECT_EQ(run.signals.at("go").at("at_ms"), json::value(Ms(t2)));
    EXPECT_EQ(run.signals.at("other").at("payload"), json::value(json::array{"x"}));
  }
  const auto types = Types(Events(id));
  EXPECT_EQ(std::count(types.begin(), types.end(), "SignalReceived"), 3);

  // Due since the first signal: later ones do not push it back.
  EXPECT_EQ(Stats().queue_ready, 1);
  const LeasedRun woken = LeaseNext();
  EXPECT_EQ(woken.run.id, id);
  EXPECT_EQ(woken.run.signals.at("go").at("payload"), json::value(2));

  // A signal to a running run changes neither its status nor its lease.
  Must(store().SendSignal(id, "late", nullptr), "SendSignal late");
  EXPECT_EQ(RunStatusName(Get(id).status), "running");
  EXPECT_EQ(Get(id).signals.size(), 3u);
  EXPECT_FALSE(TryLease("w2").has_value());
  EXPECT_OK(store().Heartbeat(woken.lease, kLeaseFor));
  EXPECT_EQ(Must(store().StartStep(woken.lease, "wait"), "StartStep"), 1);
}

TEST_P(StoreConformance, ASignalWhileLeasedMakesTheNextSuspendDueAtOnce) {
  const json::value waiting = json::object{{"kind", "signal"}, {"signal", "approval"}};
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "approve"), "StartStep");
  // The signal arrives while the worker is about to park the run.
  const RunRecord signalled = Must(store().SendSignal(id, "approval", json::value("yes")), "SendSignal");
  EXPECT_EQ(RunStatusName(signalled.status), "running");
  EXPECT_FALSE(TryLease("w2").has_value());  // the lease holds
  EXPECT_OK(store().Heartbeat(l, kLeaseFor));
  Must(store().SuspendStep(l, "approve", clock_.Now() + 24h * 7, waiting), "SuspendStep with a far wake_at");
  EXPECT_EQ(RunStatusName(Get(id).status), "waiting");
  ExpectDueNow();
  const LeasedRun again = LeaseNext("w2");
  EXPECT_EQ(again.run.id, id);
  EXPECT_EQ(again.run.signals.at("approval").at("payload"), json::value("yes"));
  EXPECT_EQ(Must(store().StartStep(again.lease, "approve"), "StartStep"), 1);

  // The mark is used up: parked again, the run waits for its timer.
  Must(store().SuspendStep(again.lease, "approve", clock_.Now() + 1h, waiting), "SuspendStep again");
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_EQ(Ms(NextDue()), Ms(clock_.Now() + 1h));
  clock_.Advance(1h);
  const LeasedRun third = LeaseNext();
  EXPECT_EQ(third.run.id, id);

  // The same without a timer.
  const std::string other = Submit();
  const Lease lo = LeaseOnly(other);
  Must(store().StartStep(lo, "approve"), "StartStep other");
  Must(store().SendSignal(other, "approval", json::value("ok")), "SendSignal other");
  Must(store().SuspendStep(lo, "approve", std::nullopt, waiting), "SuspendStep other without wake_at");
  ExpectDueNow();
  EXPECT_EQ(LeaseNext().run.id, other);
}

TEST_P(StoreConformance, SendSignalToAnUnknownOrEndedRunIsRefused) {
  const std::string unknown = NewRunId(clock_.Now(), random_);
  EXPECT_TRUE(FailsWith(store().SendSignal(unknown, "x", json::value(1)), ErrorCode::kNotFound));

  // A parked run that is cancelled leaves the queue.
  const std::string parked = ParkedRun(std::nullopt, json::object{{"kind", "signal"}});
  const RunRecord cancelled = Must(store().CancelRun(parked), "CancelRun parked");
  EXPECT_EQ(RunStatusName(cancelled.status), "cancelled");
  EXPECT_FALSE(NextDue().has_value());
  EXPECT_EQ(CountStatus(Stats(), RunStatus::kWaiting), 0);

  const std::string succeeded = SucceededRun();
  const std::string failed = EndedRun(Kind::kFail);
  const std::string dead = EndedRun(Kind::kDeadLetter);
  for (const auto& [id, status] : std::vector<std::pair<std::string, std::string>>{
           {parked, "cancelled"}, {succeeded, "succeeded"}, {failed, "failed"}, {dead, "dead_lettered"}}) {
    SCOPED_TRACE(status);
    const auto n_events = Events(id).size();
    EXPECT_TRUE(FailsWith(store().SendSignal(id, "x", json::value(1)), ErrorCode::kConflict));
    EXPECT_EQ(RunStatusName(Get(id).status), status);
    EXPECT_TRUE(Get(id).signals.empty());
    EXPECT_EQ(Events(id).size(), n_events);
  }
  EXPECT_FALSE(NextDue().has_value());
  EXPECT_FALSE(TryLease().has_value());

  // A queued run takes a signal, stays queued, and hands it out with its lease.
  const std::string queued = Submit();
  const RunRecord q = Must(store().SendSignal(queued, "early", json::value(1)), "SendSignal queued");
  EXPECT_EQ(RunStatusName(q.status), "queued");
  const LeasedRun leased = LeaseNext();
  EXPECT_EQ(leased.run.id, queued);
  ASSERT_TRUE(leased.run.signals.contains("early"));
  EXPECT_EQ(leased.run.signals.at("early").at("payload"), json::value(1));
}

TEST_P(StoreConformance, WaitingRunsSurviveReopen) {
  const Timestamp t0 = clock_.Now();
  // sleeper: parked on a timer an hour away.
  const json::value sleep_waiting = json::object{{"kind", "sleep"}, {"until_ms", Ms(t0 + 1h)}};
  const std::string sleeper = ParkedRun(t0 + 1h, sleep_waiting, "nap");
  // approver: parked without a timer, then signalled: due, still waiting.
  const json::value signal_waiting = json::object{{"kind", "signal"}, {"signal", "approval"}};
  const std::string approver = ParkedRun(std::nullopt, signal_waiting, "approve");
  clock_.Advance(1s);
  const std::string marked = Submit();
  const Lease l_marked = LeaseOnly(marked, 1h);
  Must(store().StartStep(l_marked, "approve"), "StartStep marked");
  // marked: signalled while leased, not parked yet.
  Must(store().SendSignal(marked, "approval", json::object{{"who", "marked"}}), "SendSignal marked");
  Must(store().SendSignal(approver, "approval", json::object{{"who", "approver"}}), "SendSignal approver");

  const std::vector<std::string> ids{sleeper, approver, marked};
  std::vector<RunRecord> before;
  std::vector<std::vector<Event>> events_before;
  for (const auto& id : ids) {
    before.push_back(Get(id));
    events_before.push_back(Events(id));
  }
  const StoreStats stats_before = Stats();
  EXPECT_EQ(CountStatus(stats_before, RunStatus::kWaiting), 2);
  EXPECT_EQ(CountStatus(stats_before, RunStatus::kRunning), 1);

  Reopen();

  for (std::size_t i = 0; i < ids.size(); ++i) {
    SCOPED_TRACE(ids[i]);
    const RunRecord got = Get(ids[i]);
    ExpectSameRun(got, before[i]);
    EXPECT_EQ(got.waiting, before[i].waiting);
    EXPECT_EQ(json::value(got.signals), json::value(before[i].signals));
    ExpectSameEvents(Events(ids[i]), events_before[i]);
  }
  EXPECT_EQ(RunStatusName(Get(sleeper).status), "waiting");
  EXPECT_EQ(Get(sleeper).waiting, sleep_waiting);
  EXPECT_EQ(StepStatusName(Get(sleeper).steps.at(0).status), "waiting");
  EXPECT_EQ(RunStatusName(Get(approver).status), "waiting");
  EXPECT_EQ(Get(approver).waiting, signal_waiting);
  EXPECT_EQ(Get(approver).signals.at("approval").at("payload"), json::value(json::object{{"who", "approver"}}));
  EXPECT_EQ(Get(marked).signals.at("approval").at("payload"), json::value(json::object{{"who", "marked"}}));
  const StoreStats stats_after = Stats();
  EXPECT_EQ(stats_after.runs_by_status, stats_before.runs_by_status);
  EXPECT_EQ(stats_after.queue_ready, stats_before.queue_ready);
  EXPECT_EQ(stats_after.queue_leased, stats_before.queue_leased);
  EXPECT_EQ(stats_after.queue_delayed, stats_before.queue_delayed);

  // The mark set by the signal survived too: parking `marked` makes it due at once.
  clock_.Advance(1s);
  Must(store().SuspendStep(l_marked, "approve", t0 + 24h, signal_waiting), "SuspendStep marked after reopen");
  const LeasedRun first = LeaseNext();
  EXPECT_EQ(first.run.id, approver);  // due since its signal
  EXPECT_TRUE(first.run.waiting.is_null());
  EXPECT_EQ(Must(store().StartStep(first.lease, "approve"), "StartStep approver"), 1);
  Must(store().CompleteStep(first.lease, "approve", json::object{}, std::nullopt, json::value(1)), "CompleteStep");
  const LeasedRun second = LeaseNext();
  EXPECT_EQ(second.run.id, marked);
  EXPECT_EQ(Must(store().StartStep(second.lease, "approve"), "StartStep marked"), 1);
  Must(store().CompleteStep(second.lease, "approve", json::object{}, std::nullopt, json::value(2)), "CompleteStep");
  EXPECT_FALSE(TryLease().has_value());
  clock_.Set(t0 + 1h);
  const LeasedRun third = LeaseNext();
  EXPECT_EQ(third.run.id, sleeper);
  EXPECT_EQ(Must(store().StartStep(third.lease, "nap"), "StartStep sleeper"), 1);
}

TEST_P(StoreConformance, StartStepAfterAWakeKeepsTheAttemptAcrossRetries) {
  const std::string id = Submit();
  const Lease l1 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l1, "call"), "StartStep 1"), 1);
  Must(store().FailStep(l1, "call", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}), "FailStep 1");
  const Lease l2 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l2, "call"), "StartStep 2"), 2);
  const json::value waiting = json::object{{"kind", "task"}};
  Must(store().SuspendStep(l2, "call", clock_.Now() + 1min, waiting), "SuspendStep 1");
  clock_.Advance(1min);
  const Lease l3 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l3, "call"), "StartStep after the first wake"), 2);
  EXPECT_EQ(Get(id).steps.at(0).attempts, 2);
  // Parked twice: still the same attempt.
  Must(store().SuspendStep(l3, "call", clock_.Now() + 1min, waiting), "SuspendStep 2");
  EXPECT_EQ(Get(id).steps.at(0).attempts, 2);
  clock_.Advance(1min);
  const Lease l4 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l4, "call"), "StartStep after the second wake"), 2);
  // A failure after the wake fails that attempt; the retry is a new one.
  Must(store().FailStep(l4, "call", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}), "FailStep 2");
  const Lease l5 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l5, "call"), "StartStep 3"), 3);
  // An attempt interrupted by a lost lease (not parked) counts, as before.
  clock_.Advance(kLeaseFor);
  const Lease l6 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l6, "call"), "StartStep 4"), 4);

  std::vector<int> started;
  for (const auto& e : Events(id)) {
    if (e.type == "StepStarted") started.push_back(e.attempt);
  }
  EXPECT_EQ(started, (std::vector<int>{1, 2, 2, 2, 3, 4}));
  std::vector<int> parked;
  for (const auto& e : Events(id)) {
    if (e.type == "StepWaiting") parked.push_back(e.attempt);
  }
  EXPECT_EQ(parked, (std::vector<int>{2, 2}));
}

TEST_P(StoreConformance, SuspendStepRefusesAStepThatIsNotRunning) {
  const json::value waiting = json::object{{"kind", "sleep"}};
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  // Never started.
  EXPECT_TRUE(FailsWith(store().SuspendStep(l, "nope", std::nullopt, waiting), ErrorCode::kConflict));
  Must(store().StartStep(l, "a"), "StartStep a");
  Must(store().CompleteStep(l, "a", json::object{}, std::string("b"), std::nullopt), "CompleteStep a");
  // Succeeded.
  EXPECT_TRUE(FailsWith(store().SuspendStep(l, "a", clock_.Now() + 1min, waiting), ErrorCode::kConflict));
  // The refusals changed nothing: the run still runs under the same lease.
  auto check_running = [&] {
    const RunRecord run = Get(id);
    EXPECT_EQ(RunStatusName(run.status), "running");
    EXPECT_TRUE(run.waiting.is_null());
    ASSERT_EQ(run.steps.size(), 2u);
    EXPECT_EQ(StepStatusName(run.steps[0].status), "succeeded");
    EXPECT_EQ(StepStatusName(run.steps[1].status), "running");
    const auto types = Types(Events(id));
    EXPECT_EQ(std::count(types.begin(), types.end(), "StepWaiting"), 0);
  };
  check_running();
  EXPECT_OK(store().Heartbeat(l, kLeaseFor));
  EXPECT_FALSE(TryLease("w2").has_value());

  // Retrying (between attempts).
  Must(store().FailStep(l, "b", Error(ErrorCode::kTimeout, "t"), {Kind::kRetry, 0ms}), "FailStep b");
  const Lease l2 = LeaseOnly(id);
  EXPECT_TRUE(FailsWith(store().SuspendStep(l2, "b", std::nullopt, waiting), ErrorCode::kConflict));
  EXPECT_EQ(StepStatusName(Get(id).steps.at(1).status), "retrying");
  EXPECT_OK(store().Heartbeat(l2, kLeaseFor));

  // With an expired lease: kLeaseLost, and the step stays running.
  Must(store().StartStep(l2, "b"), "StartStep b");
  clock_.Advance(kLeaseFor);
  EXPECT_TRUE(FailsWith(store().SuspendStep(l2, "b", std::nullopt, waiting), ErrorCode::kLeaseLost));
  check_running();
}

TEST_P(StoreConformance, CompleteItemCheckpointsEachItemOnce) {
  EXPECT_EQ(ItemStepId("fanout", 0), "fanout#0");
  EXPECT_EQ(ItemStepId("fanout", 12), "fanout#12");

  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1min);
  Must(store().StartStep(l, "fanout"), "StartStep fanout");
  Must(store().CompleteItem(l, "fanout", 2, json::object{{"i", 2}}), "CompleteItem 2");
  Must(store().CompleteItem(l, "fanout", 0, json::value("zero")), "CompleteItem 0");
  Must(store().CompleteItem(l, "fanout", 12, json::array{1, 2}), "CompleteItem 12");
  // Completing an item again keeps its first output.
  clock_.Advance(1s);
  EXPECT_OK(store().CompleteItem(l, "fanout", 2, json::object{{"i", "again"}}));

  // The run holds its steps only: a map's items are counted on it and read in pages.
  auto items_of = [&](int64_t after, int limit, bool with_outputs) {
    return Must(store().ListItems(id, "fanout", after, limit, with_outputs), "ListItems");
  };
  auto check = [&](const RunRecord& run) {
    ASSERT_EQ(run.steps.size(), 1u);
    EXPECT_EQ(run.steps[0].step_id, "fanout");
    EXPECT_EQ(StepStatusName(run.steps[0].status), "running");
    EXPECT_EQ(run.steps[0].items, 3);
    const auto items = items_of(-1, 100, true);
    ASSERT_EQ(items.size(), 3u);  // in index order, whatever the order they finished in
    EXPECT_EQ(items[0].index, 0);
    EXPECT_EQ(items[0].output, json::value("zero"));
    EXPECT_EQ(items[1].index, 2);
    EXPECT_EQ(items[1].output, (json::object{{"i", 2}}));
    EXPECT_EQ(items[2].index, 12);
    EXPECT_EQ(items[2].output, (json::array{1, 2}));
  };
  check(Get(id));
  // Pages: after an index, at most `limit`; without outputs, the indexes alone.
  {
    const auto page = items_of(0, 1, true);
    ASSERT_EQ(page.size(), 1u);
    EXPECT_EQ(page[0].index, 2);
    const auto last = items_of(2, 1, false);
    ASSERT_EQ(last.size(), 1u);
    EXPECT_EQ(last[0].index, 12);
    EXPECT_TRUE(last[0].output.is_null());
    EXPECT_TRUE(items_of(12, 10, true).empty());
    EXPECT_TRUE(Must(store().ListItems(id, "other", -1, 10, true), "ListItems other").empty());
    EXPECT_TRUE(FailsWith(store().ListItems("run_nope", "fanout", -1, 10, true), ErrorCode::kNotFound));
  }
  // A checkpointed item never runs again.
  EXPECT_TRUE(FailsWith(store().StartStep(l, ItemStepId("fanout", 0)), ErrorCode::kConflict));
  Reopen();
  check(Get(id));

  auto has_item = [&](int64_t index) {
    for (const auto& item : items_of(-1, 100, false)) {
      if (item.index == index) return true;
    }
    return false;
  };
  // The lease is checked: with an expired lease nothing is recorded.
  clock_.Advance(1min);
  EXPECT_TRUE(FailsWith(store().CompleteItem(l, "fanout", 5, json::value(5)), ErrorCode::kLeaseLost));
  EXPECT_FALSE(has_item(5));
  const LeasedRun again = LeaseNext();
  ASSERT_EQ(again.run.id, id);
  check(again.run);  // LeaseRun counts the items too
  Must(store().CompleteItem(again.lease, "fanout", 5, json::value(5)), "CompleteItem 5");
  EXPECT_TRUE(has_item(5));
  EXPECT_EQ(items_of(2, 1, true).at(0).output, json::value(5));
  // A superseded lease.
  EXPECT_TRUE(FailsWith(store().CompleteItem(l, "fanout", 6, json::value(6)), ErrorCode::kLeaseLost));
  EXPECT_FALSE(has_item(6));
  // A cancelled run's lease.
  Must(store().CancelRun(id), "CancelRun");
  EXPECT_TRUE(FailsWith(store().CompleteItem(again.lease, "fanout", 7, json::value(7)), ErrorCode::kLeaseLost));
  EXPECT_FALSE(has_item(7));
  const RunRecord cancelled = Get(id);
  ASSERT_EQ(cancelled.steps.size(), 1u);
  EXPECT_EQ(cancelled.steps[0].items, 4);
}

// A map over many items: every one is listed once, in order, across pages.
TEST_P(StoreConformance, ListItemsPagesThroughAManyItemMap) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "fanout"), "StartStep fanout");
  constexpr int64_t kItems = 2500;
  for (int64_t i = kItems - 1; i >= 0; --i) {
    Must(store().CompleteItem(l, "fanout", i, json::object{{"i", i}}), "CompleteItem");
  }
  Must(store().StartStep(l, "after"), "StartStep after");  // a step after the items
  int64_t after = -1, seen = 0;
  while (true) {
    const auto page = Must(store().ListItems(id, "fanout", after, 1000, true), "ListItems");
    for (const auto& item : page) {
      ASSERT_EQ(item.index, seen);
      ASSERT_EQ(item.output, (json::object{{"i", seen}}));
      ++seen;
    }
    if (page.size() < 1000) break;
    after = page.back().index;
  }
  EXPECT_EQ(seen, kItems);
  const RunRecord run = Get(id);
  ASSERT_EQ(run.steps.size(), 2u);
  EXPECT_EQ(run.steps[0].items, kItems);
  EXPECT_EQ(run.steps[1].step_id, "after");
  EXPECT_EQ(run.steps[1].items, 0);
}

// An item whose execution was recorded (StartStep on its record id, e.g. to count its
// attempts) is checkpointed by CompleteItem like any other: CompleteItem succeeding means
// the item never runs again.
TEST_P(StoreConformance, CompleteItemCheckpointsAnItemWhoseAttemptWasStarted) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "fanout"), "StartStep fanout");
  EXPECT_EQ(Must(store().StartStep(l, ItemStepId("fanout", 1)), "StartStep item 1"), 1);
  Must(store().CompleteItem(l, "fanout", 1, json::value("one")), "CompleteItem 1");
  const auto items = Must(store().ListItems(id, "fanout", -1, 10, true), "ListItems");
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].index, 1);
  EXPECT_EQ(items[0].output, json::value("one"));
  const RunRecord run = Get(id);
  ASSERT_EQ(run.steps.size(), 1u);  // the item's record is an item now
  EXPECT_EQ(run.steps[0].items, 1);
  EXPECT_TRUE(FailsWith(store().StartStep(l, ItemStepId("fanout", 1)), ErrorCode::kConflict));
}

TEST_P(StoreConformance, AChildRunEndingWakesItsWaitingParent) {
  enum class End { kSucceed, kFailStep, kDeadLetter, kFailRun, kCancel };
  for (const End end : {End::kSucceed, End::kFailStep, End::kDeadLetter, End::kFailRun, End::kCancel}) {
    SCOPED_TRACE("end #" + std::to_string(static_cast<int>(end)));
    const std::string parent = Submit("parent");
    const Lease lp = LeaseOnly(parent);
    Must(store().StartStep(lp, "sub"), "StartStep sub");
    NewRun child = MakeRun("child");
    child.parent = parent + "/sub";
    EXPECT_TRUE(Must(store().SubmitRun(child), "SubmitRun child").created);
    EXPECT_EQ(Get(child.id).parent, child.parent);
    EXPECT_EQ(Get(parent).parent, "");
    const json::value waiting = json::object{{"kind", "child_run"}, {"run_id", child.id}};
    Must(store().SuspendStep(lp, "sub", std::nullopt, waiting), "SuspendStep parent");

    const Lease lc = LeaseOnly(child.id);  // the parent is not due
    Must(store().StartStep(lc, "a"), "StartStep child");
    EXPECT_FALSE(TryLease().has_value());
    switch (end) {
      case End::kSucceed:
        Must(store().CompleteStep(lc, "a", json::object{}, std::nullopt, json::value("child out")), "CompleteStep");
        break;
      case End::kFailStep:
        Must(store().FailStep(lc, "a", Error(ErrorCode::kInvalidRequest, "no"), {Kind::kFail}), "FailStep");
        break;
      case End::kDeadLetter:
        Must(store().FailStep(lc, "a", Error(ErrorCode::kServerError, "502"), {Kind::kDeadLetter}), "FailStep");
        break;
      case End::kFailRun:
        Must(store().FailRun(lc, Error(ErrorCode::kInvalidRequest, "cannot execute")), "FailRun");
        break;
      case End::kCancel:
        Must(store().CancelRun(child.id), "CancelRun child");
        break;
    }
    EXPECT_TRUE(IsTerminal(Get(child.id).status));
    EXPECT_EQ(RunStatusName(Get(parent).status), "waiting");
    ExpectDueNow();
    const LeasedRun woken = LeaseNext();
    EXPECT_EQ(woken.run.id, parent);
    EXPECT_TRUE(woken.run.waiting.is_null());
    EXPECT_EQ(Must(store().StartStep(woken.lease, "sub"), "StartStep sub after the wake"), 1);
    Must(store().CompleteStep(woken.lease, "sub", json::object{}, std::nullopt, json::value("parent out")),
         "CompleteStep parent");
    EXPECT_FALSE(NextDue().has_value());
  }
}

TEST_P(StoreConformance, AChildRunEndingWhileItsParentIsLeasedMarksTheParent) {
  const std::string parent = Submit("parent");
  const Lease lp = LeaseOnly(parent, 1h);
  Must(store().StartStep(lp, "sub"), "StartStep sub");
  NewRun child = MakeRun("child");
  child.parent = parent + "/sub";
  Must(store().SubmitRun(child), "SubmitRun child");
  const Lease lc = LeaseOnly(child.id);
  Must(store().StartStep(lc, "a"), "StartStep child");
  Must(store().CompleteStep(lc, "a", json::object{}, std::nullopt, json::value("child out")), "CompleteStep child");
  // The parent keeps running under its lease...
  EXPECT_EQ(RunStatusName(Get(parent).status), "running");
  EXPECT_FALSE(TryLease("w2").has_value());
  EXPECT_OK(store().Heartbeat(lp, 1h));
  // ...and parking it, even on a far timer, makes it due at once.
  Must(store().SuspendStep(lp, "sub", clock_.Now() + 24h, json::object{{"kind", "child_run"}}), "SuspendStep");
  ExpectDueNow();
  const LeasedRun woken = LeaseNext("w2");
  EXPECT_EQ(woken.run.id, parent);
  EXPECT_EQ(Must(store().StartStep(woken.lease, "sub"), "StartStep sub"), 1);
  Must(store().CompleteStep(woken.lease, "sub", json::object{}, std::nullopt, json::value("done")), "CompleteStep");

  // A child of an ended parent, or of an unknown run, ends as usual and wakes nobody.
  for (const std::string& parent_ref : {parent + "/sub", std::string("no-such-run/sub")}) {
    SCOPED_TRACE(parent_ref);
    NewRun orphan = MakeRun("child");
    orphan.parent = parent_ref;
    Must(store().SubmitRun(orphan), "SubmitRun orphan");
    const Lease lo = LeaseOnly(orphan.id);
    Must(store().StartStep(lo, "a"), "StartStep orphan");
    Must(store().CompleteStep(lo, "a", json::object{}, std::nullopt, json::value(1)), "CompleteStep orphan");
    EXPECT_EQ(RunStatusName(Get(orphan.id).status), "succeeded");
    EXPECT_EQ(RunStatusName(Get(parent).status), "succeeded");
    EXPECT_FALSE(NextDue().has_value());
    EXPECT_FALSE(TryLease().has_value());
  }
}

TEST_P(StoreConformance, GetStatsAndNextDueAtWithParkedRuns) {
  const std::string never = ParkedRun(std::nullopt, json::object{{"kind", "signal"}, {"signal", "go"}});
  {
    const StoreStats s = Stats();
    EXPECT_EQ(CountStatus(s, RunStatus::kWaiting), 1);
    EXPECT_EQ(CountStatus(s, RunStatus::kRunning), 0);
    EXPECT_EQ(CountStatus(s, RunStatus::kQueued), 0);
    EXPECT_EQ(s.queue_ready, 0);
    EXPECT_EQ(s.queue_leased, 0);
    // Parked: in the queue, neither ready nor leased.
    EXPECT_EQ(s.queue_delayed, 1);
  }
  // A run parked without a timer is never due by itself.
  EXPECT_TRUE(NothingDueWithin(24h * 365));
  clock_.Advance(24h * 30);
  EXPECT_TRUE(NothingDueWithin(24h * 365));
  EXPECT_FALSE(TryLease().has_value());
  RunFilter by_status;
  by_status.status = RunStatus::kWaiting;
  EXPECT_EQ(Ids(ListAll(by_status)), (std::vector<std::string>{never}));

  const Timestamp wake = clock_.Now() + 5min;
  const std::string timer = ParkedRun(wake, json::object{{"kind", "sleep"}});
  EXPECT_EQ(Ms(NextDue()), Ms(wake));  // the timer, not "never"
  {
    const StoreStats s = Stats();
    EXPECT_EQ(CountStatus(s, RunStatus::kWaiting), 2);
    EXPECT_EQ(s.queue_ready, 0);
    EXPECT_EQ(s.queue_leased, 0);
    EXPECT_EQ(s.queue_delayed, 2);
  }
  EXPECT_EQ(Ids(ListAll(by_status)), (std::vector<std::string>{timer, never}));

  const std::string queued = Submit();
  ExpectDueNow();
  EXPECT_EQ(Stats().queue_ready, 1);
  const Lease lq = LeaseOnly(queued);
  Must(store().StartStep(lq, "a"), "StartStep");
  Must(store().CompleteStep(lq, "a", json::object{}, std::nullopt, json::value(1)), "CompleteStep");
  EXPECT_EQ(Ms(NextDue()), Ms(wake));
  Reopen();
  EXPECT_EQ(Ms(NextDue()), Ms(wake));
  EXPECT_EQ(CountStatus(Stats(), RunStatus::kWaiting), 2);

  clock_.Set(wake);
  ExpectDueNow();
  {
    const StoreStats s = Stats();
    EXPECT_EQ(s.queue_ready, 1);
    EXPECT_EQ(s.queue_delayed, 1);
  }
  const LeasedRun woken = LeaseNext();
  EXPECT_EQ(woken.run.id, timer);
  {
    const StoreStats s = Stats();
    EXPECT_EQ(CountStatus(s, RunStatus::kWaiting), 1);
    EXPECT_EQ(CountStatus(s, RunStatus::kRunning), 1);
    EXPECT_EQ(s.queue_ready, 0);
    EXPECT_EQ(s.queue_leased, 1);
    EXPECT_EQ(s.queue_delayed, 1);
  }
  // The lease is what comes due next; the parked run still is not.
  EXPECT_EQ(Ms(NextDue()), Ms(clock_.Now() + kLeaseFor));

  Must(store().SendSignal(never, "go", json::value(true)), "SendSignal");
  ExpectDueNow();
  {
    const StoreStats s = Stats();
    EXPECT_EQ(s.queue_ready, 1);
    EXPECT_EQ(s.queue_delayed, 0);
  }
  EXPECT_EQ(LeaseNext().run.id, never);
}

// The run SubmitRun returns is the run GetRun returns, its parent included.
TEST_P(StoreConformance, SubmitRunReturnsTheParentOfAChildRun) {
  NewRun child = MakeRun("child");
  child.parent = "run-parent/sub";
  child.idempotency_key = "child:run-parent/sub";
  child.fingerprint = child.idempotency_key;
  const SubmitResult created = Must(store().SubmitRun(child), "SubmitRun child");
  EXPECT_TRUE(created.created);
  EXPECT_EQ(created.run.parent, "run-parent/sub");
  EXPECT_EQ(Get(child.id).parent, "run-parent/sub");
  // As the replay of its idempotency key does.
  NewRun replay = child;
  replay.id = NewRunId(clock_.Now(), random_);
  const SubmitResult replayed = Must(store().SubmitRun(replay), "SubmitRun replay");
  EXPECT_FALSE(replayed.created);
  EXPECT_EQ(replayed.run.id, child.id);
  EXPECT_EQ(replayed.run.parent, "run-parent/sub");
}

// RunRecord::waiting says what a waiting run waits for; only steps are left out of lists.
TEST_P(StoreConformance, ListedRunsCarryWaitingSignalsAndParent) {
  const json::value waiting = json::object{{"kind", "signal"}, {"signal", "approval"}};
  const std::string parent = Submit("parent");
  const Lease lp = LeaseOnly(parent);
  Must(store().StartStep(lp, "sub"), "StartStep");
  Must(store().SendSignal(parent, "note", json::value("n")), "SendSignal");
  NewRun child = MakeRun("child");
  child.parent = parent + "/sub";
  Must(store().SubmitRun(child), "SubmitRun child");
  Must(store().SuspendStep(lp, "sub", clock_.Now() + 1h, waiting), "SuspendStep");

  RunFilter by_status;
  by_status.status = RunStatus::kWaiting;
  const auto listed = ListAll(by_status);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].id, parent);
  EXPECT_EQ(listed[0].waiting, waiting);
  EXPECT_TRUE(listed[0].signals.contains("note"));
  RunFilter children;
  children.pipeline = "child";
  const auto listed_children = ListAll(children);
  ASSERT_EQ(listed_children.size(), 1u);
  EXPECT_EQ(listed_children[0].parent, child.parent);
}

// ---------------------------------------------------------------------------------------
// Durability.

TEST_P(StoreConformance, EverythingSurvivesReopen) {
  // r1: step a checkpointed, step b in flight under a valid lease.
  const std::string r1 = Submit("durable");
  const Timestamp t0 = clock_.Now();
  const Lease l1 = LeaseOnly(r1, 1min);
  Must(store().StartStep(l1, "a"), "StartStep");
  Must(store().CompleteStep(l1, "a", json::parse(R"({"text":"checkpointed","n":[1,2]})"), std::string("b"),
                            std::nullopt),
       "CompleteStep");
  // r2: dead-lettered with its error.
  const std::string r2 = Submit("durable");
  {
    const Lease l = LeaseOnly(r2);
    Must(store().StartStep(l, "a"), "StartStep");
    Must(store().FailStep(l, "a", Error(ErrorCode::kAuth, "bad key"), {Kind::kDeadLetter}), "FailStep");
  }
  // r3: backing off for 30 s.
  const std::string r3 = Submit("durable");
  {
    const Lease l = LeaseOnly(r3);
    Must(store().StartStep(l, "a"), "StartStep");
    Must(store().FailStep(l, "a", Error(ErrorCode::kTimeout, "slow"), {Kind::kRetry, 30s}), "FailStep");
  }
  // r4: queued, submitted with an idempotency key.
  NewRun n4 = MakeRun("durable");
  n4.idempotency_key = "durable-key";
  n4.fingerprint = "fp";
  Must(store().SubmitRun(n4), "SubmitRun");
  const std::string r4 = n4.id;

  std::vector<RunRecord> runs_before;
  std::vector<std::vector<Event>> events_before;
  for (const auto& id : {r1, r2, r3, r4}) {
    runs_before.push_back(Get(id));
    events_before.push_back(Events(id));
  }
  const StoreStats stats_before = Stats();
  const auto next_before = NextDue();

  Reopen();

  int i = 0;
  for (const auto& id : {r1, r2, r3, r4}) {
    SCOPED_TRACE(id);
    ExpectSameRun(Get(id), runs_before[i]);
    ExpectSameEvents(Events(id), events_before[i]);
    ++i;
  }
  const StoreStats stats_after = Stats();
  EXPECT_EQ(stats_after.runs_by_status, stats_before.runs_by_status);
  EXPECT_EQ(stats_after.queue_ready, stats_before.queue_ready);
  EXPECT_EQ(stats_after.queue_leased, stats_before.queue_leased);
  EXPECT_EQ(stats_after.queue_delayed, stats_before.queue_delayed);
  EXPECT_EQ(Ms(NextDue()), Ms(next_before));
  EXPECT_EQ(Get(r1).steps.at(0).output, json::parse(R"({"text":"checkpointed","n":[1,2]})"));

  // The idempotency key still dedups and still guards its body.
  NewRun replay = MakeRun("durable");
  replay.idempotency_key = "durable-key";
  replay.fingerprint = "fp";
  auto again = Must(store().SubmitRun(replay), "SubmitRun replay");
  EXPECT_FALSE(again.created);
  EXPECT_EQ(again.run.id, r4);
  replay.fingerprint = "other";
  EXPECT_TRUE(FailsWith(store().SubmitRun(replay), ErrorCode::kConflict));

  // The queue: r4 is the only run due; r1's lease is still held, r3 still backs off.
  EXPECT_EQ(LeaseNext("w2", 1h).run.id, r4);
  EXPECT_FALSE(TryLease("w2").has_value());
  // r1's lease survived the restart and still works.
  EXPECT_EQ(Ms(Must(store().Heartbeat(l1, 1min), "Heartbeat after reopen")), Ms(clock_.Now() + 1min));
  EXPECT_EQ(Must(store().CompleteStep(l1, "b", json::object{}, std::nullopt, json::value("done")), "CompleteStep"),
            0);
  // r3's backoff ends on time, with the delivery count kept.
  clock_.Advance(30s);
  const LeasedRun r3_again = LeaseNext("w2");
  EXPECT_EQ(r3_again.run.id, r3);
  EXPECT_EQ(r3_again.lease.delivery, 2);
  EXPECT_EQ(Ms(r3_again.run.created_at), Ms(t0));

  // And what happened after the reopen survives the next one.
  Reopen();
  EXPECT_EQ(RunStatusName(Get(r1).status), "succeeded");
  EXPECT_EQ(Get(r1).output, json::value("done"));
  EXPECT_EQ(RunStatusName(Get(r2).status), "dead_lettered");
  EXPECT_EQ(Get(r2).error.value_or(Error()).message, "bad key");
  EXPECT_FALSE(TryLease("w3").has_value());  // r3 and r4 are leased
}

TEST_P(StoreConformance, ALeasedRunStaysLeasedAcrossReopenUntilItsLeaseExpires) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 20s);
  Must(store().StartStep(l, "a"), "StartStep");
  Reopen();
  EXPECT_FALSE(TryLease("w2").has_value());
  EXPECT_EQ(Stats().queue_leased, 1);
  clock_.Advance(20s);
  Reopen();
  const LeasedRun again = LeaseNext("w2");
  EXPECT_EQ(again.run.id, id);
  EXPECT_EQ(again.lease.delivery, 2);
  ASSERT_EQ(again.run.steps.size(), 1u);
  EXPECT_EQ(again.run.steps[0].attempts, 1);
  EXPECT_TRUE(FailsWith(store().StartStep(l, "a"), ErrorCode::kLeaseLost));
}

// ---------------------------------------------------------------------------------------
// Concurrency.

TEST_P(StoreConformance, ConcurrentSubmitsAllCommitAndConflictsDoNotSpoilTheirBatch) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 200;
  std::vector<std::vector<std::string>> ids(kThreads);
  std::atomic<int> failures{0};
  std::atomic<int> conflicts{0};
  std::vector<std::string> errors(kThreads);
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPerThread; ++i) {
          NewRun r;
          r.id = NewRunId(clock_.Now(), random_);
          r.pipeline = "p" + std::to_string(t % 2);
          r.input = json::object{{"thread", t}, {"i", i}};
          r.definition = json::object{{"steps", json::array{"a"}}};
          if (i % 10 == 0) {
            r.idempotency_key = "k-" + std::to_string(t) + "-" + std::to_string(i);
            r.fingerprint = "body";
          }
          auto res = store().SubmitRun(r);
          if (!res.ok() || !res->created || res->run.id != r.id) {
            ++failures;
            if (!res.ok()) errors[t] = Describe(res.error());
            continue;
          }
          ids[t].push_back(r.id);
          if (!r.idempotency_key.empty()) {
            // A failing write in the same batch as others must undo only itself.
            r.id = NewRunId(clock_.Now(), random_);
            r.fingerprint = "another body";
            auto conflict = store().SubmitRun(r);
            if (!conflict.ok() && conflict.error().code == ErrorCode::kConflict) ++conflicts;
          }
        }
      });
    }
    for (auto& th : threads) th.join();
  }
  EXPECT_EQ(failures.load(), 0) << errors[0] << errors[1];
  EXPECT_EQ(conflicts.load(), kThreads * kPerThread / 10);

  std::set<std::string> submitted;
  for (const auto& v : ids) submitted.insert(v.begin(), v.end());
  ASSERT_EQ(submitted.size(), static_cast<size_t>(kThreads * kPerThread));
  auto check_listed = [&] {
    RunFilter f;
    f.limit = 300;
    const auto listed = ListAll(f);
    std::set<std::string> unique;
    for (const auto& r : listed) unique.insert(r.id);
    EXPECT_EQ(listed.size(), submitted.size());  // each exactly once
    EXPECT_EQ(unique, submitted);
    EXPECT_EQ(Stats().runs_by_status.at(RunStatus::kQueued), kThreads * kPerThread);
    EXPECT_EQ(Stats().queue_ready, kThreads * kPerThread);
  };
  check_listed();
  Reopen();
  check_listed();
  RunFilter p0;
  p0.pipeline = "p0";
  p0.limit = 1000;
  EXPECT_EQ(ListAll(p0).size(), static_cast<size_t>(kThreads / 2 * kPerThread));
}

TEST_P(StoreConformance, ConcurrentSubmitsWithOneKeyCreateOneRun) {
  constexpr int kThreads = 8;
  std::vector<std::optional<SubmitResult>> results(kThreads);
  std::vector<std::optional<ErrorCode>> codes(kThreads);
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        NewRun r;
        r.id = NewRunId(clock_.Now(), random_);
        r.pipeline = "p";
        r.input = json::object{{"t", t}};
        r.definition = json::object{};
        r.idempotency_key = "shared";
        r.fingerprint = t < kThreads / 2 ? "A" : "B";
        auto res = store().SubmitRun(r);
        if (res.ok()) results[t] = std::move(res).value();
        else codes[t] = res.error().code;
      });
    }
    for (auto& th : threads) th.join();
  }
  int created = 0;
  std::set<std::string> run_ids;
  std::set<bool> winning_group;
  for (int t = 0; t < kThreads; ++t) {
    if (results[t]) {
      created += results[t]->created;
      run_ids.insert(results[t]->run.id);
      winning_group.insert(t < kThreads / 2);
    } else {
      EXPECT_EQ(codes[t], ErrorCode::kConflict) << "thread " << t;
    }
  }
  EXPECT_EQ(created, 1);
  EXPECT_EQ(run_ids.size(), 1u);
  // The fingerprint of the run created wins: its group all get the run, the other group
  // all get kConflict.
  ASSERT_EQ(winning_group.size(), 1u);
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(results[t].has_value(), (t < kThreads / 2) == *winning_group.begin()) << "thread " << t;
  }
  EXPECT_EQ(ListAll({}).size(), 1u);
}

TEST_P(StoreConformance, ConcurrentSubmitsRespectTheQueueDepth) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 25;
  constexpr int kDepth = 60;
  std::atomic<int> created{0}, full{0}, other{0};
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPerThread; ++i) {
          NewRun r;
          r.id = NewRunId(clock_.Now(), random_);
          r.pipeline = "p";
          r.input = json::object{{"t", t}, {"i", i}};
          r.definition = json::object{};
          r.max_queue_depth = kDepth;
          auto res = store().SubmitRun(r);
          if (res.ok()) ++created;
          else if (res.error().code == ErrorCode::kQueueFull) ++full;
          else ++other;
        }
      });
    }
    for (auto& th : threads) th.join();
  }
  EXPECT_EQ(created.load(), kDepth);
  EXPECT_EQ(full.load(), kThreads * kPerThread - kDepth);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(ListAll({}).size(), static_cast<size_t>(kDepth));
}

TEST_P(StoreConformance, ConcurrentLeasersLeaseEachRunExactlyOnce) {
  constexpr int kRuns = 500;
  constexpr int kSubmitters = 10;
  constexpr int kLeasers = 8;
  std::set<std::string> submitted;
  {
    std::vector<std::vector<std::string>> ids(kSubmitters);
    std::vector<std::thread> threads;
    for (int t = 0; t < kSubmitters; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kRuns / kSubmitters; ++i) {
          NewRun r;
          r.id = NewRunId(clock_.Now(), random_);
          r.pipeline = "p";
          r.input = json::object{{"i", i}};
          r.definition = json::object{};
          if (store().SubmitRun(r).ok()) ids[t].push_back(r.id);
        }
      });
    }
    for (auto& th : threads) th.join();
    for (const auto& v : ids) submitted.insert(v.begin(), v.end());
  }
  ASSERT_EQ(submitted.size(), static_cast<size_t>(kRuns));

  std::vector<std::vector<LeasedRun>> leased(kLeasers);
  std::atomic<int> errors{0};
  std::atomic<int> total{0};  // bounds the loop should a store hand runs out forever
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < kLeasers; ++t) {
      threads.emplace_back([&, t] {
        const std::string worker = "worker-" + std::to_string(t);
        while (true) {
          auto r = store().LeaseRun(worker, 1h);
          if (!r.ok()) {
            if (++errors > 100) return;
            continue;
          }
          if (!r->has_value() || ++total > 2 * kRuns) return;
          leased[t].push_back(std::move(**r));
        }
      });
    }
    for (auto& th : threads) th.join();
  }
  EXPECT_EQ(errors.load(), 0);
  std::vector<std::string> all;
  std::set<std::string> tokens;
  for (const auto& v : leased) {
    for (const auto& l : v) {
      all.push_back(l.run.id);
      tokens.insert(l.lease.token);
      EXPECT_EQ(l.lease.delivery, 1) << l.run.id;
      EXPECT_EQ(l.lease.run_id, l.run.id);
    }
  }
  EXPECT_EQ(all.size(), static_cast<size_t>(kRuns));  // no run handed out twice
  EXPECT_EQ(std::set<std::string>(all.begin(), all.end()), submitted);
  EXPECT_EQ(tokens.size(), all.size());
  const StoreStats stats = Stats();
  EXPECT_EQ(stats.queue_leased, kRuns);
  EXPECT_EQ(stats.queue_ready, 0);
  EXPECT_EQ(stats.runs_by_status.at(RunStatus::kRunning), kRuns);
  // Every lease is valid: each holder can use its own.
  for (const auto& v : leased) {
    if (!v.empty()) EXPECT_OK(store().Heartbeat(v.front().lease, 1h));
  }
}

// ---------------------------------------------------------------------------------------
// Tasks for external workers.

int64_t CountType(const std::vector<Event>& events, std::string_view type) {
  return std::count_if(events.begin(), events.end(),
                       [&](const Event& e) { return e.type == type; });
}

void ExpectSameTask(const TaskRecord& got, const TaskRecord& want) {
  EXPECT_EQ(got.token, want.token);
  EXPECT_EQ(got.run_id, want.run_id);
  EXPECT_EQ(got.step_id, want.step_id);
  EXPECT_EQ(got.attempt, want.attempt);
  EXPECT_EQ(got.queue, want.queue);
  EXPECT_EQ(got.input, want.input);
  EXPECT_EQ(TaskStatusName(got.status), TaskStatusName(want.status));
  EXPECT_EQ(got.worker_id, want.worker_id);
  EXPECT_EQ(Ms(got.lease_expires), Ms(want.lease_expires));
  EXPECT_EQ(got.heartbeat_timeout.count(), want.heartbeat_timeout.count());
  EXPECT_EQ(got.output, want.output);
  ExpectSameError(got.error, want.error);
  EXPECT_EQ(got.retryable, want.retryable);
  EXPECT_EQ(Ms(got.created_at), Ms(want.created_at));
}

// The task of `t`'s step and attempt as the store has it now, read through EnsureTask
// under `lease` (there is no other way to read a task); it must return the existing task,
// whatever its arguments say, never queue another.
TaskRecord Look(Store& store, const Lease& lease, const TaskRecord& t) {
  TaskRecord got = Must(store.EnsureTask(lease, t.step_id, t.attempt, "look-" + t.queue,
                                         json::object{{"look", true}}, 1ms),
                        "EnsureTask (look) " + t.step_id);
  if (got.token != t.token)
    throw std::runtime_error("EnsureTask queued another task for " + t.step_id);
  return got;
}

// The task LeaseTask hands out; it must hand one out.
TaskRecord MustLeaseTask(Store& store, const std::string& queue, const std::string& worker) {
  auto t = Must(store.LeaseTask(queue, worker), "LeaseTask " + queue);
  if (!t) throw std::runtime_error("LeaseTask " + queue + " handed out nothing");
  return std::move(*t);
}

const json::value kTaskWaiting = json::object{{"kind", "task"}, {"step_id", "job"}};

TEST_P(StoreConformance, EnsureTaskQueuesOnePendingTaskPerAttempt) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  ASSERT_EQ(Must(store().StartStep(l, "job"), "StartStep"), 1);
  clock_.Advance(1s);
  const Timestamp t_queued = clock_.Now();
  const json::value input =
      json::object{{"text", "hi"}, {"n", 3}, {"list", json::array{1, "two", nullptr}}};
  const TaskRecord t = Must(store().EnsureTask(l, "job", 1, "gpu", input, 20s), "EnsureTask");
  EXPECT_FALSE(t.token.empty());
  EXPECT_EQ(t.run_id, id);
  EXPECT_EQ(t.step_id, "job");
  EXPECT_EQ(t.attempt, 1);
  EXPECT_EQ(t.queue, "gpu");
  EXPECT_EQ(t.input, input);
  EXPECT_EQ(TaskStatusName(t.status), "pending");
  EXPECT_TRUE(t.worker_id.empty());
  EXPECT_FALSE(t.lease_expires.has_value());
  EXPECT_EQ(t.heartbeat_timeout.count(), 20000);
  EXPECT_TRUE(t.output.is_null());
  EXPECT_FALSE(t.error.has_value());
  EXPECT_EQ(Ms(t.created_at), Ms(t_queued));
  const auto events = Events(id);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().type, "TaskQueued");
  EXPECT_EQ(events.back().step_id, "job");
  EXPECT_EQ(events.back().attempt, 1);
  EXPECT_EQ(Ms(events.back().at), Ms(t_queued));
  EXPECT_EQ(CountType(events, "TaskQueued"), 1);

  // Asked again (the run woke): the same task, whatever the arguments say now.
  clock_.Advance(5s);
  ExpectSameTask(Must(store().EnsureTask(l, "job", 1, "cpu", json::object{{"other", true}}, 99s),
                      "EnsureTask again"),
                 t);
  EXPECT_EQ(Events(id).size(), events.size());

  // The next attempt has a task of its own, and so has another step.
  const Timestamp t_second = clock_.Now();
  const TaskRecord second =
      Must(store().EnsureTask(l, "job", 2, "gpu", input, 20s), "EnsureTask attempt 2");
  EXPECT_NE(second.token, t.token);
  EXPECT_EQ(second.attempt, 2);
  EXPECT_EQ(TaskStatusName(second.status), "pending");
  EXPECT_EQ(Ms(second.created_at), Ms(t_second));
  const TaskRecord other =
      Must(store().EnsureTask(l, "other", 1, "gpu", input, 20s), "EnsureTask other");
  EXPECT_EQ(other.step_id, "other");
  EXPECT_EQ(other.attempt, 1);
  EXPECT_EQ(std::set<std::string>({t.token, second.token, other.token}).size(), 3u);
  const auto after = Events(id);
  EXPECT_EQ(CountType(after, "TaskQueued"), 3);
  EXPECT_EQ(after.back().step_id, "other");

  // Another run's attempt 1 of "job" has another token: tokens do not follow from the key.
  const std::string id2 = Submit();
  const Lease l2 = LeaseOnly(id2, 1h);
  const TaskRecord theirs =
      Must(store().EnsureTask(l2, "job", 1, "gpu", input, 20s), "EnsureTask run 2");
  EXPECT_EQ(theirs.run_id, id2);
  EXPECT_NE(theirs.token, t.token);
  EXPECT_NE(theirs.token, second.token);
  ExpectSameTask(Look(store(), l, t), t);
  EXPECT_EQ(CountType(Events(id2), "TaskQueued"), 1);
}

TEST_P(StoreConformance, EnsureTaskNeedsTheRunsLease) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 10s);
  const TaskRecord t =
      Must(store().EnsureTask(l, "job", 1, "q", json::object{}, 30s), "EnsureTask");
  const json::value in = json::object{{"late", true}};

  clock_.Advance(10s);  // the run's lease expired
  const auto n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().EnsureTask(l, "job", 2, "q", in, 30s), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().EnsureTask(l, "job", 1, "q", in, 30s),
                        ErrorCode::kLeaseLost));  // even an existing one
  EXPECT_EQ(Events(id).size(), n_events);

  const LeasedRun second = LeaseNext("w2", 1h);  // supersedes `l`
  ASSERT_EQ(second.run.id, id);
  EXPECT_TRUE(FailsWith(store().EnsureTask(l, "job", 2, "q", in, 30s), ErrorCode::kLeaseLost));
  Must(store().ReleaseLease(second.lease), "ReleaseLease");
  EXPECT_TRUE(
      FailsWith(store().EnsureTask(second.lease, "job", 2, "q", in, 30s), ErrorCode::kLeaseLost));

  // None of the refused calls queued anything: attempt 1's task is the only one.
  const auto events = Events(id);
  EXPECT_EQ(CountType(events, "TaskQueued"), 1);
  EXPECT_EQ(MustLeaseTask(store(), "q", "w").token, t.token);
  EXPECT_FALSE(Must(store().LeaseTask("q", "w"), "LeaseTask").has_value());

  // A cancelled run's lease is no lease.
  const LeasedRun third = LeaseNext("w3", 1h);
  ASSERT_EQ(third.run.id, id);
  Must(store().CancelRun(id), "CancelRun");
  EXPECT_TRUE(
      FailsWith(store().EnsureTask(third.lease, "job", 2, "q", in, 30s), ErrorCode::kLeaseLost));
  EXPECT_EQ(CountType(Events(id), "TaskQueued"), 1);
  EXPECT_FALSE(Must(store().LeaseTask("q", "w"), "LeaseTask").has_value());
}

TEST_P(StoreConformance, LeaseTaskHandsOutTheOldestPendingTaskOfItsQueueOnly) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  const TaskRecord a =
      Must(store().EnsureTask(l, "a", 1, "q", json::object{{"n", 1}}, 20s), "EnsureTask a");
  clock_.Advance(1s);
  const TaskRecord b =
      Must(store().EnsureTask(l, "b", 1, "other", json::object{{"n", 2}}, 20s), "EnsureTask b");
  clock_.Advance(1s);
  const TaskRecord c =
      Must(store().EnsureTask(l, "c", 1, "q", json::object{{"n", 3}}, 45s), "EnsureTask c");
  clock_.Advance(1s);
  const TaskRecord d =
      Must(store().EnsureTask(l, "d", 1, "q", json::object{{"n", 4}}, 5s), "EnsureTask d");
  clock_.Advance(1s);
  EXPECT_FALSE(Must(store().LeaseTask("none", "w0"), "LeaseTask none").has_value());

  const Timestamp t1 = clock_.Now();
  const TaskRecord first = MustLeaseTask(store(), "q", "w1");
  EXPECT_EQ(first.token, a.token);
  EXPECT_EQ(first.run_id, id);
  EXPECT_EQ(first.step_id, "a");
  EXPECT_EQ(first.attempt, 1);
  EXPECT_EQ(first.queue, "q");
  EXPECT_EQ(first.input, json::value(json::object{{"n", 1}}));
  EXPECT_EQ(TaskStatusName(first.status), "leased");
  EXPECT_EQ(first.worker_id, "w1");
  EXPECT_EQ(Ms(first.lease_expires), Ms(t1 + 20s));
  EXPECT_EQ(first.heartbeat_timeout.count(), 20000);
  EXPECT_EQ(Ms(first.created_at), Ms(a.created_at));
  EXPECT_TRUE(first.output.is_null());
  EXPECT_FALSE(first.error.has_value());
  const Event leased_event = Events(id).back();
  EXPECT_EQ(leased_event.type, "TaskLeased");
  EXPECT_EQ(leased_event.step_id, "a");
  EXPECT_EQ(leased_event.attempt, 1);
  EXPECT_EQ(Ms(leased_event.at), Ms(t1));
  // The store keeps what it handed out; the other tasks are untouched.
  ExpectSameTask(Look(store(), l, a), first);
  ExpectSameTask(Look(store(), l, b), b);
  ExpectSameTask(Look(store(), l, c), c);
  ExpectSameTask(Look(store(), l, d), d);

  clock_.Advance(1s);
  const Timestamp t2 = clock_.Now();
  const TaskRecord second = MustLeaseTask(store(), "q", "w2");
  EXPECT_EQ(second.token, c.token);
  EXPECT_EQ(second.worker_id, "w2");
  EXPECT_EQ(Ms(second.lease_expires), Ms(t2 + 45s));  // its own heartbeat timeout
  const TaskRecord third = MustLeaseTask(store(), "q", "w3");
  EXPECT_EQ(third.token, d.token);
  EXPECT_EQ(Ms(third.lease_expires), Ms(t2 + 5s));
  // Leased tasks are not handed out again; the other queue still has its task.
  EXPECT_FALSE(Must(store().LeaseTask("q", "w4"), "LeaseTask q").has_value());
  ExpectSameTask(Look(store(), l, b), b);
  const TaskRecord fourth = MustLeaseTask(store(), "other", "w4");
  EXPECT_EQ(fourth.token, b.token);
  EXPECT_EQ(fourth.worker_id, "w4");
  EXPECT_EQ(Ms(fourth.lease_expires), Ms(t2 + 20s));
  EXPECT_FALSE(Must(store().LeaseTask("other", "w5"), "LeaseTask other").has_value());
  EXPECT_EQ(CountType(Events(id), "TaskLeased"), 4);
  ExpectSameTask(Look(store(), l, a), first);  // leasing the others left the first alone
}

TEST_P(StoreConformance, LeaseTaskWakesTheRun) {
  // Parked without a timer on its pending task: the lease makes the run due at once.
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "job"), "StartStep");
  const TaskRecord t =
      Must(store().EnsureTask(l, "job", 1, "q", json::object{}, 30s), "EnsureTask");
  Must(store().SuspendStep(l, "job", std::nullopt, kTaskWaiting), "SuspendStep");
  EXPECT_TRUE(NothingDueWithin(24h));
  clock_.Advance(1h);
  EXPECT_FALSE(TryLease().has_value());
  EXPECT_EQ(MustLeaseTask(store(), "q", "worker").token, t.token);
  ExpectDueNow();
  EXPECT_EQ(Stats().queue_ready, 1);
  const LeasedRun woken = LeaseNext("w2");
  EXPECT_EQ(woken.run.id, id);
  EXPECT_EQ(RunStatusName(woken.run.status), "running");
  EXPECT_EQ(Must(store().StartStep(woken.lease, "job"), "StartStep after the wake"), 1);
  EXPECT_EQ(TaskStatusName(Look(store(), woken.lease, t).status), "leased");

  // Parked on a far timer: the lease of its task makes it due before it.
  const std::string timed = Submit();
  const Lease lt = LeaseOnly(timed);
  Must(store().StartStep(lt, "job"), "StartStep timed");
  const TaskRecord tt =
      Must(store().EnsureTask(lt, "job", 1, "q2", json::object{}, 30s), "EnsureTask timed");
  const Timestamp far = clock_.Now() + 24h * 7;
  Must(store().SuspendStep(lt, "job", far, kTaskWaiting), "SuspendStep timed");
  EXPECT_EQ(Ms(NextDue()), Ms(woken.lease.expires_at));  // only the leased run is in view
  EXPECT_EQ(MustLeaseTask(store(), "q2", "worker").token, tt.token);
  ExpectDueNow();
  EXPECT_EQ(LeaseNext("w3").run.id, timed);

  // Leased while its run is leased: the run keeps its lease, and parking it next makes it
  // due at once.
  const TaskRecord t2 =
      Must(store().EnsureTask(woken.lease, "job", 2, "q", json::object{}, 30s), "EnsureTask 2");
  EXPECT_EQ(MustLeaseTask(store(), "q", "worker").token, t2.token);
  EXPECT_EQ(RunStatusName(Get(id).status), "running");
  EXPECT_FALSE(TryLease("w4").has_value());
  EXPECT_OK(store().Heartbeat(woken.lease, kLeaseFor));
  Must(store().SuspendStep(woken.lease, "job", clock_.Now() + 24h * 7, kTaskWaiting),
       "SuspendStep with a far wake_at");
  EXPECT_EQ(RunStatusName(Get(id).status), "waiting");
  ExpectDueNow();
  EXPECT_EQ(LeaseNext("w4").run.id, id);
}

TEST_P(StoreConformance, HeartbeatTaskExtendsTheTaskLease) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  const TaskRecord t =
      Must(store().EnsureTask(l, "job", 1, "q", json::object{}, 20s), "EnsureTask");
  EXPECT_TRUE(
      FailsWith(store().HeartbeatTask(t.token), ErrorCode::kConflict));  // pending: nobody holds it
  ExpectSameTask(Look(store(), l, t), t);

  const Timestamp t1 = clock_.Now();
  const TaskRecord leased = MustLeaseTask(store(), "q", "w1");
  ASSERT_EQ(leased.token, t.token);
  EXPECT_EQ(Ms(leased.lease_expires), Ms(t1 + 20s));
  clock_.Advance(15s);
  const TaskRecord beat = Must(store().HeartbeatTask(t.token), "HeartbeatTask");
  EXPECT_EQ(beat.token, t.token);
  EXPECT_EQ(TaskStatusName(beat.status), "leased");
  EXPECT_EQ(beat.worker_id, "w1");
  EXPECT_EQ(Ms(beat.lease_expires), Ms(t1 + 35s));
  ExpectSameTask(Look(store(), l, t), beat);

  clock_.Advance(20s - 1ms);  // past the first expiry, 1 ms before the new one
  const TaskRecord beat2 = Must(store().HeartbeatTask(t.token), "HeartbeatTask 2");
  EXPECT_EQ(Ms(beat2.lease_expires), Ms(t1 + 55s - 1ms));

  clock_.Advance(20s);  // expired by the store's clock
  const auto n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(t.token), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(t.token), ErrorCode::kConflict));  // it stays expired
  ExpectSameTask(Look(store(), l, t), beat2);
  EXPECT_EQ(Events(id).size(), n_events);

  EXPECT_TRUE(FailsWith(store().HeartbeatTask("no-such-token"), ErrorCode::kNotFound));
}

TEST_P(StoreConformance, CompleteTaskKeepsTheOutputAndWakesTheRun) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "job"), "StartStep");
  const TaskRecord t =
      Must(store().EnsureTask(l, "job", 1, "q", json::object{{"n", 41}}, 30s), "EnsureTask");
  const auto n_pending = Events(id).size();
  EXPECT_TRUE(FailsWith(store().CompleteTask(t.token, json::value(1)),
                        ErrorCode::kConflict));  // nobody holds it
  EXPECT_EQ(Events(id).size(), n_pending);
  ExpectSameTask(Look(store(), l, t), t);
  Must(store().SuspendStep(l, "job", std::nullopt, kTaskWaiting), "SuspendStep");
  const TaskRecord leased = MustLeaseTask(store(), "q", "w1");
  ASSERT_EQ(leased.token, t.token);
  // The lease woke the run: take it and park it again, so that only the completion wakes it.
  const LeasedRun r2 = LeaseNext("r2");
  ASSERT_EQ(r2.run.id, id);
  EXPECT_EQ(Must(store().StartStep(r2.lease, "job"), "StartStep 2"), 1);
  Must(store().SuspendStep(r2.lease, "job", std::nullopt, kTaskWaiting), "SuspendStep 2");
  EXPECT_TRUE(NothingDueWithin(24h));

  clock_.Advance(10s);
  const Timestamp t_done = clock_.Now();
  const json::value output = json::object{{"answer", 42}, {"list", json::array{1, 2}}};
  const TaskRecord done = Must(store().CompleteTask(t.token, output), "CompleteTask");
  EXPECT_EQ(done.token, t.token);
  EXPECT_EQ(done.run_id, id);
  EXPECT_EQ(done.step_id, "job");
  EXPECT_EQ(done.attempt, 1);
  EXPECT_EQ(TaskStatusName(done.status), "completed");
  EXPECT_EQ(done.output, output);
  EXPECT_FALSE(done.error.has_value());
  EXPECT_EQ(done.worker_id, "w1");
  EXPECT_FALSE(done.lease_expires.has_value());  // only while leased
  EXPECT_EQ(done.input, json::value(json::object{{"n", 41}}));
  const Event event = Events(id).back();
  EXPECT_EQ(event.type, "TaskCompleted");
  EXPECT_EQ(event.step_id, "job");
  EXPECT_EQ(event.attempt, 1);
  EXPECT_EQ(Ms(event.at), Ms(t_done));

  // The run is due at once and finds the output.
  ExpectDueNow();
  const LeasedRun r3 = LeaseNext("r3");
  ASSERT_EQ(r3.run.id, id);
  ExpectSameTask(Look(store(), r3.lease, t), done);

  // It ended: every later call is refused and changes nothing.
  const auto n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().CompleteTask(t.token, json::value("again")), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().FailTask(t.token, Error(ErrorCode::kServerError, "x"), false),
                        ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(t.token), ErrorCode::kConflict));
  EXPECT_EQ(Events(id).size(), n_events);
  ExpectSameTask(Look(store(), r3.lease, t), done);

  EXPECT_TRUE(
      FailsWith(store().CompleteTask("no-such-token", json::value(1)), ErrorCode::kNotFound));
  EXPECT_TRUE(
      FailsWith(store().FailTask("no-such-token", Error(ErrorCode::kServerError, "x"), true),
                ErrorCode::kNotFound));
}

TEST_P(StoreConformance, FailTaskKeepsTheErrorAndWakesTheRun) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id);
  Must(store().StartStep(l, "job"), "StartStep");
  const TaskRecord t =
      Must(store().EnsureTask(l, "job", 1, "q", json::object{}, 30s), "EnsureTask");
  EXPECT_TRUE(FailsWith(store().FailTask(t.token, Error(ErrorCode::kServerError, "x"), true),
                        ErrorCode::kConflict));
  ExpectSameTask(Look(store(), l, t), t);
  Must(store().SuspendStep(l, "job", clock_.Now() + 24h * 7, kTaskWaiting), "SuspendStep");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w1").token, t.token);
  const LeasedRun r2 = LeaseNext("r2");
  ASSERT_EQ(r2.run.id, id);
  Must(store().StartStep(r2.lease, "job"), "StartStep 2");
  Must(store().SuspendStep(r2.lease, "job", clock_.Now() + 24h * 7, kTaskWaiting), "SuspendStep 2");
  EXPECT_TRUE(NothingDueWithin(24h));

  clock_.Advance(3s);
  const Timestamp t_failed = clock_.Now();
  const Error error(ErrorCode::kInvalidRequest, "the input has no text");
  const TaskRecord failed = Must(store().FailTask(t.token, error, false), "FailTask");
  EXPECT_EQ(failed.token, t.token);
  EXPECT_EQ(TaskStatusName(failed.status), "failed");
  ExpectSameError(failed.error, error);
  EXPECT_FALSE(failed.retryable);
  EXPECT_TRUE(failed.output.is_null());
  EXPECT_FALSE(failed.lease_expires.has_value());
  EXPECT_EQ(failed.worker_id, "w1");
  const Event event = Events(id).back();
  EXPECT_EQ(event.type, "TaskFailed");
  EXPECT_EQ(event.step_id, "job");
  EXPECT_EQ(event.attempt, 1);
  EXPECT_EQ(Ms(event.at), Ms(t_failed));

  ExpectDueNow();
  const LeasedRun r3 = LeaseNext("r3");
  ASSERT_EQ(r3.run.id, id);
  ExpectSameTask(Look(store(), r3.lease, t), failed);
  const auto n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().CompleteTask(t.token, json::value(1)), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().FailTask(t.token, Error(ErrorCode::kTimeout, "again"), true),
                        ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(t.token), ErrorCode::kConflict));
  EXPECT_EQ(Events(id).size(), n_events);
  ExpectSameTask(Look(store(), r3.lease, t), failed);

  // A retryable failure says so.
  const TaskRecord t2 =
      Must(store().EnsureTask(r3.lease, "job", 2, "q", json::object{}, 30s), "EnsureTask 2");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w2").token, t2.token);
  const Error oom(ErrorCode::kServerError, "out of memory");
  const TaskRecord failed2 = Must(store().FailTask(t2.token, oom, true), "FailTask 2");
  EXPECT_EQ(TaskStatusName(failed2.status), "failed");
  EXPECT_TRUE(failed2.retryable);
  ExpectSameError(failed2.error, oom);
  ExpectSameTask(Look(store(), r3.lease, t2), failed2);
  ExpectSameTask(Look(store(), r3.lease, t), failed);
}

TEST_P(StoreConformance, AnAnswerAfterTheTaskLeaseExpiredConflictsAndChangesNothing) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  Must(store().StartStep(l, "job"), "StartStep");
  const TaskRecord t =
      Must(store().EnsureTask(l, "job", 1, "q", json::object{}, 10s), "EnsureTask");
  const Timestamp t1 = clock_.Now();
  const TaskRecord leased = MustLeaseTask(store(), "q", "w1");
  ASSERT_EQ(leased.token, t.token);
  EXPECT_EQ(Ms(leased.lease_expires), Ms(t1 + 10s));
  // LeaseTask marked the leased run: parking it makes it due; take it and park it again.
  Must(store().SuspendStep(l, "job", std::nullopt, kTaskWaiting), "SuspendStep");
  ExpectDueNow();
  const LeasedRun r2 = LeaseNext("r2", 1h);
  ASSERT_EQ(r2.run.id, id);
  Must(store().StartStep(r2.lease, "job"), "StartStep 2");

  clock_.Advance(10s);  // the task's lease expired: the worker sent no heartbeat
  const auto n_events = Events(id).size();
  EXPECT_TRUE(
      FailsWith(store().CompleteTask(t.token, json::object{{"late", true}}), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().FailTask(t.token, Error(ErrorCode::kServerError, "late"), false),
                        ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(t.token), ErrorCode::kConflict));
  EXPECT_EQ(Events(id).size(), n_events);
  const TaskRecord now = Look(store(), r2.lease, t);
  ExpectSameTask(now, leased);
  EXPECT_TRUE(now.output.is_null());
  EXPECT_FALSE(now.error.has_value());
  // Nor was the run woken (or marked): parked, nothing makes it due.
  Must(store().SuspendStep(r2.lease, "job", std::nullopt, kTaskWaiting), "SuspendStep 2");
  EXPECT_TRUE(NothingDueWithin(24h));
}

TEST_P(StoreConformance, ExpireTaskFailsALeasedOrPendingTaskAsARetryableTimeout) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  const TaskRecord held =
      Must(store().EnsureTask(l, "a", 1, "q", json::object{}, 10s), "EnsureTask a");
  const TaskRecord pending =
      Must(store().EnsureTask(l, "b", 1, "q2", json::object{}, 10s), "EnsureTask b");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w1").token, held.token);

  clock_.Advance(11s);  // the worker went quiet
  const Timestamp t_expired = clock_.Now();
  EXPECT_OK(store().ExpireTask(l, held.token));
  const TaskRecord h = Look(store(), l, held);
  EXPECT_EQ(TaskStatusName(h.status), "failed");
  ASSERT_TRUE(h.error.has_value());
  EXPECT_EQ(ErrorCodeName(h.error->code), ErrorCodeName(ErrorCode::kTimeout));
  EXPECT_TRUE(h.retryable);
  EXPECT_TRUE(h.output.is_null());
  EXPECT_FALSE(h.lease_expires.has_value());
  const Event event = Events(id).back();
  EXPECT_EQ(event.type, "TaskExpired");
  EXPECT_EQ(event.step_id, "a");
  EXPECT_EQ(event.attempt, 1);
  EXPECT_EQ(Ms(event.at), Ms(t_expired));

  // The late worker is refused and changes nothing.
  const auto n_events = Events(id).size();
  EXPECT_TRUE(
      FailsWith(store().CompleteTask(held.token, json::value("late")), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().FailTask(held.token, Error(ErrorCode::kServerError, "late"), false),
                        ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(held.token), ErrorCode::kConflict));
  EXPECT_EQ(Events(id).size(), n_events);
  ExpectSameTask(Look(store(), l, held), h);

  // A pending task: failed the same way, and no longer handed out.
  EXPECT_OK(store().ExpireTask(l, pending.token));
  const TaskRecord p = Look(store(), l, pending);
  EXPECT_EQ(TaskStatusName(p.status), "failed");
  ASSERT_TRUE(p.error.has_value());
  EXPECT_EQ(ErrorCodeName(p.error->code), ErrorCodeName(ErrorCode::kTimeout));
  EXPECT_TRUE(p.retryable);
  EXPECT_FALSE(Must(store().LeaseTask("q2", "w2"), "LeaseTask q2").has_value());
  EXPECT_EQ(CountType(Events(id), "TaskExpired"), 2);

  // A task whose worker still holds a valid lease (the step's own timeout ran out).
  const TaskRecord c = Must(store().EnsureTask(l, "c", 1, "q", json::object{}, 1h), "EnsureTask c");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w3").token, c.token);
  EXPECT_OK(store().ExpireTask(l, c.token));
  EXPECT_EQ(TaskStatusName(Look(store(), l, c).status), "failed");
  EXPECT_TRUE(FailsWith(store().CompleteTask(c.token, json::value(1)), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(c.token), ErrorCode::kConflict));
  EXPECT_EQ(TaskStatusName(Look(store(), l, c).status), "failed");
}

TEST_P(StoreConformance, ExpireTaskNeedsTheRunsLease) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 10s);
  const TaskRecord held =
      Must(store().EnsureTask(l, "a", 1, "q", json::object{}, 1h), "EnsureTask a");
  const TaskRecord pending =
      Must(store().EnsureTask(l, "b", 1, "q2", json::object{}, 1h), "EnsureTask b");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w1").token, held.token);

  clock_.Advance(10s);  // the run's lease expired
  const auto n_events = Events(id).size();
  EXPECT_TRUE(FailsWith(store().ExpireTask(l, held.token), ErrorCode::kLeaseLost));
  EXPECT_TRUE(FailsWith(store().ExpireTask(l, pending.token), ErrorCode::kLeaseLost));
  EXPECT_EQ(Events(id).size(), n_events);
  // Both tasks go on: the worker finishes its own; the pending one is handed out.
  EXPECT_OK(store().HeartbeatTask(held.token));
  EXPECT_EQ(TaskStatusName(
                Must(store().CompleteTask(held.token, json::value("ok")), "CompleteTask").status),
            "completed");
  const TaskRecord p = MustLeaseTask(store(), "q2", "w2");
  EXPECT_EQ(p.token, pending.token);

  // A superseded lease.
  const LeasedRun second = LeaseNext("r2", 1h);
  ASSERT_EQ(second.run.id, id);
  EXPECT_TRUE(FailsWith(store().ExpireTask(l, pending.token), ErrorCode::kLeaseLost));
  ExpectSameTask(Look(store(), second.lease, pending), p);

  // Another run's lease does not reach this run's tasks.
  const std::string other = Submit();
  const Lease lo = LeaseOnly(other, 1h);
  EXPECT_FALSE(store().ExpireTask(lo, pending.token).ok());
  ExpectSameTask(Look(store(), second.lease, pending), p);
  EXPECT_EQ(CountType(Events(id), "TaskExpired"), 0);
  EXPECT_EQ(CountType(Events(other), "TaskExpired"), 0);
  EXPECT_OK(store().CompleteTask(pending.token, json::value(2)));
}

TEST_P(StoreConformance, ExpireTaskLeavesAnEndedTaskAsItWas) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  const TaskRecord a =
      Must(store().EnsureTask(l, "a", 1, "q", json::object{}, 10s), "EnsureTask a");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w1").token, a.token);
  const TaskRecord done =
      Must(store().CompleteTask(a.token, json::object{{"ok", true}}), "CompleteTask");
  const TaskRecord b =
      Must(store().EnsureTask(l, "b", 1, "q", json::object{}, 10s), "EnsureTask b");
  ASSERT_EQ(MustLeaseTask(store(), "q", "w2").token, b.token);
  const TaskRecord failed =
      Must(store().FailTask(b.token, Error(ErrorCode::kInvalidRequest, "bad"), false), "FailTask");

  // The run's step timed out just as the workers answered: what ExpireTask returns is not
  // prescribed, but the answers stand and the log does not say the tasks expired.
  clock_.Advance(1min);
  (void)store().ExpireTask(l, a.token);
  (void)store().ExpireTask(l, b.token);
  ExpectSameTask(Look(store(), l, a), done);
  ExpectSameTask(Look(store(), l, b), failed);
  EXPECT_EQ(CountType(Events(id), "TaskExpired"), 0)
      << "a task that completed or failed is logged as expired";
}

TEST_P(StoreConformance, TasksSurviveReopen) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  const TaskRecord pending =
      Must(store().EnsureTask(l, "p", 1, "q", json::object{{"k", "p"}}, 20s), "EnsureTask p");
  clock_.Advance(1s);
  Must(store().EnsureTask(l, "h", 1, "q2", json::object{{"k", "h"}}, 20s), "EnsureTask h");
  const TaskRecord held = MustLeaseTask(store(), "q2", "w1");
  Must(store().EnsureTask(l, "d", 1, "q3", json::object{{"k", "d"}}, 20s), "EnsureTask d");
  const TaskRecord d = MustLeaseTask(store(), "q3", "w2");
  const TaskRecord done =
      Must(store().CompleteTask(d.token, json::object{{"answer", 42}}), "CompleteTask");
  Must(store().EnsureTask(l, "f", 1, "q4", json::object{{"k", "f"}}, 20s), "EnsureTask f");
  const TaskRecord f = MustLeaseTask(store(), "q4", "w3");
  const TaskRecord failed =
      Must(store().FailTask(f.token, Error(ErrorCode::kInvalidRequest, "no"), false), "FailTask");
  const auto events_before = Events(id);

  Reopen();

  ExpectSameTask(Look(store(), l, pending), pending);
  ExpectSameTask(Look(store(), l, held), held);
  ExpectSameTask(Look(store(), l, done), done);
  ExpectSameTask(Look(store(), l, failed), failed);
  ExpectSameEvents(Events(id), events_before);

  // They go on as before.
  clock_.Advance(19s);  // the held task's lease, taken 1 s after t0 for 20 s, has 1 s left
  const TaskRecord beat = Must(store().HeartbeatTask(held.token), "HeartbeatTask after reopen");
  EXPECT_EQ(Ms(beat.lease_expires), Ms(clock_.Now() + 20s));
  EXPECT_OK(store().CompleteTask(held.token, json::value("after reopen")));
  EXPECT_EQ(MustLeaseTask(store(), "q", "w4").token, pending.token);
  EXPECT_FALSE(Must(store().LeaseTask("q3", "w5"), "LeaseTask q3").has_value());
  EXPECT_TRUE(FailsWith(store().CompleteTask(done.token, json::value(1)), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().HeartbeatTask(failed.token), ErrorCode::kConflict));

  // A task lease keeps its expiry across a reopen.
  const TaskRecord again =
      Must(store().EnsureTask(l, "x", 1, "q5", json::object{}, 5s), "EnsureTask x");
  ASSERT_EQ(MustLeaseTask(store(), "q5", "w6").token, again.token);
  Reopen();
  clock_.Advance(5s);
  EXPECT_TRUE(FailsWith(store().CompleteTask(again.token, json::value(1)), ErrorCode::kConflict));
}

TEST_P(StoreConformance, WaitForTaskWaitsAboutMaxWhenNothingIsQueued) {
  const auto start = std::chrono::steady_clock::now();
  store().WaitForTask("q", 300ms);
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 280ms);
  EXPECT_LT(waited, 5s);
}

TEST_P(StoreConformance, WaitForTaskReturnsEarlyWhenATaskIsQueued) {
  const std::string id = Submit();
  const Lease l = LeaseOnly(id, 1h);
  std::atomic<bool> started{false};
  std::atomic<bool> returned{false};
  std::chrono::steady_clock::duration waited{};
  std::thread waiter([&] {
    started = true;
    const auto start = std::chrono::steady_clock::now();
    store().WaitForTask("q", 10s);
    waited = std::chrono::steady_clock::now() - start;
    returned = true;
  });
  while (!started) std::this_thread::yield();
  // Give the waiter time to begin its wait; should it not have begun before a task was
  // queued, another new task is queued every 500 ms (each a new attempt), a few times.
  int queued = 0;
  std::this_thread::sleep_for(100ms);
  for (int i = 0; i < 8 && !returned; ++i) {
    auto t = store().EnsureTask(l, "job", ++queued, "q", json::object{}, 30s);
    EXPECT_TRUE(t.ok() && TaskStatusName(t->status) == "pending");
    for (int j = 0; j < 50 && !returned; ++j) std::this_thread::sleep_for(10ms);
  }
  waiter.join();
  EXPECT_GE(queued, 1);
  EXPECT_LT(waited, 5s) << "WaitForTask(10s) took "
                        << std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()
                        << " ms";
  EXPECT_EQ(MustLeaseTask(store(), "q", "w").run_id, id);
}

// ---------------------------------------------------------------------------------------
// Records that cannot be read (docs/storage.md): data about one run, never an outage.

// Values keel's codec refuses: a number beyond a double (Boost.JSON alone reads it as
// infinity), nesting deeper than the stored-document limit, text that is not JSON.
const std::vector<std::string>& UnreadableValues() {
  static const std::vector<std::string> values{
      R"({"m":1e400})",
      std::string(JsonLimits::kMaxDepth + JsonLimits::kEnvelopeDepth + 1, '[') +
          std::string(JsonLimits::kMaxDepth + JsonLimits::kEnvelopeDepth + 1, ']'),
      "{not json"};
  return values;
}

TEST_P(StoreConformance, AnUnreadableRunIsFailedWhenLeasedAndTheQueueGoesOn) {
  struct Case {
    std::string column;  // as the error names it
    std::function<void(const std::string& id, const std::string& value)> damage;
  };
  std::vector<Case> cases{
      {"runs.input",
       [&](const std::string& id, const std::string& v) { Damage("runs", "input", "id", id, v); }},
      {"runs.signals", [&](const std::string& id,
                           const std::string& v) { Damage("runs", "signals", "id", id, v); }},
      {"runs.waiting", [&](const std::string& id,
                           const std::string& v) { Damage("runs", "waiting", "id", id, v); }},
      {"runs.error",
       [&](const std::string& id, const std::string& v) { Damage("runs", "error", "id", id, v); }},
      {"definition",
       [&](const std::string& id, const std::string& v) {
         Damage("definitions", "body", "id", Get(id).definition_id, v);
       }},
      {"steps.output",
       [&](const std::string& id, const std::string& v) {
         GetParam().exec(dir_.path(),
                         "UPDATE steps SET output = '" + v + "' WHERE run_id = '" + id + "'");
       }},
  };
  int n = 0;
  for (const auto& c : cases) {
    for (const auto& value : UnreadableValues()) {
      SCOPED_TRACE(c.column + " = " + value.substr(0, 20));
      // Each damaged run has a definition of its own, so that one damaged body harms no
      // other case.
      NewRun bad = MakeRun("bad" + std::to_string(++n));
      const std::string bad_id = bad.id;
      Must(store().SubmitRun(bad), "SubmitRun");
      if (c.column == "steps.output") {
        // A checkpoint to damage: step a succeeded, the run handed back.
        const Lease l = LeaseOnly(bad_id);
        Must(store().StartStep(l, "a"), "StartStep");
        Must(store().CompleteStep(l, "a", json::object{{"a", 1}}, std::nullopt, std::nullopt),
             "CompleteStep");
        Must(store().ReleaseLease(l), "ReleaseLease");
      }
      clock_.Advance(1ms);
      const std::string good_id = Submit();
      c.damage(bad_id, value);

      // The damaged run is not handed out: the good one is.
      const LeasedRun leased = LeaseNext();
      EXPECT_EQ(leased.run.id, good_id);
      Must(store().CancelRun(good_id), "CancelRun good");

      const RunRecord run = Get(bad_id);
      EXPECT_EQ(RunStatusName(run.status), "failed");
      ASSERT_TRUE(run.error.has_value());
      EXPECT_EQ(ErrorCodeName(run.error->code), "internal");
      EXPECT_NE(run.error->message.find(bad_id), std::string::npos) << run.error->message;
      EXPECT_NE(run.error->message.find(c.column), std::string::npos) << run.error->message;
      EXPECT_NE(run.error->message.find("cannot be decoded"), std::string::npos)
          << run.error->message;
      // (A damaged runs.error is replaced by the error the run ended with.)
      if (c.column != "runs.error") {
        EXPECT_TRUE(run.unreadable.has_value());
      }
      const auto types = Types(Events(bad_id));
      EXPECT_EQ(types.back(), "RunFailed");
      // Listed, with what can be decoded; cancel answers (the run has ended).
      bool listed = false;
      for (const auto& r : ListAll({})) listed = listed || r.id == bad_id;
      EXPECT_TRUE(listed);
      EXPECT_TRUE(FailsWith(store().CancelRun(bad_id), ErrorCode::kConflict));
      EXPECT_FALSE(TryLease().has_value());
    }
  }
}

TEST_P(StoreConformance, AnUnreadableQueuedRunCanBeReadListedAndCancelled) {
  const std::string id = Submit();
  Damage("runs", "input", "id", id, R"({"m":1e400})");
  const RunRecord run = Get(id);
  EXPECT_EQ(RunStatusName(run.status), "queued");
  EXPECT_TRUE(run.input.is_null());
  ASSERT_TRUE(run.error.has_value());
  EXPECT_NE(run.error->message.find("runs.input"), std::string::npos) << run.error->message;
  EXPECT_EQ(run.definition, MakeRun().definition);  // what can be decoded is there
  const auto listed = ListAll({});
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_TRUE(listed[0].input.is_null());
  EXPECT_TRUE(listed[0].unreadable.has_value());
  const RunRecord cancelled = Must(store().CancelRun(id), "CancelRun");
  EXPECT_EQ(RunStatusName(cancelled.status), "cancelled");
  EXPECT_FALSE(TryLease().has_value());
}

TEST_P(StoreConformance, AnUnreadableEventReadsAsWhatIsWrong) {
  const std::string id = Submit();
  GetParam().exec(dir_.path(),
                  "UPDATE events SET data = '{\"m\":1e400}' WHERE run_id = '" + id + "'");
  const auto events = Events(id);
  ASSERT_EQ(events.size(), 1u);
  ASSERT_TRUE(events[0].data.is_object());
  EXPECT_TRUE(events[0].data.as_object().contains("unreadable"));
}

TEST_P(StoreConformance, AnUnreadableTaskIsFailedForGoodAndTheTaskQueueGoesOn) {
  const std::string a = Submit();
  const Lease la = LeaseOnly(a);
  Must(store().StartStep(la, "t"), "StartStep a");
  const TaskRecord bad =
      Must(store().EnsureTask(la, "t", 1, "q", json::object{{"x", 1}}, 30s), "EnsureTask a");
  Must(store().SuspendStep(la, "t", std::nullopt, json::object{{"kind", "task"}}), "SuspendStep a");
  clock_.Advance(1ms);
  const std::string b = Submit();
  const Lease lb = LeaseOnly(b);
  Must(store().StartStep(lb, "t"), "StartStep b");
  const TaskRecord good =
      Must(store().EnsureTask(lb, "t", 1, "q", json::object{{"x", 2}}, 30s), "EnsureTask b");
  Must(store().SuspendStep(lb, "t", std::nullopt, json::object{{"kind", "task"}}), "SuspendStep b");
  Damage("tasks", "input", "token", bad.token, R"({"m":1e400})");

  const auto leased = Must(store().LeaseTask("q", "worker"), "LeaseTask");
  ASSERT_TRUE(leased.has_value());
  EXPECT_EQ(leased->token, good.token);
  // The damaged one failed for good, and its run was woken to learn it.
  const LeasedRun woken = LeaseNext();
  EXPECT_EQ(woken.run.id, a);
  const TaskRecord failed =
      Must(store().EnsureTask(woken.lease, "t", 1, "q", json::object{}, 30s), "EnsureTask again");
  EXPECT_EQ(TaskStatusName(failed.status), "failed");
  EXPECT_FALSE(failed.retryable);
  ASSERT_TRUE(failed.error.has_value());
  EXPECT_NE(failed.error->message.find("tasks.input"), std::string::npos) << failed.error->message;
}

// ---------------------------------------------------------------------------------------
// Interrupted attempts (a lost node) are counted apart from failed ones.

TEST_P(StoreConformance, RestartInterruptedStepCountsTheInterruptionAndStartsANewAttempt) {
  const std::string id = Submit();
  const Lease l1 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l1, "a"), "StartStep"), 1);
  clock_.Advance(kLeaseFor);  // the node is lost: its lease expires with "a" running
  const LeasedRun again = LeaseNext();
  ASSERT_EQ(again.run.steps.size(), 1u);
  EXPECT_EQ(StepStatusName(again.run.steps[0].status), "running");
  EXPECT_EQ(again.run.steps[0].interrupted, 0);
  EXPECT_EQ(Must(store().RestartInterruptedStep(again.lease, "a"), "RestartInterruptedStep"), 2);
  RunRecord run = Get(id);
  EXPECT_EQ(run.steps[0].attempts, 2);
  EXPECT_EQ(run.steps[0].interrupted, 1);
  const auto events = Events(id);
  bool logged = false;
  for (const auto& e : events) logged = logged || (e.type == "StepInterrupted" && e.attempt == 1);
  EXPECT_TRUE(logged);

  // A drain's hand-back counts as interrupted too.
  FailureDisposition drained{Kind::kRetry, 0ms};
  drained.interrupted = true;
  Must(store().FailStep(again.lease, "a", Error(ErrorCode::kCancelled, "draining"), drained),
       "FailStep drained");
  run = Get(id);
  EXPECT_EQ(run.steps[0].interrupted, 2);
  EXPECT_EQ(StepStatusName(run.steps[0].status), "retrying");
  // Not running: nothing to restart.
  const Lease l3 = LeaseOnly(id);
  EXPECT_TRUE(FailsWith(store().RestartInterruptedStep(l3, "a"), ErrorCode::kConflict));
  EXPECT_TRUE(FailsWith(store().RestartInterruptedStep(again.lease, "a"), ErrorCode::kLeaseLost));
  Reopen();
  EXPECT_EQ(Get(id).steps[0].interrupted, 2);
}

// ---------------------------------------------------------------------------------------
// Redrive gives a failed task step a new task.

TEST_P(StoreConformance, ARedrivenTaskStepGetsANewTask) {
  const std::string id = Submit();
  const Lease l1 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l1, "t"), "StartStep"), 1);
  const TaskRecord first =
      Must(store().EnsureTask(l1, "t", 1, "q", json::object{{"x", 1}}, 30s), "EnsureTask");
  Must(store().SuspendStep(l1, "t", std::nullopt, json::object{{"kind", "task"}}), "SuspendStep");
  ASSERT_TRUE(Must(store().LeaseTask("q", "worker"), "LeaseTask").has_value());
  Must(store().FailTask(first.token, Error(ErrorCode::kInvalidRequest, "bad"), false), "FailTask");
  const Lease l2 = LeaseOnly(id);
  EXPECT_EQ(Must(store().StartStep(l2, "t"), "StartStep after the wake"), 1);
  Must(store().FailStep(l2, "t", Error(ErrorCode::kInvalidRequest, "bad"), {Kind::kFail}),
       "FailStep");

  Must(store().RedriveRun(id), "RedriveRun");
  const Lease l3 = LeaseOnly(id);
  const int attempt = Must(store().StartStep(l3, "t"), "StartStep after the redrive");
  EXPECT_EQ(attempt, 2);
  const TaskRecord second =
      Must(store().EnsureTask(l3, "t", attempt, "q", json::object{{"x", 1}}, 30s), "EnsureTask 2");
  EXPECT_NE(second.token, first.token);
  EXPECT_EQ(TaskStatusName(second.status), "pending");
  // The first task is kept, as it ended.
  Must(store().SuspendStep(l3, "t", std::nullopt, json::object{{"kind", "task"}}), "SuspendStep 2");
  const auto leased = Must(store().LeaseTask("q", "worker"), "LeaseTask 2");
  ASSERT_TRUE(leased.has_value());
  EXPECT_EQ(leased->token, second.token);
}

INSTANTIATE_TEST_SUITE_P(Stores, StoreConformance, ::testing::ValuesIn(AllStores()),
                         [](const ::testing::TestParamInfo<StoreFactory>& info) { return info.param.name; });

}  // namespace
}  // namespace keel::store
