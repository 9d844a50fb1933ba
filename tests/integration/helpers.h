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
