#include "keel/testing/services.h"

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "keel/testing/process.h"

namespace keel::testing {
namespace {

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += "'\\''"; else out += c;
  }
  return out + "'";
}

// Runs a shell command; returns its stdout without the last newline. `ok` says whether
// it exited 0; its stderr goes to ours.
std::string Shell(const std::string& command, bool& ok) {
  std::string out;
  FILE* p = popen(command.c_str(), "r");
  if (!p) {
    ok = false;
    return out;
  }
  std::array<char, 4096> buf;
  std::size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  ok = status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string Services(const std::string& args) {
  bool ok = false;
  const std::string out = Shell(std::string(KEEL_SOURCE_DIR) + "/tests/support/services.sh " + args, ok);
  if (!ok) {
    std::cerr << "services.sh " << args << " failed\n";
    std::abort();
  }
  // The URL is the last line printed.
  const auto nl = out.rfind('\n');
  return nl == std::string::npos ? out : out.substr(nl + 1);
}

std::string ReadLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Servers started for this process when CTest's fixture is not there.
struct OwnServers {
  TempDir dir;
  std::unique_ptr<PostgresServer> postgres;
  std::unique_ptr<RedisServer> redis;
};
OwnServers& Own() {
  static OwnServers* own = new OwnServers;  // stopped by the atexit below
  return *own;
}
std::once_flag own_exit_once;
void StopOwnAtExit() {
  std::call_once(own_exit_once, [] {
    std::atexit([] {
      Own().postgres.reset();
      Own().redis.reset();
    });
  });
}

std::string SharedUrl(const char* file) {
  const char* dir = std::getenv("KEEL_TEST_SERVICES");
  if (dir && *dir) {
    const std::string url = ReadLine(std::string(dir) + "/" + file);
    if (!url.empty()) return url;
  }
  return {};
}

}  // namespace

std::string SharedPostgresUrl() {
  static std::mutex mu;
  std::lock_guard lock(mu);
  if (auto url = SharedUrl("postgres.url"); !url.empty()) return url;
  if (!Own().postgres) {
    StopOwnAtExit();
    Own().postgres = std::make_unique<PostgresServer>(Own().dir.path() + "/pg-own");
  }
  return Own().postgres->admin_url();
}

std::string SharedRedisUrl() {
  static std::mutex mu;
  std::lock_guard lock(mu);
  if (auto url = SharedUrl("redis.url"); !url.empty()) return url;
  if (!Own().redis) {
    StopOwnAtExit();
    Own().redis = std::make_unique<RedisServer>(Own().dir.path() + "/redis-own");
  }
  return Own().redis->url();
}

std::string Psql(const std::string& url, const std::string& sql) {
  bool ok = false;
  const std::string out =
      Shell("psql -X -q -At -v ON_ERROR_STOP=1 " + Quote(url) + " -c " + Quote(sql) + " 2>&1", ok);
  if (!ok) throw std::runtime_error("psql: " + out);
  return out;
}

std::string CreateDatabase(const std::string& admin_url, const std::string& name) {
  try {
    Psql(admin_url, "DROP DATABASE IF EXISTS \"" + name + "\" WITH (FORCE)");
    Psql(admin_url, "CREATE DATABASE \"" + name + "\"");
  } catch (const std::exception& e) {
    std::cerr << "cannot create database " << name << ": " << e.what() << "\n";
    std::abort();
  }
  const auto slash = admin_url.rfind('/');
  return admin_url.substr(0, slash + 1) + name;
}

PostgresServer::PostgresServer(std::string dir) : dir_(std::move(dir)) {
  url_ = Services("postgres-start " + Quote(dir_));
  running_ = true;
}

PostgresServer::~PostgresServer() { Services("postgres-remove " + Quote(dir_)); }

void PostgresServer::Stop(const std::string& mode) {
  Services("postgres-stop " + Quote(dir_) + " " + mode);
  running_ = false;
}

void PostgresServer::Start() {
  url_ = Services("postgres-restart " + Quote(dir_));
  running_ = true;
}

RedisServer::RedisServer(std::string dir) : dir_(std::move(dir)) {
  url_ = Services("redis-start " + Quote(dir_));
  running_ = true;
}

RedisServer::~RedisServer() {
  if (running_) Stop();
}

void RedisServer::Stop() {
  Services("redis-stop " + Quote(dir_));
  running_ = false;
}

void RedisServer::Start() {
  url_ = Services("redis-restart " + Quote(dir_));
  running_ = true;
}

int RedisServer::port() const { return std::stoi(url_.substr(url_.rfind(':') + 1)); }

}  // namespace keel::testing
