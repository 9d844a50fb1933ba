#pragma once
// JsonSchema: a JSON Schema validator for Boost.JSON values, compiled once and applied
// many times (to a step's output, a request body, an LLM's structured answer).
//
// Dialect. Draft 2020-12 semantics for the keywords below; draft-07 (and draft-06)
// documents are accepted too. A root "$schema" of draft-06/07 selects the one rule that
// differs for these keywords: a "$ref" makes its sibling keywords ignored. Array-form
// "items" (with "additionalItems") is read as the draft-07 spelling of "prefixItems"
// (with "items") in any dialect.
//
// Keywords validated: type, enum, const; minimum, maximum, exclusiveMinimum,
// exclusiveMaximum (numbers), multipleOf; minLength, maxLength (in code points), pattern;
// prefixItems, items, minItems, maxItems, uniqueItems; properties, patternProperties,
// additionalProperties, required, minProperties, maxProperties; allOf, anyOf, oneOf, not;
// $ref to a JSON Pointer in the same document ("#", "#/$defs/x", "#/definitions/x", ...),
// with $defs / definitions. Boolean schemas (true / false).
// Annotations accepted and ignored: $schema (root: selects the dialect), $id (root only),
// title, description, default, examples, $comment, format, deprecated, readOnly, writeOnly.
//
// Strictness: Compile refuses every other keyword, and every malformed keyword value,
// with an error naming the keyword and the JSON Pointer of the schema object ("unsupported
// JSON Schema keyword \"if\" at #/properties/x"): a compiled schema never checks less than
// it says. It also refuses non-local $ref, $id in subschemas, $ref cycles that never
// descend into the instance ({"$ref": "#"}), and schemas nested deeper than kMaxDepth.
//
// Semantics worth knowing:
// - Numbers compare by mathematical value: 1 == 1.0, "integer" accepts 3.0, int64 and
//   uint64 compare exactly (as long double). multipleOf is exact when both numbers are
//   integers; otherwise it accepts a quotient within 2^-50 (relative) of an integer, which
//   absorbs binary rounding (0.0075 is a multiple of 0.0001) but cannot tell apart
//   quotients past 2^49; a quotient beyond the range of double is not a multiple.
// - enum, const and uniqueItems compare JSON values structurally (object key order does
//   not matter; 1 equals 1.0).
// - pattern and patternProperties are ECMAScript regular expressions with search
//   semantics (unanchored), matched on code points (the string is decoded from UTF-8;
//   \uXXXX escapes are understood; \d and \w are ASCII). The engine is Boost.Regex (Perl
//   syntax in ECMAScript mode), not std::regex: it matches without recursion, so a long
//   string cannot overflow the stack (libstdc++'s std::regex does, from a few kilobytes
//   under ASan and ~30 KB in release), and it gives up on a match that would take more
//   than about (string length)^2 steps or 4 MiB of backtracking state, e.g. "(a|b)*c"
//   searched in 1,000 "a"s. Giving up, like an instance nested deeper than kMaxDepth,
//   makes Validate fail with an error ("could not match the pattern ...") even under
//   "not" or "anyOf", never pass.
//
// Thread-safety: a JsonSchema is immutable once compiled; Validate may be called from
// many threads at once. Copies are cheap and share the compiled form.

#include <memory>

#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel {

namespace detail {
struct CompiledSchema;
}  // namespace detail

class JsonSchema {
 public:
  /// The deepest nesting Compile accepts in a schema, and Validate follows: schemas
  /// evaluated inside one another (properties, items, $ref, allOf, ...) for one instance.
  static constexpr int kMaxDepth = 128;

  /// Checks `schema` and compiles it, copying what it needs (the result does not refer to
  /// `schema`). Errors are kInvalidRequest; `param` is the JSON Pointer of the offending
  /// schema location ("#/properties/age/minimum").
  static Result<JsonSchema> Compile(const json::value& schema);

  /// Ok, or the first violation found: Error(kInvalidRequest, message, param) where
  /// `param` is the path of the failing instance location ("$", "$.items[2].name",
  /// "$[\"odd key\"]") and the message starts with it and says what was expected and
  /// what was found ("$.age: expected an integer >= 0, got -3",
  /// "$: missing required property \"name\"").
  Result<void> Validate(const json::value& instance) const;

  /// Whether Validate would return Ok, without building a message. False too when a
  /// limit was hit (see above).
  bool IsValid(const json::value& instance) const;

 private:
  explicit JsonSchema(std::shared_ptr<const detail::CompiledSchema> compiled);

  std::shared_ptr<const detail::CompiledSchema> compiled_;
};

}  // namespace keel
