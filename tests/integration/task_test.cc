// Task steps and the external-worker API through real processes: a keel serve, the
// Python worker of examples/worker.py, and plain HTTP calls standing in for a worker
// where the test needs to hold a token, answer late or answer wrongly.

#include <gtest/gtest.h>

#include <signal.h>

#include <thread>

#include "helpers.h"

namespace keel::testing {
namespace {

using namespace workers;  // NOLINT(google-build-using-namespace): the helpers of this file

// Every task pipeline passes its whole input to the worker and returns its output.
std::string TaskPipeline(const std::string& name, const std::string& queue, const std::string& extra_step_keys = {}) {
  return "  " + name +
         ":\n"
         "    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}\n"
         "    steps:\n"
         "      - id: work\n"
         "        task: {queue: " + queue + ", input: \"{{input}}\", heartbeat_timeout: 300ms}\n" + extra_step_keys +
         "      - id: done\n"
         "        transform: {result: \"{{steps.work.output}}\"}\n";
}

std::string TaskConfig(int workers = 4) {
  const std::string pipelines = TaskPipeline("task", "q") + TaskPipeline("strict", "strict") +
                                TaskPipeline("fallback", "fallback", "        on_error: {output: {fallback: true}}\n") +
                                TaskPipeline("bounded", "bounded", "        timeout: 500ms\n") +
                                "  plain:\n"
                                "    steps:\n"
                                "      - id: only\n"
                                "        transform: {echo: \"{{input.text}}\"}\n";
  // No step here calls a model: the provider's address is never dialled.
  return MockBackedConfig("http://127.0.0.1:9", pipelines,
                          "engine: {workers: " + std::to_string(workers) + ", lease_timeout: 1s, poll_interval: 50ms}");
}

class TaskTest : public ::testing::Test {
 protected:
  void Start(int workers = 4) {
    server_ = std::make_unique<KeelServer>(dir_.path(), TaskConfig(workers));
    ASSERT_NE(server_->port(), 0);
  }
  void SetUp() override { Start(); }
  const std::string& url() { return server_->url(); }

  // One long poll of `queue` (up to 5 s) for a task; null (and a test failure) when none came.
  json::value Take(const std::string& queue, const std::string& worker_id = "http-worker") {
    auto r = Poll(url(), queue, worker_id, 5000);
    EXPECT_EQ(r.status, 200) << r.raw;
    return r.status == 200 ? r.body : json::value(nullptr);
  }

  TempDir dir_;
  std::unique_ptr<KeelServer> server_;
};

class WorkerTest : public TaskTest {
 protected:
  void SetUp() override {
    if (Python3().empty()) GTEST_SKIP() << "no python3 on PATH";
    TaskTest::SetUp();
  }
  static bool Logged(Process& worker, const std::string& text) {
    for (const auto& l : worker.Lines()) {
      if (l.find(text) != std::string::npos) return true;
    }
    return false;
  }
};

TEST_F(WorkerTest, ThePythonWorkerCompletesTheTaskAndItsOutputIsTheSteps) {
  const auto id = Submit(url(), "task", json::object{{"text", "hello"}});
  auto worker = StartWorker(url(), "q", "upper", {"--once"});
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"text", "HELLO"}}}}));
  const auto* work = FindStep(run, "work");
  ASSERT_NE(work, nullptr);
  EXPECT_EQ(work->at("output"), (json::value{{"text", "HELLO"}}));
  EXPECT_EQ(work->at("worker").as_string(), "py-upper");
  EXPECT_EQ(work->at("attempts").as_int64(), 1);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(5)), 0);
  EXPECT_TRUE(Logged(*worker, "task completed"));
}

TEST_F(WorkerTest, HeartbeatsKeepTheLeaseOfATaskLongerThanItsHeartbeatTimeout) {
  // The task takes 1 s against a heartbeat timeout of 300 ms: only heartbeats keep it.
  const auto id = Submit(url(), "task", json::object{{"seconds", 1}});
  auto worker = StartWorker(url(), "q", "slow", {"--once"});
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"seconds", 1}}}}));
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), 1);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(5)), 0);
  EXPECT_FALSE(Logged(*worker, "lease lost"));
}

TEST_F(WorkerTest, ARetryableFailureIsRetriedWithANewTaskAndSigtermStopsAnIdleWorker) {
  const auto id = Submit(url(), "task", json::object{{"key", "k1"}});
  auto worker = StartWorker(url(), "q", "flaky");
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"key", "k1"}}}}));
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), 2);
  EXPECT_TRUE(Logged(*worker, "task failed"));
  worker->Signal(SIGTERM);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(5)), 0);
  EXPECT_TRUE(Logged(*worker, "exiting"));
}

TEST_F(WorkerTest, ANonRetryableFailureFailsTheRunWithTheWorkersMessage) {
  const auto id = Submit(url(), "strict", json::object{{"text", "x"}});
  auto worker = StartWorker(url(), "strict", "fail", {"--once"});
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(run.at("error").at("type").as_string(), "server_error");
  EXPECT_NE(std::string(run.at("error").at("message").as_string()).find("the fail handler always fails"),
            std::string::npos)
      << json::serialize(run);
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), 1);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(5)), 0);
}

TEST_F(WorkerTest, AWorkerThatDiesMidTaskLosesItsLeaseAndAnotherWorkerFinishesTheStep) {
  const auto id = Submit(url(), "task", json::object{{"text", "again"}});
  auto crasher = StartWorker(url(), "q", "exit");
  EXPECT_EQ(crasher->Wait(std::chrono::seconds(10)), 1);  // took the task, then os._exit(1)
  auto worker = StartWorker(url(), "q", "echo", {"--once"});
  // No heartbeat comes for the first task: after 300 ms its attempt fails and the step's
  // retry queues a new task, which the second worker takes.
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(8));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"text", "again"}}}}));
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), 2);
  EXPECT_EQ(FindStep(run, "work")->at("worker").as_string(), "py-echo");
}

TEST_F(WorkerTest, AWorkerWhoseLeaseExpiredDropsItsResultAndGoesOn) {
  ASSERT_FALSE(Submit(url(), "task", json::object{{"seconds", 0.5}}).empty());
  auto worker = StartWorker(url(), "q", "slow");
  ASSERT_FALSE(worker->WaitForLine([](const std::string& l) { return l.find("task leased") != std::string::npos; })
                   .empty());
  // Frozen for twice the heartbeat timeout: its lease lapses, its answer comes too late.
  worker->Signal(SIGSTOP);
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  worker->Signal(SIGCONT);
  EXPECT_FALSE(worker->WaitForLine([](const std::string& l) {
                       return l.find("lease lost, result dropped") != std::string::npos;
                     }, std::chrono::seconds(5))
                   .empty());
  // It went on polling (it may hold the step's next task by now): SIGTERM ends it cleanly.
  worker->Signal(SIGTERM);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(5)), 0);
}

TEST_F(TaskTest, APollOnAnEmptyQueueAnswers204AfterItsWait) {
  auto at = std::chrono::steady_clock::now();
  auto r = Poll(url(), "nothing-here", "w", 400);
  auto took = std::chrono::steady_clock::now() - at;
  EXPECT_EQ(r.status, 204) << r.raw;
  EXPECT_TRUE(r.raw.empty()) << r.raw;
  EXPECT_GE(took, std::chrono::milliseconds(380));
  EXPECT_LT(took, std::chrono::seconds(10));  // not the minute a poll may wait at most

  at = std::chrono::steady_clock::now();
  EXPECT_EQ(Poll(url(), "nothing-here", "w", 0).status, 204);
  EXPECT_LT(std::chrono::steady_clock::now() - at, std::chrono::seconds(5));
}

TEST_F(TaskTest, APollWithABadBodyIsRefusedNamingTheField) {
  const std::string poll = url() + "/v1/tasks/poll";
  struct Case {
    json::value body;
    std::string param;
  };
  const std::vector<Case> cases = {
      {json::object{{"worker_id", "w"}}, "queue"},
      {json::object{{"queue", ""}, {"worker_id", "w"}}, "queue"},
      {json::object{{"queue", 7}, {"worker_id", "w"}}, "queue"},
      {json::object{{"queue", "q"}}, "worker_id"},
      {json::object{{"queue", "q"}, {"worker_id", std::string(201, 'w')}}, "worker_id"},
      {json::object{{"queue", "q"}, {"worker_id", "w"}, {"wait_ms", -1}}, "wait_ms"},
      {json::object{{"queue", "q"}, {"worker_id", "w"}, {"wait_ms", 60001}}, "wait_ms"},
      {json::object{{"queue", "q"}, {"worker_id", "w"}, {"wait_ms", "1000"}}, "wait_ms"},
      {json::object{{"queue", "q"}, {"worker_id", "w"}, {"wait_ms", 1.5}}, "wait_ms"},
  };
  for (const auto& c : cases) {
    auto r = HttpPostJson(poll, c.body);
    EXPECT_EQ(r.status, 400) << json::serialize(c.body) << " -> " << r.raw;
    if (r.status == 400) {
      EXPECT_EQ(r.body.at("error").at("type").as_string(), "invalid_request") << r.raw;
      EXPECT_EQ(r.body.at("error").at("param"), json::value(c.param)) << json::serialize(c.body) << " -> " << r.raw;
    }
  }
  EXPECT_EQ(HttpPost(poll, "").status, 400);
  EXPECT_EQ(HttpPost(poll, "[1]").status, 400);
  EXPECT_EQ(HttpPost(poll, "{not json").status, 400);
}

TEST_F(TaskTest, AnUnknownTokenIs404) {
  EXPECT_EQ(TaskCall(url(), "tsk_unknown", "heartbeat").status, 404);
  EXPECT_EQ(TaskCall(url(), "tsk_unknown", "complete", json::object{{"output", 1}}).status, 404);
  auto r = TaskCall(url(), "tsk_unknown", "fail",
                    json::object{{"error", {{"type", "server_error"}, {"message", "x"}}}, {"retryable", false}});
  EXPECT_EQ(r.status, 404) << r.raw;
  EXPECT_EQ(r.body.at("error").at("type").as_string(), "not_found") << r.raw;
}

TEST_F(TaskTest, AWaitingRunShowsItsTaskAndAnsweringItFinishesTheRun) {
  const auto id = Submit(url(), "task", json::object{{"text", "hi"}});
  auto waiting = AwaitRun(url(), id, [](const json::value& r) { return WaitingOn(r, "task"); });
  ASSERT_TRUE(waiting) << json::serialize(HttpGet(url() + "/v1/runs/" + id).body);
  EXPECT_EQ(waiting->at("waiting").at("step_id").as_string(), "work");
  EXPECT_EQ(waiting->at("waiting").at("queue").as_string(), "q");

  const auto task = Take("q");
  ASSERT_TRUE(task.is_object());
  EXPECT_EQ(task.at("run_id").as_string(), id);
  EXPECT_EQ(task.at("step_id").as_string(), "work");
  EXPECT_EQ(task.at("attempt").as_int64(), 1);
  EXPECT_EQ(task.at("input"), (json::value{{"text", "hi"}}));
  EXPECT_EQ(task.at("heartbeat_timeout_ms").as_int64(), 300);
  const std::string token(task.at("token").as_string());
  EXPECT_EQ(TaskCall(url(), token, "heartbeat").status, 200);
  // Taking the task wakes the run for a moment (it parks again with the task's lease as
  // its timer); it is waiting again, not ended or failed.
  EXPECT_TRUE(AwaitRun(url(), id, [](const json::value& r) { return WaitingOn(r, "task"); }))
      << json::serialize(HttpGet(url() + "/v1/runs/" + id).body);
  // complete needs an output.
  EXPECT_EQ(TaskCall(url(), token, "complete", json::object{{"result", 1}}).status, 400);
  auto done = TaskCall(url(), token, "complete", json::object{{"output", {{"answer", 42}}}});
  ASSERT_EQ(done.status, 200) << done.raw;
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"answer", 42}}}}));
  // The task has ended: a second answer is too late.
  EXPECT_EQ(TaskCall(url(), token, "complete", json::object{{"output", 1}}).status, 409);
  EXPECT_EQ(TaskCall(url(), token, "heartbeat").status, 409);
}

TEST_F(TaskTest, AnAnswerAfterTheLeaseExpiredIs409AndTheStepGetsANewTask) {
  const auto id = Submit(url(), "task", json::object{{"text", "late"}});
  const auto first = Take("q", "first");
  ASSERT_TRUE(first.is_object());
  const std::string token1(first.at("token").as_string());
  // No heartbeat: 300 ms later the attempt fails and the step's retry queues a new task.
  auto retried = AwaitRun(
      url(), id,
      [](const json::value& r) {
        const auto* work = FindStep(r, "work");
        return work && work->at("attempts").as_int64() >= 2;
      },
      std::chrono::seconds(5));
  EXPECT_TRUE(retried) << "the task's lease expired 300 ms after it was leased, yet the step was not retried: "
                       << json::serialize(HttpGet(url() + "/v1/runs/" + id).body);
  auto late = TaskCall(url(), token1, "complete", json::object{{"output", {{"from", "first"}}}});
  EXPECT_EQ(late.status, 409) << late.raw;
  EXPECT_EQ(TaskCall(url(), token1, "heartbeat").status, 409);
  if (!retried) return;

  const auto second = Take("q", "second");
  ASSERT_TRUE(second.is_object());
  const std::string token2(second.at("token").as_string());
  EXPECT_NE(token2, token1);
  EXPECT_EQ(second.at("attempt").as_int64(), 2);
  ASSERT_EQ(TaskCall(url(), token2, "complete", json::object{{"output", {{"from", "second"}}}}).status, 200);
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"from", "second"}}}}));
  EXPECT_EQ(FindStep(run, "work")->at("worker").as_string(), "second");
}

TEST_F(TaskTest, AFailureThatIsNotRetryableFailsTheRunOrAppliesOnError) {
  const auto strict = Submit(url(), "strict", json::object{{"n", 1}});
  const auto fallback = Submit(url(), "fallback", json::object{{"n", 2}});
  const json::value fail = json::object{{"error", {{"type", "server_error"}, {"message", "disk on fire"}}},
                                        {"retryable", false}};
  for (const std::string queue : {"strict", "fallback"}) {
    const auto task = Take(queue);
    ASSERT_TRUE(task.is_object());
    auto r = TaskCall(url(), std::string(task.at("token").as_string()), "fail", fail);
    ASSERT_EQ(r.status, 200) << r.raw;
  }
  auto run = WaitForTerminal(url(), strict, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(run.at("error").at("type").as_string(), "server_error");
  EXPECT_NE(std::string(run.at("error").at("message").as_string()).find("disk on fire"), std::string::npos);
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), 1);

  run = WaitForTerminal(url(), fallback, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", {{"fallback", true}}}}));
}

TEST_F(TaskTest, ARetryableFailureQueuesANewTaskForTheNextAttempt) {
  const auto id = Submit(url(), "task", json::object{{"text", "again"}});
  const auto first = Take("q");
  ASSERT_TRUE(first.is_object());
  const std::string token1(first.at("token").as_string());
  auto r = TaskCall(url(), token1, "fail",
                    json::object{{"error", {{"type", "server_error"}, {"message", "try later"}}}, {"retryable", true}});
  ASSERT_EQ(r.status, 200) << r.raw;
  const auto second = Take("q");
  ASSERT_TRUE(second.is_object());
  EXPECT_NE(second.at("token").as_string(), token1);
  EXPECT_EQ(second.at("attempt").as_int64(), 2);
  EXPECT_EQ(second.at("input"), (json::value{{"text", "again"}}));
  ASSERT_EQ(TaskCall(url(), std::string(second.at("token").as_string()), "complete", json::object{{"output", "ok"}}).status,
            200);
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"result", "ok"}}));
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), 2);
}

TEST_F(TaskTest, AStepTimeoutDoesNotBurnTheRetriesThatFollowIt) {
  // Nobody polls: the first attempt ends at the step's timeout (500 ms). Then either the
  // timeout bounds each attempt (StepConfig::timeout: "Bound on one attempt") and attempt
  // 2 queues a task a worker can still take, or it bounds the whole wait and the step
  // fails for good after one attempt. Retries that fail at once without queueing a task
  // anyone could take are neither.
  const auto id = Submit(url(), "bounded", json::object{{"text", "slowpoke"}});
  auto after = AwaitRun(
      url(), id,
      [](const json::value& r) {
        const auto* work = FindStep(r, "work");
        return Status(r) == "failed" || Status(r) == "dead_lettered" ||
               (Status(r) == "waiting" && work && work->at("attempts").as_int64() >= 2);
      },
      std::chrono::seconds(5));
  ASSERT_TRUE(after) << json::serialize(HttpGet(url() + "/v1/runs/" + id).body);
  if (Status(*after) != "waiting") {
    EXPECT_EQ(FindStep(*after, "work")->at("attempts").as_int64(), 1)
        << "the step's timeout had passed, yet it was retried with no time left: " << json::serialize(*after);
    return;
  }
  const auto task = Take("bounded");
  ASSERT_TRUE(task.is_object());
  EXPECT_EQ(task.at("attempt").as_int64(), 2);
  ASSERT_EQ(TaskCall(url(), std::string(task.at("token").as_string()), "complete", json::object{{"output", 2}}).status,
            200);
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
}

TEST_F(TaskTest, ARunWaitingForItsTaskHoldsNoEngineWorker) {
  // One engine worker only: if the waiting run held it, the plain run could not start.
  server_.reset();
  Start(/*workers=*/1);
  const auto waiting = Submit(url(), "task", json::object{{"text", "wait"}});
  ASSERT_TRUE(AwaitRun(url(), waiting, [](const json::value& r) { return WaitingOn(r, "task"); }));
  const auto plain = Submit(url(), "plain", json::object{{"text", "meanwhile"}});
  auto run = WaitForTerminal(url(), plain, std::chrono::seconds(5));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::value{{"echo", "meanwhile"}}));
  EXPECT_EQ(Status(HttpGet(url() + "/v1/runs/" + waiting).body), "waiting");

  const auto task = Take("q");
  ASSERT_TRUE(task.is_object());
  ASSERT_EQ(TaskCall(url(), std::string(task.at("token").as_string()), "complete", json::object{{"output", 1}}).status,
            200);
  run = WaitForTerminal(url(), waiting, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
}

}  // namespace
}  // namespace keel::testing
