// Fuzzes the JSON codec every request body goes through (keel::ParseJson: runs, signals,
// tasks, chat completions, embeddings), and the decoders that read JSON keel did not
// write itself: a model's answer (engine::ParseModelJson), a stored run's definition
// (engine::DefinitionFromJson) and a stored error (store::ErrorFromJson). The input is
// one JSON document (or a model's text). Properties: no crash; what ParseJson accepts,
// serialised, parses back to the same value (what keel accepts it can store and read
// back); the canonical form does not depend on key order and is stable.

#include "fuzz_support.h"
#include "keel/engine/pipeline.h"
#include "keel/store/store.h"
#include "steps.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const std::string_view text = fuzz::AsText(data, size);
  auto model = engine::ParseModelJson(text);
  if (model.ok()) (void)json::serialize(*model);

  auto v = ParseJson(text);
  if (!v.ok()) {
    if (v.error().message.empty()) fuzz::Fail("a refusal without a message");
    return 0;
  }
  // What the store writes it reads back and writes again byte for byte.
  const std::string wire = json::serialize(*v);
  auto back = ParseJson(wire);
  if (!back.ok())
    fuzz::Fail("serialised JSON does not parse back", back.error().message + "\n" + wire);
  if ((*back != *v || json::serialize(*back) != wire)) {
    fuzz::Fail("serialised JSON parses back to another value", wire);
  }
  const std::string canonical = CanonicalJson(*v);
  auto reread = ParseJson(canonical);
  if (!reread.ok()) fuzz::Fail("the canonical form does not parse", canonical);
  if (CanonicalJson(*reread) != canonical)
    fuzz::Fail("the canonical form is not stable", canonical);

  for (const char* path : {"input", "input.m", "pipeline", "messages.0.role", "a.0.b", "0"}) {
    if (const auto* p = FindPath(*v, path)) (void)JsonKindName(*p);
  }
  (void)NumberOr(FindPath(*v, "wait_ms"), 0);
  if (v->is_object()) {
    (void)store::ErrorFromJson(*v);
    auto def = engine::DefinitionFromJson(*v);
    if (def.ok()) (void)engine::DefinitionToJson(*def);
  }
  return 0;
}
