#pragma once
// The behaviour of keel's fault-injecting mock LLM, shared by the `keel mock-llm` server
// and the built-in `type: mock` provider. Given an OpenAI chat-completions request, it
// decides how to answer: a deterministic completion, an error, a delay, a hang, a reset
// or malformed output. Faults come from options and from `#mock` directive lines in the
// last user message:
//   #mock sleep=3000            answer after 3 s
//   #mock fail=503 [times=2]    answer 503 (only the first 2 calls with this prompt)
//   #mock fail=429 retry_after=1
//   #mock fail=context_length   answer 400 context_length_exceeded
//   #mock hang | malformed | reset
//   #mock reply=TEXT            answer with TEXT as the content
// Thread-safe.

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>

#include "keel/core/json.h"

namespace keel::gateway {

struct MockOptions {
  /// Added delay before every answer. Default: 0.
  std::chrono::milliseconds latency{0};
  /// Share of calls answered with `fail_status`. Default: 0. Range: [0, 1].
  double fail_rate = 0.0;
  /// Status of random failures. Default: 503.
  int fail_status = 503;
  /// Seed of the random failures. Default: 1.
  uint64_t seed = 1;
  /// Requests per minute before answering 429 (0: no limit). Default: 0.
  int rpm = 0;
  /// Tokens per minute before answering 429 (0: no limit). Default: 0.
  int tpm = 0;
  /// How long a hang lasts before the connection is closed. Default: 10 min.
  std::chrono::milliseconds hang{600000};
};

struct MockDecision {
  enum class Kind { kAnswer, kError, kHang, kReset, kMalformed };
  Kind kind = Kind::kAnswer;
  std::chrono::milliseconds delay{0};
  int status = 200;
  std::string body;         // the HTTP body to send (kAnswer, kError, kMalformed)
  int retry_after_s = 0;    // > 0: send Retry-After
};

class MockLlm {
 public:
  explicit MockLlm(MockOptions options);

  /// Decides the answer to one /v1/chat/completions request body (raw text), and counts
  /// it in the stats. `now` drives the rpm/tpm windows.
  MockDecision HandleChat(std::string_view body, std::chrono::steady_clock::time_point now);

  /// {"total": N, "by_prompt": {"<last user message>": count}}
  json::value Stats() const;
  /// Forgets all counts.
  void Reset();

 private:
  MockOptions options_;
  mutable std::mutex mu_;
  std::mt19937_64 rng_;                        // GUARDED_BY(mu_)
  int64_t total_ = 0;                          // GUARDED_BY(mu_)
  std::map<std::string, int64_t> by_prompt_;   // GUARDED_BY(mu_)
  std::chrono::steady_clock::time_point window_start_{};  // GUARDED_BY(mu_)
  int64_t window_requests_ = 0;                // GUARDED_BY(mu_)
  int64_t window_tokens_ = 0;                  // GUARDED_BY(mu_)
};

/// Rough token estimate used by the mock and for budgets: one token per 4 bytes.
int64_t EstimateTokens(std::string_view text);

}  // namespace keel::gateway
