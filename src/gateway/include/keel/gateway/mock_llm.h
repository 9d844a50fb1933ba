#pragma once
// The behaviour of keel's fault-injecting mock LLM, shared by the `keel mock-llm` server
// and the built-in `type: mock` provider. Given an OpenAI chat-completions request (or an
// Anthropic Messages request), it decides how to answer: a deterministic completion, an
// error, a delay, a hang, a reset, malformed output, or a stream of server-sent events
// with its pacing and faults. Faults come from options and from `#mock` directive lines in
// the last user message:
//   #mock sleep=3000            answer after 3 s
//   #mock fail=503 [times=2]    answer 503 (only the first 2 calls with this prompt)
//   #mock fail=503 after=1      answer the first call with this prompt, then 503 (after=N
//                               applies to every directive, and times= counts from there)
//   #mock fail=429 retry_after=1
//   #mock fail=context_length   answer 400 context_length_exceeded
//   #mock hang | malformed | reset
//   #mock reply=TEXT            answer with TEXT as the content
//   #mock tool=NAME[,NAME...]   with `tools` in the request: call these tools (several:
//                               parallel calls), arguments an instance of each one's schema
// A request with `tools` is also answered with a tool call when tool_choice asks for one
// ("required", Anthropic's {type: any}: the first tool; a named tool: that one); after a
// tool's result (the last message), only a named tool_choice calls again. JSON modes:
// response_format json_schema answers an instance of the schema (its required properties
// with values of their types), json_object answers {"answer": TEXT}.
// and, for streamed answers ("stream": true) only:
//   #mock first_byte=2000       wait 2 s before the status line and headers
//   #mock stall=500             wait 500 ms between two events
//   #mock truncate[=N]          end the stream cleanly after N (default: half the) content
//                               events, without the finishing events and [DONE]
//   #mock reset_after=N         reset the connection (RST) after N content events
// Thread-safe.

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

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
  std::string body;         // the HTTP body to send (kAnswer, kError, kMalformed, kHang)
  int retry_after_s = 0;    // > 0: send Retry-After

  // A streamed answer (the request asked "stream": true and the kind is kAnswer or
  // kMalformed). `body` still holds the whole non-streamed answer, for callers that do
  // not stream. The server waits `delay` + `first_byte`, sends `status` with
  // Content-Type text/event-stream, writes `events` one chunk each with `stall` between
  // two of them, then ends the stream, or resets the connection if `reset_at_end`.
  bool stream = false;
  /// Whole server-sent events in order: "data: {...}\n\n" (OpenAI) or
  /// "event: NAME\ndata: {...}\n\n" (Anthropic); already cut short by truncate and
  /// reset_after.
  std::vector<std::string> events;
  /// Before the status line and headers (after `delay`).
  std::chrono::milliseconds first_byte{0};
  /// Between two events.
  std::chrono::milliseconds stall{0};
  /// The events stop before the answer's end (truncate, reset_after).
  bool truncated = false;
  /// Reset the connection (RST) after the events instead of ending the stream.
  bool reset_at_end = false;
  /// Content events (text deltas) among `events`.
  int content_events = 0;
};

/// The media type of streamed answers.
inline constexpr std::string_view kEventStreamType = "text/event-stream";

class MockLlm {
 public:
  explicit MockLlm(MockOptions options);

  /// Decides the answer to one /v1/chat/completions request body (raw text), and counts
  /// it in the stats. `now` drives the rpm/tpm windows.
  MockDecision HandleChat(std::string_view body, std::chrono::steady_clock::time_point now);

  /// The same for one Anthropic POST /v1/messages request body: the answer, its errors
  /// ({"type": "error", "error": {"type", "message"}}) and its event stream in Anthropic's
  /// shapes. Counted in the same stats, by the text of the last user message.
  MockDecision HandleMessages(std::string_view body, std::chrono::steady_clock::time_point now);

  /// One OpenAI /v1/embeddings request body: a deterministic 8-dimension unit vector of
  /// float32 values per input (string or array of strings), as numbers or, with
  /// `encoding_format: "base64"`, as the base64 of their little-endian bytes (what the
  /// OpenAI SDKs ask for). The flags' faults apply; counted in the stats under
  /// "embeddings: <first input>".
  MockDecision HandleEmbeddings(std::string_view body, std::chrono::steady_clock::time_point now);

  /// {"total": N, "by_prompt": {"<last user message>": count}}
  json::value Stats() const;
  /// Forgets all counts.
  void Reset();

 private:
  MockDecision Handle(bool anthropic, std::string_view body,
                      std::chrono::steady_clock::time_point now);

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
