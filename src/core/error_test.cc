#include "keel/core/error.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

namespace keel {
namespace {

struct CodeCase {
  ErrorCode code;
  std::string_view name;
  bool retryable;
  int http_status;
};

const std::vector<CodeCase>& AllCodes() {
  static const std::vector<CodeCase> kCases = {
      {ErrorCode::kRateLimited, "rate_limited", true, 429},
      {ErrorCode::kOverloaded, "overloaded", true, 503},
      {ErrorCode::kServerError, "server_error", true, 502},
      {ErrorCode::kTimeout, "timeout", true, 504},
      {ErrorCode::kNetwork, "network", true, 502},
      {ErrorCode::kContextLength, "context_length", false, 400},
      {ErrorCode::kContentPolicy, "content_policy", false, 400},
      {ErrorCode::kInvalidRequest, "invalid_request", false, 400},
      {ErrorCode::kAuth, "auth", false, 401},
      {ErrorCode::kInvalidOutput, "invalid_output", true, 502},
      {ErrorCode::kNotFound, "not_found", false, 404},
      {ErrorCode::kConflict, "conflict", false, 409},
      {ErrorCode::kLeaseLost, "lease_lost", true, 409},
      {ErrorCode::kPayloadTooLarge, "payload_too_large", false, 413},
      {ErrorCode::kQueueFull, "queue_full", false, 429},
      {ErrorCode::kCancelled, "cancelled", false, 409},
      {ErrorCode::kUnavailable, "unavailable", true, 503},
      {ErrorCode::kWorkerLost, "worker_lost", false, 500},
      {ErrorCode::kInternal, "internal", false, 500},
  };
  return kCases;
}

TEST(ErrorCodeTest, TableCoversEveryCode) {
  // kInternal is the last enumerator; every value up to it must be in the table.
  std::set<int> seen;
  for (const auto& c : AllCodes()) seen.insert(static_cast<int>(c.code));
  EXPECT_EQ(seen.size(), AllCodes().size());
  EXPECT_EQ(static_cast<int>(seen.size()), static_cast<int>(ErrorCode::kInternal) + 1);
}

TEST(ErrorCodeTest, NameRoundTripsForEveryCode) {
  std::set<std::string_view> names;
  for (const auto& c : AllCodes()) {
    EXPECT_EQ(ErrorCodeName(c.code), c.name);
    const auto back = ErrorCodeFromName(c.name);
    ASSERT_TRUE(back.has_value()) << c.name;
    EXPECT_EQ(*back, c.code) << c.name;
    names.insert(ErrorCodeName(c.code));
  }
  EXPECT_EQ(names.size(), AllCodes().size()) << "two codes share a wire name";
}

TEST(ErrorCodeTest, UnknownNameIsNullopt) {
  EXPECT_FALSE(ErrorCodeFromName("").has_value());
  EXPECT_FALSE(ErrorCodeFromName("no_such_code").has_value());
  EXPECT_FALSE(ErrorCodeFromName("RATE_LIMITED").has_value());  // names are case-sensitive
  EXPECT_FALSE(ErrorCodeFromName("rate_limited ").has_value());
}

TEST(ErrorCodeTest, IsRetryable) {
  for (const auto& c : AllCodes()) EXPECT_EQ(IsRetryable(c.code), c.retryable) << c.name;
}

TEST(ErrorCodeTest, HttpStatusFor) {
  for (const auto& c : AllCodes()) EXPECT_EQ(HttpStatusFor(c.code), c.http_status) << c.name;
}

TEST(ErrorCodeTest, ClassifyHttpStatusFollowsTheTaxonomy) {
  // DESIGN.md, "Error taxonomy", and the comments of error.h.
  EXPECT_EQ(ClassifyHttpStatus(429), ErrorCode::kRateLimited);
  EXPECT_EQ(ClassifyHttpStatus(401), ErrorCode::kAuth);
  EXPECT_EQ(ClassifyHttpStatus(403), ErrorCode::kAuth);
  EXPECT_EQ(ClassifyHttpStatus(500), ErrorCode::kServerError);
  EXPECT_EQ(ClassifyHttpStatus(502), ErrorCode::kServerError);
  EXPECT_EQ(ClassifyHttpStatus(503), ErrorCode::kOverloaded);
  EXPECT_EQ(ClassifyHttpStatus(504), ErrorCode::kServerError);
  EXPECT_EQ(ClassifyHttpStatus(529), ErrorCode::kOverloaded);
  EXPECT_EQ(ClassifyHttpStatus(400), ErrorCode::kInvalidRequest);
  EXPECT_EQ(ClassifyHttpStatus(404), ErrorCode::kInvalidRequest);
  EXPECT_EQ(ClassifyHttpStatus(422), ErrorCode::kInvalidRequest);
  EXPECT_EQ(ClassifyHttpStatus(408), ErrorCode::kTimeout);
  EXPECT_EQ(ClassifyHttpStatus(599), ErrorCode::kServerError);
}

TEST(ErrorCodeTest, ClassifiedUpstreamFailuresAreRetryableExactlyWhenTheyShouldBe) {
  for (int status : {429, 500, 502, 503, 504, 529}) {
    EXPECT_TRUE(IsRetryable(ClassifyHttpStatus(status))) << status;
  }
  for (int status : {400, 401, 403, 404, 422}) {
    EXPECT_FALSE(IsRetryable(ClassifyHttpStatus(status))) << status;
  }
}

TEST(ErrorTest, ConstructorKeepsFields) {
  const Error e(ErrorCode::kInvalidRequest, "bad field", "input.name");
  EXPECT_EQ(e.code, ErrorCode::kInvalidRequest);
  EXPECT_EQ(e.message, "bad field");
  EXPECT_EQ(e.param, "input.name");
  EXPECT_FALSE(e.retry_after.has_value());
  const Error d;
  EXPECT_EQ(d.code, ErrorCode::kInternal);
}

}  // namespace
}  // namespace keel

namespace keel {
namespace {

TEST(FailsOverTest, OnlyTheClassesThatAnotherTargetMayAnswerFailOver) {
  for (ErrorCode c : {ErrorCode::kRateLimited, ErrorCode::kOverloaded, ErrorCode::kServerError,
                      ErrorCode::kTimeout, ErrorCode::kNetwork, ErrorCode::kInvalidOutput}) {
    EXPECT_TRUE(FailsOver(c)) << ErrorCodeName(c);
  }
  for (ErrorCode c : {ErrorCode::kInvalidRequest, ErrorCode::kAuth, ErrorCode::kContextLength,
                      ErrorCode::kContentPolicy, ErrorCode::kNotFound, ErrorCode::kUnavailable,
                      ErrorCode::kLeaseLost, ErrorCode::kInternal}) {
    EXPECT_FALSE(FailsOver(c)) << ErrorCodeName(c);
  }
}

}  // namespace
}  // namespace keel
