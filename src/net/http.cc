#include "keel/net/http.h"

#include <strings.h>

#include <boost/url/decode_view.hpp>
#include <boost/url/parse.hpp>
#include <boost/url/pct_string_view.hpp>
#include <boost/url/src.hpp>  // Boost.URL compiled here, once, for all of keel.

#include "keel/core/json.h"  // IsValidUtf8

namespace keel::net {

std::string PercentEncode(std::string_view in) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(in.size());
  for (unsigned char c : in) {
    const bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                            (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' || c == '~';
    if (unreserved) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

Result<std::vector<std::string>> SplitPath(std::string_view raw_path) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos < raw_path.size()) {
    if (raw_path[pos] == '/') {
      ++pos;
      continue;
    }
    auto end = raw_path.find('/', pos);
    if (end == std::string_view::npos) end = raw_path.size();
    const std::string_view raw = raw_path.substr(pos, end - pos);
    pos = end;
    auto escaped = boost::urls::make_pct_string_view(raw);
    if (!escaped) {
      return Error(ErrorCode::kInvalidRequest,
                   "malformed percent-encoding in the path segment \"" + std::string(raw) +
                       "\": write '%' as %25 and escape bytes as %XX with two hex digits");
    }
    std::string segment;
    segment.reserve(raw.size());
    for (char c : boost::urls::decode_view(*escaped)) segment.push_back(c);
    bool control = false;
    for (unsigned char c : segment) control = control || c < 0x20 || c == 0x7F;
    if (control || !IsValidUtf8(segment)) {
      return Error(ErrorCode::kInvalidRequest,
                   "the path segment \"" + std::string(raw) +
                       "\" decodes to a control character or to invalid UTF-8; "
                       "percent-encode UTF-8 text only");
    }
    out.push_back(std::move(segment));
  }
  return out;
}

std::string_view FindHeader(const Headers& headers, std::string_view name) {
  for (const auto& [k, v] : headers) {
    if (k.size() == name.size() && strncasecmp(k.data(), name.data(), name.size()) == 0) return v;
  }
  return {};
}

namespace {
template <typename Fn>
void ForEachParam(std::string_view query, Fn&& fn) {
  auto params = boost::urls::parse_query(query);
  if (!params) return;
  for (const auto& p : *params) {
    if (!fn(p)) return;
  }
}
}  // namespace

std::string HttpRequest::QueryParam(std::string_view name) const {
  std::string out;
  ForEachParam(query, [&](const boost::urls::param_pct_view& p) {
    if (p.key.decode() != name) return true;
    out = p.value.decode();
    return false;
  });
  return out;
}

bool HttpRequest::HasQueryParam(std::string_view name) const {
  bool found = false;
  ForEachParam(query, [&](const boost::urls::param_pct_view& p) {
    found = p.key.decode() == name;
    return !found;
  });
  return found;
}

}  // namespace keel::net
