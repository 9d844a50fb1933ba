#include "keel/engine/engine.h"

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <prometheus/counter.h>
#include <prometheus/histogram.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "keel/core/backoff.h"
#include "keel/core/ids.h"
#include "keel/engine/pipeline.h"
#include "keel/obs/log.h"
#include "keel/obs/metrics.h"
#include "steps.h"

namespace keel::engine {
namespace {

using store::FailureDisposition;
using store::StepStatus;

class EngineImpl final : public Engine {
 public:
  EngineImpl(const EngineConfig& config, store::Store& store, gateway::Gateway& gateway, const Clock& clock,
             Random& random, prometheus::Registry& registry)
      : config_(config),
        store_(store),
        clock_(clock),
        random_(random),
        runners_(MakeStepRunners(gateway)),
        step_latency_(prometheus::BuildHistogram()
                          .Name("keel_step_duration_seconds")
                          .Help("Duration of step attempts, by pipeline, kind and outcome")
                          .Register(registry)),
        step_errors_(prometheus::BuildCounter()
                         .Name("keel_step_errors_total")
                         .Help("Failed step attempts, by pipeline and error class")
                         .Register(registry)),
        retries_(prometheus::BuildCounter()
                     .Name("keel_step_retries_total")
                     .Help("Step attempts scheduled again after a failure, by pipeline")
                     .Register(registry)),
        runs_finished_(prometheus::BuildCounter()
                           .Name("keel_runs_finished_total")
                           .Help("Runs that reached a terminal state on this node, by pipeline and status")
                           .Register(registry)),
        node_id_(MakeNodeId()) {}

  ~EngineImpl() override { Stop(); }

  void Start() override {
    for (int i = 0; i < config_.workers; ++i) {
      workers_.emplace_back([this, i] { WorkerLoop(node_id_ + "/" + std::to_string(i)); });
    }
    if (config_.workers > 0) heartbeat_ = std::thread([this] { HeartbeatLoop(); });
  }

  void Notify() override {
    {
      std::lock_guard lock(mu_);
      ++notifications_;
    }
    cv_.notify_one();
  }

  void Stop() override {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
    {
      std::lock_guard lock(mu_);
      heartbeat_stop_ = true;
    }
    heartbeat_cv_.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
  }

  bool draining() const override {
    std::lock_guard lock(mu_);
    return stopping_;
  }

 private:
  static std::string MakeNodeId() {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    return std::string(host) + ":" + std::to_string(getpid());
  }

  bool Stopping() {
    std::lock_guard lock(mu_);
    return stopping_;
  }

  void WorkerLoop(const std::string& worker_id) {
    while (!Stopping()) {
      uint64_t seen;
      {
        std::lock_guard lock(mu_);
        seen = notifications_;
      }
      auto leased = store_.LeaseRun(worker_id, config_.lease_timeout);
      if (leased.ok() && leased->has_value()) {
        Execute(std::move(**leased));
        continue;
      }
      if (!leased.ok()) obs::LogWarn("lease failed", {{"error", leased.error().message}});
      // Idle: sleep until notified, until the next queued run is due, or poll_interval.
      Duration wait = config_.poll_interval;
      if (leased.ok()) {
        if (auto next = store_.NextDueAt(); next.ok() && next->has_value()) {
          wait = std::clamp(std::chrono::duration_cast<Duration>(**next - clock_.Now()), Duration(1), wait);
        }
      }
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, wait, [&] { return stopping_ || notifications_ != seen; });
    }
  }

  // Lease bookkeeping for the heartbeat thread.
  struct Active {
    store::Lease lease;
  };

  void HeartbeatLoop() {
    std::unique_lock lock(mu_);
    while (!heartbeat_stop_) {
      heartbeat_cv_.wait_for(lock, config_.heartbeat_interval, [&] { return heartbeat_stop_; });
      if (heartbeat_stop_) break;
      std::vector<std::pair<uint64_t, store::Lease>> leases;
      for (const auto& [id, a] : active_) leases.emplace_back(id, a.lease);
      lock.unlock();
      for (auto& [id, lease] : leases) {
        auto r = store_.Heartbeat(lease, config_.lease_timeout);
        if (!r.ok()) {
          obs::LogWarn("heartbeat failed", {{"run_id", lease.run_id}, {"error", r.error().message}});
        }
      }
      lock.lock();
    }
  }

  uint64_t Track(const store::Lease& lease) {
    std::lock_guard lock(mu_);
    const uint64_t id = ++next_active_;
    active_[id] = Active{lease};
    return id;
  }
  void Untrack(uint64_t id) {
    std::lock_guard lock(mu_);
    active_.erase(id);
  }

  void Finished(const std::string& pipeline, std::string_view status) {
    runs_finished_.Add({{"pipeline", pipeline}, {"status", std::string(status)}}).Increment();
  }

  void Execute(store::LeasedRun leased) {
    const auto& run = leased.run;
    const store::Lease& lease = leased.lease;
    const uint64_t active_id = Track(lease);
    struct Untracker {
      EngineImpl* self;
      uint64_t id;
      ~Untracker() { self->Untrack(id); }
    } untracker{this, active_id};

    auto def = Definition(run);
    if (!def.ok()) {
      obs::LogError("run cannot execute", {{"run_id", run.id}, {"error", def.error().message}});
      if (store_.FailRun(lease, def.error()).ok()) Finished(run.pipeline, "failed");
      return;
    }
    const PipelineConfig& pipeline = **def;
    // Rebuild what the finished steps left, and find where to resume.
    json::object steps_scope;
    std::map<std::string, const store::StepRecord*> records;
    for (const auto& s : run.steps) records[s.step_id] = &s;
    std::size_t index = 0;
    for (; index < pipeline.steps.size(); ++index) {
      const auto it = records.find(pipeline.steps[index].id);
      if (it == records.end() || it->second->status != StepStatus::kSucceeded) break;
      steps_scope[pipeline.steps[index].id] = it->second->output;
    }
    if (index == pipeline.steps.size()) {
      // Every step is checkpointed but the run did not end: not reachable through the
      // Store's contract (the last checkpoint ends the run in the same commit).
      if (store_.FailRun(lease, Error(ErrorCode::kInternal, "all steps finished but the run did not end")).ok()) {
        Finished(run.pipeline, "failed");
      }
      return;
    }
    const StepConfig* step = &pipeline.steps[index];
    // An attempt that was in flight when its worker died counts as used.
    if (const auto it = records.find(step->id); it != records.end()) {
      const auto* rec = it->second;
      if (rec->attempts >= step->retry.max_attempts) {
        Error err = rec->error.value_or(Error(ErrorCode::kTimeout, "attempt " + std::to_string(rec->attempts) +
                                                                       " of step \"" + step->id +
                                                                       "\" was interrupted (its worker was lost)"));
        err.message = "gave up after " + std::to_string(rec->attempts) + " attempts: " + err.message;
        if (store_.FailStep(lease, step->id, err, {FailureDisposition::Kind::kDeadLetter}).ok()) {
          Finished(run.pipeline, "dead_lettered");
        }
        return;
      }
    }
    auto started = store_.StartStep(lease, step->id);
    if (!started.ok()) {
      LogAbandon(run.id, step->id, started.error());
      return;
    }
    int attempt = *started;
    json::value scope = json::object{{"input", run.input}, {"steps", std::move(steps_scope)}};

    while (true) {
      const std::string idem = run.id + "/" + step->id;
      StepContext ctx{run.id, *step, attempt, scope, idem};
      const auto t0 = std::chrono::steady_clock::now();
      auto it = runners_.find(step->kind);
      Result<StepRecordJson> result =
          it == runners_.end()
              ? Result<StepRecordJson>(Error(ErrorCode::kInvalidRequest, "no runner for step kind"))
              : it->second->Run(ctx);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      step_latency_
          .Add({{"pipeline", run.pipeline}, {"kind", std::string(StepKindName(step->kind))},
                {"outcome", result.ok() ? "ok" : "error"}},
               obs::LatencyBuckets())
          .Observe(secs);

      if (!result.ok()) {
        HandleFailure(lease, run, *step, attempt, std::move(result).error());
        return;
      }
      const bool last = index + 1 == pipeline.steps.size();
      json::value record = std::move(result).value();
      std::optional<json::value> run_output;
      std::optional<std::string> next;
      if (last) run_output = record.as_object()["output"];
      else next = pipeline.steps[index + 1].id;
      // Draining: checkpoint this step and hand the run back rather than start another.
      const bool hand_back = !last && Stopping();
      if (hand_back) next.reset();
      auto committed = store_.CompleteStep(lease, step->id, record, next, run_output);
      if (!committed.ok()) {
        LogAbandon(run.id, step->id, committed.error());
        return;
      }
      obs::LogDebug("step succeeded", {{"run_id", run.id}, {"step_id", step->id}, {"attempt", attempt}});
      if (last) {
        Finished(run.pipeline, "succeeded");
        obs::LogInfo("run succeeded", {{"run_id", run.id}, {"pipeline", run.pipeline}});
        return;
      }
      if (hand_back) {
        (void)store_.ReleaseLease(lease);
        return;
      }
      scope.as_object()["steps"].as_object()[step->id] = std::move(record);
      ++index;
      step = &pipeline.steps[index];
      attempt = *committed;
    }
  }

  void HandleFailure(const store::Lease& lease, const store::RunRecord& run, const StepConfig& step, int attempt,
                     Error error) {
    step_errors_.Add({{"pipeline", run.pipeline}, {"class", std::string(ErrorCodeName(error.code))}}).Increment();
    FailureDisposition d;
    std::string_view status;
    if (!IsRetryable(error.code)) {
      d.kind = FailureDisposition::Kind::kFail;
      status = "failed";
    } else if (attempt >= step.retry.max_attempts) {
      d.kind = FailureDisposition::Kind::kDeadLetter;
      status = "dead_lettered";
      error.message = "gave up after " + std::to_string(attempt) + " attempts: " + error.message;
    } else {
      d.kind = FailureDisposition::Kind::kRetry;
      d.delay = ComputeBackoff(step.retry.backoff, attempt, error.retry_after, random_);
    }
    obs::Log(status.empty() ? obs::LogLevel::kInfo : obs::LogLevel::kWarn,
             status.empty() ? "step attempt failed; will retry" : "step failed; run ends",
             {{"run_id", run.id}, {"step_id", step.id}, {"attempt", attempt},
              {"error_type", ErrorCodeName(error.code)}, {"error", error.message},
              {"retry_in_ms", d.delay.count()}});
    auto r = store_.FailStep(lease, step.id, error, d);
    if (!r.ok()) {
      LogAbandon(run.id, step.id, r.error());
      return;
    }
    if (status.empty()) {
      retries_.Add({{"pipeline", run.pipeline}}).Increment();
      Notify();  // another worker may take it when due
    } else {
      Finished(run.pipeline, status);
    }
  }

  // Parsed definitions by id: runs of one pipeline version share one.
  Result<std::shared_ptr<const PipelineConfig>> Definition(const store::RunRecord& run) {
    if (!run.definition_id.empty()) {
      std::lock_guard lock(definitions_mu_);
      if (auto it = definitions_.find(run.definition_id); it != definitions_.end()) return it->second;
    }
    auto parsed = DefinitionFromJson(run.definition);
    if (!parsed.ok()) return std::move(parsed).error();
    auto shared = std::make_shared<const PipelineConfig>(std::move(parsed).value());
    if (!run.definition_id.empty()) {
      std::lock_guard lock(definitions_mu_);
      if (definitions_.size() > 10000) definitions_.clear();  // bound: ids are per version
      definitions_[run.definition_id] = shared;
    }
    return shared;
  }

  void LogAbandon(const std::string& run_id, const std::string& step_id, const Error& e) {
    obs::LogWarn("run abandoned by this worker", {{"run_id", run_id}, {"step_id", step_id},
                                                  {"error_type", ErrorCodeName(e.code)}, {"error", e.message}});
  }

  EngineConfig config_;
  store::Store& store_;
  const Clock& clock_;
  Random& random_;
  std::map<StepKind, std::unique_ptr<StepRunner>> runners_;
  prometheus::Family<prometheus::Histogram>& step_latency_;
  prometheus::Family<prometheus::Counter>& step_errors_;
  prometheus::Family<prometheus::Counter>& retries_;
  prometheus::Family<prometheus::Counter>& runs_finished_;
  std::string node_id_;
  std::mutex definitions_mu_;
  std::map<std::string, std::shared_ptr<const PipelineConfig>> definitions_;  // GUARDED_BY(definitions_mu_)

  mutable std::mutex mu_;
  std::condition_variable cv_;            // workers wait here for work
  std::condition_variable heartbeat_cv_;  // the heartbeat thread waits here
  bool stopping_ = false;        // GUARDED_BY(mu_)
  bool heartbeat_stop_ = false;  // GUARDED_BY(mu_)
  uint64_t notifications_ = 0;   // GUARDED_BY(mu_)
  uint64_t next_active_ = 0;     // GUARDED_BY(mu_)
  std::map<uint64_t, Active> active_;  // GUARDED_BY(mu_)
  std::vector<std::thread> workers_;
  std::thread heartbeat_;
};

}  // namespace

std::unique_ptr<Engine> Engine::Create(const EngineConfig& config, store::Store& store, gateway::Gateway& gateway,
                                       const Clock& clock, Random& random, prometheus::Registry& registry) {
  return std::make_unique<EngineImpl>(config, store, gateway, clock, random, registry);
}

}  // namespace keel::engine
