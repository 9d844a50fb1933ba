#include "steps.h"

#include <regex>

#include "keel/core/ids.h"
#include "keel/core/json_schema.h"
#include "keel/core/template.h"
#include "keel/net/http_client.h"

namespace keel::engine {
namespace {

int64_t Millis(Timestamp t) { return std::chrono::duration_cast<Duration>(t.time_since_epoch()).count(); }

// When the step first started (its first attempt), or now.
Timestamp StartedAt(const StepContext& ctx) {
  return ctx.record && ctx.record->started_at ? *ctx.record->started_at : ctx.now;
}

// A failure no retry can mend: the step fails for good (on_error still applies).
StepOutcome Final(Error e) {
  StepOutcome o;
  o.fail = std::move(e);
  return o;
}

class LlmStep final : public StepRunner {
 public:
  explicit LlmStep(gateway::Gateway& gateway) : gateway_(gateway) {}

  Result<StepOutcome> Run(const StepContext& ctx) override {
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
    req.cancelled = ctx.cancelled;
    req.timeout = ctx.step.timeout;

    const json::value* format = spec.if_contains("response_format");
    std::optional<JsonSchema> schema;
    if (format && format->at("type") == "json_schema") {
      auto compiled = JsonSchema::Compile(format->at("schema"));
      if (!compiled.ok()) return std::move(compiled).error();
      schema = std::move(compiled).value();
      req.body["response_format"] = json::object{
          {"type", "json_schema"},
          {"json_schema", json::object{{"name", "output"}, {"schema", format->at("schema")}, {"strict", true}}}};
    } else if (format) {
      req.body["response_format"] = json::object{{"type", "json_object"}};
    }
    const int repairs = format ? static_cast<int>(NumberOr(spec.if_contains("repair_attempts"), 2)) : 0;

    StepRecordJson rec;
    for (int round = 0;; ++round) {
      auto r = gateway_.Chat(req);
      if (!r.ok()) return std::move(r).error();
      rec["text"] = r->text;
      rec["model"] = r->model;
      rec["provider"] = r->provider;
      rec["usage"] = r->usage;
      rec["repairs"] = round;
      if (r->cache != gateway::CacheStatus::kNone) rec["cache"] = gateway::CacheStatusName(r->cache);
      if (!format) {
        rec["output"] = r->text;
        return StepOutcome::Done(std::move(rec));
      }
      // Structured output: parsed and checked; a bad answer is sent back once more with
      // what is wrong, a bounded number of times.
      auto parsed = ParseModelJson(r->text);
      std::optional<Error> bad;
      if (!parsed.ok()) bad = parsed.error();
      else if (schema) {
        if (auto v = schema->Validate(*parsed); !v.ok()) bad = v.error();
      }
      if (!bad) {
        rec["output"] = std::move(parsed).value();
        return StepOutcome::Done(std::move(rec));
      }
      if (round >= repairs) {
        return Error(ErrorCode::kInvalidOutput, "the answer of step \"" + ctx.step.id + "\" is not valid JSON for its schema after " +
                                                    std::to_string(round) + " repair attempts: " + bad->message);
      }
      auto& msgs = req.body["messages"].as_array();
      msgs.push_back(json::object{{"role", "assistant"}, {"content", r->text}});
      msgs.push_back(json::object{
          {"role", "user"},
          {"content", "Your answer is not valid: " + bad->message +
                          ". Answer again with only a JSON value that satisfies the requested schema, nothing else."}});
    }
  }

 private:
  gateway::Gateway& gateway_;
};

class TransformStep final : public StepRunner {
 public:
  Result<StepOutcome> Run(const StepContext& ctx) override {
    auto out = RenderTemplate(ctx.step.spec, ctx.scope);
    if (!out.ok()) return std::move(out).error();
    return StepOutcome::Done(StepRecordJson{{"output", std::move(out).value()}});
  }
};

class ValidateStep final : public StepRunner {
 public:
  Result<StepOutcome> Run(const StepContext& ctx) override {
    auto value = RenderTemplate(ctx.step.spec.at("value"), ctx.scope);
    if (!value.ok()) return std::move(value).error();
    auto schema = JsonSchema::Compile(ctx.step.spec.at("schema"));
    if (!schema.ok()) return std::move(schema).error();
    if (auto v = schema->Validate(*value); !v.ok()) {
      Error e(ErrorCode::kInvalidOutput, "step \"" + ctx.step.id + "\": the value does not satisfy the schema: " +
                                             v.error().message, v.error().param);
      return Final(std::move(e));  // the same value fails the same way again
    }
    return StepOutcome::Done(StepRecordJson{{"output", std::move(value).value()}});
  }
};

class ChoiceStep final : public StepRunner {
 public:
  Result<StepOutcome> Run(const StepContext& ctx) override {
    std::string to(ctx.step.spec.at("default").as_string());
    int matched = -1;
    const auto& cases = ctx.step.spec.at("cases").as_array();
    for (std::size_t i = 0; i < cases.size(); ++i) {
      auto holds = EvaluateCondition(cases[i].at("when"), ctx.scope);
      if (!holds.ok()) return Final(std::move(holds).error());
      if (*holds) {
        to = std::string(cases[i].at("goto").as_string());
        matched = static_cast<int>(i);
        break;
      }
    }
    auto out = StepOutcome::Done(StepRecordJson{
        {"output", json::object{{"branch", to}, {"case", matched >= 0 ? json::value(matched) : json::value("default")}}}});
    out.next = to;
    return out;
  }
};

class SleepStep final : public StepRunner {
 public:
  Result<StepOutcome> Run(const StepContext& ctx) override {
    const Duration d(ctx.step.spec.at("for_ms").as_int64());
    const Timestamp until = StartedAt(ctx) + d;
    if (ctx.now >= until) return StepOutcome::Done(StepRecordJson{{"output", json::object{{"slept_ms", d.count()}}}});
    return StepOutcome::Suspend(until, json::object{{"kind", "sleep"}, {"step_id", ctx.step.id}, {"until_ms", Millis(until)}});
  }
};

class WaitStep final : public StepRunner {
 public:
  Result<StepOutcome> Run(const StepContext& ctx) override {
    const auto& spec = ctx.step.spec.as_object();
    const std::string name(spec.at("name").as_string());
    if (const auto* sig = ctx.run.signals.if_contains(name)) {
      return StepOutcome::Done(StepRecordJson{{"output", sig->at("payload")}, {"signal", name}});
    }
    std::optional<Timestamp> deadline;
    if (const auto* t = spec.if_contains("timeout_ms")) deadline = StartedAt(ctx) + Duration(t->as_int64());
    if (deadline && ctx.now >= *deadline) {
      if (const auto* d = spec.if_contains("default")) {
        return StepOutcome::Done(StepRecordJson{{"output", *d}, {"timed_out", true}});
      }
      return Final(Error(ErrorCode::kTimeout, "step \"" + ctx.step.id + "\": no signal \"" + name + "\" arrived within " +
                                                  std::to_string(spec.at("timeout_ms").as_int64()) + "ms (and it has no default)"));
    }
    json::object waiting{{"kind", "signal"}, {"step_id", ctx.step.id}, {"signal", name}};
    if (deadline) waiting["timeout_at_ms"] = Millis(*deadline);
    return StepOutcome::Suspend(deadline, std::move(waiting));
  }
};

class HttpStep final : public StepRunner {
 public:
  explicit HttpStep(const EngineConfig& config) : config_(config) {}

  Result<StepOutcome> Run(const StepContext& ctx) override {
    const auto& spec = ctx.step.spec.as_object();
    const std::string raw_url(spec.at("url").as_string());
    auto url = RenderTemplateString(raw_url, ctx.scope);
    if (!url.ok()) return std::move(url).error();
    if (url->rfind("http://", 0) != 0 && url->rfind("https://", 0) != 0) {
      return Final(Error(ErrorCode::kInvalidRequest, "step \"" + ctx.step.id + "\": \"" + *url + "\" is not an http(s) URL"));
    }
    const std::string host = UrlHost(*url);
    if (!Allowed(raw_url, host)) {
      return Final(Error(ErrorCode::kInvalidRequest,
                         "step \"" + ctx.step.id + "\": host \"" + host +
                             "\" is not allowed; name it in the step's url or under http.allow_hosts in keel.yaml"));
    }
    net::ClientRequest req;
    req.method = std::string(spec.at("method").as_string());
    req.url = *url;
    req.total_timeout = ctx.step.timeout;
    req.cancelled = ctx.cancelled;
    req.connect_timeout = std::min<std::chrono::milliseconds>(ctx.step.timeout, std::chrono::milliseconds(5000));
    if (const auto* h = spec.if_contains("headers"); h && h->is_object()) {
      auto rendered = RenderTemplate(*h, ctx.scope);
      if (!rendered.ok()) return std::move(rendered).error();
      for (const auto& [k, v] : rendered->as_object()) {
        req.headers.emplace_back(std::string(k), v.is_string() ? std::string(v.as_string()) : json::serialize(v));
      }
    }
    req.headers.emplace_back("Idempotency-Key", ctx.idempotency_key);
    if (const auto* b = spec.if_contains("body")) {
      auto rendered = RenderTemplate(*b, ctx.scope);
      if (!rendered.ok()) return std::move(rendered).error();
      req.body = json::serialize(*rendered);
      req.headers.emplace_back("Content-Type", "application/json");
    }
    auto resp = net::SendHttp(req);
    if (!resp.ok()) {
      Error e = std::move(resp).error();
      e.message = "step \"" + ctx.step.id + "\": " + e.message;
      return e;
    }
    if (resp->status < 200 || resp->status >= 300) {
      Error e(ClassifyHttpStatus(resp->status), "step \"" + ctx.step.id + "\": " + req.method + " " + *url + " answered " +
                                                    std::to_string(resp->status) + ": " + resp->body.substr(0, 300));
      return e;
    }
    json::value body = json::string(resp->body);
    if (resp->Header("content-type").find("json") != std::string_view::npos) {
      auto parsed = ParseJson(resp->body);
      if (!parsed.ok()) {
        return Error(ErrorCode::kInvalidOutput, "step \"" + ctx.step.id + "\": the answer says JSON but is not: " +
                                                    parsed.error().message);
      }
      body = std::move(parsed).value();
    }
    return StepOutcome::Done(StepRecordJson{{"output", std::move(body)}, {"status", resp->status}});
  }

 private:
  // The URL's host is named by the config: literally in the step's URL, or listed.
  bool Allowed(const std::string& raw_url, const std::string& host) const {
    const std::string literal = UrlHost(raw_url);
    if (!literal.empty() && literal.find("{{") == std::string::npos && literal == host) return true;
    std::string bare = host;  // without its port ("[::1]" keeps its colons)
    if (const auto colon = host.rfind(':'); colon != std::string::npos && host.back() != ']') bare = host.substr(0, colon);
    for (const auto& a : config_.http.allow_hosts) {
      if (a == host || a == bare) return true;
    }
    return false;
  }
  const EngineConfig& config_;
};

class PipelineStep final : public StepRunner {
 public:
  explicit PipelineStep(const StepServices& s) : services_(s) {}

  Result<StepOutcome> Run(const StepContext& ctx) override {
    const auto& spec = ctx.step.spec.as_object();
    const std::string name(spec.at("name").as_string());
    const json::value* def = ctx.run.definition.is_object() ? ctx.run.definition.as_object().if_contains("pipelines") : nullptr;
    def = def && def->is_object() ? def->as_object().if_contains(name) : nullptr;
    if (def == nullptr) {
      return Final(Error(ErrorCode::kInvalidRequest, "step \"" + ctx.step.id + "\": the run's definition holds no pipeline \"" + name + "\""));
    }
    auto input = RenderTemplate(spec.at("input"), ctx.scope);
    if (!input.ok()) return std::move(input).error();
    store::NewRun child;
    child.id = NewRunId(ctx.now, services_.random);
    child.pipeline = name;
    child.input = std::move(input).value();
    child.definition = *def;
    // One child per step of a run, however often this step runs (its retries wait for
    // the same child), until the run is redriven: then the step's next attempt makes a
    // new child, since the one it had ended for good (StepRecord::prior_attempts).
    child.idempotency_key = "child:" + ctx.run_id + "/" + ctx.step.id;
    if (ctx.record && ctx.record->prior_attempts > 0) {
      child.idempotency_key += "@" + std::to_string(ctx.record->prior_attempts);
    }
    child.fingerprint = child.idempotency_key;
    child.parent = ctx.run_id + "/" + ctx.step.id;
    child.max_queue_depth = services_.config.max_queue_depth;
    auto submitted = services_.store.SubmitRun(child);
    if (!submitted.ok()) return std::move(submitted).error();
    const store::RunRecord& c = submitted->run;
    switch (c.status) {
      case store::RunStatus::kSucceeded:
        return StepOutcome::Done(StepRecordJson{{"output", c.output}, {"run_id", c.id}});
      case store::RunStatus::kFailed:
      case store::RunStatus::kDeadLettered:
      case store::RunStatus::kCancelled: {
        Error e = c.error.value_or(Error(ErrorCode::kCancelled, "cancelled"));
        e.message = "child run " + c.id + " (pipeline " + name + ") ended " + std::string(store::RunStatusName(c.status)) +
                    ": " + e.message;
        return Final(std::move(e));
      }
      default:
        return StepOutcome::Suspend(std::nullopt, json::object{{"kind", "child_run"}, {"step_id", ctx.step.id},
                                                               {"run_id", c.id}, {"pipeline", name}});
    }
  }

 private:
  StepServices services_;
};

// Executed by an external worker: the task is queued for it, and the run parks until the
// worker completes or fails it (or stops heartbeating).
class TaskStep final : public StepRunner {
 public:
  explicit TaskStep(const StepServices& s) : services_(s) {}

  Result<StepOutcome> Run(const StepContext& ctx) override { return Run(ctx, false); }

 private:
  // `retried`: a second look, after the task ended while this one decided to expire it.
  Result<StepOutcome> Run(const StepContext& ctx, bool retried) {
    const auto& spec = ctx.step.spec.as_object();
    auto input = RenderTemplate(spec.contains("input") ? spec.at("input") : json::value(json::object{}), ctx.scope);
    if (!input.ok()) return std::move(input).error();
    const Duration hb(spec.at("heartbeat_timeout_ms").as_int64());
    const std::string queue(spec.at("queue").as_string());
    auto task = services_.store.EnsureTask(*ctx.lease, ctx.step.id, ctx.attempt, queue, *input, hb);
    if (!task.ok()) return std::move(task).error();
    using S = store::TaskRecord::Status;
    switch (task->status) {
      case S::kCompleted:
        return StepOutcome::Done(StepRecordJson{{"output", task->output}, {"worker", task->worker_id}});
      case S::kFailed: {
        Error e = task->error.value_or(Error(ErrorCode::kServerError, "the worker failed the task"));
        e.message = "task of step \"" + ctx.step.id + "\" failed on worker " + task->worker_id + ": " + e.message;
        if (!task->retryable) return Final(std::move(e));
        if (!IsRetryable(e.code)) e.code = ErrorCode::kServerError;  // the worker said: try again
        return e;
      }
      case S::kLeased:
        if (task->lease_expires && *task->lease_expires <= ctx.now) {
          // The worker went quiet: this attempt failed; a retry queues a new task.
          auto expired = services_.store.ExpireTask(*ctx.lease, task->token);
          // The worker answered just in time: take its answer.
          if (!expired.ok() && expired.error().code == ErrorCode::kConflict && !retried) return Run(ctx, true);
          if (!expired.ok()) return std::move(expired).error();
          return Error(ErrorCode::kTimeout, "task of step \"" + ctx.step.id + "\": worker " + task->worker_id +
                                                " sent no heartbeat within " + std::to_string(hb.count()) + "ms");
        }
        break;
      case S::kPending:
        break;
    }
    // Parked until the worker answers; while it holds the task, also when its lease ends.
    std::optional<Timestamp> wake;
    if (task->status == S::kLeased) wake = task->lease_expires;
    // The step's timeout bounds each attempt: from when its task was queued.
    const Timestamp deadline = task->created_at + ctx.step.timeout;
    if (ctx.now >= deadline) {
      auto expired = services_.store.ExpireTask(*ctx.lease, task->token);  // a late worker's answer is dropped
      if (!expired.ok() && expired.error().code == ErrorCode::kConflict && !retried) return Run(ctx, true);
      return Error(ErrorCode::kTimeout, "task of step \"" + ctx.step.id + "\" was not done within the step's timeout of " +
                                            std::to_string(ctx.step.timeout.count()) + "ms");
    }
    if (!wake || *wake > deadline) wake = deadline;
    json::object waiting{{"kind", "task"}, {"step_id", ctx.step.id}, {"queue", queue},
                         {"task", std::string(store::TaskStatusName(task->status))}};
    if (!task->worker_id.empty()) waiting["worker"] = task->worker_id;
    return StepOutcome::Suspend(wake, std::move(waiting));
  }

 private:
  StepServices services_;
};

bool Compare(const json::value& a, const json::value& b, const std::string& op) {
  if (!a.is_number() || !b.is_number()) return false;
  const double x = a.to_number<double>(), y = b.to_number<double>();
  if (op == "gt") return x > y;
  if (op == "gte") return x >= y;
  if (op == "lt") return x < y;
  return x <= y;
}

bool JsonEqual(const json::value& a, const json::value& b) {
  if (a.is_number() && b.is_number()) return a.to_number<double>() == b.to_number<double>();
  return a == b;
}

}  // namespace

Result<bool> EvaluateCondition(const json::value& c, const json::value& scope) {
  const auto& o = c.as_object();
  if (const auto* all = o.if_contains("all")) {
    for (const auto& x : all->as_array()) {
      auto r = EvaluateCondition(x, scope);
      if (!r.ok() || !*r) return r;
    }
    return true;
  }
  if (const auto* any = o.if_contains("any")) {
    for (const auto& x : any->as_array()) {
      auto r = EvaluateCondition(x, scope);
      if (!r.ok() || *r) return r;
    }
    return false;
  }
  if (const auto* n = o.if_contains("not")) {
    auto r = EvaluateCondition(*n, scope);
    if (!r.ok()) return r;
    return !*r;
  }
  auto rendered = RenderTemplate(o.at("value"), scope);
  const bool present = rendered.ok();
  if (!present && rendered.error().code != ErrorCode::kInvalidRequest) return std::move(rendered).error();
  if (const auto* e = o.if_contains("exists")) return (e->is_bool() ? e->as_bool() : true) == present;
  if (!present) return false;
  const json::value& v = *rendered;
  if (const auto* x = o.if_contains("equals")) return JsonEqual(v, *x);
  if (const auto* x = o.if_contains("not_equals")) return !JsonEqual(v, *x);
  for (const char* op : {"gt", "gte", "lt", "lte"}) {
    if (const auto* x = o.if_contains(op)) return Compare(v, *x, op);
  }
  if (const auto* x = o.if_contains("in")) {
    for (const auto& y : x->as_array()) {
      if (JsonEqual(v, y)) return true;
    }
    return false;
  }
  if (const auto* x = o.if_contains("contains")) {
    if (v.is_string() && x->is_string()) return std::string_view(v.as_string()).find(x->as_string()) != std::string_view::npos;
    if (v.is_array()) {
      for (const auto& y : v.as_array()) {
        if (JsonEqual(y, *x)) return true;
      }
    }
    return false;
  }
  if (const auto* x = o.if_contains("matches")) {
    if (!v.is_string()) return false;
    try {
      return std::regex_search(std::string(v.as_string()), std::regex(std::string(x->as_string()), std::regex::ECMAScript));
    } catch (const std::regex_error& err) {
      return Error(ErrorCode::kInvalidRequest, std::string("bad regular expression: ") + err.what());
    }
  }
  return Error(ErrorCode::kInvalidRequest, "a condition without a test");
}

Result<json::value> ParseModelJson(std::string_view text) {
  auto direct = ParseJson(text);
  if (direct.ok()) return direct;
  // Models often wrap JSON in a fenced block.
  const auto fence = text.find("```");
  if (fence != std::string_view::npos) {
    auto start = text.find('\n', fence);
    const auto end = start == std::string_view::npos ? std::string_view::npos : text.find("```", start);
    if (end != std::string_view::npos) {
      auto inner = ParseJson(text.substr(start + 1, end - start - 1));
      if (inner.ok()) return inner;
    }
  }
  return Error(ErrorCode::kInvalidOutput, "the answer is not JSON: " + direct.error().message);
}

std::map<StepKind, std::unique_ptr<StepRunner>> MakeStepRunners(const StepServices& services) {
  std::map<StepKind, std::unique_ptr<StepRunner>> runners;
  runners[StepKind::kLlm] = std::make_unique<LlmStep>(services.gateway);
  runners[StepKind::kTransform] = std::make_unique<TransformStep>();
  runners[StepKind::kValidate] = std::make_unique<ValidateStep>();
  runners[StepKind::kChoice] = std::make_unique<ChoiceStep>();
  runners[StepKind::kSleep] = std::make_unique<SleepStep>();
  runners[StepKind::kWaitForSignal] = std::make_unique<WaitStep>();
  runners[StepKind::kHttp] = std::make_unique<HttpStep>(services.config);
  runners[StepKind::kPipeline] = std::make_unique<PipelineStep>(services);
  runners[StepKind::kTask] = std::make_unique<TaskStep>(services);
  return runners;
}

}  // namespace keel::engine
