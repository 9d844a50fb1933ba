#pragma once
// Secrets: the configured secret strings (provider API keys, configured header values,
// passwords in URLs) that must never appear in text keel passes on or keeps. Filled once
// at start-up from the config; applied where foreign text enters keel (an upstream's error
// body, a tool's error message) and in the log sink, so that whatever a provider or tool
// echoes back (e.g. the request's Authorization header in a 400 body) is scrubbed before
// it reaches a client error, a stored run error, an event or a log line.
//
// Thread-safe: Add and Redact may be called from any thread (a shared mutex; Redact takes
// it shared). Redact costs one substring search per registered form of each secret.

#include <cstddef>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

namespace keel {

class SecretRedactor {
 public:
  /// Secrets shorter than this are ignored: replacing a 3-letter password everywhere would
  /// mangle ordinary text and hides nothing worth hiding. Default: 6 bytes.
  static constexpr std::size_t kMinLength = 6;
  /// What each occurrence is replaced with.
  static constexpr std::string_view kMask = "***";

  /// Registers `secret` (and its JSON-escaped and percent-decoded forms when they differ,
  /// since an echo may carry either). Ignored when shorter than kMinLength. Idempotent.
  void Add(std::string_view secret);
  /// Registers the password of `url`'s userinfo (`scheme://user:PASSWORD@host`) and of a
  /// `password=` query parameter, if any. A URL without one adds nothing.
  void AddUrlPasswords(std::string_view url);
  /// `text` with every occurrence of every registered secret replaced by kMask (longest
  /// secrets first, so a secret that contains another is masked whole).
  std::string Redact(std::string_view text) const;
  /// True when no secret is registered (Redact then returns its input).
  bool empty() const;
  /// Forgets every secret (tests; a config reload that starts over).
  void Clear();

 private:
  mutable std::shared_mutex mu_;
  std::vector<std::string> secrets_;  // GUARDED_BY(mu_), longest first, no duplicates
};

/// The process-wide redactor: filled by `keel serve` / `keel worker` from the config at
/// start-up, read by the gateway, the step runners and the JSON log sink.
SecretRedactor& Secrets();

/// Shorthand for Secrets().Redact(text).
std::string RedactSecrets(std::string_view text);

}  // namespace keel
