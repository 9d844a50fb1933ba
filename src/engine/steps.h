#pragma once
// The step runners of every kind but `map` (which the engine runs itself) and `task`
// (external workers; the engine parks the run and the API hands the task out).

#include <functional>
#include <map>
#include <memory>

#include "keel/core/lru.h"
#include "keel/core/random.h"
#include "keel/core/regex.h"
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

/// The compiled regular expressions of `matches` conditions, so that each pattern of a
/// definition is compiled once, not per evaluation. Bounded (1,024 patterns, least
/// recently used forgotten). Thread-safe.
class PatternCache {
 public:
  /// The compiled `source`; an error (kInvalidRequest) when it does not compile.
  Result<Regex> Get(std::string_view source);

 private:
  LruMap<Regex> compiled_{1024};
};

/// Whether a choice condition (keel.yaml: {value, equals|...} or {all|any|not}) holds in
/// `scope`. A reference to nothing is a missing value: only `exists: false` holds then.
/// A malformed condition (from a stored definition) and a `matches` the regex engine
/// gives up on are kInvalidRequest errors, never a crash. `patterns` (optional, not
/// owned) caches compiled regular expressions.
Result<bool> EvaluateCondition(const json::value& condition, const TemplateContext& scope,
                               PatternCache* patterns = nullptr);

/// The text of an llm answer as JSON: the whole text, or the first fenced ```json block.
Result<json::value> ParseModelJson(std::string_view text);

}  // namespace keel::engine
