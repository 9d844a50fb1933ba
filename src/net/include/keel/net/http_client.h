#pragma once
// A blocking HTTP client on libcurl: keep-alive connections reused per calling thread,
// TLS with certificate verification, the usual proxy variables (http_proxy, https_proxy,
// no_proxy) honoured. Thread-safe: each thread uses its own curl handle.

#include <atomic>
#include <chrono>
#include <functional>
#include <string>

#include "keel/core/cancel.h"
#include "keel/core/result.h"
#include "keel/core/tls.h"
#include "keel/net/http.h"

namespace keel::net {

struct ClientRequest {
  std::string method = "GET";
  std::string url;
  Headers headers;
  std::string body;
  /// TCP (and TLS) connect. Default: 2s.
  std::chrono::milliseconds connect_timeout{2000};
  /// The whole exchange. Default: 60s.
  std::chrono::milliseconds total_timeout{60000};
  /// When set, the blocking client abandons the exchange (kCancelled), checked at least
  /// once a second. Must outlive the call. Default: none.
  const std::atomic<bool>* cancelled = nullptr;
  /// When set, the exchange stops at once when it fires (kCancelled): the asynchronous
  /// client closes the connection; the blocking one checks it as `cancelled`. Default: none.
  std::shared_ptr<CancelSignal> cancel;
  /// https:// only: the CAs to trust and the client certificate (keel/core/tls.h).
  /// Default: the system's CA bundle, no client certificate.
  TlsSettings tls;
  /// SendHttp only: the most body bytes read; past it the exchange is abandoned and
  /// answered kInvalidOutput ("answered more than N bytes"), the body not kept.
  /// Default: 0 (no bound).
  std::size_t max_response_bytes = 0;
};

struct ClientResponse {
  int status = 0;
  Headers headers;  // names lower-cased
  std::string body;
  std::string_view Header(std::string_view name) const { return FindHeader(headers, name); }
};

struct StreamTimeouts {
  /// From sending the request to the first body byte. Default: 20s.
  std::chrono::milliseconds first_byte{20000};
  /// Between two body bytes once the body started. Default: 10s.
  std::chrono::milliseconds idle{10000};
};

/// Called once the status and headers are in; return false to abort.
using OnHeaders = std::function<bool(int status, const Headers& headers)>;
/// Called with each piece of the body as it arrives; return false to abort.
using OnData = std::function<bool(std::string_view data)>;

/// Sends one request and delivers its body as it arrives (for server-sent events).
/// Besides the request's connect and total timeouts, fails kTimeout when no body byte
/// came within `timeouts.first_byte`, or none for `timeouts.idle` after the last one
/// (checked at least once a second). An abort by a callback is kCancelled. Returns the
/// status.
Result<int> SendHttpStreaming(const ClientRequest& request, const StreamTimeouts& timeouts,
                              const OnHeaders& on_headers, const OnData& on_data);

/// Sends one request. Transport failures are classified: kTimeout (connect or total
/// deadline passed), kNetwork (refused, reset, DNS); a body past
/// `request.max_response_bytes` is kInvalidOutput. Any HTTP status is a success here;
/// the caller classifies it.
Result<ClientResponse> SendHttp(const ClientRequest& request);

}  // namespace keel::net
