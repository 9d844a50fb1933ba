// kill -9 keel serve while a run is inside a map, parked on a signal, or parked on an
// external worker's task; restart it on the same data directory. The run finishes, and
// the mock-llm's per-prompt counts show that no checkpointed call was made again.

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <thread>

#include "helpers.h"

namespace keel::testing {
namespace {

using namespace workers;  // NOLINT(google-build-using-namespace): the helpers of this file

constexpr int kItems = 12;
constexpr int kConcurrency = 3;

std::string ItemPrompt(int i) { return "item " + std::to_string(i) + "\n#mock sleep=300"; }

const std::string kPipelines =
    "  fan:\n"
    "    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}\n"
    "    steps:\n"
    "      - id: each\n"
    "        map:\n"
    "          over: \"{{input.items}}\"\n"
    "          concurrency: " + std::to_string(kConcurrency) + "\n"
    "          step: {llm: {route: main, messages: [{role: user, content: \"item {{item}}\\n#mock sleep=300\"}]}}\n"
    "      - id: done\n"
    "        transform: {answers: \"{{steps.each.output}}\"}\n"
    "  approve:\n"
    "    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}\n"
    "    steps:\n"
    "      - id: draft\n"
    "        llm: {route: main, messages: [{role: user, content: \"draft {{input.id}}\"}]}\n"
    "      - id: wait\n"
    "        wait_for_signal: {name: approval, timeout: 1h}\n"
    "      - id: final\n"
    "        llm: {route: main, messages: [{role: user, content: \"final {{input.id}} {{steps.wait.output.ok}}\"}]}\n"
    "  handoff:\n"
    "    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}\n"
    "    steps:\n"
    "      - id: prepare\n"
    "        llm: {route: main, messages: [{role: user, content: \"prepare {{input.id}}\"}]}\n"
    "      - id: work\n"
    "        task: {queue: crash, input: {text: \"{{steps.prepare.text}}\", seconds: \"{{input.seconds}}\"},\n"
    "               heartbeat_timeout: 3s}\n"
    "        timeout: 8s\n"
    "      - id: done\n"
    "        transform: {worked: \"{{steps.work.output.text}}\"}\n";

// A port free at the time of the call (the kernel's pick for a socket bound to port 0).
uint16_t FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  uint16_t port = 0;
  if (fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  if (fd >= 0) close(fd);
  return port;
}

// keel serve restarted on one data directory and one port, so that a worker started
// before the crash finds the new process at the same address.
class CrashPipelineTest : public ::testing::Test {
 public:
  void SetUp() override {
    port_ = FreePort();
    ASSERT_NE(port_, 0);
    url_ = "http://127.0.0.1:" + std::to_string(port_);
    std::ofstream(dir_.path() + "/keel.yaml")
        << MockBackedConfig(mock_.url(), kPipelines, "engine: {workers: 4, lease_timeout: 1s, poll_interval: 50ms}");
    Restart();
  }
  void Restart() {
    keel_.reset();
    keel_ = std::make_unique<Process>(std::vector<std::string>{KEEL_BINARY, "serve", "--listen", url_.substr(7),
                                                               "--config", dir_.path() + "/keel.yaml"},
                                      dir_.path());
    const auto line = keel_->WaitForLine([](const std::string& l) { return ListeningPort(l) != 0; });
    ASSERT_EQ(ListeningPort(line), port_) << "keel did not start on its port";
  }
  void Crash() {
    keel_->Signal(SIGKILL);
    keel_->Wait();
  }
  const std::string& url() { return url_; }
  // Succeeded item records of the map step "each", by the sqlite3 CLI (keel is down).
  int64_t CheckpointedItems() {
    Process q({"/bin/sh", "-c",
               "sqlite3 '" + dir_.path() + "/data/keel.db' \"SELECT count(*) FROM steps WHERE step_id LIKE 'each#%' "
               "AND status = 'succeeded'\" 1>&2"});
    EXPECT_EQ(q.Wait(), 0);
    const auto lines = q.Lines();
    return lines.empty() ? -1 : std::stoll(lines.back());
  }
  static int64_t ItemsDone(const json::value& run) {
    const auto* each = FindStep(run, "each");
    if (each == nullptr) return 0;
    const auto* n = each->as_object().if_contains("items_done");
    return n ? n->as_int64() : 0;
  }

  TempDir dir_;
  MockLlm mock_;
  uint16_t port_ = 0;
  std::string url_;
  std::unique_ptr<Process> keel_;
};

TEST_F(CrashPipelineTest, KillNineInAMapRedoesOnlyTheItemsInFlight) {
  json::array items;
  for (int i = 0; i < kItems; ++i) items.emplace_back(i);
  const auto id = Submit(url(), "fan", json::object{{"items", items}});
  // Mid-way: some items checkpointed, others in flight or still to come.
  auto during = AwaitRun(url(), id, [](const json::value& r) {
    const auto n = ItemsDone(r);
    return n >= 1 && n <= kItems - 1;
  });
  ASSERT_TRUE(during) << json::serialize(HttpGet(url() + "/v1/runs/" + id).body);
  Crash();
  // The items checkpointed when keel died, read from its database (more may have finished
  // between the GET above and the kill).
  const int64_t done_before = CheckpointedItems();
  ASSERT_GE(done_before, ItemsDone(*during));

  // What had reached the mock by the crash: checkpointed items and the ones in flight.
  std::set<int> started;
  for (int i = 0; i < kItems; ++i) {
    if (MockCount(mock_.url(), ItemPrompt(i)) > 0) started.insert(i);
  }
  ASSERT_GE(static_cast<int64_t>(started.size()), done_before);
  ASSERT_LE(static_cast<int64_t>(started.size()), done_before + kConcurrency);
  ASSERT_LT(static_cast<int>(started.size()), kItems) << "the map ended before the crash";

  Restart();
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(20));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  ASSERT_EQ(run.at("output").at("answers").as_array().size(), static_cast<std::size_t>(kItems));
  EXPECT_EQ(ItemsDone(run), kItems);

  int64_t total = 0, twice = 0;
  for (int i = 0; i < kItems; ++i) {
    const auto n = MockCount(mock_.url(), ItemPrompt(i));
    total += n;
    twice += n == 2;
    EXPECT_GE(n, 1) << "item " << i;
    EXPECT_LE(n, 2) << "item " << i;
    if (!started.count(i)) {
      EXPECT_EQ(n, 1) << "item " << i << " started after the restart";
    }
  }
  // Only items in flight at the crash were called again: at most those started and not
  // yet checkpointed when the crash came.
  EXPECT_LE(twice, static_cast<int64_t>(started.size()) - done_before) << "checkpointed items were called again";
  EXPECT_LE(total, kItems + kConcurrency);
}

TEST_F(CrashPipelineTest, KillNineWhileWaitingForASignalKeepsTheWaitAndItsFinishedSteps) {
  const auto id = Submit(url(), "approve", json::object{{"id", "w1"}});
  ASSERT_TRUE(AwaitRun(url(), id, [](const json::value& r) { return WaitingOn(r, "signal"); }));
  Crash();
  Restart();

  auto again = HttpGet(url() + "/v1/runs/" + id);
  ASSERT_EQ(again.status, 200);
  EXPECT_TRUE(WaitingOn(again.body, "signal")) << again.raw;
  auto sent = HttpPostJson(url() + "/v1/runs/" + id + "/signals/approval", json::object{{"ok", "yes"}});
  ASSERT_EQ(sent.status, 202) << sent.raw;
  auto run = WaitForTerminal(url(), id, std::chrono::seconds(10));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(FindStep(run, "wait")->at("output"), (json::value{{"ok", "yes"}}));
  EXPECT_EQ(MockCount(mock_.url(), "draft w1"), 1);
  EXPECT_EQ(MockCount(mock_.url(), "final w1 yes"), 1);
}

// A worker (the Python example, `slow`: 2 s of work, a heartbeat every second against a
// heartbeat timeout of 3 s, so that a restart under the sanitizers fits in it) holds the task of the run's second step when keel dies; keel
// stays down for `downtime`, then comes back. The run must finish either way: the
// worker's answer is taken if its lease outlived the restart, else ("lease lost, result
// dropped") the step hands out a new task, which the same worker takes. The llm step
// before the task is never called again.
void CrashUnderAWorker(CrashPipelineTest& t, const std::string& run_key, std::chrono::milliseconds downtime,
                       bool expect_lease_lost) {
  const auto id = Submit(t.url(), "handoff", json::object{{"id", run_key}, {"seconds", 2}});
  auto worker = StartWorker(t.url(), "crash", "slow");
  ASSERT_FALSE(worker->WaitForLine([](const std::string& l) { return l.find("task leased") != std::string::npos; })
                   .empty());
  t.Crash();
  std::this_thread::sleep_for(downtime);
  t.Restart();

  auto run = WaitForTerminal(t.url(), id, std::chrono::seconds(15));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const std::string prepared(FindStep(run, "prepare")->at("text").as_string());
  EXPECT_EQ(run.at("output"), (json::value{{"worked", prepared}}));
  EXPECT_EQ(FindStep(run, "work")->at("worker").as_string(), "py-slow");
  EXPECT_EQ(FindStep(run, "work")->at("attempts").as_int64(), expect_lease_lost ? 2 : 1);
  EXPECT_EQ(MockCount(t.mock_.url(), "prepare " + run_key), 1);
  const auto lines = worker->Lines();
  const bool lost = std::any_of(lines.begin(), lines.end(), [](const std::string& l) {
    return l.find("lease lost") != std::string::npos;
  });
  EXPECT_EQ(lost, expect_lease_lost);
}

TEST_F(CrashPipelineTest, KillNineWhileAWorkerHoldsATaskItsAnswerIsTakenAfterTheRestart) {
  if (Python3().empty()) GTEST_SKIP() << "no python3 on PATH";
  CrashUnderAWorker(*this, "t1", std::chrono::milliseconds(0), /*expect_lease_lost=*/false);
}

TEST_F(CrashPipelineTest, KillNineLongerThanTheHeartbeatTimeoutHandsTheTaskOutAgain) {
  if (Python3().empty()) GTEST_SKIP() << "no python3 on PATH";
  CrashUnderAWorker(*this, "t2", std::chrono::milliseconds(3500), /*expect_lease_lost=*/true);
}

}  // namespace
}  // namespace keel::testing
