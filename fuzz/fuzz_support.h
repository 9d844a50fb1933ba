#pragma once
// Helpers shared by the libFuzzer targets in fuzz/ (docs/fuzzing.md). Header-only; each
// target includes it once.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <utility>

#include "keel/core/json.h"

namespace keel::fuzz {

/// The fuzz input as text.
inline std::string_view AsText(const uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

/// Inputs made of two documents (a template and its scope, a schema and an instance) are
/// split at the first line that holds only "@@": "A\n@@\nB". Without one, the whole input
/// is the first part and the second is empty.
inline constexpr std::string_view kSeparator = "\n@@\n";
inline std::pair<std::string_view, std::string_view> SplitInput(std::string_view text) {
  const auto at = text.find(kSeparator);
  if (at == std::string_view::npos) return {text, {}};
  return {text.substr(0, at), text.substr(at + kSeparator.size())};
}

/// Stops the process the way libFuzzer records as a crash, with a message: for a broken
/// property (a round trip that does not hold), where no sanitizer would notice.
[[noreturn]] inline void Fail(const char* what, std::string_view detail = {}) {
  std::fprintf(stderr, "fuzz property failed: %s\n%.*s\n", what,
               static_cast<int>(std::min<std::size_t>(detail.size(), 4000)), detail.data());
  std::abort();
}

/// Whether `v` holds a non-finite double anywhere (1e400 parses as infinity today).
inline bool HasNonFinite(const json::value& v, int depth = 0) {
  if (depth > 1000) return false;
  if (v.is_double()) return !std::isfinite(v.get_double());
  if (v.is_array()) {
    for (const auto& x : v.get_array()) {
      if (HasNonFinite(x, depth + 1)) return true;
    }
  }
  if (v.is_object()) {
    for (const auto& kv : v.get_object()) {
      if (HasNonFinite(kv.value(), depth + 1)) return true;
    }
  }
  return false;
}

/// The nesting depth of `v` (a scalar is 0, [] is 1).
inline std::size_t Depth(const json::value& v) {
  std::size_t d = 0;
  if (v.is_array()) {
    for (const auto& x : v.get_array()) d = std::max(d, Depth(x));
    return d + 1;
  }
  if (v.is_object()) {
    for (const auto& kv : v.get_object()) d = std::max(d, Depth(kv.value()));
    return d + 1;
  }
  return 0;
}

/// The longest string (or key) anywhere in `v`, in bytes.
inline std::size_t LongestString(const json::value& v) {
  if (v.is_string()) return v.get_string().size();
  std::size_t n = 0;
  if (v.is_array()) {
    for (const auto& x : v.get_array()) n = std::max(n, LongestString(x));
  }
  if (v.is_object()) {
    for (const auto& kv : v.get_object())
      n = std::max({n, kv.key().size(), LongestString(kv.value())});
  }
  return n;
}

}  // namespace keel::fuzz
