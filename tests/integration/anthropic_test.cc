// The gateway's Anthropic provider: OpenAI clients call keel, keel calls a real
// `keel mock-llm` through its Anthropic Messages API (POST /v1/messages).

#include <gtest/gtest.h>

#include "helpers.h"

namespace keel::testing {
namespace {

// An anthropic provider NAME whose model is NAME-claude, at the mock-llm `url`.
std::string Anthropic(const std::string& name, const std::string& url,
                      const std::string& extra = "") {
  return "  " + name + ": {type: anthropic, base_url: " + url +
         "/v1, api_key: sk-ant-test, model: " + name +
         "-claude, timeout: {connect: 1s, total: 5s}" + extra + "}\n";
}

class AnthropicTest : public ::testing::Test {
 protected:
  void Start(const std::string& providers, const std::string& routes) {
    server_ =
        std::make_unique<KeelServer>(dir_.path(), "storage: sqlite://data/keel.db\nproviders:\n" +
                                                      providers + "routes:\n" + routes);
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }
  JsonResponse Call(const json::value& body) {
    return HttpPostJson(server_->url() + "/v1/chat/completions", body);
  }
  JsonResponse Call(const std::string& model, const std::string& content) {
    return Call(Chat(model, content));
  }
  std::string Metrics() { return HttpGet(server_->url() + "/metrics").raw; }
  TempDir dir_;
  std::unique_ptr<KeelServer> server_;
};

TEST_F(AnthropicTest, AnOpenAiRequestGetsAnOpenAiAnswerFromAnAnthropicTarget) {
  MockLlm mock;
  Start(Anthropic("claude", mock.url()), "  smart: {targets: [{provider: claude}]}\n");
  const json::value body = json::object{
      {"model", "smart"},
      {"max_tokens", 64},
      {"messages", json::array{json::object{{"role", "system"}, {"content", "You are terse."}},
                               json::object{{"role", "user"}, {"content", "hello there"}}}}};
  auto r = Call(body);
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.Header("x-keel-provider"), "claude");
  EXPECT_EQ(r.body.at("object").as_string(), "chat.completion");
  EXPECT_EQ(r.body.at("model").as_string(), "claude-claude") << "the model the mock answered as";
  EXPECT_TRUE(std::string(r.body.at("id").as_string()).starts_with("msg_mock")) << r.raw;
  EXPECT_TRUE(r.body.at("created").is_int64());
  const auto& choice = r.body.at("choices").as_array().at(0);
  EXPECT_EQ(choice.at("index").as_int64(), 0);
  EXPECT_EQ(choice.at("message").at("role").as_string(), "assistant");
  EXPECT_EQ(choice.at("finish_reason").as_string(), "stop");

  // The same Anthropic request straight to the mock: the same text, the same usage.
  auto direct = HttpPostJson(
      mock.url() + "/v1/messages",
      json::object{
          {"model", "claude-claude"},
          {"max_tokens", 64},
          {"system", "You are terse."},
          {"messages", json::array{json::object{{"role", "user"}, {"content", "hello there"}}}}});
  ASSERT_EQ(direct.status, 200) << direct.raw;
  EXPECT_EQ(choice.at("message").at("content").as_string(),
            direct.body.at("content").as_array()[0].at("text").as_string());
  const int64_t in = direct.body.at("usage").at("input_tokens").as_int64();
  const int64_t out = direct.body.at("usage").at("output_tokens").as_int64();
  EXPECT_EQ(r.body.at("usage").at("prompt_tokens").as_int64(), in);
  EXPECT_EQ(r.body.at("usage").at("completion_tokens").as_int64(), out);
  EXPECT_EQ(r.body.at("usage").at("total_tokens").as_int64(), in + out);
  EXPECT_EQ(MockCount(mock.url(), "hello there"), 2);
  EXPECT_NE(Metrics().find("keel_llm_tokens_total{direction=\"input\",provider=\"claude\"} " +
                           std::to_string(in)),
            std::string::npos);
}

TEST_F(AnthropicTest, StreamingYieldsOpenAiChunksThatAddUpToTheWholeAnswer) {
  MockLlm mock;
  Start(Anthropic("claude", mock.url()), "  smart: {targets: [{provider: claude}]}\n");
  const std::string prompt = "tell me a few words about streams";
  auto s = StreamCall(server_->url(), StreamBody("smart", prompt, true));
  ASSERT_TRUE(s.transport_ok);
  ASSERT_EQ(s.status, 200) << s.raw;
  ASSERT_GE(s.data.size(), 5u) << s.raw;
  EXPECT_EQ(s.data.back(), "[DONE]");
  auto first = json::parse(s.data.front());
  EXPECT_EQ(first.at("object").as_string(), "chat.completion.chunk");
  EXPECT_EQ(first.at("model").as_string(), "claude-claude");
  EXPECT_EQ(first.at("choices").as_array()[0].at("delta").at("role").as_string(), "assistant");
  auto finish = json::parse(s.data[s.data.size() - 3]);
  EXPECT_EQ(finish.at("choices").as_array()[0].at("finish_reason").as_string(), "stop");
  auto usage = json::parse(s.data[s.data.size() - 2]);
  EXPECT_TRUE(usage.at("choices").as_array().empty());
  EXPECT_GT(usage.at("usage").at("prompt_tokens").as_int64(), 0);
  EXPECT_GT(usage.at("usage").at("completion_tokens").as_int64(), 0);
  EXPECT_EQ(usage.at("usage").at("total_tokens").as_int64(),
            usage.at("usage").at("prompt_tokens").as_int64() +
                usage.at("usage").at("completion_tokens").as_int64());

  auto whole = Call("smart", prompt);
  ASSERT_EQ(whole.status, 200) << whole.raw;
  EXPECT_EQ(
      s.Text(),
      std::string(whole.body.at("choices").as_array()[0].at("message").at("content").as_string()));
  EXPECT_NE(Metrics().find("keel_llm_time_to_first_token_seconds_count{provider=\"claude\"} 1"),
            std::string::npos);

  // Without include_usage no usage chunk is passed on.
  auto plain = StreamCall(server_->url(), StreamBody("smart", prompt));
  ASSERT_EQ(plain.status, 200) << plain.raw;
  EXPECT_EQ(plain.data.back(), "[DONE]");
  EXPECT_FALSE(json::parse(plain.data[plain.data.size() - 2]).at("choices").as_array().empty());
}

TEST_F(AnthropicTest, OverloadedFailsOverToTheNextTarget) {
  MockLlm down({"--fail-rate", "1", "--fail-status", "529"});
  MockLlm up;
  Start(Anthropic("down", down.url()) + Anthropic("up", up.url()),
        "  r: {strategy: priority, targets: [{provider: down}, {provider: up, tier: 2}]}\n");
  auto r = Call("r", "hello");
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body.at("model").as_string(), "up-claude");
  EXPECT_EQ(r.Header("x-keel-provider"), "up");
  EXPECT_EQ(r.Header("x-keel-attempts"), "2");
  EXPECT_EQ(r.Header("x-keel-failovers"), "1");

  // Streamed: the failure comes before the first token, so the client never sees it.
  auto s = StreamCall(server_->url(), StreamBody("r", "hello stream"));
  ASSERT_EQ(s.status, 200) << s.raw;
  EXPECT_EQ(s.data.back(), "[DONE]");
  EXPECT_FALSE(s.Text().empty());
  EXPECT_EQ(MockTotal(down.url()), 2);
  EXPECT_EQ(MockTotal(up.url()), 2);
  EXPECT_NE(Metrics().find(
                "keel_llm_requests_total{outcome=\"overloaded\",provider=\"down\",route=\"r\"} 2"),
            std::string::npos)
      << Metrics();
}

TEST_F(AnthropicTest, AnInvalidRequestFailsFast) {
  MockLlm a, b;
  Start(Anthropic("a", a.url()) + Anthropic("b", b.url()),
        "  r: {targets: [{provider: a}, {provider: b}], retry: {max_attempts: 3}}\n");
  auto r = Call("r", "#mock fail=400");
  EXPECT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(r.body.at("error").at("type").as_string(), "invalid_request");
  EXPECT_EQ(MockTotal(a.url()) + MockTotal(b.url()), 1);

  auto s = StreamCall(server_->url(), StreamBody("r", "#mock fail=401"));
  EXPECT_EQ(s.status, 401) << s.raw;
  EXPECT_EQ(json::parse(s.raw).at("error").at("type").as_string(), "auth");
  EXPECT_EQ(MockTotal(a.url()) + MockTotal(b.url()), 2);

  // "prompt is too long": context_length. Neither window is configured (a guess), so b
  // is asked too, once; it fails the same way (docs/gateway.md, "Same target or another").
  auto c = Call("r", "#mock fail=context_length");
  EXPECT_EQ(c.body.at("error").at("type").as_string(), "context_length") << c.raw;
  EXPECT_EQ(MockTotal(a.url()) + MockTotal(b.url()), 4);
}

TEST_F(AnthropicTest, GarbageIsInvalidOutputAndFailsOver) {
  MockLlm a, b;
  Start(Anthropic("a", a.url()) + Anthropic("b", b.url()),
        "  r: {targets: [{provider: a}, {provider: b}]}\n");
  // Each mock garbles its first answer to this prompt: a, then b, then a again answers.
  auto r = Call("r", "#mock malformed times=1");
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.Header("x-keel-attempts"), "3");
  EXPECT_EQ(r.Header("x-keel-provider"), "a");
  const auto m = Metrics();
  for (const char* p : {"a", "b"}) {
    EXPECT_NE(m.find("keel_llm_requests_total{outcome=\"invalid_output\",provider=\"" +
                     std::string(p) + "\",route=\"r\"} 1"),
              std::string::npos)
        << m;
  }
}

TEST_F(AnthropicTest, AStreamThatBreaksAfterItsFirstTokenEndsWithAnErrorEvent) {
  MockLlm a;
  Start(Anthropic("a", a.url()), "  r: {targets: [{provider: a}]}\n");
  for (const char* fault : {"#mock truncate", "#mock reset_after=2"}) {
    auto s = StreamCall(server_->url(), StreamBody("r", std::string("a long answer please\n") + fault));
    ASSERT_TRUE(s.transport_ok) << fault;
    ASSERT_EQ(s.status, 200) << s.raw;
    ASSERT_GE(s.data.size(), 2u) << s.raw;
    EXPECT_NE(s.data.back(), "[DONE]") << fault;
    EXPECT_FALSE(s.Text().empty()) << fault;
    auto last = json::parse(s.data.back());
    ASSERT_TRUE(last.as_object().contains("error")) << s.raw;
    EXPECT_NE(std::string(last.at("error").at("message").as_string()).find("after its first token"),
              std::string::npos)
        << s.raw;
  }
  const auto m = Metrics();
  EXPECT_NE(
      m.find("keel_llm_requests_total{outcome=\"invalid_output\",provider=\"a\",route=\"r\"} 1"),
      std::string::npos)
      << m;
}

TEST_F(AnthropicTest, AStreamWithNoFirstByteInTimeFailsOver) {
  MockLlm slow;
  Start("  slow: {type: anthropic, base_url: " + slow.url() +
            "/v1, timeout: {connect: 1s, first_byte: 300ms, total: 10s}}\n" +
            "  local: {type: mock, model: local-model}\n",
        "  r: {targets: [{provider: slow}, {provider: local}]}\n");
  const auto t0 = std::chrono::steady_clock::now();
  auto s = StreamCall(server_->url(), StreamBody("r", "#mock first_byte=5000"));
  ASSERT_EQ(s.status, 200) << s.raw;
  EXPECT_EQ(s.data.back(), "[DONE]");
  EXPECT_EQ(json::parse(s.data.front()).at("model").as_string(), "local-model");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(4));
  const auto m = Metrics();
  EXPECT_NE(m.find("keel_llm_requests_total{outcome=\"timeout\",provider=\"slow\",route=\"r\"} 1"),
            std::string::npos)
      << m;
}

// An OpenAI tool-call round trip through an Anthropic target: tools and tool_choice go
// out as Anthropic's, tool_use comes back as tool_calls (whole and streamed), and the
// tool's result goes out as a tool_result, after which the mock answers text.
TEST_F(AnthropicTest, ToolCallsRoundTripThroughAnAnthropicTarget) {
  MockLlm mock;
  Start(Anthropic("claude", mock.url()), "  smart: {targets: [{provider: claude}]}\n");
  json::value body = Chat("smart", "weather in Paris?");
  body.as_object()["tools"] = json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}])");
  body.as_object()["tool_choice"] = "required";
  auto r = Call(body);
  ASSERT_EQ(r.status, 200) << r.raw;
  const auto& choice = r.body.at("choices").as_array().at(0);
  EXPECT_EQ(choice.at("finish_reason").as_string(), "tool_calls");
  EXPECT_TRUE(choice.at("message").at("content").is_null()) << r.raw;
  const auto& call = choice.at("message").at("tool_calls").as_array().at(0);
  EXPECT_EQ(call.at("function").at("name").as_string(), "get_weather");
  EXPECT_TRUE(json::parse(call.at("function").at("arguments").as_string()).at("city").is_string());

  // Streamed: the same call as deltas.
  json::value streamed = body;
  streamed.as_object()["stream"] = true;
  auto s = StreamCall(server_->url(), streamed);
  ASSERT_EQ(s.status, 200) << s.raw;
  std::string name, args, finish;
  for (const auto& d : s.data) {
    if (d == "[DONE]") continue;
    const auto v = json::parse(d);
    if (v.at("choices").as_array().empty()) continue;
    const auto& c = v.at("choices").as_array()[0];
    if (c.at("finish_reason").is_string()) finish = c.at("finish_reason").as_string();
    if (const auto* calls = c.at("delta").as_object().if_contains("tool_calls")) {
      const auto& f = calls->as_array()[0].at("function").as_object();
      if (const auto* n = f.if_contains("name")) name += n->as_string();
      if (const auto* a = f.if_contains("arguments")) args += a->as_string();
    }
  }
  EXPECT_EQ(finish, "tool_calls");
  EXPECT_EQ(name, "get_weather");
  EXPECT_EQ(args, call.at("function").at("arguments").as_string());

  // The tool's result: the mock (which sees a tool_result) answers text.
  json::value next = Chat("smart", "weather in Paris?");
  next.as_object()["tools"] = body.at("tools");
  auto& messages = next.as_object()["messages"].as_array();
  messages.push_back(choice.at("message"));
  messages.push_back(json::object{{"role", "tool"}, {"tool_call_id", call.at("id")}, {"content", "sunny"}});
  auto after = Call(next);
  ASSERT_EQ(after.status, 200) << after.raw;
  EXPECT_EQ(after.body.at("choices").as_array()[0].at("finish_reason").as_string(), "stop") << after.raw;
  EXPECT_TRUE(after.body.at("choices").as_array()[0].at("message").at("content").is_string());
}

}  // namespace
}  // namespace keel::testing
