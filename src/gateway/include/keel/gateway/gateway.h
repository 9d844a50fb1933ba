#pragma once
// The gateway: the one path for every model call. A call names a route (a virtual model
// name); the route's targets are providers, tried in order: a failure whose class fails
// over (rate_limited, overloaded, server_error, timeout, network, invalid_output) moves
// to the next target, at most `kMaxFailoverChain` targets; any other class fails fast.
// This first cut has the priority strategy only; issue #3 brings the full gateway.
//
// Thread-safe. A Gateway outlives every call made through it.

#include <memory>
#include <prometheus/registry.h>
#include <string>

#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel::gateway {

/// Targets tried for one call at most.
inline constexpr int kMaxFailoverChain = 3;

struct ChatRequest {
  std::string route;
  json::array messages;  // [{role, content}]
  std::optional<double> temperature;
  std::optional<int64_t> max_tokens;
  /// Passed to providers as the Idempotency-Key header. Default: none.
  std::string idempotency_key;
  /// Bound on the whole call, failovers included. Default: 60s.
  Duration timeout{60000};
};

struct ChatResult {
  std::string text;      // the answer's content
  std::string model;     // the model that really answered (from the provider's response)
  std::string provider;  // the provider (target) that answered
  json::value usage;     // {prompt_tokens, completion_tokens, total_tokens}, or null
  int attempts = 0;      // provider calls made, failed ones included
};

class Gateway {
 public:
  /// Builds providers and routes from a validated config. `registry` must outlive the
  /// gateway.
  static Result<std::unique_ptr<Gateway>> Create(const Config& config, prometheus::Registry& registry);
  virtual ~Gateway() = default;

  /// Calls the route. Errors carry the class of the last target's failure.
  virtual Result<ChatResult> Chat(const ChatRequest& request) = 0;
};

}  // namespace keel::gateway
