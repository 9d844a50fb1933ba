#pragma once
// How one kind of step executes. The executor is open for more kinds: each kind is a
// StepRunner registered by kind; the engine knows none of them by name.

#include <memory>
#include <string>

#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel::engine {

struct StepContext {
  const std::string& run_id;
  const StepConfig& step;
  int attempt = 1;
  /// {"input": ..., "steps": {ID: {"output": ..., ...}}}: what templates may reference.
  const json::value& scope;
  /// Stable across attempts of this step of this run: "<run_id>/<step_id>".
  const std::string& idempotency_key;
};

/// The checkpoint a step leaves: {"output": ...} plus kind-specific fields (an llm step
/// adds "text", "model", "provider", "usage"). Templates see it as steps.ID.
using StepRecordJson = json::object;

class StepRunner {
 public:
  virtual ~StepRunner() = default;
  /// Executes one attempt. Blocking; bounded by the step's timeout.
  virtual Result<StepRecordJson> Run(const StepContext& ctx) = 0;
};

}  // namespace keel::engine
