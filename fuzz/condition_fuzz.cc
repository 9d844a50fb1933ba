// Fuzzes choice conditions (EvaluateCondition, src/engine/steps.h) the way they reach
// it: "CONDITION\n@@\nSCOPE", both JSON. The condition is put into a pipeline's choice
// step and the config goes through ParseConfig (what `keel config check` runs); a
// condition the config accepts is then evaluated against the scope (a run's {input,
// steps}). Property: whatever `keel config check` accepts evaluates without a crash.

#include "fuzz_support.h"
#include "keel/core/config.h"
#include "steps.h"

namespace {

// TODO(issue 10, item 4; the lead is replacing std::regex in steps.cc): `matches` uses
// std::regex, which overflows the stack on long strings and backtracks exponentially,
// and `matches: 123` passes config check and then throws ("not a string"). Both are
// known; until the fix lands such inputs are skipped. Remove this function then.
bool HitsKnownMatchesBug(const keel::json::value& c, const keel::json::value& scope) {
  if (c.is_array()) {
    for (const auto& x : c.get_array()) {
      if (HitsKnownMatchesBug(x, scope)) return true;
    }
    return false;
  }
  if (!c.is_object()) return false;
  for (const auto& kv : c.get_object()) {
    if (kv.key() == "matches") {
      if (!kv.value().is_string()) return true;
      if (kv.value().get_string().size() > 16 || keel::fuzz::LongestString(scope) > 24) return true;
    }
    if (HitsKnownMatchesBug(kv.value(), scope)) return true;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const auto [cond_text, scope_text] = fuzz::SplitInput(fuzz::AsText(data, size));
  auto cond = ParseJson(cond_text);
  if (!cond.ok()) return 0;
  auto parsed_scope = ParseJson(scope_text);
  const json::value scope =
      parsed_scope.ok() ? std::move(parsed_scope).value() : json::value(json::object{});

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
  for (const auto& c : spec.at("cases").as_array()) {
    const json::value& when = c.at("when");
    if (HitsKnownMatchesBug(when, scope)) continue;
    auto holds = engine::EvaluateCondition(when, scope);
    if (holds.ok()) (void)*holds;
  }
  return 0;
}
