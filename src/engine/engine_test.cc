// The engine in-process, on a ManualClock: timers (sleep, signal timeouts, task step
// timeouts, heartbeat expiry, retry backoff) fire when the test advances the clock, never
// because real time passed. The store, the gateway (the built-in mock provider) and the
// engine all read the same clock.
//
// Real time is spent only to let the worker threads act: Soon() polls for an effect
// of something the test did, and NothingHappens() gives the workers a few poll intervals
// to (not) act before asserting that a run is still where it was.

#include "keel/engine/engine.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <boost/asio/post.hpp>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/ids.h"
#include "keel/core/json.h"
#include "keel/core/random.h"
#include "keel/engine/pipeline.h"
#include "keel/gateway/gateway.h"
#include "keel/store/sqlite_store.h"
#include "keel/store/store.h"
#include "keel/testing/assert.h"
#include "keel/testing/http.h"     // Eventually
#include "keel/testing/process.h"  // TempDir
#include "provider.h"                // gateway::detail::Provider, for HeldProvider

namespace keel::engine {
namespace {

using namespace std::chrono_literals;
using store::RunStatus;
using ::testing::HasSubstr;

// Real time: how long a test waits for the workers before it gives up (only reached when
// it fails), and how long it lets them act before asserting that nothing changed.
constexpr auto kPatience = 30s;  // generous: a sanitizer build on a loaded 2-core machine
constexpr auto kPollInterval = 5ms;
constexpr auto kQuiet = 30ms;  // six poll intervals

class EngineTest : public ::testing::Test {
 protected:
  // Builds store, gateway and engine from `pipelines_yaml` (keel.yaml text with the
  // `pipelines`; a `type: mock` provider named `mock` is added) with `workers` workers
  // polling every kPollInterval, and starts the engine. Leases (30s) are timed by the
  // manual clock too: tests advance it only while no run is leased.
  void Start(const std::string& pipelines_yaml, int workers = 2) {
    const std::string yaml = "providers:\n  mock: {type: mock}\n" + extra_providers_ + pipelines_yaml;
    auto config = ParseConfig(
        yaml, [](const std::string&) { return std::nullopt; }, "engine_test.yaml");
    ASSERT_OK(config);
    config_ = std::move(config).value();
    config_.engine.workers = workers;
    config_.engine.poll_interval = kPollInterval;
    if (configure_) configure_(config_);

    store::SqliteOptions sopts;
    sopts.path = dir_.path() + "/keel.db";
    auto store = store::OpenSqliteStore(sopts, clock_, random_);
    ASSERT_OK(store);
    store_ = std::move(store).value();
    gateway::GatewayDeps deps;
    deps.make_provider = make_provider_;
    auto gateway = gateway::Gateway::Create(config_, registry_, clock_, random_, std::move(deps));
    ASSERT_OK(gateway);
    gateway_ = std::move(gateway).value();
    engine_ = Engine::Create(config_.engine, *store_, *gateway_, clock_, random_, registry_);
    engine_->Start();
  }

  void TearDown() override {
    if (engine_) engine_->Stop();
    engine_.reset();
    gateway_.reset();
    store_.reset();
  }

  // Submits a run of `pipeline` as the API does, and wakes the workers.
  std::string Submit(const std::string& pipeline, json::value input = json::object{}) {
    const auto it = config_.pipelines.find(pipeline);
    EXPECT_NE(it, config_.pipelines.end()) << pipeline;
    if (it == config_.pipelines.end()) return "";
    store::NewRun run;
    run.id = NewRunId(clock_.Now(), random_);
    run.pipeline = pipeline;
    run.input = std::move(input);
    run.definition = DefinitionToJson(it->second, &config_.pipelines);
    auto submitted = store_->SubmitRun(run);
    EXPECT_TRUE(submitted.ok()) << KEEL_TEST_RESULT_MSG(submitted);
    engine_->Notify();
    return run.id;
  }

  store::RunRecord Get(const std::string& id) {
    auto r = store_->GetRun(id);
    EXPECT_TRUE(r.ok()) << KEEL_TEST_RESULT_MSG(r);
    return r.ok() ? std::move(r).value() : store::RunRecord{};
  }

  // Polls `fn` (real time, for the workers) until it holds; false after kPatience.
  static bool Soon(const std::function<bool()>& fn) {
    return testing::Eventually(fn,
                               std::chrono::duration_cast<std::chrono::milliseconds>(kPatience));
  }

  // Waits (real time, for the workers) until run `id` is in `status`.
  ::testing::AssertionResult Reaches(const std::string& id, RunStatus status) {
    RunStatus last = RunStatus::kQueued;
    const bool ok = Soon([&] {
      auto r = store_->GetRun(id);
      if (r.ok()) last = r->status;
      return r.ok() && r->status == status;
    });
    if (ok) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "run " << id << " is " << store::RunStatusName(last)
                                         << ", not " << store::RunStatusName(status);
  }

  // Lets the workers act for a few poll intervals (a worker that could lease the run would
  // have), then says whether run `id` is still `status` with no new event.
  ::testing::AssertionResult NothingHappens(const std::string& id, RunStatus status) {
    auto before = store_->ListEvents(id, 0, 1000);
    engine_->Notify();
    std::this_thread::sleep_for(kQuiet);
    auto after = store_->ListEvents(id, 0, 1000);
    const auto run = Get(id);
    if (run.status != status) {
      return ::testing::AssertionFailure()
             << "run " << id << " is " << store::RunStatusName(run.status) << ", not "
             << store::RunStatusName(status);
    }
    if (!before.ok() || !after.ok() || before->size() != after->size()) {
      return ::testing::AssertionFailure() << "run " << id << " logged new events";
    }
    return ::testing::AssertionSuccess();
  }

  static const store::StepRecord* Step(const store::RunRecord& run, const std::string& step_id) {
    for (const auto& s : run.steps) {
      if (s.step_id == step_id) return &s;
    }
    return nullptr;
  }

  static std::string Kind(const store::RunRecord& run) {
    if (!run.waiting.is_object()) return "";
    const auto* k = run.waiting.as_object().if_contains("kind");
    return k && k->is_string() ? std::string(k->as_string()) : "";
  }

  // Set before Start: changes the parsed config; makes providers (null: the built-in one).
  std::function<void(Config&)> configure_;
  std::string extra_providers_;  // more entries of `providers`, each line indented two spaces
  std::function<std::unique_ptr<gateway::detail::Provider>(const ProviderConfig&)> make_provider_;

  testing::TempDir dir_;
  ManualClock clock_;
  SeededRandom random_{7};
  prometheus::Registry registry_;
  Config config_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<gateway::Gateway> gateway_;
  std::unique_ptr<Engine> engine_;
  const std::chrono::steady_clock::time_point real_start_ = std::chrono::steady_clock::now();

  // Real time spent since the fixture was built.
  std::chrono::milliseconds RealElapsed() const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 real_start_);
  }
};

TEST_F(EngineTest, SleepWaitsForTheClockNotForRealTime) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  nap:
    steps:
      - id: pause
        sleep: {for: 1h}
      - id: done
        transform: {woke: true}
)"));
  const Timestamp t0 = clock_.Now();
  const std::string id = Submit("nap");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto run = Get(id);
  EXPECT_EQ(Kind(run), "sleep");
  EXPECT_EQ(run.waiting.at("step_id"), "pause");
  EXPECT_EQ(run.waiting.at("until_ms").to_number<int64_t>(), ToMillis(t0 + 1h));
  ASSERT_NE(Step(run, "pause"), nullptr);
  EXPECT_EQ(Step(run, "pause")->status, store::StepStatus::kWaiting);

  clock_.Advance(1h - 1ms);
  EXPECT_TRUE(NothingHappens(id, RunStatus::kWaiting));

  clock_.Advance(1ms);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  run = Get(id);
  EXPECT_EQ(run.output, (json::object{{"woke", true}}));
  ASSERT_NE(Step(run, "pause"), nullptr);
  EXPECT_EQ(Step(run, "pause")->output.at("output").at("slept_ms").to_number<int64_t>(), 3'600'000);
  EXPECT_EQ(Step(run, "pause")->attempts, 1);  // parking is not another attempt
  EXPECT_TRUE(run.waiting.is_null());
  EXPECT_LT(RealElapsed(), 1s);
}

TEST_F(EngineTest, SignalTimeoutGivesTheDefault) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  approve:
    steps:
      - id: wait
        wait_for_signal: {name: approval, timeout: 24h, default: {decision: reject}}
      - id: after
        transform: {decision: "{{steps.wait.output.decision}}"}
)"));
  const Timestamp t0 = clock_.Now();
  const std::string id = Submit("approve");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto run = Get(id);
  EXPECT_EQ(Kind(run), "signal");
  EXPECT_EQ(run.waiting.at("signal"), "approval");
  EXPECT_EQ(run.waiting.at("timeout_at_ms").to_number<int64_t>(), ToMillis(t0 + 24h));

  clock_.Advance(23h);
  EXPECT_TRUE(NothingHappens(id, RunStatus::kWaiting));

  clock_.Advance(24h);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  run = Get(id);
  EXPECT_EQ(run.output, (json::object{{"decision", "reject"}}));
  ASSERT_NE(Step(run, "wait"), nullptr);
  EXPECT_EQ(Step(run, "wait")->output.at("timed_out"), true);
  EXPECT_LT(RealElapsed(), 1s);
}

TEST_F(EngineTest, SignalTimeoutWithoutDefaultFailsTheRun) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  approve:
    steps:
      - id: wait
        wait_for_signal: {name: approval, timeout: 10m}
)"));
  const std::string id = Submit("approve");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  clock_.Advance(600s);
  ASSERT_TRUE(Reaches(id, RunStatus::kFailed));
  const auto run = Get(id);
  ASSERT_TRUE(run.error.has_value());
  EXPECT_EQ(run.error->code, ErrorCode::kTimeout);
  EXPECT_THAT(run.error->message, HasSubstr("approval"));
}

TEST_F(EngineTest, SignalCompletesAWaitingRunWithoutTheClock) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  approve:
    steps:
      - id: wait
        wait_for_signal: {name: go, timeout: 24h, default: {decision: reject}}
      - id: after
        transform: {decision: "{{steps.wait.output.decision}}"}
)"));
  const Timestamp t0 = clock_.Now();
  const std::string id = Submit("approve");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));

  auto sent = store_->SendSignal(id, "go", json::object{{"decision", "approve"}});
  ASSERT_OK(sent);
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(clock_.Now(), t0);  // nothing advanced it
  const auto run = Get(id);
  EXPECT_EQ(run.output, (json::object{{"decision", "approve"}}));
  ASSERT_NE(Step(run, "wait"), nullptr);
  EXPECT_EQ(Step(run, "wait")->output.at("signal"), "go");
  EXPECT_TRUE(run.signals.contains("go"));

  // The run ended: a late signal is refused.
  auto late = store_->SendSignal(id, "go", nullptr);
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code, ErrorCode::kConflict);
}

TEST_F(EngineTest, SignalSentBeforeTheWaitIsKept) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  later:
    steps:
      - id: pause
        sleep: {for: 1m}
      - id: wait
        wait_for_signal: {name: go}
)"));
  const std::string id = Submit("later");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  ASSERT_EQ(Kind(Get(id)), "sleep");
  ASSERT_OK(store_->SendSignal(id, "go", json::object{{"early", true}}));
  engine_->Notify();
  // The signal wakes the run, but the sleep is not over: it parks again.
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  clock_.Advance(60s);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Get(id).output, (json::object{{"early", true}}));
}

TEST_F(EngineTest, UntakenTaskFailsItsAttemptAfterTheStepTimeout) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: nobody, input: {n: 1}}
        timeout: 10s
        retry: {max_attempts: 1}
)"));
  const std::string id = Submit("work");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto run = Get(id);
  EXPECT_EQ(Kind(run), "task");
  EXPECT_EQ(run.waiting.at("queue"), "nobody");
  EXPECT_EQ(run.waiting.at("task"), "pending");

  clock_.Advance(10s - 1ms);
  EXPECT_TRUE(NothingHappens(id, RunStatus::kWaiting));

  clock_.Advance(1ms);
  ASSERT_TRUE(Reaches(id, RunStatus::kDeadLettered));
  run = Get(id);
  ASSERT_TRUE(run.error.has_value());
  EXPECT_EQ(run.error->code, ErrorCode::kTimeout);
  EXPECT_THAT(run.error->message, HasSubstr("step's timeout"));
  ASSERT_NE(Step(run, "job"), nullptr);
  EXPECT_EQ(Step(run, "job")->attempts, 1);
  // The expired task is no longer handed out.
  auto leased = store_->LeaseTask("nobody", "late-worker");
  ASSERT_OK(leased);
  EXPECT_FALSE(leased->has_value());
  EXPECT_LT(RealElapsed(), 1s);
}

TEST_F(EngineTest, TaskCompletedByAWorkerEndsTheWait) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: q, input: {n: "{{input.n}}"}}
      - id: after
        transform: {got: "{{steps.job.output.answer}}"}
)"));
  const std::string id = Submit("work", json::object{{"n", 41}});
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto task = store_->LeaseTask("q", "w1");
  ASSERT_OK(task);
  ASSERT_TRUE(task->has_value());
  EXPECT_EQ((*task)->run_id, id);
  EXPECT_EQ((*task)->input, (json::object{{"n", 41}}));
  ASSERT_OK(store_->CompleteTask((*task)->token, json::object{{"answer", 42}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Get(id).output, (json::object{{"got", 42}}));
}

// A crash in the moment a task step looks at its task again (after the task was taken)
// leaves the step `running`: the attempt is resumed, not counted again, and the task the
// worker holds is still the step's, so the worker's answer is taken.
TEST_F(EngineTest, ATaskStepInterruptedWhileItParksAgainResumesItsAttempt) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: q, input: {n: "{{input.n}}"}, heartbeat_timeout: 10m}
      - id: after
        transform: {got: "{{steps.job.output.answer}}"}
)"));
  const std::string id = Submit("work", json::object{{"n", 1}});
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  engine_->Stop();  // no worker of this engine runs from here on
  auto task = store_->LeaseTask("q", "w1");
  ASSERT_OK(task);
  ASSERT_TRUE(task->has_value());
  // The run woke to park again with the task's lease as its timer; a node took it, started
  // the step again and died before parking it.
  auto leased = store_->LeaseRun("dead-node", 30s);
  ASSERT_OK(leased);
  ASSERT_TRUE(leased->has_value());
  ASSERT_OK(store_->StartStep((*leased)->lease, "job"));
  ASSERT_EQ(StepStatusName(Step(Get(id), "job")->status), "running");
  clock_.Advance(31s);  // its lease expires; the task's (10m) does not
  engine_ = Engine::Create(config_.engine, *store_, *gateway_, clock_, random_, registry_);
  engine_->Start();
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  ASSERT_OK(store_->CompleteTask((*task)->token, json::object{{"answer", 42}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const auto run = Get(id);
  EXPECT_EQ(run.output, (json::object{{"got", 42}}));
  EXPECT_EQ(Step(run, "job")->attempts, 1);
  auto events = store_->ListEvents(id, 0, 1000);
  ASSERT_OK(events);
  int queued = 0;
  for (const auto& e : *events) queued += e.type == "TaskQueued";
  EXPECT_EQ(queued, 1) << "the interrupted attempt handed out a second task";
}

TEST_F(EngineTest, QuietTaskWorkerLosesTheTaskAtItsHeartbeatTimeout) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: q, heartbeat_timeout: 30s}
        timeout: 10m
        retry: {max_attempts: 1}
)"));
  const std::string id = Submit("work");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto first = store_->LeaseTask("q", "quiet");
  ASSERT_OK(first);
  ASSERT_TRUE(first->has_value());
  engine_->Notify();  // the lease wakes the run, which parks again until the lease ends
  ASSERT_TRUE(Soon([&] {
    const auto run = Get(id);
    return run.status == RunStatus::kWaiting && run.waiting.is_object() &&
           run.waiting.as_object().contains("worker");
  }));
  EXPECT_EQ(Get(id).waiting.at("task"), "leased");

  clock_.Advance(30s - 1ms);
  EXPECT_TRUE(NothingHappens(id, RunStatus::kWaiting));
  clock_.Advance(1ms);  // not the step's timeout (10m): the worker's heartbeat timeout
  ASSERT_TRUE(Reaches(id, RunStatus::kDeadLettered));
  const auto run = Get(id);
  ASSERT_TRUE(run.error.has_value());
  EXPECT_EQ(run.error->code, ErrorCode::kTimeout);
  EXPECT_THAT(run.error->message, HasSubstr("sent no heartbeat"));
  // Its late answer is dropped.
  auto late = store_->CompleteTask((*first)->token, json::object{{"late", true}});
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code, ErrorCode::kConflict);
}

TEST_F(EngineTest, QuietWorkersTaskIsHandedOutAgain) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: q, heartbeat_timeout: 30s}
        timeout: 10m
        retry: {max_attempts: 2, initial_backoff: 1s, max_backoff: 1s, jitter: 0}
)"));
  const std::string id = Submit("work");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto first = store_->LeaseTask("q", "quiet");
  ASSERT_OK(first);
  ASSERT_TRUE(first->has_value());
  engine_->Notify();
  // Leasing the task wakes the run, which parks again until the task's lease ends; the
  // clock moves only once it is parked (a worker holding the run would lose its lease).
  ASSERT_TRUE(Soon([&] {
    const auto run = Get(id);
    const auto* t = run.waiting.is_object() ? run.waiting.as_object().if_contains("task") : nullptr;
    return run.status == RunStatus::kWaiting && t && *t == "leased";
  }));
  clock_.Advance(30s);
  ASSERT_TRUE(Soon([&] {
    const auto run = Get(id);
    const auto* s = Step(run, "job");
    return s && s->status == store::StepStatus::kRetrying;
  }));
  clock_.Advance(1s);  // the backoff: attempt 2 queues a new task
  engine_->Notify();
  std::optional<store::TaskRecord> second;
  ASSERT_TRUE(Soon([&] {
    auto t = store_->LeaseTask("q", "prompt");
    if (t.ok() && t->has_value()) second = **t;
    return second.has_value();
  }));
  EXPECT_NE(second->token, (*first)->token);
  EXPECT_EQ(second->attempt, 2);
  ASSERT_OK(store_->CompleteTask(second->token, json::object{{"ok", true}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Get(id).output, (json::object{{"ok", true}}));
}

TEST_F(EngineTest, TaskRetryGetsItsOwnTimeout) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: q}
        timeout: 10s
        retry: {max_attempts: 2, initial_backoff: 1s, max_backoff: 1s, jitter: 0}
)"));
  const std::string id = Submit("work");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  clock_.Advance(10s);  // attempt 1: nobody took its task
  engine_->Notify();
  ASSERT_TRUE(Soon([&] {
    const auto run = Get(id);
    const auto* s = Step(run, "job");
    return s && s->status == store::StepStatus::kRetrying;
  }));
  clock_.Advance(1s);  // the backoff: attempt 2 queues its task, with 10s of its own
  engine_->Notify();
  ASSERT_TRUE(Soon([&] {
    const auto run = Get(id);
    const auto* s = Step(run, "job");
    return run.status == RunStatus::kWaiting && s && s->attempts == 2;
  })) << store::RunStatusName(Get(id).status)
      << ": " << Get(id).error.value_or(Error()).message;
  clock_.Advance(10s - 1ms);
  EXPECT_TRUE(NothingHappens(id, RunStatus::kWaiting));
  auto second = store_->LeaseTask("q", "w");
  ASSERT_OK(second);
  ASSERT_TRUE(second->has_value());
  EXPECT_EQ((*second)->attempt, 2);
  ASSERT_OK(store_->CompleteTask((*second)->token, json::object{{"ok", true}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
}

TEST_F(EngineTest, ParkedRunHoldsNoWorker) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  approve:
    steps:
      - id: wait
        wait_for_signal: {name: go}
  plain:
    steps:
      - id: only
        transform: {n: "{{input.n}}"}
)",
                                /*workers=*/1));
  const std::string parked = Submit("approve");
  ASSERT_TRUE(Reaches(parked, RunStatus::kWaiting));

  const std::string a = Submit("plain", json::object{{"n", 1}});
  const std::string b = Submit("plain", json::object{{"n", 2}});
  ASSERT_TRUE(Reaches(a, RunStatus::kSucceeded));
  ASSERT_TRUE(Reaches(b, RunStatus::kSucceeded));
  EXPECT_EQ(Get(b).output, (json::object{{"n", 2}}));
  EXPECT_EQ(Get(parked).status, RunStatus::kWaiting);

  ASSERT_OK(store_->SendSignal(parked, "go", json::object{{"ok", true}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(parked, RunStatus::kSucceeded));
}

TEST_F(EngineTest, MapRunsEveryItemThroughTheMockInOrder) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  fan:
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: 3
          step: {llm: {route: mock, messages: [{role: user, content: "#mock reply=echo-{{item}}"}]}}
)"));
  json::array items;
  for (int i = 0; i < 7; ++i) items.push_back(json::value("x" + std::to_string(i)));
  const std::string id = Submit("fan", json::object{{"items", items}});
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const auto run = Get(id);
  ASSERT_TRUE(run.output.is_array());
  ASSERT_EQ(run.output.as_array().size(), 7u);
  for (int i = 0; i < 7; ++i)
    EXPECT_EQ(run.output.as_array()[i], json::value("echo-x" + std::to_string(i))) << i;
  ASSERT_NE(Step(run, "each"), nullptr);
  EXPECT_EQ(Step(run, "each")->output.at("items"), 7);
}

// A map over more items than a page of the store: every item sees its own element and
// index over the run's scope (shared by the items, not copied), the items are read back
// in order, and the run record holds the map step only, with its items counted.
TEST_F(EngineTest, AMapOverManyItemsAssemblesItsOutputFromItsCheckpoints) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  fan:
    steps:
      - id: make
        transform: {list: "{{input.items}}"}
      - id: each
        map:
          over: "{{steps.make.output.list}}"
          concurrency: 4
          step: {transform: {i: "{{index}}", v: "{{item}}", tag: "{{input.tag}}-{{index}}"}}
      - id: last
        transform: "{{steps.each.output.2499}}"
  literal:
    steps:
      - id: each
        map:
          over: ["{{input.tag}}", "b"]
          concurrency: 2
          step: {transform: "{{index}}:{{item}}"}
)"));
  constexpr int kItems = 2500;
  json::array items;
  for (int i = 0; i < kItems; ++i) items.push_back(i * 2);
  const std::string id = Submit("fan", json::object{{"items", items}, {"tag", "t"}});
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const auto run = Get(id);
  ASSERT_EQ(run.steps.size(), 3u);
  const auto* each = Step(run, "each");
  ASSERT_NE(each, nullptr);
  EXPECT_EQ(each->items, kItems);
  const auto& out = each->output.at("output").as_array();
  ASSERT_EQ(out.size(), static_cast<std::size_t>(kItems));
  for (int i = 0; i < kItems; ++i) {
    ASSERT_EQ(out[i], (json::object{{"i", i}, {"v", i * 2}, {"tag", "t-" + std::to_string(i)}})) << i;
  }
  EXPECT_EQ(run.output, (json::object{{"i", 2499}, {"v", 4998}, {"tag", "t-2499"}}));

  const std::string lit = Submit("literal", json::object{{"tag", "a"}});
  ASSERT_TRUE(Reaches(lit, RunStatus::kSucceeded));
  EXPECT_EQ(Get(lit).output, (json::array{"0:a", "1:b"}));
}

TEST_F(EngineTest, RetryBackoffWaitsForTheClock) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  flaky:
    steps:
      - id: ask
        llm: {route: mock, messages: [{role: user, content: "#mock fail=503 times=1"}]}
        retry: {max_attempts: 2, initial_backoff: 1m, max_backoff: 1m, jitter: 0}
)"));
  const std::string id = Submit("flaky");
  // The first attempt fails (503): the run goes back to the queue for a minute, holding
  // no lease (its status stays `running`: it is between two attempts of a step).
  ASSERT_TRUE(Soon([&] {
    const auto run = Get(id);
    const auto* s = Step(run, "ask");
    return s && s->status == store::StepStatus::kRetrying;
  }));
  EXPECT_TRUE(NothingHappens(id, RunStatus::kRunning));
  clock_.Advance(60s - 1ms);
  EXPECT_TRUE(NothingHappens(id, RunStatus::kRunning));
  clock_.Advance(1ms);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const auto run = Get(id);
  ASSERT_NE(Step(run, "ask"), nullptr);
  EXPECT_EQ(Step(run, "ask")->attempts, 2);
  EXPECT_LT(RealElapsed(), 1s);
}

TEST_F(EngineTest, OnErrorRecoversAFinalFailureWithoutTheClock) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  check:
    steps:
      - id: check
        validate: {value: "{{input.v}}", schema: {type: integer}}
        on_error: {output: fallback}
)"));
  const std::string id = Submit("check", json::object{{"v", "not a number"}});
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Get(id).output, "fallback");
}

// ---------------------------------------------------------------------------------------
// An interrupted attempt is not a failed one (docs/guarantees.md).

// The node that leased run `id` dies with step `step_id` in flight: the run is leased by
// a "dead node" (with no engine running), its step started (StartStep the first time,
// RestartInterruptedStep after), and the clock passes the lease.
void LoseNode(store::Store& store, ManualClock& clock, const std::string& id,
              const std::string& step_id) {
  clock.Advance(1ms);  // so that a run handed back below is due after `id`
  auto leased = store.LeaseRun("dead-node", 30s);
  // Other runs due first are handed back untouched.
  for (int i = 0; i < 10 && leased.ok() && leased->has_value() && (*leased)->run.id != id; ++i) {
    ASSERT_OK(store.ReleaseLease((*leased)->lease));
    leased = store.LeaseRun("dead-node", 30s);
  }
  ASSERT_OK(leased);
  ASSERT_TRUE(leased->has_value());
  ASSERT_EQ((*leased)->run.id, id);
  const store::StepRecord* rec = nullptr;
  for (const auto& st : (*leased)->run.steps) {
    if (st.step_id == step_id) rec = &st;
  }
  if (rec && rec->status == store::StepStatus::kRunning) {
    ASSERT_OK(store.RestartInterruptedStep((*leased)->lease, step_id));
  } else {
    ASSERT_OK(store.StartStep((*leased)->lease, step_id));
  }
  clock.Advance(31s);
}

TEST_F(EngineTest, AnAttemptWhoseNodeWasLostDoesNotSpendTheStepsAttempts) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  once:
    steps:
      - id: ask
        llm: {route: mock, messages: [{role: user, content: "hello"}]}
        retry: {max_attempts: 1}
)"));
  engine_->Stop();
  const std::string id = Submit("once");
  ASSERT_NO_FATAL_FAILURE(LoseNode(*store_, clock_, id, "ask"));
  engine_ = Engine::Create(config_.engine, *store_, *gateway_, clock_, random_, registry_);
  engine_->Start();
  // Before: the lost attempt was the one allowed, and the run was dead-lettered (timeout).
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const auto run = Get(id);
  ASSERT_NE(Step(run, "ask"), nullptr);
  EXPECT_EQ(Step(run, "ask")->attempts, 2);
  EXPECT_EQ(Step(run, "ask")->interrupted, 1);
  auto events = store_->ListEvents(id, 0, 1000);
  ASSERT_OK(events);
  int interrupted = 0;
  for (const auto& e : *events) interrupted += e.type == "StepInterrupted";
  EXPECT_EQ(interrupted, 1);
}

TEST_F(EngineTest, AStepWhoseNodeKeepsBeingLostIsDeadLetteredAsWorkerLost) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  poison:
    steps:
      - id: crash
        llm: {route: mock, messages: [{role: user, content: "poison"}]}
        retry: {max_attempts: 2}
  innocent:
    steps:
      - id: ask
        llm: {route: mock, messages: [{role: user, content: "innocent"}]}
        retry: {max_attempts: 2}
)"));
  engine_->Stop();
  ASSERT_EQ(config_.engine.max_interrupted_attempts, 3);  // the default
  const std::string poison = Submit("poison");
  // The poison run takes its node down three times; an innocent run in flight on that
  // node each time loses its attempts too, but they are not its max_attempts.
  std::vector<std::string> innocents;
  for (int crash = 0; crash < 3; ++crash) {
    ASSERT_NO_FATAL_FAILURE(LoseNode(*store_, clock_, poison, "crash"));
  }
  for (int i = 0; i < 2; ++i) {
    innocents.push_back(Submit("innocent"));
    ASSERT_NO_FATAL_FAILURE(LoseNode(*store_, clock_, innocents.back(), "ask"));
    ASSERT_NO_FATAL_FAILURE(LoseNode(*store_, clock_, innocents.back(), "ask"));
  }
  engine_ = Engine::Create(config_.engine, *store_, *gateway_, clock_, random_, registry_);
  engine_->Start();
  ASSERT_TRUE(Reaches(poison, RunStatus::kDeadLettered));
  auto run = Get(poison);
  ASSERT_TRUE(run.error.has_value());
  EXPECT_EQ(ErrorCodeName(run.error->code), "worker_lost");
  EXPECT_THAT(run.error->message, HasSubstr("3 attempts ended with their node lost"));
  EXPECT_EQ(Step(run, "crash")->interrupted, 3);
  for (const auto& id : innocents) {
    // Two lost attempts and max_attempts 2: before, dead-lettered with `timeout`.
    ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded)) << id;
    EXPECT_EQ(Step(Get(id), "ask")->interrupted, 2);
  }
}

TEST_F(EngineTest, AStepWaitingOnTheModelIsNotAStall) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  slow:
    steps:
      - id: ask
        llm: {route: mock, messages: [{role: user, content: "#mock sleep=3000"}]}
        timeout: 1h
)",
                                1));
  config_.engine.drain_timeout = 10ms;
  EXPECT_TRUE(engine_->readiness().ready);
  EXPECT_TRUE(Engine::NodeReadiness().ready);
  const std::string id = Submit("slow");
  ASSERT_TRUE(Soon([&] {
    const store::RunRecord run = Get(id);  // Step points into it
    const auto* st = Step(run, "ask");
    return st && st->status == store::StepStatus::kRunning;
  }));
  // The only run this node may execute waits on the model past stall_timeout: it holds
  // no engine thread, and the node is not stalled (a stall is a store call or a lease
  // call that does not return).
  clock_.Advance(config_.engine.stall_timeout + 1ms);
  EXPECT_TRUE(engine_->readiness().ready) << engine_->readiness().detail;
  EXPECT_TRUE(Engine::NodeReadiness().ready);
  // The stop that follows (drain) says so.
  std::thread stop([&] { engine_->Stop(); });
  ASSERT_TRUE(Soon([&] { return engine_->draining(); }));
  EXPECT_EQ(engine_->readiness().reason, "draining");
  EXPECT_EQ(Engine::NodeReadiness().reason, "draining");
  stop.join();
}

// ---------------------------------------------------------------------------------------
// No thread per call: runs waiting on the network hold none of the engine's threads.

// A provider that answers only when the test releases its calls, holding no thread
// meanwhile; it counts the calls in flight, the most seen at once, and those cancelled.
class HeldProvider final : public gateway::detail::Provider {
 public:
  struct Calls {
    std::mutex mu;
    int in_flight = 0;      // GUARDED_BY(mu)
    int max_in_flight = 0;  // GUARDED_BY(mu)
    int cancelled = 0;      // GUARDED_BY(mu)
    std::vector<std::function<void()>> held;  // GUARDED_BY(mu): answer each call

    int InFlight() {
      std::lock_guard lock(mu);
      return in_flight;
    }
    // Answers every call held.
    void Release() {
      std::vector<std::function<void()>> answers;
      {
        std::lock_guard lock(mu);
        answers.swap(held);
      }
      for (auto& a : answers) a();
    }
  };

  explicit HeldProvider(std::shared_ptr<Calls> calls) : calls_(std::move(calls)) {}

  Result<gateway::ChatResult> Chat(const json::object&, const gateway::ChatRequest&, Duration) override {
    return Error(ErrorCode::kInternal, "the engine made a blocking call");
  }
  Result<gateway::ChatResult> ChatStream(const json::object&, const gateway::ChatRequest&, Duration,
                                         const gateway::Gateway::ChunkSink&) override {
    return Error(ErrorCode::kInternal, "the engine streamed");
  }
  bool async() const override { return true; }
  void ChatAsync(const json::object&, const gateway::ChatRequest& req, Duration,
                 const boost::asio::any_io_executor& executor,
                 std::function<void(Result<gateway::ChatResult>)> done) override {
    // `done` is dropped once answered: the cancel callback left on the run's signal must
    // not keep the gateway's call (which holds that signal) alive.
    struct Pending {
      std::mutex mu;
      std::function<void(Result<gateway::ChatResult>)> done;  // GUARDED_BY(mu); empty once answered
    };
    auto pending = std::make_shared<Pending>();
    pending->done = std::move(done);
    auto finish = [calls = calls_, executor, pending](Result<gateway::ChatResult> r) {
      std::function<void(Result<gateway::ChatResult>)> answer;
      {
        std::lock_guard lock(pending->mu);
        answer.swap(pending->done);
      }
      if (!answer) return;
      {
        std::lock_guard lock(calls->mu);
        --calls->in_flight;
      }
      boost::asio::post(executor, [answer, r = std::move(r)]() mutable { answer(std::move(r)); });
    };
    {
      std::lock_guard lock(calls_->mu);
      calls_->max_in_flight = std::max(calls_->max_in_flight, ++calls_->in_flight);
      calls_->held.push_back([finish] { finish(Answer()); });
    }
    if (req.cancel) {
      req.cancel->OnCancel([calls = calls_, finish] {
        {
          std::lock_guard lock(calls->mu);
          ++calls->cancelled;
        }
        finish(Error(ErrorCode::kCancelled, "the call was cancelled"));
      });
    }
  }

 private:
  static gateway::ChatResult Answer() {
    gateway::ChatResult r;
    r.text = "held answer";
    r.model = "held-model";
    r.usage = json::object{{"prompt_tokens", 1}, {"completion_tokens", 2}, {"total_tokens", 3}};
    r.response = json::object{
        {"object", "chat.completion"},
        {"model", r.model},
        {"choices", json::array{json::object{
                        {"index", 0}, {"message", json::object{{"role", "assistant"}, {"content", r.text}}}}}},
        {"usage", r.usage}};
    return r;
  }
  std::shared_ptr<Calls> calls_;
};

// Threads of this process now.
std::size_t ThreadCount() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

class AsyncEngineTest : public EngineTest {
 protected:
  ~AsyncEngineTest() override {
    std::lock_guard lock(calls_->mu);
    calls_->held.clear();  // each holds calls_: a cycle otherwise
  }
  void StartHeld(const std::string& pipelines_yaml, int workers) {
    make_provider_ = [calls = calls_](const ProviderConfig& p) -> std::unique_ptr<gateway::detail::Provider> {
      if (p.name != "held") return nullptr;
      return std::make_unique<HeldProvider>(calls);
    };
    extra_providers_ = "  held: {type: mock}\n";
    Start(pipelines_yaml, workers);
  }
  // Waits longer than Soon: hundreds of runs are submitted and leased one by one.
  static bool Within(const std::function<bool()>& fn, std::chrono::seconds patience = 60s) {
    return testing::Eventually(fn, std::chrono::duration_cast<std::chrono::milliseconds>(patience));
  }
  std::shared_ptr<HeldProvider::Calls> calls_ = std::make_shared<HeldProvider::Calls>();
};

TEST_F(AsyncEngineTest, FiveHundredRunsWaitOnTheModelAtOnceOnAFixedNumberOfThreads) {
  constexpr int kRuns = 500;
  ASSERT_NO_FATAL_FAILURE(StartHeld(R"(
pipelines:
  ask:
    steps:
      - id: ask
        llm: {route: held, messages: [{role: user, content: "question {{input.n}}"}]}
      - id: after
        transform: {answer: "{{steps.ask.text}}"}
)",
                                    kRuns));
  const std::size_t threads_at_start = ThreadCount();
  std::vector<std::string> ids;
  for (int i = 0; i < kRuns; ++i) ids.push_back(Submit("ask", json::object{{"n", i}}));
  // Every run is in its llm step at once: one model latency for all of them.
  ASSERT_TRUE(Within([&] { return calls_->InFlight() == kRuns; })) << calls_->InFlight() << " calls in flight";
  const std::size_t threads_at_peak = ThreadCount();
  EXPECT_LE(threads_at_peak, threads_at_start + 2)
      << "the engine's threads grew with the runs in flight: " << threads_at_start << " -> " << threads_at_peak;
  calls_->Release();
  for (const auto& id : ids) ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const store::RunRecord run = Get(ids.front());
  EXPECT_EQ(run.output, (json::value{{"answer", "held answer"}}));
  std::lock_guard lock(calls_->mu);
  EXPECT_EQ(calls_->max_in_flight, kRuns);
  EXPECT_EQ(calls_->cancelled, 0);
}

TEST_F(AsyncEngineTest, MapItemsWaitOnTheModelAtOnceWithoutAThreadEach) {
  constexpr int kItems = 200;
  ASSERT_NO_FATAL_FAILURE(StartHeld(R"(
pipelines:
  fan:
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: 200
          step: {llm: {route: held, messages: [{role: user, content: "item {{item}}"}]}}
)",
                                    1));
  const std::size_t threads_at_start = ThreadCount();
  json::array items;
  for (int i = 0; i < kItems; ++i) items.push_back(i);
  const std::string id = Submit("fan", json::object{{"items", items}});
  ASSERT_TRUE(Within([&] { return calls_->InFlight() == kItems; })) << calls_->InFlight() << " calls in flight";
  EXPECT_LE(ThreadCount(), threads_at_start + 2);
  calls_->Release();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const store::RunRecord run = Get(id);
  ASSERT_TRUE(run.output.is_array());
  EXPECT_EQ(run.output.as_array().size(), static_cast<std::size_t>(kItems));
  std::lock_guard lock(calls_->mu);
  EXPECT_EQ(calls_->max_in_flight, kItems);
}

TEST_F(AsyncEngineTest, CancellingARunCancelsItsModelCallInFlight) {
  configure_ = [](Config& c) { c.engine.heartbeat_interval = 5ms; };
  ASSERT_NO_FATAL_FAILURE(StartHeld(R"(
pipelines:
  ask:
    steps:
      - id: ask
        llm: {route: held, messages: [{role: user, content: "never answered"}]}
)",
                                    4));
  const std::string id = Submit("ask");
  ASSERT_TRUE(Soon([&] { return calls_->InFlight() == 1; }));
  ASSERT_OK(store_->CancelRun(id));
  // The heartbeat finds the lease gone (its clock must pass half an interval), and the
  // call in flight is cancelled through the run's signal, not left to answer.
  ASSERT_TRUE(Soon([&] {
    clock_.Advance(5ms);
    std::lock_guard lock(calls_->mu);
    return calls_->cancelled == 1;
  }));
  EXPECT_EQ(calls_->InFlight(), 0);
  ASSERT_TRUE(Reaches(id, RunStatus::kCancelled));
}

// ---------------------------------------------------------------------------------------
// Redrive recovers every step kind: the step runs again (a new attempt, numbered past
// the earlier ones), never the stored failure replayed.

// Redrives run `id` and returns the run as redriven.
store::RunRecord RedriveAndWake(store::Store& store, Engine& engine, const std::string& id) {
  auto r = store.RedriveRun(id);
  EXPECT_TRUE(r.ok()) << KEEL_TEST_RESULT_MSG(r);
  engine.Notify();
  return r.ok() ? std::move(r).value() : store::RunRecord{};
}

TEST_F(EngineTest, RedriveRecoversAnLlmStep) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  flaky:
    steps:
      - id: ask
        llm: {route: mock, messages: [{role: user, content: "#mock fail=503 times=1"}]}
        retry: {max_attempts: 1}
)"));
  const std::string id = Submit("flaky");
  ASSERT_TRUE(Reaches(id, RunStatus::kDeadLettered));
  RedriveAndWake(*store_, *engine_, id);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Step(Get(id), "ask")->attempts, 2);
}

TEST_F(EngineTest, RedriveOfAFailedTaskStepQueuesANewTask) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  work:
    steps:
      - id: job
        task: {queue: q, input: {n: 1}}
      - id: after
        transform: {got: "{{steps.job.output.answer}}"}
)"));
  const std::string id = Submit("work");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto first = store_->LeaseTask("q", "w1");
  ASSERT_OK(first);
  ASSERT_TRUE(first->has_value());
  ASSERT_OK(
      store_->FailTask((*first)->token, Error(ErrorCode::kInvalidRequest, "bad input"), false));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kFailed));

  RedriveAndWake(*store_, *engine_, id);
  // Before: the stored failure was replayed at once and no task was queued.
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  auto second = store_->LeaseTask("q", "w1");
  ASSERT_OK(second);
  ASSERT_TRUE(second->has_value());
  EXPECT_NE((*second)->token, (*first)->token);
  EXPECT_EQ((*second)->attempt, 2);
  ASSERT_OK(store_->CompleteTask((*second)->token, json::object{{"answer", 42}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Get(id).output, (json::object{{"got", 42}}));
}

TEST_F(EngineTest, RedriveOfAFailedPipelineStepMakesANewChild) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  child:
    steps:
      - id: ask
        llm: {route: mock, messages: [{role: user, content: "#mock fail=503 times=1"}]}
        retry: {max_attempts: 1}
  parent:
    steps:
      - id: sub
        pipeline: {name: child, input: {}}
)"));
  const std::string id = Submit("parent");
  ASSERT_TRUE(Reaches(id, RunStatus::kFailed));
  const std::string first_child = Get(id).error->message;
  RedriveAndWake(*store_, *engine_, id);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  const auto run = Get(id);
  const auto* sub = Step(run, "sub");
  ASSERT_NE(sub, nullptr);
  const std::string child_id(sub->output.at("run_id").as_string());
  EXPECT_EQ(first_child.find(child_id), std::string::npos) << "the failed child was replayed";
  EXPECT_EQ(Get(child_id).status, RunStatus::kSucceeded);
}

TEST_F(EngineTest, RedriveOfAWaitThatTimedOutWaitsAgainAndASignalEndsIt) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  approve:
    steps:
      - id: wait
        wait_for_signal: {name: approval, timeout: 10m}
)"));
  const std::string id = Submit("approve");
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  clock_.Advance(600s);
  ASSERT_TRUE(Reaches(id, RunStatus::kFailed));
  clock_.Advance(1h);
  RedriveAndWake(*store_, *engine_, id);
  // Its timer starts again from the redrive (not from the first attempt: it would time
  // out at once).
  ASSERT_TRUE(Reaches(id, RunStatus::kWaiting));
  EXPECT_EQ(Get(id).waiting.at("timeout_at_ms").to_number<int64_t>(),
            ToMillis(clock_.Now() + 10min));
  ASSERT_OK(store_->SendSignal(id, "approval", json::object{{"ok", true}}));
  engine_->Notify();
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  EXPECT_EQ(Get(id).output, (json::object{{"ok", true}}));
}

TEST_F(EngineTest, RedriveOfAFailedMapRunsTheItemsLeft) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  fan:
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: 1
          step: {llm: {route: mock, messages: [{role: user, content: "{{item}}"}]}}
        retry: {max_attempts: 1}
)"));
  const std::string id =
      Submit("fan", json::object{{"items", json::array{"a", "#mock fail=503 times=1", "c"}}});
  ASSERT_TRUE(Reaches(id, RunStatus::kDeadLettered));
  RedriveAndWake(*store_, *engine_, id);
  ASSERT_TRUE(Reaches(id, RunStatus::kSucceeded));
  ASSERT_EQ(Get(id).output.as_array().size(), 3u);
  EXPECT_TRUE(Get(id).output.as_array()[1].is_string());
}

// transform, validate and choice are functions of the run's input and checkpoints: a
// redrive runs them again (a new attempt, not the failure replayed), and they succeed
// when what they read has changed, e.g. a checkpoint before them that was redone.
TEST_F(EngineTest, RedriveRunsATransformOrValidateStepAgain) {
  ASSERT_NO_FATAL_FAILURE(Start(R"(
pipelines:
  t:
    steps:
      - id: x
        transform: {v: "{{input.missing}}"}
  v:
    steps:
      - id: x
        validate: {value: "{{input.v}}", schema: {type: integer}}
)"));
  for (const char* p : {"t", "v"}) {
    SCOPED_TRACE(p);
    const std::string id = Submit(p, json::object{{"v", "text"}});
    ASSERT_TRUE(Soon([&] { return store::IsTerminal(Get(id).status); }));
    const auto failed = Get(id);
    ASSERT_NE(Step(failed, "x"), nullptr);
    const int before = Step(failed, "x")->attempts;
    RedriveAndWake(*store_, *engine_, id);
    ASSERT_TRUE(Soon([&] {
      const auto run = Get(id);
      return store::IsTerminal(run.status) && Step(run, "x") && Step(run, "x")->attempts > before;
    }));
    EXPECT_EQ(Step(Get(id), "x")->prior_attempts, before);
  }
}

}  // namespace
}  // namespace keel::engine
