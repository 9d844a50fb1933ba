// The pipeline step language through real processes: a keel serve whose provider is a
// keel mock-llm, plus an in-process HTTP server standing in for a tool, all on ephemeral
// loopback ports. Each test drives runs over the HTTP API (and the CLI) and checks what
// the run records and what the upstreams saw.

#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <mutex>

#include "helpers.h"
#include "keel/net/http_server.h"
#include "keel/testing/assert.h"

namespace keel::testing {
namespace {

using namespace std::chrono_literals;

// The pipelines under test, appended to MockBackedConfig's "pipelines:". TOOL_PORT is the
// recording server's port. `version` changes the "versioned" pipeline (see Versioning).
std::string Pipelines(uint16_t tool_port, int version = 1) {
  std::string yaml = R"YAML(
  branch:
    steps:
      - id: decide
        choice:
          cases:
            - when: {value: "{{input.kind}}", equals: a}
              goto: on_a
            - when: {all: [{value: "{{input.n}}", gt: 10}, {not: {value: "{{input.vip}}", equals: true}}]}
              goto: on_big
            - when: {value: "{{input.flag}}", exists: true}
              goto: on_flag
          default: on_default
      - id: on_a
        transform: {branch: a}
        next: end
      - id: on_big
        transform: {branch: big, n: "{{input.n}}"}
        next: end
      - id: on_flag
        transform: {branch: flag}
        next: after
      - id: on_default
        transform: {branch: default}
      - id: after
        transform: {via: "{{steps.decide.output.branch}}"}
  recover:
    steps:
      - id: ask
        llm: {route: main, messages: [{role: user, content: "recover {{input.id}}\n{{input.prompt}}"}]}
        on_error: {output: {fallback: true}}
      - id: use
        transform: {got: "{{steps.ask.output}}"}
  recover_goto:
    steps:
      - id: ask
        llm: {route: main, messages: [{role: user, content: "goto {{input.id}}\n{{input.prompt}}"}]}
        on_error: {goto: rescue}
      - id: normal
        transform: {path: normal, text: "{{steps.ask.text}}"}
        next: end
      - id: rescue
        transform: {path: rescue, error: "{{steps.ask.error.type}}"}
  checked:
    steps:
      - id: check
        validate:
          value: "{{input.order}}"
          schema: {type: object, required: [qty], properties: {qty: {type: integer, minimum: 1}}}
      - id: done
        transform: {qty: "{{steps.check.output.qty}}"}
  structured:
    steps:
      - id: extract
        llm:
          route: main
          messages: [{role: user, content: "extract {{input.id}}\n{{input.hint}}"}]
          response_format:
            type: json_schema
            schema: {type: object, required: [name, score], properties: {name: {type: string, minLength: 2}, score: {type: integer, minimum: 3}}}
  strict:
    retry: {max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms}
    steps:
      - id: extract
        llm:
          route: main
          messages: [{role: user, content: "strict {{input.id}}\n{{input.hint}}"}]
          response_format:
            type: json_schema
            schema: {type: object, required: [name], properties: {name: {type: string}}}
          repair_attempts: 0
  fanout:
    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: 2
          step: {llm: {route: main, messages: [{role: user, content: "item {{index}} {{item}}"}]}}
  approval:
    steps:
      - id: prep
        transform: {ticket: "{{input.ticket}}"}
      - id: approve
        wait_for_signal: {name: approval}
      - id: after
        transform: {decision: "{{steps.approve.output}}", ticket: "{{steps.prep.output.ticket}}"}
  late_wait:
    steps:
      - id: nap
        sleep: {for: 1s}
      - id: approve
        wait_for_signal: {name: go}
  wait_default:
    steps:
      - id: approve
        wait_for_signal: {name: approval, timeout: 300ms, default: {decision: reject}}
  wait_strict:
    steps:
      - id: approve
        wait_for_signal: {name: approval, timeout: 300ms}
  nap:
    steps:
      - id: nap
        sleep: {for: 500ms}
      - id: done
        transform: {slept: "{{steps.nap.output.slept_ms}}"}
  parent:
    steps:
      - id: kid
        pipeline: {name: child, input: {x: "{{input.x}}"}}
      - id: wrap
        transform: {from_child: "{{steps.kid.output}}"}
  child:
    steps:
      - id: check
        validate: {value: "{{input.x}}", schema: {type: integer, minimum: 0}}
      - id: shape
        transform: {x: "{{steps.check.output}}", tag: child}
  tool:
    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}
    steps:
      - id: call
        http:
          url: "http://127.0.0.1:TOOL_PORT/{{input.path}}"
          headers: {X-Trace: "t-{{input.q}}"}
          body: {q: "{{input.q}}", n: "{{input.n}}"}
      - id: done
        transform: {hits: "{{steps.call.output.hits}}", status: "{{steps.call.status}}"}
  tool_dynamic:
    steps:
      - id: call
        http: {url: "http://{{input.host}}/x", method: GET}
  typed:
    input_schema: {type: object, required: [items], properties: {items: {type: array, items: {type: string}}}}
    steps:
      - id: t
        transform: {items: "{{input.items}}"}
)YAML";
  if (version == 1) {
    yaml += R"YAML(  versioned:
    steps:
      - id: wait
        wait_for_signal: {name: go}
      - id: shape
        transform: {version: 1, got: "{{steps.wait.output}}"}
)YAML";
  } else {
    yaml += R"YAML(  versioned:
    steps:
      - id: wait
        wait_for_signal: {name: go}
      - id: shape
        transform: {version: 2, got: "{{steps.wait.output}}"}
      - id: extra
        transform: {final: "{{steps.shape.output}}", added: true}
)YAML";
  }
  yaml += "http:\n  allow_hosts: [\"127.0.0.1:TOOL_PORT\"]\n";
  const std::string port = std::to_string(tool_port);
  for (auto at = yaml.find("TOOL_PORT"); at != std::string::npos; at = yaml.find("TOOL_PORT", at)) {
    yaml.replace(at, 9, port);
  }
  return yaml;
}

// An HTTP server standing in for a tool: records every request; "/flaky" answers 503
// `flaky_failures` times first; everything else answers 200 with JSON.
class ToolServer {
 public:
  ToolServer() {
    auto s = net::HttpServer::Create(net::ServerOptions{}, [this](net::HttpRequest&& req,
                                                                  net::Responder respond) {
      net::HttpResponse r;
      {
        std::lock_guard lock(mu_);
        requests_.push_back(req);
        if (req.path == "/flaky" && flaky_failures_ > 0) {
          --flaky_failures_;
          r.status = 503;
          r.body = R"({"error": "busy, try again"})";
          respond(std::move(r));
          return;
        }
      }
      r.body = json::serialize(json::object{{"hits", json::array{"h1", "h2"}}, {"path", req.path}});
      respond(std::move(r));
    });
    EXPECT_OK(s);
    if (s.ok()) server_ = std::move(s).value();
  }
  ~ToolServer() {
    if (server_) server_->Stop();
  }
  uint16_t port() const { return server_ ? server_->port() : 0; }
  std::vector<net::HttpRequest> Requests(const std::string& path) {
    std::lock_guard lock(mu_);
    std::vector<net::HttpRequest> out;
    for (const auto& r : requests_) {
      if (r.path == path) out.push_back(r);
    }
    return out;
  }

 private:
  std::mutex mu_;
  std::vector<net::HttpRequest> requests_;  // GUARDED_BY(mu_)
  int flaky_failures_ = 1;                  // GUARDED_BY(mu_)
  std::unique_ptr<net::HttpServer> server_;
};

// The step of a run's GET body with this id; null when the run has no such step.
const json::value* StepOf(const json::value& run, const std::string& id) {
  for (const auto& s : run.at("steps").as_array()) {
    if (s.at("id").as_string() == id) return &s;
  }
  return nullptr;
}

std::vector<std::string> StepIds(const json::value& run) {
  std::vector<std::string> out;
  for (const auto& s : run.at("steps").as_array()) out.emplace_back(s.at("id").as_string());
  return out;
}

std::string ErrorType(const json::value& v) {
  const auto* e = v.as_object().if_contains("error");
  return e && e->is_object() ? std::string(e->at("type").as_string()) : std::string();
}

std::string ErrorMessage(const json::value& v) {
  const auto* e = v.as_object().if_contains("error");
  return e && e->is_object() ? std::string(e->at("message").as_string()) : std::string();
}

bool Contains(const std::string& hay, const std::string& needle) {
  return hay.find(needle) != std::string::npos;
}

struct CliOutput {
  int code;
  std::string err;
};

// Runs `keel ARGS...` to completion; its exit code and stderr.
CliOutput RunCli(std::vector<std::string> args, std::vector<std::string> env = {}) {
  args.insert(args.begin(), KEEL_BINARY);
  Process p(args, {}, std::move(env));
  const int code = p.Wait();
  std::string err;
  for (const auto& l : p.Lines()) err += l + "\n";
  return {code, err};
}

class PipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(tool_.port(), 0);
    mock_ = std::make_unique<MockLlm>();
    Start(1);
  }
  void Start(int version) {
    server_ = std::make_unique<KeelServer>(
        dir_.path(), MockBackedConfig(mock_->url(), Pipelines(tool_.port(), version)));
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }
  const std::string& url() const { return server_->url(); }

  std::string Submit(const std::string& pipeline, json::value input) {
    auto r = HttpPostJson(url() + "/v1/runs",
                          json::object{{"pipeline", pipeline}, {"input", std::move(input)}});
    EXPECT_EQ(r.status, 201) << r.raw;
    return r.status == 201 ? std::string(r.body.at("id").as_string()) : std::string("none");
  }
  json::value Get(const std::string& id) { return HttpGet(url() + "/v1/runs/" + id).body; }
  // Polls the run until `pred` holds for its GET body; returns the last body seen.
  json::value WaitUntil(const std::string& id, const std::function<bool(const json::value&)>& pred,
                        std::chrono::milliseconds timeout = 10s) {
    json::value last;
    const bool held = Eventually(
        [&] {
          auto r = HttpGet(url() + "/v1/runs/" + id);
          if (r.status != 200) return false;
          last = r.body;
          return pred(last);
        },
        timeout);
    EXPECT_TRUE(held) << "the run never got there: " << json::serialize(last);
    return last;
  }
  json::value WaitForWaiting(const std::string& id, const std::string& kind) {
    return WaitUntil(id, [&](const json::value& run) {
      const auto* w = run.as_object().if_contains("waiting");
      return Status(run) == "waiting" && w && w->is_object() && w->at("kind") == kind.c_str();
    });
  }
  JsonResponse Signal(const std::string& id, const std::string& name, const json::value& payload) {
    return HttpPostJson(url() + "/v1/runs/" + id + "/signals/" + name, payload);
  }

  TempDir dir_;
  ToolServer tool_;
  std::unique_ptr<MockLlm> mock_;
  std::unique_ptr<KeelServer> server_;
};

// ---- choice ---------------------------------------------------------------------------

TEST_F(PipelineTest, ChoiceTakesTheMatchingBranchAndTheOthersNeverRun) {
  struct Case {
    json::value input;
    std::string branch;              // the decide step's branch
    json::value the_case;            // its case index or "default"
    json::value output;              // the run's output
    std::vector<std::string> steps;  // every step the run recorded
  };
  const std::vector<Case> cases{
      {json::object{{"kind", "a"}, {"n", 50}},
       "on_a",
       0,
       json::object{{"branch", "a"}},
       {"decide", "on_a"}},
      {json::object{{"kind", "b"}, {"n", 11}},
       "on_big",
       1,
       json::object{{"branch", "big"}, {"n", 11}},
       {"decide", "on_big"}},
      // not: a VIP with a big n skips the second case; no flag: the default.
      {json::object{{"n", 50}, {"vip", true}},
       "on_default",
       "default",
       json::object{{"via", "on_default"}},
       {"decide", "on_default", "after"}},
      // gt is strict: 10 is not > 10; exists holds even for false.
      {json::object{{"n", 10}, {"flag", false}},
       "on_flag",
       2,
       json::object{{"via", "on_flag"}},
       {"decide", "on_flag", "after"}},
      {json::object{},
       "on_default",
       "default",
       json::object{{"via", "on_default"}},
       {"decide", "on_default", "after"}},
  };
  std::vector<std::string> ids;
  for (const auto& c : cases) ids.push_back(Submit("branch", c.input));
  for (std::size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE("input " + json::serialize(cases[i].input));
    const auto run = WaitForTerminal(url(), ids[i]);
    ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
    EXPECT_EQ(run.at("output"), cases[i].output) << json::serialize(run);
    EXPECT_EQ(StepIds(run), cases[i].steps) << json::serialize(run);
    const auto* decide = StepOf(run, "decide");
    ASSERT_NE(decide, nullptr);
    EXPECT_EQ(decide->at("output"),
              (json::object{{"branch", cases[i].branch}, {"case", cases[i].the_case}}));
  }
}

// ---- on_error -------------------------------------------------------------------------

TEST_F(PipelineTest, OnErrorOutputRecoversAStepThatFailsForGood) {
  const auto id = Submit("recover", json::object{{"id", "r1"}, {"prompt", "#mock fail=400"}});
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"got", json::object{{"fallback", true}}}}));
  const auto* ask = StepOf(run, "ask");
  ASSERT_NE(ask, nullptr);
  EXPECT_EQ(ask->at("recovered"), true);
  EXPECT_EQ(ask->at("output"), (json::object{{"fallback", true}}));
  EXPECT_EQ(ErrorType(*ask), "invalid_request") << json::serialize(*ask);
  EXPECT_EQ(ask->at("attempts").as_int64(), 1);  // a 400 is not retried
  EXPECT_EQ(MockCount(mock_->url(), "recover r1\n#mock fail=400"), 1);

  // The same pipeline with a good answer: no recovery.
  const auto ok =
      WaitForTerminal(url(), Submit("recover", json::object{{"id", "r2"}, {"prompt", "fine"}}));
  ASSERT_EQ(Status(ok), "succeeded") << json::serialize(ok);
  EXPECT_FALSE(StepOf(ok, "ask")->as_object().contains("recovered"));
  EXPECT_TRUE(Contains(std::string(ok.at("output").at("got").as_string()), "recover r2 fine"));
}

TEST_F(PipelineTest, OnErrorGotoJumpsToTheRecoveryStep) {
  const auto failing =
      Submit("recover_goto", json::object{{"id", "g1"}, {"prompt", "#mock fail=403"}});
  const auto fine = Submit("recover_goto", json::object{{"id", "g2"}, {"prompt", "fine"}});
  auto run = WaitForTerminal(url(), failing);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"path", "rescue"}, {"error", "auth"}}))
      << json::serialize(run);
  EXPECT_EQ(StepIds(run), (std::vector<std::string>{"ask", "rescue"}));
  EXPECT_EQ(StepOf(run, "ask")->at("recovered"), true);

  run = WaitForTerminal(url(), fine);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output").at("path"), "normal");
  EXPECT_EQ(StepIds(run), (std::vector<std::string>{"ask", "normal"}));
}

TEST_F(PipelineTest, WithoutOnErrorTheRunFailsWithTheStepsError) {
  const auto id =
      Submit("two", json::object{{"id", "n1"}, {"first", "#mock fail=400"}, {"second", "never"}});
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_request");
  EXPECT_FALSE(ErrorMessage(run).empty());
  const auto* first = StepOf(run, "first");
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(ErrorType(*first), "invalid_request");
  EXPECT_EQ(StepOf(run, "second"), nullptr);
  EXPECT_EQ(MockCount(mock_->url(), "second n1\nnever"), 0);
}

// ---- validate -------------------------------------------------------------------------

TEST_F(PipelineTest, ValidatePassesAValidValueAndFailsTheRunOnAnInvalidOne) {
  const auto good = Submit("checked", json::object{{"order", json::object{{"qty", 3}}}});
  const auto bad = Submit("checked", json::object{{"order", json::object{{"qty", 0}}}});
  auto run = WaitForTerminal(url(), good);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"qty", 3}}));
  EXPECT_EQ(StepOf(run, "check")->at("output"), (json::object{{"qty", 3}}));

  run = WaitForTerminal(url(), bad);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_output");
  EXPECT_TRUE(Contains(ErrorMessage(run), "$.qty")) << ErrorMessage(run);
  EXPECT_EQ(StepOf(run, "check")->at("attempts").as_int64(), 1);  // failed for good, not retried
  EXPECT_EQ(StepOf(run, "done"), nullptr);
}

// ---- llm structured output ------------------------------------------------------------

TEST_F(PipelineTest, StructuredOutputIsParsedAndAnInvalidAnswerIsRepaired) {
  const int64_t before = MockTotal(mock_->url());
  const auto plain = Submit("structured", json::object{{"id", "s1"}, {"hint", "none"}});
  auto run = WaitForTerminal(url(), plain);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const auto& out = run.at("output");
  ASSERT_TRUE(out.is_object()) << json::serialize(out);
  ASSERT_TRUE(out.at("name").is_string());
  EXPECT_GE(out.at("name").as_string().size(), 2u);
  ASSERT_TRUE(out.at("score").is_int64()) << json::serialize(out);
  EXPECT_GE(out.at("score").as_int64(), 3);
  EXPECT_EQ(StepOf(run, "extract")->at("repairs").as_int64(), 0);
  EXPECT_TRUE(StepOf(run, "extract")->at("text").is_string());
  EXPECT_EQ(MockTotal(mock_->url()) - before, 1);

  const auto repaired =
      Submit("structured", json::object{{"id", "s2"}, {"hint", "#mock reply=oops"}});
  run = WaitForTerminal(url(), repaired);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  ASSERT_TRUE(run.at("output").is_object());
  EXPECT_GE(run.at("output").at("score").as_int64(), 3);
  const auto* step = StepOf(run, "extract");
  EXPECT_EQ(step->at("repairs").as_int64(), 1);
  EXPECT_EQ(step->at("attempts").as_int64(), 1);
  // One call with the original prompt, one repair turn: two calls in all.
  EXPECT_EQ(MockCount(mock_->url(), "extract s2\n#mock reply=oops"), 1);
  EXPECT_EQ(MockTotal(mock_->url()) - before, 3);
}

TEST_F(PipelineTest, WithoutRepairsAnInvalidAnswerIsRetriedAndEndsInvalidOutput) {
  const std::string prompt = "strict s3\n#mock reply={\"name\": 5}";
  const auto id =
      Submit("strict", json::object{{"id", "s3"}, {"hint", "#mock reply={\"name\": 5}"}});
  const auto run = WaitForTerminal(url(), id);
  // invalid_output is retryable: the step's 2 attempts, then the dead-letter queue.
  ASSERT_EQ(Status(run), "dead_lettered") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_output");
  EXPECT_TRUE(Contains(ErrorMessage(run), "gave up after 2 attempts")) << ErrorMessage(run);
  EXPECT_TRUE(Contains(ErrorMessage(run), "$.name")) << ErrorMessage(run);
  EXPECT_EQ(StepOf(run, "extract")->at("attempts").as_int64(), 2);
  EXPECT_EQ(MockCount(mock_->url(), prompt), 2);  // no repair turn: one call per attempt
  EXPECT_EQ(MockTotal(mock_->url()), 2);
}

// ---- map ------------------------------------------------------------------------------

TEST_F(PipelineTest, MapRunsEveryItemOnceInOrderAndShowsItsProgress) {
  // Item 2 answers slowly: while it runs, the other four finish and are checkpointed.
  const json::array items{"alpha", "beta", "gamma\n#mock sleep=800", "delta", "epsilon"};
  const auto id = Submit("fanout", json::object{{"items", items}});
  const auto during = WaitUntil(id, [](const json::value& run) {
    const auto* each = StepOf(run, "each");
    return each && each->as_object().contains("items_done") &&
           each->at("items_done").as_int64() == 4;
  });
  EXPECT_EQ(Status(during), "running") << json::serialize(during);
  // The finished items can be read while the map runs, in index order, a page at a time.
  const std::string items_url = url() + "/v1/runs/" + id + "/steps/each/items";
  const auto page = HttpGet(items_url + "?limit=2");
  ASSERT_EQ(page.status, 200) << page.raw;
  ASSERT_EQ(page.body.at("data").as_array().size(), 2u) << page.raw;
  EXPECT_EQ(page.body.at("data").at(0).at("index"), 0);
  EXPECT_TRUE(Contains(std::string(page.body.at("data").at(0).at("output").as_string()), "alpha")) << page.raw;
  EXPECT_EQ(page.body.at("data").at(1).at("index"), 1);
  EXPECT_EQ(page.body.at("has_more"), true);
  const auto rest = HttpGet(items_url + "?limit=10&after=" + std::to_string(page.body.at("next_after").as_int64()));
  ASSERT_EQ(rest.status, 200) << rest.raw;
  std::vector<int64_t> indexes;  // 3 and 4, and 2 once its slow answer came
  for (const auto& item : rest.body.at("data").as_array()) indexes.push_back(item.at("index").as_int64());
  EXPECT_TRUE(indexes == (std::vector<int64_t>{3, 4}) || indexes == (std::vector<int64_t>{2, 3, 4})) << rest.raw;
  EXPECT_EQ(rest.body.at("has_more"), false);
  EXPECT_EQ(HttpGet(items_url + "?limit=0").status, 400);
  EXPECT_EQ(HttpGet(url() + "/v1/runs/run_nope/steps/each/items").status, 404);
  EXPECT_EQ(HttpPost(items_url, "{}").status, 405);
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const auto& out = run.at("output").as_array();
  ASSERT_EQ(out.size(), items.size()) << json::serialize(run);
  for (std::size_t i = 0; i < items.size(); ++i) {
    std::string item(items[i].as_string());
    std::replace(item.begin(), item.end(), '\n',
                 ' ');  // the mock's answer quotes the prompt on one line
    EXPECT_TRUE(Contains(std::string(out[i].as_string()), "item " + std::to_string(i) + " " + item))
        << out[i];
    EXPECT_EQ(MockCount(mock_->url(),
                        "item " + std::to_string(i) + " " + std::string(items[i].as_string())),
              1)
        << i;
  }
  EXPECT_EQ(MockTotal(mock_->url()), 5);
  const auto* each = StepOf(run, "each");
  EXPECT_EQ(each->at("items_done").as_int64(), 5);
  EXPECT_EQ(each->at("items").as_int64(), 5);
  // The items are not steps of their own in the run's view.
  EXPECT_EQ(StepIds(run), std::vector<std::string>{"each"});
}

TEST_F(PipelineTest, MapRetriesAFailedItemWithoutRepeatingFinishedOnes) {
  const json::array items{"a", "b", "c\n#mock fail=503 times=1", "d", "e"};
  const auto id = Submit("fanout", json::object{{"items", items}});
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(StepOf(run, "each")->at("attempts").as_int64(), 2);
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string prompt =
        "item " + std::to_string(i) + " " + std::string(items[i].as_string());
    EXPECT_EQ(MockCount(mock_->url(), prompt), i == 2 ? 2 : 1) << prompt;
  }
  EXPECT_EQ(run.at("output").as_array().size(), 5u);
}

TEST_F(PipelineTest, MapOverANonArrayFailsTheRunSayingWhatItWas) {
  const auto run = WaitForTerminal(url(), Submit("fanout", json::object{{"items", "x"}}));
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_request");
  EXPECT_TRUE(Contains(ErrorMessage(run), "must be an array")) << ErrorMessage(run);
  EXPECT_TRUE(Contains(ErrorMessage(run), "is a string")) << ErrorMessage(run);
  EXPECT_EQ(StepOf(run, "each")->at("attempts").as_int64(), 1);
  EXPECT_EQ(MockTotal(mock_->url()), 0);
}

// ---- wait_for_signal ------------------------------------------------------------------

TEST_F(PipelineTest, ASignalResumesAWaitingRunWithItsPayload) {
  const auto id = Submit("approval", json::object{{"ticket", "T-1"}});
  const auto waiting = WaitForWaiting(id, "signal");
  EXPECT_EQ(waiting.at("waiting").at("step_id"), "approve") << json::serialize(waiting);
  EXPECT_EQ(waiting.at("waiting").at("signal"), "approval");
  const json::value payload = json::object{{"ok", true}, {"by", "alice"}};
  auto sent = Signal(id, "approval", payload);
  ASSERT_EQ(sent.status, 202) << sent.raw;
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(StepOf(run, "approve")->at("output"), payload);
  EXPECT_EQ(run.at("output"), (json::object{{"decision", payload}, {"ticket", "T-1"}}));
  EXPECT_EQ(run.at("signals").at("approval").at("payload"), payload);
  EXPECT_FALSE(run.as_object().contains("waiting")) << json::serialize(run);
}

TEST_F(PipelineTest, ASignalSentBeforeTheWaitIsConsumedWhenItStarts) {
  const auto id = Submit("late_wait", json::object{});
  WaitForWaiting(id, "sleep");
  auto sent = Signal(id, "go", json::object{{"early", true}});
  ASSERT_EQ(sent.status, 202) << sent.raw;
  // Accepted while the run was still in its sleep, before the wait began.
  ASSERT_TRUE(sent.body.as_object().contains("waiting")) << sent.raw;
  EXPECT_EQ(sent.body.at("waiting").at("kind"), "sleep") << sent.raw;
  EXPECT_EQ(StepOf(sent.body, "approve"), nullptr) << sent.raw;
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"early", true}}));
}

TEST_F(PipelineTest, AWaitTimesOutToItsDefaultOrFailsWithout) {
  const auto with_default = Submit("wait_default", json::object{});
  const auto without = Submit("wait_strict", json::object{});
  auto run = WaitForTerminal(url(), with_default);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"decision", "reject"}}));
  EXPECT_EQ(StepOf(run, "approve")->at("timed_out"), true);
  EXPECT_GE(run.at("duration_ms").as_int64(), 300);

  run = WaitForTerminal(url(), without);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "timeout");
  EXPECT_TRUE(Contains(ErrorMessage(run), "approval")) << ErrorMessage(run);
}

TEST_F(PipelineTest, SignalsToUnknownOrEndedRunsOrWithBadNamesAreRefused) {
  EXPECT_EQ(Signal("run_does_not_exist", "approval", nullptr).status, 404);
  const auto id = Submit("approval", json::object{{"ticket", "T-2"}});
  WaitForWaiting(id, "signal");
  auto bad = Signal(id, "bad!name", nullptr);
  EXPECT_EQ(bad.status, 400) << bad.raw;
  EXPECT_EQ(Status(Get(id)), "waiting");  // a refused signal did not resume it
  // An empty body is a null payload.
  ASSERT_EQ(HttpPost(url() + "/v1/runs/" + id + "/signals/approval", "").status, 202);
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_TRUE(StepOf(run, "approve")->at("output").is_null());
  auto late = Signal(id, "approval", json::object{{"again", true}});
  EXPECT_EQ(late.status, 409) << late.raw;
}

TEST_F(PipelineTest, TheCliSendsASignal) {
  const auto id = Submit("approval", json::object{{"ticket", "T-3"}});
  WaitForWaiting(id, "signal");
  auto out = RunCli({"runs", "signal", id, "approval", "--payload", R"({"via": "cli"})"},
                    {"KEEL_URL=" + url()});
  EXPECT_EQ(out.code, 0) << out.err;
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(StepOf(run, "approve")->at("output"), (json::object{{"via", "cli"}}));
  // And the CLI reports a refusal: the run has ended.
  auto again = RunCli({"runs", "signal", id, "approval", "--payload", "1"}, {"KEEL_URL=" + url()});
  EXPECT_NE(again.code, 0) << again.err;
}

// ---- sleep ----------------------------------------------------------------------------

TEST_F(PipelineTest, ASleepingRunWaitsThenSucceeds) {
  const auto id = Submit("nap", json::object{});
  const auto waiting = WaitForWaiting(id, "sleep");
  EXPECT_EQ(waiting.at("waiting").at("step_id"), "nap");
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_GE(run.at("duration_ms").as_int64(), 500) << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"slept", 500}}));
}

// ---- pipeline (child runs) ------------------------------------------------------------

TEST_F(PipelineTest, AChildRunsOutputIsTheStepsOutputAndItsFailureFailsTheParent) {
  const auto good = Submit("parent", json::object{{"x", 7}});
  const auto bad = Submit("parent", json::object{{"x", -1}});
  auto run = WaitForTerminal(url(), good);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  const json::value child_output = json::object{{"x", 7}, {"tag", "child"}};
  EXPECT_EQ(run.at("output"), (json::object{{"from_child", child_output}}));
  const auto* kid = StepOf(run, "kid");
  ASSERT_NE(kid, nullptr);
  EXPECT_EQ(kid->at("output"), child_output);
  const std::string child_id(kid->at("run_id").as_string());
  const auto child = Get(child_id);
  EXPECT_EQ(Status(child), "succeeded");
  EXPECT_EQ(child.at("pipeline"), "child");
  EXPECT_EQ(child.at("parent"), (good + "/kid").c_str()) << json::serialize(child);
  EXPECT_EQ(child.at("output"), child_output);

  run = WaitForTerminal(url(), bad);
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_output");
  EXPECT_TRUE(Contains(ErrorMessage(run), "child run")) << ErrorMessage(run);
  EXPECT_EQ(StepOf(run, "wrap"), nullptr);
  // The failed child is there to inspect, pointing at its parent.
  auto children = HttpGet(url() + "/v1/runs?pipeline=child&status=failed");
  ASSERT_EQ(children.status, 200) << children.raw;
  ASSERT_EQ(children.body.at("data").as_array().size(), 1u) << children.raw;
  EXPECT_EQ(children.body.at("data").as_array()[0].at("parent"), (bad + "/kid").c_str());
}

// ---- http -----------------------------------------------------------------------------

TEST_F(PipelineTest, HttpStepSendsTheRenderedBodyWithAnIdempotencyKey) {
  const auto id = Submit("tool", json::object{{"path", "search"}, {"q", "hello"}, {"n", 3}});
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"hits", json::array{"h1", "h2"}}, {"status", 200}}));
  EXPECT_EQ(StepOf(run, "call")->at("output").at("path"), "/search");
  const auto seen = tool_.Requests("/search");
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].method, "POST");
  EXPECT_EQ(seen[0].Header("Idempotency-Key"), id + "/call");
  EXPECT_EQ(seen[0].Header("X-Trace"), "t-hello");
  EXPECT_TRUE(Contains(std::string(seen[0].Header("Content-Type")), "application/json"));
  EXPECT_EQ(json::parse(seen[0].body), (json::object{{"q", "hello"}, {"n", 3}})) << seen[0].body;
}

TEST_F(PipelineTest, HttpStepRefusesAHostNotAllowedAndCallsAnAllowedOne) {
  const std::string port = std::to_string(tool_.port());
  // localhost reaches the same server, but only 127.0.0.1:PORT is in http.allow_hosts.
  auto run =
      WaitForTerminal(url(), Submit("tool_dynamic", json::object{{"host", "localhost:" + port}}));
  ASSERT_EQ(Status(run), "failed") << json::serialize(run);
  EXPECT_EQ(ErrorType(run), "invalid_request");
  EXPECT_TRUE(Contains(ErrorMessage(run), "http.allow_hosts")) << ErrorMessage(run);
  EXPECT_TRUE(Contains(ErrorMessage(run), "localhost:" + port)) << ErrorMessage(run);
  EXPECT_EQ(StepOf(run, "call")->at("attempts").as_int64(), 1);
  EXPECT_EQ(tool_.Requests("/x").size(), 0u);

  run = WaitForTerminal(url(), Submit("tool_dynamic", json::object{{"host", "127.0.0.1:" + port}}));
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output").at("path"), "/x");
  const auto seen = tool_.Requests("/x");
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].method, "GET");
  EXPECT_TRUE(seen[0].body.empty());
}

TEST_F(PipelineTest, HttpStepRetriesA503) {
  const auto id = Submit("tool", json::object{{"path", "flaky"}, {"q", "again"}, {"n", 1}});
  const auto run = WaitForTerminal(url(), id);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(StepOf(run, "call")->at("attempts").as_int64(), 2);
  const auto seen = tool_.Requests("/flaky");
  ASSERT_EQ(seen.size(), 2u);
  for (const auto& r : seen) EXPECT_EQ(r.Header("Idempotency-Key"), id + "/call");
}

// ---- input_schema ---------------------------------------------------------------------

TEST_F(PipelineTest, AnInputOutsideTheSchemaIsRefusedWithItsPathAndNoRun) {
  auto r = HttpPostJson(url() + "/v1/runs",
                        json::object{{"pipeline", "typed"}, {"input", {{"items", "x"}}}});
  EXPECT_EQ(r.status, 422) << r.raw;
  EXPECT_EQ(r.body.at("error").at("param"), "input.items") << r.raw;
  EXPECT_EQ(r.body.at("error").at("type"), "invalid_request") << r.raw;
  r = HttpPostJson(url() + "/v1/runs", json::object{{"pipeline", "typed"},
                                                    {"input", {{"items", json::array{"a", 3}}}}});
  EXPECT_EQ(r.status, 422) << r.raw;
  EXPECT_EQ(r.body.at("error").at("param"), "input.items[1]") << r.raw;
  r = HttpPostJson(url() + "/v1/runs",
                   json::object{{"pipeline", "typed"}, {"input", json::object{}}});
  EXPECT_EQ(r.status, 422) << r.raw;
  EXPECT_EQ(HttpGet(url() + "/v1/runs?pipeline=typed").body.at("data").as_array().size(), 0u);
  // A valid input is accepted.
  const auto run =
      WaitForTerminal(url(), Submit("typed", json::object{{"items", json::array{"a"}}}));
  EXPECT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(HttpGet(url() + "/v1/runs?pipeline=typed").body.at("data").as_array().size(), 1u);
}

// ---- versioning -----------------------------------------------------------------------

TEST_F(PipelineTest, ARunKeepsItsDefinitionAcrossARestartWithANewConfig) {
  const auto old_run = Submit("versioned", json::object{});
  WaitForWaiting(old_run, "signal");
  EXPECT_EQ(server_->Terminate(), 0);
  Start(2);  // same data, the "versioned" pipeline changed: new transform, one more step
  const auto new_run = Submit("versioned", json::object{});
  ASSERT_EQ(Signal(old_run, "go", json::object{{"n", 1}}).status, 202);
  ASSERT_EQ(Signal(new_run, "go", json::object{{"n", 2}}).status, 202);
  auto run = WaitForTerminal(url(), old_run);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"), (json::object{{"version", 1}, {"got", json::object{{"n", 1}}}}));
  EXPECT_EQ(StepIds(run), (std::vector<std::string>{"wait", "shape"}));
  run = WaitForTerminal(url(), new_run);
  ASSERT_EQ(Status(run), "succeeded") << json::serialize(run);
  EXPECT_EQ(run.at("output"),
            (json::object{{"final", json::object{{"version", 2}, {"got", json::object{{"n", 2}}}}},
                          {"added", true}}));
  EXPECT_EQ(StepIds(run), (std::vector<std::string>{"wait", "shape", "extra"}));
}

// ---- cancel ---------------------------------------------------------------------------

TEST_F(PipelineTest, CancellingAWaitingRunEndsItAndALaterSignalIsRefused) {
  const auto id = Submit("approval", json::object{{"ticket", "T-4"}});
  WaitForWaiting(id, "signal");
  auto cancelled = HttpPost(url() + "/v1/runs/" + id + "/cancel", "");
  ASSERT_EQ(cancelled.status, 200) << cancelled.raw;
  EXPECT_EQ(Status(cancelled.body), "cancelled");
  auto late = Signal(id, "approval", json::object{{"ok", true}});
  EXPECT_EQ(late.status, 409) << late.raw;
  const auto run = Get(id);
  EXPECT_EQ(Status(run), "cancelled");
  EXPECT_EQ(StepOf(run, "after"), nullptr);
}

TEST_F(PipelineTest, CancellingARunAbandonsTheModelCallInFlight) {
  // The call would take 8 s (the provider's timeout is 5 s); a cancel must end it sooner.
  const auto id = Submit("two", json::object{{"id", "c1"}, {"first", "#mock sleep=8000"}, {"second", "never"}});
  ASSERT_TRUE(Eventually([&] { return MockCount(mock_->url(), "first c1\n#mock sleep=8000") == 1; }));
  const auto t0 = std::chrono::steady_clock::now();
  auto cancelled = HttpPost(url() + "/v1/runs/" + id + "/cancel", "");
  ASSERT_EQ(cancelled.status, 200) << cancelled.raw;
  // The heartbeat sees the lease gone and the call in flight stops: its attempt ends
  // `cancelled`, not `timeout` at 5 s.
  ASSERT_TRUE(Eventually(
      [&] {
        return HttpGet(url() + "/metrics").raw.find("keel_step_errors_total{class=\"cancelled\",pipeline=\"two\"} 1") !=
               std::string::npos;
      },
      std::chrono::seconds(4)));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(4));
  EXPECT_EQ(Status(Get(id)), "cancelled");
  EXPECT_EQ(MockCount(mock_->url(), "second c1\nnever"), 0);
}

// ---- config refusals ------------------------------------------------------------------

class PipelineConfigTest : public ::testing::Test {
 protected:
  // `keel config check` on the header below followed by `steps` (lines 8 on).
  CliOutput Check(const std::string& steps, const std::string& more = {}) {
    const std::string file = dir_.path() + "/keel.yaml";
    std::ofstream(file) << "providers:\n"                          // 1
                           "  m: {type: mock, model: mock-1}\n"    // 2
                           "routes:\n"                             // 3
                           "  main: {targets: [{provider: m}]}\n"  // 4
                           "pipelines:\n"                          // 5
                           "  p:\n"                                // 6
                           "    steps:\n"                          // 7
                        << steps << more;
    return RunCli({"config", "check", file});
  }
  void ExpectRefused(const std::string& steps, int line, const std::string& says) {
    const auto out = Check(steps);
    EXPECT_NE(out.code, 0) << steps;
    EXPECT_TRUE(Contains(out.err, "line " + std::to_string(line) + ":")) << out.err;
    EXPECT_TRUE(Contains(out.err, says)) << out.err;
  }
  TempDir dir_;
};

TEST_F(PipelineConfigTest, RefusesBadGraphsAndNamesTheLine) {
  // A cycle.
  ExpectRefused(
      "      - id: a\n"
      "        transform: {x: 1}\n"
      "        next: b\n"
      "      - id: b\n"
      "        transform: {y: 1}\n"
      "        next: a\n",
      8, "has a cycle");
  // An unknown kind.
  ExpectRefused(
      "      - id: a\n"
      "        frobnicate: {x: 1}\n",
      9, "frobnicate");
  ExpectRefused(
      "      - id: a\n"
      "        map: {over: \"{{input.items}}\", step: {frobnicate: {x: 1}}}\n",
      9, "unknown step kind");
  // A reference to nothing.
  ExpectRefused(
      "      - id: a\n"
      "        transform: {x: \"{{steps.ghost.output}}\"}\n",
      8, "has no step \"ghost\"");
  // A jump to nothing.
  ExpectRefused(
      "      - id: a\n"
      "        transform: {x: 1}\n"
      "        next: nowhere\n",
      8, "nowhere");
  // A choice without default.
  ExpectRefused(
      "      - id: pick\n"
      "        choice: {cases: [{when: {value: \"{{input.x}}\", equals: 1}, goto: a}]}\n"
      "      - id: a\n"
      "        transform: {x: 1}\n",
      9, "needs a default");
  // A reference to a step on another branch.
  ExpectRefused(
      "      - id: pick\n"
      "        choice: {cases: [{when: {value: \"{{input.x}}\", equals: 1}, goto: a}], default: "
      "b}\n"
      "      - id: a\n"
      "        transform: {x: 1}\n"
      "        next: end\n"
      "      - id: b\n"
      "        transform: {y: \"{{steps.a.output}}\"}\n",
      13, "cannot have run before it");
  // Two waits for one signal.
  ExpectRefused(
      "      - id: w1\n"
      "        wait_for_signal: {name: go}\n"
      "      - id: w2\n"
      "        wait_for_signal: {name: go}\n",
      10, "wait for the signal \"go\"");
}

TEST_F(PipelineConfigTest, RefusesAPipelineThatRunsItselfAndNamesTheLine) {
  const auto out = Check(
      "      - id: again\n"
      "        pipeline: {name: p}\n");
  EXPECT_NE(out.code, 0);
  EXPECT_TRUE(Contains(out.err, "runs itself")) << out.err;
  // Every refusal names its line (DESIGN.md: "validated with line numbers").
  EXPECT_TRUE(Contains(out.err, "line 8:") || Contains(out.err, "line 9:")) << out.err;
}

TEST_F(PipelineConfigTest, AcceptsEveryStepKind) {
  const auto out = Check(R"YAML(      - id: ask
        llm:
          route: main
          messages: [{role: user, content: "hi {{input.x}}"}]
          response_format: {type: json_schema, schema: {type: object, required: [a], properties: {a: {type: string}}}}
          repair_attempts: 1
        retry: {max_attempts: 2, initial_backoff: 10ms}
        timeout: 5s
      - id: call
        http: {url: "http://{{input.host}}/x", method: POST, headers: {X-A: "1"}, body: {a: "{{steps.ask.output.a}}"}, timeout: 2s}
        on_error: {output: {none: true}}
      - id: work
        task: {queue: q, input: {a: "{{steps.call.output}}"}, heartbeat_timeout: 10s}
      - id: shape
        transform: {a: "{{steps.work.output}}"}
      - id: check
        validate: {value: "{{steps.shape.output}}", schema: {type: object}}
      - id: pick
        choice:
          cases:
            - when: {any: [{value: "{{input.x}}", in: [1, 2]}, {value: "{{input.s}}", matches: "^a"}]}
              goto: each
          default: approve
      - id: each
        map: {over: "{{input.items}}", concurrency: 3, step: {transform: {i: "{{index}}", v: "{{item}}"}}}
        next: approve
      - id: approve
        wait_for_signal: {name: approval, timeout: 1h, default: {ok: false}}
      - id: nap
        sleep: {for: 10ms}
      - id: sub
        pipeline: {name: q, input: {x: "{{steps.approve.output}}"}}
        on_error: {goto: last}
      - id: last
        transform: {done: true}
  q:
    input_schema: {type: object}
    steps:
      - id: only
        transform: {x: "{{input.x}}"}
http:
  allow_hosts: [example.com, "127.0.0.1:9000"]
)YAML");
  EXPECT_EQ(out.code, 0) << out.err;
}

}  // namespace
}  // namespace keel::testing
