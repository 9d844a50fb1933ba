// Fuzzes choice conditions (EvaluateCondition, src/engine/steps.h) the way they reach
// it: "CONDITION\n@@\nSCOPE", both JSON. The condition is put into a pipeline's choice
// step and the config goes through ParseConfig (what `keel config check` runs); a
// condition the config accepts is then evaluated against the scope (a run's {input,
// steps}). Properties: whatever `keel config check` accepts evaluates without a crash;
// and any JSON at all evaluated as a condition (a stored definition this keel did not
// write) is an answer or an error, never a crash.

#include "fuzz_support.h"
#include "keel/core/config.h"
#include "steps.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const auto [cond_text, scope_text] = fuzz::SplitInput(fuzz::AsText(data, size));
  auto cond = ParseJson(cond_text);
  if (!cond.ok()) return 0;
  auto parsed_scope = ParseJson(scope_text);
  const json::value scope =
      parsed_scope.ok() ? std::move(parsed_scope).value() : json::value(json::object{});

  (void)engine::EvaluateCondition(*cond, scope);

  // JSON is YAML (flow style); the serialised condition lands on one line.
  const std::string yaml =
      "providers: {mock: {type: mock, model: mock-1}}\n"
      "pipelines:\n"
      "  p:\n"
      "    steps:\n"
      "      - id: c\n"
      "        choice:\n"
      "          cases:\n"
      "            - when: " +
      json::serialize(*cond) +
      "\n"
      "              goto: a\n"
      "          default: b\n"
      "      - id: a\n"
      "        transform: {x: 1}\n"
      "        next: end\n"
      "      - id: b\n"
      "        transform: {y: 2}\n";
  auto config = ParseConfig(
      yaml, [](const std::string&) { return std::optional<std::string>(); }, "fuzz.yaml");
  if (!config.ok()) return 0;
  const auto it = config->pipelines.find("p");
  if (it == config->pipelines.end() || it->second.steps.empty())
    fuzz::Fail("the pipeline vanished");
  const json::value& spec = it->second.steps[0].spec;
  static engine::PatternCache patterns;
  for (const auto& c : spec.at("cases").as_array()) {
    auto holds = engine::EvaluateCondition(c.at("when"), scope, &patterns);
    if (holds.ok()) (void)*holds;
  }
  return 0;
}
