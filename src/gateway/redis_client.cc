#include "redis_client.h"

#include "keel/net/digest.h"

#include <hiredis/hiredis.h>
#include <prometheus/family.h>

#include <cerrno>
#include <chrono>
#include <utility>

#include "keel/obs/log.h"

namespace keel::gateway::detail {
namespace {

constexpr RedisOp kAllOps[kRedisOps] = {RedisOp::kPing, RedisOp::kRateTake, RedisOp::kRateAdjust,
                                        RedisOp::kCacheGet, RedisOp::kCacheSet};


RedisReply Copy(const redisReply& r) {
  RedisReply out;
  switch (r.type) {
    case REDIS_REPLY_STRING:
      out.kind = RedisReply::Kind::kString;
      break;
    case REDIS_REPLY_STATUS:
      out.kind = RedisReply::Kind::kStatus;
      break;
    case REDIS_REPLY_ERROR:
      out.kind = RedisReply::Kind::kError;
      break;
    case REDIS_REPLY_INTEGER:
      out.kind = RedisReply::Kind::kInteger;
      break;
    case REDIS_REPLY_ARRAY:
      out.kind = RedisReply::Kind::kArray;
      break;
    default:
      out.kind = RedisReply::Kind::kNil;
      break;
  }
  if (r.str != nullptr) out.str.assign(r.str, r.len);
  out.integer = r.integer;
  for (std::size_t i = 0; i < r.elements; ++i) out.elements.push_back(Copy(*r.element[i]));
  return out;
}

// errno of this thread's last failed round trip, read after other calls may have set it.
thread_local int t_failed_errno = 0;

timeval ToTimeval(Duration d) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(d.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((d.count() % 1000) * 1000);
  return tv;
}

// What went wrong on a context, in words (a timeout says so rather than "Resource
// temporarily unavailable").
std::string Describe(const redisContext* c, int saved_errno, Duration timeout) {
  if (c->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK)) {
    return "no answer within the timeout of " + std::to_string(timeout.count()) + "ms";
  }
  if (c->err == REDIS_ERR_EOF) return "the server closed the connection";
  return c->errstr[0] != '\0' ? std::string(c->errstr)
                              : "connection error " + std::to_string(c->err);
}

}  // namespace

std::string_view RedisOpName(RedisOp op) {
  switch (op) {
    case RedisOp::kPing:
      return "ping";
    case RedisOp::kRateTake:
      return "rate_take";
    case RedisOp::kRateAdjust:
      return "rate_adjust";
    case RedisOp::kCacheGet:
      return "cache_get";
    case RedisOp::kCacheSet:
      return "cache_set";
  }
  return "unknown";
}

RedisScript::RedisScript(std::string source)
    : source_(std::move(source)), sha1_(net::Sha1Hex(source_)) {}

void RedisClient::ContextFree::operator()(redisContext* c) const { redisFree(c); }

RedisClient::RedisClient(const RedisConfig& config, prometheus::Registry& registry,
                         const Clock& clock)
    : config_(config),
      clock_(clock),
      up_gauge_(
          prometheus::BuildGauge()
              .Name("keel_redis_up")
              .Help("1 while Redis is usable, 0 while keel is degraded to local limits and cache")
              .Register(registry)
              .Add({})) {
  auto& errors = prometheus::BuildCounter()
                     .Name("keel_redis_errors_total")
                     .Help("Redis calls that failed (refused, timed out, error reply), by op")
                     .Register(registry);
  auto& fallbacks =
      prometheus::BuildCounter()
          .Name("keel_redis_fallbacks_total")
          .Help("Calls served by local limits or cache because Redis was not usable, by op")
          .Register(registry);
  for (RedisOp op : kAllOps) {
    errors_.push_back(&errors.Add({{"op", std::string(RedisOpName(op))}}));
    fallbacks_.push_back(&fallbacks.Add({{"op", std::string(RedisOpName(op))}}));
  }
  up_gauge_.Set(1);
}

RedisClient::~RedisClient() = default;

std::unique_ptr<RedisClient> RedisClient::Create(const RedisConfig& config,
                                                 prometheus::Registry& registry,
                                                 const Clock& clock) {
  std::unique_ptr<RedisClient> client(new RedisClient(config, registry, clock));
  const auto& a = config.address;
  if (client->Command(RedisOp::kPing, {"PING"}).ok()) {
    obs::LogInfo("redis connected", {{"host", a.host}, {"port", a.port}, {"db", a.db}});
  }
  return client;
}

bool RedisClient::Usable() {
  if (up_.load(std::memory_order_acquire)) return true;
  const int64_t now = ToMillis(clock_.Now());
  int64_t at = retry_at_ms_.load();
  if (now < at) return false;
  // One caller per interval makes the trial; the others keep to local state meanwhile.
  return retry_at_ms_.compare_exchange_strong(at, now + config_.retry_interval.count());
}

RedisClient::Connection RedisClient::Connect(std::string& why) {
  const auto& a = config_.address;
  const timeval tv = ToTimeval(config_.timeout);
  Connection c(redisConnectWithTimeout(a.host.c_str(), a.port, tv));
  const std::string where = a.host + ":" + std::to_string(a.port);
  if (!c) {
    why = "cannot allocate a connection to " + where;
    return nullptr;
  }
  if (c->err != 0) {
    why = "cannot connect to " + where + ": " + Describe(c.get(), errno, config_.timeout);
    return nullptr;
  }
  if (redisSetTimeout(c.get(), tv) != REDIS_OK) {
    why = "cannot set the timeout on the connection to " + where;
    return nullptr;
  }
  auto setup = [&](const std::vector<std::string_view>& args, const char* what) {
    auto r = RoundTrip(c.get(), args, why);
    if (!r) {
      why = std::string(what) + " on " + where + ": " + why;
      return false;
    }
    if (r->kind == RedisReply::Kind::kError) {
      why = std::string(what) + " on " + where + " was refused: " + r->str;
      return false;
    }
    return true;
  };
  if (!a.password.empty()) {
    // The password goes to the server only; a refusal's message never repeats it.
    std::vector<std::string_view> auth{"AUTH"};
    if (!a.username.empty()) auth.push_back(a.username);
    auth.push_back(a.password);
    if (!setup(auth, "AUTH")) return nullptr;
  }
  if (a.db != 0) {
    const std::string db = std::to_string(a.db);
    if (!setup({"SELECT", db}, "SELECT")) return nullptr;
  }
  return c;
}

std::optional<RedisReply> RedisClient::RoundTrip(redisContext* c,
                                                 const std::vector<std::string_view>& args,
                                                 std::string& why) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (auto a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  errno = 0;
  auto* raw = static_cast<redisReply*>(
      redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data()));
  if (raw == nullptr) {
    t_failed_errno = errno;
    why = Describe(c, t_failed_errno, config_.timeout);
    return std::nullopt;
  }
  RedisReply out = Copy(*raw);
  freeReplyObject(raw);
  return out;
}

void RedisClient::Release(Connection c) {
  {
    std::lock_guard lock(mu_);
    if (c) {
      idle_.push_back(std::move(c));
    } else {
      --open_;
    }
  }
  released_.notify_one();
}

Result<RedisReply> RedisClient::Run(RedisOp op, const Exchange& exchange) {
  if (!Usable()) return Fallback(op, "redis is degraded");
  const auto deadline = std::chrono::steady_clock::now() + config_.timeout;
  Connection c;
  bool reused = false;
  {
    std::unique_lock lock(mu_);
    while (idle_.empty() && open_ >= config_.pool_size) {
      if (released_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
          open_ >= config_.pool_size) {
        // Busy, not broken: this call goes without Redis; the mode does not change.
        return Fallback(op, "every pooled redis connection is busy");
      }
    }
    if (!idle_.empty()) {
      c = std::move(idle_.back());
      idle_.pop_back();
      reused = true;
    } else {
      ++open_;
    }
  }
  std::string why;
  std::optional<RedisReply> reply;
  for (int round = 0; round < 2 && !reply; ++round) {
    if (!c) {
      c = Connect(why);
      if (!c) {
        Release(nullptr);
        return Fail(op, why);
      }
      reused = false;
    }
    reply = exchange(c.get(), why);
    if (!reply) {
      // A pooled connection the server closed meanwhile (it restarted): once more on a new
      // one. A timeout is not retried: it would double the wait.
      const bool stale =
          reused &&
          (c->err == REDIS_ERR_EOF ||
           (c->err == REDIS_ERR_IO && (t_failed_errno == ECONNRESET || t_failed_errno == EPIPE)));
      c.reset();
      if (!stale) break;
    }
  }
  if (!reply) {
    Release(nullptr);
    return Fail(op, why);
  }
  Release(std::move(c));
  if (reply->kind == RedisReply::Kind::kError) return Fail(op, "error reply: " + reply->str);
  OnSuccess();
  return std::move(*reply);
}

Result<RedisReply> RedisClient::Command(RedisOp op, const std::vector<std::string_view>& args) {
  return Run(op, [&](redisContext* c, std::string& why) { return RoundTrip(c, args, why); });
}

Result<RedisReply> RedisClient::Eval(RedisOp op, const RedisScript& script,
                                     const std::vector<std::string_view>& keys,
                                     const std::vector<std::string_view>& args) {
  const std::string nkeys = std::to_string(keys.size());
  std::vector<std::string_view> argv{"EVALSHA", script.sha1(), nkeys};
  argv.insert(argv.end(), keys.begin(), keys.end());
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(op, [&](redisContext* c, std::string& why) -> std::optional<RedisReply> {
    auto r = RoundTrip(c, argv, why);
    if (!r || r->kind != RedisReply::Kind::kError || r->str.rfind("NOSCRIPT", 0) != 0) return r;
    auto loaded = RoundTrip(c, {"SCRIPT", "LOAD", script.source()}, why);
    if (!loaded || loaded->kind == RedisReply::Kind::kError) return loaded;
    return RoundTrip(c, argv, why);
  });
}

Error RedisClient::Fallback(RedisOp op, std::string why) {
  fallbacks_[static_cast<std::size_t>(op)]->Increment();
  return Error(ErrorCode::kUnavailable, "redis: " + why);
}

Error RedisClient::Fail(RedisOp op, std::string why) {
  errors_[static_cast<std::size_t>(op)]->Increment();
  retry_at_ms_.store(ToMillis(clock_.Now()) + config_.retry_interval.count());
  if (up_.exchange(false, std::memory_order_acq_rel)) {
    up_gauge_.Set(0);
    // Pooled connections are likely broken too; the next trial connects afresh.
    std::vector<Connection> closing;
    {
      std::lock_guard lock(mu_);
      closing.swap(idle_);
      open_ -= static_cast<int>(closing.size());
    }
    released_.notify_all();
    obs::LogWarn("redis unavailable: rate limits and caches fall back to this node's own",
                 {{"op", RedisOpName(op)},
                  {"reason", why},
                  {"retry_interval_ms", config_.retry_interval.count()}});
  }
  return Fallback(op, std::move(why));
}

void RedisClient::OnSuccess() {
  if (up_.load(std::memory_order_acquire) || up_.exchange(true, std::memory_order_acq_rel)) return;
  up_gauge_.Set(1);
  obs::LogInfo("redis available again: rate limits and caches are shared",
               {{"host", config_.address.host}, {"port", config_.address.port}});
}

}  // namespace keel::gateway::detail
