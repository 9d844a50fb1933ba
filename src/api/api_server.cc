#include "keel/api/api_server.h"

#include "task_polls.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <map>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>

#include "keel/core/ids.h"
#include "keel/core/json_schema.h"
#include "keel/core/lru.h"
#include "keel/core/sse.h"
#include "keel/engine/engine.h"
#include "keel/engine/pipeline.h"
#include "keel/net/worker_pool.h"
#include "keel/obs/log.h"
#include "keel/obs/metrics.h"
#include "responses.h"
#include "task_polls.h"

namespace keel::api {

namespace {
json::value TimeOrNull(const std::optional<Timestamp>& t) {
  return t ? json::value(FormatRfc3339(*t)) : json::value(nullptr);
}
json::value ErrorOrNull(const std::optional<Error>& e) {
  if (!e) return nullptr;
  return json::object{{"type", ErrorCodeName(e->code)}, {"message", e->message}};
}
}  // namespace

json::value RunToJson(const store::RunRecord& run, bool with_steps) {
  json::object o{{"id", run.id},
                 {"object", "run"},
                 {"pipeline", run.pipeline},
                 {"status", store::RunStatusName(run.status)},
                 {"input", run.input},
                 {"output", run.output},
                 {"error", ErrorOrNull(run.error)},
                 {"idempotency_key", run.idempotency_key.empty() ? json::value(nullptr) : json::value(run.idempotency_key)},
                 {"created_at", FormatRfc3339(run.created_at)},
                 {"updated_at", FormatRfc3339(run.updated_at)},
                 {"started_at", TimeOrNull(run.started_at)},
                 {"finished_at", TimeOrNull(run.finished_at)}};
  if (run.started_at && run.finished_at) o["duration_ms"] = (*run.finished_at - *run.started_at).count();
  if (!run.parent.empty()) o["parent"] = run.parent;
  if (!run.waiting.is_null()) o["waiting"] = run.waiting;
  if (!run.signals.empty()) {
    json::object sig;
    for (const auto& [name, v] : run.signals) {
      json::object e{{"payload", v.at("payload")}};
      if (const auto* at = v.as_object().if_contains("at_ms"); at && at->is_int64()) {
        e["at"] = FormatRfc3339(Timestamp(Duration(at->as_int64())));
      }
      sig[name] = std::move(e);
    }
    o["signals"] = std::move(sig);
  }
  if (with_steps) {
    json::array steps;
    for (const auto& s : run.steps) {
      json::object so{{"id", s.step_id},
                      {"status", store::StepStatusName(s.status)},
                      {"attempts", s.attempts},
                      {"started_at", TimeOrNull(s.started_at)},
                      {"finished_at", TimeOrNull(s.finished_at)},
                      {"output", nullptr},
                      {"error", ErrorOrNull(s.error)}};
      if (s.started_at && s.finished_at) so["duration_ms"] = (*s.finished_at - *s.started_at).count();
      if (s.output.is_object()) {
        for (const auto& kv : s.output.get_object()) so[kv.key()] = kv.value();
      }
      if (s.items > 0) so["items_done"] = s.items;  // a map step: its items checkpointed so far
      steps.push_back(std::move(so));
    }
    o["steps"] = std::move(steps);
  }
  return o;
}

json::value EventToJson(const store::Event& e) {
  return json::object{{"seq", e.seq},
                      {"type", e.type},
                      {"step_id", e.step_id.empty() ? json::value(nullptr) : json::value(e.step_id)},
                      {"attempt", e.attempt > 0 ? json::value(e.attempt) : json::value(nullptr)},
                      {"at", FormatRfc3339(e.at)},
                      {"data", e.data}};
}

namespace {

using net::HttpRequest;
using net::HttpResponse;

Error BadRequest(std::string message, std::string param = {}) {
  return Error(ErrorCode::kInvalidRequest, std::move(message), std::move(param));
}

// The request's path segments for routing, e.g. {"v1","runs","ID","cancel"}: split by the
// server on the path as sent, then each percent-decoded (net::SplitPath), so that an
// escaped slash ("ID%2Fcancel") stays inside its segment. Views into `req.segments`.
std::vector<std::string_view> Segments(const HttpRequest& req) {
  return std::vector<std::string_view>(req.segments.begin(), req.segments.end());
}

Result<int> ParseIntParam(const HttpRequest& req, std::string_view name, int def, int lo, int hi) {
  if (!req.HasQueryParam(name)) return def;
  const std::string v = req.QueryParam(name);
  int n = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < lo || n > hi) {
    return BadRequest(std::string(name) + " must be a whole number from " + std::to_string(lo) + " to " +
                          std::to_string(hi) + ", not \"" + v + "\"",
                      std::string(name));
  }
  return n;
}

class ApiServerImpl final : public ApiServer {
 public:
  ApiServerImpl(const Config& config, store::Store& store, gateway::Gateway& gateway,
                const Clock& clock, Random& random, prometheus::Registry& registry)
      : config_(config),
        store_(store),
        gateway_(gateway),
        clock_(clock),
        random_(random),
        registry_(registry),
        pool_(config.server.handler_threads, 10000),
        http_requests_(prometheus::BuildCounter()
                           .Name("keel_http_requests_total")
                           .Help("HTTP requests answered, by handler and status code")
                           .Register(registry)),
        runs_gauge_(prometheus::BuildGauge().Name("keel_runs").Help("Runs by status").Register(registry)),
        queue_gauge_(prometheus::BuildGauge()
                         .Name("keel_queue_depth")
                         .Help("Queued runs by state: ready (due), leased (in flight), delayed (backoff)")
                         .Register(registry)),
        pool_gauge_(prometheus::BuildGauge()
                        .Name("keel_storage_pool_connections")
                        .Help("This node's connections to the database: size (allowed), open, in_use")
                        .Register(registry)),
        pool_waits_(prometheus::BuildCounter()
                        .Name("keel_storage_pool_waits_total")
                        .Help("Storage calls that waited for a free connection (postgres.pool_size)")
                        .Register(registry)
                        .Add({})),
        pool_timeouts_(prometheus::BuildCounter()
                           .Name("keel_storage_pool_timeouts_total")
                           .Help("Storage calls refused because no connection became free within postgres.pool_timeout")
                           .Register(registry)
                           .Add({})),
        polls_gauge_(prometheus::BuildGauge()
                         .Name("keel_task_polls_waiting")
                         .Help("Task long polls (POST /v1/tasks/poll) waiting for a task on this node")
                         .Register(registry)
                         .Add({})),
        dlq_gauge_(prometheus::BuildGauge()
                       .Name("keel_dlq_size")
                       .Help("Runs in the dead-letter queue")
                       .Register(registry)
                       .Add({})),
        submitted_(prometheus::BuildCounter()
                       .Name("keel_runs_submitted_total")
                       .Help("Runs accepted by POST /v1/runs, by pipeline")
                       .Register(registry)) {
    for (const auto& [name, p] : config_.pipelines) {
      definitions_[name] = engine::DefinitionToJson(p, &config_.pipelines);
      // Content-addressed: the same definition always has the same id, across restarts.
      definition_ids_[name] = "sha256-" + Sha256Hex(CanonicalJson(definitions_[name])).substr(0, 32);
      if (!p.input_schema.is_null()) {
        if (auto compiled = JsonSchema::Compile(p.input_schema); compiled.ok()) input_schemas_.emplace(name, std::move(compiled).value());
      }
    }
  }

  ~ApiServerImpl() override { Stop(); }

  void set_ops_only(bool v) { ops_only_ = v; }

  Result<void> Listen(net::ServerOptions options) {
    auto server = net::HttpServer::Create(options, [this](HttpRequest&& req, net::Responder respond) {
      Dispatch(std::move(req), std::move(respond));
    });
    if (!server.ok()) return std::move(server).error();
    server_ = std::move(server).value();
    return Ok();
  }

  uint16_t port() const override { return server_->port(); }
  void SetDraining() override {
    draining_.store(true);
    polls_.Stop();
  }

  void Stop() override {
    if (stopped_.exchange(true)) return;
    draining_.store(true);
    store_.RemoveTaskListener(task_listener_);
    polls_.Stop();
    if (server_) server_->Stop();
    pool_.Stop();
  }

 private:
  using Handler = HttpResponse (ApiServerImpl::*)(const HttpRequest&, const std::vector<std::string_view>&);

  void Dispatch(HttpRequest&& req, net::Responder respond) {
    const auto segs = Segments(req);
    std::string name;
    Handler h = Route(req, segs, name);
    if (h == nullptr) {
      respond(Answer(name, HttpResponse(NotFoundHere(req, segs))));
      return;
    }
    if (h == &ApiServerImpl::ChatCompletions) {
      ChatCompletionsEntry(req, respond);
      return;
    }
    if (h == &ApiServerImpl::Embeddings) {
      EmbeddingsEntry(req, respond);
      return;
    }
    if (h == &ApiServerImpl::PollTask) {
      PollTaskEntry(std::move(req), respond);
      return;
    }
    auto shared = std::make_shared<HttpRequest>(std::move(req));
    const bool queued = pool_.Submit([this, h, shared, name, respond]() mutable {
      const auto segs2 = Segments(*shared);
      respond(Answer(name, (this->*h)(*shared, segs2)));
    });
    if (!queued) respond(Answer(name, Overloaded()));
  }

  static HttpResponse Overloaded() {
    Error e(ErrorCode::kOverloaded, "keel is overloaded (too many requests waiting); retry later");
    e.retry_after = Duration(1000);
    return ErrorResponse(e);
  }

  HttpResponse Answer(const std::string& name, HttpResponse r) {
    http_requests_.Add({{"handler", name.empty() ? "unknown" : name}, {"code", std::to_string(r.status)}}).Increment();
    return r;
  }

  Handler Route(const HttpRequest& req, const std::vector<std::string_view>& s, std::string& name) {
    const auto& m = req.method;
    if (s.size() == 1 && s[0] == "healthz" && m == "GET") return name = "healthz", &ApiServerImpl::Healthz;
    if (s.size() == 1 && s[0] == "readyz" && m == "GET") return name = "readyz", &ApiServerImpl::Readyz;
    if (s.size() == 1 && s[0] == "metrics" && m == "GET") return name = "metrics", &ApiServerImpl::Metrics;
    if (ops_only_ || s.size() < 2 || s[0] != "v1") return nullptr;
    if (s[1] == "runs") {
      if (s.size() == 2 && m == "POST") return name = "submit_run", &ApiServerImpl::SubmitRun;
      if (s.size() == 2 && m == "GET") return name = "list_runs", &ApiServerImpl::ListRuns;
      if (s.size() == 3 && m == "GET") return name = "get_run", &ApiServerImpl::GetRun;
      if (s.size() == 4 && s[3] == "events" && m == "GET") return name = "run_events", &ApiServerImpl::RunEvents;
      if (s.size() == 6 && s[3] == "steps" && s[5] == "items" && m == "GET") {
        return name = "step_items", &ApiServerImpl::StepItems;
      }
      if (s.size() == 4 && s[3] == "cancel" && m == "POST") return name = "cancel_run", &ApiServerImpl::CancelRun;
      if (s.size() == 4 && s[3] == "redrive" && m == "POST") return name = "redrive_run", &ApiServerImpl::RedriveRun;
      if (s.size() == 5 && s[3] == "signals" && m == "POST") return name = "signal_run", &ApiServerImpl::SignalRun;
    }
    if (s.size() == 2 && s[1] == "dlq" && m == "GET") return name = "list_dlq", &ApiServerImpl::ListDlq;
    if (s.size() == 3 && s[1] == "tasks" && s[2] == "poll" && m == "POST") return name = "poll_task", &ApiServerImpl::PollTask;
    if (s.size() == 4 && s[1] == "tasks" && m == "POST") {
      if (s[3] == "heartbeat") return name = "heartbeat_task", &ApiServerImpl::TaskHeartbeat;
      if (s[3] == "complete") return name = "complete_task", &ApiServerImpl::TaskComplete;
      if (s[3] == "fail") return name = "fail_task", &ApiServerImpl::TaskFail;
    }
    if (s.size() == 3 && s[1] == "chat" && s[2] == "completions" && m == "POST") {
      return name = "chat_completions", &ApiServerImpl::ChatCompletions;
    }
    if (s.size() == 2 && s[1] == "models" && m == "GET") return name = "list_models", &ApiServerImpl::ListModels;
    if (s.size() == 2 && s[1] == "embeddings" && m == "POST") return name = "embeddings", &ApiServerImpl::Embeddings;
    if (s.size() == 2 && s[1] == "pipelines" && m == "GET") return name = "list_pipelines", &ApiServerImpl::ListPipelines;
    return nullptr;
  }

  static HttpResponse NotFoundOrMethod(const HttpRequest& req, const std::vector<std::string_view>& s) {
    // A known path with another method is a 405 naming the allowed ones.
    std::string allow;
    const bool v1 = s.size() >= 2 && s[0] == "v1";
    if (s.size() == 1 && (s[0] == "healthz" || s[0] == "readyz" || s[0] == "metrics")) allow = "GET";
    else if (v1 && s[1] == "runs" && s.size() == 2) allow = "GET, POST";
    else if (v1 && s[1] == "runs" && s.size() == 3) allow = "GET";
    else if (v1 && s[1] == "runs" && s.size() == 4 && s[3] == "events") allow = "GET";
    else if (v1 && s[1] == "runs" && s.size() == 6 && s[3] == "steps" && s[5] == "items") allow = "GET";
    else if (v1 && s[1] == "runs" && s.size() == 4 && (s[3] == "cancel" || s[3] == "redrive")) allow = "POST";
    else if (v1 && s[1] == "runs" && s.size() == 5 && s[3] == "signals") allow = "POST";
    else if (v1 && (s[1] == "dlq" || s[1] == "pipelines" || s[1] == "models") && s.size() == 2) allow = "GET";
    else if (v1 && s.size() == 3 && s[1] == "chat" && s[2] == "completions") allow = "POST";
    else if (v1 && s.size() == 2 && s[1] == "embeddings") allow = "POST";
    else if (v1 && s[1] == "tasks" && ((s.size() == 3 && s[2] == "poll") ||
                                       (s.size() == 4 && (s[3] == "heartbeat" || s[3] == "complete" || s[3] == "fail")))) {
      allow = "POST";
    }
    if (!allow.empty()) {
      auto r = ErrorResponse(Error(ErrorCode::kInvalidRequest, req.method + " is not allowed on " + req.path +
                                                                  "; use " + allow),
                             405);
      r.headers.emplace_back("Allow", allow);
      return r;
    }
    return ErrorResponse(Error(ErrorCode::kNotFound, "no such endpoint: " + req.method + " " + req.path));
  }

  HttpResponse NotFoundHere(const HttpRequest& req, const std::vector<std::string_view>& s) {
    if (ops_only_) {
      return ErrorResponse(Error(ErrorCode::kNotFound, "no such endpoint: " + req.method + " " + req.path +
                                                           " (this is a worker node: it serves /healthz, /readyz and "
                                                           "/metrics only; send API calls to a keel serve node)"));
    }
    return NotFoundOrMethod(req, s);
  }

  HttpResponse Healthz(const HttpRequest&, const std::vector<std::string_view>&) {
    return JsonResponse(200, json::object{{"status", "ok"}});
  }

  HttpResponse Readyz(const HttpRequest&, const std::vector<std::string_view>&) {
    if (draining_.load()) return JsonResponse(503, json::object{{"status", "draining"}});
    auto next = store_.NextDueAt();
    if (!next.ok()) {
      return JsonResponse(503, json::object{{"status", "unavailable"}, {"reason", "storage"},
                                            {"storage", next.error().message}});
    }
    // This node's workers: a lease loop that fails, or every worker stalled, cannot lease
    // work, whatever the storage answers to this one call.
    if (const auto r = engine::Engine::NodeReadiness(); !r.ready) {
      return JsonResponse(503, json::object{{"status", "unavailable"}, {"reason", r.reason}, {"detail", r.detail}});
    }
    return JsonResponse(200, json::object{{"status", "ready"}});
  }

  HttpResponse Metrics(const HttpRequest&, const std::vector<std::string_view>&) {
    if (auto stats = store_.GetStats(); stats.ok()) {
      for (const auto& [status, n] : stats->runs_by_status) {
        runs_gauge_.Add({{"status", std::string(store::RunStatusName(status))}}).Set(static_cast<double>(n));
      }
      queue_gauge_.Add({{"state", "ready"}}).Set(static_cast<double>(stats->queue_ready));
      queue_gauge_.Add({{"state", "leased"}}).Set(static_cast<double>(stats->queue_leased));
      queue_gauge_.Add({{"state", "delayed"}}).Set(static_cast<double>(stats->queue_delayed));
      dlq_gauge_.Set(static_cast<double>(stats->runs_by_status[store::RunStatus::kDeadLettered]));
    }
    polls_gauge_.Set(static_cast<double>(polls_.waiting()));
    if (const auto pool = store_.GetPoolStats(); pool.size > 0) {
      pool_gauge_.Add({{"state", "size"}}).Set(static_cast<double>(pool.size));
      pool_gauge_.Add({{"state", "open"}}).Set(static_cast<double>(pool.open));
      pool_gauge_.Add({{"state", "in_use"}}).Set(static_cast<double>(pool.in_use));
      // The counters follow the store's totals (one scrape at a time moves them).
      std::lock_guard lock(pool_metrics_mu_);
      pool_waits_.Increment(std::max(0.0, static_cast<double>(pool.waits) - pool_waits_.Value()));
      pool_timeouts_.Increment(std::max(0.0, static_cast<double>(pool.timeouts) - pool_timeouts_.Value()));
    }
    HttpResponse r;
    r.content_type = "text/plain; version=0.0.4; charset=utf-8";
    r.body = obs::RenderPrometheus(registry_);
    return r;
  }

  HttpResponse SubmitRun(const HttpRequest& req, const std::vector<std::string_view>&) {
    const auto ct = req.Header("content-type");
    if (!ct.empty() && ct.find("json") == std::string_view::npos) {
      return ErrorResponse(BadRequest("Content-Type must be application/json, not \"" + std::string(ct) + "\""));
    }
    auto body = ParseJson(req.body);
    if (!body.ok()) return ErrorResponse(body.error());
    if (!body->is_object()) {
      return ErrorResponse(BadRequest("the body must be a JSON object such as {\"pipeline\": \"...\", \"input\": {...}}"));
    }
    const auto& o = body->get_object();
    for (const auto& kv : o) {
      if (kv.key() != "pipeline" && kv.key() != "input") {
        return ErrorResponse(BadRequest("unknown field \"" + std::string(kv.key()) + "\"; a run takes pipeline and input",
                                        std::string(kv.key())));
      }
    }
    const auto* pipeline = o.if_contains("pipeline");
    if (pipeline == nullptr) return ErrorResponse(BadRequest("missing field \"pipeline\": the name of the pipeline to run", "pipeline"));
    if (!pipeline->is_string()) {
      return ErrorResponse(BadRequest("\"pipeline\" must be a string, not " + std::string(JsonKindName(*pipeline)), "pipeline"));
    }
    const std::string name(pipeline->get_string());
    const auto def = definitions_.find(name);
    if (def == definitions_.end()) {
      std::string known;
      for (const auto& [n, _] : definitions_) known += (known.empty() ? "" : ", ") + n;
      return ErrorResponse(Error(ErrorCode::kNotFound, "unknown pipeline \"" + name + "\"; known pipelines: " +
                                                           (known.empty() ? "(none)" : known),
                                 "pipeline"));
    }
    json::value input = json::object();
    if (const auto* in = o.if_contains("input")) {
      if (!in->is_object()) {
        return ErrorResponse(BadRequest("\"input\" must be a JSON object, not " + std::string(JsonKindName(*in)), "input"));
      }
      input = *in;
    }
    if (const auto it = input_schemas_.find(name); it != input_schemas_.end()) {
      if (auto v = it->second.Validate(input); !v.ok()) {
        Error e(ErrorCode::kInvalidRequest, "the input does not satisfy pipeline \"" + name + "\"'s input_schema: " +
                                                 v.error().message,
                "input" + v.error().param.substr(std::min<std::size_t>(1, v.error().param.size())));
        return ErrorResponse(e, 422);
      }
    }
    const std::string key(req.Header("idempotency-key"));
    if (key.size() > 255) return ErrorResponse(BadRequest("Idempotency-Key is longer than 255 characters", "Idempotency-Key"));
    for (unsigned char c : key) {
      if (c < 0x20 || c > 0x7e) {
        return ErrorResponse(BadRequest("Idempotency-Key must be printable ASCII", "Idempotency-Key"));
      }
    }
    store::NewRun run;
    run.id = NewRunId(clock_.Now(), random_);
    run.pipeline = name;
    run.input = std::move(input);
    run.definition = def->second;
    run.definition_id = definition_ids_.at(name);
    run.idempotency_key = key;
    if (!key.empty()) run.fingerprint = Sha256Hex(CanonicalJson(json::object{{"pipeline", name}, {"input", run.input}}));
    run.max_queue_depth = config_.engine.max_queue_depth;
    auto submitted = store_.SubmitRun(run);
    if (!submitted.ok()) return ErrorResponse(submitted.error());
    if (submitted->created) {
      submitted_.Add({{"pipeline", name}}).Increment();
    }
    auto r = JsonResponse(submitted->created ? 201 : 200, RunToJson(submitted->run, true));
    r.headers.emplace_back("Location", "/v1/runs/" + submitted->run.id);
    if (!submitted->created) r.headers.emplace_back("Idempotent-Replayed", "true");
    return r;
  }

  // While the storage cannot be reached (a database restart), the last answer this node
  // gave for a run is served again, marked stale (RFC 9111's Age and Warning 110, and
  // X-Keel-Stale), instead of a 503: a client that polls a run keeps its view.
  HttpResponse GetRun(const HttpRequest&, const std::vector<std::string_view>& s) {
    const std::string id(s[2]);
    auto run = store_.GetRun(id);
    if (!run.ok()) {
      if (run.error().code == ErrorCode::kUnavailable) {
        if (auto last = last_runs_.Get(id)) {
          HttpResponse r;
          r.status = 200;
          r.body = (*last)->body;
          const auto age = std::chrono::duration_cast<std::chrono::seconds>(clock_.Now() - (*last)->at).count();
          r.headers.emplace_back("Age", std::to_string(std::max<int64_t>(0, age)));
          r.headers.emplace_back("Warning", "110 keel \"Response is Stale\"");
          r.headers.emplace_back("X-Keel-Stale", "true");
          return r;
        }
      }
      return ErrorResponse(run.error());
    }
    auto r = JsonResponse(200, RunToJson(*run, true));
    if (r.body.size() <= kLastRunMaxBytes) last_runs_.Put(id, std::make_shared<const LastRun>(LastRun{r.body, clock_.Now()}));
    return r;
  }

  HttpResponse ListWith(const HttpRequest& req, std::optional<store::RunStatus> forced) {
    store::RunFilter f;
    if (forced) {
      f.status = forced;
    } else if (req.HasQueryParam("status")) {
      const auto st = req.QueryParam("status");
      f.status = store::RunStatusFromName(st);
      if (!f.status) {
        return ErrorResponse(BadRequest("unknown status \"" + st + "\"; use one of queued, running, waiting, succeeded, "
                                        "failed, cancelled, dead_lettered", "status"));
      }
    }
    f.pipeline = req.QueryParam("pipeline");
    auto limit = ParseIntParam(req, "limit", 50, 1, 1000);
    if (!limit.ok()) return ErrorResponse(limit.error());
    f.limit = *limit;
    f.cursor = req.QueryParam("cursor");
    if (!f.cursor.empty() && f.cursor.rfind("run_", 0) != 0) {
      return ErrorResponse(BadRequest("cursor must be the next_cursor of a previous page", "cursor"));
    }
    auto page = store_.ListRuns(f);
    if (!page.ok()) return ErrorResponse(page.error());
    json::array data;
    for (const auto& r : page->runs) data.push_back(RunToJson(r, false));
    return JsonResponse(200, json::object{{"object", "list"},
                                          {"data", std::move(data)},
                                          {"has_more", !page->next_cursor.empty()},
                                          {"next_cursor", page->next_cursor.empty() ? json::value(nullptr)
                                                                                    : json::value(page->next_cursor)}});
  }

  HttpResponse ListRuns(const HttpRequest& req, const std::vector<std::string_view>&) { return ListWith(req, std::nullopt); }
  HttpResponse ListDlq(const HttpRequest& req, const std::vector<std::string_view>&) {
    return ListWith(req, store::RunStatus::kDeadLettered);
  }

  HttpResponse RunEvents(const HttpRequest& req, const std::vector<std::string_view>& s) {
    auto limit = ParseIntParam(req, "limit", 1000, 1, 10000);
    if (!limit.ok()) return ErrorResponse(limit.error());
    auto after = ParseIntParam(req, "after", 0, 0, std::numeric_limits<int>::max());
    if (!after.ok()) return ErrorResponse(after.error());
    auto events = store_.ListEvents(std::string(s[2]), *after, *limit);
    if (!events.ok()) return ErrorResponse(events.error());
    json::array data;
    for (const auto& e : *events) data.push_back(EventToJson(e));
    const int64_t last = events->empty() ? *after : events->back().seq;
    return JsonResponse(200, json::object{{"object", "list"}, {"data", std::move(data)}, {"next_after", last}});
  }

  // A map step's checkpointed items, in index order, a page at a time (a map may have
  // millions: the run's record counts them, this lists them).
  HttpResponse StepItems(const HttpRequest& req, const std::vector<std::string_view>& s) {
    auto limit = ParseIntParam(req, "limit", 100, 1, 1000);
    if (!limit.ok()) return ErrorResponse(limit.error());
    auto after = ParseIntParam(req, "after", -1, -1, std::numeric_limits<int>::max());
    if (!after.ok()) return ErrorResponse(after.error());
    // One more than asked: whether there are more.
    auto items = store_.ListItems(std::string(s[2]), std::string(s[4]), *after, *limit + 1, true);
    if (!items.ok()) return ErrorResponse(items.error());
    const bool more = static_cast<int>(items->size()) > *limit;
    if (more) items->pop_back();
    json::array data;
    for (auto& item : *items) data.push_back(json::object{{"index", item.index}, {"output", std::move(item.output)}});
    const int64_t last = items->empty() ? *after : items->back().index;
    return JsonResponse(200, json::object{{"object", "list"}, {"data", std::move(data)}, {"has_more", more},
                                          {"next_after", last}});
  }

  HttpResponse CancelRun(const HttpRequest&, const std::vector<std::string_view>& s) {
    auto run = store_.CancelRun(std::string(s[2]));
    if (!run.ok()) return ErrorResponse(run.error());
    obs::LogInfo("run cancelled", {{"run_id", run->id}});
    return JsonResponse(200, RunToJson(*run, true));
  }

  HttpResponse RedriveRun(const HttpRequest&, const std::vector<std::string_view>& s) {
    auto run = store_.RedriveRun(std::string(s[2]));
    if (!run.ok()) return ErrorResponse(run.error());
    obs::LogInfo("run redriven", {{"run_id", run->id}});
    return JsonResponse(200, RunToJson(*run, true));
  }

  // The JSON object body of a task call, or why not.
  static Result<json::object> TaskBody(const HttpRequest& req, bool required) {
    if (req.body.empty()) {
      if (required) return BadRequest("the body must be a JSON object");
      return json::object{};
    }
    auto parsed = ParseJson(req.body);
    if (!parsed.ok()) return parsed.error();
    if (!parsed->is_object()) return BadRequest("the body must be a JSON object");
    return std::move(parsed->as_object());
  }

  static json::value TaskToJson(const store::TaskRecord& t) {
    return json::object{{"token", t.token},       {"run_id", t.run_id}, {"step_id", t.step_id},
                        {"attempt", t.attempt},   {"queue", t.queue},   {"input", t.input},
                        {"status", store::TaskStatusName(t.status)},
                        {"lease_expires_at", t.lease_expires ? json::value(FormatRfc3339(*t.lease_expires)) : json::value(nullptr)},
                        {"heartbeat_timeout_ms", t.heartbeat_timeout.count()}};
  }

  // POST /v1/tasks/poll {"queue", "worker_id", "wait_ms"}: a long poll; 200 with a task,
  // or 204 when none came within wait_ms (at most 60000). The first look runs on the
  // handler pool; a poll that has to wait then waits in polls_, holding no thread.
  void PollTaskEntry(HttpRequest&& req, const net::Responder& respond) {
    auto shared = std::make_shared<HttpRequest>(std::move(req));
    const bool queued = pool_.Submit([this, shared, respond] {
      auto body = TaskBody(*shared, true);
      if (!body.ok()) return respond(Answer("poll_task", ErrorResponse(body.error())));
      const auto* queue = body->if_contains("queue");
      const auto* worker = body->if_contains("worker_id");
      if (!queue || !queue->is_string() || queue->as_string().empty()) {
        return respond(Answer("poll_task", ErrorResponse(BadRequest(
            "missing field \"queue\": the task queue to poll (a task step's queue)", "queue"))));
      }
      if (!worker || !worker->is_string() || worker->as_string().empty() || worker->as_string().size() > 200) {
        return respond(Answer("poll_task", ErrorResponse(BadRequest(
            "missing field \"worker_id\": a name for this worker (1..200 characters)", "worker_id"))));
      }
      int64_t wait_ms = 0;
      if (const auto* w = body->if_contains("wait_ms")) {
        if (!w->is_int64() || w->as_int64() < 0 || w->as_int64() > 60000) {
          return respond(Answer("poll_task", ErrorResponse(BadRequest(
              "\"wait_ms\" must be a whole number from 0 to 60000", "wait_ms"))));
        }
        wait_ms = w->as_int64();
      }
      std::string q(queue->as_string()), wid(worker->as_string());
      auto t = store_.LeaseTask(q, wid);
      if (!t.ok() || t->has_value() || wait_ms == 0 || draining_.load()) {
        return AnswerPoll(respond, wid, std::move(t));
      }
      polls_.Wait(std::move(q), std::move(wid), std::chrono::milliseconds(wait_ms), respond);
    });
    if (!queued) respond(Answer("poll_task", Overloaded()));
  }

  // A poll's answer: its task (200), none (204) or the store's error.
  void AnswerPoll(const net::Responder& respond, const std::string& worker_id, TaskPolls::Outcome t) {
    if (!t.ok()) return respond(Answer("poll_task", ErrorResponse(t.error())));
    if (t->has_value()) {
      obs::LogInfo("task leased", {{"run_id", (*t)->run_id}, {"step_id", (*t)->step_id}, {"worker", worker_id}});
      return respond(Answer("poll_task", JsonResponse(200, TaskToJson(**t))));
    }
    HttpResponse r;
    r.status = 204;
    r.content_type.clear();
    respond(Answer("poll_task", std::move(r)));
  }

  // Routing only: PollTaskEntry answers.
  HttpResponse PollTask(const HttpRequest&, const std::vector<std::string_view>&) {
    return ErrorResponse(Error(ErrorCode::kInternal, "poll_task is answered by PollTaskEntry"));
  }

  HttpResponse TaskHeartbeat(const HttpRequest&, const std::vector<std::string_view>& s) {
    auto t = store_.HeartbeatTask(std::string(s[2]));
    if (!t.ok()) return ErrorResponse(t.error());
    return JsonResponse(200, TaskToJson(*t));
  }

  HttpResponse TaskComplete(const HttpRequest& req, const std::vector<std::string_view>& s) {
    auto body = TaskBody(req, true);
    if (!body.ok()) return ErrorResponse(body.error());
    const auto* out = body->if_contains("output");
    if (out == nullptr) return ErrorResponse(BadRequest("missing field \"output\": the task's result (any JSON)", "output"));
    auto t = store_.CompleteTask(std::string(s[2]), *out);
    if (!t.ok()) return ErrorResponse(t.error());
    return JsonResponse(200, TaskToJson(*t));
  }

  HttpResponse TaskFail(const HttpRequest& req, const std::vector<std::string_view>& s) {
    auto body = TaskBody(req, true);
    if (!body.ok()) return ErrorResponse(body.error());
    Error e(ErrorCode::kServerError, "the worker failed the task");
    if (const auto* err = body->if_contains("error")) {
      if (!err->is_object()) return ErrorResponse(BadRequest("\"error\" must be an object {type, message}", "error"));
      e = store::ErrorFromJson(*err);
      if (const auto* m = err->as_object().if_contains("message"); !m || !m->is_string()) {
        return ErrorResponse(BadRequest("\"error.message\" must be a string", "error.message"));
      }
    }
    bool retryable = true;
    if (const auto* r = body->if_contains("retryable")) {
      if (!r->is_bool()) return ErrorResponse(BadRequest("\"retryable\" must be true or false", "retryable"));
      retryable = r->as_bool();
    }
    auto t = store_.FailTask(std::string(s[2]), e, retryable);
    if (!t.ok()) return ErrorResponse(t.error());
    return JsonResponse(200, TaskToJson(*t));
  }

  // POST /v1/runs/{id}/signals/{name}: the body (any JSON; empty means null) is the payload.
  HttpResponse SignalRun(const HttpRequest& req, const std::vector<std::string_view>& s) {
    const std::string name(s[4]);
    if (!IsSignalName(name)) {
      return ErrorResponse(BadRequest("a signal name holds 1 to 128 letters, digits, _, - and ., not \"" + name + "\"", "name"));
    }
    json::value payload = nullptr;
    if (!req.body.empty()) {
      auto parsed = ParseJson(req.body);
      if (!parsed.ok()) return ErrorResponse(parsed.error());
      payload = std::move(parsed).value();
    }
    auto run = store_.SendSignal(std::string(s[2]), name, payload);
    if (!run.ok()) return ErrorResponse(run.error());
    obs::LogInfo("signal received", {{"run_id", run->id}, {"signal", name}});
    return JsonResponse(202, RunToJson(*run, true));
  }

  // Only a marker for Route(): ChatCompletionsEntry answers these requests.
  HttpResponse ChatCompletions(const HttpRequest&, const std::vector<std::string_view>&) {
    return ErrorResponse(Error(ErrorCode::kInternal, "unreachable"));
  }

  // POST /v1/chat/completions, parsed on the I/O thread, and answered from there: the
  // gateway calls providers asynchronously, so neither a whole answer nor a stream holds
  // a thread while providers answer. A client that hangs up cancels its call.
  void ChatCompletionsEntry(const HttpRequest& req, const net::Responder& respond) {
    bool stream = false;
    auto call = ParseChatRequest(req, stream);
    if (!call.ok()) {
      respond(Answer("chat_completions", ErrorResponse(call.error())));
      return;
    }
    call->cancel = respond.client_gone();
    std::string route = call->route;
    if (!stream) {
      gateway_.ChatAsync(std::move(*call), respond.executor(),
                         [this, respond, route = std::move(route)](Result<gateway::ChatResult> r) {
                           respond(Answer("chat_completions", ChatAnswer(route, std::move(r))));
                         });
      return;
    }
    auto sink = std::make_shared<SseSink>(respond, route);
    gateway_.ChatStreamAsync(std::move(*call), respond.executor(), sink,
                             [this, sink, respond, route](Result<gateway::ChatResult> r) {
                               EndStream(*sink, respond, route, std::move(r));
                             });
  }

  // A streamed answer's body, written without blocking. The answer starts with the first
  // chunk, so that every failure before it (failed over or not) is still a plain HTTP
  // error with its status. Holds at most kMaxBuffered bytes for a slow client before it
  // holds back the provider.
  class SseSink final : public gateway::Gateway::StreamSink {
   public:
    static constexpr std::size_t kMaxBuffered = 64 << 10;
    SseSink(net::Responder respond, std::string route) : respond_(std::move(respond)), route_(std::move(route)) {}
    bool OnChunk(const json::object& chunk) override {
      if (!Start({{"Cache-Control", "no-cache"}, {"X-Keel-Route", route_}})) return false;
      return writer_->Write(FormatSse(json::serialize(chunk)));
    }
    bool Full() const override { return writer_ && !writer_->gone() && writer_->buffered() > kMaxBuffered; }
    void WhenReady(std::function<void()> ready) override {
      if (!writer_) return ready();
      writer_->OnDrained(std::move(ready));
    }
    bool started() const { return writer_ != nullptr; }
    bool Start(net::Headers headers) {
      if (!writer_) writer_ = respond_.StartStreamAsync(200, "text/event-stream", std::move(headers));
      return writer_ != nullptr;
    }
    net::AsyncChunkedWriter& writer() { return *writer_; }

   private:
    net::Responder respond_;
    std::string route_;
    std::shared_ptr<net::AsyncChunkedWriter> writer_;
  };

  void EndStream(SseSink& sink, const net::Responder& respond, const std::string& route, Result<gateway::ChatResult> r) {
    if (!sink.started()) {
      if (!r.ok()) {
        auto resp = ErrorResponse(r.error());
        resp.headers.emplace_back("X-Keel-Route", route);
        respond(Answer("chat_completions", std::move(resp)));
        return;
      }
      if (!sink.Start({{"Cache-Control", "no-cache"}})) return;
    }
    if (r.ok()) {
      sink.writer().Write("data: [DONE]\n\n");
      Answer("chat_completions", JsonResponse(200, nullptr));
    } else {
      // After the first token: end with an error event, never a silent truncation.
      const Error& e = r.error();
      sink.writer().Write(FormatSse(json::serialize(json::object{
          {"error", json::object{{"type", ErrorCodeName(e.code)}, {"message", e.message}, {"code", ErrorCodeName(e.code)}}}})));
      Answer("chat_completions", JsonResponse(502, nullptr));
    }
    sink.writer().Finish();
  }

  HttpResponse ChatAnswer(const std::string& route, Result<gateway::ChatResult> r) {
    if (!r.ok()) {
      auto resp = ErrorResponse(r.error());
      resp.headers.emplace_back("X-Keel-Route", route);
      return resp;
    }
    json::object out = std::move(r->response);
    out["model"] = r->model;
    auto resp = JsonResponse(200, out);
    AddKeelHeaders(resp.headers, route, *r);
    return resp;
  }

  static void AddKeelHeaders(net::Headers& h, const std::string& route, const gateway::ChatResult& r) {
    h.emplace_back("X-Keel-Route", route);
    h.emplace_back("X-Keel-Provider", r.provider);
    h.emplace_back("X-Keel-Attempts", std::to_string(r.attempts));
    h.emplace_back("X-Keel-Failovers", std::to_string(r.failovers));
    h.emplace_back("X-Keel-Duration-Ms", std::to_string(r.duration.count()));
    if (r.cache != gateway::CacheStatus::kNone) {
      h.emplace_back("X-Keel-Cache", std::string(gateway::CacheStatusName(r.cache)));
      if (r.cache == gateway::CacheStatus::kHit || r.cache == gateway::CacheStatus::kStale) {
        h.emplace_back("Age", std::to_string(r.cache_age.count() / 1000));  // HTTP's, in seconds
      }
    }
  }

  // The request directives of Cache-Control that keel honours: no-store (neither read nor
  // store the route's cache) wins over no-cache (do not read; store). Others are ignored.
  static gateway::CacheMode CacheModeOf(const HttpRequest& req) {
    std::string_view v = req.Header("cache-control");
    gateway::CacheMode mode = gateway::CacheMode::kDefault;
    while (!v.empty()) {
      const auto comma = v.find(',');
      std::string_view d = v.substr(0, comma);
      v = comma == std::string_view::npos ? std::string_view() : v.substr(comma + 1);
      while (!d.empty() && (d.front() == ' ' || d.front() == '\t')) d.remove_prefix(1);
      while (!d.empty() && (d.back() == ' ' || d.back() == '\t')) d.remove_suffix(1);
      auto is = [&](std::string_view name) {
        return d.size() == name.size() && std::equal(d.begin(), d.end(), name.begin(), [](char a, char b) {
                 return std::tolower(static_cast<unsigned char>(a)) == b;
               });
      };
      if (is("no-store")) mode = gateway::CacheMode::kNoStore;
      else if (is("no-cache") && mode == gateway::CacheMode::kDefault) mode = gateway::CacheMode::kNoCache;
    }
    return mode;
  }

  // The route a gateway call goes to: `model`, or the X-Keel-Route header, which names a
  // route configured under `routes` only. A provider's name there would bypass the targets
  // (and the limits, failover and budgets) an operator set for the traffic of a route.
  Result<std::string> RouteOf(const HttpRequest& req, std::string_view model) const {
    const std::string_view header = req.Header("x-keel-route");
    if (header.empty()) return std::string(model);
    const std::string route(header);
    if (config_.routes.count(route)) return route;
    std::string names;
    for (const auto& [name, r] : config_.routes) names += (names.empty() ? "" : ", ") + name;
    const std::string listed = names.empty() ? "none is configured" : "the routes are: " + names;
    if (config_.providers.count(route)) {
      return Error(ErrorCode::kNotFound,
                   "X-Keel-Route names a route, and \"" + route + "\" is a provider; call a route that targets it (" +
                       listed + "), or drop the header",
                   "X-Keel-Route");
    }
    return Error(ErrorCode::kNotFound, "X-Keel-Route: no route named \"" + route + "\" (" + listed + ")", "X-Keel-Route");
  }

  // Reads and checks an OpenAI chat-completions request; `stream` says whether the
  // answer is to be streamed.
  Result<gateway::ChatRequest> ParseChatRequest(const HttpRequest& req, bool& stream) {
    auto body = ParseJson(req.body);
    if (!body.ok()) return body.error();
    if (!body->is_object()) return BadRequest("the body must be a JSON object with model and messages");
    json::object o = std::move(body->as_object());
    const auto* model = o.if_contains("model");
    if (model == nullptr) return BadRequest("missing field \"model\": the route to call (GET /v1/models lists them)", "model");
    if (!model->is_string()) return BadRequest("\"model\" must be a string", "model");
    const auto* messages = o.if_contains("messages");
    if (messages == nullptr) return BadRequest("missing field \"messages\": a non-empty array of {role, content}", "messages");
    if (!messages->is_array() || messages->get_array().empty()) {
      return BadRequest("\"messages\" must be a non-empty array of {role, content}", "messages");
    }
    std::size_t i = 0;
    for (const auto& m : messages->get_array()) {
      const std::string at = "messages[" + std::to_string(i++) + "]";
      if (!m.is_object()) return BadRequest(at + " must be an object with role and content", at);
      const auto* role = m.get_object().if_contains("role");
      if (role == nullptr || !role->is_string()) return BadRequest(at + ".role must be a string", at + ".role");
    }
    if (const auto* st = o.if_contains("stream"); st != nullptr && !st->is_null()) {
      if (!st->is_bool()) return BadRequest("\"stream\" must be true or false", "stream");
      stream = st->get_bool();
    }
    gateway::ChatRequest call;
    auto route = RouteOf(req, model->get_string());
    if (!route.ok()) return route.error();
    call.route = std::move(route).value();
    o.erase("model");
    o.erase("stream");
    if (!stream) o.erase("stream_options");
    call.body = std::move(o);
    call.idempotency_key = std::string(req.Header("idempotency-key"));
    call.cache = CacheModeOf(req);
    call.timeout = Duration(120000);
    if (req.Header("x-keel-timeout-ms").size() > 0) {
      const std::string v(req.Header("x-keel-timeout-ms"));
      int64_t ms = 0;
      const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), ms);
      if (ec != std::errc() || p != v.data() + v.size() || ms < 1 || ms > 3'600'000) {
        return BadRequest("X-Keel-Timeout-Ms must be a whole number of milliseconds from 1 to 3600000", "X-Keel-Timeout-Ms");
      }
      call.timeout = Duration(ms);
    }
    if (req.Header("x-keel-max-attempts").size() > 0) {
      const std::string v(req.Header("x-keel-max-attempts"));
      int n = 0;
      const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if (ec != std::errc() || p != v.data() + v.size() || n < 1 || n > 10) {
        return BadRequest("X-Keel-Max-Attempts must be a whole number from 1 to 10", "X-Keel-Max-Attempts");
      }
      call.max_attempts = n;
    }
    return call;
  }

  // Only a marker for Route(): EmbeddingsEntry answers these requests.
  HttpResponse Embeddings(const HttpRequest&, const std::vector<std::string_view>&) {
    return ErrorResponse(Error(ErrorCode::kInternal, "unreachable"));
  }

  // POST /v1/embeddings: OpenAI-compatible; `model` names a route. Parsed and answered on
  // the I/O thread, as chat completions are.
  void EmbeddingsEntry(const HttpRequest& req, const net::Responder& respond) {
    auto call = ParseEmbeddingsRequest(req);
    if (!call.ok()) {
      respond(Answer("embeddings", ErrorResponse(call.error())));
      return;
    }
    call->cancel = respond.client_gone();
    std::string route = call->route;
    gateway_.EmbeddingsAsync(std::move(*call), respond.executor(),
                             [this, respond, route = std::move(route)](Result<gateway::ChatResult> r) {
                               respond(Answer("embeddings", EmbeddingsAnswer(route, std::move(r))));
                             });
  }

  Result<gateway::ChatRequest> ParseEmbeddingsRequest(const HttpRequest& req) {
    auto body = ParseJson(req.body);
    if (!body.ok()) return std::move(body).error();
    if (!body->is_object()) return BadRequest("the body must be a JSON object with model and input");
    json::object o = std::move(body->as_object());
    const auto* model = o.if_contains("model");
    if (model == nullptr || !model->is_string()) {
      return BadRequest("\"model\" must be a string naming a route (GET /v1/models lists them)", "model");
    }
    const auto* input = o.if_contains("input");
    bool ok = input != nullptr && ((input->is_string() && !input->get_string().empty()) ||
                                   (input->is_array() && !input->get_array().empty()));
    if (ok && input->is_array()) {
      for (const auto& v : input->get_array()) ok = ok && (v.is_string() || v.is_array());
    }
    if (!ok) return BadRequest("\"input\" must be a non-empty string or array of strings", "input");
    gateway::ChatRequest call;
    auto route = RouteOf(req, model->get_string());
    if (!route.ok()) return std::move(route).error();
    call.route = std::move(route).value();
    o.erase("model");
    call.body = std::move(o);
    call.idempotency_key = std::string(req.Header("idempotency-key"));
    call.cache = CacheModeOf(req);
    return call;
  }

  HttpResponse EmbeddingsAnswer(const std::string& route, Result<gateway::ChatResult> r) {
    if (!r.ok()) {
      auto resp = ErrorResponse(r.error());
      resp.headers.emplace_back("X-Keel-Route", route);
      return resp;
    }
    json::object out = std::move(r->response);
    if (!r->model.empty()) out["model"] = r->model;
    auto resp = JsonResponse(200, out);
    AddKeelHeaders(resp.headers, route, *r);
    return resp;
  }

  // GET /v1/models: the routes, as OpenAI model objects.
  HttpResponse ListModels(const HttpRequest&, const std::vector<std::string_view>&) {
    json::array data;
    for (const auto& route : gateway_.Routes()) {
      json::array providers;
      for (const auto& p : route.providers) providers.emplace_back(p);
      data.push_back(json::object{{"id", route.name}, {"object", "model"}, {"created", 0}, {"owned_by", "keel"},
                                  {"strategy", route.strategy}, {"providers", std::move(providers)}});
    }
    return JsonResponse(200, json::object{{"object", "list"}, {"data", std::move(data)}});
  }

  HttpResponse ListPipelines(const HttpRequest&, const std::vector<std::string_view>&) {
    json::array data;
    for (const auto& [name, p] : config_.pipelines) {
      json::array steps;
      for (const auto& st : p.steps) steps.push_back(json::object{{"id", st.id}, {"kind", StepKindName(st.kind)}});
      data.push_back(json::object{{"name", name}, {"description", p.description}, {"steps", std::move(steps)}});
    }
    return JsonResponse(200, json::object{{"object", "list"}, {"data", std::move(data)}});
  }

  const Config& config_;
  store::Store& store_;
  bool ops_only_ = false;
  // The last answers of GET /v1/runs/{id} (GetRun): 2,048 runs of at most 16 KiB each.
  struct LastRun {
    std::string body;
    Timestamp at;
  };
  static constexpr std::size_t kLastRunMaxBytes = 16 << 10;
  LruMap<std::shared_ptr<const LastRun>> last_runs_{2048};
  gateway::Gateway& gateway_;
  const Clock& clock_;
  Random& random_;
  prometheus::Registry& registry_;
  std::map<std::string, json::value> definitions_;
  std::map<std::string, std::string> definition_ids_;
  net::WorkerPool pool_;
  // The task long polls that wait (after pool_, which runs their store calls).
  TaskPolls polls_{store_, pool_, [this](const net::Responder& respond, TaskPolls::Outcome t) {
                     const std::string worker = t.ok() && t->has_value() ? (*t)->worker_id : std::string();
                     AnswerPoll(respond, worker, std::move(t));
                   }};
  uint64_t task_listener_ = store_.AddTaskListener([this] { polls_.Notify(); });
  std::map<std::string, JsonSchema> input_schemas_;  // by pipeline
  std::unique_ptr<net::HttpServer> server_;
  std::atomic<bool> draining_{false};
  std::atomic<bool> stopped_{false};
  prometheus::Family<prometheus::Counter>& http_requests_;
  prometheus::Family<prometheus::Gauge>& runs_gauge_;
  prometheus::Family<prometheus::Gauge>& queue_gauge_;
  prometheus::Family<prometheus::Gauge>& pool_gauge_;
  prometheus::Counter& pool_waits_;
  prometheus::Counter& pool_timeouts_;
  std::mutex pool_metrics_mu_;
  prometheus::Gauge& polls_gauge_;
  prometheus::Gauge& dlq_gauge_;
  prometheus::Family<prometheus::Counter>& submitted_;
};

}  // namespace

Result<std::unique_ptr<ApiServer>> ApiServer::Create(const Config& config, net::ServerOptions server,
                                                     store::Store& store, gateway::Gateway& gateway,
                                                     const Clock& clock, Random& random,
                                                     prometheus::Registry& registry, bool ops_only) {
  auto api = std::make_unique<ApiServerImpl>(config, store, gateway, clock, random, registry);
  api->set_ops_only(ops_only);
  // The model endpoints take prompts with images and documents: their own, larger limit.
  server.max_body_setting = "server.max_body_bytes";
  const std::size_t model_limit = config.server.max_model_body_bytes;
  server.body_limit = [model_limit](const net::HttpRequest& req) {
    const auto& s = req.segments;
    const bool model = req.method == "POST" && s.size() >= 2 && s[0] == "v1" &&
                       ((s.size() == 3 && s[1] == "chat" && s[2] == "completions") ||
                        (s.size() == 2 && (s[1] == "embeddings" || s[1] == "completions" || s[1] == "responses" ||
                                           s[1] == "messages")));
    return model ? net::ServerOptions::BodyLimit{model_limit, "server.max_model_body_bytes"} : net::ServerOptions::BodyLimit{};
  };
  KEEL_RETURN_IF_ERROR(api->Listen(std::move(server)));
  return std::unique_ptr<ApiServer>(std::move(api));
}

}  // namespace keel::api
