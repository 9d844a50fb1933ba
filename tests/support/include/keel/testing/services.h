#pragma once
// Throwaway PostgreSQL and Redis servers for tests, run by tests/support/services.sh on
// loopback, with their data in a directory of the test's.
//
// CTest starts one PostgreSQL and one Redis for the whole run (the `services` fixture in
// tests/CMakeLists.txt) and names their directory in KEEL_TEST_SERVICES; SharedPostgresUrl
// and SharedRedisUrl read it. Run outside CTest, they start servers of their own for the
// process (in a temporary directory removed at exit). Tests that stop or restart a server
// start their own with PostgresServer / RedisServer.

#include <string>

namespace keel::testing {

/// The admin URL (database "postgres") of the run's shared PostgreSQL server.
std::string SharedPostgresUrl();
/// The URL of the run's shared Redis server.
std::string SharedRedisUrl();

/// Creates database `name` (dropped first if it exists) on the server of `admin_url`;
/// returns the URL of the new database. Aborts the test binary on failure.
std::string CreateDatabase(const std::string& admin_url, const std::string& name);

/// Runs one SQL statement with psql on `url`; returns its output (unaligned, tuples only),
/// or throws std::runtime_error with psql's message.
std::string Psql(const std::string& url, const std::string& sql);

/// A PostgreSQL server of the test's own, in `dir` (which must outlive it).
class PostgresServer {
 public:
  explicit PostgresServer(std::string dir);
  ~PostgresServer();  // stops it (fast) and deletes its data
  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  const std::string& admin_url() const { return url_; }
  /// Stops it: "fast" (a clean shutdown) or "immediate" (as in a crash).
  void Stop(const std::string& mode = "fast");
  /// Starts it again on the same port, with the same data.
  void Start();

 private:
  std::string dir_;
  std::string url_;
  bool running_ = false;
};

/// A Redis server of the test's own.
class RedisServer {
 public:
  explicit RedisServer(std::string dir);
  ~RedisServer();
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  const std::string& url() const { return url_; }
  /// The port of url().
  int port() const;
  void Stop();
  /// Starts it again on the same port (empty: it keeps no data).
  void Start();

 private:
  std::string dir_;
  std::string url_;
  bool running_ = false;
};

}  // namespace keel::testing
