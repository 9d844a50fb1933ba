#include "keel/gateway/mock_llm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "keel/core/json.h"
#include "keel/core/json_schema.h"
#include "keel/net/digest.h"
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

TEST(MockLlmTest, FailAfterAnswersTheFirstCallsThenFails) {
  MockLlm mock(MockOptions{});
  const std::string req = Chat("cache me\n#mock fail=503 after=1");
  const auto first = mock.HandleChat(req, kT0);
  EXPECT_EQ(first.kind, Kind::kAnswer);
  EXPECT_EQ(first.status, 200);
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 503);
  EXPECT_EQ(mock.HandleChat(req, kT0).status, 503);
  // With times=, the directive holds for that many calls after the first `after`.
  const std::string window = Chat("#mock fail=500 after=2 times=1");
  EXPECT_EQ(mock.HandleChat(window, kT0).status, 200);
  EXPECT_EQ(mock.HandleChat(window, kT0).status, 200);
  EXPECT_EQ(mock.HandleChat(window, kT0).status, 500);
  EXPECT_EQ(mock.HandleChat(window, kT0).status, 200);
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

// ---- Streams ---------------------------------------------------------------------------

// A streamed chat-completions body whose last user message is `prompt`.
std::string ChatStream(std::string_view prompt, bool include_usage = false) {
  json::object body{
      {"model", "gpt-test"},
      {"stream", true},
      {"messages", json::array{json::object{{"role", "system"}, {"content", "be brief"}},
                               json::object{{"role", "user"}, {"content", prompt}}}}};
  if (include_usage) body["stream_options"] = json::object{{"include_usage", true}};
  return json::serialize(body);
}

// One server-sent event: its name ("" without an event: line) and its data.
struct Sse {
  std::string event;
  std::string data;
  json::value json;  // null when the data does not parse (or is [DONE])
};

std::vector<Sse> Events(const MockDecision& d) {
  std::vector<Sse> out;
  for (const auto& e : d.events) {
    Sse sse;
    EXPECT_TRUE(e.size() >= 2 && e.substr(e.size() - 2) == "\n\n") << e;
    std::string_view rest(e);
    if (rest.rfind("event: ", 0) == 0) {
      const auto nl = rest.find('\n');
      sse.event = std::string(rest.substr(7, nl - 7));
      rest.remove_prefix(nl + 1);
    }
    EXPECT_EQ(rest.rfind("data: ", 0), 0u) << e;
    if (rest.size() >= 8) sse.data = std::string(rest.substr(6, rest.size() - 8));
    EXPECT_EQ(sse.data.find('\n'), std::string::npos) << "one data line per event: " << e;
    if (auto v = ParseJson(sse.data); v.ok()) sse.json = *v;
    out.push_back(std::move(sse));
  }
  return out;
}

// The text of an OpenAI chunk's content delta, or "" when it has none.
std::string DeltaContent(const json::value& chunk) {
  const json::value* c = FindPath(chunk, "choices.0.delta.content");
  return c != nullptr && c->is_string() ? std::string(c->get_string()) : "";
}

int Count(const std::vector<Sse>& events, std::string_view data) {
  return static_cast<int>(
      std::count_if(events.begin(), events.end(), [&](const Sse& e) { return e.data == data; }));
}

TEST(MockLlmStreamTest, NonStreamedRequestsHaveNoEvents) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(Chat("hello"), kT0);
  EXPECT_FALSE(d.stream);
  EXPECT_TRUE(d.events.empty());
  // Stream directives do nothing to a request that does not stream.
  const auto faults =
      mock.HandleChat(Chat("x\n#mock first_byte=500 stall=20 truncate reset_after=1"), kT0);
  EXPECT_EQ(faults.kind, Kind::kAnswer);
  EXPECT_FALSE(faults.stream);
  EXPECT_EQ(faults.first_byte, milliseconds(0));
  EXPECT_EQ(faults.stall, milliseconds(0));
  EXPECT_FALSE(faults.truncated);
  EXPECT_FALSE(faults.reset_at_end);
}

TEST(MockLlmStreamTest, OpenAiStreamIsRoleThenContentThenStopThenDone) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(ChatStream("Tell me about keel streams"), kT0);
  ASSERT_EQ(d.kind, Kind::kAnswer);
  ASSERT_TRUE(d.stream);
  EXPECT_EQ(d.status, 200);
  EXPECT_FALSE(d.truncated);
  EXPECT_FALSE(d.reset_at_end);
  EXPECT_EQ(d.first_byte, milliseconds(0));
  EXPECT_EQ(d.stall, milliseconds(0));
  const auto events = Events(d);
  // role, at least 3 content deltas, stop, [DONE].
  ASSERT_GE(events.size(), 6u);
  EXPECT_EQ(d.content_events, static_cast<int>(events.size()) - 3);
  EXPECT_EQ(events.back().data, "[DONE]");
  EXPECT_EQ(Count(events, "[DONE]"), 1);

  const json::value& first = events.front().json;
  EXPECT_EQ(Get(first, "choices.0.delta"), json::parse(R"({"role": "assistant"})"));
  EXPECT_EQ(Get(first, "choices.0.finish_reason"), json::value(nullptr));
  const json::value& stop = events[events.size() - 2].json;
  EXPECT_EQ(Get(stop, "choices.0.delta"), json::object{});
  EXPECT_EQ(Get(stop, "choices.0.finish_reason"), json::value("stop"));

  std::string id;
  for (std::size_t i = 0; i + 1 < events.size(); ++i) {
    const json::value& chunk = events[i].json;
    ASSERT_TRUE(chunk.is_object()) << events[i].data;
    EXPECT_TRUE(events[i].event.empty());
    EXPECT_EQ(Get(chunk, "object"), json::value("chat.completion.chunk"));
    EXPECT_EQ(Get(chunk, "model"), json::value("gpt-test"));
    EXPECT_TRUE(Get(chunk, "created").is_int64());
    ASSERT_TRUE(Get(chunk, "id").is_string());
    if (i == 0) id = std::string(chunk.at("id").as_string());
    EXPECT_EQ(Get(chunk, "id"), json::value(id)) << "one id for the whole stream";
    EXPECT_EQ(Get(chunk, "usage"), json::value("<missing>")) << "no usage without include_usage";
    EXPECT_EQ(Get(chunk, "choices.0.index"), json::value(0));
    if (i > 0 && i + 2 < events.size()) {
      EXPECT_FALSE(DeltaContent(chunk).empty()) << events[i].data;
      EXPECT_EQ(Get(chunk, "choices.0.finish_reason"), json::value(nullptr));
    }
  }
  EXPECT_EQ(id.rfind("chatcmpl-", 0), 0u) << id;
}

TEST(MockLlmStreamTest, DeltasConcatenateToTheNonStreamedAnswer) {
  for (std::string_view prompt :
       {std::string_view("What is keel?"), std::string_view("  several   blanks\nand lines\t"),
        std::string_view("x\n#mock reply=  hello  big\n"), std::string_view("#mock reply=one")}) {
    MockLlm mock(MockOptions{});
    const auto whole = mock.HandleChat(Chat(prompt, "gpt-test"), kT0);
    const auto streamed = mock.HandleChat(ChatStream(prompt), kT0);
    std::string text;
    for (const auto& e : Events(streamed)) text += DeltaContent(e.json);
    EXPECT_EQ(text, Content(whole)) << prompt;
    // The stream's decision still carries the whole answer for callers that do not stream.
    EXPECT_EQ(Content(streamed), Content(whole)) << prompt;
  }
  // Per word: the pieces are words with the blanks that follow them.
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(ChatStream("#mock reply=alpha beta  gamma"), kT0);
  std::vector<std::string> pieces;
  for (const auto& e : Events(d)) {
    if (!DeltaContent(e.json).empty()) pieces.push_back(DeltaContent(e.json));
  }
  EXPECT_EQ(pieces, (std::vector<std::string>{"alpha ", "beta  ", "gamma"}));
  EXPECT_EQ(d.content_events, 3);
}

TEST(MockLlmStreamTest, IncludeUsageAddsAUsageChunkBeforeDone) {
  MockLlm mock(MockOptions{});
  const auto whole = mock.HandleChat(Chat("Count my tokens please", "gpt-test"), kT0);
  const auto d = mock.HandleChat(ChatStream("Count my tokens please", true), kT0);
  const auto events = Events(d);
  ASSERT_GE(events.size(), 5u);
  EXPECT_EQ(events.back().data, "[DONE]");
  const json::value& usage_chunk = events[events.size() - 2].json;
  EXPECT_EQ(Get(usage_chunk, "choices"), json::array{});
  EXPECT_EQ(Get(usage_chunk, "object"), json::value("chat.completion.chunk"));
  EXPECT_EQ(Get(usage_chunk, "usage"), Get(Body(whole), "usage"));
  EXPECT_EQ(Get(events[events.size() - 3].json, "choices.0.finish_reason"), json::value("stop"));
  // The other chunks say "usage": null, as OpenAI's do.
  for (std::size_t i = 0; i + 2 < events.size(); ++i) {
    EXPECT_EQ(Get(events[i].json, "usage"), json::value(nullptr)) << events[i].data;
  }
  EXPECT_EQ(d.content_events, static_cast<int>(events.size()) - 4);
}

TEST(MockLlmStreamTest, FirstByteAndStallPaceTheStream) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(ChatStream("x\n#mock first_byte=1500 stall=40"), kT0);
  EXPECT_EQ(d.kind, Kind::kAnswer);
  EXPECT_TRUE(d.stream);
  EXPECT_EQ(d.first_byte, milliseconds(1500));
  EXPECT_EQ(d.stall, milliseconds(40));
  EXPECT_EQ(d.delay, milliseconds(0));
  EXPECT_FALSE(d.truncated);
  EXPECT_EQ(Events(d).back().data, "[DONE]");
  // sleep= still delays a stream, before its first byte too.
  const auto slow = mock.HandleChat(ChatStream("#mock sleep=300 first_byte=200"), kT0);
  EXPECT_EQ(slow.delay, milliseconds(300));
  EXPECT_EQ(slow.first_byte, milliseconds(200));
}

TEST(MockLlmStreamTest, TruncateEndsAfterSomeContentWithoutStopOrDone) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(ChatStream("#mock reply=a b c d e\n#mock truncate"), kT0);
  ASSERT_TRUE(d.stream);
  EXPECT_TRUE(d.truncated);
  EXPECT_FALSE(d.reset_at_end);
  EXPECT_EQ(d.content_events, 3);  // half of 5, rounded up
  const auto events = Events(d);
  ASSERT_EQ(events.size(), 4u);  // role + 3 deltas
  EXPECT_EQ(Get(events[0].json, "choices.0.delta.role"), json::value("assistant"));
  std::string text;
  for (const auto& e : events) {
    EXPECT_NE(Get(e.json, "choices.0.finish_reason"), json::value("stop"));
    text += DeltaContent(e.json);
  }
  EXPECT_EQ(text, "a b c ");
  EXPECT_EQ(Count(events, "[DONE]"), 0);
  // truncate=N names the number of content events.
  const auto one = mock.HandleChat(ChatStream("#mock reply=a b c d e\n#mock truncate=1"), kT0);
  EXPECT_EQ(one.content_events, 1);
  EXPECT_EQ(one.events.size(), 2u);
}

TEST(MockLlmStreamTest, ResetAfterCutsTheStreamAndResets) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(ChatStream("#mock reply=a b c d e\n#mock reset_after=2"), kT0);
  ASSERT_TRUE(d.stream);
  EXPECT_TRUE(d.reset_at_end);
  EXPECT_TRUE(d.truncated);
  EXPECT_EQ(d.content_events, 2);
  const auto events = Events(d);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(DeltaContent(events[1].json) + DeltaContent(events[2].json), "a b ");
  const auto at_once = mock.HandleChat(ChatStream("#mock reset_after=0"), kT0);
  EXPECT_TRUE(at_once.reset_at_end);
  EXPECT_EQ(at_once.events.size(), 1u);  // the role chunk only
  // More than there is: every content event, then the reset instead of the end.
  const auto late = mock.HandleChat(ChatStream("#mock reply=a b\n#mock reset_after=10"), kT0);
  EXPECT_EQ(late.content_events, 2);
  EXPECT_EQ(late.events.size(), 3u);
  EXPECT_TRUE(late.reset_at_end);
}

TEST(MockLlmStreamTest, StreamDirectivesHonourTimes) {
  MockLlm mock(MockOptions{});
  const std::string req = ChatStream("q\n#mock truncate stall=30 first_byte=10 times=1");
  const auto first = mock.HandleChat(req, kT0);
  EXPECT_TRUE(first.truncated);
  EXPECT_EQ(first.stall, milliseconds(30));
  EXPECT_EQ(first.first_byte, milliseconds(10));
  const auto second = mock.HandleChat(req, kT0);
  EXPECT_FALSE(second.truncated);
  EXPECT_EQ(second.stall, milliseconds(0));
  EXPECT_EQ(second.first_byte, milliseconds(0));
  EXPECT_EQ(Events(second).back().data, "[DONE]");
  const std::string reset = ChatStream("q\n#mock reset_after=1 times=2");
  EXPECT_TRUE(mock.HandleChat(reset, kT0).reset_at_end);
  EXPECT_TRUE(mock.HandleChat(reset, kT0).reset_at_end);
  EXPECT_FALSE(mock.HandleChat(reset, kT0).reset_at_end);
}

TEST(MockLlmStreamTest, OtherDirectivesApplyToStreamsToo) {
  MockLlm mock(MockOptions{});
  // A failure answers the usual JSON error, before any stream.
  const auto failed = mock.HandleChat(ChatStream("#mock fail=503"), kT0);
  EXPECT_EQ(failed.kind, Kind::kError);
  EXPECT_EQ(failed.status, 503);
  EXPECT_FALSE(failed.stream);
  EXPECT_TRUE(failed.events.empty());
  EXPECT_EQ(Get(Body(failed), "error.type"), json::value("server_error"));
  const auto limited = mock.HandleChat(ChatStream("#mock fail=429 retry_after=2"), kT0);
  EXPECT_EQ(limited.status, 429);
  EXPECT_EQ(limited.retry_after_s, 2);
  EXPECT_FALSE(limited.stream);
  EXPECT_EQ(mock.HandleChat(ChatStream("#mock hang"), kT0).kind, Kind::kHang);
  EXPECT_FALSE(mock.HandleChat(ChatStream("#mock hang"), kT0).stream);
  EXPECT_EQ(mock.HandleChat(ChatStream("#mock reset"), kT0).kind, Kind::kReset);
  EXPECT_FALSE(mock.HandleChat(ChatStream("#mock reset"), kT0).stream);
  const auto slow = mock.HandleChat(ChatStream("#mock sleep=250"), kT0);
  EXPECT_TRUE(slow.stream);
  EXPECT_EQ(slow.delay, milliseconds(250));
  // Malformed: a stream with an event whose data does not parse.
  const auto malformed = mock.HandleChat(ChatStream("#mock malformed"), kT0);
  EXPECT_EQ(malformed.kind, Kind::kMalformed);
  ASSERT_TRUE(malformed.stream);
  const auto events = Events(malformed);
  ASSERT_GE(events.size(), 2u);
  EXPECT_TRUE(events[0].json.is_object());
  EXPECT_TRUE(std::any_of(events.begin(), events.end(), [](const Sse& e) {
    return e.data != "[DONE]" && !ParseJson(e.data).ok();
  }));
}

// ---- Anthropic Messages -----------------------------------------------------------------

json::object AnthropicBody(std::string_view prompt, bool stream = false) {
  json::object body{{"model", "claude-test"},
                    {"max_tokens", 256},
                    {"system", "be brief"},
                    {"messages", json::array{json::object{{"role", "user"}, {"content", prompt}}}}};
  if (stream) body["stream"] = true;
  return body;
}

std::string Anthropic(std::string_view prompt, bool stream = false) {
  return json::serialize(AnthropicBody(prompt, stream));
}

TEST(MockLlmAnthropicTest, AnswersInTheMessagesShape) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleMessages(Anthropic("Count my tokens please"), kT0);
  ASSERT_EQ(d.kind, Kind::kAnswer);
  EXPECT_EQ(d.status, 200);
  EXPECT_FALSE(d.stream);
  const auto body = Body(d);
  ASSERT_TRUE(body.is_object());
  EXPECT_EQ(body.at("id").as_string().find("msg_"), 0u) << body;
  EXPECT_EQ(body.at("type"), json::value("message"));
  EXPECT_EQ(body.at("role"), json::value("assistant"));
  EXPECT_EQ(body.at("model"), json::value("claude-test"));
  EXPECT_EQ(body.at("stop_reason"), json::value("end_turn"));
  EXPECT_EQ(body.at("stop_sequence"), json::value(nullptr));
  ASSERT_EQ(body.at("content").as_array().size(), 1u);
  EXPECT_EQ(Get(body, "content.0.type"), json::value("text"));
  // The same answer as chat completions gives for the same last user message.
  const auto chat = mock.HandleChat(Chat("Count my tokens please"), kT0);
  EXPECT_EQ(Get(body, "content.0.text"), json::value(Content(chat)));
  // "be brief" (8) + 22 = 30 chars: 8 tokens.
  EXPECT_EQ(Get(body, "usage.input_tokens"), json::value(8));
  EXPECT_EQ(Get(body, "usage.output_tokens"), json::value(EstimateTokens(Content(chat))));
}

TEST(MockLlmAnthropicTest, ParsesSystemBlocksAndContentBlocks) {
  MockLlm mock(MockOptions{});
  json::object body{
      {"model", "claude-test"},
      {"max_tokens", 100},
      {"system", json::array{json::object{{"type", "text"}, {"text", "be brief"}},
                             json::object{{"type", "text"}, {"text", "and kind"}}}},
      {"messages",
       json::array{json::object{{"role", "user"}, {"content", "#mock fail=503"}},
                   json::object{{"role", "assistant"}, {"content", "earlier"}},
                   json::object{
                       {"role", "user"},
                       {"content", json::array{json::object{{"type", "text"}, {"text", "part one"}},
                                               json::object{{"type", "image"}},
                                               json::object{{"type", "text"},
                                                            {"text", "#mock reply=blocks"}}}}}}}};
  const auto d = mock.HandleMessages(json::serialize(body), kT0);
  ASSERT_EQ(d.kind, Kind::kAnswer) << d.body;
  EXPECT_EQ(Get(Body(d), "content.0.text"), json::value("blocks"));
  // System: 8 + 1 + 8 = 17; messages: 14 + 7 + (8 + 1 + 18 = 27) = 48; 65 chars: 17 tokens.
  EXPECT_EQ(Get(Body(d), "usage.input_tokens"), json::value(17));
  // Counted by the last user message's text: its text blocks, one line each.
  EXPECT_EQ(mock.Stats(),
            json::parse(R"({"total": 1, "by_prompt": {"part one\n#mock reply=blocks": 1}})"));
}

TEST(MockLlmAnthropicTest, ErrorsHaveAnthropicsShapeAndTypes) {
  MockLlm mock(MockOptions{});
  struct Case {
    std::string directive;
    int status;
    std::string type;
  };
  for (const auto& c : std::vector<Case>{{"fail=529", 529, "overloaded_error"},
                                         {"fail=429", 429, "rate_limit_error"},
                                         {"fail=500", 500, "api_error"},
                                         {"fail=503", 503, "api_error"},
                                         {"fail=401", 401, "authentication_error"},
                                         {"fail=403", 403, "permission_error"},
                                         {"fail=400", 400, "invalid_request_error"},
                                         {"fail=context_length", 400, "invalid_request_error"}}) {
    const auto d = mock.HandleMessages(Anthropic("q\n#mock " + c.directive), kT0);
    EXPECT_EQ(d.kind, Kind::kError) << c.directive;
    EXPECT_EQ(d.status, c.status) << c.directive;
    const auto body = Body(d);
    EXPECT_EQ(Get(body, "type"), json::value("error")) << body;
    EXPECT_EQ(Get(body, "error.type"), json::value(c.type)) << body;
    EXPECT_TRUE(Get(body, "error.message").is_string()) << body;
    EXPECT_EQ(body.as_object().size(), 2u) << body;
  }
  const auto limited = mock.HandleMessages(Anthropic("#mock fail=429 retry_after=4"), kT0);
  EXPECT_EQ(limited.retry_after_s, 4);
  // A stream request fails the same way, before any stream.
  const auto overloaded = mock.HandleMessages(Anthropic("#mock fail=529", true), kT0);
  EXPECT_EQ(overloaded.status, 529);
  EXPECT_FALSE(overloaded.stream);
  EXPECT_EQ(Get(Body(overloaded), "error.type"), json::value("overloaded_error"));
  // A hang ends with an Anthropic-shaped body too.
  const auto hang = mock.HandleMessages(Anthropic("#mock hang"), kT0);
  EXPECT_EQ(hang.kind, Kind::kHang);
  EXPECT_EQ(Get(Body(hang), "type"), json::value("error"));
  const auto malformed = mock.HandleMessages(Anthropic("#mock malformed"), kT0);
  EXPECT_EQ(malformed.kind, Kind::kMalformed);
  EXPECT_FALSE(ParseJson(malformed.body).ok());
}

TEST(MockLlmAnthropicTest, RateLimitsAnswerRateLimitError) {
  MockOptions options;
  options.rpm = 1;
  MockLlm mock(options);
  EXPECT_EQ(mock.HandleMessages(Anthropic("a"), kT0).status, 200);
  const auto d = mock.HandleMessages(Anthropic("b"), kT0);
  EXPECT_EQ(d.status, 429);
  EXPECT_GE(d.retry_after_s, 1);
  EXPECT_EQ(Get(Body(d), "error.type"), json::value("rate_limit_error"));
}

TEST(MockLlmAnthropicTest, BadRequestsAnswer400InvalidRequestError) {
  MockLlm mock(MockOptions{});
  auto no_max_tokens = AnthropicBody("hi");
  no_max_tokens.erase("max_tokens");
  auto zero_max_tokens = AnthropicBody("hi");
  zero_max_tokens["max_tokens"] = 0;
  auto bad_system = AnthropicBody("hi");
  bad_system["system"] = 42;
  auto no_messages = AnthropicBody("hi");
  no_messages["messages"] = json::array{};
  for (const std::string& body : {std::string("not json"), std::string("[1]"),
                                  json::serialize(no_max_tokens), json::serialize(zero_max_tokens),
                                  json::serialize(bad_system), json::serialize(no_messages)}) {
    const auto d = mock.HandleMessages(body, kT0);
    EXPECT_EQ(d.kind, Kind::kError) << body;
    EXPECT_EQ(d.status, 400) << body;
    EXPECT_EQ(Get(Body(d), "type"), json::value("error")) << body;
    EXPECT_EQ(Get(Body(d), "error.type"), json::value("invalid_request_error")) << body;
  }
  EXPECT_EQ(mock.Stats().at("total"), json::value(0)) << "bad requests are not counted";
}

TEST(MockLlmAnthropicTest, StreamHasAnthropicsEventSequence) {
  MockLlm mock(MockOptions{});
  const auto whole = mock.HandleMessages(Anthropic("Tell me about keel streams"), kT0);
  const auto d = mock.HandleMessages(Anthropic("Tell me about keel streams", true), kT0);
  ASSERT_EQ(d.kind, Kind::kAnswer);
  ASSERT_TRUE(d.stream);
  EXPECT_FALSE(d.truncated);
  const auto events = Events(d);
  std::vector<std::string> names;
  std::string text;
  for (const auto& e : events) {
    ASSERT_TRUE(e.json.is_object()) << e.data;
    EXPECT_EQ(Get(e.json, "type"), json::value(e.event)) << "the data's type names the event";
    if (names.empty() || names.back() != e.event) names.push_back(e.event);
    if (e.event == "content_block_delta") {
      EXPECT_EQ(Get(e.json, "index"), json::value(0));
      EXPECT_EQ(Get(e.json, "delta.type"), json::value("text_delta"));
      text += std::string(Get(e.json, "delta.text").as_string());
    }
  }
  EXPECT_EQ(names,
            (std::vector<std::string>{"message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop"}));
  EXPECT_EQ(d.content_events, static_cast<int>(events.size()) - 5);
  EXPECT_GE(d.content_events, 3);
  EXPECT_EQ(text, std::string(Get(Body(whole), "content.0.text").as_string()));
  const json::value& start = events[0].json;
  EXPECT_EQ(Get(start, "message.id").as_string().find("msg_"), 0u);
  EXPECT_EQ(Get(start, "message.role"), json::value("assistant"));
  EXPECT_EQ(Get(start, "message.model"), json::value("claude-test"));
  EXPECT_EQ(Get(start, "message.content"), json::array{});
  EXPECT_EQ(Get(start, "message.usage.input_tokens"), Get(Body(whole), "usage.input_tokens"));
  EXPECT_EQ(Get(events[1].json, "content_block"), json::parse(R"({"type": "text", "text": ""})"));
  const json::value& delta = events[events.size() - 2].json;
  EXPECT_EQ(Get(delta, "delta.stop_reason"), json::value("end_turn"));
  EXPECT_EQ(Get(delta, "usage.output_tokens"), Get(Body(whole), "usage.output_tokens"));
}

TEST(MockLlmAnthropicTest, StreamFaultsApply) {
  MockLlm mock(MockOptions{});
  const auto truncated =
      mock.HandleMessages(Anthropic("#mock reply=a b c d\n#mock truncate stall=5", true), kT0);
  EXPECT_TRUE(truncated.truncated);
  EXPECT_FALSE(truncated.reset_at_end);
  EXPECT_EQ(truncated.stall, milliseconds(5));
  EXPECT_EQ(truncated.content_events, 2);
  for (const auto& e : Events(truncated)) {
    EXPECT_NE(e.event, "content_block_stop");
    EXPECT_NE(e.event, "message_delta");
    EXPECT_NE(e.event, "message_stop");
  }
  EXPECT_EQ(truncated.events.size(), 4u);
  const auto reset = mock.HandleMessages(
      Anthropic("#mock reply=a b c d\n#mock reset_after=1 first_byte=9", true), kT0);
  EXPECT_TRUE(reset.reset_at_end);
  EXPECT_EQ(reset.first_byte, milliseconds(9));
  EXPECT_EQ(reset.events.size(), 3u);  // message_start, content_block_start, one delta
  const auto malformed = mock.HandleMessages(Anthropic("#mock malformed", true), kT0);
  EXPECT_EQ(malformed.kind, Kind::kMalformed);
  const auto events = Events(malformed);
  EXPECT_TRUE(
      std::any_of(events.begin(), events.end(), [](const Sse& e) { return e.json.is_null(); }));
}

// ---- Tools, JSON modes, embeddings' encodings -------------------------------------------

json::object WeatherTool() {
  return json::parse(R"({"type": "function", "function": {"name": "get_weather", "parameters": {
      "type": "object", "required": ["city", "days"],
      "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}}}})")
      .as_object();
}

json::object TimeTool() {
  return json::parse(R"({"type": "function", "function": {"name": "get_time", "parameters": {
      "type": "object", "required": ["tz"], "properties": {"tz": {"type": "string"}}}}})")
      .as_object();
}

std::string WithTools(std::string_view prompt, json::value tool_choice = nullptr,
                      bool stream = false) {
  json::object body = ParseJson(Chat(prompt)).value().as_object();
  body["tools"] = json::array{WeatherTool(), TimeTool()};
  if (!tool_choice.is_null()) body["tool_choice"] = tool_choice;
  if (stream) body["stream"] = true;
  return json::serialize(body);
}

TEST(MockLlmToolsTest, ToolChoiceRequiredAnswersAToolCallWithArgumentsOfItsSchema) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(WithTools("weather?", "required"), kT0);
  ASSERT_EQ(d.kind, Kind::kAnswer);
  const auto body = Body(d);
  EXPECT_TRUE(Get(body, "choices.0.message.content").is_null()) << d.body;
  EXPECT_EQ(Get(body, "choices.0.finish_reason"), "tool_calls");
  const json::value tool_calls = Get(body, "choices.0.message.tool_calls");
  const auto& calls = tool_calls.as_array();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(Get(calls[0], "type"), "function");
  EXPECT_EQ(Get(calls[0], "function.name"), "get_weather");
  EXPECT_FALSE(Get(calls[0], "id").as_string().empty());
  auto args = ParseJson(Get(calls[0], "function.arguments").as_string());
  ASSERT_OK(args);
  auto schema = JsonSchema::Compile(WeatherTool().at("function").at("parameters"));
  ASSERT_OK(schema);
  EXPECT_OK(schema->Validate(*args));
}

TEST(MockLlmToolsTest, ANamedToolChoiceCallsThatTool) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(
      WithTools("time?", json::object{{"type", "function"},
                                      {"function", json::object{{"name", "get_time"}}}}),
      kT0);
  EXPECT_EQ(Get(Body(d), "choices.0.message.tool_calls.0.function.name"), "get_time");
}

TEST(MockLlmToolsTest, TheToolDirectiveCallsSeveralToolsInParallel) {
  MockLlm mock(MockOptions{});
  const auto d = mock.HandleChat(WithTools("both\n#mock tool=get_weather,get_time"), kT0);
  const auto body = Body(d);
  const json::value tool_calls = Get(body, "choices.0.message.tool_calls");
  const auto& calls = tool_calls.as_array();
  ASSERT_EQ(calls.size(), 2u) << d.body;
  EXPECT_EQ(Get(calls[0], "function.name"), "get_weather");
  EXPECT_EQ(Get(calls[1], "function.name"), "get_time");
  EXPECT_NE(Get(calls[0], "id"), Get(calls[1], "id"));
}

TEST(MockLlmToolsTest, NoToolCallUnlessAskedAndNoneAfterAToolsResult) {
  MockLlm mock(MockOptions{});
  EXPECT_TRUE(
      Get(Body(mock.HandleChat(WithTools("plain"), kT0)), "choices.0.message.content").is_string());
  EXPECT_TRUE(Get(Body(mock.HandleChat(WithTools("x\n#mock tool=get_time", "none"), kT0)),
                  "choices.0.message.content")
                  .is_string());
  // Without tools in the request, the directive does nothing.
  EXPECT_TRUE(
      Get(Body(mock.HandleChat(Chat("x\n#mock tool=get_time"), kT0)), "choices.0.message.content")
          .is_string());
  // After the tool's result, the answer is text: a tool loop ends.
  json::object body = ParseJson(WithTools("x\n#mock tool=get_time")).value().as_object();
  body["messages"].as_array().push_back(json::object{
      {"role", "assistant"},
      {"content", nullptr},
      {"tool_calls", json::array{json::object{
                         {"id", "c1"},
                         {"type", "function"},
                         {"function", json::object{{"name", "get_time"}, {"arguments", "{}"}}}}}}});
  body["messages"].as_array().push_back(
      json::object{{"role", "tool"}, {"tool_call_id", "c1"}, {"content", "12:00"}});
  const auto after = Body(mock.HandleChat(json::serialize(body), kT0));
  EXPECT_TRUE(Get(after, "choices.0.message.content").is_string()) << json::serialize(after);
  EXPECT_EQ(Get(after, "choices.0.finish_reason"), "stop");
}

TEST(MockLlmToolsTest, StreamedToolCallsComeAsDeltasThatAddUpToTheWholeAnswer) {
  MockLlm mock(MockOptions{});
  const auto whole = Body(mock.HandleChat(WithTools("both\n#mock tool=get_weather,get_time"), kT0));
  const auto d =
      mock.HandleChat(WithTools("both\n#mock tool=get_weather,get_time", nullptr, true), kT0);
  ASSERT_TRUE(d.stream);
  std::map<int64_t, std::string> args, names;
  std::string finish;
  for (const auto& e : Events(d)) {
    if (e.data == "[DONE]") continue;
    const json::value* calls = FindPath(e.json, "choices.0.delta.tool_calls");
    if (calls != nullptr) {
      for (const auto& c : calls->as_array()) {
        const int64_t i = c.at("index").as_int64();
        if (const auto* n = FindPath(c, "function.name")) names[i] += n->as_string();
        args[i] += Get(c, "function.arguments").as_string();
      }
    }
    if (const auto* f = FindPath(e.json, "choices.0.finish_reason"); f && f->is_string())
      finish = f->as_string();
  }
  EXPECT_EQ(finish, "tool_calls");
  ASSERT_EQ(args.size(), 2u);
  for (int64_t i = 0; i < 2; ++i) {
    const auto& call =
        whole.at("choices").at(0).at("message").at("tool_calls").at(static_cast<std::size_t>(i));
    EXPECT_EQ(names[i], call.at("function").at("name").as_string());
    EXPECT_EQ(args[i], call.at("function").at("arguments").as_string());
  }
  EXPECT_GT(d.content_events, 2);
}

TEST(MockLlmToolsTest, AnthropicToolsAreAnsweredWithToolUseBlocks) {
  MockLlm mock(MockOptions{});
  json::value body = AnthropicBody("weather?", false);
  body.as_object()["tools"] =
      json::parse(R"([{"name": "get_weather", "input_schema": {"type": "object",
      "required": ["city"], "properties": {"city": {"type": "string"}}}}])");
  body.as_object()["tool_choice"] = json::object{{"type", "any"}};
  const auto d = Body(mock.HandleMessages(json::serialize(body), kT0));
  EXPECT_EQ(Get(d, "stop_reason"), "tool_use");
  EXPECT_EQ(Get(d, "content.0.type"), "tool_use");
  EXPECT_EQ(Get(d, "content.0.name"), "get_weather");
  EXPECT_TRUE(Get(d, "content.0.input.city").is_string()) << json::serialize(d);
  body.as_object()["stream"] = true;
  const auto s = mock.HandleMessages(json::serialize(body), kT0);
  std::string partial;
  bool started = false;
  for (const auto& e : Events(s)) {
    if (e.event == "content_block_start") started = Get(e.json, "content_block.type") == "tool_use";
    if (e.event == "content_block_delta") partial += Get(e.json, "delta.partial_json").as_string();
  }
  EXPECT_TRUE(started);
  EXPECT_EQ(ParseJson(partial).value(), Get(d, "content.0.input"));
}

TEST(MockLlmJsonModesTest, JsonSchemaAnswersAValueThatSatisfiesTheSchema) {
  MockLlm mock(MockOptions{});
  const json::value schema =
      json::parse(R"({"type": "object", "required": ["title", "score", "tags", "ok"],
      "properties": {"title": {"type": "string", "minLength": 2}, "score": {"type": "number", "minimum": 3},
                     "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                     "ok": {"type": "boolean"}}})");
  json::object body = ParseJson(Chat("structured please")).value().as_object();
  body["response_format"] = json::object{
      {"type", "json_schema"},
      {"json_schema", json::object{{"name", "x"}, {"strict", true}, {"schema", schema}}}};
  auto value = ParseJson(Content(mock.HandleChat(json::serialize(body), kT0)));
  ASSERT_OK(value);
  auto compiled = JsonSchema::Compile(schema);
  ASSERT_OK(compiled);
  EXPECT_OK(compiled->Validate(*value));
}

TEST(MockLlmJsonModesTest, JsonObjectAnswersAJsonObject) {
  MockLlm mock(MockOptions{});
  json::object body = ParseJson(Chat("json please")).value().as_object();
  body["response_format"] = json::object{{"type", "json_object"}};
  auto value = ParseJson(Content(mock.HandleChat(json::serialize(body), kT0)));
  ASSERT_OK(value);
  ASSERT_TRUE(value->is_object());
  EXPECT_TRUE(value->at("answer").is_string());
}

TEST(MockLlmEmbeddingsTest, Base64IsTheLittleEndianFloat32sOfTheFloatAnswer) {
  MockLlm mock(MockOptions{});
  const auto floats = Body(
      mock.HandleEmbeddings(R"({"input": ["alpha", "beta"], "encoding_format": "float"})", kT0));
  const auto b64 = Body(
      mock.HandleEmbeddings(R"({"input": ["alpha", "beta"], "encoding_format": "base64"})", kT0));
  for (std::size_t i = 0; i < 2; ++i) {
    const auto& values = floats.at("data").at(i).at("embedding").as_array();
    std::string bytes;
    for (const auto& v : values) {
      const float f = static_cast<float>(v.as_double());
      EXPECT_EQ(static_cast<double>(f), v.as_double()) << "a float32 value";
      uint32_t u = 0;
      std::memcpy(&u, &f, 4);
      for (int b = 0; b < 4; ++b) bytes.push_back(static_cast<char>((u >> (8 * b)) & 0xff));
    }
    EXPECT_EQ(b64.at("data").at(i).at("embedding").as_string(), net::Base64(bytes));
  }
  EXPECT_EQ(net::Base64("Man"), "TWFu");
  EXPECT_EQ(net::Base64("Ma"), "TWE=");
  EXPECT_EQ(net::Base64("M"), "TQ==");
  const auto bad = mock.HandleEmbeddings(R"({"input": "x", "encoding_format": "hex"})", kT0);
  EXPECT_EQ(bad.status, 400);
}

}  // namespace
}  // namespace keel::gateway
