// Untrusted values reaching the store and the step runners (issue 10): run inputs, tool
// answers, model answers and template results that break the JSON codec's rules, regular
// expressions on long text, and values rendered into an http step's headers and URL. Each
// test also shows that the node goes on serving other runs afterwards.

#include <gtest/gtest.h>

#include <mutex>

#include "helpers.h"
#include "keel/net/http_server.h"
#include "keel/testing/assert.h"

namespace keel::testing {
namespace {

using namespace std::chrono_literals;

// A tool whose answer is chosen by its path; records every request it gets.
class HostileTool {
 public:
  HostileTool() {
    auto s = net::HttpServer::Create(
        net::ServerOptions{}, [this](net::HttpRequest&& req, net::Responder respond) {
          net::HttpResponse r;
          {
            std::lock_guard lock(mu_);
            requests_.push_back(req);
          }
          r.headers.emplace_back("Content-Type", "application/json");
          if (req.path == "/inf") {
            r.body = R"({"v": 1e400})";
          } else if (req.path == "/binary") {
            r.headers.clear();
            r.headers.emplace_back("Content-Type", "application/octet-stream");
            r.body = std::string("\xff\xfe\x00\x01text", 8);
          } else if (req.path == "/big") {
            r.body = "\"" + std::string(1 << 20, 'x') + "\"";
          } else {
            r.body = json::serialize(json::object{{"path", req.path}, {"query", req.query}});
          }
          respond(std::move(r));
        });
    EXPECT_OK(s);
    if (s.ok()) server_ = std::move(s).value();
  }
  ~HostileTool() {
    if (server_) server_->Stop();
  }
  uint16_t port() const { return server_ ? server_->port() : 0; }
  std::vector<net::HttpRequest> Requests() {
    std::lock_guard lock(mu_);
    return requests_;
  }

 private:
  std::mutex mu_;
  std::vector<net::HttpRequest> requests_;  // GUARDED_BY(mu_)
  std::unique_ptr<net::HttpServer> server_;
};

std::string Pipelines(uint16_t tool_port) {
  std::string yaml = R"YAML(  echo:
    steps:
      - id: t
        transform: {got: "{{input}}"}
  deepen:
    steps:
      - id: t
        transform: {a: {b: {c: {d: {e: {f: {g: {h: {i: {j: "{{input.v}}"}}}}}}}}}}
  tool:
    retry: {max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms}
    steps:
      - id: call
        http: {url: "http://127.0.0.1:TOOL/{{input.path}}?q={{input.q}}", method: GET, max_response_bytes: 4096}
  header:
    steps:
      - id: call
        http: {url: "http://127.0.0.1:TOOL/echo", method: GET, headers: {X-Trace: "t-{{input.trace}}"}}
  raw:
    steps:
      - id: call
        http: {url: "http://127.0.0.1:TOOL/{{{input.path}}}", method: GET}
  pick:
    steps:
      - id: route
        choice:
          cases:
            - when: {value: "{{input.text}}", matches: "^(a|aa)+$"}
              goto: matched
          default: other
      - id: matched
        transform: {branch: matched}
        next: end
      - id: other
        transform: {branch: other}
  structured:
    retry: {max_attempts: 1}
    steps:
      - id: ask
        llm: {route: main, messages: [{role: user, content: "{{input.prompt}}"}], response_format: {type: json_object}, repair_attempts: 0}
)YAML";
  for (auto at = yaml.find("TOOL"); at != std::string::npos; at = yaml.find("TOOL", at)) {
    yaml.replace(at, 4, std::to_string(tool_port));
  }
  return yaml;
}

class UntrustedInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(tool_.port(), 0);
    server_ = std::make_unique<KeelServer>(dir_.path(),
                                           MockBackedConfig(mock_.url(), Pipelines(tool_.port())));
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }
  const std::string& url() const { return server_->url(); }

  JsonResponse SubmitRaw(const std::string& body) {
    return HttpPost(url() + "/v1/runs", body, {{"Content-Type", "application/json"}});
  }
  std::string Submit(const std::string& pipeline, json::value input) {
    auto r = HttpPostJson(url() + "/v1/runs",
                          json::object{{"pipeline", pipeline}, {"input", std::move(input)}});
    EXPECT_EQ(r.status, 201) << r.raw;
    return r.status == 201 ? std::string(r.body.at("id").as_string()) : std::string("none");
  }
  json::value Finish(const std::string& id) {
    auto run = WaitForTerminal(url(), id);
    EXPECT_TRUE(run.is_object()) << "run " << id << " never ended";
    return run;
  }
  static std::string Status(const json::value& run) {
    return run.is_object() ? std::string(run.at("status").as_string()) : "";
  }
  static std::string ErrorType(const json::value& run) {
    const auto* e = run.as_object().if_contains("error");
    return e && e->is_object() ? std::string(e->at("type").as_string()) : "";
  }
  static std::string ErrorMessage(const json::value& run) {
    const auto* e = run.as_object().if_contains("error");
    return e && e->is_object() ? std::string(e->at("message").as_string()) : "";
  }
  // The node still leases, runs and lists: a normal run succeeds and GET /v1/runs is 200.
  void ExpectNodeServes() {
    const std::string id = Submit("echo", json::object{{"ok", true}});
    EXPECT_EQ(Status(Finish(id)), "succeeded");
    EXPECT_EQ(HttpGet(url() + "/v1/runs?limit=100").status, 200);
    auto metrics = HttpGet(url() + "/metrics");
    EXPECT_NE(metrics.raw.find("keel_storage_up 1"), std::string::npos);
  }

  TempDir dir_;
  HostileTool tool_;
  MockLlm mock_;
  std::unique_ptr<KeelServer> server_;
};

std::string Nested(int depth, const std::string& leaf) {
  std::string s;
  for (int i = 0; i < depth; ++i) s += "{\"a\":";
  s += leaf;
  for (int i = 0; i < depth; ++i) s += "}";
  return s;
}

TEST_F(UntrustedInputTest, NonFiniteAndOverlongNumbersAreRefusedAtTheEdgeNamingThePath) {
  for (const char* n : {"1e400", "-1e400", "123456789012345678901234567890"}) {
    auto r = SubmitRaw(std::string(R"({"pipeline": "echo", "input": {"m": )") + n + "}}");
    EXPECT_EQ(r.status, 400) << n << ": " << r.raw;
    ASSERT_TRUE(r.body.is_object()) << r.raw;
    EXPECT_EQ(r.body.at("error").at("param"), "input.m") << r.raw;
    EXPECT_EQ(r.raw.find("Infinity"), std::string::npos) << r.raw;
  }
  // Integers at the edges of 64 bits are kept exactly, end to end.
  auto r = SubmitRaw(
      R"({"pipeline": "echo", "input": {"u": 18446744073709551615, "i": -9223372036854775808}})");
  ASSERT_EQ(r.status, 201) << r.raw;
  auto run = Finish(std::string(r.body.at("id").as_string()));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output").at("got").at("u").as_uint64(), 18446744073709551615ULL);
  EXPECT_EQ(run.at("output").at("got").at("i").as_int64(), INT64_MIN);
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, WhatTheEdgeAcceptsTheStoreReadsBack) {
  // 60 levels: accepted, stored with the run's envelope around it, read back, listed.
  auto ok = SubmitRaw(R"({"pipeline": "echo", "input": )" + Nested(60, "1") + "}");
  ASSERT_EQ(ok.status, 201) << ok.raw;
  const std::string id(ok.body.at("id").as_string());
  EXPECT_EQ(Status(Finish(id)), "succeeded");
  auto got = HttpGet(url() + "/v1/runs/" + id);
  EXPECT_EQ(got.status, 200) << got.raw.substr(0, 300);
  EXPECT_EQ(got.raw.find("/usr/include"), std::string::npos);
  // Past the limit: a 400 that says so, before anything is stored.
  auto deep = SubmitRaw(R"({"pipeline": "echo", "input": )" + Nested(70, "1") + "}");
  EXPECT_EQ(deep.status, 400) << deep.raw.substr(0, 300);
  EXPECT_NE(deep.raw.find("deeper than 64"), std::string::npos) << deep.raw.substr(0, 300);
  EXPECT_EQ(deep.raw.find("/usr/include"), std::string::npos);
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, ATemplateThatNestsPastTheLimitFailsItsStepNotTheStore) {
  // 60 levels of input, 10 more from the transform: the step fails as invalid_output.
  const std::string id = Submit("deepen", json::object{{"v", *ParseJson(Nested(60, "1"))}});
  auto run = Finish(id);
  EXPECT_EQ(Status(run), "failed") << json::serialize(run).substr(0, 400);
  EXPECT_EQ(ErrorType(run), "invalid_output") << ErrorMessage(run);
  EXPECT_NE(ErrorMessage(run).find("deeper than"), std::string::npos) << ErrorMessage(run);
  EXPECT_EQ(HttpGet(url() + "/v1/runs/" + id).status, 200);
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, AToolAnsweringAnInfinityFailsItsStep) {
  const std::string id = Submit("tool", json::object{{"path", "inf"}, {"q", "x"}});
  auto run = Finish(id);
  EXPECT_NE(Status(run), "succeeded");
  EXPECT_EQ(ErrorType(run), "invalid_output") << ErrorMessage(run);
  EXPECT_EQ(HttpGet(url() + "/v1/runs/" + id).status, 200);
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, AToolsBinaryAnswerIsKeptInBase64) {
  const std::string id = Submit("tool", json::object{{"path", "binary"}, {"q", "x"}});
  auto run = Finish(id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  // "\xff\xfe\x00\x01text" in base64.
  EXPECT_EQ(run.at("output"), "//4AAXRleHQ=") << json::serialize(run);
  const auto& step = run.at("steps").at(0);
  EXPECT_EQ(step.at("encoding"), "base64") << json::serialize(step);
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, AnAnswerPastMaxResponseBytesFailsForGood) {
  const std::string id = Submit("tool", json::object{{"path", "big"}, {"q", "x"}});
  auto run = Finish(id);
  EXPECT_EQ(Status(run), "failed");
  EXPECT_EQ(ErrorType(run), "invalid_output");
  EXPECT_NE(ErrorMessage(run).find("max_response_bytes"), std::string::npos) << ErrorMessage(run);
  // For good: one call, no retry.
  int calls = 0;
  for (const auto& r : tool_.Requests()) calls += r.path == "/big";
  EXPECT_EQ(calls, 1);
}

TEST_F(UntrustedInputTest, ValuesRenderedIntoAUrlAreEncodedForTheirPart) {
  const std::string id = Submit("tool", json::object{{"path", "a/../b"}, {"q", "v&admin=1#frag"}});
  auto run = Finish(id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output").at("path"), "/a%2F..%2Fb") << json::serialize(run);
  EXPECT_EQ(run.at("output").at("query"), "q=v%26admin%3D1%23frag") << json::serialize(run);
  // {{{raw}}} inserts a pre-encoded part as it is.
  const std::string raw = Submit("raw", json::object{{"path", "x/y?z=1"}});
  auto r = Finish(raw);
  ASSERT_EQ(Status(r), "succeeded") << json::serialize(r);
  EXPECT_EQ(r.at("output").at("path"), "/x/y");
  EXPECT_EQ(r.at("output").at("query"), "z=1");
}

TEST_F(UntrustedInputTest, CrOrLfInARenderedHeaderFailsTheStepAndSendsNothing) {
  const std::string id =
      Submit("header", json::object{{"trace", "x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a"}});
  auto run = Finish(id);
  EXPECT_EQ(Status(run), "failed");
  EXPECT_EQ(ErrorType(run), "invalid_request") << ErrorMessage(run);
  for (const auto& r : tool_.Requests()) {
    EXPECT_NE(r.path, "/smuggled");
    EXPECT_NE(r.path, "/echo") << "the request went out";
  }
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, AMatchOnALongTextNeitherCrashesNorStallsTheNode) {
  // 50 KB: libstdc++'s std::regex overflows the stack on this; Boost.Regex matches it or
  // gives up, and either way the node goes on.
  const std::string id = Submit("pick", json::object{{"text", std::string(50'000, 'a')}});
  const std::string other = Submit("echo", json::object{{"n", 1}});
  auto run = Finish(id);
  EXPECT_TRUE(Status(run) == "succeeded" || Status(run) == "failed")
      << json::serialize(run).substr(0, 300);
  EXPECT_EQ(Status(Finish(other)), "succeeded");
  const std::string short_text = Submit("pick", json::object{{"text", "aaa"}});
  auto s = Finish(short_text);
  ASSERT_EQ(Status(s), "succeeded");
  EXPECT_EQ(s.at("output").at("branch"), "matched");
  ExpectNodeServes();
}

TEST_F(UntrustedInputTest, AModelAnsweringAnInfinityFailsItsStructuredStep) {
  const std::string id =
      Submit("structured", json::object{{"prompt", "#mock reply={\"v\": -1e400}"}});
  auto run = Finish(id);
  EXPECT_NE(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_output") << ErrorMessage(run);
  EXPECT_EQ(HttpGet(url() + "/v1/runs/" + id).status, 200);
  ExpectNodeServes();
}

}  // namespace
}  // namespace keel::testing
