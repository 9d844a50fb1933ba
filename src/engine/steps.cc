#include "steps.h"

#include <boost/url/parse.hpp>

#include "keel/core/ids.h"
#include "keel/core/json_schema.h"
#include "keel/core/regex.h"
#include "keel/core/secrets.h"
#include "keel/core/template.h"
#include "keel/net/async_http_client.h"
#include "keel/net/digest.h"
#include "keel/net/http_client.h"

namespace keel::engine {
namespace {

int64_t Millis(Timestamp t) {
  return std::chrono::duration_cast<Duration>(t.time_since_epoch()).count();
}

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

// Compiled JSON Schemas by their text, so that a definition's schema is compiled once,
// not per attempt. Bounded; thread-safe.
class SchemaCache {
 public:
  Result<JsonSchema> Get(const json::value& schema) {
    const std::string key = json::serialize(schema);
    if (auto hit = compiled_.Get(key)) return *hit;
    auto compiled = JsonSchema::Compile(schema);
    if (compiled.ok()) compiled_.Put(key, *compiled);
    return compiled;
  }

 private:
  LruMap<JsonSchema> compiled_{256};
};

class LlmStep final : public StepRunner {
 public:
  explicit LlmStep(gateway::Gateway& gateway) : gateway_(gateway) {}

  Result<StepOutcome> Run(const StepContext& ctx) override {
    auto call = Prepare(ctx);
    if (!call.ok()) return std::move(call).error();
    while (true) {
      auto answered = OnAnswer(ctx, *call, gateway_.Chat(call->req));
      if (answered) return std::move(*answered);
    }
  }

  StepExecution execution() const override { return StepExecution::kAsync; }

  void RunAsync(const StepContext& ctx, const boost::asio::any_io_executor& executor, Done done) override {
    auto call = Prepare(ctx);
    if (!call.ok()) return done(std::move(call).error());
    Ask(ctx, std::make_shared<Call>(std::move(call).value()), executor, std::move(done));
  }

 private:
  // One attempt's model calls: the request (its messages grow with each repair round)
  // and what the answer is checked against.
  struct Call {
    gateway::ChatRequest req;
    const json::value* format = nullptr;  // the spec's response_format, if any
    std::optional<JsonSchema> schema;
    int repairs = 0;
    int round = 0;
    StepRecordJson rec;
  };

  Result<Call> Prepare(const StepContext& ctx) {
    const auto& spec = ctx.step.spec.as_object();
    auto messages = RenderTemplate(spec.at("messages"), ctx.scope);
    if (!messages.ok()) return std::move(messages).error();
    Call call;
    gateway::ChatRequest& req = call.req;
    req.route = json::value_to<std::string>(spec.at("route"));
    req.body["messages"] = std::move(messages).value();
    if (const auto* t = spec.if_contains("temperature"); t && t->is_number())
      req.body["temperature"] = *t;
    if (const auto* m = spec.if_contains("max_tokens"); m && m->is_int64())
      req.body["max_tokens"] = *m;
    req.idempotency_key = ctx.idempotency_key;
    req.failover_only = true;  // the step retries durably, with its own backoff
    req.cancelled = ctx.cancelled;
    req.cancel = ctx.cancel;
    req.timeout = ctx.step.timeout;

    const json::value* format = spec.if_contains("response_format");
    call.format = format;
    if (format && format->at("type") == "json_schema") {
      auto compiled = schemas_.Get(format->at("schema"));
      if (!compiled.ok()) return std::move(compiled).error();
      call.schema = std::move(compiled).value();
      req.body["response_format"] = json::object{
          {"type", "json_schema"},
          {"json_schema",
           json::object{{"name", "output"}, {"schema", format->at("schema")}, {"strict", true}}}};
    } else if (format) {
      req.body["response_format"] = json::object{{"type", "json_object"}};
    }
    call.repairs = format ? static_cast<int>(NumberOr(spec.if_contains("repair_attempts"), 2)) : 0;
    return call;
  }

  void Ask(const StepContext& ctx, std::shared_ptr<Call> call, const boost::asio::any_io_executor& executor,
           Done done) {
    gateway::ChatRequest req = call->req;
    gateway_.ChatAsync(std::move(req), executor,
                       [this, &ctx, call, executor, done = std::move(done)](Result<gateway::ChatResult> r) mutable {
                         auto answered = OnAnswer(ctx, *call, std::move(r));
                         if (answered) return done(std::move(*answered));
                         Ask(ctx, std::move(call), executor, std::move(done));
                       });
  }

  // What one answer comes to: the attempt's outcome, or nullopt when the answer is sent
  // back for repair (call.req then holds the next round's messages).
  std::optional<Result<StepOutcome>> OnAnswer(const StepContext& ctx, Call& call, Result<gateway::ChatResult> r) {
    const int round = call.round++;
    const json::value* format = call.format;
    StepRecordJson& rec = call.rec;
    if (!r.ok()) return Result<StepOutcome>(std::move(r).error());
    rec["text"] = r->text;
    rec["model"] = r->model;
    rec["provider"] = r->provider;
    rec["usage"] = r->usage;
    rec["repairs"] = round;
    if (r->cache != gateway::CacheStatus::kNone) rec["cache"] = gateway::CacheStatusName(r->cache);
    // What the model's first choice said besides its text: kept, not interpreted (an llm
    // step runs no tools).
    const json::value* choice = nullptr;
    if (const auto* choices = r->response.if_contains("choices");
        choices && choices->is_array() && !choices->get_array().empty()) {
      choice = &choices->get_array()[0];
    }
    bool tool_calls = false;
    if (choice && choice->is_object()) {
      const auto& c = choice->get_object();
      if (const auto* fr = c.if_contains("finish_reason"); fr && fr->is_string()) rec["finish_reason"] = *fr;
      if (const auto* m = c.if_contains("message"); m && m->is_object()) {
        const auto* calls = m->get_object().if_contains("tool_calls");
        tool_calls = calls && calls->is_array() && !calls->get_array().empty();
        if (tool_calls) rec["tool_calls"] = *calls;
      }
    }
    if (format && tool_calls && r->text.empty()) {
      return Result<StepOutcome>(Error(ErrorCode::kInvalidOutput,
                                       "step \"" + ctx.step.id +
                                           "\": the model answered with tool calls "
                                           "instead of JSON; an llm step runs no tools"));
    }
    if (!format) {
      rec["output"] = r->text;
      return Result<StepOutcome>(StepOutcome::Done(std::move(rec)));
    }
    // Structured output: parsed and checked; a bad answer is sent back once more with
    // what is wrong, a bounded number of times.
    auto parsed = ParseModelJson(r->text);
    std::optional<Error> bad;
    if (!parsed.ok())
      bad = parsed.error();
    else if (call.schema) {
      if (auto v = call.schema->Validate(*parsed); !v.ok()) bad = v.error();
    }
    if (!bad) {
      rec["output"] = std::move(parsed).value();
      return Result<StepOutcome>(StepOutcome::Done(std::move(rec)));
    }
    if (round >= call.repairs) {
      return Result<StepOutcome>(Error(ErrorCode::kInvalidOutput,
                                       "the answer of step \"" + ctx.step.id +
                                           "\" is not valid JSON for its schema after " +
                                           std::to_string(round) + " repair attempts: " + bad->message));
    }
    auto& msgs = call.req.body["messages"].as_array();
    msgs.push_back(json::object{{"role", "assistant"}, {"content", r->text}});
    msgs.push_back(json::object{{"role", "user"},
                                {"content", "Your answer is not valid: " + bad->message +
                                                ". Answer again with only a JSON value that satisfies the "
                                                "requested schema, nothing else."}});
    return std::nullopt;
  }

  gateway::Gateway& gateway_;
  SchemaCache schemas_;
};

class TransformStep final : public StepRunner {
 public:
  StepExecution execution() const override { return StepExecution::kInline; }
  Result<StepOutcome> Run(const StepContext& ctx) override {
    auto out = RenderTemplate(ctx.step.spec, ctx.scope);
    if (!out.ok()) return std::move(out).error();
    return StepOutcome::Done(StepRecordJson{{"output", std::move(out).value()}});
  }
};

class ValidateStep final : public StepRunner {
 public:
  StepExecution execution() const override { return StepExecution::kInline; }
  Result<StepOutcome> Run(const StepContext& ctx) override {
    auto value = RenderTemplate(ctx.step.spec.at("value"), ctx.scope);
    if (!value.ok()) return std::move(value).error();
    auto schema = schemas_.Get(ctx.step.spec.at("schema"));
    if (!schema.ok()) return std::move(schema).error();
    if (auto v = schema->Validate(*value); !v.ok()) {
      Error e(ErrorCode::kInvalidOutput,
              "step \"" + ctx.step.id +
                  "\": the value does not satisfy the schema: " + v.error().message,
              v.error().param);
      return Final(std::move(e));  // the same value fails the same way again
    }
    return StepOutcome::Done(StepRecordJson{{"output", std::move(value).value()}});
  }

 private:
  SchemaCache schemas_;
};

class ChoiceStep final : public StepRunner {
 public:
  StepExecution execution() const override { return StepExecution::kInline; }
  Result<StepOutcome> Run(const StepContext& ctx) override {
    std::string to(ctx.step.spec.at("default").as_string());
    int matched = -1;
    const auto& cases = ctx.step.spec.at("cases").as_array();
    for (std::size_t i = 0; i < cases.size(); ++i) {
      auto holds = EvaluateCondition(cases[i].at("when"), ctx.scope, &patterns_);
      if (!holds.ok()) return Final(std::move(holds).error());
      if (*holds) {
        to = std::string(cases[i].at("goto").as_string());
        matched = static_cast<int>(i);
        break;
      }
    }
    auto out = StepOutcome::Done(StepRecordJson{
        {"output",
         json::object{{"branch", to},
                      {"case", matched >= 0 ? json::value(matched) : json::value("default")}}}});
    out.next = to;
    return out;
  }

 private:
  PatternCache patterns_;
};

class SleepStep final : public StepRunner {
 public:
  StepExecution execution() const override { return StepExecution::kInline; }
  Result<StepOutcome> Run(const StepContext& ctx) override {
    const Duration d(ctx.step.spec.at("for_ms").as_int64());
    const Timestamp until = StartedAt(ctx) + d;
    if (ctx.now >= until)
      return StepOutcome::Done(StepRecordJson{{"output", json::object{{"slept_ms", d.count()}}}});
    return StepOutcome::Suspend(
        until,
        json::object{{"kind", "sleep"}, {"step_id", ctx.step.id}, {"until_ms", Millis(until)}});
  }
};

class WaitStep final : public StepRunner {
 public:
  StepExecution execution() const override { return StepExecution::kInline; }
  Result<StepOutcome> Run(const StepContext& ctx) override {
    const auto& spec = ctx.step.spec.as_object();
    const std::string name(spec.at("name").as_string());
    if (const auto* sig = ctx.run.signals.if_contains(name)) {
      return StepOutcome::Done(StepRecordJson{{"output", sig->at("payload")}, {"signal", name}});
    }
    std::optional<Timestamp> deadline;
    if (const auto* t = spec.if_contains("timeout_ms"))
      deadline = StartedAt(ctx) + Duration(t->as_int64());
    if (deadline && ctx.now >= *deadline) {
      if (const auto* d = spec.if_contains("default")) {
        return StepOutcome::Done(StepRecordJson{{"output", *d}, {"timed_out", true}});
      }
      return Final(Error(ErrorCode::kTimeout, "step \"" + ctx.step.id + "\": no signal \"" + name +
                                                  "\" arrived within " +
                                                  std::to_string(spec.at("timeout_ms").as_int64()) +
                                                  "ms (and it has no default)"));
    }
    json::object waiting{{"kind", "signal"}, {"step_id", ctx.step.id}, {"signal", name}};
    if (deadline) waiting["timeout_at_ms"] = Millis(*deadline);
    return StepOutcome::Suspend(deadline, std::move(waiting));
  }
};

// The parts of a URL a template value may land in.
enum class UrlPart { kAuthority, kPath, kQuery, kFragment };

// Where each byte offset of a URL template falls, from its literal text.
class UrlLayout {
 public:
  explicit UrlLayout(std::string_view tmpl) {
    const auto scheme = tmpl.find("://");
    const std::size_t from = scheme == std::string_view::npos ? 0 : scheme + 3;
    authority_end_ = std::min(tmpl.find_first_of("/?#", from), tmpl.size());
    query_ = std::min(tmpl.find('?', authority_end_), tmpl.size());
    fragment_ = std::min(tmpl.find('#', authority_end_), tmpl.size());
    if (fragment_ < query_) query_ = fragment_;
  }
  UrlPart At(std::size_t offset) const {
    if (offset < authority_end_) return UrlPart::kAuthority;
    if (offset < query_) return UrlPart::kPath;
    if (offset < fragment_) return UrlPart::kQuery;
    return UrlPart::kFragment;
  }

 private:
  std::size_t authority_end_, query_, fragment_;
};

bool Unreserved(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_' || c == '~';
}

// A value rendered into a URL, percent-encoded for its part: in the path, query and
// fragment everything but the unreserved characters is encoded ("/", "&", "=", "#"
// included), so a value stays one value; a whole "." or ".." segment is encoded too.
// In the host, only a host's characters are allowed.
Result<std::string> EncodeUrlValue(std::string_view v, UrlPart part) {
  if (part == UrlPart::kAuthority) {
    for (const char c : v) {
      if (!Unreserved(static_cast<unsigned char>(c)) && c != ':' && c != '[' && c != ']') {
        return Error(ErrorCode::kInvalidRequest,
                     "a value rendered into the URL's host holds a character no host has");
      }
    }
    return std::string(v);
  }
  if (part == UrlPart::kPath && (v == "." || v == ".."))
    return std::string(v == "." ? "%2E" : "%2E%2E");
  return net::PercentEncode(v);
}

class HttpStep final : public StepRunner {
 public:
  explicit HttpStep(const EngineConfig& config) : config_(config) {}

  Result<StepOutcome> Run(const StepContext& ctx) override {
    auto call = Prepare(ctx);
    if (!call.ok()) return std::move(call).error();
    if (call->outcome) return std::move(*call->outcome);
    return Finish(ctx, *call, net::SendHttp(call->req));
  }

  StepExecution execution() const override { return StepExecution::kAsync; }

  void RunAsync(const StepContext& ctx, const boost::asio::any_io_executor& executor, Done done) override {
    auto call = Prepare(ctx);
    if (!call.ok()) return done(std::move(call).error());
    if (call->outcome) return done(std::move(*call->outcome));
    auto shared = std::make_shared<Call>(std::move(call).value());
    net::ClientRequest req = shared->req;
    net::SendHttpAsync(executor, std::move(req),
                       [&ctx, shared, done = std::move(done)](Result<net::ClientResponse> sent) {
                         done(Finish(ctx, *shared, std::move(sent)));
                       });
  }

 private:
  // One attempt's request, or what the attempt came to before sending anything.
  struct Call {
    net::ClientRequest req;
    std::string url;
    std::size_t limit = 0;
    std::optional<StepOutcome> outcome;
  };

  static Call Ended(StepOutcome o) {
    Call c;
    c.outcome = std::move(o);
    return c;
  }

  Result<Call> Prepare(const StepContext& ctx) {
    const auto& spec = ctx.step.spec.as_object();
    const std::string where = "step \"" + ctx.step.id + "\": ";
    const std::string raw_url(spec.at("url").as_string());
    const UrlLayout layout(raw_url);
    auto url = RenderTemplateString(raw_url, ctx.scope, [&](std::string_view v, std::size_t at) {
      return EncodeUrlValue(v, layout.At(at));
    });
    if (!url.ok()) return Ended(Final(Error(url.error().code, where + "url " + url.error().message)));
    if (url->rfind("http://", 0) != 0 && url->rfind("https://", 0) != 0) {
      return Ended(Final(Error(ErrorCode::kInvalidRequest,
                         where + "\"" + RedactUrl(*url) + "\" is not an http(s) URL")));
    }
    if (!boost::urls::parse_uri(*url)) {
      return Ended(Final(Error(ErrorCode::kInvalidRequest,
                         where + "the URL \"" + RedactUrl(*url) + "\" does not parse")));
    }
    const std::string host = UrlHost(*url);
    if (!Allowed(raw_url, host)) {
      return Ended(Final(
          Error(ErrorCode::kInvalidRequest, where + "host \"" + host +
                                                "\" is not allowed; name it in the step's url or "
                                                "under http.allow_hosts in keel.yaml")));
    }
    Call call;
    net::ClientRequest& req = call.req;
    req.cancel = ctx.cancel;
    req.method = std::string(spec.at("method").as_string());
    req.url = *url;
    req.total_timeout = ctx.step.timeout;
    req.cancelled = ctx.cancelled;
    req.connect_timeout =
        std::min<std::chrono::milliseconds>(ctx.step.timeout, std::chrono::milliseconds(5000));
    if (const auto* h = spec.if_contains("headers"); h && h->is_object()) {
      auto rendered = RenderTemplate(*h, ctx.scope);
      if (!rendered.ok()) return std::move(rendered).error();
      for (const auto& [k, v] : rendered->as_object()) {
        std::string value = v.is_string() ? std::string(v.as_string()) : json::serialize(v);
        // A CR or LF would end the header and start another (or a whole second request).
        if (value.find_first_of(std::string_view("\r\n\0", 3)) != std::string::npos) {
          return Ended(Final(
              Error(ErrorCode::kInvalidRequest,
                    where + "the value of header " + std::string(k) +
                        " holds a CR, LF or NUL: a value rendered into a header must be one line")));
        }
        req.headers.emplace_back(std::string(k), std::move(value));
      }
    }
    req.headers.emplace_back("Idempotency-Key", ctx.idempotency_key);
    if (const auto* b = spec.if_contains("body")) {
      auto rendered = RenderTemplate(*b, ctx.scope);
      if (!rendered.ok()) return std::move(rendered).error();
      req.body = json::serialize(*rendered);
      req.headers.emplace_back("Content-Type", "application/json");
    }
    const auto limit =
        static_cast<std::size_t>(NumberOr(spec.if_contains("max_response_bytes"),
                                          static_cast<double>(config_.http.max_response_bytes)));
    req.max_response_bytes = limit;  // cut off past it, not held whole
    call.url = *url;
    call.limit = limit;
    return call;
  }

  static Result<StepOutcome> Finish(const StepContext& ctx, const Call& call, Result<net::ClientResponse> sent) {
    const std::string where = "step \"" + ctx.step.id + "\": ";
    const net::ClientRequest& req = call.req;
    const std::string* url = &call.url;
    const std::size_t limit = call.limit;
    if (!sent.ok() && sent.error().code == ErrorCode::kInvalidOutput) {
      return Final(Error(ErrorCode::kInvalidOutput,
                         where + req.method + " " + RedactUrl(*url) + " answered more than " +
                             std::to_string(limit) +
                             " bytes (max_response_bytes); raise the step's max_response_bytes "
                             "or http.max_response_bytes if that is expected"));
    }
    if (!sent.ok()) {
      Error e = std::move(sent).error();
      e.message = where + RedactSecrets(e.message);
      return e;
    }
    const net::ClientResponse& resp = *sent;
    if (resp.status < 200 || resp.status >= 300) {
      return Error(ClassifyHttpStatus(resp.status),
                   where + req.method + " " + RedactUrl(*url) + " answered " +
                       std::to_string(resp.status) + ": " +
                       RedactSecrets(ToValidUtf8(std::string_view(resp.body).substr(0, 300))));
    }
    StepRecordJson rec{{"status", resp.status}};
    if (resp.Header("content-type").find("json") != std::string_view::npos) {
      auto parsed = ParseJson(resp.body);
      if (!parsed.ok()) {
        return Error(ErrorCode::kInvalidOutput,
                     where + "the answer says JSON but is not: " + parsed.error().message);
      }
      rec["output"] = std::move(parsed).value();
    } else if (IsValidUtf8(resp.body)) {
      rec["output"] = resp.body;
    } else {
      // Not text: kept whole, in base64, and said so.
      rec["output"] = net::Base64(resp.body);
      rec["encoding"] = "base64";
    }
    return StepOutcome::Done(std::move(rec));
  }

  // The URL's host is named by the config: literally in the step's URL, or listed.
  bool Allowed(const std::string& raw_url, const std::string& host) const {
    const std::string literal = UrlHost(raw_url);
    if (!literal.empty() && literal.find("{{") == std::string::npos && literal == host) return true;
    std::string bare = host;  // without its port ("[::1]" keeps its colons)
    if (const auto colon = host.rfind(':'); colon != std::string::npos && host.back() != ']')
      bare = host.substr(0, colon);
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
    const json::value* def = ctx.run.definition.is_object()
                                 ? ctx.run.definition.as_object().if_contains("pipelines")
                                 : nullptr;
    def = def && def->is_object() ? def->as_object().if_contains(name) : nullptr;
    if (def == nullptr) {
      return Final(Error(
          ErrorCode::kInvalidRequest,
          "step \"" + ctx.step.id + "\": the run's definition holds no pipeline \"" + name + "\""));
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
        e.message = "child run " + c.id + " (pipeline " + name + ") ended " +
                    std::string(store::RunStatusName(c.status)) + ": " + e.message;
        return Final(std::move(e));
      }
      default:
        return StepOutcome::Suspend(std::nullopt, json::object{{"kind", "child_run"},
                                                               {"step_id", ctx.step.id},
                                                               {"run_id", c.id},
                                                               {"pipeline", name}});
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
    auto input = RenderTemplate(
        spec.contains("input") ? spec.at("input") : json::value(json::object{}), ctx.scope);
    if (!input.ok()) return std::move(input).error();
    const Duration hb(spec.at("heartbeat_timeout_ms").as_int64());
    const std::string queue(spec.at("queue").as_string());
    auto task = services_.store.EnsureTask(*ctx.lease, ctx.step.id, ctx.attempt, queue, *input, hb);
    if (!task.ok()) return std::move(task).error();
    using S = store::TaskRecord::Status;
    switch (task->status) {
      case S::kCompleted:
        return StepOutcome::Done(
            StepRecordJson{{"output", task->output}, {"worker", task->worker_id}});
      case S::kFailed: {
        Error e =
            task->error.value_or(Error(ErrorCode::kServerError, "the worker failed the task"));
        e.message = "task of step \"" + ctx.step.id + "\" failed on worker " + task->worker_id +
                    ": " + e.message;
        if (!task->retryable) return Final(std::move(e));
        if (!IsRetryable(e.code)) e.code = ErrorCode::kServerError;  // the worker said: try again
        return e;
      }
      case S::kLeased:
        if (task->lease_expires && *task->lease_expires <= ctx.now) {
          // The worker went quiet: this attempt failed; a retry queues a new task.
          auto expired = services_.store.ExpireTask(*ctx.lease, task->token);
          // The worker answered just in time: take its answer.
          if (!expired.ok() && expired.error().code == ErrorCode::kConflict && !retried)
            return Run(ctx, true);
          if (!expired.ok()) return std::move(expired).error();
          return Error(ErrorCode::kTimeout, "task of step \"" + ctx.step.id + "\": worker " +
                                                task->worker_id + " sent no heartbeat within " +
                                                std::to_string(hb.count()) + "ms");
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
      auto expired =
          services_.store.ExpireTask(*ctx.lease, task->token);  // a late worker's answer is dropped
      if (!expired.ok() && expired.error().code == ErrorCode::kConflict && !retried)
        return Run(ctx, true);
      return Error(ErrorCode::kTimeout, "task of step \"" + ctx.step.id +
                                            "\" was not done within the step's timeout of " +
                                            std::to_string(ctx.step.timeout.count()) + "ms");
    }
    if (!wake || *wake > deadline) wake = deadline;
    json::object waiting{{"kind", "task"},
                         {"step_id", ctx.step.id},
                         {"queue", queue},
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

Result<Regex> PatternCache::Get(std::string_view source) {
  const std::string key(source);
  if (auto hit = compiled_.Get(key)) return *hit;
  auto compiled = Regex::Compile(source);
  if (compiled.ok()) compiled_.Put(key, *compiled);
  return compiled;
}

namespace {

Error BadCondition(const std::string& why) {
  return Error(ErrorCode::kInvalidRequest,
               "a condition of the run's definition is malformed: " + why);
}

Result<bool> Evaluate(const json::value& c, const TemplateContext& scope, PatternCache* patterns,
                      int depth) {
  // config check bounds nesting at 16; a stored definition from elsewhere is bounded too.
  if (depth > 64) return BadCondition("conditions nest deeper than 64 levels");
  const auto* o = c.if_object();
  if (o == nullptr) return BadCondition("a condition must be an object");
  for (const char* k : {"all", "any"}) {
    const auto* list = o->if_contains(k);
    if (list == nullptr) continue;
    if (!list->is_array()) return BadCondition(std::string(k) + " must be a list");
    const bool all = k[1] == 'l';
    for (const auto& x : list->get_array()) {
      auto r = Evaluate(x, scope, patterns, depth + 1);
      if (!r.ok() || *r != all) return r;
    }
    return all;
  }
  if (const auto* n = o->if_contains("not")) {
    auto r = Evaluate(*n, scope, patterns, depth + 1);
    if (!r.ok()) return r;
    return !*r;
  }
  const auto* value = o->if_contains("value");
  if (value == nullptr) return BadCondition("a condition without a value");
  auto rendered = RenderTemplate(*value, scope);
  const bool present = rendered.ok();
  if (!present && rendered.error().code != ErrorCode::kInvalidRequest)
    return std::move(rendered).error();
  if (const auto* e = o->if_contains("exists"))
    return (e->is_bool() ? e->as_bool() : true) == present;
  if (!present) return false;
  const json::value& v = *rendered;
  if (const auto* x = o->if_contains("equals")) return JsonEqual(v, *x);
  if (const auto* x = o->if_contains("not_equals")) return !JsonEqual(v, *x);
  for (const char* op : {"gt", "gte", "lt", "lte"}) {
    if (const auto* x = o->if_contains(op)) return Compare(v, *x, op);
  }
  if (const auto* x = o->if_contains("in")) {
    if (!x->is_array()) return BadCondition("in must be a list");
    for (const auto& y : x->get_array()) {
      if (JsonEqual(v, y)) return true;
    }
    return false;
  }
  if (const auto* x = o->if_contains("contains")) {
    if (v.is_string() && x->is_string())
      return std::string_view(v.as_string()).find(x->as_string()) != std::string_view::npos;
    if (v.is_array()) {
      for (const auto& y : v.as_array()) {
        if (JsonEqual(y, *x)) return true;
      }
    }
    return false;
  }
  if (const auto* x = o->if_contains("matches")) {
    if (!x->is_string()) return BadCondition("matches must be a string (a regular expression)");
    if (!v.is_string()) return false;
    auto regex =
        patterns != nullptr ? patterns->Get(x->get_string()) : Regex::Compile(x->get_string());
    if (!regex.ok())
      return BadCondition("matches is not a valid regular expression: " + regex.error().message);
    auto found = regex->Search(v.get_string());
    if (!found.ok()) {
      // The engine gave up (its match limits): the same text fails the same way again.
      return Error(ErrorCode::kInvalidRequest,
                   "could not match the pattern \"" + regex->source() + "\" against a text of " +
                       std::to_string(v.get_string().size()) + " bytes: " + found.error().message);
    }
    return *found;
  }
  return BadCondition("a condition without a test");
}

}  // namespace

Result<bool> EvaluateCondition(const json::value& c, const TemplateContext& scope,
                               PatternCache* patterns) {
  return Evaluate(c, scope, patterns, 0);
}

Result<json::value> ParseModelJson(std::string_view text) {
  auto direct = ParseJson(text);
  if (direct.ok()) return direct;
  // Models often wrap JSON in a fenced block.
  const auto fence = text.find("```");
  if (fence != std::string_view::npos) {
    auto start = text.find('\n', fence);
    const auto end =
        start == std::string_view::npos ? std::string_view::npos : text.find("```", start);
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
