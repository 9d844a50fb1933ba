// Fuzzes JSON Schema (keel/core/json_schema.h): "SCHEMA\n@@\nINSTANCE", both JSON.
// Properties: no crash and no hang (patterns are matched with a bounded engine);
// Validate and IsValid agree; a failure names the instance path in `param`.

#include "fuzz_support.h"
#include "keel/core/json_schema.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const auto [schema_text, instance_text] = fuzz::SplitInput(fuzz::AsText(data, size));
  auto schema = ParseJson(schema_text);
  if (!schema.ok()) return 0;
  auto compiled = JsonSchema::Compile(*schema);
  if (!compiled.ok()) return 0;
  auto instance = ParseJson(instance_text);
  const json::value v =
      instance.ok() ? std::move(instance).value() : json::value(json::string(instance_text));
  const auto verdict = compiled->Validate(v);
  if (verdict.ok() != compiled->IsValid(v))
    fuzz::Fail("Validate and IsValid disagree", json::serialize(*schema));
  if (!verdict.ok() && verdict.error().param.rfind('$', 0) != 0) {
    fuzz::Fail("a violation without an instance path", verdict.error().message);
  }
  // A compiled schema is immutable: validating again gives the same verdict.
  if (compiled->IsValid(v) != verdict.ok()) fuzz::Fail("IsValid changed its answer");
  return 0;
}
