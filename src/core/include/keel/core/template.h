#pragma once
// Templating of JSON values: "{{input.ticket}}", "{{steps.plan.output.items.0}}".
// References are dotted paths into a context object; there is no code execution.
//
// A string that is exactly one reference ("{{steps.x.output}}") is replaced by the
// referenced value itself, keeping its JSON type. A reference embedded in other text is
// interpolated: strings as they are, other values as compact JSON.

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

/// Every reference ("steps.plan.output") found in the strings of `tmpl`, in order.
/// A malformed template ("{{" without "}}", an empty or ill-formed path) is an error.
Result<std::vector<std::string>> TemplateReferences(const json::value& tmpl);

}  // namespace keel
