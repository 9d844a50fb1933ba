#pragma once
// A tiny JSON-over-HTTP client for tests.

#include <chrono>
#include <functional>
#include <string>

#include "keel/core/json.h"
#include "keel/net/http.h"

namespace keel::testing {

struct JsonResponse {
  int status = 0;  // 0: the request did not get an answer
  json::value body;
  std::string raw;
  net::Headers headers;
  std::string_view Header(std::string_view name) const { return net::FindHeader(headers, name); }
};

JsonResponse HttpGet(const std::string& url);
JsonResponse HttpPost(const std::string& url, const std::string& body, net::Headers headers = {});
JsonResponse HttpPostJson(const std::string& url, const json::value& body, net::Headers headers = {});

/// Polls `fn` (real time, 10 ms apart) until it returns true or `timeout` passes. For
/// waiting on another process; never a stand-in for synchronisation within one.
bool Eventually(const std::function<bool()>& fn, std::chrono::milliseconds timeout = std::chrono::seconds(30));

}  // namespace keel::testing
