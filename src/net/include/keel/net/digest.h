#pragma once
// Message digests as lower-case hex, for content-addressed keys (request fingerprints,
// cache keys, definition ids) and Redis script ids; and base64 for bytes that must travel
// as text. OpenSSL underneath. Thread-safe.

#include <string>
#include <string_view>

namespace keel::net {

/// SHA-256 of `data`, 64 hex digits.
std::string Sha256Hex(std::string_view data);

/// SHA-1 of `data`, 40 hex digits (what Redis names a script by; not for security).
std::string Sha1Hex(std::string_view data);

/// `data` in standard base64 (RFC 4648, with padding, no line breaks).
std::string Base64(std::string_view data);

}  // namespace keel::net
