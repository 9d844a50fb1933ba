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
#include <vector>

#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel {

/// Renders every string inside `tmpl` against `context`. A reference to a missing value
/// is an kInvalidRequest error naming the reference.
Result<json::value> RenderTemplate(const json::value& tmpl, const json::value& context);

/// Renders one string; the result is always a string.
Result<std::string> RenderTemplateString(std::string_view tmpl, const json::value& context);

/// How a caller escapes a value interpolated into a string of its own syntax (a URL): it
/// gets the value's text and the byte offset of its reference in the template, and
/// answers the text to insert, or an error (which names the reference).
using TemplateEscape =
    std::function<Result<std::string>(std::string_view value, std::size_t offset)>;

/// Renders one string, every reference through `escape`, except a raw one:
/// "{{{input.path}}}" (triple braces, as in Mustache) inserts the value as it is. The
/// result is always a string, even for a template that is one reference.
Result<std::string> RenderTemplateString(std::string_view tmpl, const json::value& context,
                                         const TemplateEscape& escape);

/// Every reference ("steps.plan.output") found in the strings of `tmpl`, in order.
/// A malformed template ("{{" without "}}", an empty or ill-formed path) is an error.
Result<std::vector<std::string>> TemplateReferences(const json::value& tmpl);

}  // namespace keel
