#include "keel/net/http.h"

#include <boost/url/parse.hpp>
#include <boost/url/src.hpp>  // Boost.URL compiled here, once, for all of keel.
#include <strings.h>

namespace keel::net {

std::string PercentEncode(std::string_view in) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(in.size());
  for (unsigned char c : in) {
    const bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                            c == '-' || c == '_' || c == '.' || c == '~';
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
