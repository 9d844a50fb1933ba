#include "keel/testing/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "keel/core/json.h"

namespace keel::testing {

Process::Process(std::vector<std::string> argv, std::string cwd, std::vector<std::string> env) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) std::abort();
  pid_ = fork();
  if (pid_ < 0) std::abort();
  if (pid_ == 0) {
    // The child dies with the test, even when the test crashes.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(fds[1], STDERR_FILENO);
    const int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) {
      dup2(devnull, STDIN_FILENO);
      dup2(devnull, STDOUT_FILENO);
    }
    // The child must not inherit the test's blocked signal mask.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (!cwd.empty() && chdir(cwd.c_str()) != 0) _exit(126);
    for (auto& e : env) putenv(e.data());
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(fds[1]);
  err_fd_ = fds[0];
  reader_ = std::thread([this] {
    std::string buf;
    char chunk[4096];
    while (true) {
      const ssize_t n = read(err_fd_, chunk, sizeof chunk);
      if (n <= 0) break;
      buf.append(chunk, static_cast<std::size_t>(n));
      std::size_t pos;
      while ((pos = buf.find('\n')) != std::string::npos) {
        std::lock_guard lock(mu_);
        lines_.push_back(buf.substr(0, pos));
        buf.erase(0, pos + 1);
        cv_.notify_all();
      }
    }
    std::lock_guard lock(mu_);
    if (!buf.empty()) lines_.push_back(buf);
    eof_ = true;
    cv_.notify_all();
  });
}

Process::~Process() {
  if (!reaped_) {
    Signal(SIGKILL);
    Wait();
  }
  if (reader_.joinable()) reader_.join();
  if (err_fd_ >= 0) close(err_fd_);
}

std::string Process::WaitForLine(const std::function<bool(const std::string&)>& pred,
                                 std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  std::size_t checked = 0;
  std::string found;
  cv_.wait_for(lock, timeout, [&] {
    for (; checked < lines_.size(); ++checked) {
      if (pred(lines_[checked])) {
        found = lines_[checked];
        return true;
      }
    }
    return eof_;
  });
  return found;
}

std::vector<std::string> Process::Lines() {
  std::lock_guard lock(mu_);
  return lines_;
}

void Process::Signal(int sig) {
  if (!reaped_ && pid_ > 0) kill(pid_, sig);
}

int Process::Wait(std::chrono::milliseconds timeout) {
  if (!reaped_) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      const pid_t r = waitpid(pid_, &status_, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) return -1;
      // Waiting for another process to exit: there is no event to block on portably.
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  {
    // Everything the child wrote is read before the caller looks at Lines().
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(5), [&] { return eof_; });
  }
  if (WIFEXITED(status_)) return WEXITSTATUS(status_);
  if (WIFSIGNALED(status_)) return 128 + WTERMSIG(status_);
  return -1;
}

uint16_t ListeningPort(const std::string& line) {
  boost::system::error_code ec;
  const auto v = json::parse(line, ec);
  if (ec || !v.is_object()) return 0;
  const auto* msg = v.get_object().if_contains("msg");
  const auto* addr = v.get_object().if_contains("addr");
  if (!msg || !addr || !msg->is_string() || msg->get_string() != "listening" || !addr->is_string()) return 0;
  const std::string a(addr->get_string());
  return static_cast<uint16_t>(std::stoi(a.substr(a.rfind(':') + 1)));
}

KeelServer::KeelServer(const std::string& dir, const std::string& config_yaml, const std::string& command)
    : dir_(dir) {
  std::vector<std::string> argv{KEEL_BINARY, command, "--listen", "127.0.0.1:0"};
  if (!config_yaml.empty()) {
    std::ofstream(dir + "/keel.yaml") << config_yaml;
    argv.push_back("--config");
    argv.push_back(dir + "/keel.yaml");
  }
  process_ = std::make_unique<Process>(argv, dir);
  const auto line = process_->WaitForLine([](const std::string& l) { return ListeningPort(l) != 0; });
  port_ = ListeningPort(line);
  url_ = "http://127.0.0.1:" + std::to_string(port_);
}

void KeelServer::Crash() {
  process_->Signal(SIGKILL);
  process_->Wait();
}

int KeelServer::Terminate() {
  process_->Signal(SIGTERM);
  return process_->Wait();
}

MockLlm::MockLlm(std::vector<std::string> extra_args) {
  std::vector<std::string> argv{KEEL_BINARY, "mock-llm", "--listen", "127.0.0.1:0"};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  process_ = std::make_unique<Process>(argv);
  const auto line = process_->WaitForLine([](const std::string& l) { return ListeningPort(l) != 0; });
  url_ = "http://127.0.0.1:" + std::to_string(ListeningPort(line));
}

TempDir::TempDir() {
  std::random_device rd;
  const auto base = std::filesystem::temp_directory_path();
  for (int i = 0; i < 100; ++i) {
    auto p = base / ("keel-test-" + std::to_string(getpid()) + "-" + std::to_string(rd()));
    std::error_code ec;
    if (std::filesystem::create_directory(p, ec)) {
      path_ = p.string();
      return;
    }
  }
  std::abort();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace keel::testing
