#pragma once
// JSON helpers over Boost.JSON: the one codec for every JSON value keel accepts, stores or
// passes on; a canonical form for comparing request bodies; dotted-path lookup.
//
// The codec's rules (JsonLimits) hold at every door: request bodies, tool and model
// answers, signal payloads, config values, template results, and the store's reads. So
// whatever keel accepted it can write and read back, byte for byte:
//   - nesting at most JsonLimits::kMaxDepth levels (arrays and objects);
//   - numbers finite: 1e400 is refused, never turned into infinity;
//   - integers exact: an integer literal beyond 64 bits (signed or unsigned) is refused,
//     never silently turned into a double;
//   - text valid UTF-8, in keys and strings.
// A refusal names the byte offset and the path of the value at fault (`param`).

#include <boost/json.hpp>
#include <cstddef>
#include <string>
#include <string_view>

#include "keel/core/result.h"

namespace keel {

namespace json = boost::json;

/// The limits of the codec, stated once.
struct JsonLimits {
  /// The deepest nesting a value may have: a run input, an output, a payload.
  static constexpr std::size_t kMaxDepth = 64;
  /// The levels the store's own documents add around such values (a step record around
  /// its output, signals by name, a map's items): stored documents are read with
  /// kMaxDepth + kEnvelopeDepth.
  static constexpr std::size_t kEnvelopeDepth = 16;
};

/// Parses one JSON document under JsonLimits (depth kMaxDepth). Errors are
/// kInvalidRequest; the message names the byte offset, the path and the cause, and
/// `param` holds the path ("input.m") when the fault is inside a value.
Result<json::value> ParseJson(std::string_view text);

/// The same rules for documents the store wrote (depth kMaxDepth + kEnvelopeDepth).
Result<json::value> ParseStoredJson(std::string_view text);

/// The same rules with a depth of `max_depth`.
Result<json::value> ParseJsonWithDepth(std::string_view text, std::size_t max_depth);

/// Checks a value built in memory (a template's result, a tool's text, a config value)
/// against the codec's rules, so that it can be stored and read back: depth at most
/// `max_depth`, finite numbers, valid UTF-8 in every key and string. The error
/// (kInvalidRequest) names the path below `what` ("steps.x.output.a.0").
Result<void> CheckJsonLimits(const json::value& v, std::string_view what,
                             std::size_t max_depth = JsonLimits::kMaxDepth);

/// Whether `text` is valid UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
bool IsValidUtf8(std::string_view text);

/// `text` with every byte that is not part of a valid UTF-8 sequence replaced by U+FFFD
/// (a sequence cut at the end included): for messages that quote foreign text.
std::string ToValidUtf8(std::string_view text);

/// Serialises with object keys sorted at every level, so that two documents that differ
/// only in key order have the same canonical form.
std::string CanonicalJson(const json::value& v);

/// Looks up "a.b.0.c" (object keys and array indices). Returns nullptr when a segment is
/// missing or the value has the wrong kind. Does not own; valid while `root` is.
const json::value* FindPath(const json::value& root, std::string_view dotted_path);

/// The name of a value's kind for error messages: "object", "array", "string", ...
std::string_view JsonKindName(const json::value& v);

/// `*v` as a double when it is a number; otherwise (absent, another kind) `fallback`.
double NumberOr(const json::value* v, double fallback);

}  // namespace keel
