#pragma once
// A small synchronous Redis client for the gateway (hiredis), private to keel_gateway:
// the optional Redis that keel nodes share for rpm/tpm limits and route caches
// (docs/gateway.md, "Redis").
//
// Redis is an optimisation, never a dependency: every call either answers or fails with
// kUnavailable at once or within `timeout`, and the caller then decides with its local
// state (limits, cache). A failure of any kind (refused, reset, timeout, an error reply
// such as OOM, NOAUTH or WRONGPASS) switches the client to *degraded* mode for
// `retry_interval`: no Redis call at all is made in that time, so at most one call per
// interval pays a timeout; then one caller tries again, and the first success ends the
// degraded mode. Each switch writes one log line (warn with the reason when degraded, info
// when back) and sets keel_redis_up. Every call answered without Redis is counted in
// keel_redis_fallbacks_total{op}, every failed one also in keel_redis_errors_total{op}.
//
// Connections are pooled (at most `pool_size`), so concurrent callers do not wait for each
// other; each command is bounded by `timeout` (connect, send and receive; name resolution
// of a host name is not). Writes to a closed connection raise SIGPIPE: the process must
// ignore it (keel's main does).
//
// Thread-safe. The retry interval is measured with the injected Clock (tests move it); the
// waits for the network are real time.

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/result.h"

struct redisContext;

namespace keel::gateway::detail {

/// What a call is for: the `op` label of keel_redis_errors_total and
/// keel_redis_fallbacks_total.
enum class RedisOp { kPing, kRateTake, kRateAdjust, kCacheGet, kCacheSet };
inline constexpr int kRedisOps = 5;
/// "ping", "rate_take", "rate_adjust", "cache_get", "cache_set".
std::string_view RedisOpName(RedisOp op);

/// One reply, copied out of hiredis. Callers never see kError: an error reply is a failure.
struct RedisReply {
  enum class Kind { kNil, kString, kStatus, kInteger, kArray, kError };
  Kind kind = Kind::kNil;
  std::string str;  // kString, kStatus, kError
  int64_t integer = 0;
  std::vector<RedisReply> elements;
};

/// A Lua script, run with EVALSHA and loaded with SCRIPT LOAD when the server answers
/// NOSCRIPT (after a restart, or on first use).
class RedisScript {
 public:
  explicit RedisScript(std::string source);
  const std::string& source() const { return source_; }
  const std::string& sha1() const { return sha1_; }  // lower-case hex, as Redis names it

 private:
  std::string source_;
  std::string sha1_;
};

class RedisClient {
 public:
  /// Registers the keel_redis_* metrics on `registry` and pings the server once: when that
  /// fails, the client starts degraded (with its warn line) and keel serves with local
  /// limits and cache; it never refuses to start for Redis. `registry` and `clock` must
  /// outlive the client.
  static std::unique_ptr<RedisClient> Create(const RedisConfig& config,
                                             prometheus::Registry& registry, const Clock& clock);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  /// Runs one command (argv form: binary-safe). kUnavailable when Redis is not usable now
  /// or the command failed; the message says why.
  Result<RedisReply> Command(RedisOp op, const std::vector<std::string_view>& args);

  /// EVALSHA of `script` with `keys` and `args` (SCRIPT LOAD and again on NOSCRIPT). Same
  /// failures as Command.
  Result<RedisReply> Eval(RedisOp op, const RedisScript& script,
                          const std::vector<std::string_view>& keys,
                          const std::vector<std::string_view>& args);

  /// False while degraded.
  bool up() const { return up_.load(std::memory_order_acquire); }
  const RedisConfig& config() const { return config_; }

 private:
  struct ContextFree {
    void operator()(redisContext* c) const;
  };
  using Connection = std::unique_ptr<redisContext, ContextFree>;
  // One exchange on a connection: the reply (an error reply included), or nullopt when the
  // connection failed (`why` says how) and must be closed.
  using Exchange = std::function<std::optional<RedisReply>(redisContext*, std::string& why)>;

  RedisClient(const RedisConfig& config, prometheus::Registry& registry, const Clock& clock);
  Result<RedisReply> Run(RedisOp op, const Exchange& exchange);
  // Whether a call may be made now: always when up; when degraded, once the retry
  // interval has passed, for one caller per interval.
  bool Usable();
  Connection Connect(std::string& why);
  std::optional<RedisReply> RoundTrip(redisContext* c, const std::vector<std::string_view>& args,
                                      std::string& why);
  void Release(Connection c);
  Error Fallback(RedisOp op, std::string why);
  Error Fail(RedisOp op, std::string why);
  void OnSuccess();

  const RedisConfig config_;
  const Clock& clock_;
  prometheus::Gauge& up_gauge_;
  std::vector<prometheus::Counter*> errors_;     // by RedisOp
  std::vector<prometheus::Counter*> fallbacks_;  // by RedisOp

  std::atomic<bool> up_{true};
  std::atomic<int64_t> retry_at_ms_{0};  // while degraded: when the next try may be made

  std::mutex mu_;
  std::condition_variable released_;
  std::vector<Connection> idle_;  // GUARDED_BY(mu_)
  int open_ = 0;                  // GUARDED_BY(mu_): idle and lent connections
};

}  // namespace keel::gateway::detail
