// The gateway's resilience loop on a ManualClock and a ManualTimer, through the public
// Gateway, with scripted providers (GatewayDeps::make_provider): failover by error class,
// the same-target rules (a short Retry-After, one 5xx, no second call to a silent target),
// streams' first_token timeout, Retry-After and backoff, the retry budget, max_attempts,
// circuit breakers (and what they count), deadlines, context windows (configured or
// guessed), every strategy's order, admission limits, streams, cancellation, and the
// verdict counted for each decision. No sockets, no sleeps: time moves only when a
// test (or a fake's simulated latency, or a backoff on the ManualTimer) moves it.

#include "attempt_loop.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "health_prober.h"
#include "keel/core/cancel.h"
#include "keel/core/config.h"
#include "keel/core/timer.h"
#include "keel/gateway/gateway.h"
#include "keel/obs/metrics.h"
#include "keel/testing/assert.h"
#include "provider.h"
#include "route_table.h"

namespace keel::gateway {
namespace {

using std::chrono::milliseconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// One call of a scripted provider.
struct Step {
  std::optional<Error> error;  // none: an answer
  Duration latency{0};         // the clock moves this much during the call
  int chunks = 0;              // streams that fail: chunks sent before the error
  bool hold = false;           // ChatAsync: answer only when the test releases it
  bool role_first = false;     // streams: a role-only chunk first (no token)
  Duration stall{0};           // streams: silence before the first token, on the ManualTimer;
                               // ends early (kCancelled) when the attempt is cancelled
};

Step Stall(Duration stall) {
  Step s;
  s.role_first = true;
  s.stall = stall;
  return s;
}

Step Fail(ErrorCode code, std::optional<Duration> retry_after = std::nullopt,
          Duration latency = Duration(0)) {
  Step s;
  s.error = Error(code, "scripted " + std::string(ErrorCodeName(code)));
  s.error->retry_after = retry_after;
  s.latency = latency;
  return s;
}
Step Answer(Duration latency = Duration(0)) {
  Step s;
  s.latency = latency;
  return s;
}

// What a provider does, call by call: its steps in order, the last one repeated (an answer
// when there are none); and what it was called with. Thread-safe.
class Script {
 public:
  void Then(Step s) {
    std::lock_guard lock(mu_);
    steps_.push_back(std::move(s));
  }
  void Always(Step s) {
    std::lock_guard lock(mu_);
    steps_.clear();
    steps_.push_back(std::move(s));
  }
  Step Take(Timestamp now, Duration timeout, const json::object& body) {
    std::lock_guard lock(mu_);
    at_.push_back(now);
    timeouts_.push_back(timeout);
    last_body_ = body;
    if (steps_.empty()) return Step{};
    Step s = steps_.front();
    if (steps_.size() > 1) steps_.pop_front();
    return s;
  }
  int calls() const {
    std::lock_guard lock(mu_);
    return static_cast<int>(at_.size());
  }
  std::vector<Timestamp> at() const {
    std::lock_guard lock(mu_);
    return at_;
  }
  std::vector<Duration> timeouts() const {
    std::lock_guard lock(mu_);
    return timeouts_;
  }
  json::object last_body() const {
    std::lock_guard lock(mu_);
    return last_body_;
  }
  void Hold(std::function<void()> answer) {
    std::lock_guard lock(mu_);
    held_.push_back(std::move(answer));
  }
  std::vector<std::function<void()>> TakeHeld() {
    std::lock_guard lock(mu_);
    return std::exchange(held_, {});
  }

 private:
  mutable std::mutex mu_;
  std::deque<Step> steps_;                   // GUARDED_BY(mu_)
  std::vector<Timestamp> at_;                // GUARDED_BY(mu_)
  std::vector<Duration> timeouts_;           // GUARDED_BY(mu_)
  json::object last_body_;                   // GUARDED_BY(mu_)
  std::vector<std::function<void()>> held_;  // GUARDED_BY(mu_)
};

json::object Usage() {
  return json::object{{"prompt_tokens", 10}, {"completion_tokens", 5}, {"total_tokens", 15}};
}

// The stream of an answer: two chunks of text, then the usage chunk.
std::vector<json::object> Chunks() {
  auto delta = [](json::object d, json::value finish) {
    return json::object{
        {"object", "chat.completion.chunk"},
        {"choices", json::array{json::object{
                        {"index", 0}, {"delta", std::move(d)}, {"finish_reason", finish}}}}};
  };
  json::object usage{
      {"object", "chat.completion.chunk"}, {"choices", json::array{}}, {"usage", Usage()}};
  return {delta(json::object{{"role", "assistant"}, {"content", "Hello"}}, nullptr),
          delta(json::object{{"content", " world"}}, "stop"), usage};
}

// A detail::Provider that follows its Script, on the test's ManualClock.
class FakeProvider final : public detail::Provider {
 public:
  FakeProvider(std::string name, std::shared_ptr<Script> script, ManualClock& clock,
               ManualTimer& timer, bool async, std::vector<std::string>& log, std::mutex& log_mu)
      : name_(std::move(name)),
        script_(std::move(script)),
        clock_(clock),
        timer_(timer),
        async_(async),
        log_(log),
        log_mu_(log_mu) {}

  Result<ChatResult> Chat(const json::object& body, const ChatRequest&, Duration timeout) override {
    return Outcome(Begin(body, timeout));
  }
  bool async() const override { return async_; }
  void ChatAsync(const json::object& body, const ChatRequest&, Duration timeout,
                 const boost::asio::any_io_executor& executor,
                 std::function<void(Result<ChatResult>)> done) override {
    const Step s = Begin(body, timeout);
    auto answer = [this, s, done = std::move(done)] { done(Outcome(s)); };
    if (s.hold) return script_->Hold(std::move(answer));
    boost::asio::post(executor, std::move(answer));
  }
  Result<ChatResult> ChatStream(const json::object& body, const ChatRequest& req, Duration timeout,
                                const Gateway::ChunkSink& on_chunk) override {
    const Step s = Begin(body, timeout);
    if (s.role_first) {
      const json::object role{
          {"object", "chat.completion.chunk"},
          {"choices", json::array{json::object{{"index", 0},
                                               {"delta", json::object{{"role", "assistant"}}},
                                               {"finish_reason", nullptr}}}}};
      if (!on_chunk(role)) return Error(ErrorCode::kCancelled, "the reader stopped");
    }
    auto cancelled = [&req] { return req.cancel && req.cancel->cancelled(); };
    const Timestamp end = clock_.Now() + s.stall;
    for (int i = 0; i < 100 && clock_.Now() < end && !cancelled(); ++i) {
      const auto due = timer_.next_due();
      const Timestamp until = due && *due < end ? std::max(*due, clock_.Now()) : end;
      timer_.Advance(until - clock_.Now());
    }
    if (cancelled()) return Error(ErrorCode::kCancelled, "the call was cancelled");
    const auto chunks = Chunks();
    const std::size_t n = s.error ? static_cast<std::size_t>(s.chunks) : chunks.size();
    for (std::size_t i = 0; i < n && i < chunks.size(); ++i) {
      if (!on_chunk(chunks[i])) return Error(ErrorCode::kCancelled, "the reader stopped");
    }
    if (s.error) return *s.error;
    ChatResult r = Answered();
    r.text = "Hello world";
    return r;
  }
  Result<ChatResult> Embed(const json::object& body, const ChatRequest&,
                           Duration timeout) override {
    const Step s = Begin(body, timeout);
    if (s.error) return *s.error;
    ChatResult r;
    r.response = json::object{
        {"object", "list"},
        {"data", json::array{json::object{{"index", 0}, {"embedding", json::array{0.5}}}}}};
    r.usage = Usage();
    return r;
  }

 private:
  Step Begin(const json::object& body, Duration timeout) {
    {
      std::lock_guard lock(log_mu_);
      log_.push_back(name_);
    }
    Step s = script_->Take(clock_.Now(), timeout, body);
    if (s.latency.count() > 0) clock_.Advance(s.latency);
    return s;
  }
  Result<ChatResult> Outcome(const Step& s) const {
    if (s.error) return *s.error;
    return Answered();
  }
  ChatResult Answered() const {
    ChatResult r;
    r.text = "answer from " + name_;
    r.model = name_ + "-model";
    r.usage = Usage();
    r.response = json::object{
        {"object", "chat.completion"},
        {"model", r.model},
        {"choices",
         json::array{json::object{
             {"index", 0}, {"message", json::object{{"role", "assistant"}, {"content", r.text}}}}}},
        {"usage", r.usage}};
    return r;
  }

  std::string name_;
  std::shared_ptr<Script> script_;
  ManualClock& clock_;
  ManualTimer& timer_;
  bool async_;
  std::vector<std::string>& log_;
  std::mutex& log_mu_;
};

class GatewayLoopTest : public ::testing::Test {
 protected:
  // Providers (`name: {type: mock, ...}` lines under providers:) and routes, each provider
  // a FakeProvider following script(name). `async`: the fakes answer ChatAsync on the
  // executor (else they can only block).
  void Start(const std::string& providers, const std::string& routes, bool async = true) {
    gateway_.reset();
    registry_ = std::make_unique<prometheus::Registry>();
    random_ = std::make_unique<SeededRandom>(7);  // the same draws for every gateway
    auto config = ParseConfig("providers:\n" + providers + "routes:\n" + routes,
                              [](const std::string&) { return std::nullopt; });
    ASSERT_OK(config);
    GatewayDeps deps;
    deps.timer = &timer_;
    deps.make_provider = [this,
                          async](const ProviderConfig& p) -> std::unique_ptr<detail::Provider> {
      return std::make_unique<FakeProvider>(p.name, ScriptOf(p.name), clock_, timer_, async, log_,
                                            log_mu_);
    };
    auto g = Gateway::Create(*config, *registry_, clock_, *random_, std::move(deps));
    ASSERT_OK(g);
    gateway_ = std::move(g).value();
    t0_ = clock_.Now();
  }

  std::shared_ptr<Script> ScriptOf(const std::string& provider) {
    auto& s = scripts_[provider];
    if (!s) s = std::make_shared<Script>();
    return s;
  }
  Script& script(const std::string& provider) { return *ScriptOf(provider); }

  static ChatRequest Request(const std::string& route, const std::string& content = "hello") {
    ChatRequest req;
    req.route = route;
    req.body = json::object{
        {"messages", json::array{json::object{{"role", "user"}, {"content", content}}}}};
    return req;
  }

  // Runs the executor's io_context until `done`, moving the ManualTimer to its next due
  // callback whenever nothing else is left to run.
  template <typename Pred>
  void RunUntil(Pred done) {
    for (int i = 0; i < 1000 && !done(); ++i) {
      ctx_.restart();
      ctx_.run();
      if (done() || !timer_.AdvanceToNext()) break;
    }
    ctx_.restart();
    ctx_.run();
  }

  Result<ChatResult> CallAsync(ChatRequest req) {
    std::optional<Result<ChatResult>> out;
    gateway_->ChatAsync(std::move(req), ctx_.get_executor(),
                        [&](Result<ChatResult> r) { out = std::move(r); });
    RunUntil([&] { return out.has_value(); });
    if (!out) return Error(ErrorCode::kInternal, "the call never ended");
    return std::move(*out);
  }

  // A value of the registry by its series as rendered ("name{label=\"v\",...}"); 0 when absent.
  double Metric(const std::string& series) const {
    const std::string text = obs::RenderPrometheus(*registry_);
    const auto at = text.find("\n" + series + " ");
    if (at == std::string::npos) return 0;
    return std::stod(text.substr(at + series.size() + 2));
  }
  bool Has(const std::string& series) const {
    return obs::RenderPrometheus(*registry_).find("\n" + series + " ") != std::string::npos;
  }
  double Verdicts(const std::string& route, const std::string& verdict) const {
    return Metric("keel_gateway_decisions_total{route=\"" + route + "\",verdict=\"" + verdict +
                  "\"}");
  }
  double Refusals(const std::string& route, const std::string& provider,
                  const std::string& reason) const {
    return Metric("keel_gateway_refusals_total{provider=\"" + provider + "\",reason=\"" + reason +
                  "\",route=\"" + route + "\"}");
  }
  double Circuit(const std::string& route, const std::string& provider) const {
    return Metric("keel_gateway_circuit_state{provider=\"" + provider + "\",route=\"" + route +
                  "\"}");
  }
  std::vector<std::string> TakeLog() {
    std::lock_guard lock(log_mu_);
    return std::exchange(log_, {});
  }
  Duration Elapsed() const { return clock_.Now() - t0_; }

  ManualClock clock_;
  ManualTimer timer_{clock_};
  std::unique_ptr<SeededRandom> random_;
  boost::asio::io_context ctx_;
  std::map<std::string, std::shared_ptr<Script>> scripts_;
  std::mutex log_mu_;
  std::vector<std::string> log_;  // GUARDED_BY(log_mu_): providers in the order called
  Timestamp t0_;
  std::unique_ptr<prometheus::Registry> registry_;
  std::unique_ptr<Gateway> gateway_;  // last: goes first
};

const std::string kAB = "  a: {type: mock}\n  b: {type: mock}\n";

// ---- Failover by error class ------------------------------------------------------------

TEST_F(GatewayLoopTest, ResetsTimeoutsOverloadAndGarbageFailOverAtOnce) {
  // server_error (500, 502, 504) first retries the same target: see OneServerError...
  for (ErrorCode code : {ErrorCode::kNetwork, ErrorCode::kTimeout, ErrorCode::kOverloaded,
                         ErrorCode::kInvalidOutput}) {
    SCOPED_TRACE(ErrorCodeName(code));
    scripts_.clear();
    script("a").Always(Fail(code));
    Start(kAB, "  r: {targets: [{provider: a}, {provider: b}]}\n");
    auto r = gateway_->Chat(Request("r"));
    ASSERT_OK(r);
    EXPECT_EQ(r->provider, "b");
    EXPECT_EQ(r->model, "b-model");
    EXPECT_EQ(r->attempts, 2);
    EXPECT_EQ(r->failovers, 1);
    EXPECT_EQ(Elapsed(), Duration(0)) << "a failover waits for nothing";
    EXPECT_EQ(timer_.pending(), 0u);
    EXPECT_EQ(Verdicts("r", "first_attempt"), 1);
    EXPECT_EQ(Verdicts("r", "failover"), 1);
    EXPECT_EQ(Verdicts("r", "answered"), 1);
    EXPECT_EQ(Metric("keel_gateway_failovers_total{route=\"r\"}"), 1);
    EXPECT_EQ(Metric("keel_gateway_retries_total{route=\"r\"}"), 1);
    EXPECT_EQ(Metric("keel_llm_requests_total{outcome=\"" + std::string(ErrorCodeName(code)) +
                     "\",provider=\"a\",route=\"r\"}"),
              1);
  }
}

TEST_F(GatewayLoopTest, RequestErrorsAreReturnedAtOnceAndNeverRetried) {
  for (ErrorCode code : {ErrorCode::kInvalidRequest, ErrorCode::kAuth, ErrorCode::kContentPolicy}) {
    SCOPED_TRACE(ErrorCodeName(code));
    scripts_.clear();
    script("a").Always(Fail(code));
    Start(kAB, "  r: {targets: [{provider: a}, {provider: b}]}\n");
    auto r = gateway_->Chat(Request("r"));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, code);
    EXPECT_EQ(script("a").calls(), 1);
    EXPECT_EQ(script("b").calls(), 0);
    EXPECT_EQ(Verdicts("r", "not_retryable"), 1);
    EXPECT_EQ(Verdicts("r", "failover"), 0);
    EXPECT_EQ(Metric("keel_gateway_requests_total{outcome=\"" + std::string(ErrorCodeName(code)) +
                     "\",route=\"r\"}"),
              1);
  }
}

// ---- Backoff and Retry-After ------------------------------------------------------------

TEST_F(GatewayLoopTest, RetryAfterIsHonouredOnTheSameTargetThroughTheTimer) {
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(3000)));
  script("a").Then(Answer());
  Start("  a: {type: mock}\n",
        "  r: {targets: [{provider: a}], retry: {initial_backoff: 100ms, jitter: 0}}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->attempts, 2);
  EXPECT_EQ(r->failovers, 0);
  const auto at = script("a").at();
  ASSERT_EQ(at.size(), 2u);
  EXPECT_EQ(at[1] - at[0], milliseconds(3000)) << "at least Retry-After, not the 100ms backoff";
  EXPECT_EQ(r->duration, milliseconds(3000));
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 1);
  EXPECT_EQ(Metric("keel_gateway_retries_total{route=\"r\"}"), 1);
  EXPECT_EQ(Metric("keel_gateway_failovers_total{route=\"r\"}"), 0);
}

TEST_F(GatewayLoopTest, AnAsyncBackoffWaitsOnTheTimerAndAnswersOnTheCallersExecutor) {
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(3000)));
  script("a").Then(Answer());
  Start("  a: {type: mock}\n",
        "  r: {targets: [{provider: a}], retry: {initial_backoff: 100ms, jitter: 0}}\n");
  std::optional<Result<ChatResult>> out;
  bool on_executor = false;
  gateway_->ChatAsync(Request("r"), ctx_.get_executor(), [&](Result<ChatResult> r) {
    on_executor = ctx_.get_executor().running_in_this_thread();
    out = std::move(r);
  });
  ctx_.run();
  EXPECT_FALSE(out.has_value());
  EXPECT_EQ(script("a").calls(), 1);
  ASSERT_EQ(timer_.pending(), 1u);
  EXPECT_EQ(timer_.next_due(), t0_ + milliseconds(3000));
  timer_.Advance(milliseconds(2999));
  ctx_.restart();
  ctx_.run();
  EXPECT_EQ(script("a").calls(), 1) << "no retry before Retry-After";
  timer_.Advance(milliseconds(1));
  EXPECT_FALSE(out.has_value())
      << "the continuation runs on the executor, not on the timer's thread";
  ctx_.restart();
  ctx_.run();
  ASSERT_TRUE(out.has_value());
  ASSERT_OK(*out);
  EXPECT_TRUE(on_executor);
  EXPECT_EQ((*out)->attempts, 2);
  EXPECT_EQ((*out)->duration, milliseconds(3000));
}

TEST_F(GatewayLoopTest, BackoffGrowsExponentiallyWithoutRetryAfter) {
  for (int i = 0; i < 3; ++i) script("a").Then(Fail(ErrorCode::kServerError));
  script("a").Then(Answer());
  Start("  a: {type: mock}\n",
        "  r:\n    targets: [{provider: a}]\n    retry: {max_attempts: 4, initial_backoff: 100ms, "
        "multiplier: 2, jitter: 0}\n"
        "    retry_budget: {ratio: 10}\n    circuit_breaker: {consecutive_failures: 0}\n");
  ASSERT_OK(gateway_->Chat(Request("r")));
  const auto at = script("a").at();
  ASSERT_EQ(at.size(), 4u);
  EXPECT_EQ(at[1] - at[0], milliseconds(100));
  EXPECT_EQ(at[2] - at[1], milliseconds(200));
  EXPECT_EQ(at[3] - at[2], milliseconds(400));
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 3);
}

// ---- Bounds: the retry budget, max_attempts, the deadline -------------------------------

TEST_F(GatewayLoopTest, AnEmptyRetryBudgetRefusesEveryRetry) {
  script("a").Always(Fail(ErrorCode::kServerError));
  Start("  a: {type: mock}\n",
        "  r: {targets: [{provider: a}], retry_budget: {ratio: 0, min_per_second: 0}, retry: "
        "{initial_backoff: 1ms}}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kServerError);
  EXPECT_THAT(r.error().message, HasSubstr("retry budget is spent"));
  EXPECT_EQ(script("a").calls(), 1);
  EXPECT_EQ(Verdicts("r", "no_budget"), 1);
  EXPECT_EQ(Refusals("r", "a", "retry_budget"), 1);
  EXPECT_EQ(Metric("keel_gateway_retries_total{route=\"r\"}"), 0);
}

TEST_F(GatewayLoopTest, TheRetryBudgetAllowsItsShareOfRequests) {
  script("a").Always(Fail(ErrorCode::kServerError));
  Start("  a: {type: mock}\n",
        "  r:\n    targets: [{provider: a}]\n    retry: {max_attempts: 5, initial_backoff: 1ms, "
        "jitter: 0}\n"
        "    retry_budget: {ratio: 0.5, min_per_second: 0}\n    circuit_breaker: "
        "{consecutive_failures: 0}\n");
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(gateway_->Chat(Request("r")).ok());
  // Retries allowed: half the requests in the window. Calls 1 and 3 get none; 2 and 4 one each.
  EXPECT_EQ(script("a").calls(), 4 + 2);
  EXPECT_EQ(Verdicts("r", "first_attempt"), 4);
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 2);
  EXPECT_EQ(Verdicts("r", "no_budget"), 4);
}

TEST_F(GatewayLoopTest, MaxAttemptsBoundsTheCall) {
  script("a").Always(Fail(ErrorCode::kServerError));
  Start("  a: {type: mock}\n",
        "  r:\n    targets: [{provider: a}]\n    retry: {max_attempts: 3, initial_backoff: 1ms, "
        "jitter: 0}\n"
        "    retry_budget: {ratio: 10}\n    circuit_breaker: {consecutive_failures: 0}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kServerError);
  EXPECT_EQ(script("a").calls(), 3);
  EXPECT_EQ(Verdicts("r", "no_attempts_left"), 1);
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 2);
  // X-Keel-Max-Attempts.
  auto req = Request("r");
  req.max_attempts = 2;
  EXPECT_FALSE(gateway_->Chat(req).ok());
  EXPECT_EQ(script("a").calls(), 3 + 2);
}

TEST_F(GatewayLoopTest, FailoverOnlyTriesEachTargetOnce) {
  for (const char* p : {"a", "b", "c"}) script(p).Always(Fail(ErrorCode::kOverloaded));
  Start(kAB + "  c: {type: mock}\n",
        "  r: {targets: [{provider: a}, {provider: b}, {provider: c}]}\n");
  auto req = Request("r");
  req.failover_only = true;
  EXPECT_FALSE(gateway_->Chat(req).ok());
  EXPECT_THAT(TakeLog(), ElementsAre("a", "b", "c"));
  EXPECT_EQ(Verdicts("r", "failover"), 2);
  EXPECT_EQ(Verdicts("r", "no_attempts_left"), 1);
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 0);
}

TEST_F(GatewayLoopTest, TheDeadlineBoundsEveryAttemptAndEndsTheCall) {
  script("a").Always(Fail(ErrorCode::kTimeout, std::nullopt, Duration(600)));
  script("b").Always(Fail(ErrorCode::kTimeout, std::nullopt, Duration(400)));
  Start(kAB, "  r: {targets: [{provider: a}, {provider: b}]}\n");
  auto req = Request("r");
  req.timeout = Duration(1000);
  auto r = gateway_->Chat(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout);
  EXPECT_THAT(r.error().message, HasSubstr("the deadline passed after 2 attempts"));
  EXPECT_THAT(script("a").timeouts(), ElementsAre(Duration(1000)));
  EXPECT_THAT(script("b").timeouts(), ElementsAre(Duration(400))) << "what is left of the deadline";
  EXPECT_EQ(Verdicts("r", "deadline_passed"), 1);
  EXPECT_EQ(Verdicts("r", "no_attempts_left"), 0);
}

TEST_F(GatewayLoopTest, ABackoffLongerThanTheTimeLeftIsNotWaited) {
  script("a").Always(Fail(ErrorCode::kRateLimited, Duration(5000)));
  Start("  a: {type: mock}\n", "  r: {targets: [{provider: a}]}\n");
  auto req = Request("r");
  req.timeout = Duration(2000);
  auto r = gateway_->Chat(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kRateLimited)
      << "the provider's answer, with its Retry-After";
  EXPECT_EQ(r.error().retry_after, Duration(5000));
  EXPECT_EQ(Elapsed(), Duration(0)) << "nothing was waited for";
  EXPECT_EQ(script("a").calls(), 1);
  EXPECT_EQ(Verdicts("r", "deadline_too_short"), 1);
  EXPECT_EQ(Metric("keel_gateway_retries_total{route=\"r\"}"), 0)
      << "a retry not made is not counted";
}

TEST_F(GatewayLoopTest, NoTimeAtAllIsATimeoutBeforeAnyAttempt) {
  Start("  a: {type: mock}\n", "  r: {targets: [{provider: a}]}\n");
  auto req = Request("r");
  req.timeout = Duration(0);
  auto r = gateway_->Chat(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout);
  EXPECT_THAT(r.error().message, HasSubstr("passed before any target answered"));
  EXPECT_EQ(script("a").calls(), 0);
  EXPECT_EQ(Verdicts("r", "deadline_passed"), 1);
}

// ---- Circuit breakers --------------------------------------------------------------------

TEST_F(GatewayLoopTest, TheBreakerOpensThenLetsOneTrialThroughAfterOpenFor) {
  script("a").Always(Fail(ErrorCode::kOverloaded));
  Start(kAB,
        "  r:\n    targets: [{provider: a}, {provider: b, tier: 2}]\n"
        "    circuit_breaker: {consecutive_failures: 2, min_requests: 1000, open_for: 5s}\n");
  for (int i = 0; i < 2; ++i) {
    auto r = gateway_->Chat(Request("r"));
    ASSERT_OK(r);
    EXPECT_EQ(r->provider, "b");
  }
  EXPECT_EQ(Circuit("r", "a"), 2);
  // Open: a is passed over, b answers at the first attempt.
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(r->attempts, 1);
  EXPECT_EQ(script("a").calls(), 2);
  EXPECT_EQ(Refusals("r", "a", "circuit_open"), 1);
  clock_.Advance(milliseconds(4999));
  ASSERT_EQ(gateway_->Chat(Request("r"))->provider, "b");
  EXPECT_EQ(script("a").calls(), 2);
  // After open_for: one trial. It fails, so the circuit opens again for open_for.
  clock_.Advance(milliseconds(1));
  ASSERT_EQ(gateway_->Chat(Request("r"))->provider, "b");
  EXPECT_EQ(script("a").calls(), 3);
  EXPECT_EQ(Circuit("r", "a"), 2);
  ASSERT_EQ(gateway_->Chat(Request("r"))->provider, "b");
  EXPECT_EQ(script("a").calls(), 3);
  // A recovered target closes its circuit with the next trial.
  script("a").Always(Answer());
  clock_.Advance(milliseconds(5000));
  r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "a");
  EXPECT_EQ(Circuit("r", "a"), 0);
  ASSERT_EQ(gateway_->Chat(Request("r"))->provider, "a");
}

TEST_F(GatewayLoopTest, EveryCircuitOpenIsOverloadedWithRetryAfterUntilTheTrial) {
  script("a").Always(Fail(ErrorCode::kNetwork));
  Start("  a: {type: mock}\n",
        "  r:\n    targets: [{provider: a}]\n    retry: {max_attempts: 1}\n"
        "    circuit_breaker: {consecutive_failures: 2, min_requests: 1000, open_for: 5s}\n");
  for (int i = 0; i < 2; ++i)
    EXPECT_EQ(gateway_->Chat(Request("r")).error().code, ErrorCode::kNetwork);
  clock_.Advance(milliseconds(2000));
  auto r = gateway_->Chat(Request("r"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kOverloaded);
  EXPECT_THAT(r.error().message, HasSubstr("circuit of every target is open"));
  EXPECT_EQ(r.error().retry_after, Duration(3000));
  EXPECT_EQ(script("a").calls(), 2);
  EXPECT_EQ(Verdicts("r", "no_target"), 1);
}

TEST_F(GatewayLoopTest, RateLimitsAndUnusableAnswersDoNotOpenTheBreaker) {
  script("a").Always(Fail(ErrorCode::kRateLimited));
  script("b").Always(Fail(ErrorCode::kInvalidOutput));
  Start(kAB,
        "  ra: {targets: [{provider: a}], retry: {max_attempts: 1}, circuit_breaker: "
        "{consecutive_failures: 1}}\n"
        "  rb: {targets: [{provider: b}], retry: {max_attempts: 1}, circuit_breaker: "
        "{consecutive_failures: 1}}\n");
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(gateway_->Chat(Request("ra")).error().code, ErrorCode::kRateLimited);
    EXPECT_EQ(gateway_->Chat(Request("rb")).error().code, ErrorCode::kInvalidOutput);
  }
  EXPECT_EQ(script("a").calls(), 3);
  EXPECT_EQ(script("b").calls(), 3);
  EXPECT_EQ(Circuit("ra", "a"), 0);
  EXPECT_EQ(Circuit("rb", "b"), 0);
}

// ---- Context windows ---------------------------------------------------------------------

TEST_F(GatewayLoopTest, AContextLengthErrorMovesToALargerWindow) {
  script("small").Always(Fail(ErrorCode::kContextLength));
  script("mid").Always(Fail(ErrorCode::kContextLength));
  Start(
      "  small: {type: mock, context_window: 1000}\n  mid: {type: mock, context_window: 2000}\n"
      "  large: {type: mock, context_window: 100000}\n  same: {type: mock, context_window: 1000}\n",
      "  r: {targets: [{provider: small}, {provider: same}, {provider: mid}, {provider: large}]}\n"
      "  only: {targets: [{provider: small}, {provider: same}]}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "large");
  // `same` has no larger window than small's: never tried.
  EXPECT_THAT(TakeLog(), ElementsAre("small", "mid", "large"));
  EXPECT_EQ(Refusals("r", "same", "context_window"), 2);
  EXPECT_EQ(Verdicts("r", "failover"), 2);
  // No larger window: the context_length error.
  auto none = gateway_->Chat(Request("only"));
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code, ErrorCode::kContextLength);
  EXPECT_THAT(TakeLog(), ElementsAre("small"));
  EXPECT_EQ(Verdicts("only", "no_target"), 1);
}

TEST_F(GatewayLoopTest, APromptLargerThanEveryWindowCallsNothingAndMakesNoDecision) {
  Start("  a: {type: mock, context_window: 10}\n", "  r: {targets: [{provider: a}]}\n");
  auto r = gateway_->Chat(Request("r", std::string(400, 'x')));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kContextLength);
  EXPECT_EQ(script("a").calls(), 0);
  EXPECT_FALSE(Has("keel_gateway_decisions_total{route=\"r\",verdict=\"no_target\"}"));
}

// ---- Strategies -------------------------------------------------------------------------

using RouteStrategyTest = GatewayLoopTest;

TEST_F(RouteStrategyTest, PriorityTriesTiersInOrderThenAsListed) {
  script("b").Always(Fail(ErrorCode::kOverloaded));
  script("c").Always(Fail(ErrorCode::kOverloaded));
  Start(kAB + "  c: {type: mock}\n",
        "  r: {strategy: priority, targets: [{provider: a, tier: 2}, {provider: b}, {provider: "
        "c}], retry_budget: {ratio: 10}}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "a");
  EXPECT_THAT(TakeLog(), ElementsAre("b", "c", "a"));
  // While tier 1 answers, tier 2 gets nothing.
  script("b").Always(Answer());
  for (int i = 0; i < 5; ++i) ASSERT_EQ(gateway_->Chat(Request("r"))->provider, "b");
}

TEST_F(RouteStrategyTest, RoundRobinRotatesTheFirstTarget) {
  Start(kAB + "  c: {type: mock}\n",
        "  r: {strategy: round_robin, targets: [{provider: a}, {provider: b}, {provider: c}]}\n");
  for (int i = 0; i < 6; ++i) ASSERT_OK(gateway_->Chat(Request("r")));
  EXPECT_THAT(TakeLog(), ElementsAre("a", "b", "c", "a", "b", "c"));
}

TEST_F(RouteStrategyTest, WeightedFollowsTheWeightsOfASeededRandom) {
  const std::string providers = kAB + "  z: {type: mock}\n";
  const std::string routes =
      "  r: {strategy: weighted, targets: [{provider: a, weight: 80}, {provider: b, weight: 20}, "
      "{provider: z, weight: 0}]}\n";
  Start(providers, routes);
  constexpr int kCalls = 1000;
  for (int i = 0; i < kCalls; ++i) ASSERT_OK(gateway_->Chat(Request("r")));
  const auto log = TakeLog();
  const double share = static_cast<double>(std::count(log.begin(), log.end(), "a")) / kCalls;
  EXPECT_GT(share, 0.75);
  EXPECT_LT(share, 0.85);
  EXPECT_EQ(std::count(log.begin(), log.end(), "z"), 0) << "a weight of 0 is never drawn first";
  // The same seed draws the same order.
  Start(providers, routes);
  for (int i = 0; i < kCalls; ++i) ASSERT_OK(gateway_->Chat(Request("r")));
  EXPECT_EQ(TakeLog(), log);
}

TEST_F(RouteStrategyTest, LatencyPrefersTheFasterTargetAndRemeasuresAStaleOne) {
  script("slow").Always(Answer(Duration(50)));
  script("fast").Always(Answer(Duration(5)));
  Start("  slow: {type: mock}\n  fast: {type: mock}\n",
        "  r: {strategy: latency, targets: [{provider: slow}, {provider: fast}]}\n");
  // Unmeasured targets first, in route order; then the faster.
  for (int i = 0; i < 6; ++i) ASSERT_OK(gateway_->Chat(Request("r")));
  EXPECT_THAT(TakeLog(), ElementsAre("slow", "fast", "fast", "fast", "fast", "fast"));
  EXPECT_NEAR(Metric("keel_gateway_latency_average_seconds{provider=\"slow\",route=\"r\"}"), 0.050,
              1e-9);
  EXPECT_NEAR(Metric("keel_gateway_latency_average_seconds{provider=\"fast\",route=\"r\"}"), 0.005,
              1e-9);
  // A sample 10s old is measured again (the oldest first), then the faster wins again.
  clock_.Advance(milliseconds(10000));
  for (int i = 0; i < 4; ++i) ASSERT_OK(gateway_->Chat(Request("r")));
  EXPECT_THAT(TakeLog(), ElementsAre("slow", "fast", "fast", "fast"));
  // A slow target that became fast takes the traffic once re-measured.
  script("slow").Always(Answer(Duration(1)));
  clock_.Advance(milliseconds(10000));
  for (int i = 0; i < 4; ++i) ASSERT_OK(gateway_->Chat(Request("r")));
  EXPECT_THAT(TakeLog(), ElementsAre("slow", "fast", "slow", "slow"));
}

TEST_F(RouteStrategyTest, LeastBusyPrefersFewerCallsInFlightThenRateHeadroom) {
  Step held = Answer();
  held.hold = true;
  script("a").Then(held);
  script("a").Then(Answer());
  Start(
      "  a: {type: mock, limits: {max_concurrency: 4, rpm: 100}}\n  b: {type: mock, limits: "
      "{max_concurrency: 4, rpm: 100}}\n",
      "  busy: {strategy: least_busy, targets: [{provider: a}, {provider: b}]}\n  only_a: "
      "{targets: [{provider: a}]}\n");
  std::optional<Result<ChatResult>> slow;
  gateway_->ChatAsync(Request("only_a"), ctx_.get_executor(),
                      [&](Result<ChatResult> r) { slow = std::move(r); });
  ctx_.run();
  ASSERT_FALSE(slow.has_value());  // a holds one call
  // b has no call in flight: it goes first, though listed second.
  ASSERT_EQ(gateway_->Chat(Request("busy"))->provider, "b");
  for (auto& answer : script("a").TakeHeld()) boost::asio::post(ctx_, answer);
  ctx_.restart();
  ctx_.run();
  ASSERT_TRUE(slow.has_value());
  ASSERT_OK(*slow);
  // Nothing in flight: the most rpm headroom first, ties as listed. a has used 1 of its
  // 100 requests a minute, b 1: a tie.
  ASSERT_EQ(gateway_->Chat(Request("busy"))->provider, "a");
  ASSERT_OK(gateway_->Chat(Request("only_a")));  // a: 3 used, b: 1
  ASSERT_EQ(gateway_->Chat(Request("busy"))->provider, "b");
  ASSERT_EQ(gateway_->Chat(Request("busy"))->provider, "b");
  ASSERT_EQ(gateway_->Chat(Request("busy"))->provider, "a");  // 3 each: a tie again
}

// ---- Admission limits -------------------------------------------------------------------

using AdmissionTest = GatewayLoopTest;

TEST_F(AdmissionTest, AFullConcurrencyLimitIsOverloadedWithRetryAfter) {
  Step held = Answer();
  held.hold = true;
  script("a").Then(held);
  script("a").Then(Answer());
  Start("  a: {type: mock, limits: {max_concurrency: 1}}\n", "  r: {targets: [{provider: a}]}\n");
  std::optional<Result<ChatResult>> first;
  gateway_->ChatAsync(Request("r"), ctx_.get_executor(),
                      [&](Result<ChatResult> r) { first = std::move(r); });
  ctx_.run();
  auto refused = gateway_->Chat(Request("r"));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, ErrorCode::kOverloaded);
  EXPECT_THAT(refused.error().message, HasSubstr("max_concurrency"));
  EXPECT_EQ(refused.error().retry_after, Duration(1000));
  EXPECT_EQ(script("a").calls(), 1);
  EXPECT_EQ(Refusals("r", "a", "concurrency"), 1);
  EXPECT_EQ(Verdicts("r", "no_target"), 1);
  for (auto& answer : script("a").TakeHeld()) boost::asio::post(ctx_, answer);
  ctx_.restart();
  ctx_.run();
  ASSERT_TRUE(first.has_value());
  ASSERT_OK(*first);
  EXPECT_OK(gateway_->Chat(Request("r")));  // the slot is free again
}

TEST_F(AdmissionTest, EveryTargetRateLimitedIsRateLimitedWithTheWait) {
  Start("  a: {type: mock, limits: {rpm: 2}}\n", "  r: {targets: [{provider: a}]}\n");
  EXPECT_OK(gateway_->Chat(Request("r")));
  EXPECT_OK(gateway_->Chat(Request("r")));
  auto r = gateway_->Chat(Request("r"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kRateLimited);
  EXPECT_EQ(r.error().retry_after, Duration(30000)) << "one request per 30s refills";
  EXPECT_EQ(script("a").calls(), 2);
  EXPECT_EQ(Refusals("r", "a", "rate_limited"), 1);
  EXPECT_EQ(Verdicts("r", "no_target"), 1);
  clock_.Advance(milliseconds(30000));
  EXPECT_OK(gateway_->Chat(Request("r")));
}

TEST_F(AdmissionTest, ARateLimitIsReportedOverOtherRefusals) {
  script("b").Always(Fail(ErrorCode::kServerError));
  Start("  a: {type: mock, limits: {rpm: 1}}\n  b: {type: mock}\n",
        "  r:\n    targets: [{provider: b}, {provider: a}]\n    retry: {max_attempts: 1}\n"
        "    circuit_breaker: {consecutive_failures: 1, open_for: 1h}\n");
  EXPECT_EQ(gateway_->Chat(Request("r")).error().code,
            ErrorCode::kServerError);                      // b's circuit opens
  ASSERT_EQ(gateway_->Chat(Request("r"))->provider, "a");  // a's one request
  auto r = gateway_->Chat(Request("r"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kRateLimited)
      << "b's open circuit says less: a will take calls again";
  EXPECT_EQ(r.error().retry_after, Duration(60000));
  EXPECT_EQ(Refusals("r", "b", "circuit_open"), 2);
}

// ---- Streams, embeddings, cancellation ---------------------------------------------------

TEST_F(GatewayLoopTest, AStreamFailsOverInvisiblyBeforeItsFirstChunk) {
  script("a").Always(Fail(ErrorCode::kOverloaded));
  Start(kAB, "  r: {targets: [{provider: a}, {provider: b}]}\n");
  std::vector<json::object> got;
  auto req = Request("r");
  auto r = gateway_->ChatStream(req, [&](const json::object& c) {
    got.push_back(c);
    return true;
  });
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(r->attempts, 2);
  ASSERT_EQ(got.size(), 2u) << "the usage chunk only when asked for";
  req.body["stream_options"] = json::object{{"include_usage", true}};
  got.clear();
  ASSERT_OK(gateway_->ChatStream(req, [&](const json::object& c) {
    got.push_back(c);
    return true;
  }));
  EXPECT_EQ(got.size(), 3u);
  EXPECT_EQ(Verdicts("r", "failover"), 2);
}

TEST_F(GatewayLoopTest, AStreamThatBreaksAfterItsFirstChunkEndsWithAnError) {
  Step broken = Fail(ErrorCode::kNetwork);
  broken.chunks = 1;
  script("a").Always(broken);
  Start(kAB, "  r: {targets: [{provider: a}, {provider: b}]}\n");
  int chunks = 0;
  auto r = gateway_->ChatStream(Request("r"), [&](const json::object&) { return ++chunks > 0; });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork);
  EXPECT_THAT(r.error().message, HasSubstr("after its first token"));
  EXPECT_EQ(chunks, 1);
  EXPECT_EQ(script("b").calls(), 0);
  EXPECT_EQ(Verdicts("r", "stream_broken"), 1);
}

// A StreamSink that takes everything.
class CollectingSink final : public Gateway::StreamSink {
 public:
  bool OnChunk(const json::object& chunk) override {
    chunks.push_back(chunk);
    return true;
  }
  bool Full() const override { return false; }
  void WhenReady(std::function<void()> ready) override { ready(); }
  std::vector<json::object> chunks;
};

TEST_F(GatewayLoopTest, AsyncStreamsAndEmbeddingsGoThroughTheSameLoop) {
  script("a").Always(Fail(ErrorCode::kOverloaded));
  Start(kAB, "  r: {targets: [{provider: a}, {provider: b}]}\n");
  auto sink = std::make_shared<CollectingSink>();
  std::optional<Result<ChatResult>> streamed, embedded;
  gateway_->ChatStreamAsync(Request("r"), ctx_.get_executor(), sink,
                            [&](Result<ChatResult> r) { streamed = std::move(r); });
  ChatRequest embed;
  embed.route = "r";
  embed.body = json::object{{"input", "alpha"}};
  gateway_->EmbeddingsAsync(embed, ctx_.get_executor(),
                            [&](Result<ChatResult> r) { embedded = std::move(r); });
  RunUntil([&] { return streamed.has_value() && embedded.has_value(); });
  ASSERT_TRUE(streamed.has_value());
  ASSERT_OK(*streamed);
  EXPECT_EQ((*streamed)->provider, "b");
  EXPECT_EQ(sink->chunks.size(), 2u);
  ASSERT_TRUE(embedded.has_value());
  ASSERT_OK(*embedded);
  EXPECT_EQ((*embedded)->provider, "b");
  EXPECT_EQ((*embedded)->failovers, 1);
}

TEST_F(GatewayLoopTest, ACancelledCallMakesNoAttempt) {
  Start("  a: {type: mock}\n", "  r: {targets: [{provider: a}]}\n");
  std::atomic<bool> cancelled{true};
  auto req = Request("r");
  req.cancelled = &cancelled;
  auto r = gateway_->Chat(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCancelled);
  EXPECT_EQ(script("a").calls(), 0);
  EXPECT_EQ(Verdicts("r", "cancelled"), 1);
}

TEST_F(GatewayLoopTest, CancellingDuringABackoffEndsTheCallAtOnceAndFreesTheSlot) {
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(10000)));
  Start("  a: {type: mock, limits: {max_concurrency: 1}}\n", "  r: {targets: [{provider: a}]}\n");
  auto req = Request("r");
  req.cancel = std::make_shared<CancelSignal>();
  auto cancel = req.cancel;
  std::optional<Result<ChatResult>> out;
  gateway_->ChatAsync(std::move(req), ctx_.get_executor(),
                      [&](Result<ChatResult> r) { out = std::move(r); });
  ctx_.run();
  ASSERT_FALSE(out.has_value());
  ASSERT_EQ(timer_.pending(), 1u);
  cancel->Cancel();
  ctx_.restart();
  ctx_.run();
  ASSERT_TRUE(out.has_value()) << "without waiting for the backoff";
  ASSERT_FALSE(out->ok());
  EXPECT_EQ(out->error().code, ErrorCode::kCancelled);
  EXPECT_EQ(Elapsed(), Duration(0));
  EXPECT_EQ(script("a").calls(), 1);
  EXPECT_EQ(Verdicts("r", "cancelled"), 1);
  script("a").Always(Answer());
  EXPECT_OK(gateway_->Chat(Request("r")));  // the admission of the retry was given back
  timer_.Advance(milliseconds(10000));      // the timer's late callback does nothing more
  ctx_.restart();
  ctx_.run();
  EXPECT_EQ(script("a").calls(), 2);
}

// ---- Same target or another (docs/gateway.md, "Same target or another") ------------------

TEST_F(GatewayLoopTest, AShortRetryAfterRetriesTheSameTargetInsteadOfFailingOver) {
  const std::string routes =
      "  r: {targets: [{provider: a}, {provider: b}], retry: {initial_backoff: 100ms, jitter: 0}}\n"
      "  off: {targets: [{provider: a}, {provider: b}], retry: {same_target_retry_after_max: "
      "0s}}\n";
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(2000)));
  script("a").Then(Answer());
  Start(kAB, routes);
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "a");
  EXPECT_EQ(r->attempts, 2);
  EXPECT_EQ(r->failovers, 0);
  EXPECT_EQ(Elapsed(), milliseconds(2000)) << "after its Retry-After";
  EXPECT_EQ(script("b").calls(), 0);
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 1);
  EXPECT_EQ(Verdicts("r", "failover"), 0);

  // Longer than retry.same_target_retry_after_max (default 5s): elsewhere at once.
  scripts_.clear();
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(6000)));
  Start(kAB, routes);
  r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(Elapsed(), Duration(0));
  EXPECT_EQ(Verdicts("r", "failover"), 1);

  // Short, but past the deadline: elsewhere at once.
  scripts_.clear();
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(2000)));
  Start(kAB, routes);
  auto req = Request("r");
  req.timeout = Duration(1500);
  r = gateway_->Chat(req);
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(Elapsed(), Duration(0));

  // same_target_retry_after_max: 0 turns the rule off.
  scripts_.clear();
  script("a").Then(Fail(ErrorCode::kRateLimited, Duration(2000)));
  Start(kAB, routes);
  r = gateway_->Chat(Request("off"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(Elapsed(), Duration(0));
}

TEST_F(GatewayLoopTest, OneServerErrorRetriesTheSameTargetOnceThenFailsOver) {
  const std::string routes =
      "  r:\n    targets: [{provider: a}, {provider: b}]\n"
      "    retry: {max_attempts: 4, initial_backoff: 100ms, jitter: 0}\n"
      "    retry_budget: {ratio: 10}\n    circuit_breaker: {consecutive_failures: 0}\n"
      "  twice:\n    targets: [{provider: a}, {provider: b}]\n"
      "    retry: {max_attempts: 4, initial_backoff: 100ms, jitter: 0, same_target_on_5xx: 2}\n"
      "    retry_budget: {ratio: 10}\n    circuit_breaker: {consecutive_failures: 0}\n"
      "  never:\n    targets: [{provider: a}, {provider: b}]\n"
      "    retry: {same_target_on_5xx: 0}\n";
  script("a").Always(Fail(ErrorCode::kServerError));
  Start(kAB, routes);
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_THAT(TakeLog(), ElementsAre("a", "a", "b"));
  EXPECT_EQ(Elapsed(), milliseconds(100)) << "the same target after a backoff, then b at once";
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 1);
  EXPECT_EQ(Verdicts("r", "failover"), 1);

  ASSERT_OK(gateway_->Chat(Request("twice")));
  EXPECT_THAT(TakeLog(), ElementsAre("a", "a", "a", "b"));
  ASSERT_OK(gateway_->Chat(Request("never")));
  EXPECT_THAT(TakeLog(), ElementsAre("a", "b"));

  // A blip: the retry answers, and b is never asked.
  script("a").Always(Fail(ErrorCode::kServerError));
  script("a").Then(Answer());
  r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "a");
  EXPECT_THAT(TakeLog(), ElementsAre("a", "a"));
}

TEST_F(GatewayLoopTest, ATargetThatTimedOutIsNotCalledAgainWithinTheCall) {
  script("a").Always(Fail(ErrorCode::kTimeout));
  script("b").Always(Fail(ErrorCode::kOverloaded));
  Start(kAB,
        "  r:\n    targets: [{provider: a}, {provider: b}]\n"
        "    retry: {max_attempts: 4, initial_backoff: 1ms, jitter: 0}\n"
        "    retry_budget: {ratio: 10}\n    circuit_breaker: {consecutive_failures: 0}\n"
        "  alone: {targets: [{provider: a}], retry: {max_attempts: 3}}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kOverloaded);
  // Without the rule, the tried targets come back in order: a, b, a, b.
  EXPECT_THAT(TakeLog(), ElementsAre("a", "b", "b", "b"));
  // Alone: the timeout is the answer, with no second wait on a silent target.
  r = gateway_->Chat(Request("alone"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout);
  EXPECT_THAT(TakeLog(), ElementsAre("a"));
  EXPECT_EQ(Verdicts("alone", "no_target"), 1);
}

// ---- first_token ---------------------------------------------------------------------------

bool RoleOnly(const json::object& chunk) { return !detail::CarriesToken(chunk); }

TEST_F(GatewayLoopTest, AStreamWithNoTokenWithinFirstTokenFailsOverBeforeAnythingIsRelayed) {
  const std::string providers =
      "  a: {type: mock, timeout: {first_token: 2s}}\n  b: {type: mock}\n  c: {type: mock}\n";
  const std::string routes =
      "  r: {targets: [{provider: a}, {provider: b}]}\n"
      "  plain: {targets: [{provider: c}, {provider: b}]}\n";
  script("a").Always(Stall(Duration(10000)));
  script("c").Always(Stall(Duration(10000)));
  Start(providers, routes);
  std::vector<json::object> got;
  auto collect = [&](const json::object& chunk) {
    got.push_back(chunk);
    return true;
  };
  auto r = gateway_->ChatStream(Request("r"), collect);
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(r->attempts, 2);
  EXPECT_EQ(r->failovers, 1);
  EXPECT_EQ(Elapsed(), milliseconds(2000)) << "a was given up at its first_token timeout";
  ASSERT_EQ(got.size(), 2u) << "b's chunks only: a's role chunk was held back, not relayed";
  EXPECT_FALSE(RoleOnly(got[0]));
  EXPECT_EQ(Verdicts("r", "failover"), 1);
  EXPECT_EQ(Metric("keel_llm_requests_total{outcome=\"timeout\",provider=\"a\",route=\"r\"}"), 1);

  // Without first_token, the same silence is waited out and answered.
  got.clear();
  t0_ = clock_.Now();
  r = gateway_->ChatStream(Request("plain"), collect);
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "c");
  EXPECT_EQ(Elapsed(), milliseconds(10000));
  ASSERT_EQ(got.size(), 3u);
  EXPECT_TRUE(RoleOnly(got[0]));

  // The asynchronous driver, through the same loop.
  t0_ = clock_.Now();
  auto sink = std::make_shared<CollectingSink>();
  std::optional<Result<ChatResult>> streamed;
  gateway_->ChatStreamAsync(Request("r"), ctx_.get_executor(), sink,
                            [&](Result<ChatResult> res) { streamed = std::move(res); });
  RunUntil([&] { return streamed.has_value(); });
  ASSERT_TRUE(streamed.has_value());
  ASSERT_OK(*streamed);
  EXPECT_EQ((*streamed)->provider, "b");
  EXPECT_EQ(Elapsed(), milliseconds(2000));
  EXPECT_EQ(sink->chunks.size(), 2u);
}

TEST_F(GatewayLoopTest, ATokenWithinFirstTokenIsRelayedWithTheChunksHeldBeforeIt) {
  script("a").Then(Stall(Duration(1000)));
  script("a").Then(Stall(Duration(10000)));
  Start("  a: {type: mock, timeout: {first_token: 2s}}\n  b: {type: mock}\n",
        "  r: {targets: [{provider: a}, {provider: b}]}\n"
        "  alone: {targets: [{provider: a}], retry: {max_attempts: 3}}\n");
  std::vector<json::object> got;
  auto r = gateway_->ChatStream(Request("r"), [&](const json::object& chunk) {
    got.push_back(chunk);
    return true;
  });
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "a");
  EXPECT_EQ(r->time_to_first_token, milliseconds(1000));
  ASSERT_EQ(got.size(), 3u);
  EXPECT_TRUE(RoleOnly(got[0])) << "held back, then relayed before the first token";
  timer_.Advance(milliseconds(5000));  // the first_token timer, late, does nothing
  EXPECT_EQ(script("a").calls(), 1);

  // A silent target alone: a timeout naming first_token, and no second try on it.
  t0_ = clock_.Now();
  r = gateway_->ChatStream(Request("alone"), [](const json::object&) { return true; });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout);
  EXPECT_THAT(r.error().message, HasSubstr("first_token"));
  EXPECT_EQ(script("a").calls(), 2);
  EXPECT_EQ(Elapsed(), milliseconds(2000));
}

// ---- Context windows that are guesses ------------------------------------------------------

TEST_F(GatewayLoopTest, AContextLengthErrorFromAGuessedWindowMovesToTheNextTarget) {
  script("a").Always(Fail(ErrorCode::kContextLength));
  // Neither window is configured: both are the 128000 default, a guess.
  Start(kAB,
        "  r: {targets: [{provider: a}, {provider: b}]}\n"
        "  alone: {targets: [{provider: a}]}\n");
  auto r = gateway_->Chat(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_THAT(TakeLog(), ElementsAre("a", "b"));
  EXPECT_EQ(Verdicts("r", "failover"), 1);
  auto none = gateway_->Chat(Request("alone"));
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code, ErrorCode::kContextLength);
  EXPECT_THAT(TakeLog(), ElementsAre("a")) << "the same target is not asked again";
}

// ---- What the breaker counts -----------------------------------------------------------------

TEST_F(GatewayLoopTest, RequestErrorsNeverOpenTheBreakerButServerErrorsDo) {
  script("a").Always(Fail(ErrorCode::kInvalidRequest));
  script("b").Always(Fail(ErrorCode::kServerError));
  // Default breaker: 5 consecutive failures, or half of at least 20 in 30s.
  Start(kAB,
        "  ra: {targets: [{provider: a}], retry: {max_attempts: 1}}\n"
        "  rb: {targets: [{provider: b}], retry: {max_attempts: 1}}\n");
  for (int i = 0; i < 20; ++i)
    EXPECT_EQ(gateway_->Chat(Request("ra")).error().code, ErrorCode::kInvalidRequest);
  for (ErrorCode code : {ErrorCode::kContextLength, ErrorCode::kContentPolicy}) {
    script("a").Always(Fail(code));
    for (int i = 0; i < 10; ++i) EXPECT_EQ(gateway_->Chat(Request("ra")).error().code, code);
  }
  EXPECT_EQ(script("a").calls(), 40) << "every one was called: the circuit stayed closed";
  EXPECT_EQ(Circuit("ra", "a"), 0);
  EXPECT_EQ(Refusals("ra", "a", "circuit_open"), 0);

  for (int i = 0; i < 5; ++i)
    EXPECT_EQ(gateway_->Chat(Request("rb")).error().code, ErrorCode::kServerError);
  EXPECT_EQ(Circuit("rb", "b"), 2) << "five server errors in a row open it";
  EXPECT_EQ(gateway_->Chat(Request("rb")).error().code, ErrorCode::kOverloaded);
  EXPECT_EQ(script("b").calls(), 5);
}

// ---- The verdict counter --------------------------------------------------------------

TEST_F(GatewayLoopTest, EachDecisionIsCountedOnceByVerdict) {
  script("a").Always(Fail(ErrorCode::kOverloaded));
  script("b").Then(Fail(ErrorCode::kRateLimited));
  script("b").Then(Answer());
  Start(kAB,
        "  r:\n    targets: [{provider: a}, {provider: b}]\n    retry: {max_attempts: 3, "
        "initial_backoff: 10ms, jitter: 0}\n"
        "    retry_budget: {ratio: 10}\n    circuit_breaker: {consecutive_failures: 1, open_for: "
        "1h}\n");
  // a fails (and its circuit opens), b is rate-limited, b again after a backoff answers:
  // four decisions.
  auto r = CallAsync(Request("r"));
  ASSERT_OK(r);
  EXPECT_EQ(r->provider, "b");
  EXPECT_EQ(r->attempts, 3);
  EXPECT_THAT(TakeLog(), ElementsAre("a", "b", "b"));
  EXPECT_EQ(Refusals("r", "a", "circuit_open"), 1);
  EXPECT_EQ(Verdicts("r", "first_attempt"), 1);
  EXPECT_EQ(Verdicts("r", "failover"), 1);
  EXPECT_EQ(Verdicts("r", "retry_same_target"), 1);
  EXPECT_EQ(Verdicts("r", "answered"), 1);
  EXPECT_EQ(Metric("keel_gateway_retries_total{route=\"r\"}"), 2);
  EXPECT_EQ(Elapsed(), milliseconds(20)) << "the second retry's backoff: 10ms * 2";
  // Verdicts that did not happen have no series; the family is documented.
  const std::string text = obs::RenderPrometheus(*registry_);
  EXPECT_EQ(text.find("verdict=\"no_budget\""), std::string::npos);
  EXPECT_NE(
      text.find("# HELP keel_gateway_decisions_total Decisions of the gateway's attempt loop"),
      std::string::npos);
  // Unknown routes and cache hits make no decision.
  EXPECT_EQ(gateway_->Chat(Request("nope")).error().code, ErrorCode::kNotFound);
  EXPECT_EQ(text.find("route=\"nope\""), std::string::npos);
}

// ---- Active health checks, on the route table ----------------------------------------------

TEST(HealthProberTest, ProbesAHalfOpenCircuitWhenDueAndClosesIt) {
  ManualClock clock;
  ManualTimer timer(clock);
  prometheus::Registry registry;
  auto config = ParseConfig(
      "providers:\n  a: {type: mock, health_check: {interval: 1s}}\nroutes:\n"
      "  r: {targets: [{provider: a}], circuit_breaker: {consecutive_failures: 1, open_for: 2s}}\n",
      [](const std::string&) { return std::nullopt; });
  ASSERT_OK(config);
  detail::GatewayMetrics metrics(registry);
  auto script = std::make_shared<Script>();
  std::vector<std::string> log;
  std::mutex log_mu;
  auto table = detail::BuildRouteTable(
      *config, metrics,
      [&](const ProviderConfig& p) {
        return std::make_unique<FakeProvider>(p.name, script, clock, timer, false, log, log_mu);
      },
      nullptr, clock.Now());
  ASSERT_OK(table);
  detail::HealthProber prober(**table, clock);
  ASSERT_TRUE(prober.needed());
  detail::TargetState& t = *(*table)->Find("r")->targets[0];
  detail::RecordHealth(t, /*healthy=*/false, clock.Now());  // open
  EXPECT_EQ(prober.ProbeDue(), 0) << "open, not yet half-open";
  clock.Advance(milliseconds(2000));
  EXPECT_EQ(prober.ProbeDue(), 1);
  EXPECT_EQ(script->calls(), 1);
  EXPECT_EQ(script->last_body().at("messages").as_array()[0].at("content").as_string(), "ping");
  {
    std::lock_guard lock(t.mu);
    EXPECT_EQ(t.breaker.state(clock.Now()), BreakerState::kClosed);
  }
  EXPECT_NE(obs::RenderPrometheus(registry).find(
                "keel_gateway_health_probes_total{outcome=\"ok\",provider=\"a\"} 1"),
            std::string::npos);
  // Closed: nothing to probe, whenever it is due.
  clock.Advance(milliseconds(1000));
  EXPECT_EQ(prober.ProbeDue(), 0);
  EXPECT_EQ(script->calls(), 1);
}

}  // namespace
}  // namespace keel::gateway
