#pragma once
// Templating of JSON values: "{{input.ticket}}", "{{steps.plan.output.items.0}}".
// References are dotted paths into a context object; there is no code execution.
//
// A string that is exactly one reference ("{{steps.x.output}}") is replaced by the
// referenced value itself, keeping its JSON type. A reference embedded in other text is
// interpolated: strings as they are, other values as compact JSON. "{{{ref}}}" is the same
// reference, marked raw for RenderTemplateString with an escape (below).

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel {

/// What references are resolved against: a JSON value (its top-level names are the
/// references' first segments), and names bound to values of their own that shadow the
/// root's ("input" to the run's input, "item" to a map's element). Every value is
/// borrowed, never copied, so a map's items share the run's scope: they must outlive
/// the context. Implicit from a json::value, so a plain value is a context.
class TemplateContext {
 public:
  TemplateContext() = default;  // no root: only bound names resolve
  TemplateContext(const json::value& root) : root_(&root) {}  // NOLINT(google-explicit-constructor)

  /// Binds `name` (one path segment) to `value`; a second binding of a name replaces the
  /// first. Bindings are few (a linear lookup).
  TemplateContext& Bind(std::string name, const json::value& value);

  /// The value at a dotted path ("steps.plan.output.0"), or nullptr (as FindPath).
  const json::value* Find(std::string_view dotted_path) const;

 private:
  const json::value* root_ = nullptr;
  std::vector<std::pair<std::string, const json::value*>> names_;
};

/// The value `tmpl` refers to when it is a string that is exactly one reference
/// ("{{input.items}}"), borrowed from `context`; nullptr otherwise (another template, or a
/// reference to nothing). RenderTemplate would give a copy of the same value.
const json::value* FindReferenced(const json::value& tmpl, const TemplateContext& context);

/// Renders every string inside `tmpl` against `context`. A reference to a missing value
/// is an kInvalidRequest error naming the reference.
Result<json::value> RenderTemplate(const json::value& tmpl, const TemplateContext& context);

/// Renders one string; the result is always a string.
Result<std::string> RenderTemplateString(std::string_view tmpl, const TemplateContext& context);

/// How a caller escapes a value interpolated into a string of its own syntax (a URL): it
/// gets the value's text and the byte offset of its reference in the template, and
/// answers the text to insert, or an error (which names the reference).
using TemplateEscape =
    std::function<Result<std::string>(std::string_view value, std::size_t offset)>;

/// Renders one string, every reference through `escape`, except a raw one:
/// "{{{input.path}}}" (triple braces, as in Mustache) inserts the value as it is. The
/// result is always a string, even for a template that is one reference.
Result<std::string> RenderTemplateString(std::string_view tmpl, const TemplateContext& context,
                                         const TemplateEscape& escape);

/// Every reference ("steps.plan.output") found in the strings of `tmpl`, in order.
/// A malformed template ("{{" without "}}", an empty or ill-formed path) is an error.
Result<std::vector<std::string>> TemplateReferences(const json::value& tmpl);

}  // namespace keel
