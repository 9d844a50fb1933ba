// The Anthropic provider against a fake Messages API on loopback (an HttpServer on port
// 0 that records each request and answers canned bodies): request translation, answer,
// error and stream translation, and the anthropic provider config.

#include <gtest/gtest.h>

#include <map>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/net/http_server.h"
#include "keel/testing/assert.h"
#include "provider.h"

namespace keel::gateway::detail {
namespace {

using std::chrono::milliseconds;

// A fake Anthropic: answers every request with the canned answer and keeps the last one.
class FakeAnthropic {
 public:
  FakeAnthropic() {
    auto created = net::HttpServer::Create(net::ServerOptions{},
                                           [this](net::HttpRequest&& req, net::Responder respond) {
                                             net::HttpResponse answer;
                                             {
                                               std::lock_guard lock(mu_);
                                               ++calls_;
                                               last_ = std::move(req);
                                               answer = answer_;
                                             }
                                             respond(std::move(answer));
                                           });
    if (!created.ok()) {
      ADD_FAILURE() << "cannot start the fake: " << created.error().message;
      return;
    }
    server_ = std::move(created).value();
  }
  ~FakeAnthropic() {
    if (server_) server_->Stop();
  }

  void Answer(int status, std::string body, net::Headers headers = {},
              std::string content_type = "application/json") {
    std::lock_guard lock(mu_);
    answer_.status = status;
    answer_.body = std::move(body);
    answer_.headers = std::move(headers);
    answer_.content_type = std::move(content_type);
  }
  void AnswerStream(std::string events) { Answer(200, std::move(events), {}, "text/event-stream"); }

  std::string base_url() const {
    return "http://127.0.0.1:" + std::to_string(server_ ? server_->port() : 0) + "/v1";
  }
  int calls() {
    std::lock_guard lock(mu_);
    return calls_;
  }
  net::HttpRequest last() {
    std::lock_guard lock(mu_);
    return last_;
  }
  json::value last_body() { return json::parse(last().body); }

 private:
  std::mutex mu_;
  int calls_ = 0;             // GUARDED_BY(mu_)
  net::HttpRequest last_;     // GUARDED_BY(mu_)
  net::HttpResponse answer_;  // GUARDED_BY(mu_)
  std::unique_ptr<net::HttpServer> server_;
};

ProviderConfig ProviderFor(const std::string& base_url, std::string api_key = "sk-ant-test") {
  ProviderConfig c;
  c.name = "claude";
  c.type = "anthropic";
  c.base_url = base_url;
  c.api_key = std::move(api_key);
  c.model = "claude-test";
  c.timeout.connect = milliseconds(1000);
  c.timeout.total = milliseconds(5000);
  c.timeout.first_byte = milliseconds(5000);
  c.timeout.idle = milliseconds(5000);
  return c;
}

json::object UserChat(std::string_view text) {
  return json::object{{"model", "claude-test"},
                      {"messages", json::array{json::object{{"role", "user"}, {"content", text}}}}};
}

// A whole Anthropic message with one text block.
std::string Message(std::string_view text, std::string_view stop_reason = "end_turn",
                    json::object usage = {{"input_tokens", 12}, {"output_tokens", 5}}) {
  return json::serialize(
      json::object{{"id", "msg_01"},
                   {"type", "message"},
                   {"role", "assistant"},
                   {"model", "claude-real-20250101"},
                   {"content", json::array{json::object{{"type", "text"}, {"text", text}}}},
                   {"stop_reason", stop_reason},
                   {"stop_sequence", nullptr},
                   {"usage", std::move(usage)}});
}

std::string Event(std::string_view name, const json::value& data) {
  return "event: " + std::string(name) + "\ndata: " + json::serialize(data) + "\n\n";
}

std::string MessageStart() {
  return Event(
      "message_start",
      json::object{{"type", "message_start"},
                   {"message", json::object{{"id", "msg_s1"},
                                            {"type", "message"},
                                            {"role", "assistant"},
                                            {"model", "claude-real-20250101"},
                                            {"content", json::array{}},
                                            {"stop_reason", nullptr},
                                            {"usage", json::object{{"input_tokens", 9},
                                                                   {"output_tokens", 1}}}}}});
}

std::string TextDelta(std::string_view text) {
  return Event("content_block_delta",
               json::object{{"type", "content_block_delta"},
                            {"index", 0},
                            {"delta", json::object{{"type", "text_delta"}, {"text", text}}}});
}

std::string MessageEnd(std::string_view stop_reason = "end_turn") {
  return Event("content_block_stop", json::object{{"type", "content_block_stop"}, {"index", 0}}) +
         Event("message_delta", json::object{{"type", "message_delta"},
                                             {"delta", json::object{{"stop_reason", stop_reason},
                                                                    {"stop_sequence", nullptr}}},
                                             {"usage", json::object{{"output_tokens", 4}}}}) +
         Event("message_stop", json::object{{"type", "message_stop"}});
}

std::string ErrorBody(std::string_view type, std::string_view message) {
  return json::serialize(json::object{
      {"type", "error"}, {"error", json::object{{"type", type}, {"message", message}}}});
}

struct Streamed {
  Result<ChatResult> result = Error(ErrorCode::kInternal, "not called");
  std::vector<json::object> chunks;
};

Streamed Stream(Provider& p, const json::object& body, int stop_after = -1) {
  Streamed s;
  s.result = p.ChatStream(body, ChatRequest{}, milliseconds(5000), [&](const json::object& c) {
    s.chunks.push_back(c);
    return stop_after < 0 || static_cast<int>(s.chunks.size()) < stop_after;
  });
  return s;
}

std::string Canonical(const json::value& v) { return CanonicalJson(v); }

// ---- Requests ---------------------------------------------------------------------------

TEST(AnthropicProviderTest, TranslatesTheRequestAndSendsAnthropicHeaders) {
  FakeAnthropic fake;
  fake.Answer(200, Message("ok"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const json::object body{
      {"model", "claude-test"},
      {"messages",
       json::array{
           json::object{{"role", "system"}, {"content", "Be brief."}},
           json::object{{"role", "user"}, {"content", "Hi"}},
           json::object{
               {"role", "user"},
               {"content", json::array{json::object{{"type", "text"}, {"text", "there"}},
                                       json::object{{"type", "image_url"},
                                                    {"image_url", json::object{{"url", "https://e.com/a.png"}}}}}}},
           json::object{{"role", "assistant"}, {"content", "Hello"}},
           json::object{{"role", "developer"},
                        {"content", json::array{json::object{{"type", "text"},
                                                             {"text", "Answer in French."}}}}},
           json::object{{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", "42"}},
           json::object{{"role", "user"}, {"content", "Again"}}}},
      {"max_tokens", 100},
      {"temperature", 0.5},
      {"top_p", 0.9},
      {"stop", "END"},
      {"frequency_penalty", 1},
      {"n", 2},
      {"user", "u-1"},
      {"response_format", json::object{{"type", "json_object"}}}};
  ChatRequest req;
  req.idempotency_key = "run-1/step-2";
  ASSERT_OK(p->Chat(body, req, milliseconds(5000)));

  const auto sent = fake.last();
  EXPECT_EQ(sent.method, "POST");
  EXPECT_EQ(sent.path, "/v1/messages");
  EXPECT_EQ(sent.Header("x-api-key"), "sk-ant-test");
  EXPECT_EQ(sent.Header("anthropic-version"), "2023-06-01");
  EXPECT_EQ(sent.Header("content-type"), "application/json");
  EXPECT_EQ(sent.Header("idempotency-key"), "run-1/step-2");
  EXPECT_EQ(sent.Header("authorization"), "");
  const json::value expected = json::object{
      {"model", "claude-test"},
      {"system", "Be brief.\n\nAnswer in French."},
      {"messages",
       json::array{json::object{
                       {"role", "user"},
                       {"content", json::array{json::object{{"type", "text"}, {"text", "Hi"}},
                                               json::object{{"type", "text"}, {"text", "there"}},
                                               json::object{{"type", "image"},
                                                            {"source", json::object{{"type", "url"},
                                                                                    {"url", "https://e.com/a.png"}}}}}}},
                   json::object{{"role", "assistant"}, {"content", "Hello"}},
                   // The tool's result and the next user message: one user message.
                   json::object{{"role", "user"},
                                {"content", json::array{json::object{{"type", "tool_result"},
                                                                     {"tool_use_id", "call_1"},
                                                                     {"content", "42"}},
                                                        json::object{{"type", "text"}, {"text", "Again"}}}}}}},
      {"max_tokens", 100},
      {"temperature", 0.5},
      {"top_p", 0.9},
      {"stop_sequences", json::array{"END"}}};
  EXPECT_EQ(Canonical(fake.last_body()), Canonical(expected));
}

TEST(AnthropicProviderTest, MaxTokensStopAndTemperatureAreMapped) {
  FakeAnthropic fake;
  fake.Answer(200, Message("ok"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));

  ASSERT_OK(p->Chat(UserChat("a"), ChatRequest{}, milliseconds(5000)));
  auto sent = fake.last_body().as_object();
  EXPECT_EQ(sent.at("max_tokens").as_int64(), 4096) << "Anthropic requires max_tokens";
  EXPECT_FALSE(sent.contains("system"));
  EXPECT_FALSE(sent.contains("stream"));
  EXPECT_EQ(sent.at("messages").as_array()[0].at("content").as_string(), "a");

  json::object body = UserChat("b");
  body["max_completion_tokens"] = 50;
  body["stop"] = json::array{"x", "y"};
  body["temperature"] = 1.7;  // OpenAI's range is 0..2, Anthropic's 0..1
  ASSERT_OK(p->Chat(body, ChatRequest{}, milliseconds(5000)));
  sent = fake.last_body().as_object();
  EXPECT_EQ(sent.at("max_tokens").as_int64(), 50);
  EXPECT_EQ(Canonical(sent.at("stop_sequences")), Canonical(json::array{"x", "y"}));
  EXPECT_DOUBLE_EQ(sent.at("temperature").as_double(), 1.0);
}

TEST(AnthropicProviderTest, RequestsItCannotExpressAreRefusedWithoutACall) {
  FakeAnthropic fake;
  fake.Answer(200, Message("ok"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  json::object zero = UserChat("a");
  zero["max_tokens"] = 0;
  auto r = p->Chat(zero, ChatRequest{}, milliseconds(5000));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(r.error().param, "max_tokens");

  const json::object only_system{
      {"model", "m"},
      {"messages", json::array{json::object{{"role", "system"}, {"content", "You are kind."}}}}};
  auto s = Stream(*p, only_system);
  ASSERT_FALSE(s.result.ok());
  EXPECT_EQ(s.result.error().code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(s.result.error().param, "messages");
  EXPECT_EQ(fake.calls(), 0);
}

TEST(AnthropicProviderTest, ImagesAndToolResultsReachTheUpstream) {
  FakeAnthropic fake;
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const json::object body = json::parse(R"({
    "model": "claude-test",
    "messages": [
      {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "auto"}},
        {"type": "text", "text": "What is this? Check the site too."}]},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": [
        {"type": "text", "text": "the home page"},
        {"type": "image_url", "image_url": {"url": "https://e.com/shot.png"}}]},
      {"role": "assistant", "content": "It is a "}]
  })").as_object();
  const json::value expected = json::parse(R"([
    {"role": "user", "content": [
      {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
      {"type": "text", "text": "What is this? Check the site too."}]},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "screenshot", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": [
      {"type": "text", "text": "the home page"},
      {"type": "image", "source": {"type": "url", "url": "https://e.com/shot.png"}}]}]},
    {"role": "assistant", "content": "It is a"}])");

  fake.Answer(200, Message("cat"));
  ASSERT_OK(p->Chat(body, ChatRequest{}, milliseconds(5000)));
  EXPECT_EQ(Canonical(fake.last_body().at("messages")), Canonical(expected));

  fake.AnswerStream(MessageStart() + TextDelta("cat") + MessageEnd());
  auto s = Stream(*p, body);
  ASSERT_OK(s.result);
  EXPECT_EQ(Canonical(fake.last_body().at("messages")), Canonical(expected));
  EXPECT_TRUE(fake.last_body().at("stream").as_bool());
  EXPECT_EQ(fake.calls(), 2);
}

TEST(AnthropicProviderTest, PartsItCannotTakeAreRefusedWithoutACall) {
  FakeAnthropic fake;
  fake.Answer(200, Message("ok"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const json::object audio = json::parse(R"({"model": "claude-test", "messages": [
    {"role": "user", "content": "Listen"},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]})").as_object();
  auto r = p->Chat(audio, ChatRequest{}, milliseconds(5000));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(r.error().param, "messages[1].content[0]");
  EXPECT_NE(r.error().message.find("provider claude (anthropic): messages[1].content[0]"), std::string::npos)
      << r.error().message;

  const json::object tiff = json::parse(R"({"model": "claude-test", "messages": [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]})").as_object();
  auto s = Stream(*p, tiff);
  ASSERT_FALSE(s.result.ok());
  EXPECT_EQ(s.result.error().code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(s.result.error().param, "messages[0].content[0].image_url.url");
  EXPECT_TRUE(s.chunks.empty());
  EXPECT_EQ(fake.calls(), 0);
}

TEST(AnthropicProviderTest, ConfiguredHeadersOverrideTheVersion) {
  FakeAnthropic fake;
  fake.Answer(200, Message("ok"));
  ProviderConfig c = ProviderFor(fake.base_url(), /*api_key=*/"");
  c.headers = {{"Anthropic-Version", "2099-01-01"}, {"anthropic-beta", "some-beta"}};
  auto p = MakeAnthropicProvider(c);
  ASSERT_OK(p->Chat(UserChat("a"), ChatRequest{}, milliseconds(5000)));
  const auto sent = fake.last();
  int versions = 0;
  for (const auto& [k, v] : sent.headers) {
    if (k == "anthropic-version" || k == "Anthropic-Version") {
      ++versions;
      EXPECT_EQ(v, "2099-01-01");
    }
  }
  EXPECT_EQ(versions, 1);
  EXPECT_EQ(sent.Header("anthropic-beta"), "some-beta");
  EXPECT_EQ(sent.Header("x-api-key"), "") << "no key configured, none sent";
  EXPECT_EQ(sent.Header("idempotency-key"), "");
}

// ---- Answers ----------------------------------------------------------------------------

TEST(AnthropicProviderTest, TranslatesTheAnswerIntoAChatCompletion) {
  FakeAnthropic fake;
  fake.Answer(200, json::serialize(json::object{
                       {"id", "msg_01"},
                       {"type", "message"},
                       {"role", "assistant"},
                       {"model", "claude-real-20250101"},
                       {"content", json::array{json::object{{"type", "text"}, {"text", "Hello, "}},
                                               json::object{{"type", "text"}, {"text", "world"}}}},
                       {"stop_reason", "end_turn"},
                       {"stop_sequence", nullptr},
                       {"usage", json::object{{"input_tokens", 12}, {"output_tokens", 5}}}}));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_OK(r);
  EXPECT_EQ(r->text, "Hello, world");
  EXPECT_EQ(r->model, "claude-real-20250101");
  EXPECT_EQ(r->provider, "claude");
  const json::value usage =
      json::object{{"prompt_tokens", 12}, {"completion_tokens", 5}, {"total_tokens", 17}};
  EXPECT_EQ(Canonical(r->usage), Canonical(usage));
  const auto& resp = r->response;
  EXPECT_EQ(resp.at("id").as_string(), "msg_01");
  EXPECT_EQ(resp.at("object").as_string(), "chat.completion");
  EXPECT_TRUE(resp.at("created").is_int64());
  EXPECT_EQ(resp.at("model").as_string(), "claude-real-20250101");
  const auto& choice = resp.at("choices").as_array().at(0);
  EXPECT_EQ(choice.at("index").as_int64(), 0);
  EXPECT_EQ(choice.at("message").at("role").as_string(), "assistant");
  EXPECT_EQ(choice.at("message").at("content").as_string(), "Hello, world");
  EXPECT_EQ(choice.at("finish_reason").as_string(), "stop");
  EXPECT_EQ(Canonical(resp.at("usage")), Canonical(usage));
}

TEST(AnthropicProviderTest, StopReasonsBecomeFinishReasons) {
  FakeAnthropic fake;
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const std::vector<std::pair<std::string, std::string>> cases = {{"end_turn", "stop"},
                                                                  {"stop_sequence", "stop"},
                                                                  {"max_tokens", "length"},
                                                                  {"tool_use", "tool_calls"}};
  for (const auto& [stop_reason, finish] : cases) {
    fake.Answer(200, Message("x", stop_reason));
    auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
    ASSERT_OK(r);
    EXPECT_EQ(r->response.at("choices").as_array()[0].at("finish_reason").as_string(), finish)
        << stop_reason;
  }
}

TEST(AnthropicProviderTest, ToolUseBlocksBecomeToolCalls) {
  FakeAnthropic fake;
  fake.Answer(200, json::serialize(json::object{
                       {"id", "msg_t"},
                       {"type", "message"},
                       {"model", "claude-real"},
                       {"content", json::array{json::object{{"type", "text"}, {"text", "Looking."}},
                                               json::object{{"type", "tool_use"},
                                                            {"id", "toolu_1"},
                                                            {"name", "search"},
                                                            {"input", json::object{{"q", "x"}}}}}},
                       {"stop_reason", "tool_use"},
                       {"usage", json::object{{"input_tokens", 1}, {"output_tokens", 2}}}}));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_OK(r);
  const auto& choice = r->response.at("choices").as_array()[0];
  EXPECT_EQ(choice.at("finish_reason").as_string(), "tool_calls");
  EXPECT_EQ(choice.at("message").at("content").as_string(), "Looking.");
  const auto& call = choice.at("message").at("tool_calls").as_array().at(0);
  EXPECT_EQ(call.at("id").as_string(), "toolu_1");
  EXPECT_EQ(call.at("type").as_string(), "function");
  EXPECT_EQ(call.at("function").at("name").as_string(), "search");
  EXPECT_EQ(call.at("function").at("arguments").as_string(), R"({"q":"x"})");
}

TEST(AnthropicProviderTest, AToolCallAloneHasNullContent) {
  FakeAnthropic fake;
  fake.Answer(200, json::serialize(json::object{
                       {"id", "msg_t"},
                       {"type", "message"},
                       {"model", "claude-real"},
                       {"content", json::array{json::object{{"type", "tool_use"},
                                                            {"id", "toolu_1"},
                                                            {"name", "search"},
                                                            {"input", json::object{{"q", "x"}}}},
                                               json::object{{"type", "tool_use"},
                                                            {"id", "toolu_2"},
                                                            {"name", "fetch"},
                                                            {"input", json::object{}}}}},
                       {"stop_reason", "tool_use"},
                       {"usage", json::object{{"input_tokens", 1}, {"output_tokens", 2}}}}));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_OK(r);
  const auto& message = r->response.at("choices").as_array()[0].at("message");
  EXPECT_TRUE(message.at("content").is_null());
  ASSERT_EQ(message.at("tool_calls").as_array().size(), 2u);
  EXPECT_EQ(message.at("tool_calls").as_array()[1].at("function").at("name").as_string(), "fetch");
  EXPECT_EQ(r->text, "");
}

TEST(AnthropicProviderTest, ToolsToolChoiceToolCallsAndToolResultsAreTranslated) {
  FakeAnthropic fake;
  fake.Answer(200, Message("done"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const json::object body = json::parse(R"({
    "model": "claude-test",
    "messages": [
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
      {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "the weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
              {"type": "function", "function": {"name": "get_time"}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": false
  })").as_object();
  ASSERT_OK(p->Chat(body, ChatRequest{}, milliseconds(5000)));
  const json::value expected = json::parse(R"({
    "model": "claude-test", "max_tokens": 4096,
    "messages": [
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}]},
      {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"}]}],
    "tools": [{"name": "get_weather", "description": "the weather",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
              {"name": "get_time", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}
  })");
  EXPECT_EQ(Canonical(fake.last_body()), Canonical(expected));
  json::object required = body;
  required["tool_choice"] = "required";
  required.erase("parallel_tool_calls");
  ASSERT_OK(p->Chat(required, ChatRequest{}, milliseconds(5000)));
  EXPECT_EQ(Canonical(fake.last_body().at("tool_choice")), Canonical(json::object{{"type", "any"}}));
}

TEST(AnthropicProviderTest, StreamedToolUseBecomesToolCallDeltas) {
  FakeAnthropic fake;
  auto block_start = [](int index, const char* id, const char* name) {
    return Event("content_block_start",
                 json::object{{"type", "content_block_start"},
                              {"index", index},
                              {"content_block", json::object{{"type", "tool_use"}, {"id", id}, {"name", name},
                                                             {"input", json::object{}}}}});
  };
  auto input_delta = [](int index, const char* partial) {
    return Event("content_block_delta",
                 json::object{{"type", "content_block_delta"},
                              {"index", index},
                              {"delta", json::object{{"type", "input_json_delta"}, {"partial_json", partial}}}});
  };
  fake.AnswerStream(MessageStart() + block_start(0, "toolu_1", "get_weather") + input_delta(0, "{\"city\":") +
                    input_delta(0, "\"Paris\"}") + block_start(1, "toolu_2", "get_time") + input_delta(1, "{}") +
                    MessageEnd("tool_use"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto s = Stream(*p, UserChat("hi"));
  ASSERT_OK(s.result);
  std::map<int64_t, std::string> args, names, ids;
  std::string finish;
  for (const auto& c : s.chunks) {
    if (c.at("choices").as_array().empty()) continue;
    const auto& choice = c.at("choices").as_array()[0].as_object();
    if (choice.at("finish_reason").is_string()) finish = choice.at("finish_reason").as_string();
    const auto* calls = choice.at("delta").as_object().if_contains("tool_calls");
    if (calls == nullptr) continue;
    for (const auto& d : calls->as_array()) {
      const int64_t i = d.at("index").as_int64();
      if (const auto* id = d.as_object().if_contains("id")) ids[i] = id->as_string();
      const auto& f = d.at("function").as_object();
      if (const auto* n = f.if_contains("name")) names[i] += n->as_string();
      if (const auto* a = f.if_contains("arguments")) args[i] += a->as_string();
    }
  }
  EXPECT_EQ(finish, "tool_calls");
  EXPECT_EQ(ids[0], "toolu_1");
  EXPECT_EQ(names[0], "get_weather");
  EXPECT_EQ(args[0], R"({"city":"Paris"})");
  EXPECT_EQ(ids[1], "toolu_2");
  EXPECT_EQ(names[1], "get_time");
  EXPECT_EQ(args[1], "{}");
  const auto& message = s.result->response.at("choices").as_array()[0].at("message");
  EXPECT_TRUE(message.at("content").is_null());
  EXPECT_EQ(message.at("tool_calls").as_array()[0].at("function").at("arguments").as_string(), R"({"city":"Paris"})");
}

TEST(AnthropicProviderTest, CachedPromptTokensCountAsPromptTokens) {
  FakeAnthropic fake;
  fake.Answer(200, Message("x", "end_turn",
                           {{"input_tokens", 10},
                            {"cache_read_input_tokens", 90},
                            {"cache_creation_input_tokens", 0},
                            {"output_tokens", 5}}));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_OK(r);
  EXPECT_EQ(r->usage.at("prompt_tokens").as_int64(), 100);
  EXPECT_EQ(r->usage.at("total_tokens").as_int64(), 105);
  EXPECT_EQ(r->usage.at("prompt_tokens_details").at("cached_tokens").as_int64(), 90);
}

TEST(AnthropicProviderTest, AnUnusableAnswerIsInvalidOutput) {
  FakeAnthropic fake;
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  for (const std::string body :
       {R"({"id":"msg","type":"message","content":[{"type":"text","text":"trunc)", "[]",
        R"({"id":"msg","type":"message"})", R"({"type":"completion","completion":"x"})",
        R"({"type":"message","content":[{"type":"text"}]})"}) {
    fake.Answer(200, body);
    auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidOutput) << body;
  }
}

// ---- Errors -----------------------------------------------------------------------------

struct ErrorCase {
  int status;
  std::string body;
  ErrorCode code;
};

TEST(AnthropicProviderTest, ErrorsAreClassifiedByStatusAndType) {
  FakeAnthropic fake;
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const std::vector<ErrorCase> cases = {
      {529, ErrorBody("overloaded_error", "Overloaded"), ErrorCode::kOverloaded},
      {500, ErrorBody("api_error", "Internal server error"), ErrorCode::kServerError},
      {502, "<html>bad gateway</html>", ErrorCode::kServerError},
      {401, ErrorBody("authentication_error", "invalid x-api-key"), ErrorCode::kAuth},
      {403, ErrorBody("permission_error", "no access"), ErrorCode::kAuth},
      {400, ErrorBody("invalid_request_error", "messages: roles must alternate"),
       ErrorCode::kInvalidRequest},
      {400,
       ErrorBody("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
       ErrorCode::kContextLength},
      {404, ErrorBody("not_found_error", "model: claude-nope"), ErrorCode::kInvalidRequest},
      {400, ErrorBody("overloaded_error", "Overloaded"), ErrorCode::kOverloaded},
  };
  for (const auto& c : cases) {
    fake.Answer(c.status, c.body);
    auto whole = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
    ASSERT_FALSE(whole.ok()) << c.body;
    EXPECT_EQ(whole.error().code, c.code)
        << c.status << " " << c.body << ": " << whole.error().message;
    EXPECT_NE(whole.error().message.find(std::to_string(c.status)), std::string::npos);
    auto streamed = Stream(*p, UserChat("hi"));
    ASSERT_FALSE(streamed.result.ok()) << c.body;
    EXPECT_EQ(streamed.result.error().code, c.code) << "streamed " << c.status << " " << c.body;
    EXPECT_TRUE(streamed.chunks.empty());
  }
  fake.Answer(400, ErrorBody("invalid_request_error", "temperature: out of range"));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("temperature: out of range"), std::string::npos)
      << r.error().message;
}

TEST(AnthropicProviderTest, RateLimitsHonourRetryAfter) {
  FakeAnthropic fake;
  fake.Answer(429, ErrorBody("rate_limit_error", "Number of requests has exceeded your rate limit"),
              {{"retry-after", "7"}});
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kRateLimited);
  ASSERT_TRUE(r.error().retry_after.has_value());
  EXPECT_EQ(*r.error().retry_after, milliseconds(7000));
  auto s = Stream(*p, UserChat("hi"));
  ASSERT_FALSE(s.result.ok());
  EXPECT_EQ(s.result.error().code, ErrorCode::kRateLimited);
  ASSERT_TRUE(s.result.error().retry_after.has_value());
  EXPECT_EQ(*s.result.error().retry_after, milliseconds(7000));
}

// ---- Streams ----------------------------------------------------------------------------

TEST(AnthropicProviderTest, StreamsBecomeOpenAiChunks) {
  FakeAnthropic fake;
  fake.AnswerStream(
      MessageStart() +
      Event("content_block_start",
            json::object{{"type", "content_block_start"},
                         {"index", 0},
                         {"content_block", json::object{{"type", "text"}, {"text", ""}}}}) +
      Event("ping", json::object{{"type", "ping"}}) + TextDelta("Hello") + TextDelta(", world") +
      MessageEnd("max_tokens"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto s = Stream(*p, UserChat("hi"));
  ASSERT_OK(s.result);
  EXPECT_EQ(fake.last_body().at("stream").as_bool(), true);
  EXPECT_EQ(fake.last().Header("accept"), "text/event-stream");

  ASSERT_EQ(s.chunks.size(), 5u);
  for (const auto& c : s.chunks) {
    EXPECT_EQ(c.at("object").as_string(), "chat.completion.chunk");
    EXPECT_EQ(c.at("id").as_string(), "msg_s1");
    EXPECT_EQ(c.at("model").as_string(), "claude-real-20250101");
    EXPECT_TRUE(c.at("created").is_int64());
  }
  auto choice = [&](std::size_t i) {
    return s.chunks[i].at("choices").as_array().at(0).as_object();
  };
  EXPECT_EQ(Canonical(choice(0).at("delta")), Canonical(json::object{{"role", "assistant"}}));
  EXPECT_TRUE(choice(0).at("finish_reason").is_null());
  EXPECT_EQ(choice(1).at("delta").at("content").as_string(), "Hello");
  EXPECT_EQ(choice(2).at("delta").at("content").as_string(), ", world");
  EXPECT_TRUE(choice(3).at("delta").as_object().empty());
  EXPECT_EQ(choice(3).at("finish_reason").as_string(), "length");
  EXPECT_TRUE(s.chunks[4].at("choices").as_array().empty());
  const json::value usage =
      json::object{{"prompt_tokens", 9}, {"completion_tokens", 4}, {"total_tokens", 13}};
  EXPECT_EQ(Canonical(s.chunks[4].at("usage")), Canonical(usage));

  EXPECT_EQ(s.result->text, "Hello, world");
  EXPECT_EQ(s.result->model, "claude-real-20250101");
  EXPECT_EQ(s.result->provider, "claude");
  EXPECT_EQ(Canonical(s.result->usage), Canonical(usage));
}

TEST(AnthropicProviderTest, AStreamWithoutMessageStopIsTruncated) {
  FakeAnthropic fake;
  fake.AnswerStream(MessageStart() + TextDelta("Hello") + TextDelta(" there"));
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto s = Stream(*p, UserChat("hi"));
  ASSERT_FALSE(s.result.ok());
  EXPECT_EQ(s.result.error().code, ErrorCode::kInvalidOutput);
  EXPECT_NE(s.result.error().message.find("truncated"), std::string::npos);
  EXPECT_EQ(s.chunks.size(), 3u);  // the role and the two deltas went out
}

TEST(AnthropicProviderTest, AnErrorEventBeforeTheFirstTextSendsNoChunk) {
  FakeAnthropic fake;
  fake.AnswerStream(MessageStart() + Event("ping", json::object{{"type", "ping"}}) +
                    "event: error\ndata: " + ErrorBody("overloaded_error", "Overloaded") + "\n\n");
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto s = Stream(*p, UserChat("hi"));
  ASSERT_FALSE(s.result.ok());
  EXPECT_EQ(s.result.error().code, ErrorCode::kOverloaded);
  EXPECT_TRUE(s.chunks.empty()) << "nothing went out, so the gateway may still fail over";
}

TEST(AnthropicProviderTest, AnErrorEventAfterTextIsItsClass) {
  FakeAnthropic fake;
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  const std::vector<std::pair<std::string, ErrorCode>> cases = {
      {"api_error", ErrorCode::kServerError},
      {"overloaded_error", ErrorCode::kOverloaded},
      {"rate_limit_error", ErrorCode::kRateLimited},
      {"invalid_request_error", ErrorCode::kInvalidRequest},
      {"something_new", ErrorCode::kServerError}};
  for (const auto& [type, code] : cases) {
    fake.AnswerStream(MessageStart() + TextDelta("Hel") +
                      "event: error\ndata: " + ErrorBody(type, "it broke") + "\n\n" + MessageEnd());
    auto s = Stream(*p, UserChat("hi"));
    ASSERT_FALSE(s.result.ok()) << type;
    EXPECT_EQ(s.result.error().code, code) << type;
    EXPECT_NE(s.result.error().message.find("it broke"), std::string::npos);
    EXPECT_EQ(s.chunks.size(), 2u) << type;
  }
}

// Issue 11: one malformed event is dropped and the stream goes on; only a stream that
// cannot go on (no message_stop) is an error.
TEST(AnthropicProviderTest, AMalformedEventIsDroppedAndTheStreamGoesOn) {
  FakeAnthropic fake;
  fake.AnswerStream(
      MessageStart() + TextDelta("a ") +
      "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"te\n\n" +
      TextDelta("b") + MessageEnd());
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto s = Stream(*p, UserChat("hi"));
  ASSERT_TRUE(s.result.ok()) << s.result.error().message;
  EXPECT_EQ(s.result->text, "a b");
}

TEST(AnthropicProviderTest, AReaderThatGoesAwayCancelsTheStream) {
  FakeAnthropic fake;
  fake.AnswerStream(MessageStart() + TextDelta("a ") + TextDelta("b ") + TextDelta("c") +
                    MessageEnd());
  auto p = MakeAnthropicProvider(ProviderFor(fake.base_url()));
  auto s = Stream(*p, UserChat("hi"), /*stop_after=*/2);
  ASSERT_FALSE(s.result.ok());
  EXPECT_EQ(s.result.error().code, ErrorCode::kCancelled);
  EXPECT_EQ(s.chunks.size(), 2u);
}

TEST(AnthropicProviderTest, AnUnreachableUpstreamIsANetworkError) {
  auto p = MakeAnthropicProvider(ProviderFor("http://127.0.0.1:1/v1"));
  auto r = p->Chat(UserChat("hi"), ChatRequest{}, milliseconds(5000));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork);
  EXPECT_NE(r.error().message.find("claude"), std::string::npos);
}

// ---- Config -----------------------------------------------------------------------------

Result<keel::Config> Parse(std::string_view yaml) {
  return ParseConfig(yaml,
                     [](const std::string&) -> std::optional<std::string> { return std::nullopt; });
}

TEST(AnthropicConfigTest, TypeAnthropicDefaultsItsBaseUrl) {
  auto c = Parse("providers:\n  claude: {type: anthropic, api_key: k, model: claude-x}\n");
  ASSERT_OK(c);
  const auto& p = c->providers.at("claude");
  EXPECT_EQ(p.type, "anthropic");
  EXPECT_EQ(p.base_url, "https://api.anthropic.com/v1");
  EXPECT_EQ(p.api_key, "k");
  auto local =
      Parse("providers:\n  claude: {type: anthropic, base_url: 'http://127.0.0.1:9/v1/'}\n");
  ASSERT_OK(local);
  EXPECT_EQ(local->providers.at("claude").base_url, "http://127.0.0.1:9/v1");
}

TEST(AnthropicConfigTest, ABaseUrlMustBeHttp) {
  auto c = Parse("providers:\n  claude: {type: anthropic, base_url: 'ftp://h/v1'}\n");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().message.find("http:// or https://"), std::string::npos) << c.error().message;
  auto t = Parse("providers:\n  x: {type: gemini}\n");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().message.find("openai, anthropic or mock"), std::string::npos)
      << t.error().message;
}

}  // namespace
}  // namespace keel::gateway::detail
