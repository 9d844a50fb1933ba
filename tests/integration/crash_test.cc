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

}  // namespace
}  // namespace keel::testing
