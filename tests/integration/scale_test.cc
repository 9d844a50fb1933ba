// Scale-out (docs/scale-out.md): several keel nodes on one PostgreSQL database keep every
// guarantee of the single node. A node killed with kill -9 has its runs finished by the
// others with no finished step repeated; a PostgreSQL restart under load loses nothing;
// SIGTERM drains within the grace period and hands unfinished runs to the other nodes;
// idle workers wake through LISTEN/NOTIFY, not by polling; bad storage settings are
// refused at start with a message that says what to fix.

#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include "helpers.h"
#include "keel/testing/services.h"

namespace keel::testing {
namespace {

using namespace std::chrono_literals;

std::string TestDatabaseName() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string("scale_") + info->name();
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name.substr(0, 60);
}

// A database of the test's own on a PostgreSQL server, dropped at the end.
class PgDatabase {
 public:
  explicit PgDatabase(std::string admin_url = SharedPostgresUrl())
      : admin_(std::move(admin_url)), name_(TestDatabaseName()), url_(CreateDatabase(admin_, name_)) {}
  ~PgDatabase() {
    try {
      Psql(admin_, "DROP DATABASE IF EXISTS \"" + name_ + "\" WITH (FORCE)");
    } catch (const std::exception&) {  // the server may be gone (a restart test's own)
    }
  }
  const std::string& url() const { return url_; }
  std::string Query(const std::string& sql) const { return Psql(url_, sql); }

 private:
  std::string admin_;
  std::string name_;
  std::string url_;
};

// The mock-backed test config (helpers.h) on PostgreSQL.
std::string PgConfig(const std::string& pg_url, const std::string& mock_url, const std::string& engine,
                     const std::string& extra = "") {
  std::string c = MockBackedConfig(mock_url, "", engine);
  const std::string sqlite = "storage: sqlite://data/keel.db\n";
  c.replace(c.find(sqlite), sqlite.size(), "storage: " + pg_url + "\npostgres: {pool_size: 8, connect_timeout: 2s}\n" + extra);
  return c;
}

// A node in a directory of its own: `keel serve` or `keel worker` (which also listens,
// for its operations endpoints).
struct Node {
  Node(const std::string& config, const std::string& command)
      : server(std::make_unique<KeelServer>(dir.path(), config, command)) {}
  TempDir dir;
  std::unique_ptr<KeelServer> server;
  const std::string& url() const { return server->url(); }
  pid_t pid() { return server->process().pid(); }
};

json::array Events(const std::string& base, const std::string& id) {
  auto r = HttpGet(base + "/v1/runs/" + id + "/events?limit=1000");
  EXPECT_EQ(r.status, 200) << r.raw;
  return r.status == 200 ? r.body.at("data").as_array() : json::array{};
}

std::string Str(const json::value& v) { return v.is_string() ? std::string(v.as_string()) : std::string(); }

// For one run: each step succeeded once, no attempt of a step started after it succeeded,
// and the mock was called once per attempt started (so no finished step ran again).
void ExpectNoFinishedStepRepeated(const std::string& base, const std::string& mock, const std::string& id,
                                  const std::string& input_id, const std::string& second) {
  std::map<std::string, int> started, succeeded;
  for (const auto& e : Events(base, id)) {
    const std::string type = Str(e.at("type"));
    const std::string step = Str(e.at("step_id"));
    if (type == "StepStarted") {
      EXPECT_EQ(succeeded[step], 0) << "run " << id << ": step " << step << " started again after it succeeded";
      ++started[step];
    }
    if (type == "StepSucceeded") ++succeeded[step];
  }
  for (const char* step : {"first", "second", "done"}) {
    EXPECT_EQ(succeeded[step], 1) << "run " << id << " step " << step;
  }
  EXPECT_EQ(MockCount(mock, "first " + input_id + "\nquick"), started["first"]) << "run " << id;
  EXPECT_EQ(MockCount(mock, "second " + input_id + "\n" + second), started["second"]) << "run " << id;
}

int64_t Count(const PgDatabase& db, const std::string& sql) { return std::stoll(db.Query(sql)); }

TEST(ScaleTest, ThreeNodesFinishTheRunsOfANodeKilledMidRunWithNoFinishedStepRepeated) {
  PgDatabase db;
  MockLlm mock;
  const std::string engine = "engine: {workers: 4, lease_timeout: 2s, heartbeat_interval: 500ms, poll_interval: 50ms}";
  const std::string config = PgConfig(db.url(), mock.url(), engine);
  Node api(config, "serve");
  Node b(config, "worker");
  Node c(config, "worker");
  ASSERT_NE(api.server->port(), 0);
  ASSERT_NE(b.server->port(), 0);
  ASSERT_NE(c.server->port(), 0);

  constexpr int kRuns = 24;
  const std::string second = "#mock sleep=1500";
  std::vector<std::string> ids;
  for (int i = 0; i < kRuns; ++i) {
    const std::string n = "s" + std::to_string(i);
    auto r = HttpPostJson(api.url() + "/v1/runs",
                          json::object{{"pipeline", "two"}, {"input", {{"id", n}, {"first", "quick"}, {"second", second}}}},
                          {{"Idempotency-Key", "scale-" + n}});
    ASSERT_EQ(r.status, 201) << r.raw;
    ids.emplace_back(r.body.at("id").as_string());
  }
  // Node b holds runs whose second (slow) step is in flight: kill it then.
  const std::string b_owner = "'%:" + std::to_string(b.pid()) + "/%'";
  ASSERT_TRUE(Eventually([&] {
    return Count(db, "SELECT count(*) FROM queue q JOIN steps s ON s.run_id = q.run_id WHERE q.lease_owner LIKE " +
                         b_owner + " AND q.lease_token IS NOT NULL AND s.step_id = 'second' AND s.status = 'running'") >= 2;
  }, 20s)) << "node b never took runs";
  const int64_t held_by_b = Count(db, "SELECT count(*) FROM queue WHERE lease_owner LIKE " + b_owner);
  b.server->Crash();

  for (int i = 0; i < kRuns; ++i) {
    auto run = WaitForTerminal(api.url(), ids[i], 60s);
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
    ExpectNoFinishedStepRepeated(api.url(), mock.url(), ids[i], "s" + std::to_string(i), second);
  }
  // The killed node's runs were taken over (their leases expired) by the other nodes.
  // A worker id is "HOST:PID/N": the pid names the node.
  int expired = 0;
  std::set<std::string> finishers;
  for (const auto& id : ids) {
    std::string last_worker;
    for (const auto& e : Events(api.url(), id)) {
      const std::string type = Str(e.at("type"));
      expired += type == "LeaseExpired";
      if (type == "RunLeased") last_worker = Str(e.at("data").at("worker"));
    }
    const auto colon = last_worker.rfind(':');
    finishers.insert(last_worker.substr(colon + 1, last_worker.find('/') - colon - 1));
  }
  EXPECT_GE(expired, std::min<int64_t>(held_by_b, 2));
  EXPECT_EQ(finishers.count(std::to_string(b.pid())), 0u);
  EXPECT_EQ(finishers.size(), 2u) << "both surviving nodes should have finished runs";
  // One run per submission, and the queue is empty.
  EXPECT_EQ(Count(db, "SELECT count(*) FROM runs"), kRuns);
  EXPECT_EQ(Count(db, "SELECT count(*) FROM queue"), 0);
}

TEST(ScaleTest, APostgresRestartUnderLoadLosesNothing) {
  TempDir pg_dir;
  PostgresServer server(pg_dir.path() + "/pg");
  PgDatabase db(server.admin_url());
  MockLlm mock;
  const std::string config =
      PgConfig(db.url(), mock.url(), "engine: {workers: 8, lease_timeout: 5s, poll_interval: 50ms}");
  Node api(config, "serve");
  Node worker(config, "worker");
  ASSERT_NE(api.server->port(), 0);
  ASSERT_NE(worker.server->port(), 0);

  // A client that submits runs one after another, each with its own idempotency key, and
  // retries a submit (same key) until it is accepted, as a careful client does.
  constexpr int kRuns = 150;
  std::atomic<int> submitted{0};
  std::atomic<int> refused{0};
  std::vector<std::string> ids(kRuns);
  std::thread client([&] {
    for (int i = 0; i < kRuns; ++i) {
      const std::string n = "r" + std::to_string(i);
      const auto give_up = std::chrono::steady_clock::now() + 60s;
      while (std::chrono::steady_clock::now() < give_up) {
        auto r = HttpPostJson(api.url() + "/v1/runs",
                              json::object{{"pipeline", "two"},
                                           {"input", {{"id", n}, {"first", "quick"}, {"second", "#mock sleep=50"}}}},
                              {{"Idempotency-Key", "restart-" + n}});
        if (r.status == 201 || r.status == 200) {
          ids[static_cast<std::size_t>(i)] = std::string(r.body.at("id").as_string());
          ++submitted;
          std::this_thread::sleep_for(20ms);  // a paced client: the load spans the restart
          break;
        }
        ++refused;
        std::this_thread::sleep_for(100ms);  // a client's backoff, not synchronisation
      }
    }
  });
  ASSERT_TRUE(Eventually([&] { return submitted.load() >= 15; }, 30s));
  const auto seen = HttpGet(api.url() + "/v1/runs/" + ids[0]);  // read once before the crash
  ASSERT_EQ(seen.status, 200) << seen.raw;
  server.Stop("immediate");  // the database crashes under load
  ASSERT_TRUE(Eventually([&] { return HttpGet(api.url() + "/readyz").status == 503; }, 10s));
  // The nodes keep answering what does not need the database.
  EXPECT_EQ(HttpGet(api.url() + "/healthz").status, 200);
  EXPECT_EQ(HttpGet(worker.url() + "/healthz").status, 200);
  auto models = HttpGet(api.url() + "/v1/models");
  EXPECT_EQ(models.status, 200);
  // A run this node has answered for is served again, marked stale; another is a 503.
  auto stale = HttpGet(api.url() + "/v1/runs/" + ids[0]);
  EXPECT_EQ(stale.status, 200) << stale.raw;
  EXPECT_EQ(stale.body.at("id"), seen.body.at("id"));
  EXPECT_EQ(stale.Header("x-keel-stale"), "true");
  EXPECT_FALSE(stale.Header("age").empty());
  auto down = HttpGet(api.url() + "/v1/runs/run_00000000000000000000000000");
  EXPECT_EQ(down.status, 503) << down.raw;
  EXPECT_FALSE(down.Header("retry-after").empty()) << down.raw;
  server.Start();
  ASSERT_TRUE(Eventually([&] { return HttpGet(api.url() + "/readyz").status == 200; }, 20s));
  client.join();
  ASSERT_EQ(submitted.load(), kRuns) << "a submit was never accepted";
  EXPECT_GT(refused.load(), 0) << "the restart never refused a submit: did it happen under load?";

  for (int i = 0; i < kRuns; ++i) {
    auto run = WaitForTerminal(api.url(), ids[static_cast<std::size_t>(i)], 60s);
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  }
  // Exactly one run per submission: no retry of a submit made a second run.
  EXPECT_EQ(Count(db, "SELECT count(*) FROM runs"), kRuns);
  // The nodes reconnected by themselves and are still the same processes.
  EXPECT_EQ(HttpGet(worker.url() + "/readyz").status, 200);
}

TEST(ScaleTest, SigtermDrainsWithinTheGracePeriodAndHandsUnfinishedRunsToAnotherNode) {
  PgDatabase db;
  MockLlm mock;
  // A long lease: the runs must come back because the node handed them back, not because
  // a lease expired.
  const std::string engine = "engine: {workers: 4, lease_timeout: 60s, poll_interval: 50ms, drain_timeout: 1s}";
  const std::string config = PgConfig(db.url(), mock.url(), engine);
  Node api(config, "serve");  // its workers take runs too
  ASSERT_NE(api.server->port(), 0);
  Node draining(config, "worker");
  ASSERT_NE(draining.server->port(), 0);

  // Slow second steps, longer than the grace period.
  std::vector<std::string> ids;
  for (int i = 0; i < 8; ++i) {
    ids.push_back(workers::Submit(api.url(), "two",
                                  json::object{{"id", "d" + std::to_string(i)}, {"first", "quick"}, {"second", "#mock sleep=4000"}}));
  }
  const std::string owner = "'%:" + std::to_string(draining.pid()) + "/%'";
  ASSERT_TRUE(Eventually([&] {
    return Count(db, "SELECT count(*) FROM queue q JOIN steps s ON s.run_id = q.run_id WHERE q.lease_owner LIKE " +
                         owner + " AND s.step_id = 'second' AND s.status = 'running'") >= 1;
  }, 20s));
  const auto t0 = std::chrono::steady_clock::now();
  draining.server->process().Signal(SIGTERM);
  EXPECT_EQ(draining.server->process().Wait(15s), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 6s) << "drain_timeout is 1s; the slow steps take 4s";
  // Its /readyz said "draining" and it logged the hand-back.
  bool handed_back = false;
  for (const auto& l : draining.server->process().Lines()) handed_back = handed_back || l.find("run handed back (drain)") != std::string::npos;
  EXPECT_TRUE(handed_back);

  for (const auto& id : ids) {
    auto run = WaitForTerminal(api.url(), id, 40s);
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  }
  // The interrupted attempts say why, and no lease had to expire.
  int interrupted = 0, expired = 0;
  for (const auto& id : ids) {
    for (const auto& e : Events(api.url(), id)) {
      const std::string type = Str(e.at("type"));
      expired += type == "LeaseExpired";
      if (type == "AttemptFailed" && json::serialize(e.at("data")).find("draining") != std::string::npos) ++interrupted;
    }
  }
  EXPECT_GE(interrupted, 1);
  EXPECT_EQ(expired, 0);
}

TEST(ScaleTest, AStepThatEndsWithinTheGracePeriodIsCheckpointedNotRepeated) {
  PgDatabase db;
  MockLlm mock;
  const std::string engine = "engine: {workers: 2, lease_timeout: 60s, poll_interval: 50ms, drain_timeout: 10s}";
  const std::string config = PgConfig(db.url(), mock.url(), engine);
  Node draining(config, "worker");
  ASSERT_NE(draining.server->port(), 0);
  TempDir api_dir;
  // The API node has no workers until the drain is over, so the run can only progress on
  // the draining node first.
  auto api = std::make_unique<KeelServer>(
      api_dir.path(), PgConfig(db.url(), mock.url(), "engine: {workers: 0}"), "serve");
  const std::string id = workers::Submit(
      api->url(), "two", json::object{{"id", "g"}, {"first", "quick"}, {"second", "#mock sleep=1000"}});
  ASSERT_TRUE(Eventually([&] { return MockCount(mock.url(), "second g\n#mock sleep=1000") == 1; }, 20s));
  draining.server->process().Signal(SIGTERM);
  EXPECT_EQ(draining.server->process().Wait(15s), 0);
  // The second step finished within the grace period and was checkpointed; the run was
  // handed back before its third step.
  auto run = HttpGet(api->url() + "/v1/runs/" + id);
  ASSERT_EQ(run.status, 200);
  const auto* second = workers::FindStep(run.body, "second");
  ASSERT_NE(second, nullptr) << run.raw;
  EXPECT_EQ(Str(second->at("status")), "succeeded");
  EXPECT_EQ(workers::FindStep(run.body, "done"), nullptr) << run.raw;
  bool released = false;
  for (const auto& e : Events(api->url(), id)) released = released || Str(e.at("type")) == "LeaseReleased";
  EXPECT_TRUE(released);
  // Another node finishes it without calling the model again.
  Node other(config, "worker");
  auto done = WaitForTerminal(api->url(), id, 30s);
  EXPECT_EQ(Status(done), "succeeded");
  EXPECT_EQ(MockCount(mock.url(), "second g\n#mock sleep=1000"), 1);
  EXPECT_EQ(MockCount(mock.url(), "first g\nquick"), 1);
}

TEST(ScaleTest, IdleWorkersWakeThroughNotificationsNotPolling) {
  PgDatabase db;
  MockLlm mock;
  // Workers that would not look at the queue for a minute on their own.
  Node worker(PgConfig(db.url(), mock.url(), "engine: {workers: 2, poll_interval: 60s}"), "worker");
  ASSERT_NE(worker.server->port(), 0);
  TempDir api_dir;
  KeelServer api(api_dir.path(), PgConfig(db.url(), mock.url(), "engine: {workers: 0}"), "serve");
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string id =
        workers::Submit(api.url(), "two", json::object{{"id", "w" + std::to_string(i)}, {"first", "a"}, {"second", "b"}});
    auto run = WaitForTerminal(api.url(), id, 20s);
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s) << "the worker did not wake on the submit";
  }
}

TEST(ScaleTest, AWorkerNodeServesOperationsOnly) {
  PgDatabase db;
  MockLlm mock;
  Node worker(PgConfig(db.url(), mock.url(), "engine: {workers: 1}"), "worker");
  ASSERT_NE(worker.server->port(), 0);
  EXPECT_EQ(HttpGet(worker.url() + "/healthz").status, 200);
  EXPECT_EQ(HttpGet(worker.url() + "/readyz").status, 200);
  auto metrics = HttpGet(worker.url() + "/metrics");
  EXPECT_EQ(metrics.status, 200);
  EXPECT_NE(metrics.raw.find("keel_storage_up 1"), std::string::npos);
  EXPECT_NE(metrics.raw.find("keel_storage_pool_connections{state=\"size\"} 8"), std::string::npos) << metrics.raw;
  EXPECT_NE(metrics.raw.find("keel_storage_pool_timeouts_total 0"), std::string::npos);
  auto submit = HttpPostJson(worker.url() + "/v1/runs", json::object{{"pipeline", "two"}, {"input", json::object{}}});
  EXPECT_EQ(submit.status, 404);
  EXPECT_NE(submit.raw.find("worker node"), std::string::npos) << submit.raw;
}

// ---------------------------------------------------------------------------------------
// Bad settings at start.

struct Exit {
  int code = -1;
  std::string output;
};

Exit RunKeel(const std::vector<std::string>& args, const std::string& config) {
  TempDir dir;
  std::ofstream(dir.path() + "/keel.yaml") << config;
  std::vector<std::string> argv{KEEL_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back("--config");
  argv.push_back(dir.path() + "/keel.yaml");
  Process p(argv, dir.path());
  Exit e;
  e.code = p.Wait(20s);
  for (const auto& l : p.Lines()) e.output += l + "\n";
  return e;
}

TEST(ScaleTest, AnUnreachableDatabaseStopsTheNodeWithAClearMessage) {
  TempDir pg_dir;
  std::string url;
  {
    PostgresServer gone(pg_dir.path() + "/pg");
    url = gone.admin_url();
  }
  const std::string with_password = "postgres://keel:hunter2@" + url.substr(url.find('@') + 1);
  for (const char* command : {"serve", "worker", "migrate"}) {
    const auto t0 = std::chrono::steady_clock::now();
    auto e = RunKeel({command}, "storage: " + with_password + "\npostgres: {connect_timeout: 2s}\n");
    EXPECT_EQ(e.code, 1) << command << ": " << e.output;
    EXPECT_NE(e.output.find("cannot connect to PostgreSQL at postgres://keel:***@127.0.0.1:"), std::string::npos)
        << command << ": " << e.output;
    EXPECT_EQ(e.output.find("hunter2"), std::string::npos) << e.output;
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  }
}

TEST(ScaleTest, ADatabaseOfANewerSchemaIsRefusedAtStart) {
  PgDatabase db;
  auto migrated = RunKeel({"migrate"}, "storage: " + db.url() + "\n");
  EXPECT_EQ(migrated.code, 0) << migrated.output;
  db.Query("UPDATE keel_schema SET version = 7");
  auto e = RunKeel({"serve"}, "storage: " + db.url() + "\n");
  EXPECT_EQ(e.code, 1);
  EXPECT_NE(e.output.find("schema version 7, newer than this keel understands"), std::string::npos) << e.output;
}

TEST(ScaleTest, MigrateCreatesThenFindsTheSchemaUpToDate) {
  PgDatabase db;
  TempDir dir;
  std::ofstream(dir.path() + "/keel.yaml") << "storage: " << db.url() << "\n";
  auto run = [&] {
    Process p({KEEL_BINARY, "migrate", "--config", dir.path() + "/keel.yaml"}, dir.path());
    EXPECT_EQ(p.Wait(20s), 0);
  };
  run();
  EXPECT_EQ(db.Query("SELECT version FROM keel_schema"), "4");
  run();
  EXPECT_EQ(db.Query("SELECT count(*) FROM keel_schema"), "1");
}

TEST(ScaleTest, AWorkerNeedsASharedStorage) {
  auto e = RunKeel({"worker"}, "storage: sqlite://data/keel.db\n");
  EXPECT_EQ(e.code, 2);
  EXPECT_NE(e.output.find("postgres://"), std::string::npos) << e.output;
}

}  // namespace
}  // namespace keel::testing
