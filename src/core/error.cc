#include "keel/core/error.h"

#include <array>
#include <utility>

namespace keel {
namespace {

constexpr std::array<std::pair<ErrorCode, std::string_view>, 19> kNames{{
    {ErrorCode::kRateLimited, "rate_limited"},
    {ErrorCode::kOverloaded, "overloaded"},
    {ErrorCode::kServerError, "server_error"},
    {ErrorCode::kTimeout, "timeout"},
    {ErrorCode::kNetwork, "network"},
    {ErrorCode::kContextLength, "context_length"},
    {ErrorCode::kContentPolicy, "content_policy"},
    {ErrorCode::kInvalidRequest, "invalid_request"},
    {ErrorCode::kAuth, "auth"},
    {ErrorCode::kInvalidOutput, "invalid_output"},
    {ErrorCode::kNotFound, "not_found"},
    {ErrorCode::kConflict, "conflict"},
    {ErrorCode::kLeaseLost, "lease_lost"},
    {ErrorCode::kPayloadTooLarge, "payload_too_large"},
    {ErrorCode::kQueueFull, "queue_full"},
    {ErrorCode::kCancelled, "cancelled"},
    {ErrorCode::kUnavailable, "unavailable"},
    {ErrorCode::kWorkerLost, "worker_lost"},
    {ErrorCode::kInternal, "internal"},
}};

}  // namespace

std::string_view ErrorCodeName(ErrorCode code) {
  for (const auto& [c, name] : kNames) {
    if (c == code) return name;
  }
  return "internal";
}

std::optional<ErrorCode> ErrorCodeFromName(std::string_view name) {
  for (const auto& [c, n] : kNames) {
    if (n == name) return c;
  }
  return std::nullopt;
}

bool FailsOver(ErrorCode code) {
  switch (code) {
    case ErrorCode::kRateLimited:
    case ErrorCode::kOverloaded:
    case ErrorCode::kServerError:
    case ErrorCode::kTimeout:
    case ErrorCode::kNetwork:
    case ErrorCode::kInvalidOutput:
      return true;
    default:
      return false;
  }
}

bool IsRetryable(ErrorCode code) {
  // What another target may answer may also succeed later, as may keel's own storage.
  return FailsOver(code) || code == ErrorCode::kUnavailable || code == ErrorCode::kLeaseLost;
}

int HttpStatusFor(ErrorCode code) {
  switch (code) {
    case ErrorCode::kRateLimited:
    case ErrorCode::kQueueFull:
      return 429;
    case ErrorCode::kOverloaded:
    case ErrorCode::kUnavailable:
      return 503;
    case ErrorCode::kServerError:
    case ErrorCode::kNetwork:
    case ErrorCode::kInvalidOutput:
      return 502;
    case ErrorCode::kTimeout:
      return 504;
    case ErrorCode::kContextLength:
    case ErrorCode::kInvalidRequest:
    case ErrorCode::kContentPolicy:
      return 400;
    case ErrorCode::kAuth:
      return 401;
    case ErrorCode::kNotFound:
      return 404;
    case ErrorCode::kConflict:
    case ErrorCode::kLeaseLost:
    case ErrorCode::kCancelled:
      return 409;
    case ErrorCode::kPayloadTooLarge:
      return 413;
    case ErrorCode::kWorkerLost:
    case ErrorCode::kInternal:
      return 500;
  }
  return 500;
}

ErrorCode ClassifyHttpStatus(int status) {
  switch (status) {
    case 429:
      return ErrorCode::kRateLimited;
    case 401:
    case 403:
      return ErrorCode::kAuth;
    case 408:
      return ErrorCode::kTimeout;
    case 413:
      return ErrorCode::kContextLength;
    case 503:
    case 529:
      return ErrorCode::kOverloaded;
    default:
      break;
  }
  if (status >= 500) return ErrorCode::kServerError;
  return ErrorCode::kInvalidRequest;
}

}  // namespace keel
