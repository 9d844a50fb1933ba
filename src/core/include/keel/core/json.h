#pragma once
// JSON helpers over Boost.JSON: parsing into a Result, a canonical form for comparing
// request bodies, and dotted-path lookup.

#include <boost/json.hpp>
#include <string>
#include <string_view>

#include "keel/core/result.h"

namespace keel {

namespace json = boost::json;

/// Parses one JSON document. The error message names the byte offset and the cause.
Result<json::value> ParseJson(std::string_view text);

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
