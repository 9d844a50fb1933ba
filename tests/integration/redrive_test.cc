// Redrive recovers every step kind through real processes: a run that failed in an
// `http`, `task` or `pipeline` step runs that step again when redriven (a new call, a
// new task, a new child run), never its stored failure replayed. The engine unit tests
// (src/engine/engine_test.cc, Redrive*) cover llm, map, wait_for_signal, transform and
// validate on the manual clock.

#include <gtest/gtest.h>

#include "helpers.h"

namespace keel::testing {
namespace {

class RedriveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mock_ = std::make_unique<MockLlm>();
    const std::string extra =
        "  tool:\n"
        "    retry: {max_attempts: 1}\n"
        "    steps:\n"
        "      - id: call\n"
        "        http:\n"
        "          url: " +
        mock_->url() +
        "/v1/chat/completions\n"
        "          body: {model: mock-1, messages: [{role: user, content: \"#mock fail=503 "
        "times=1\"}]}\n"
        "  work:\n"
        "    steps:\n"
        "      - id: job\n"
        "        task: {queue: redrive, input: {n: 1}}\n"
        "  child:\n"
        "    retry: {max_attempts: 1}\n"
        "    steps:\n"
        "      - id: ask\n"
        "        llm: {route: main, messages: [{role: user, content: \"child\\n#mock fail=503 "
        "times=1\"}]}\n"
        "  parent:\n"
        "    steps:\n"
        "      - id: sub\n"
        "        pipeline: {name: child, input: {}}\n";
    server_ = std::make_unique<KeelServer>(dir_.path(), MockBackedConfig(mock_->url(), extra));
    ASSERT_NE(server_->port(), 0);
  }
  std::string Submit(const std::string& pipeline) {
    auto r = HttpPostJson(server_->url() + "/v1/runs",
                          json::object{{"pipeline", pipeline}, {"input", json::object{}}});
    EXPECT_EQ(r.status, 201) << r.raw;
    return r.status == 201 ? std::string(r.body.at("id").as_string()) : std::string();
  }
  void Redrive(const std::string& id) {
    auto r = HttpPost(server_->url() + "/v1/runs/" + id + "/redrive", "");
    ASSERT_EQ(r.status, 200) << r.raw;
  }
  json::value Poll() {
    auto r =
        HttpPostJson(server_->url() + "/v1/tasks/poll",
                     json::object{{"queue", "redrive"}, {"worker_id", "w"}, {"wait_ms", 5000}});
    EXPECT_EQ(r.status, 200) << r.raw;
    return r.status == 200 ? r.body : json::value();
  }

  TempDir dir_;
  std::unique_ptr<MockLlm> mock_;
  std::unique_ptr<KeelServer> server_;
};

TEST_F(RedriveTest, ARunFailedInAnHttpStepCallsTheToolAgain) {
  const std::string id = Submit("tool");
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "dead_lettered") << json::serialize(run);
  Redrive(id);
  run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(MockCount(mock_->url(), "#mock fail=503 times=1"), 2);
}

TEST_F(RedriveTest, ARunFailedInATaskStepGetsANewTask) {
  const std::string id = Submit("work");
  const json::value first = Poll();
  ASSERT_TRUE(first.is_object());
  const std::string token(first.at("token").as_string());
  auto failed =
      HttpPostJson(server_->url() + "/v1/tasks/" + token + "/fail",
                   json::object{{"error", {{"type", "invalid_request"}, {"message", "bad"}}},
                                {"retryable", false}});
  ASSERT_EQ(failed.status, 200) << failed.raw;
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);

  Redrive(id);
  // Before: the stored failure was replayed in milliseconds and no task was queued.
  const json::value second = Poll();
  ASSERT_TRUE(second.is_object());
  EXPECT_NE(second.at("token").as_string(), token);
  EXPECT_EQ(second.at("attempt").as_int64(), 2);
  auto done = HttpPostJson(
      server_->url() + "/v1/tasks/" + std::string(second.at("token").as_string()) + "/complete",
      json::object{{"output", {{"ok", true}}}});
  ASSERT_EQ(done.status, 200) << done.raw;
  run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"ok", true}}));
}

TEST_F(RedriveTest, ARunFailedInAPipelineStepMakesANewChildRun) {
  const std::string id = Submit("parent");
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  Redrive(id);
  run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const std::string child(run.at("steps").as_array()[0].at("run_id").as_string());
  EXPECT_EQ(Status(HttpGet(server_->url() + "/v1/runs/" + child).body), "succeeded");
}

}  // namespace
}  // namespace keel::testing
