#pragma once
// Plain HTTP message types shared by keel's server and client. No Beast or curl types
// leak through this header.

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "keel/core/result.h"

namespace keel::net {

using Headers = std::vector<std::pair<std::string, std::string>>;

/// Percent-encodes everything but RFC 3986's unreserved characters (for query values).
std::string PercentEncode(std::string_view in);

/// Splits a path as sent ("/v1/runs/a%2Fb") on '/' and then percent-decodes each
/// segment: {"v1", "runs", "a/b"}. An escaped slash is part of its segment, never a
/// separator. Empty segments ("//") are dropped. Fails (kInvalidRequest, naming the
/// segment) on a malformed escape ("%zz", a lone "%") and on a segment that decodes to
/// invalid UTF-8 or to a control character (NUL, CR, LF, ...).
Result<std::vector<std::string>> SplitPath(std::string_view raw_path);

/// Case-insensitive lookup; empty when absent.
std::string_view FindHeader(const Headers& headers, std::string_view name);

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // the request target as sent: "/v1/runs?limit=10" (or absolute-form)
  std::string path;    // the path as sent, still percent-encoded, without the query: "/v1/runs"
  std::string query;   // raw query without '?': "limit=10"
  /// The path's segments, each percent-decoded (SplitPath): route on these, never on a
  /// decoded path, so that "%2F" stays inside its segment. "/v1/runs/a%2Fb" gives
  /// {"v1", "runs", "a/b"}.
  std::vector<std::string> segments;
  Headers headers;
  std::string body;
  std::string remote;  // "127.0.0.1:50412"

  std::string_view Header(std::string_view name) const { return FindHeader(headers, name); }
  /// The decoded value of a query parameter; empty when absent.
  std::string QueryParam(std::string_view name) const;
  bool HasQueryParam(std::string_view name) const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  Headers headers;
  std::string body;
  /// Close the connection after this response.
  bool close = false;
  /// Do not answer: reset the TCP connection (RST). For fault injection only.
  bool reset_connection = false;
};

}  // namespace keel::net
