// Fuzzes the YAML config (ParseConfig, keel/core/config.h: what `keel config check`
// runs). The input is a keel.yaml. ${NAME} references resolve to "fuzz" for names that
// start with "SET" and to nothing otherwise. Properties: no crash, no hang; every
// pipeline of an accepted config is stored and read back as each run keeps it
// (engine::DefinitionToJson / DefinitionFromJson) and its input_schema compiles.

#include <algorithm>

#include "fuzz_support.h"
#include "keel/core/config.h"
#include "keel/core/json_schema.h"
#include "keel/engine/pipeline.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const std::string_view yaml = fuzz::AsText(data, size);
  // TODO(issue 10, item 5; the lead is bounding alias expansion in config.cc): a YAML
  // alias bomb takes unbounded time and memory today. Until that lands, inputs with more
  // than 8 aliases (which bounds the expansion to a few dozen copies) are skipped.
  if (std::count(yaml.begin(), yaml.end(), '*') > 8) return 0;
  const EnvLookup env = [](const std::string& name) -> std::optional<std::string> {
    if (name.rfind("SET", 0) == 0) return std::string("fuzz");
    return std::nullopt;
  };
  auto config = ParseConfig(yaml, env, "fuzz.yaml");
  if (!config.ok()) {
    if (config.error().message.empty()) fuzz::Fail("a refusal without a message");
    return 0;
  }
  for (const auto& [name, pipeline] : config->pipelines) {
    const json::value stored = engine::DefinitionToJson(pipeline, &config->pipelines);
    const std::string text = json::serialize(stored);
    auto reread = ParseJson(text);
    if (!reread.ok()) {
      // TODO(issue 10, item 1; the lead's one JSON codec): a config value may hold a
      // non-finite number or nest deeper than the store reads back. Known; skipped.
      if (fuzz::HasNonFinite(stored) || fuzz::Depth(stored) > 32) continue;
      fuzz::Fail("a stored definition does not parse back", text);
    }
    auto back = engine::DefinitionFromJson(*reread);
    if (!back.ok())
      fuzz::Fail("a stored definition does not read back", back.error().message + "\n" + text);
    if (back->steps.size() != pipeline.steps.size()) fuzz::Fail("a definition lost steps", text);
    if (!pipeline.input_schema.is_null() && !JsonSchema::Compile(pipeline.input_schema).ok()) {
      fuzz::Fail("config check accepted an input_schema that does not compile", text);
    }
  }
  return 0;
}
