#include "keel/core/regex.h"

#include <boost/regex.hpp>
#include <cstdio>

namespace keel {

static_assert(sizeof(wchar_t) == 4, "patterns are matched on UTF-32 code points");

struct Regex::Compiled {
  boost::wregex regex;
};

std::wstring DecodeUtf8(std::string_view s) {
  std::wstring out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    std::size_t len = b0 < 0x80           ? 1
                      : (b0 >> 5) == 0x6  ? 2
                      : (b0 >> 4) == 0xE  ? 3
                      : (b0 >> 3) == 0x1E ? 4
                                          : 0;
    char32_t cp = len == 1 ? b0 : len == 2 ? b0 & 0x1F : len == 3 ? b0 & 0x0F : b0 & 0x07;
    bool ok = len != 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      ok = (b & 0xC0) == 0x80;
      cp = (cp << 6) | (b & 0x3F);
    }
    if (!ok) {
      out.push_back(L'\uFFFD');
      ++i;
      continue;
    }
    out.push_back(static_cast<wchar_t>(cp));
    i += len;
  }
  return out;
}

// Translates ECMAScript \uXXXX escapes (and surrogate pairs) into Boost's \x{...}; the
// rest of the pattern is passed through, decoded to code points.
namespace {

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::wstring TranslatePattern(std::string_view source) {
  const std::wstring in = DecodeUtf8(source);
  auto hex4 = [&in](std::size_t at) -> int {
    if (at + 4 > in.size()) return -1;
    int v = 0;
    for (std::size_t k = at; k < at + 4; ++k) {
      const int d = in[k] < 0x80 ? HexDigit(static_cast<char>(in[k])) : -1;
      if (d < 0) return -1;
      v = v * 16 + d;
    }
    return v;
  };
  std::wstring out;
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] != L'\\' || i + 1 >= in.size()) {
      out.push_back(in[i]);
      continue;
    }
    int cp = in[i + 1] == L'u' ? hex4(i + 2) : -1;
    if (cp < 0) {  // another escape: keep it whole, so "\\u" stays a backslash and a 'u'
      out.push_back(in[i]);
      out.push_back(in[++i]);
      continue;
    }
    i += 5;
    if (cp >= 0xD800 && cp <= 0xDBFF && i + 2 < in.size() && in[i + 1] == L'\\' &&
        in[i + 2] == L'u') {
      const int low = hex4(i + 3);
      if (low >= 0xDC00 && low <= 0xDFFF) {
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        i += 6;
      }
    }
    char buf[16];
    const int n = std::snprintf(buf, sizeof buf, "\\x{%X}", static_cast<unsigned>(cp));
    out.append(buf, buf + n);
  }
  return out;
}

}  // namespace

Regex::Regex(std::string source, std::shared_ptr<const Compiled> compiled)
    : source_(std::move(source)), compiled_(std::move(compiled)) {}

Result<Regex> Regex::Compile(std::string_view source) {
  try {
    auto compiled = std::make_shared<const Compiled>(Compiled{boost::wregex(
        TranslatePattern(source), boost::regex::ECMAScript | boost::regex::no_mod_m)});
    return Regex(std::string(source), std::move(compiled));
  } catch (const std::exception& e) {
    return Error(ErrorCode::kInvalidRequest, e.what());
  }
}

Result<bool> Regex::Search(std::string_view text) const {
  try {
    const std::wstring w = DecodeUtf8(text);
    return boost::regex_search(w, compiled_->regex, boost::match_not_dot_newline);
  } catch (const std::exception& e) {
    return Error(ErrorCode::kInvalidRequest, e.what());
  }
}

}  // namespace keel
