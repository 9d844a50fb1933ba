#pragma once
// A blocking HTTP client on libcurl: keep-alive connections reused per calling thread,
// TLS with certificate verification, the usual proxy variables (http_proxy, https_proxy,
// no_proxy) honoured. Thread-safe: each thread uses its own curl handle.

#include <chrono>
#include <string>

#include "keel/core/result.h"
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
};

struct ClientResponse {
  int status = 0;
  Headers headers;  // names lower-cased
  std::string body;
  std::string_view Header(std::string_view name) const { return FindHeader(headers, name); }
};

/// Sends one request. Transport failures are classified: kTimeout (connect or total
/// deadline passed), kNetwork (refused, reset, DNS). Any HTTP status is a success here;
/// the caller classifies it.
Result<ClientResponse> SendHttp(const ClientRequest& request);

}  // namespace keel::net
