#include "keel/engine/pipeline.h"

namespace keel::engine {

json::value DefinitionToJson(const PipelineConfig& p, const std::map<std::string, PipelineConfig>* all) {
  json::array steps;
  for (const auto& s : p.steps) {
    steps.push_back(json::object{
        {"id", s.id},
        {"kind", StepKindName(s.kind)},
        {"spec", s.spec},
        {"timeout_ms", s.timeout.count()},
        {"retry", json::object{{"max_attempts", s.retry.max_attempts},
                               {"initial_backoff_ms", s.retry.backoff.initial.count()},
                               {"multiplier", s.retry.backoff.multiplier},
                               {"max_backoff_ms", s.retry.backoff.max.count()},
                               {"jitter", s.retry.backoff.jitter == JitterMode::kNone ? 0.0 : s.retry.backoff.jitter_fraction}}},
        {"on_error", s.on_error},
        {"next", s.next}});
  }
  json::object out{{"version", 1}, {"name", p.name}, {"steps", std::move(steps)}};
  if (all != nullptr) {
    json::object children;
    for (const auto& s : p.steps) {
      if (s.kind != StepKind::kPipeline) continue;
      const std::string child(s.spec.at("name").as_string());
      // The config refuses pipelines that run themselves, so this ends.
      if (const auto it = all->find(child); it != all->end() && !children.contains(child)) {
        children[child] = DefinitionToJson(it->second, all);
      }
    }
    if (!children.empty()) out["pipelines"] = std::move(children);
  }
  return out;
}

Result<PipelineConfig> DefinitionFromJson(const json::value& v) {
  auto bad = [](const std::string& why) {
    return Error(ErrorCode::kInvalidRequest, "the run's stored pipeline definition is unusable: " + why);
  };
  if (!v.is_object()) return bad("not an object");
  const auto& o = v.get_object();
  PipelineConfig p;
  if (const auto* n = o.if_contains("name"); n && n->is_string()) p.name = n->get_string();
  const auto* steps = o.if_contains("steps");
  if (!steps || !steps->is_array() || steps->get_array().empty()) return bad("no steps");
  for (const auto& sv : steps->get_array()) {
    if (!sv.is_object()) return bad("a step is not an object");
    const auto& so = sv.get_object();
    StepConfig s;
    const auto* id = so.if_contains("id");
    const auto* kind = so.if_contains("kind");
    if (!id || !id->is_string() || !kind || !kind->is_string()) return bad("a step lacks id or kind");
    s.id = id->get_string();
    const auto k = StepKindFromName(kind->get_string());
    if (!k) return bad("step \"" + s.id + "\" has unknown kind \"" + std::string(kind->get_string()) + "\"");
    s.kind = *k;
    if (const auto* oe = so.if_contains("on_error")) s.on_error = *oe;
    if (const auto* nx = so.if_contains("next"); nx && nx->is_string()) s.next = nx->get_string();
    if (const auto* spec = so.if_contains("spec")) s.spec = *spec;
    if (const auto* t = so.if_contains("timeout_ms"); t && t->is_int64()) s.timeout = Duration(t->get_int64());
    if (const auto* r = so.if_contains("retry"); r && r->is_object()) {
      const auto& ro = r->get_object();
      auto num = [&](const char* k, double def) {
        const auto* x = ro.if_contains(k);
        return x && x->is_number() ? x->to_number<double>() : def;
      };
      s.retry.max_attempts = static_cast<int>(num("max_attempts", 3));
      s.retry.backoff.initial = Duration(static_cast<int64_t>(num("initial_backoff_ms", 1000)));
      s.retry.backoff.multiplier = num("multiplier", 2);
      s.retry.backoff.max = Duration(static_cast<int64_t>(num("max_backoff_ms", 30000)));
      s.retry.backoff.jitter_fraction = num("jitter", 0.2);
      s.retry.backoff.jitter = s.retry.backoff.jitter_fraction == 0 ? JitterMode::kNone : JitterMode::kProportional;
    }
    p.steps.push_back(std::move(s));
  }
  return p;
}

}  // namespace keel::engine
