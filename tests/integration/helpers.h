#pragma once
// Shared pieces of the integration tests.

#include <string>

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

inline std::string Status(const json::value& run) { return std::string(run.at("status").as_string()); }

}  // namespace keel::testing
