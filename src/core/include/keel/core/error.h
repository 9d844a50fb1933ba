#pragma once
// The error taxonomy of keel (docs/errors.md). Every failure that crosses a module
// boundary carries one ErrorCode: it decides whether a call is retried, failed over or
// failed fast, and which HTTP status the API answers.

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace keel {

enum class ErrorCode {
  // Upstream taxonomy (DESIGN.md, "Error taxonomy").
  kRateLimited,     // 429, quota exceeded: back off, honour Retry-After.
  kOverloaded,      // 503, 529: fail over at once.
  kServerError,     // 500, 502, 504: fail over at once.
  kTimeout,         // connect, first-byte or total timeout.
  kNetwork,         // connection refused or reset.
  kContextLength,   // prompt longer than the model's window.
  kContentPolicy,   // refused on safety grounds.
  kInvalidRequest,  // 400, 404, 422 from upstream or a bad request to keel.
  kAuth,            // 401, 403.
  kInvalidOutput,   // malformed JSON, schema mismatch, truncated answer.
  // keel's own conditions.
  kNotFound,         // unknown run, route, pipeline.
  kConflict,         // idempotency key reused with another body; wrong state.
  kLeaseLost,        // the caller's lease expired or the run was taken from it.
  kPayloadTooLarge,  // a bound on size was exceeded.
  kQueueFull,        // a bound on depth was exceeded.
  kCancelled,        // the run or call was cancelled.
  kUnavailable,      // a dependency of keel (storage) cannot serve now.
  kWorkerLost,       // a step's attempts kept ending with their node lost (crash, wedge).
  kInternal,         // a bug or an unexpected condition.
};

/// The wire name of a code ("rate_limited", "invalid_request", ...).
std::string_view ErrorCodeName(ErrorCode code);
/// Inverse of ErrorCodeName; nullopt for an unknown name.
std::optional<ErrorCode> ErrorCodeFromName(std::string_view name);

/// Whether a failure of this class may succeed if tried again (after a backoff).
bool IsRetryable(ErrorCode code);

/// Whether a call that failed with this class should go to the next target of a route
/// (DESIGN.md: rate_limited, overloaded, server_error, timeout, network, invalid_output).
bool FailsOver(ErrorCode code);

/// The HTTP status keel answers for an error of this class.
int HttpStatusFor(ErrorCode code);

/// Classifies an upstream HTTP status (4xx/5xx) into the taxonomy.
ErrorCode ClassifyHttpStatus(int status);

/// An error as data: a class, a message that says what to fix, and optional details.
struct Error {
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
  /// The request field at fault, when there is one (the `param` of the error shape).
  std::string param;
  /// A server-requested delay before trying again (Retry-After), when given.
  std::optional<std::chrono::milliseconds> retry_after;

  Error() = default;
  Error(ErrorCode c, std::string msg, std::string p = {})
      : code(c), message(std::move(msg)), param(std::move(p)) {}
};

}  // namespace keel
