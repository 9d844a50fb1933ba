#pragma once
// ECMAScript regular expressions for untrusted text: JSON Schema's `pattern` and a choice
// condition's `matches`.
//
// The engine is Boost.Regex (Perl syntax in ECMAScript mode), not std::regex: it matches
// without recursion, so a long string cannot overflow the stack (libstdc++'s std::regex
// does, from a few kilobytes under ASan and ~30 KB in release), and it gives up on a
// match that would take more than about (string length)^2 steps or 4 MiB of backtracking
// state, e.g. "(a|b)*c" searched in 1,000 "a"s: Search then answers an error, never a
// guess. Patterns and text are matched on code points (UTF-8 is decoded; an invalid byte
// is U+FFFD); \uXXXX escapes and surrogate pairs are understood; \d and \w are ASCII;
// `.` does not match a newline; `^` and `$` anchor the whole text (no multiline).
//
// Thread-safety: a Regex is immutable once compiled; Search may be called from many
// threads at once. Copies are cheap and share the compiled form.

#include <memory>
#include <string>
#include <string_view>

#include "keel/core/result.h"

namespace keel {

class Regex {
 public:
  /// Compiles `source`. A pattern that does not compile is kInvalidRequest, with the
  /// engine's reason.
  static Result<Regex> Compile(std::string_view source);

  /// Whether the pattern matches somewhere in `text` (search semantics, unanchored).
  /// kInvalidRequest when the engine gave up (the match limits above).
  Result<bool> Search(std::string_view text) const;

  /// The pattern as written.
  const std::string& source() const { return source_; }

 private:
  struct Compiled;
  Regex(std::string source, std::shared_ptr<const Compiled> compiled);

  std::string source_;
  std::shared_ptr<const Compiled> compiled_;
};

/// UTF-8 to UTF-32 code points; an invalid byte becomes U+FFFD.
std::wstring DecodeUtf8(std::string_view s);

}  // namespace keel
