// Liveness does not depend on threads (issue 11): model calls to a provider that never
// answers and task long polls, more of each than the node has handler threads, do not
// delay an unrelated request; a client that hangs up ends its upstream call at once; a
// poller that hangs up gets no task.

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include "helpers.h"
#include "keel/testing/raw_socket.h"

namespace keel::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using workers::Submit;  // the helpers of task steps

// A provider that accepts every connection, reads what it is sent and never answers.
// Counts the connections open and the ones the other side closed.
class SilentUpstream {
 public:
  SilentUpstream() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(listen_fd_, 1024), 0);
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Loop(); });
  }
  ~SilentUpstream() {
    stop_.store(true);
    thread_.join();
    for (int fd : open_) ::close(fd);
    ::close(listen_fd_);
  }
  uint16_t port() const { return port_; }
  int accepted() const { return accepted_.load(); }
  int closed_by_peer() const { return closed_.load(); }

 private:
  void Loop() {
    char buf[4096];
    while (!stop_.load()) {
      std::vector<pollfd> fds{{listen_fd_, POLLIN, 0}};
      for (int fd : open_) fds.push_back({fd, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), 50) <= 0) continue;
      if (fds[0].revents & POLLIN) {
        const int fd = ::accept(listen_fd_, nullptr, nullptr);
        if (fd >= 0) {
          open_.push_back(fd);
          accepted_.fetch_add(1);
        }
      }
      for (std::size_t i = 1; i < fds.size(); ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        if (::recv(fds[i].fd, buf, sizeof buf, 0) > 0) continue;  // the request: ignored
        ::close(fds[i].fd);
        open_.erase(std::find(open_.begin(), open_.end(), fds[i].fd));
        closed_.fetch_add(1);
      }
    }
  }

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::vector<int> open_;  // the loop's own
  std::atomic<int> accepted_{0}, closed_{0};
};

std::string Post(const std::string& path, const std::string& body) {
  return "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

// The value of an unlabelled gauge in a Prometheus text page; -1 when absent.
double Gauge(const std::string& page, const std::string& name) {
  const auto at = page.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(page.substr(at + name.size() + 2));
}

double WaitingPolls(const std::string& base) {
  auto r = HttpGet(base + "/metrics");
  return r.status == 200 ? Gauge(r.raw, "keel_task_polls_waiting") : -1;
}

std::string Config(uint16_t silent_port) {
  return "storage: sqlite://data/keel.db\n"
         "engine: {workers: 2, lease_timeout: 5s, poll_interval: 50ms}\n"
         "providers:\n"
         "  silent: {type: openai, base_url: http://127.0.0.1:" + std::to_string(silent_port) +
         "/v1, api_key: sk-x, model: m,\n"
         "           timeout: {connect: 2s, total: 120s}}\n"
         "routes:\n"
         "  silent: {targets: [{provider: silent}], timeout: 120s, retry: {max_attempts: 1}}\n"
         "pipelines:\n"
         "  plain:\n"
         "    steps:\n"
         "      - id: only\n"
         "        transform: {echo: \"{{input.text}}\"}\n"
         "  task:\n"
         "    steps:\n"
         "      - id: work\n"
         "        task: {queue: q, input: \"{{input}}\", heartbeat_timeout: 30s}\n";
}

// Answers within `bound`: far below the minute the slow calls wait, far above what a
// loaded machine needs.
template <typename F>
auto Prompt(F&& call, milliseconds bound = seconds(10)) {
  const auto at = std::chrono::steady_clock::now();
  auto r = call();
  EXPECT_LT(std::chrono::steady_clock::now() - at, bound) << "an unrelated request waited behind the slow calls";
  return r;
}

TEST(LivenessTest, SlowModelCallsAndLongPollsDoNotDelayOtherRequests) {
  SilentUpstream upstream;
  TempDir dir;
  KeelServer server(dir.path(), Config(upstream.port()));
  ASSERT_NE(server.port(), 0);
  const std::string& url = server.url();

  // More than the 64 handler threads of the default config, of each kind.
  constexpr int kStreams = 100, kWhole = 20, kPolls = 100;
  std::vector<std::unique_ptr<RawSocket>> calls, polls;
  const std::string stream_body = R"({"model":"silent","stream":true,"messages":[{"role":"user","content":"hi"}]})";
  const std::string whole_body = R"({"model":"silent","messages":[{"role":"user","content":"hi"}]})";
  for (int i = 0; i < kStreams + kWhole; ++i) {
    calls.push_back(std::make_unique<RawSocket>(server.port()));
    ASSERT_TRUE(calls.back()->Send(Post("/v1/chat/completions", i < kStreams ? stream_body : whole_body)));
  }
  ASSERT_TRUE(Eventually([&] { return upstream.accepted() >= kStreams + kWhole; }, seconds(30)))
      << upstream.accepted() << " upstream calls began";
  for (int i = 0; i < kPolls; ++i) {
    polls.push_back(std::make_unique<RawSocket>(server.port(), seconds(30)));
    ASSERT_TRUE(polls.back()->Send(
        Post("/v1/tasks/poll", R"({"queue":"q","worker_id":"w)" + std::to_string(i) + R"(","wait_ms":60000})")));
    if (i == 0) {
      // The first poll waits before the others begin: it is first in line.
      ASSERT_TRUE(Eventually([&] { return WaitingPolls(url) == 1; }, seconds(30)));
    }
  }
  ASSERT_TRUE(Eventually([&] { return WaitingPolls(url) == kPolls; }, seconds(30))) << WaitingPolls(url);

  EXPECT_EQ(Prompt([&] { return HttpGet(url + "/healthz"); }).status, 200);
  EXPECT_EQ(Prompt([&] { return HttpGet(url + "/v1/runs"); }).status, 200);
  const std::string plain = Prompt([&] { return Submit(url, "plain", json::object{{"text", "meanwhile"}}); });
  ASSERT_FALSE(plain.empty());
  EXPECT_EQ(Status(WaitForTerminal(url, plain, seconds(10))), "succeeded");
  EXPECT_EQ(upstream.closed_by_peer(), 0) << "a silent provider's call ended while its client waited";

  // The clients of the model calls hang up: every upstream call ends at once.
  calls.clear();
  EXPECT_TRUE(Eventually([&] { return upstream.closed_by_peer() >= kStreams + kWhole; }, seconds(20)))
      << upstream.closed_by_peer() << " of " << kStreams + kWhole << " upstream calls ended";

  // A task goes to the poll that waited longest, at once.
  const std::string task_run = Submit(url, "task", json::object{{"n", 1}});
  ASSERT_FALSE(task_run.empty());
  const std::string answer = polls.front()->ReadResponse();
  EXPECT_EQ(answer.rfind("HTTP/1.1 200", 0), 0u) << answer;
  EXPECT_NE(answer.find(task_run), std::string::npos) << answer;
  EXPECT_TRUE(Eventually([&] { return WaitingPolls(url) == kPolls - 1; }, seconds(10))) << WaitingPolls(url);

  // The other pollers hang up: forgotten at once.
  polls.clear();
  EXPECT_TRUE(Eventually([&] { return WaitingPolls(url) == 0; }, seconds(10))) << WaitingPolls(url);
}

TEST(LivenessTest, APollerThatHungUpGetsNoTask) {
  SilentUpstream upstream;
  TempDir dir;
  KeelServer server(dir.path(), Config(upstream.port()));
  ASSERT_NE(server.port(), 0);
  const std::string& url = server.url();
  {
    RawSocket gone(server.port());
    ASSERT_TRUE(gone.Send(Post("/v1/tasks/poll", R"({"queue":"q","worker_id":"gone","wait_ms":60000})")));
    ASSERT_TRUE(Eventually([&] { return WaitingPolls(url) == 1; }, seconds(30)));
  }
  ASSERT_TRUE(Eventually([&] { return WaitingPolls(url) == 0; }, seconds(10))) << WaitingPolls(url);
  const std::string id = Submit(url, "task", json::object{{"n", 2}});
  ASSERT_FALSE(id.empty());
  auto r = HttpPostJson(url + "/v1/tasks/poll", json::object{{"queue", "q"}, {"worker_id", "here"}, {"wait_ms", 20000}});
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body.at("run_id"), json::value(id));
  EXPECT_EQ(r.body.at("attempt").as_int64(), 1) << "the first attempt's task went to the poller that hung up";
}

TEST(LivenessTest, ADrainAnswersTheWaitingPolls) {
  SilentUpstream upstream;
  TempDir dir;
  KeelServer server(dir.path(), Config(upstream.port()));
  ASSERT_NE(server.port(), 0);
  RawSocket poll(server.port(), seconds(30));
  ASSERT_TRUE(poll.Send(Post("/v1/tasks/poll", R"({"queue":"q","worker_id":"w","wait_ms":60000})")));
  ASSERT_TRUE(Eventually([&] { return WaitingPolls(server.url()) == 1; }, seconds(30)));
  std::thread stop([&] { EXPECT_EQ(server.Terminate(), 0); });
  const std::string answer = poll.ReadResponse();
  stop.join();
  EXPECT_EQ(answer.rfind("HTTP/1.1 204", 0), 0u) << answer;
}

}  // namespace
}  // namespace keel::testing
