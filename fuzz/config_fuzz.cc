// Fuzzes the YAML config (ParseConfig, keel/core/config.h: what `keel config check`
// runs). The input is a keel.yaml. ${NAME} references resolve to "fuzz" for names that
// start with "SET" and to nothing otherwise. Properties: no crash, no hang (YAML alias
// bombs are refused by the config reader's bounds); every pipeline of an accepted config
// is stored and read back as each run keeps it
// (engine::DefinitionToJson / DefinitionFromJson) and its input_schema compiles.

#include <algorithm>

#include "fuzz_support.h"
#include "keel/core/config.h"
#include "keel/core/json_schema.h"
#include "keel/engine/pipeline.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const std::string_view yaml = fuzz::AsText(data, size);
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
    // The store reads definitions back with ParseStoredJson (the codec's depth plus the
    // store's envelope).
    auto reread = ParseStoredJson(text);
    if (!reread.ok())
      fuzz::Fail("a stored definition does not parse back", reread.error().message + "\n" + text);
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
