#pragma once
// Child processes for integration tests: start a binary, read its stderr line by line
// (keel logs JSON lines there), wait for a line, kill it (SIGKILL for crash tests).
// The destructor kills and reaps the child, so a failing test leaves nothing behind.

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace keel::testing {

class Process {
 public:
  /// Starts `argv[0]` with the arguments, in `cwd` (empty: the current directory), with
  /// `env` added to the environment. Aborts the test binary if fork/exec fails.
  Process(std::vector<std::string> argv, std::string cwd = {}, std::vector<std::string> env = {});
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  /// Waits until a stderr line satisfies `pred`; returns it, or "" on timeout or exit.
  std::string WaitForLine(const std::function<bool(const std::string&)>& pred,
                          std::chrono::milliseconds timeout = std::chrono::seconds(20));
  /// Every stderr line so far.
  std::vector<std::string> Lines();
  /// Sends `sig` (SIGKILL, SIGTERM, ...).
  void Signal(int sig);
  /// Waits for the exit; returns the exit code, or 128+signal. -1 on timeout.
  int Wait(std::chrono::milliseconds timeout = std::chrono::seconds(30));

 private:
  pid_t pid_ = -1;
  int err_fd_ = -1;
  bool reaped_ = false;
  int status_ = 0;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> lines_;  // GUARDED_BY(mu_)
  bool eof_ = false;                // GUARDED_BY(mu_)
};

/// A `keel serve` (or `keel worker`) on an ephemeral loopback port, in its own temporary
/// directory.
class KeelServer {
 public:
  /// Writes `config_yaml` (may be empty: the built-in default) to dir/keel.yaml and starts
  /// `keel COMMAND` ("serve" or "worker") in `dir`, listening on 127.0.0.1:0. Waits for
  /// the "listening" line (port() is 0 when none came).
  KeelServer(const std::string& dir, const std::string& config_yaml, const std::string& command = "serve");
  /// The base URL, "http://127.0.0.1:PORT".
  const std::string& url() const { return url_; }
  uint16_t port() const { return port_; }
  Process& process() { return *process_; }
  /// kill -9 and reap.
  void Crash();
  /// SIGTERM; returns the exit code.
  int Terminate();

 private:
  std::string dir_;
  std::unique_ptr<Process> process_;
  std::string url_;
  uint16_t port_ = 0;
};

/// A `keel mock-llm` on an ephemeral loopback port.
class MockLlm {
 public:
  explicit MockLlm(std::vector<std::string> extra_args = {});
  const std::string& url() const { return url_; }  // "http://127.0.0.1:PORT"
  Process& process() { return *process_; }

 private:
  std::unique_ptr<Process> process_;
  std::string url_;
};

/// A fresh empty directory under the system temp dir, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// Parses the "addr" of a JSON "listening" log line; 0 when the line is not one.
uint16_t ListeningPort(const std::string& line);

}  // namespace keel::testing
