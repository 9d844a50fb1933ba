// What only the PostgreSQL store has: its schema versions, its errors at start, several
// stores (nodes) on one database, notifications between them, and reconnecting after the
// server restarts. (Behaviour common to every Store is in tests/conformance/.)
//
// Needs PostgreSQL: the run's shared server (tests/support/services.h) with a database
// per test, and servers of its own for the restart tests.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/ids.h"
#include "keel/core/random.h"
#include "keel/store/postgres_store.h"
#include "keel/store/store.h"
#include "keel/testing/assert.h"
#include "keel/testing/process.h"
#include "keel/testing/services.h"

namespace keel::store {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::Not;

std::string TestName() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string("pg_") + info->name();
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name.substr(0, 60);
}

class PostgresStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    admin_ = keel::testing::SharedPostgresUrl();
    url_ = keel::testing::CreateDatabase(admin_, TestName());
  }
  void TearDown() override {
    stores_.clear();
    keel::testing::Psql(admin_, "DROP DATABASE IF EXISTS \"" + TestName() + "\" WITH (FORCE)");
  }

  PostgresOptions Options(const std::string& url) {
    PostgresOptions o;
    o.url = url;
    o.pool_size = 8;
    o.connect_timeout = 2s;
    o.pool_timeout = 2s;
    return o;
  }

  // A store ("node") on the test's database.
  Store& Node() {
    auto opened = OpenPostgresStore(Options(url_), clock_, random_);
    if (!opened.ok()) throw std::runtime_error("open: " + opened.error().message);
    stores_.push_back(std::move(opened).value());
    return *stores_.back();
  }

  std::string Submit(Store& s, const std::string& key = "") {
    NewRun r;
    r.id = NewRunId(clock_.Now(), random_);
    r.pipeline = "p";
    r.input = json::object{{"n", ++made_}};
    r.definition = json::object{{"steps", json::array{"a"}}};
    r.idempotency_key = key;
    r.fingerprint = key.empty() ? "" : "f";
    auto done = s.SubmitRun(r);
    if (!done.ok()) throw std::runtime_error("submit: " + done.error().message);
    return done->run.id;
  }

  std::string admin_;
  std::string url_;
  ManualClock clock_;
  SeededRandom random_{7};
  std::vector<std::unique_ptr<Store>> stores_;
  int made_ = 0;
};

// ---------------------------------------------------------------------------------------
// Schema.

TEST_F(PostgresStoreTest, TheSchemaIsCreatedOnceAtTheCurrentVersion) {
  auto before = ReadPostgresSchemaVersion(Options(url_));
  ASSERT_OK(before);
  EXPECT_EQ(*before, 0);
  Node();
  auto after = ReadPostgresSchemaVersion(Options(url_));
  ASSERT_OK(after);
  EXPECT_EQ(*after, PostgresSchemaVersion());
  // A second node finds it up to date and changes nothing.
  Node();
  EXPECT_EQ(keel::testing::Psql(url_, "SELECT count(*) FROM keel_schema"), "1");
}

// A version-3 database (map items told apart by their ids only) is migrated: its items
// become items of their step.
TEST_F(PostgresStoreTest, AVersion3DatabaseIsMigratedKeepingItsMapItems) {
  std::string id;
  {
    Store& s = Node();
    id = Submit(s);
    auto l = s.LeaseRun("w", 30s);
    ASSERT_OK(l);
    ASSERT_TRUE(l->has_value());
    ASSERT_OK(s.StartStep((*l)->lease, "map"));
    for (int i = 0; i < 3; ++i) ASSERT_OK(s.CompleteItem((*l)->lease, "map", i, json::value(i * 10)));
  }
  // Back to what version 3 wrote.
  keel::testing::Psql(url_, "DROP INDEX steps_by_item; ALTER TABLE steps DROP COLUMN item_of; "
                            "UPDATE keel_schema SET version = 3");
  Store& s = Node();
  auto version = ReadPostgresSchemaVersion(Options(url_));
  ASSERT_OK(version);
  EXPECT_EQ(*version, PostgresSchemaVersion());
  auto run = s.GetRun(id);
  ASSERT_OK(run);
  ASSERT_EQ(run->steps.size(), 1u);
  EXPECT_EQ(run->steps[0].items, 3);
  auto items = s.ListItems(id, "map", 0, 10, true);
  ASSERT_OK(items);
  ASSERT_EQ(items->size(), 2u);
  EXPECT_EQ((*items)[1].index, 2);
  EXPECT_EQ((*items)[1].output, json::value(20));
}

TEST_F(PostgresStoreTest, NodesStartingTogetherCreateTheSchemaOnce) {
  std::vector<std::thread> threads;
  std::atomic<int> failed{0};
  std::vector<std::unique_ptr<Store>> opened(6);
  for (std::size_t i = 0; i < opened.size(); ++i) {
    threads.emplace_back([&, i] {
      auto s = OpenPostgresStore(Options(url_), clock_, random_);
      if (s.ok()) opened[i] = std::move(s).value();
      else ++failed;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(keel::testing::Psql(url_, "SELECT count(*) FROM keel_schema"), "1");
}

TEST_F(PostgresStoreTest, ANewerSchemaIsRefused) {
  Node();
  stores_.clear();
  keel::testing::Psql(url_, "UPDATE keel_schema SET version = 99");
  auto r = OpenPostgresStore(Options(url_), clock_, random_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("schema version 99, newer than this keel understands"));
  EXPECT_THAT(r.error().message, HasSubstr("run a newer keel"));
}

TEST_F(PostgresStoreTest, ADatabaseWithTablesOfSomeoneElseIsRefused) {
  keel::testing::Psql(url_, "CREATE TABLE runs (x int)");
  auto r = OpenPostgresStore(Options(url_), clock_, random_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("already has a table \"runs\" that keel did not create"));
  // Nothing of keel's was left behind.
  EXPECT_EQ(keel::testing::Psql(url_, "SELECT count(*) FROM pg_tables WHERE tablename = 'queue'"), "0");
}

// ---------------------------------------------------------------------------------------
// Errors at start.

TEST_F(PostgresStoreTest, AnUnreachableServerIsAClearErrorWithoutThePassword) {
  // A port nothing listens on: the shared server's, plus one, is as good as any free one.
  keel::testing::TempDir dir;
  std::string url;
  {
    keel::testing::PostgresServer gone(dir.path() + "/pg");
    url = gone.admin_url();
  }  // stopped: its port is closed now
  const std::string with_password = "postgres://keel:hunter2@" + url.substr(url.find('@') + 1);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = OpenPostgresStore(Options(with_password), clock_, random_);
  ASSERT_FALSE(r.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable);
  EXPECT_THAT(r.error().message, HasSubstr("cannot connect to PostgreSQL at postgres://keel:***@127.0.0.1:"));
  EXPECT_THAT(r.error().message, HasSubstr("Connection refused"));
  EXPECT_THAT(r.error().message, Not(HasSubstr("hunter2")));
}

TEST_F(PostgresStoreTest, AMissingDatabaseOrAWrongUrlIsAClearError) {
  const std::string missing = admin_.substr(0, admin_.rfind('/') + 1) + "no_such_database";
  auto r = OpenPostgresStore(Options(missing), clock_, random_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("database \"no_such_database\" does not exist"));

  auto bad = OpenPostgresStore(Options("mysql://keel@127.0.0.1/keel"), clock_, random_);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.error().message, HasSubstr("starts with postgres://"));

  auto garbled = OpenPostgresStore(Options("postgres://keel@127.0.0.1:notaport/keel"), clock_, random_);
  ASSERT_FALSE(garbled.ok());
  EXPECT_THAT(garbled.error().message, HasSubstr("cannot connect to PostgreSQL"));
}

// ---------------------------------------------------------------------------------------
// Several nodes on one database.

TEST_F(PostgresStoreTest, ConcurrentWorkersOnTwoNodesLeaseEachRunOnce) {
  Store& a = Node();
  Store& b = Node();
  constexpr int kRuns = 150;
  for (int i = 0; i < kRuns; ++i) Submit(i % 2 ? a : b);
  std::mutex mu;
  std::map<std::string, int> leased;  // GUARDED_BY(mu)
  std::atomic<int> errors{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < 8; ++w) {
    Store& node = w % 2 ? a : b;
    workers.emplace_back([&, w] {
      while (true) {
        auto l = node.LeaseRun("w" + std::to_string(w), 30s);
        if (!l.ok()) {
          ++errors;
          return;
        }
        if (!l->has_value()) return;
        const Lease& lease = (*l)->lease;
        {
          std::lock_guard lock(mu);
          ++leased[lease.run_id];
        }
        if (!node.StartStep(lease, "a").ok() ||
            !node.CompleteStep(lease, "a", json::object{}, std::nullopt, json::value("done")).ok()) {
          ++errors;
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(leased.size(), static_cast<std::size_t>(kRuns));
  for (const auto& [id, n] : leased) EXPECT_EQ(n, 1) << id;
  auto stats = a.GetStats();
  ASSERT_OK(stats);
  EXPECT_EQ(stats->runs_by_status[RunStatus::kSucceeded], kRuns);
}

TEST_F(PostgresStoreTest, ConcurrentSubmitsOfOneIdempotencyKeyMakeOneRun) {
  Store& a = Node();
  Store& b = Node();
  std::vector<std::thread> threads;
  std::mutex mu;
  std::set<std::string> ids;
  std::atomic<int> created{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      Store& s = t % 2 ? a : b;
      NewRun r;
      r.id = NewRunId(clock_.Now(), random_);
      r.pipeline = "p";
      r.input = json::object{};
      r.definition = json::object{};
      r.idempotency_key = "same-key";
      r.fingerprint = "same-body";
      auto done = s.SubmitRun(r);
      if (!done.ok()) return;
      if (done->created) ++created;
      std::lock_guard lock(mu);
      ids.insert(done->run.id);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(created.load(), 1);
  EXPECT_EQ(ids.size(), 1u);
}

TEST_F(PostgresStoreTest, ConcurrentMapItemsOfOneRunAllCommit) {
  Store& s = Node();
  const std::string id = Submit(s);
  auto l = s.LeaseRun("w", 30s);
  ASSERT_OK(l);
  ASSERT_TRUE(l->has_value());
  const Lease lease = (*l)->lease;
  ASSERT_OK(s.StartStep(lease, "map"));
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < 200; i += 8) {
        if (!s.CompleteItem(lease, "map", i, json::value(i)).ok()) ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  auto run = s.GetRun(id);
  ASSERT_OK(run);
  ASSERT_EQ(run->steps.size(), 1u);  // the map step; its items are counted on it
  EXPECT_EQ(run->steps[0].items, 200);
  auto items = s.ListItems(id, "map", -1, 1000, true);
  ASSERT_OK(items);
  ASSERT_EQ(items->size(), 200u);
  for (int i = 0; i < 200; ++i) EXPECT_EQ((*items)[i].output, json::value(i)) << i;
}

// A listener that counts calls and lets a test wait for the next one.
struct Wakes {
  std::mutex mu;
  std::condition_variable cv;
  int n = 0;
  std::function<void()> Listener() {
    return [this] {
      {
        std::lock_guard lock(mu);
        ++n;
      }
      cv.notify_all();
    };
  }
  bool WaitAbove(int seen, std::chrono::milliseconds max) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, max, [&] { return n > seen; });
  }
  int count() {
    std::lock_guard lock(mu);
    return n;
  }
};

TEST_F(PostgresStoreTest, ASubmitOnOneNodeWakesTheWorkersOfAnother) {
  Store& a = Node();
  Store& b = Node();
  Wakes wakes;
  b.SetWorkListener(wakes.Listener());
  // The listener connects in the background: a submit before it listens is not seen, so
  // submit until one is (each is a fresh chance; the first usually is).
  bool woken = false;
  for (int i = 0; i < 20 && !woken; ++i) {
    const int seen = wakes.count();
    Submit(a);
    woken = wakes.WaitAbove(seen, 1s);
  }
  EXPECT_TRUE(woken) << "node b never heard of node a's submits";
  b.SetWorkListener({});
}

TEST_F(PostgresStoreTest, ATaskQueuedOnOneNodeEndsALongPollOnAnother) {
  Store& a = Node();
  Store& b = Node();
  const std::string id = Submit(a);
  auto l = a.LeaseRun("w", 30s);
  ASSERT_OK(l);
  ASSERT_TRUE(l->has_value());
  ASSERT_OK(a.StartStep((*l)->lease, "job"));
  // b long-polls while a queues tasks; b's wait ends well before its 10 s bound.
  std::atomic<bool> returned{false};
  std::chrono::steady_clock::duration waited{};
  std::thread poller([&] {
    const auto t0 = std::chrono::steady_clock::now();
    b.WaitForTask("q", 10s);
    waited = std::chrono::steady_clock::now() - t0;
    returned = true;
  });
  for (int attempt = 1; attempt <= 40 && !returned; ++attempt) {
    ASSERT_OK(a.EnsureTask((*l)->lease, "job", attempt, "q", json::object{}, 30s));
    for (int j = 0; j < 25 && !returned; ++j) std::this_thread::sleep_for(10ms);
  }
  poller.join();
  EXPECT_LT(waited, 5s);
  auto t = b.LeaseTask("q", "w");
  ASSERT_OK(t);
  ASSERT_TRUE(t->has_value());
  EXPECT_EQ((*t)->run_id, id);
}

// ---------------------------------------------------------------------------------------
// The server restarts.

TEST(PostgresRestartTest, CallsFailFastWhileTheServerIsDownAndWorkAgainAfterwards) {
  keel::testing::TempDir dir;
  keel::testing::PostgresServer server(dir.path() + "/pg");
  const std::string url = keel::testing::CreateDatabase(server.admin_url(), "keel");
  ManualClock clock;
  SeededRandom random(3);
  PostgresOptions o;
  o.url = url;
  o.pool_size = 4;
  o.connect_timeout = 2s;
  auto opened = OpenPostgresStore(o, clock, random);
  ASSERT_OK(opened);
  Store& s = **opened;
  Wakes wakes;
  s.SetWorkListener(wakes.Listener());

  std::vector<std::string> before;
  for (int i = 0; i < 5; ++i) {
    NewRun r;
    r.id = NewRunId(clock.Now(), random);
    r.pipeline = "p";
    r.input = json::object{{"i", i}};
    r.definition = json::object{};
    auto done = s.SubmitRun(r);
    ASSERT_OK(done);
    before.push_back(done->run.id);
  }

  server.Stop("immediate");  // as in a crash of the database
  const auto t0 = std::chrono::steady_clock::now();
  auto down = s.GetRun(before[0]);
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.error().code, ErrorCode::kUnavailable);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s) << "a call must fail fast while the database is down";
  NewRun r;
  r.id = NewRunId(clock.Now(), random);
  r.pipeline = "p";
  r.input = json::object{};
  r.definition = json::object{};
  auto refused = s.SubmitRun(r);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, ErrorCode::kUnavailable);

  server.Start();
  const int seen = wakes.count();
  // The pool drops its dead connections and opens new ones; nothing committed is lost.
  for (const auto& id : before) {
    auto run = s.GetRun(id);
    ASSERT_OK(run);
    EXPECT_EQ(RunStatusName(run->status), "queued");
  }
  auto again = s.SubmitRun(r);
  ASSERT_OK(again);
  EXPECT_TRUE(again->created);
  // The listener reconnects by itself and says that work may be due.
  EXPECT_TRUE(wakes.WaitAbove(seen, 10s));
  s.SetWorkListener({});
}

}  // namespace
}  // namespace keel::store
