#pragma once
// The step runners of every kind but `map` (which the engine runs itself) and `task`
// (external workers; the engine parks the run and the API hands the task out).

#include <functional>
#include <map>
#include <memory>

#include "keel/core/random.h"
#include "keel/engine/step.h"
#include "keel/gateway/gateway.h"
#include "keel/store/store.h"

namespace keel::engine {

/// What runners may use besides their context. Everything must outlive the runners.
struct StepServices {
  gateway::Gateway& gateway;
  store::Store& store;
  Random& random;
  const EngineConfig& config;
};

/// One runner per kind.
std::map<StepKind, std::unique_ptr<StepRunner>> MakeStepRunners(const StepServices& services);

/// Whether a choice condition (keel.yaml: {value, equals|...} or {all|any|not}) holds in
/// `scope`. A reference to nothing is a missing value: only `exists: false` holds then.
Result<bool> EvaluateCondition(const json::value& condition, const json::value& scope);

/// The text of an llm answer as JSON: the whole text, or the first fenced ```json block.
Result<json::value> ParseModelJson(std::string_view text);

}  // namespace keel::engine
