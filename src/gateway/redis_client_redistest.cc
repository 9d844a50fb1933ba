// The Redis client and the shared rate-limit scripts against real Redis servers on
// loopback (the run's shared one, or a test's own that it stops): commands, scripts
// reloaded after NOSCRIPT, the degraded mode and its retry interval (on a manual clock),
// timeouts, error replies, and the token-bucket semantics of the scripts.

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <thread>

#include "keel/obs/metrics.h"
#include "keel/testing/assert.h"
#include "keel/testing/process.h"
#include "keel/testing/services.h"
#include "redis_client.h"
#include "shared_limits.h"

namespace keel::gateway::detail {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;

// A TCP port that accepts connections (the kernel completes them) and never answers.
class SilentServer {
 public:
  SilentServer() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    listen(fd_, 64);
    socklen_t len = sizeof a;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  ~SilentServer() { close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

class RedisClientTest : public ::testing::Test {
 protected:
  void SetUp() override { std::signal(SIGPIPE, SIG_IGN); }

  RedisConfig Config(const std::string& url) {
    auto address = ParseRedisUrl(url);
    EXPECT_TRUE(address.ok()) << url;
    RedisConfig c;
    if (address.ok()) c.address = *address;
    // Unique per run, so that a test run again soon after meets no state of the last run.
    c.key_prefix =
        "test:" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
        ":" + std::to_string(getpid()) + "-" +
        std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + ":";
    c.timeout = milliseconds(200);
    c.retry_interval = milliseconds(1000);
    return c;
  }

  double Metric(const std::string& series) {
    const std::string text = obs::RenderPrometheus(registry_);
    const auto at = text.find("\n" + series + " ");  // a sample line, not the HELP line
    if (at == std::string::npos) return -1;
    return std::stod(text.substr(at + series.size() + 2));
  }
  double Errors(const char* op) {
    return Metric(std::string("keel_redis_errors_total{op=\"") + op + "\"}");
  }
  double Fallbacks(const char* op) {
    return Metric(std::string("keel_redis_fallbacks_total{op=\"") + op + "\"}");
  }

  ManualClock clock_;
  prometheus::Registry registry_;
};

TEST_F(RedisClientTest, RunsCommandsAndReportsUp) {
  auto client = RedisClient::Create(Config(testing::SharedRedisUrl()), registry_, clock_);
  EXPECT_TRUE(client->up());
  EXPECT_EQ(Metric("keel_redis_up"), 1);
  const std::string key = client->config().key_prefix + "k";
  auto set =
      client->Command(RedisOp::kCacheSet, {"SET", key, std::string("v\0w", 3), "PX", "60000"});
  ASSERT_OK(set);
  EXPECT_EQ(set->kind, RedisReply::Kind::kStatus);
  auto get = client->Command(RedisOp::kCacheGet, {"GET", key});
  ASSERT_OK(get);
  EXPECT_EQ(get->kind, RedisReply::Kind::kString);
  EXPECT_EQ(get->str, std::string("v\0w", 3));  // binary-safe
  auto missing = client->Command(RedisOp::kCacheGet, {"GET", key + "-none"});
  ASSERT_OK(missing);
  EXPECT_EQ(missing->kind, RedisReply::Kind::kNil);
  EXPECT_EQ(Errors("cache_get"), 0);
  EXPECT_EQ(Fallbacks("cache_get"), 0);
}

TEST_F(RedisClientTest, ScriptsAreLoadedWhenTheServerDoesNotKnowThem) {
  testing::TempDir dir;
  testing::RedisServer server(dir.path() + "/redis");
  auto client = RedisClient::Create(Config(server.url()), registry_, clock_);
  const RedisScript script("return {KEYS[1], ARGV[1]}");
  for (int i = 0; i < 2; ++i) {  // the first call meets NOSCRIPT, the second finds it
    auto r = client->Eval(RedisOp::kRateTake, script, {"a"}, {"b"});
    ASSERT_OK(r);
    ASSERT_EQ(r->kind, RedisReply::Kind::kArray);
    ASSERT_EQ(r->elements.size(), 2u);
    EXPECT_EQ(r->elements[0].str, "a");
    EXPECT_EQ(r->elements[1].str, "b");
  }
  ASSERT_OK(client->Command(RedisOp::kPing, {"SCRIPT", "FLUSH"}));
  ASSERT_OK(client->Eval(RedisOp::kRateTake, script, {"a"}, {"b"}));
  EXPECT_EQ(script.sha1().size(), 40u);
  EXPECT_EQ(Errors("rate_take"), 0);
}

TEST_F(RedisClientTest, AServerThatIsDownDegradesAtStartAndIsRetriedOncePerInterval) {
  testing::TempDir dir;
  testing::RedisServer server(dir.path() + "/redis");
  const std::string url = server.url();
  server.Stop();
  auto client = RedisClient::Create(Config(url), registry_, clock_);
  EXPECT_FALSE(client->up());
  EXPECT_EQ(Metric("keel_redis_up"), 0);
  EXPECT_EQ(Errors("ping"), 1);
  // Within the retry interval no call is made: each answers at once as a fallback.
  for (int i = 0; i < 5; ++i) {
    auto r = client->Command(RedisOp::kCacheGet, {"GET", "x"});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kUnavailable);
    EXPECT_THAT(r.error().message, HasSubstr("degraded"));
  }
  EXPECT_EQ(Errors("cache_get"), 0);
  EXPECT_EQ(Fallbacks("cache_get"), 5);
  // After it, one call tries (and fails: still down), which starts another interval.
  clock_.Advance(milliseconds(1000));
  auto tried = client->Command(RedisOp::kCacheGet, {"GET", "x"});
  ASSERT_FALSE(tried.ok());
  EXPECT_THAT(tried.error().message, HasSubstr("cannot connect"));
  EXPECT_EQ(Errors("cache_get"), 1);
  EXPECT_FALSE(client->Command(RedisOp::kCacheGet, {"GET", "x"}).ok());
  EXPECT_EQ(Errors("cache_get"), 1);
  // Back up: the first call after the interval succeeds and ends the degraded mode.
  server.Start();
  clock_.Advance(milliseconds(999));
  EXPECT_FALSE(client->Command(RedisOp::kCacheGet, {"GET", "x"}).ok());
  clock_.Advance(milliseconds(1));
  ASSERT_OK(client->Command(RedisOp::kCacheGet, {"GET", "x"}));
  EXPECT_TRUE(client->up());
  EXPECT_EQ(Metric("keel_redis_up"), 1);
  ASSERT_OK(client->Command(RedisOp::kCacheGet, {"GET", "x"}));
  EXPECT_EQ(Fallbacks("cache_get"), 8);  // 5 + the failed trial + 2 within intervals
}

TEST_F(RedisClientTest, ARestartedServerIsReachedAgainThroughANewConnection) {
  testing::TempDir dir;
  testing::RedisServer server(dir.path() + "/redis");
  auto client = RedisClient::Create(Config(server.url()), registry_, clock_);
  ASSERT_OK(client->Command(RedisOp::kCacheGet, {"GET", "x"}));
  server.Stop();
  server.Start();
  // The pooled connection is dead; the call reconnects once rather than degrade.
  ASSERT_OK(client->Command(RedisOp::kCacheGet, {"GET", "x"}));
  EXPECT_TRUE(client->up());
  EXPECT_EQ(Errors("cache_get"), 0);
}

TEST_F(RedisClientTest, AServerThatDoesNotAnswerCostsOneTimeoutPerInterval) {
  SilentServer silent;
  auto config = Config("redis://127.0.0.1:" + std::to_string(silent.port()));
  config.timeout = milliseconds(100);
  const auto t0 = std::chrono::steady_clock::now();
  auto client = RedisClient::Create(config, registry_, clock_);
  const auto start_cost = std::chrono::steady_clock::now() - t0;
  EXPECT_FALSE(client->up());
  EXPECT_GE(start_cost, milliseconds(90));
  EXPECT_LT(start_cost, milliseconds(2000));
  // Degraded: a hundred calls cost nothing like a timeout each.
  const auto t1 = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(client->Command(RedisOp::kRateTake, {"PING"}).ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t1, milliseconds(90));
  EXPECT_EQ(Errors("rate_take"), 0);
  EXPECT_EQ(Fallbacks("rate_take"), 100);
  clock_.Advance(milliseconds(1000));
  auto r = client->Command(RedisOp::kRateTake, {"PING"});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("no answer within the timeout of 100ms"));
  EXPECT_EQ(Errors("rate_take"), 1);
}

TEST_F(RedisClientTest, AWrongPasswordDegradesWithTheReasonAndNeverThePassword) {
  auto client = RedisClient::Create(
      Config(testing::SharedRedisUrl().insert(8, ":not-the-password@")), registry_, clock_);
  EXPECT_FALSE(client->up());
  EXPECT_EQ(Errors("ping"), 1);
  clock_.Advance(milliseconds(1000));
  auto r = client->Command(RedisOp::kCacheGet, {"GET", "x"});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("AUTH"));
  EXPECT_THAT(r.error().message, ::testing::Not(HasSubstr("not-the-password")));
}

TEST_F(RedisClientTest, AnErrorReplyDegrades) {
  testing::TempDir dir;
  testing::RedisServer server(dir.path() + "/redis");
  auto client = RedisClient::Create(Config(server.url()), registry_, clock_);
  ASSERT_OK(client->Command(RedisOp::kPing, {"CONFIG", "SET", "maxmemory-policy", "noeviction"}));
  ASSERT_OK(client->Command(RedisOp::kPing, {"CONFIG", "SET", "maxmemory", "1"}));
  auto r = client->Command(RedisOp::kCacheSet, {"SET", "big", std::string(1000, 'x')});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("OOM"));
  EXPECT_FALSE(client->up());
  EXPECT_EQ(Errors("cache_set"), 1);
  EXPECT_EQ(Fallbacks("cache_set"), 1);
}

TEST_F(RedisClientTest, ConcurrentCallersUseThePool) {
  auto config = Config(testing::SharedRedisUrl());
  config.pool_size = 4;
  auto client = RedisClient::Create(config, registry_, clock_);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i)
        ok += client->Command(RedisOp::kCacheGet, {"PING"}).ok() ? 1 : 0;
    });
  }
  for (auto& t : threads) t.join();
  // Callers beyond the pool wait for a connection up to the timeout; none of these should
  // have had to give up on a local loopback server.
  EXPECT_EQ(ok.load(), 1600);
  EXPECT_TRUE(client->up());
}

class SharedLimitsTest : public RedisClientTest {
 protected:
  void SetUp() override {
    RedisClientTest::SetUp();
    client_ = RedisClient::Create(Config(testing::SharedRedisUrl()), registry_, clock_);
    limits_ = std::make_unique<SharedLimits>(*client_);
  }
  // The stored level of a bucket ("rpm" or "tpm") of provider "p"; nullopt when absent.
  std::optional<double> Level(const char* which) {
    auto r = client_->Command(
        RedisOp::kPing, {"HGET", client_->config().key_prefix + "rate:{p}:" + which, "tokens"});
    if (!r.ok() || r->kind != RedisReply::Kind::kString) return std::nullopt;
    return std::stod(r->str);
  }
  int64_t Pttl(const char* which) {
    auto r = client_->Command(RedisOp::kPing,
                              {"PTTL", client_->config().key_prefix + "rate:{p}:" + which});
    return r.ok() ? r->integer : -100;
  }
  std::unique_ptr<RedisClient> client_;
  std::unique_ptr<SharedLimits> limits_;
};

TEST_F(SharedLimitsTest, RpmAdmitsTheLimitThenAnswersTheWait) {
  for (int i = 0; i < 60; ++i) {
    auto r = limits_->Take("p", 60, 0, 0);
    ASSERT_OK(r);
    ASSERT_EQ(r->count(), 0) << "take " << i;
  }
  auto refused = limits_->Take("p", 60, 0, 0);
  ASSERT_OK(refused);
  // One request refills in 1 s; a little of it has passed already.
  EXPECT_GT(refused->count(), 500);
  EXPECT_LE(refused->count(), 1000);
  EXPECT_FALSE(Level("tpm").has_value());  // no tpm limit: that bucket is not touched
  // The key goes once it would be full again: within a minute and a second.
  EXPECT_GT(Pttl("rpm"), 59'000);
  EXPECT_LE(Pttl("rpm"), 61'000);
}

TEST_F(SharedLimitsTest, RpmAndTpmAreTakenBothOrNeither) {
  ASSERT_EQ(limits_->Take("p", 10, 100, 80)->count(), 0);
  EXPECT_NEAR(*Level("rpm"), 9, 0.01);
  EXPECT_NEAR(*Level("tpm"), 20, 0.1);
  // 30 tokens are not there: refused, and the request is not taken either.
  auto refused = limits_->Take("p", 10, 100, 30);
  ASSERT_OK(refused);
  EXPECT_GT(refused->count(), 5000);  // ~10 tokens short at 100/60 per second: ~6 s
  EXPECT_LE(refused->count(), 6000);
  EXPECT_NEAR(*Level("rpm"), 9, 0.01);
  EXPECT_NEAR(*Level("tpm"), 20, 0.1);
  ASSERT_EQ(limits_->Take("p", 10, 100, 20)->count(), 0);
  EXPECT_NEAR(*Level("rpm"), 8, 0.01);
  EXPECT_NEAR(*Level("tpm"), 0, 0.1);
}

TEST_F(SharedLimitsTest, AdjustRefundsUpToTheLimitAndChargesBelowZero) {
  ASSERT_EQ(limits_->Take("p", 10, 1000, 600)->count(), 0);
  // The call used less than its estimate: the rest comes back (capped at the limit).
  ASSERT_OK(limits_->Adjust("p", 10, 1000, 0, 5000));
  EXPECT_NEAR(*Level("tpm"), 1000, 0.01);
  EXPECT_NEAR(*Level("rpm"), 9, 0.01);  // rpm untouched by a zero delta
  // It used more: the bucket goes below zero, and the next take waits it out.
  ASSERT_OK(limits_->Adjust("p", 10, 1000, 0, -1500));
  EXPECT_NEAR(*Level("tpm"), -500, 1);
  auto wait = limits_->Take("p", 10, 1000, 100);
  ASSERT_OK(wait);
  EXPECT_GT(wait->count(), 35'000);  // 600 tokens at 1000/60 per second: ~36 s
  EXPECT_LE(wait->count(), 36'000);
  // The key lives until the bucket would be full: ~90 s from -500.
  EXPECT_GT(Pttl("tpm"), 85'000);
  EXPECT_LE(Pttl("tpm"), 91'000);
  // A release gives back a request and its tokens.
  ASSERT_OK(limits_->Adjust("p", 10, 1000, 1, 100));
  EXPECT_NEAR(*Level("rpm"), 10, 0.01);
}

TEST_F(SharedLimitsTest, TwoClientsShareOneBucket) {
  auto other_client = RedisClient::Create(client_->config(), registry_, clock_);
  SharedLimits other(*other_client);
  int admitted = 0;
  for (int i = 0; i < 10; ++i) {
    admitted += limits_->Take("p", 6, 0, 0)->count() == 0 ? 1 : 0;
    admitted += other.Take("p", 6, 0, 0)->count() == 0 ? 1 : 0;
  }
  EXPECT_EQ(admitted, 6);
}

TEST_F(SharedLimitsTest, FailsOverToTheCallerWhenRedisIsDown) {
  testing::TempDir dir;
  testing::RedisServer server(dir.path() + "/redis");
  auto client = RedisClient::Create(Config(server.url()), registry_, clock_);
  SharedLimits limits(*client);
  ASSERT_OK(limits.Take("p", 10, 0, 0));
  server.Stop();
  auto r = limits.Take("p", 10, 0, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable);
  EXPECT_FALSE(limits.Adjust("p", 10, 0, 1, 0).ok());
  EXPECT_EQ(Fallbacks("rate_take"), 1);
  EXPECT_EQ(Fallbacks("rate_adjust"), 1);
}

}  // namespace
}  // namespace keel::gateway::detail
