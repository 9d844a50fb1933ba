// keel mock-llm over real HTTP.

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "helpers.h"
#include "keel/net/http_client.h"

namespace keel::testing {
namespace {

json::value Chat(const std::string& content) {
  return json::object{{"model", "mock-1"}, {"messages", json::array{json::object{{"role", "user"}, {"content", content}}}}};
}

TEST(MockLlmTest, AnswersInTheOpenAiShapeAndCountsPrompts) {
  MockLlm mock;
  auto r = HttpPostJson(mock.url() + "/v1/chat/completions", Chat("hello"));
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body.at("object").as_string(), "chat.completion");
  EXPECT_EQ(r.body.at("choices").as_array()[0].at("message").at("role").as_string(), "assistant");
  EXPECT_TRUE(r.body.at("usage").at("total_tokens").is_int64());
  auto again = HttpPostJson(mock.url() + "/v1/chat/completions", Chat("hello"));
  EXPECT_EQ(again.body.at("choices"), r.body.at("choices"));
  auto stats = HttpGet(mock.url() + "/mock/stats");
  EXPECT_EQ(stats.body.at("total").as_int64(), 2);
  EXPECT_EQ(stats.body.at("by_prompt").at("hello").as_int64(), 2);
  EXPECT_EQ(HttpPost(mock.url() + "/mock/reset", "").status, 200);
  EXPECT_EQ(HttpGet(mock.url() + "/mock/stats").body.at("total").as_int64(), 0);
}

TEST(MockLlmTest, DirectivesScriptFaults) {
  MockLlm mock;
  auto r = HttpPostJson(mock.url() + "/v1/chat/completions", Chat("x\n#mock fail=429 retry_after=7"));
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.Header("retry-after"), "7");
  auto twice = Chat("#mock fail=503 times=2");
  EXPECT_EQ(HttpPostJson(mock.url() + "/v1/chat/completions", twice).status, 503);
  EXPECT_EQ(HttpPostJson(mock.url() + "/v1/chat/completions", twice).status, 503);
  EXPECT_EQ(HttpPostJson(mock.url() + "/v1/chat/completions", twice).status, 200);
  auto malformed = HttpPostJson(mock.url() + "/v1/chat/completions", Chat("#mock malformed"));
  EXPECT_EQ(malformed.status, 200);
  EXPECT_TRUE(malformed.body.is_null()) << "the body should not parse: " << malformed.raw;
  // A reset is a transport failure for the client.
  net::ClientRequest req;
  req.method = "POST";
  req.url = mock.url() + "/v1/chat/completions";
  req.body = json::serialize(Chat("#mock reset"));
  auto reset = net::SendHttp(req);
  ASSERT_FALSE(reset.ok());
  EXPECT_EQ(reset.error().code, ErrorCode::kNetwork);
  // A hang outlasts the client's timeout.
  req.body = json::serialize(Chat("#mock hang"));
  req.total_timeout = std::chrono::milliseconds(200);
  auto hang = net::SendHttp(req);
  ASSERT_FALSE(hang.ok());
  EXPECT_EQ(hang.error().code, ErrorCode::kTimeout);
}

TEST(MockLlmTest, FlagsInjectLatencyFailuresAndRateLimits) {
  MockLlm failing({"--fail-rate", "1", "--fail-status", "500"});
  EXPECT_EQ(HttpPostJson(failing.url() + "/v1/chat/completions", Chat("a")).status, 500);
  MockLlm limited({"--rpm", "2"});
  EXPECT_EQ(HttpPostJson(limited.url() + "/v1/chat/completions", Chat("a")).status, 200);
  EXPECT_EQ(HttpPostJson(limited.url() + "/v1/chat/completions", Chat("b")).status, 200);
  auto third = HttpPostJson(limited.url() + "/v1/chat/completions", Chat("c"));
  EXPECT_EQ(third.status, 429);
  EXPECT_FALSE(third.Header("retry-after").empty());
  MockLlm slow({"--latency-ms", "150"});
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(HttpPostJson(slow.url() + "/v1/chat/completions", Chat("a")).status, 200);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(150));
}

TEST(MockLlmTest, RefusesBadRequests) {
  MockLlm mock;
  EXPECT_EQ(HttpPost(mock.url() + "/v1/chat/completions", "not json").status, 400);
  EXPECT_EQ(HttpPostJson(mock.url() + "/v1/chat/completions", json::object{{"messages", json::array{}}}).status, 400);
  EXPECT_EQ(HttpGet(mock.url() + "/nope").status, 404);
}

// ---- Streams and the Anthropic Messages API ---------------------------------------------

json::value StreamChat(const std::string& content, bool include_usage = false) {
  json::object body{
      {"model", "mock-1"},
      {"stream", true},
      {"messages", json::array{json::object{{"role", "user"}, {"content", content}}}}};
  if (include_usage) body["stream_options"] = json::object{{"include_usage", true}};
  return body;
}

json::value Messages(const std::string& content, bool stream = false) {
  json::object body{
      {"model", "claude-mock"},
      {"max_tokens", 512},
      {"system", json::array{json::object{{"type", "text"}, {"text", "be brief"}}}},
      {"messages",
       json::array{json::object{
           {"role", "user"},
           {"content", json::array{json::object{{"type", "text"}, {"text", content}}}}}}}};
  if (stream) body["stream"] = true;
  return body;
}

// POSTs `body` and reads the whole raw answer.
Result<net::ClientResponse> Send(const std::string& url, const json::value& body,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  net::ClientRequest req;
  req.method = "POST";
  req.url = url;
  req.headers.emplace_back("Content-Type", "application/json");
  req.body = json::serialize(body);
  req.total_timeout = timeout;
  return net::SendHttp(req);
}

struct SseEvent {
  std::string event;  // "" without an event: line
  std::string data;
  json::value json;  // null unless the data is a JSON document
};

// Splits a text/event-stream body into its events ("event: NAME" and "data: ..." lines,
// a blank line after each event).
std::vector<SseEvent> ParseSse(const std::string& body) {
  std::vector<SseEvent> out;
  std::size_t pos = 0;
  while (pos < body.size()) {
    auto end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string block = body.substr(pos, end - pos);
    pos = end + 2;
    if (block.empty()) continue;
    SseEvent e;
    std::size_t p = 0;
    while (p <= block.size()) {
      auto nl = block.find('\n', p);
      if (nl == std::string::npos) nl = block.size();
      const std::string line = block.substr(p, nl - p);
      p = nl + 1;
      if (line.rfind("event: ", 0) == 0) e.event = line.substr(7);
      if (line.rfind("data: ", 0) == 0) e.data += line.substr(6);
    }
    if (auto v = ParseJson(e.data); v.ok()) e.json = *v;
    out.push_back(std::move(e));
  }
  return out;
}

std::string Text(const json::value& v, std::string_view path) {
  const json::value* found = FindPath(v, path);
  return found != nullptr && found->is_string() ? std::string(found->get_string()) : "";
}

TEST(MockLlmStreamTest, StreamsAnOpenAiChunkStream) {
  MockLlm mock;
  const std::string url = mock.url() + "/v1/chat/completions";
  auto whole = HttpPostJson(url, Chat("stream me a few words"));
  ASSERT_EQ(whole.status, 200) << whole.raw;
  const std::string answer = Text(whole.body, "choices.0.message.content");
  ASSERT_FALSE(answer.empty());

  auto r = Send(url, StreamChat("stream me a few words"));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->Header("content-type"), "text/event-stream");
  const auto events = ParseSse(r->body);
  ASSERT_GE(events.size(), 5u) << r->body;
  EXPECT_EQ(Text(events.front().json, "choices.0.delta.role"), "assistant");
  EXPECT_EQ(events.back().data, "[DONE]");
  const json::value& stop = events[events.size() - 2].json;
  EXPECT_EQ(Text(stop, "choices.0.finish_reason"), "stop");
  EXPECT_EQ(FindPath(stop, "choices.0.delta")->as_object().size(), 0u);
  std::string text;
  int deltas = 0;
  for (std::size_t i = 0; i + 1 < events.size(); ++i) {
    const json::value& chunk = events[i].json;
    ASSERT_TRUE(chunk.is_object()) << events[i].data;
    EXPECT_EQ(Text(chunk, "object"), "chat.completion.chunk");
    EXPECT_EQ(Text(chunk, "model"), "mock-1");
    EXPECT_FALSE(Text(chunk, "id").empty());
    EXPECT_NE(FindPath(chunk, "created"), nullptr);
    EXPECT_EQ(chunk.as_object().if_contains("usage"), nullptr);
    const std::string piece = Text(chunk, "choices.0.delta.content");
    if (!piece.empty()) ++deltas;
    text += piece;
  }
  EXPECT_GE(deltas, 3) << "the answer comes in several pieces";
  EXPECT_EQ(text, answer);
  // The connection serves the next request after the stream.
  EXPECT_EQ(HttpGet(mock.url() + "/mock/stats")
                .body.at("by_prompt")
                .at("stream me a few words")
                .as_int64(),
            2);
}

TEST(MockLlmStreamTest, IncludeUsageSendsAUsageChunkBeforeDone) {
  MockLlm mock;
  auto r = Send(mock.url() + "/v1/chat/completions", StreamChat("count me", true));
  ASSERT_TRUE(r.ok()) << r.error().message;
  const auto events = ParseSse(r->body);
  ASSERT_GE(events.size(), 4u) << r->body;
  EXPECT_EQ(events.back().data, "[DONE]");
  const json::value& usage = events[events.size() - 2].json;
  EXPECT_EQ(usage.at("choices"), json::array{}) << events[events.size() - 2].data;
  EXPECT_GT(usage.at("usage").at("completion_tokens").as_int64(), 0);
  EXPECT_EQ(usage.at("usage").at("total_tokens").as_int64(),
            usage.at("usage").at("prompt_tokens").as_int64() +
                usage.at("usage").at("completion_tokens").as_int64());
  EXPECT_EQ(Text(events[events.size() - 3].json, "choices.0.finish_reason"), "stop");
}

TEST(MockLlmStreamTest, TruncateEndsTheStreamWithoutDone) {
  MockLlm mock;
  auto r = Send(mock.url() + "/v1/chat/completions",
                StreamChat("#mock reply=one two three four\n#mock truncate"));
  ASSERT_TRUE(r.ok()) << r.error().message;  // a clean end of the HTTP answer
  EXPECT_EQ(r->status, 200);
  const auto events = ParseSse(r->body);
  std::string text;
  for (const auto& e : events) {
    EXPECT_NE(e.data, "[DONE]");
    const json::value* finish = FindPath(e.json, "choices.0.finish_reason");
    EXPECT_TRUE(finish != nullptr && finish->is_null()) << e.data;
    text += Text(e.json, "choices.0.delta.content");
  }
  EXPECT_EQ(text, "one two ");
}

TEST(MockLlmStreamTest, ResetAfterIsATransportErrorMidStream) {
  MockLlm mock;
  auto r = Send(mock.url() + "/v1/chat/completions",
                StreamChat("#mock reply=a b c d e f\n#mock reset_after=2"));
  ASSERT_FALSE(r.ok()) << r->body;
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
  // times= lets a retry through.
  const auto once = StreamChat("#mock reply=a b c\n#mock reset_after=1 times=1");
  EXPECT_FALSE(Send(mock.url() + "/v1/chat/completions", once).ok());
  auto retried = Send(mock.url() + "/v1/chat/completions", once);
  ASSERT_TRUE(retried.ok()) << retried.error().message;
  EXPECT_EQ(ParseSse(retried->body).back().data, "[DONE]");
}

TEST(MockLlmStreamTest, FirstByteAndStallOutlastAClientTimeout) {
  MockLlm mock;
  const std::string url = mock.url() + "/v1/chat/completions";
  const auto t0 = std::chrono::steady_clock::now();
  auto late = Send(url, StreamChat("#mock first_byte=10000"), std::chrono::milliseconds(300));
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code, ErrorCode::kTimeout) << late.error().message;
  auto stalled =
      Send(url, StreamChat("#mock reply=a b c\n#mock stall=10000"), std::chrono::milliseconds(300));
  ASSERT_FALSE(stalled.ok());
  EXPECT_EQ(stalled.error().code, ErrorCode::kTimeout) << stalled.error().message;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  // A short stall still delivers the whole stream.
  auto paced = Send(url, StreamChat("#mock reply=a b c\n#mock stall=20 first_byte=20"));
  ASSERT_TRUE(paced.ok()) << paced.error().message;
  EXPECT_EQ(ParseSse(paced->body).back().data, "[DONE]");
}

TEST(MockLlmStreamTest, FailuresAnswerJsonBeforeAnyStream) {
  MockLlm mock;
  auto r = Send(mock.url() + "/v1/chat/completions", StreamChat("#mock fail=503"));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(r->Header("content-type"), "application/json");
  auto body = ParseJson(r->body);
  ASSERT_TRUE(body.ok()) << r->body;
  EXPECT_EQ(Text(*body, "error.type"), "server_error");
  auto reset = Send(mock.url() + "/v1/chat/completions", StreamChat("#mock reset"));
  ASSERT_FALSE(reset.ok());
  EXPECT_EQ(reset.error().code, ErrorCode::kNetwork);
}

TEST(MockLlmStreamTest, StalledStreamsDoNotHoldTheIoThreads) {
  MockLlm mock({"--io-threads", "1"});
  const std::string url = mock.url() + "/v1/chat/completions";
  constexpr int kStreams = 4;
  std::vector<std::thread> clients;
  std::vector<std::string> last(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] {
      auto r = Send(
          url, StreamChat("#mock reply=a b c d e f g h\n#mock stall=250 s" + std::to_string(i)));
      if (r.ok() && !ParseSse(r->body).empty()) last[i] = ParseSse(r->body).back().data;
    });
  }
  // Every stream has been taken (counted) and is pacing its events...
  EXPECT_TRUE(Eventually([&] {
    return HttpGet(mock.url() + "/mock/stats").body.at("total") == json::value(kStreams);
  }));
  // ...while the one I/O thread still answers at once.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(HttpGet(mock.url() + "/healthz").status, 200);
  EXPECT_EQ(HttpPostJson(url, Chat("quick")).status, 200);
  // (Each stream takes 10 stalls of 250 ms.)
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1000));
  for (auto& t : clients) t.join();
  for (int i = 0; i < kStreams; ++i) EXPECT_EQ(last[i], "[DONE]") << i;
}

TEST(MockLlmAnthropicTest, AnswersTheMessagesApi) {
  MockLlm mock;
  auto r = HttpPostJson(mock.url() + "/v1/messages", Messages("hello claude"));
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(Text(r.body, "id").rfind("msg_", 0), 0u) << r.raw;
  EXPECT_EQ(Text(r.body, "type"), "message");
  EXPECT_EQ(Text(r.body, "role"), "assistant");
  EXPECT_EQ(Text(r.body, "model"), "claude-mock");
  EXPECT_EQ(Text(r.body, "content.0.type"), "text");
  EXPECT_EQ(Text(r.body, "stop_reason"), "end_turn");
  EXPECT_TRUE(r.body.at("stop_sequence").is_null());
  EXPECT_GT(r.body.at("usage").at("input_tokens").as_int64(), 0);
  EXPECT_GT(r.body.at("usage").at("output_tokens").as_int64(), 0);
  // The same text as chat completions, and the same stats.
  auto chat = HttpPostJson(mock.url() + "/v1/chat/completions", Chat("hello claude"));
  EXPECT_EQ(Text(r.body, "content.0.text"), Text(chat.body, "choices.0.message.content"));
  EXPECT_EQ(MockCount(mock.url(), "hello claude"), 2);
}

TEST(MockLlmAnthropicTest, StreamsAnthropicEvents) {
  MockLlm mock;
  auto whole = HttpPostJson(mock.url() + "/v1/messages", Messages("stream to claude"));
  ASSERT_EQ(whole.status, 200) << whole.raw;
  auto r = Send(mock.url() + "/v1/messages", Messages("stream to claude", true));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->Header("content-type"), "text/event-stream");
  const auto events = ParseSse(r->body);
  std::vector<std::string> names;
  std::string text;
  for (const auto& e : events) {
    ASSERT_TRUE(e.json.is_object()) << e.data;
    EXPECT_EQ(Text(e.json, "type"), e.event);
    if (names.empty() || names.back() != e.event) names.push_back(e.event);
    if (e.event == "content_block_delta") text += Text(e.json, "delta.text");
  }
  EXPECT_EQ(names,
            (std::vector<std::string>{"message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop"}))
      << r->body;
  EXPECT_EQ(text, Text(whole.body, "content.0.text"));
  const json::value& delta = events[events.size() - 2].json;
  EXPECT_EQ(Text(delta, "delta.stop_reason"), "end_turn");
  EXPECT_EQ(delta.at("usage").at("output_tokens"), whole.body.at("usage").at("output_tokens"));
  // Stream faults apply to Anthropic streams too.
  auto truncated =
      Send(mock.url() + "/v1/messages", Messages("#mock reply=a b c d\n#mock truncate", true));
  ASSERT_TRUE(truncated.ok()) << truncated.error().message;
  for (const auto& e : ParseSse(truncated->body)) EXPECT_NE(e.event, "message_stop");
  auto reset =
      Send(mock.url() + "/v1/messages", Messages("#mock reply=a b c d\n#mock reset_after=1", true));
  ASSERT_FALSE(reset.ok());
  EXPECT_EQ(reset.error().code, ErrorCode::kNetwork);
}

TEST(MockLlmAnthropicTest, ErrorsHaveAnthropicsShape) {
  MockLlm mock;
  auto overloaded = HttpPostJson(mock.url() + "/v1/messages", Messages("busy\n#mock fail=529"));
  EXPECT_EQ(overloaded.status, 529) << overloaded.raw;
  EXPECT_EQ(overloaded.body, json::parse(R"({"type": "error", "error": {"type": "overloaded_error",
                                                                       "message": "mock failure 529"}})"));
  auto limited =
      HttpPostJson(mock.url() + "/v1/messages", Messages("#mock fail=429 retry_after=3", true));
  EXPECT_EQ(limited.status, 429);
  EXPECT_EQ(limited.Header("retry-after"), "3");
  EXPECT_EQ(Text(limited.body, "error.type"), "rate_limit_error");
  auto bad = HttpPostJson(mock.url() + "/v1/messages", json::object{{"messages", json::array{}}});
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(Text(bad.body, "type"), "error");
  EXPECT_EQ(Text(bad.body, "error.type"), "invalid_request_error");
}

}  // namespace
}  // namespace keel::testing
