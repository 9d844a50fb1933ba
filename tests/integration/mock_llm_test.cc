// keel mock-llm over real HTTP.

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace keel::testing
