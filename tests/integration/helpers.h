#pragma once
// Shared pieces of the integration tests.

#include <string>

#include "keel/core/sse.h"
#include "keel/net/http_client.h"
#include "keel/testing/http.h"
#include "keel/testing/process.h"

namespace keel::testing {

/// A config whose provider "llm" is the mock-llm at `mock_url`, with fast retries.
inline std::string MockBackedConfig(const std::string& mock_url, const std::string& extra_pipelines = {},
                                    const std::string& engine = "engine: {workers: 4, lease_timeout: 2s, poll_interval: 50ms}") {
  return "storage: sqlite://data/keel.db\n" + engine +
         "\n"
         "providers:\n"
         "  llm: {type: openai, base_url: " + mock_url + "/v1, api_key: sk-test-SECRET-do-not-log, model: mock-1,\n"
         "        timeout: {connect: 1s, total: 5s}}\n"
         "routes:\n"
         "  main: {targets: [{provider: llm}]}\n"
         "pipelines:\n"
         "  two:\n"
         "    retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms}\n"
         "    steps:\n"
         "      - id: first\n"
         "        llm: {route: main, messages: [{role: user, content: \"first {{input.id}}\\n{{input.first}}\"}]}\n"
         "      - id: second\n"
         "        llm: {route: main, messages: [{role: user, content: \"second {{input.id}}\\n{{input.second}}\"}]}\n"
         "      - id: done\n"
         "        transform: {first: \"{{steps.first.text}}\", second: \"{{steps.second.text}}\"}\n" +
         extra_pipelines;
}

/// GETs the run until it reaches a terminal state; returns the last body seen.
inline json::value WaitForTerminal(const std::string& base, const std::string& id,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  json::value last;
  Eventually(
      [&] {
        auto r = HttpGet(base + "/v1/runs/" + id);
        if (r.status != 200) return false;
        last = r.body;
        const auto status = std::string(r.body.at("status").as_string());
        return status == "succeeded" || status == "failed" || status == "cancelled" || status == "dead_lettered";
      },
      timeout);
  return last;
}

/// How many times the mock saw this exact last user message.
inline int64_t MockCount(const std::string& mock_url, const std::string& prompt) {
  auto r = HttpGet(mock_url + "/mock/stats");
  if (r.status != 200) return -1;
  const auto* n = r.body.at("by_prompt").as_object().if_contains(prompt);
  return n ? n->as_int64() : 0;
}

/// An OpenAI chat body with one user message.
inline json::value Chat(const std::string& model, const std::string& content) {
  return json::object{{"model", model}, {"messages", json::array{json::object{{"role", "user"}, {"content", content}}}}};
}

/// Calls the mock has answered in all; -1 when it did not answer.
inline int64_t MockTotal(const std::string& url) {
  auto r = HttpGet(url + "/mock/stats");
  return r.status == 200 ? r.body.at("total").as_int64() : -1;
}

struct Streamed {
  int status = 0;
  bool transport_ok = false;
  std::vector<std::string> data;  // each event's data, in order
  std::string raw;
  net::Headers headers;
  std::string Text() const {  // the concatenated content deltas
    std::string out;
    for (const auto& d : data) {
      if (d == "[DONE]") continue;
      auto v = json::parse(d);
      if (!v.as_object().contains("choices")) continue;
      for (const auto& c : v.at("choices").as_array()) {
        if (const auto* t = c.as_object().at("delta").as_object().if_contains("content"); t && t->is_string()) {
          out += std::string(t->as_string());
        }
      }
    }
    return out;
  }
};

/// POSTs a streamed chat body and parses the whole answer as server-sent events.
inline Streamed StreamCall(const std::string& base, const json::value& body) {
  net::ClientRequest req;
  req.method = "POST";
  req.url = base + "/v1/chat/completions";
  req.headers = {{"Content-Type", "application/json"}};
  req.body = json::serialize(body);
  req.total_timeout = std::chrono::seconds(30);
  Streamed out;
  auto r = net::SendHttp(req);
  if (!r.ok()) return out;
  out.transport_ok = true;
  out.status = r->status;
  out.raw = r->body;
  out.headers = r->headers;
  SseParser parser([&](const SseEvent& e) {
    out.data.push_back(e.data);
    return true;
  });
  parser.Feed(r->body);
  return out;
}

/// Chat(model, content) with "stream": true (and include_usage when asked).
inline json::value StreamBody(const std::string& model, const std::string& content, bool include_usage = false) {
  json::value b = Chat(model, content);
  b.as_object()["stream"] = true;
  if (include_usage) b.as_object()["stream_options"] = json::object{{"include_usage", true}};
  return b;
}

inline std::string Status(const json::value& run) { return std::string(run.at("status").as_string()); }

}  // namespace keel::testing

// ---- External workers and waiting runs (task_test.cc, crash_pipeline_test.cc) -------------
// In their own namespace so that they clash with no test file's local helpers.

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <vector>

namespace keel::testing::workers {

/// The python3 on PATH; "" when there is none (the worker tests skip then).
inline std::string Python3() {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    const auto p = std::filesystem::path(dir.empty() ? "." : dir) / "python3";
    std::error_code ec;
    if (std::filesystem::is_regular_file(p, ec)) return p.string();
  }
  return {};
}

/// Starts examples/worker.py against `server` on `queue` with `handler`; `extra` are more
/// flags (e.g. "--once"). The worker logs one line per event to stderr ("worker: ...").
inline std::unique_ptr<Process> StartWorker(const std::string& server, const std::string& queue,
                                            const std::string& handler, std::vector<std::string> extra = {}) {
  std::vector<std::string> argv{Python3(), std::string(KEEL_SOURCE_DIR) + "/examples/worker.py", "--server", server,
                                "--queue", queue, "--handler", handler, "--worker-id", "py-" + handler, "--wait-ms", "500"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return std::make_unique<Process>(argv);
}

/// POST /v1/tasks/poll as a worker would.
inline JsonResponse Poll(const std::string& base, const std::string& queue, const std::string& worker_id = "http-worker",
                         int64_t wait_ms = 0) {
  return HttpPostJson(base + "/v1/tasks/poll",
                      json::object{{"queue", queue}, {"worker_id", worker_id}, {"wait_ms", wait_ms}});
}

/// POST /v1/tasks/{token}/{verb} (heartbeat, complete, fail) with `body`.
inline JsonResponse TaskCall(const std::string& base, const std::string& token, const std::string& verb,
                             const json::value& body = json::object{}) {
  return HttpPostJson(base + "/v1/tasks/" + token + "/" + verb, body);
}

/// Submits a run; returns its id, "" (and a test failure) when not answered 201.
inline std::string Submit(const std::string& base, const std::string& pipeline, const json::value& input) {
  auto r = HttpPostJson(base + "/v1/runs", json::object{{"pipeline", pipeline}, {"input", input}});
  EXPECT_EQ(r.status, 201) << r.raw;
  return r.status == 201 ? std::string(r.body.at("id").as_string()) : std::string();
}

/// GETs the run until `pred` holds; the body that satisfied it, or nullopt on timeout.
inline std::optional<json::value> AwaitRun(const std::string& base, const std::string& id,
                                           const std::function<bool(const json::value&)>& pred,
                                           std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  std::optional<json::value> hit;
  Eventually(
      [&] {
        auto r = HttpGet(base + "/v1/runs/" + id);
        if (r.status != 200 || !pred(r.body)) return false;
        hit = r.body;
        return true;
      },
      timeout);
  return hit;
}

/// The run's record of step `id` (GET /v1/runs/{id} "steps"), or nullptr.
inline const json::value* FindStep(const json::value& run, const std::string& id) {
  for (const auto& s : run.at("steps").as_array()) {
    if (s.at("id").as_string() == id) return &s;
  }
  return nullptr;
}

/// True when the run is `waiting` on a step of `kind` (task, signal, sleep, child_run).
inline bool WaitingOn(const json::value& run, const std::string& kind) {
  const auto* w = run.as_object().if_contains("waiting");
  return Status(run) == "waiting" && w && w->is_object() && w->as_object().contains("kind") &&
         w->at("kind").as_string() == kind;
}

}  // namespace keel::testing::workers
