// Fuzzes templates (keel/core/template.h): a template and the scope it is rendered
// against, "TEMPLATE\n@@\nSCOPE", both JSON. A template that is not JSON is used as one
// template string. Properties: no crash; every reference TemplateReferences lists in a
// template that renders is present in the scope; rendering the same thing twice gives
// the same answer.

#include "fuzz_support.h"
#include "keel/core/template.h"

namespace {

void Strings(const keel::json::value& v, std::vector<std::string_view>& out) {
  if (v.is_string()) out.emplace_back(v.get_string());
  if (v.is_array()) {
    for (const auto& x : v.get_array()) Strings(x, out);
  }
  if (v.is_object()) {
    for (const auto& kv : v.get_object()) Strings(kv.value(), out);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const auto [tmpl_text, scope_text] = fuzz::SplitInput(fuzz::AsText(data, size));
  auto parsed_tmpl = ParseJson(tmpl_text);
  json::value tmpl =
      parsed_tmpl.ok() ? std::move(parsed_tmpl).value() : json::value(json::string(tmpl_text));
  auto parsed_scope = ParseJson(scope_text);
  const json::value scope =
      parsed_scope.ok() ? std::move(parsed_scope).value() : json::value(json::object{});

  auto refs = TemplateReferences(tmpl);
  auto rendered = RenderTemplate(tmpl, scope);
  if (rendered.ok()) {
    if (!refs.ok())
      fuzz::Fail("RenderTemplate accepted a template TemplateReferences refused",
                 refs.error().message);
    for (const auto& r : *refs) {
      if (FindPath(scope, r) == nullptr) fuzz::Fail("rendered, yet a reference names nothing", r);
    }
    auto again = RenderTemplate(tmpl, scope);
    if (!again.ok() || *again != *rendered) fuzz::Fail("rendering is not deterministic");
    (void)json::serialize(*rendered);
  }
  std::vector<std::string_view> strings;
  Strings(tmpl, strings);
  for (auto s : strings) {
    auto one = RenderTemplateString(s, scope);
    if (one.ok()) (void)one->size();
  }
  return 0;
}
