#include "keel/gateway/mock_llm.h"

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "keel/core/json.h"
#include "keel/testing/assert.h"

namespace keel::gateway {
namespace {

using Kind = MockDecision::Kind;
using std::chrono::milliseconds;
using TimePoint = std::chrono::steady_clock::time_point;

// A fixed point well past the steady clock's epoch; tests move from it explicitly.
const TimePoint kT0 = TimePoint() + std::chrono::hours(1000);

// A chat-completions body whose last user message is `prompt`.
std::string Chat(std::string_view prompt, std::string_view model = "mock-1") {
  json::array messages{json::object{{"role", "system"}, {"content", "be brief"}},
                       json::object{{"role", "user"}, {"content", prompt}}};
  json::object body{{"model", model}, {"messages", std::move(messages)}};
  return json::serialize(body);
}

json::value Body(const MockDecision& d) {
  auto v = ParseJson(d.body);
  EXPECT_TRUE(v.ok()) << d.body;
  return v.ok() ? *v : json::value();
}

// The value at `path`, or the string "<missing>".
json::value Get(const json::value& v, std::string_view path) {
  const json::value* found = FindPath(v, path);
  return found != nullptr ? *found : json::value("<missing>");
}

std::string Content(const MockDecision& d) {
  const auto body = Body(d);
  const json::value* c = FindPath(body, "choices.0.message.content");
  return c != nullptr && c->is_string() ? std::string(c->get_string()) : "<no content>";
}

TEST(MockLlmTest, AnswersDeterministically) {
  MockLlm a(MockOptions{});
  MockLlm b(MockOptions{});
  const auto first = a.HandleChat(Chat("What is keel?"), kT0);
  const auto again = a.HandleChat(Chat("What is keel?"), kT0);
  const auto other_instance = b.HandleChat(Chat("What is keel?"), kT0);
  const auto other_prompt = a.HandleChat(Chat("What is a mock?"), kT0);

  EXPECT_EQ(first.kind, Kind::kAnswer);
  EXPECT_EQ(first.status, 200);
  EXPECT_EQ(first.delay, milliseconds(0));
  EXPECT_EQ(first.retry_after_s, 0);
  EXPECT_EQ(Content(first), Content(again));
  EXPECT_EQ(Content(first), Content(other_instance));
  EXPECT_NE(Content(first), Content(other_prompt));
  EXPECT_NE(Content(first).find("What is keel?"), std::string::npos) << Content(first);
}

TEST(MockLlmTest, AnswerHasTheChatCompletionShapeAndUsage) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("Count my tokens please", "gpt-test"), kT0);
  ASSERT_EQ(d.kind, Kind::kAnswer);
  const auto body = Body(d);
  EXPECT_EQ(body.at("object"), json::value("chat.completion"));
  EXPECT_EQ(body.at("model"), json::value("gpt-test"));
  EXPECT_EQ(Get(body, "choices.0.message.role"), json::value("assistant"));
  EXPECT_EQ(Get(body, "choices.0.finish_reason"), json::value("stop"));
  const json::value* usage = FindPath(body, "usage");
  ASSERT_NE(usage, nullptr);
  const int64_t prompt = usage->at("prompt_tokens").as_int64();
  const int64_t completion = usage->at("completion_tokens").as_int64();
  // "be brief" (8) + "Count my tokens please" (22) = 30 chars: 8 tokens at 4 bytes each.
  EXPECT_EQ(prompt, 8);
  EXPECT_EQ(completion, EstimateTokens(Content(d)));
  EXPECT_GT(completion, 0);
  EXPECT_EQ(usage->at("total_tokens").as_int64(), prompt + completion);
}

TEST(MockLlmTest, EstimateTokensRoundsUp) {
  EXPECT_EQ(EstimateTokens(""), 0);
  EXPECT_EQ(EstimateTokens("a"), 1);
  EXPECT_EQ(EstimateTokens("abcd"), 1);
  EXPECT_EQ(EstimateTokens("abcde"), 2);
}

TEST(MockLlmTest, FailDirectiveFailsEveryCall) {
  MockLlm mock(MockOptions{});
  for (int i = 0; i < 3; ++i) {
    const auto d = mock.HandleChat(Chat("hello\n#mock fail=503"), kT0);
    ASSERT_EQ(d.kind, Kind::kError) << i;
    EXPECT_EQ(d.status, 503);
    EXPECT_EQ(d.retry_after_s, 0);
    const auto body = Body(d);
    EXPECT_EQ(Get(body, "error.type"), json::value("server_error"));
  }
}

TEST(MockLlmTest, FailTimesFailsOnlyTheFirstCalls) {
  MockLlm mock(MockOptions{});
  const std::string req = Chat("summarise\n#mock fail=503 times=2");
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 503);
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 503);
  const auto third = mock.HandleChat(req, kT0);
  EXPECT_EQ(third.kind, Kind::kAnswer);
  EXPECT_EQ(third.status, 200);
  EXPECT_EQ(mock.HandleChat(req, kT0).kind, Kind::kAnswer);
  // The count is per prompt: another prompt starts afresh.
  EXPECT_EQ(mock.HandleChat(Chat("other\n#mock fail=503 times=2"), kT0).status, 503);
}

TEST(MockLlmTest, RateLimitFailureCarriesRetryAfter) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("#mock fail=429 retry_after=3"), kT0);
  EXPECT_EQ(d.kind, Kind::kError);
  EXPECT_EQ(d.status, 429);
  EXPECT_EQ(d.retry_after_s, 3);
  EXPECT_EQ(Get(Body(d), "error.type"), json::value("rate_limit_error"));
  // Without retry_after, a 429 still says when to come back.
  EXPECT_EQ(mock.HandleChat(Chat("#mock fail=429"), kT0).retry_after_s, 1);
}

TEST(MockLlmTest, ContextLengthFailure) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("a long text\n#mock fail=context_length"), kT0);
  EXPECT_EQ(d.kind, Kind::kError);
  EXPECT_EQ(d.status, 400);
  const auto body = Body(d);
  EXPECT_EQ(Get(body, "error.code"), json::value("context_length_exceeded"));
  EXPECT_EQ(Get(body, "error.type"), json::value("invalid_request_error"));
}

TEST(MockLlmTest, UnknownFailStatusBecomes500) {
  MockLlm mock(MockOptions{});
  EXPECT_EQ(mock.HandleChat(Chat("#mock fail=banana"), kT0).status, 500);
  EXPECT_EQ(mock.HandleChat(Chat("#mock fail=200"), kT0).status, 500);
  EXPECT_EQ(mock.HandleChat(Chat("#mock fail=401"), kT0).status, 401);
}

TEST(MockLlmTest, SleepDelaysTheAnswer) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("slowly\n#mock sleep=1500"), kT0);
  EXPECT_EQ(d.kind, Kind::kAnswer);
  EXPECT_EQ(d.status, 200);
  EXPECT_EQ(d.delay, milliseconds(1500));
}

TEST(MockLlmTest, LatencyOptionDelaysEveryAnswer) {
  MockOptions options;
  options.latency = milliseconds(250);
  MockLlm mock(options);
  EXPECT_EQ(mock.HandleChat(Chat("hi"), kT0).delay, milliseconds(250));
  // A sleep directive replaces the configured latency.
  EXPECT_EQ(mock.HandleChat(Chat("#mock sleep=10"), kT0).delay, milliseconds(10));
}

TEST(MockLlmTest, HangLastsTheConfiguredTime) {
  MockOptions options;
  options.hang = milliseconds(4321);
  MockLlm mock(options);
  const auto d = mock.HandleChat(Chat("#mock hang"), kT0);
  EXPECT_EQ(d.kind, Kind::kHang);
  EXPECT_EQ(d.delay, milliseconds(4321));
  EXPECT_EQ(MockLlm(MockOptions{}).HandleChat(Chat("#mock hang"), kT0).delay, milliseconds(600000));
}

TEST(MockLlmTest, ResetDirective) {
  MockLlm mock(MockOptions{});
  EXPECT_EQ(mock.HandleChat(Chat("#mock reset"), kT0).kind, Kind::kReset);
}

TEST(MockLlmTest, MalformedBodyIsNotJson) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("#mock malformed"), kT0);
  EXPECT_EQ(d.kind, Kind::kMalformed);
  EXPECT_EQ(d.status, 200);  // a success status with a body that does not parse
  EXPECT_FALSE(d.body.empty());
  EXPECT_FALSE(ParseJson(d.body).ok()) << d.body;
}

TEST(MockLlmTest, ReplyDirectiveSetsTheContent) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("question\n#mock reply=hello world"), kT0);
  EXPECT_EQ(d.kind, Kind::kAnswer);
  EXPECT_EQ(Content(d), "hello world");
  // reply= takes the rest of the line, after other directives.
  const auto slow = mock.HandleChat(Chat("#mock sleep=5 reply={\"ok\": true}"), kT0);
  EXPECT_EQ(Content(slow), "{\"ok\": true}");
  EXPECT_EQ(slow.delay, milliseconds(5));
}

TEST(MockLlmTest, DirectivesTakeEffectOnlyAsLinesOfTheLastUserMessage) {
  MockLlm mock(MockOptions{});
  // Not at the start of a line: plain text.
  EXPECT_EQ(mock.HandleChat(Chat("please #mock fail=503"), kT0).kind, Kind::kAnswer);
  // Leading blanks are allowed.
  EXPECT_EQ(mock.HandleChat(Chat("x\n   #mock fail=502"), kT0).status, 502);

  // In an earlier user message or in the system message: ignored.
  const json::object body{
      {"messages", json::array{json::object{{"role", "system"}, {"content", "#mock fail=503"}},
                               json::object{{"role", "user"}, {"content", "#mock fail=503"}},
                               json::object{{"role", "assistant"}, {"content", "#mock fail=503"}},
                               json::object{{"role", "user"}, {"content", "now answer"}}}}};
  const auto d = mock.HandleChat(json::serialize(body), kT0);
  EXPECT_EQ(d.kind, Kind::kAnswer);
  EXPECT_EQ(d.status, 200);
}

TEST(MockLlmTest, StatsCountTotalAndByPrompt) {
  MockLlm mock(MockOptions{});
  EXPECT_EQ(mock.Stats(), json::parse(R"({"total": 0, "by_prompt": {}})"));
  mock.HandleChat(Chat("one"), kT0);
  mock.HandleChat(Chat("two"), kT0);
  mock.HandleChat(Chat("two"), kT0);
  mock.HandleChat(Chat("#mock fail=503"), kT0);  // failures count too
  EXPECT_EQ(mock.Stats(),
            json::parse(R"({"total": 4, "by_prompt": {"one": 1, "two": 2, "#mock fail=503": 1}})"));
  mock.Reset();
  EXPECT_EQ(mock.Stats(), json::parse(R"({"total": 0, "by_prompt": {}})"));
  // After a reset, times= counts from zero again.
  const std::string req = Chat("#mock fail=503 times=1");
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 503);
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 200);
  mock.Reset();
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 503);
}

TEST(MockLlmTest, FailRateOneFailsEveryCall) {
  MockOptions options;
  options.fail_rate = 1.0;
  options.fail_status = 502;
  MockLlm mock(options);
  for (int i = 0; i < 50; ++i) {
    const auto d = mock.HandleChat(Chat("call " + std::to_string(i)), kT0);
    ASSERT_EQ(d.kind, Kind::kError) << i;
    ASSERT_EQ(d.status, 502) << i;
  }
}

TEST(MockLlmTest, FailRateIsSeededAndPartial) {
  MockOptions options;
  options.fail_rate = 0.5;
  options.seed = 7;
  MockLlm a(options);
  MockLlm b(options);
  int failures = 0;
  for (int i = 0; i < 200; ++i) {
    const auto da = a.HandleChat(Chat("q"), kT0);
    const auto db = b.HandleChat(Chat("q"), kT0);
    ASSERT_EQ(da.status, db.status) << "same seed, same sequence; call " << i;
    if (da.kind == Kind::kError) {
      EXPECT_EQ(da.status, 503);
      ++failures;
    }
  }
  EXPECT_GT(failures, 60);
  EXPECT_LT(failures, 140);
}

TEST(MockLlmTest, RpmLimitAnswers429UntilTheMinuteHasPassed) {
  MockOptions options;
  options.rpm = 2;
  MockLlm mock(options);
  EXPECT_EQ(mock.HandleChat(Chat("a"), kT0).status, 200);
  EXPECT_EQ(mock.HandleChat(Chat("b"), kT0 + std::chrono::seconds(1)).status, 200);
  const auto limited = mock.HandleChat(Chat("c"), kT0 + std::chrono::seconds(2));
  EXPECT_EQ(limited.kind, Kind::kError);
  EXPECT_EQ(limited.status, 429);
  EXPECT_GE(limited.retry_after_s, 1);
  EXPECT_EQ(Get(Body(limited), "error.code"), json::value("rate_limit_exceeded"));
  EXPECT_EQ(mock.HandleChat(Chat("d"), kT0 + std::chrono::seconds(59)).status, 429);
  // A minute after the window opened, it opens afresh.
  EXPECT_EQ(mock.HandleChat(Chat("e"), kT0 + std::chrono::seconds(60)).status, 200);
  EXPECT_EQ(mock.HandleChat(Chat("f"), kT0 + std::chrono::seconds(61)).status, 200);
  EXPECT_EQ(mock.HandleChat(Chat("g"), kT0 + std::chrono::seconds(62)).status, 429);
}

TEST(MockLlmTest, RateLimitTakesPrecedenceOverDirectives) {
  MockOptions options;
  options.rpm = 1;
  MockLlm mock(options);
  EXPECT_EQ(mock.HandleChat(Chat("#mock reply=x"), kT0).status, 200);
  EXPECT_EQ(mock.HandleChat(Chat("#mock reply=x"), kT0).status, 429);
}

TEST(MockLlmTest, TpmLimitCountsPromptTokens) {
  MockOptions options;
  options.tpm = 20;
  MockLlm mock(options);
  // "be brief" (8 chars) + 32 chars = 40 chars: 10 tokens per call.
  const std::string req = Chat(std::string(32, 'x'));
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 200);
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 200);
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 429);
  EXPECT_EQ(mock.HandleChat(req, kT0 + std::chrono::minutes(1)).status, 200);
}

TEST(MockLlmTest, BadRequestsAnswer400) {
  MockLlm mock(MockOptions{});
  for (std::string_view body : {"", "not json", "[1, 2]", "{}", R"({"messages": []})",
                                R"({"messages": "hi"})", R"({"model": "m"})"}) {
    const auto d = mock.HandleChat(body, kT0);
    EXPECT_EQ(d.kind, Kind::kError) << body;
    EXPECT_EQ(d.status, 400) << body;
    EXPECT_EQ(Get(Body(d), "error.type"), json::value("invalid_request_error")) << body;
  }
}

}  // namespace
}  // namespace keel::gateway
