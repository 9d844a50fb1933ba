#include "steps.h"

#include "keel/core/template.h"

namespace keel::engine {
namespace {

class LlmStep final : public StepRunner {
 public:
  explicit LlmStep(gateway::Gateway& gateway) : gateway_(gateway) {}

  Result<StepRecordJson> Run(const StepContext& ctx) override {
    const auto& spec = ctx.step.spec.as_object();
    auto messages = RenderTemplate(spec.at("messages"), ctx.scope);
    if (!messages.ok()) return std::move(messages).error();
    gateway::ChatRequest req;
    req.route = json::value_to<std::string>(spec.at("route"));
    req.body["messages"] = std::move(messages).value();
    if (const auto* t = spec.if_contains("temperature"); t && t->is_number()) req.body["temperature"] = *t;
    if (const auto* m = spec.if_contains("max_tokens"); m && m->is_int64()) req.body["max_tokens"] = *m;
    req.idempotency_key = ctx.idempotency_key;
    req.failover_only = true;  // the step retries durably, with its own backoff
    req.timeout = ctx.step.timeout;
    auto r = gateway_.Chat(req);
    if (!r.ok()) return std::move(r).error();
    StepRecordJson rec;
    rec["output"] = r->text;
    rec["text"] = r->text;
    rec["model"] = r->model;
    rec["provider"] = r->provider;
    rec["usage"] = r->usage;
    return rec;
  }

 private:
  gateway::Gateway& gateway_;
};

class TransformStep final : public StepRunner {
 public:
  Result<StepRecordJson> Run(const StepContext& ctx) override {
    auto out = RenderTemplate(ctx.step.spec, ctx.scope);
    if (!out.ok()) return std::move(out).error();
    return StepRecordJson{{"output", std::move(out).value()}};
  }
};

}  // namespace

std::map<StepKind, std::unique_ptr<StepRunner>> MakeStepRunners(gateway::Gateway& gateway) {
  std::map<StepKind, std::unique_ptr<StepRunner>> runners;
  runners[StepKind::kLlm] = std::make_unique<LlmStep>(gateway);
  runners[StepKind::kTransform] = std::make_unique<TransformStep>();
  return runners;
}

}  // namespace keel::engine
