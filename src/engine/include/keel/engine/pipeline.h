#pragma once
// A pipeline definition as it is stored with each run: a run keeps the definition it was
// submitted with, so that changing the config never changes a run in flight.

#include <map>
#include <string>

#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel::engine {

/// The JSON stored in runs.definition. With `all`, the definitions of the pipelines its
/// `pipeline` steps run are embedded too ("pipelines": {NAME: ...}), so that a child run
/// also keeps the definition its parent started with.
json::value DefinitionToJson(const PipelineConfig& pipeline, const std::map<std::string, PipelineConfig>* all = nullptr);

/// Reads a stored definition back. Fails (kInvalidRequest) on a shape this keel cannot run.
Result<PipelineConfig> DefinitionFromJson(const json::value& v);

}  // namespace keel::engine
