#pragma once
// The step kinds of this release: llm and transform.

#include <map>
#include <memory>

#include "keel/engine/step.h"
#include "keel/gateway/gateway.h"

namespace keel::engine {

/// One runner per kind. The gateway must outlive the runners.
std::map<StepKind, std::unique_ptr<StepRunner>> MakeStepRunners(gateway::Gateway& gateway);

}  // namespace keel::engine
