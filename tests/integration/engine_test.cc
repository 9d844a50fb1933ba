// Retries, dead-lettering, redrive and fail-fast through real processes: a keel serve
// whose provider is a keel mock-llm, both on ephemeral loopback ports.

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "helpers.h"

namespace keel::testing {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mock_ = std::make_unique<MockLlm>();
    server_ = std::make_unique<KeelServer>(dir_.path(), MockBackedConfig(mock_->url()));
    ASSERT_NE(server_->port(), 0);
  }
  std::string SubmitTwo(const std::string& id, const std::string& first, const std::string& second) {
    auto r = HttpPostJson(server_->url() + "/v1/runs",
                          json::object{{"pipeline", "two"}, {"input", {{"id", id}, {"first", first}, {"second", second}}}});
    EXPECT_EQ(r.status, 201) << r.raw;
    return r.status == 201 ? std::string(r.body.at("id").as_string()) : std::string();
  }
  std::vector<std::string> EventTypes(const std::string& run_id) {
    std::vector<std::string> out;
    const auto events = HttpGet(server_->url() + "/v1/runs/" + run_id + "/events");
    for (const auto& e : events.body.at("data").as_array()) {
      out.emplace_back(e.at("type").as_string());
    }
    return out;
  }

  TempDir dir_;
  std::unique_ptr<MockLlm> mock_;
  std::unique_ptr<KeelServer> server_;
};

TEST_F(EngineTest, TransientFailuresAreRetriedAndTheFinishedStepIsNotRepeated) {
  const auto id = SubmitTwo("r1", "ok", "#mock fail=503 times=2");
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const auto& steps = run.at("steps").as_array();
  EXPECT_EQ(steps[0].at("attempts").as_int64(), 1);
  EXPECT_EQ(steps[1].at("attempts").as_int64(), 3);
  EXPECT_EQ(MockCount(mock_->url(), "first r1\nok"), 1);
  EXPECT_EQ(MockCount(mock_->url(), "second r1\n#mock fail=503 times=2"), 3);
  const auto types = EventTypes(id);
  EXPECT_EQ(std::count(types.begin(), types.end(), "AttemptFailed"), 2);
  auto metrics = HttpGet(server_->url() + "/metrics").raw;
  EXPECT_NE(metrics.find("keel_step_retries_total{pipeline=\"two\"} 2"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("keel_step_errors_total{class=\"overloaded\",pipeline=\"two\"} 2"), std::string::npos);
}

TEST_F(EngineTest, ExhaustedRetriesDeadLetterTheRunAndRedriveResumesIt) {
  // Fails 3 times (max_attempts 3), then would answer: dead-lettered first, then redriven.
  const auto id = SubmitTwo("r2", "ok", "#mock fail=503 times=3");
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "dead_lettered") << json::serialize(run);
  EXPECT_EQ(run.at("error").at("type").as_string(), "overloaded");
  EXPECT_NE(std::string(run.at("error").at("message").as_string()).find("gave up after 3 attempts"), std::string::npos);
  auto dlq = HttpGet(server_->url() + "/v1/dlq");
  ASSERT_EQ(dlq.status, 200);
  ASSERT_EQ(dlq.body.at("data").as_array().size(), 1u);
  EXPECT_EQ(dlq.body.at("data").as_array()[0].at("id").as_string(), id);
  EXPECT_NE(HttpGet(server_->url() + "/metrics").raw.find("keel_dlq_size 1"), std::string::npos);

  auto redriven = HttpPost(server_->url() + "/v1/runs/" + id + "/redrive", "");
  ASSERT_EQ(redriven.status, 200) << redriven.raw;
  EXPECT_EQ(Status(redriven.body), "queued");
  run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  // The first step's checkpoint survived: the mock saw its prompt once in all.
  EXPECT_EQ(MockCount(mock_->url(), "first r2\nok"), 1);
  EXPECT_EQ(MockCount(mock_->url(), "second r2\n#mock fail=503 times=3"), 4);
  EXPECT_EQ(HttpGet(server_->url() + "/v1/dlq").body.at("data").as_array().size(), 0u);
}

TEST_F(EngineTest, NonRetryableErrorsFailFastWithTheirClass) {
  const auto id = SubmitTwo("r3", "#mock fail=400", "never");
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(run.at("error").at("type").as_string(), "invalid_request");
  EXPECT_EQ(run.at("steps").as_array()[0].at("attempts").as_int64(), 1);
  EXPECT_EQ(MockCount(mock_->url(), "first r3\n#mock fail=400"), 1);
  EXPECT_EQ(MockCount(mock_->url(), "second r3\nnever"), 0);
  const auto ctx = SubmitTwo("r4", "#mock fail=context_length", "never");
  auto run2 = WaitForTerminal(server_->url(), ctx);
  ASSERT_EQ(Status(run2), "failed");
  EXPECT_EQ(run2.at("error").at("type").as_string(), "context_length");
}

TEST_F(EngineTest, RateLimitRetryAfterIsHonoured) {
  const auto id = SubmitTwo("r5", "#mock fail=429 retry_after=1 times=1", "ok");
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const auto events = HttpGet(server_->url() + "/v1/runs/" + id + "/events").body.at("data").as_array();
  bool saw = false;
  for (const auto& e : events) {
    if (e.at("type").as_string() != "AttemptFailed") continue;
    saw = true;
    EXPECT_EQ(e.at("data").at("error").at("type").as_string(), "rate_limited");
    // The route's backoff is 10-50 ms; the provider asked for 1 s.
    EXPECT_GE(e.at("data").at("retry_in_ms").as_int64(), 1000);
  }
  EXPECT_TRUE(saw);
  EXPECT_EQ(run.at("steps").as_array()[0].at("attempts").as_int64(), 2);
}

TEST_F(EngineTest, MalformedAndResetAnswersAreRetried) {
  const auto a = SubmitTwo("r6", "#mock malformed times=1", "#mock reset times=1");
  auto run = WaitForTerminal(server_->url(), a);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("steps").as_array()[0].at("attempts").as_int64(), 2);
  // A reset on a reused keep-alive connection is retried once by libcurl itself before
  // keel sees it; either way the mock saw the reset call and then an answered one.
  EXPECT_EQ(MockCount(mock_->url(), "second r6\n#mock reset times=1"), 2);
}

TEST_F(EngineTest, SecretsNeverReachTheLogs) {
  const auto id = SubmitTwo("r7", "#mock fail=401", "x");
  ASSERT_EQ(Status(WaitForTerminal(server_->url(), id)), "failed");
  server_->Terminate();
  const auto lines = server_->process().Lines();
  ASSERT_FALSE(lines.empty());
  for (const auto& l : lines) {
    EXPECT_EQ(l.find("sk-test-SECRET-do-not-log"), std::string::npos) << l;
    // Every line is one JSON object.
    boost::system::error_code ec;
    auto v = json::parse(l, ec);
    EXPECT_FALSE(ec) << l;
    EXPECT_TRUE(v.is_object()) << l;
  }
}

TEST_F(EngineTest, StepLogLinesCarryRunStepAndAttempt) {
  const auto id = SubmitTwo("r8", "#mock fail=500 times=1", "ok");
  ASSERT_EQ(Status(WaitForTerminal(server_->url(), id)), "succeeded");
  const auto line = server_->process().WaitForLine([&](const std::string& l) {
    return l.find("will retry") != std::string::npos && l.find(id) != std::string::npos;
  });
  ASSERT_FALSE(line.empty());
  auto v = json::parse(line);
  EXPECT_EQ(v.at("run_id").as_string(), id);
  EXPECT_EQ(v.at("step_id").as_string(), "first");
  EXPECT_EQ(v.at("attempt").as_int64(), 1);
  EXPECT_EQ(v.at("error_type").as_string(), "server_error");
}

TEST_F(EngineTest, SigtermDrainsAndTheRunFinishesAfterRestart) {
  const auto id = SubmitTwo("r9", "#mock sleep=300", "ok");
  ASSERT_TRUE(Eventually([&] { return MockCount(mock_->url(), "first r9\n#mock sleep=300") == 1; }));
  EXPECT_EQ(server_->Terminate(), 0);
  server_ = std::make_unique<KeelServer>(dir_.path(), MockBackedConfig(mock_->url()));
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  // The step in flight at SIGTERM finished and was checkpointed before the exit.
  EXPECT_EQ(MockCount(mock_->url(), "first r9\n#mock sleep=300"), 1);
}

// A run whose stored JSON cannot be read back (damaged on disk, or written by another
// version) is that run's failure: the queue, the list, GET and cancel go on.
TEST(UnreadableRecordTest, ADamagedRunFailsAloneAndTheNodeKeepsServing) {
  TempDir dir;
  const std::string config =
      "storage: sqlite://data/keel.db\n"
      "engine: {workers: 2, lease_timeout: 2s, poll_interval: 50ms}\n"
      "pipelines:\n"
      "  park:\n"
      "    steps:\n"
      "      - id: wait\n"
      "        wait_for_signal: {name: go}\n"
      "  echo:\n"
      "    steps:\n"
      "      - id: out\n"
      "        transform: {got: \"{{input.v}}\"}\n";
  auto server = std::make_unique<KeelServer>(dir.path(), config);
  ASSERT_NE(server->port(), 0);
  auto submit = [&](const std::string& pipeline) {
    auto r = HttpPostJson(server->url() + "/v1/runs",
                          json::object{{"pipeline", pipeline}, {"input", {{"v", 1}}}});
    EXPECT_EQ(r.status, 201) << r.raw;
    return std::string(r.body.at("id").as_string());
  };
  const std::string due = submit("park");     // damaged, then made due: leased next
  const std::string parked = submit("park");  // damaged, left waiting
  for (const auto& id : {due, parked}) {
    ASSERT_TRUE(Eventually(
        [&] { return Status(HttpGet(server->url() + "/v1/runs/" + id).body) == "waiting"; }));
  }
  ASSERT_EQ(server->Terminate(), 0);
  const std::string sql = "UPDATE runs SET input = '{\"m\":1e400}' WHERE id IN ('" + due + "', '" +
                          parked + "'); UPDATE queue SET due_at = 0 WHERE run_id = '" + due + "';";
  {
    std::FILE* f = std::fopen((dir.path() + "/damage.sql").c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs(sql.c_str(), f);
    std::fclose(f);
  }
  ASSERT_EQ(std::system(("sqlite3 -bail '" + dir.path() + "/data/keel.db' < '" + dir.path() +
                         "/damage.sql'")
                            .c_str()),
            0);
  server = std::make_unique<KeelServer>(dir.path(), config);
  ASSERT_NE(server->port(), 0);

  auto run = WaitForTerminal(server->url(), due);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  const std::string message(run.at("error").at("message").as_string());
  EXPECT_NE(message.find("runs.input"), std::string::npos) << message;
  EXPECT_NE(message.find(due), std::string::npos) << message;
  EXPECT_EQ(message.find("/usr/include"), std::string::npos) << message;
  // Every other run goes on.
  const std::string fine = submit("echo");
  EXPECT_EQ(Status(WaitForTerminal(server->url(), fine)), "succeeded");
  auto list = HttpGet(server->url() + "/v1/runs?limit=100");
  ASSERT_EQ(list.status, 200) << list.raw;
  EXPECT_EQ(list.body.at("data").as_array().size(), 3u);
  auto got = HttpGet(server->url() + "/v1/runs/" + parked);
  ASSERT_EQ(got.status, 200) << got.raw;
  EXPECT_EQ(Status(got.body), "waiting");
  EXPECT_NE(json::serialize(got.body.at("error")).find("runs.input"), std::string::npos) << got.raw;
  auto cancelled = HttpPost(server->url() + "/v1/runs/" + parked + "/cancel", "");
  EXPECT_EQ(cancelled.status, 200) << cancelled.raw;
  EXPECT_EQ(HttpPost(server->url() + "/v1/runs/" + due + "/cancel", "").status, 409);
  EXPECT_EQ(HttpGet(server->url() + "/readyz").status, 200);
  const std::string metrics = HttpGet(server->url() + "/metrics").raw;
  EXPECT_NE(metrics.find("keel_storage_up 1"), std::string::npos);
}

}  // namespace
}  // namespace keel::testing
