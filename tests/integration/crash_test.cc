// The foundation's promise: kill -9 keel serve in the middle of runs; after a restart
// every accepted run finishes, none is lost, and no finished step runs again (the mock
// counts each run's first prompt exactly once).

#include <gtest/gtest.h>

#include <set>

#include "helpers.h"

namespace keel::testing {
namespace {

TEST(CrashTest, KillNineMidStepLosesNothingAndRepeatsNoFinishedStep) {
  TempDir dir;
  MockLlm mock;
  const std::string config = MockBackedConfig(mock.url(), "", "engine: {workers: 8, lease_timeout: 2s, poll_interval: 50ms}");
  auto server = std::make_unique<KeelServer>(dir.path(), config);
  ASSERT_NE(server->port(), 0);

  constexpr int kRuns = 12;
  std::vector<std::string> ids;
  for (int i = 0; i < kRuns; ++i) {
    const std::string n = "c" + std::to_string(i);
    auto r = HttpPostJson(server->url() + "/v1/runs",
                          json::object{{"pipeline", "two"},
                                       {"input", {{"id", n}, {"first", "quick"}, {"second", "#mock sleep=1500"}}}},
                          {{"Idempotency-Key", "crash-" + n}});
    ASSERT_EQ(r.status, 201) << r.raw;
    ids.emplace_back(r.body.at("id").as_string());
  }
  // Wait until some second steps are in flight at the mock (their first steps are
  // checkpointed), then crash the server.
  ASSERT_TRUE(Eventually([&] {
    int in_flight = 0;
    for (int i = 0; i < kRuns; ++i) in_flight += MockCount(mock.url(), "second c" + std::to_string(i) + "\n#mock sleep=1500") > 0;
    return in_flight >= 4;
  }));
  server->Crash();

  server = std::make_unique<KeelServer>(dir.path(), config);
  ASSERT_NE(server->port(), 0);
  // Every accepted run is still there, and the same idempotency key still finds it.
  auto replay = HttpPostJson(server->url() + "/v1/runs",
                             json::object{{"pipeline", "two"},
                                          {"input", {{"id", "c0"}, {"first", "quick"}, {"second", "#mock sleep=1500"}}}},
                             {{"Idempotency-Key", "crash-c0"}});
  ASSERT_EQ(replay.status, 200) << replay.raw;
  EXPECT_EQ(replay.body.at("id").as_string(), ids[0]);

  for (int i = 0; i < kRuns; ++i) {
    auto run = WaitForTerminal(server->url(), ids[i], std::chrono::seconds(60));
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
    EXPECT_EQ(MockCount(mock.url(), "first c" + std::to_string(i) + "\nquick"), 1) << "run " << i;
  }
  auto list = HttpGet(server->url() + "/v1/runs?limit=1000");
  std::set<std::string> listed;
  for (const auto& r : list.body.at("data").as_array()) listed.insert(std::string(r.at("id").as_string()));
  EXPECT_EQ(listed.size(), static_cast<std::size_t>(kRuns));
  // The crash is visible in the history of runs that were in flight.
  int resumed = 0;
  for (const auto& id : ids) {
    const auto events = HttpGet(server->url() + "/v1/runs/" + id + "/events");
    for (const auto& e : events.body.at("data").as_array()) {
      resumed += e.at("type").as_string() == "LeaseExpired";
    }
  }
  EXPECT_GE(resumed, 1);
}

// An attempt cut short because its node was lost is not a failed one: a run whose step
// is in flight at every crash is dead-lettered `worker_lost` after
// engine.max_interrupted_attempts (3) lost attempts, and the runs in flight beside it
// keep their max_attempts (2 here) for failures of their own.
TEST(CrashTest, APoisonRunThatKeepsLosingItsNodeIsDeadLetteredWorkerLostAndSparesTheOthers) {
  TempDir dir;
  MockLlm mock;
  const std::string config =
      "storage: sqlite://data/keel.db\n"
      "engine: {workers: 8, lease_timeout: 2s, poll_interval: 50ms}\n"
      "providers:\n"
      "  llm: {type: openai, base_url: " +
      mock.url() +
      "/v1, api_key: sk-test, model: mock-1,\n"
      "        timeout: {connect: 1s, total: 120s}}\n"
      "routes:\n"
      "  main: {targets: [{provider: llm}]}\n"
      "pipelines:\n"
      "  one:\n"
      "    retry: {max_attempts: 2, initial_backoff: 10ms, max_backoff: 50ms}\n"
      "    steps:\n"
      "      - id: ask\n"
      "        llm: {route: main, messages: [{role: user, content: \"{{input.p}}\"}]}\n";
  auto server = std::make_unique<KeelServer>(dir.path(), config);
  ASSERT_NE(server->port(), 0);
  auto submit = [&](const std::string& prompt) {
    auto r = HttpPostJson(server->url() + "/v1/runs",
                          json::object{{"pipeline", "one"}, {"input", {{"p", prompt}}}});
    EXPECT_EQ(r.status, 201) << r.raw;
    return std::string(r.body.at("id").as_string());
  };
  // The poison run's call never ends; the innocent runs' first two calls do not either.
  const std::string poison_prompt = "poison\n#mock hang";
  const std::string poison = submit(poison_prompt);
  std::vector<std::pair<std::string, std::string>> innocents;
  for (int i = 0; i < 3; ++i) {
    const std::string prompt = "innocent " + std::to_string(i) + "\n#mock hang times=2";
    innocents.emplace_back(submit(prompt), prompt);
  }
  for (int crash = 1; crash <= 3; ++crash) {
    ASSERT_TRUE(Eventually(
        [&] {
          if (MockCount(mock.url(), poison_prompt) < crash) return false;
          for (const auto& [id, prompt] : innocents) {
            if (crash <= 2 && MockCount(mock.url(), prompt) < crash) return false;
            // Their third call answers: the third crash comes after they finished (a
            // run in flight at all three crashes would be worker_lost too).
            if (crash == 3 && Status(HttpGet(server->url() + "/v1/runs/" + id).body) != "succeeded")
              return false;
          }
          return true;
        },
        std::chrono::seconds(30)))
        << "crash " << crash;
    server->Crash();
    server = std::make_unique<KeelServer>(dir.path(), config);
    ASSERT_NE(server->port(), 0);
  }
  auto run = WaitForTerminal(server->url(), poison, std::chrono::seconds(60));
  ASSERT_EQ(Status(run), "dead_lettered") << json::serialize(run);
  EXPECT_EQ(run.at("error").at("type").as_string(), "worker_lost") << json::serialize(run);
  EXPECT_NE(std::string(run.at("error").at("message").as_string()).find("node lost"),
            std::string::npos);
  for (const auto& [id, prompt] : innocents) {
    // Two lost attempts each, with max_attempts 2: before, dead-lettered as `timeout`.
    auto r = WaitForTerminal(server->url(), id, std::chrono::seconds(60));
    EXPECT_EQ(Status(r), "succeeded") << json::serialize(r);
  }
  EXPECT_EQ(MockCount(mock.url(), poison_prompt), 3);  // not a fourth attempt
}

}  // namespace
}  // namespace keel::testing
