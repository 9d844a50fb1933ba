// The runs API against a real `keel serve` (built-in default config: the in-process mock
// provider and the example pipelines) on an ephemeral loopback port.

#include <gtest/gtest.h>

#include <set>

#include "helpers.h"

namespace keel::testing {
namespace {

class ApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    server_ = new KeelServer(dir_->path(), "");
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }
  static void TearDownTestSuite() {
    delete server_;
    delete dir_;
  }
  std::string Url(const std::string& path) { return server_->url() + path; }
  JsonResponse Submit(const json::value& body, net::Headers h = {}) { return HttpPostJson(Url("/v1/runs"), body, h); }
  static void ExpectError(const JsonResponse& r, int status, std::string_view type, std::string_view needle) {
    EXPECT_EQ(r.status, status) << r.raw;
    ASSERT_TRUE(r.body.is_object()) << r.raw;
    const auto& err = r.body.at("error").as_object();
    EXPECT_EQ(err.at("type").as_string(), type) << r.raw;
    EXPECT_NE(std::string(err.at("message").as_string()).find(needle), std::string::npos) << r.raw;
  }

  static TempDir* dir_;
  static KeelServer* server_;
};
TempDir* ApiTest::dir_ = nullptr;
KeelServer* ApiTest::server_ = nullptr;

TEST_F(ApiTest, SubmittedRunSucceedsWithEveryStepCheckpointed) {
  auto r = Submit(json::object{{"pipeline", "summarize"}, {"input", {{"text", "a submitted text"}}}});
  ASSERT_EQ(r.status, 201) << r.raw;
  EXPECT_EQ(r.Header("location"), "/v1/runs/" + std::string(r.body.at("id").as_string()));
  const std::string id(r.body.at("id").as_string());
  EXPECT_EQ(id.rfind("run_", 0), 0u);
  auto run = WaitForTerminal(server_->url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const auto& steps = run.at("steps").as_array();
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0].at("id").as_string(), "outline");
  EXPECT_EQ(steps[2].at("id").as_string(), "result");
  for (const auto& s : steps) {
    EXPECT_EQ(s.at("status").as_string(), "succeeded");
    EXPECT_EQ(s.at("attempts").as_int64(), 1);
    EXPECT_FALSE(s.at("started_at").is_null());
    EXPECT_FALSE(s.at("finished_at").is_null());
  }
  // The transform saw the llm steps' text.
  EXPECT_EQ(run.at("output").at("outline"), steps[0].at("text"));
  EXPECT_NE(std::string(run.at("output").at("outline").as_string()).find("a submitted text"), std::string::npos);
  EXPECT_EQ(run.at("output").at("model").as_string(), "mock-1");
}

TEST_F(ApiTest, EventsTellTheRunsHistoryInOrder) {
  auto r = Submit(json::object{{"pipeline", "echo"}, {"input", {{"x", 1}}}});
  ASSERT_EQ(r.status, 201);
  const std::string id(r.body.at("id").as_string());
  ASSERT_EQ(Status(WaitForTerminal(server_->url(), id)), "succeeded");
  auto ev = HttpGet(Url("/v1/runs/" + id + "/events"));
  ASSERT_EQ(ev.status, 200) << ev.raw;
  std::vector<std::string> types;
  int64_t prev = 0;
  for (const auto& e : ev.body.at("data").as_array()) {
    types.emplace_back(e.at("type").as_string());
    EXPECT_GT(e.at("seq").as_int64(), prev);
    prev = e.at("seq").as_int64();
  }
  EXPECT_EQ(types, (std::vector<std::string>{"RunSubmitted", "RunLeased", "StepStarted", "StepSucceeded", "RunSucceeded"}));
  // after= skips what was seen.
  auto tail = HttpGet(Url("/v1/runs/" + id + "/events?after=" + std::to_string(prev - 1)));
  ASSERT_EQ(tail.status, 200);
  ASSERT_EQ(tail.body.at("data").as_array().size(), 1u);
  EXPECT_EQ(tail.body.at("data").as_array()[0].at("type").as_string(), "RunSucceeded");
}

TEST_F(ApiTest, IdempotencyKeyReturnsTheSameRunAndRefusesAnotherBody) {
  const json::value body = json::object{{"pipeline", "echo"}, {"input", {{"a", 1}, {"b", 2}}}};
  auto first = Submit(body, {{"Idempotency-Key", "idem-1"}});
  ASSERT_EQ(first.status, 201) << first.raw;
  // Same content, keys in another order: the same request.
  auto again = HttpPost(Url("/v1/runs"), R"({"input": {"b": 2, "a": 1}, "pipeline": "echo"})", {{"Idempotency-Key", "idem-1"}});
  ASSERT_EQ(again.status, 200) << again.raw;
  EXPECT_EQ(again.body.at("id"), first.body.at("id"));
  EXPECT_EQ(again.Header("idempotent-replayed"), "true");
  auto other = Submit(json::object{{"pipeline", "echo"}, {"input", {{"a", 2}}}}, {{"Idempotency-Key", "idem-1"}});
  ExpectError(other, 409, "conflict", "idem-1");
  // Without a key, two submits are two runs.
  auto x = Submit(body), y = Submit(body);
  ASSERT_EQ(x.status, 201);
  ASSERT_EQ(y.status, 201);
  EXPECT_NE(x.body.at("id"), y.body.at("id"));
}

TEST_F(ApiTest, ListFiltersAndPaginatesNewestFirst) {
  std::set<std::string> mine;
  for (int i = 0; i < 7; ++i) {
    auto r = Submit(json::object{{"pipeline", "triage"}, {"input", {{"ticket", "t" + std::to_string(i)}}}});
    ASSERT_EQ(r.status, 201);
    mine.insert(std::string(r.body.at("id").as_string()));
  }
  for (const auto& id : mine) ASSERT_EQ(Status(WaitForTerminal(server_->url(), id)), "succeeded");
  std::set<std::string> seen;
  std::string cursor;
  std::string prev_id = "~";
  int pages = 0;
  do {
    auto r = HttpGet(Url("/v1/runs?pipeline=triage&status=succeeded&limit=3" + (cursor.empty() ? "" : "&cursor=" + cursor)));
    ASSERT_EQ(r.status, 200) << r.raw;
    for (const auto& run : r.body.at("data").as_array()) {
      const std::string id(run.at("id").as_string());
      EXPECT_LT(id, prev_id) << "not newest first";
      prev_id = id;
      EXPECT_EQ(run.at("pipeline").as_string(), "triage");
      EXPECT_TRUE(seen.insert(id).second) << "run listed twice: " << id;
      EXPECT_FALSE(run.as_object().contains("steps"));
    }
    cursor = r.body.at("next_cursor").is_null() ? "" : std::string(r.body.at("next_cursor").as_string());
    EXPECT_EQ(r.body.at("has_more").as_bool(), !cursor.empty());
    ++pages;
  } while (!cursor.empty() && pages < 10);
  for (const auto& id : mine) EXPECT_TRUE(seen.count(id)) << id;
  EXPECT_GE(pages, 3);
}

TEST_F(ApiTest, BadInputGetsAClearErrorAndTheServerKeepsServing) {
  ExpectError(HttpPost(Url("/v1/runs"), "{\"pipeline\": "), 400, "invalid_request", "invalid JSON");
  ExpectError(HttpPost(Url("/v1/runs"), ""), 400, "invalid_request", "empty");
  ExpectError(HttpPost(Url("/v1/runs"), "[1,2]"), 400, "invalid_request", "JSON object");
  ExpectError(Submit(json::object{{"input", json::object{}}}), 400, "invalid_request", "missing field \"pipeline\"");
  ExpectError(Submit(json::object{{"pipeline", 7}}), 400, "invalid_request", "must be a string");
  ExpectError(Submit(json::object{{"pipeline", "echo"}, {"input", "text"}}), 400, "invalid_request", "\"input\" must be a JSON object");
  ExpectError(Submit(json::object{{"pipeline", "echo"}, {"inptu", json::object{}}}), 400, "invalid_request", "unknown field \"inptu\"");
  auto unknown = Submit(json::object{{"pipeline", "nope"}});
  ExpectError(unknown, 404, "not_found", "unknown pipeline \"nope\"");
  EXPECT_EQ(unknown.body.at("error").at("param").as_string(), "pipeline");
  ExpectError(HttpPost(Url("/v1/runs"), std::string(2 << 20, 'x')), 413, "payload_too_large", "larger than the limit");
  ExpectError(HttpGet(Url("/v1/runs/run_DOESNOTEXIST")), 404, "not_found", "run_DOESNOTEXIST");
  ExpectError(HttpGet(Url("/v1/runs/run_DOESNOTEXIST/events")), 404, "not_found", "run_DOESNOTEXIST");
  ExpectError(HttpPost(Url("/v1/runs/run_DOESNOTEXIST/cancel"), ""), 404, "not_found", "run_DOESNOTEXIST");
  ExpectError(HttpGet(Url("/v1/runs?status=done")), 400, "invalid_request", "unknown status \"done\"");
  ExpectError(HttpGet(Url("/v1/runs?limit=0")), 400, "invalid_request", "limit");
  ExpectError(HttpGet(Url("/v1/runs?limit=abc")), 400, "invalid_request", "limit");
  ExpectError(HttpGet(Url("/v1/runs?cursor=zzz")), 400, "invalid_request", "cursor");
  ExpectError(HttpGet(Url("/v2/anything")), 404, "not_found", "no such endpoint");
  auto m = HttpGet(Url("/v1/runs/x/cancel"));
  ExpectError(m, 405, "invalid_request", "not allowed");
  EXPECT_EQ(m.Header("allow"), "POST");
  ExpectError(Submit(json::object{{"pipeline", "echo"}}, {{"Idempotency-Key", std::string(300, 'k')}}), 400,
              "invalid_request", "Idempotency-Key");
  // Still serving, and a good request still works end to end.
  auto ok = Submit(json::object{{"pipeline", "echo"}, {"input", {{"after", "bad input"}}}});
  ASSERT_EQ(ok.status, 201) << ok.raw;
  EXPECT_EQ(Status(WaitForTerminal(server_->url(), std::string(ok.body.at("id").as_string()))), "succeeded");
}

TEST_F(ApiTest, CancelEndsAQueuedOrRunningRunButNotAnEndedOne) {
  // A run whose first model call takes 20 s is still running when cancelled.
  auto r = Submit(json::object{{"pipeline", "summarize"}, {"input", {{"text", "#mock sleep=20000"}}}});
  ASSERT_EQ(r.status, 201);
  const std::string id(r.body.at("id").as_string());
  auto c = HttpPost(Url("/v1/runs/" + id + "/cancel"), "");
  ASSERT_EQ(c.status, 200) << c.raw;
  EXPECT_EQ(Status(c.body), "cancelled");
  EXPECT_EQ(Status(HttpGet(Url("/v1/runs/" + id)).body), "cancelled");
  auto again = HttpPost(Url("/v1/runs/" + id + "/cancel"), "");
  EXPECT_EQ(again.status, 409) << again.raw;
  auto redrive = HttpPost(Url("/v1/runs/" + id + "/redrive"), "");
  EXPECT_EQ(redrive.status, 409) << redrive.raw;
}

TEST_F(ApiTest, HealthReadinessAndMetrics) {
  auto h = HttpGet(Url("/healthz"));
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.body.at("status").as_string(), "ok");
  auto ready = HttpGet(Url("/readyz"));
  EXPECT_EQ(ready.status, 200) << ready.raw;
  auto r = Submit(json::object{{"pipeline", "echo"}, {"input", json::object{}}});
  ASSERT_EQ(Status(WaitForTerminal(server_->url(), std::string(r.body.at("id").as_string()))), "succeeded");
  auto m = HttpGet(Url("/metrics"));
  ASSERT_EQ(m.status, 200);
  EXPECT_NE(m.Header("content-type").find("text/plain"), std::string_view::npos);
  for (const char* needle : {"keel_runs{status=\"succeeded\"}", "keel_queue_depth{state=\"ready\"}", "keel_dlq_size",
                             "keel_step_duration_seconds_bucket", "keel_runs_submitted_total{pipeline=\"echo\"}",
                             "keel_http_requests_total"}) {
    EXPECT_NE(m.raw.find(needle), std::string::npos) << needle;
  }
}

}  // namespace
}  // namespace keel::testing
