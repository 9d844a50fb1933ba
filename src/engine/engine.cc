#include "keel/engine/engine.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <malloc.h>  // malloc_trim (glibc)
#include <unistd.h>

#include <atomic>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "keel/core/backoff.h"
#include "keel/core/ids.h"
#include "keel/core/template.h"
#include "keel/engine/pipeline.h"
#include "keel/obs/log.h"
#include "keel/obs/metrics.h"
#include "steps.h"

namespace keel::engine {
namespace {

namespace asio = boost::asio;

// The engine's threads, whatever engine.workers is: the I/O threads every run's steps
// execute on (an llm or http step waits on them holding none), and the blocking pool for
// store calls (leases aside: the lease loop has its own thread) and kBlocking steps.
constexpr int kIoThreads = 2;
constexpr int kBlockingThreads = 4;

// A map over at least this many items hands the memory it leaves free back to the
// system (malloc_trim) when its run leaves the worker; smaller ones are not worth it.
constexpr std::size_t kTrimAfterItems = 1024;

// A step's record breaks no rule of the JSON codec (core/json.h), so the store can write
// it and read it back: a tool's, a model's or a template's value that does fails the
// step (invalid_output), never the store. The record wraps the output in one level;
// a map's output is one level more than its items'.
Result<void> CheckStorable(const json::value& record, const std::string& step_id) {
  auto r = CheckJsonLimits(record, "steps." + step_id, JsonLimits::kMaxDepth + 2);
  if (r.ok()) return r;
  return Error(ErrorCode::kInvalidOutput,
               "step \"" + step_id + "\" produced a value keel cannot store: " + r.error().message,
               r.error().param);
}

using store::FailureDisposition;
using store::StepStatus;

class EngineImpl;

// The engines alive in this process, for Engine::NodeReadiness.
std::mutex& RegistryMu() {
  static std::mutex mu;
  return mu;
}
std::set<const EngineImpl*>& Registry() {
  static std::set<const EngineImpl*> engines;
  return engines;
}

class EngineImpl final : public Engine {
 public:
  EngineImpl(const EngineConfig& config, store::Store& store, gateway::Gateway& gateway,
             const Clock& clock, Random& random, prometheus::Registry& registry)
      : config_(config),
        store_(store),
        clock_(clock),
        random_(random),
        runners_(MakeStepRunners(StepServices{gateway, store, random, config_})),
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
        runs_finished_(
            prometheus::BuildCounter()
                .Name("keel_runs_finished_total")
                .Help("Runs that reached a terminal state on this node, by pipeline and status")
                .Register(registry)),
        storage_up_(prometheus::BuildGauge()
                        .Name("keel_storage_up")
                        .Help("Whether this node's workers reach the storage (1) or not (0): set "
                              "by their lease calls")
                        .Register(registry)
                        .Add({})),
        lease_failures_(
            prometheus::BuildCounter()
                .Name("keel_engine_lease_failures_total")
                .Help(
                    "Lease calls of this node's workers that failed (the storage could not answer)")
                .Register(registry)
                .Add({})),
        ready_(prometheus::BuildGauge()
                   .Name("keel_engine_ready")
                   .Help("1 for why this node cannot lease work now (reason: draining, storage, "
                         "stalled); "
                         "reason \"\" when it can")
                   .Register(registry)),
        node_id_(MakeNodeId()) {
    storage_up_.Set(1);
    std::lock_guard lock(RegistryMu());
    Registry().insert(this);
  }

  ~EngineImpl() override {
    {
      std::lock_guard lock(RegistryMu());
      Registry().erase(this);
    }
    Stop();
  }

  void Start() override {
    if (config_.workers <= 0) return;  // API only: nothing to lease
    // Runs queued or woken anywhere (on this node, or on another sharing the database)
    // wake the lease loop at once.
    store_.SetWorkListener([this] { Notify(); });
    pool_ = std::make_unique<asio::thread_pool>(kBlockingThreads);
    io_work_.emplace(io_.get_executor());
    for (int i = 0; i < kIoThreads; ++i) io_threads_.emplace_back([this] { io_.run(); });
    lease_thread_ = std::thread([this] { LeaseLoop(); });
    heartbeat_ = std::thread([this] { HeartbeatLoop(); });
    started_ = true;
  }

  void Notify() override {
    {
      std::lock_guard lock(mu_);
      ++notifications_;
    }
    cv_.notify_all();
  }

  void Stop() override {
    std::vector<std::shared_ptr<CancelSignal>> to_cancel;
    {
      std::unique_lock lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      cv_.notify_all();
      // Steps in flight may finish within drain_timeout; then they are stopped and
      // their runs handed back (FailStep for a retry at once), for another node to take.
      const bool finished = idle_cv_.wait_for(lock, config_.drain_timeout, [&] { return active_.empty(); });
      if (!finished) {
        aborting_ = true;
        obs::LogWarn("drain timeout passed; stopping the steps in flight and handing their runs back",
                     {{"runs", static_cast<int64_t>(active_.size())},
                      {"drain_timeout_ms", static_cast<int64_t>(config_.drain_timeout.count())}});
        for (auto& [id, a] : active_) {
          a.cancelled->store(true);
          to_cancel.push_back(a.cancel);
        }
        heartbeat_cv_.notify_all();  // wakes waits for the storage to come back
      }
    }
    // Outside mu_: a call's cancellation may run its completion here.
    for (auto& c : to_cancel) c->Cancel();
    if (lease_thread_.joinable()) lease_thread_.join();
    {
      // Every run's execution has ended (each was handed back, checkpointed or ended).
      std::unique_lock lock(mu_);
      idle_cv_.wait(lock, [&] { return in_flight_ == 0; });
      heartbeat_stop_ = true;
    }
    heartbeat_cv_.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
    // What is left on the I/O context is not a run's (idle pooled connections, timers of
    // calls abandoned): stopped with it.
    io_work_.reset();
    io_.stop();
    for (auto& t : io_threads_) {
      if (t.joinable()) t.join();
    }
    if (pool_) pool_->join();
    if (started_) store_.SetWorkListener({});
  }

  bool draining() const override {
    std::lock_guard lock(mu_);
    return stopping_;
  }

  Readiness readiness() const override {
    Readiness r;
    {
      std::lock_guard lock(mu_);
      if (config_.workers <= 0) {
      } else if (stopping_) {
        r = {false, "draining", "node " + node_id_ + " is draining"};
      } else if (storage_down_.load()) {
        r = {false, "storage", "the workers' lease calls fail: " + last_lease_error_};
      } else {
        // Every thread of the blocking pool inside one call (a store call, a blocking
        // step) for longer than stall_timeout, or the lease loop inside one lease call: no
        // run will checkpoint, or no work will be leased, soon. A step waiting on the
        // network holds no thread and is not a stall.
        const Timestamp now = clock_.Now();
        std::size_t stalled = 0;
        for (const auto& [call, since] : pool_calls_) {
          if (now - since > config_.stall_timeout) ++stalled;
        }
        const std::string bound = "engine.stall_timeout (" + std::to_string(config_.stall_timeout.count()) + "ms)";
        if (lease_since_ && now - *lease_since_ > config_.stall_timeout) {
          r = {false, "stalled", "the lease loop has been inside one lease call for more than " + bound};
        } else if (stalled >= static_cast<std::size_t>(kBlockingThreads)) {
          r = {false, "stalled",
               "all " + std::to_string(stalled) +
                   " threads of the engine's blocking pool have been inside one store call or "
                   "blocking step for more than " + bound + ": no run can checkpoint"};
        }
      }
    }
    for (const char* reason : {"", "draining", "storage", "stalled"}) {
      ready_.Add({{"reason", reason}}).Set(r.reason == reason ? 1 : 0);
    }
    return r;
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

  bool Aborting() {
    std::lock_guard lock(mu_);
    return aborting_;
  }

  // A write that must not be lost to a passing storage outage (a checkpoint, a failure,
  // a park): while the storage answers kUnavailable (a database restart), it is tried
  // again with backoff, for as long as the lease could still be valid. Once the storage
  // is back, a lease that expired meanwhile answers kLeaseLost and the write is dropped.
  template <typename F>
  auto Persist(F&& write) -> decltype(write()) {
    auto r = write();
    Duration wait{50};
    const auto give_up = std::chrono::steady_clock::now() + config_.lease_timeout;
    while (!r.ok() && r.error().code == ErrorCode::kUnavailable && std::chrono::steady_clock::now() + wait < give_up) {
      {
        std::unique_lock lock(mu_);
        if (heartbeat_cv_.wait_for(lock, wait, [&] { return aborting_; })) break;
      }
      wait = std::min(wait * 2, Duration(1000));
      r = write();
    }
    return r;
  }

  // Leases runs while fewer than engine.workers are in flight, and starts each one's
  // execution on the I/O context. Its own thread: a lease is a store call.
  void LeaseLoop() {
    const std::size_t slots = static_cast<std::size_t>(config_.workers);
    uint64_t leases_taken = 0;
    while (true) {
      uint64_t seen;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || in_flight_ < slots; });
        if (stopping_) return;
        seen = notifications_;
        lease_since_ = clock_.Now();
      }
      // The lease's owner: "host:pid/N", N counting this node's leases (as "host:pid/slot"
      // did when each worker was a thread).
      auto leased = store_.LeaseRun(node_id_ + "/" + std::to_string(++leases_taken), config_.lease_timeout);
      {
        std::lock_guard lock(mu_);
        lease_since_.reset();
      }
      if (leased.ok() && leased->has_value()) {
        if (storage_down_.exchange(false)) {
          obs::LogInfo("storage available again");
          storage_up_.Set(1);
        }
        Spawn(std::move(**leased));
        continue;  // there may be more: one notification can stand for many runs
      }
      if (!leased.ok()) {
        lease_failures_.Increment();
        {
          std::lock_guard lock(mu_);
          last_lease_error_ = leased.error().message;
        }
        // Said once per outage, not once per poll.
        if (!storage_down_.exchange(true)) {
          obs::LogWarn("storage unavailable; workers wait for it", {{"error", leased.error().message}});
          storage_up_.Set(0);
        }
      } else if (storage_down_.exchange(false)) {
        obs::LogInfo("storage available again");
        storage_up_.Set(1);
      }
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

  // Starts the execution of a leased run on the I/O context. No strand: a run's state is
  // touched by one coroutine at a time, and what its map lanes share is locked. (GCC 12
  // destroys co_spawn_entry_point's executor parameter twice, which a strand's reference
  // count does not survive; the io_context's executor, a pointer, does.)
  void Spawn(store::LeasedRun leased) {
    {
      std::lock_guard lock(mu_);
      ++in_flight_;
    }
    asio::co_spawn(io_.get_executor(), Execute(std::move(leased)), [this](std::exception_ptr e) {
      if (e) {
        // Not reachable by contract (no exceptions on the data path); the lease expires
        // and the run is leased again.
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& x) {
          obs::LogError("a run's execution threw; its lease is left to expire", {{"error", x.what()}});
        } catch (...) {
          obs::LogError("a run's execution threw; its lease is left to expire");
        }
      }
      {
        std::lock_guard lock(mu_);
        --in_flight_;
      }
      cv_.notify_all();
      idle_cv_.notify_all();
    });
  }

  // Runs `fn` (a store call, a blocking step) on the blocking pool; the caller resumes on
  // its own executor with what `fn` returned. Counted for readiness() while it runs.
  template <typename F>
  asio::awaitable<std::invoke_result_t<F&>> OnPool(F fn) {
    using R = std::invoke_result_t<F&>;
    auto ex = co_await asio::this_coro::executor;
    R r = co_await asio::async_initiate<decltype(asio::use_awaitable), void(R)>(
        [this, ex, &fn](auto handler) {
          auto h = std::make_shared<decltype(handler)>(std::move(handler));
          asio::post(*pool_, [this, ex, &fn, h] {
            uint64_t call;
            {
              std::lock_guard lock(mu_);
              call = ++next_call_;
              pool_calls_[call] = clock_.Now();
            }
            R out = fn();
            {
              std::lock_guard lock(mu_);
              pool_calls_.erase(call);
            }
            asio::post(ex, [h, out = std::move(out)]() mutable { (*h)(std::move(out)); });
          });
        },
        asio::use_awaitable);
    co_return r;
  }

  // One attempt through `runner`, where its execution() says.
  asio::awaitable<Result<StepOutcome>> RunAttempt(StepRunner& runner, const StepContext& ctx) {
    if (runner.execution() == StepExecution::kInline) co_return runner.Run(ctx);
    if (runner.execution() == StepExecution::kBlocking) {
      Result<StepOutcome> r = co_await OnPool([&] { return runner.Run(ctx); });
      co_return r;
    }
    auto ex = co_await asio::this_coro::executor;
    Result<StepOutcome> r = co_await asio::async_initiate<decltype(asio::use_awaitable), void(Result<StepOutcome>)>(
        [&runner, &ctx, ex](auto handler) {
          auto h = std::make_shared<decltype(handler)>(std::move(handler));
          runner.RunAsync(ctx, ex, [h, ex](Result<StepOutcome> out) {
            asio::post(ex, [h, out = std::move(out)]() mutable { (*h)(std::move(out)); });
          });
        },
        asio::use_awaitable);
    co_return r;
  }

  // Lease bookkeeping for the heartbeat thread.
  struct Active {
    store::Lease lease;
    std::shared_ptr<std::atomic<bool>> cancelled;  // set when the lease is lost (cancel)
    std::shared_ptr<CancelSignal> cancel;          // fired with `cancelled`
    Timestamp renewed_at{};                        // when the lease was taken or last extended
  };

  // Extends the leases that need it: those last renewed half a heartbeat interval ago or
  // more (a lease renewed at each tick would be wasted on the many runs that end within
  // one: their leases never come near expiring). A lease is thus renewed at most 1.5
  // intervals after the previous renewal, well within lease_timeout (3 intervals by
  // default).
  void HeartbeatLoop() {
    std::unique_lock lock(mu_);
    while (!heartbeat_stop_) {
      heartbeat_cv_.wait_for(lock, config_.heartbeat_interval, [&] { return heartbeat_stop_; });
      if (heartbeat_stop_) break;
      const Timestamp due = clock_.Now() - config_.heartbeat_interval / 2;
      std::vector<std::pair<uint64_t, Active>> leases;
      for (const auto& [id, a] : active_) {
        if (a.renewed_at <= due) leases.emplace_back(id, a);
      }
      lock.unlock();
      (void)readiness();  // keeps keel_engine_ready current between /readyz calls
      for (auto& [id, a] : leases) {
        const Timestamp at = clock_.Now();
        auto r = store_.Heartbeat(a.lease, config_.lease_timeout);
        {
          std::lock_guard relock(mu_);
          const auto it = active_.find(id);
          if (r.ok()) {
            if (it != active_.end()) it->second.renewed_at = at;
            continue;
          }
          if (it == active_.end()) continue;  // the run ended meanwhile: nothing was lost
        }
        obs::LogWarn("heartbeat failed", {{"run_id", a.lease.run_id}, {"error", r.error().message}});
        // Cancelled or taken over: the step in flight stops (a call in flight at once).
        if (r.error().code == ErrorCode::kLeaseLost) {
          a.cancelled->store(true);
          a.cancel->Cancel();
        }
      }
      lock.lock();
    }
  }

  uint64_t Track(const store::Lease& lease, std::shared_ptr<std::atomic<bool>> cancelled,
                 std::shared_ptr<CancelSignal> cancel) {
    std::lock_guard lock(mu_);
    const uint64_t id = ++next_active_;
    active_[id] = Active{lease, std::move(cancelled), std::move(cancel), clock_.Now()};
    return id;
  }
  void Untrack(uint64_t id) {
    {
      std::lock_guard lock(mu_);
      active_.erase(id);
    }
    idle_cv_.notify_all();
  }

  void Finished(const std::string& pipeline, std::string_view status) {
    runs_finished_.Add({{"pipeline", pipeline}, {"status", std::string(status)}}).Increment();
  }

  // The step after `i` given its checkpoint: a jump the checkpoint recorded (a choice's
  // branch, an on_error goto), the step's `next`, or the following one; "end" at the end.
  static std::string NextOf(const PipelineConfig& p, std::size_t i, const json::value& record) {
    if (record.is_object()) {
      if (const auto* n = record.as_object().if_contains("next"); n && n->is_string() && !n->as_string().empty()) {
        return std::string(n->as_string());
      }
    }
    if (!p.steps[i].next.empty()) return p.steps[i].next;
    return i + 1 < p.steps.size() ? p.steps[i + 1].id : "end";
  }

  // A run in execution: what its steps see and where it is. Owned by its execution
  // (the coroutine's frame), which outlives every call of its steps; never moved (its
  // scope refers to its members).
  struct RunState {
    explicit RunState(store::LeasedRun l) : leased(std::move(l)) {}
    RunState(const RunState&) = delete;
    RunState& operator=(const RunState&) = delete;

    store::LeasedRun leased;
    // Set, and fired, when the run was cancelled, its lease lost or the drain timed out.
    std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
    std::shared_ptr<CancelSignal> cancel = std::make_shared<CancelSignal>();
    std::shared_ptr<const PipelineConfig> def;
    std::map<std::string, std::size_t> index;  // step id -> position in def
    std::size_t cur = 0;                       // the step in execution
    const StepConfig* step = nullptr;
    const store::StepRecord* record = nullptr;  // its record in leased.run, if any
    int interrupted = 0;
    int attempt = 0;
    json::value steps_done;  // {ID: checkpoint} of the steps done
    TemplateContext scope;
    bool large = false;  // a map over many items ran: trim the memory it left
  };

  // A leased run, step by step: each attempt on the I/O threads (an llm or http step holds
  // none while it waits), each store call on the blocking pool, until the run ends, parks,
  // waits for a retry or is handed back.
  asio::awaitable<void> Execute(store::LeasedRun leased) {
    auto st = std::make_unique<RunState>(std::move(leased));
    const uint64_t active_id = Track(st->leased.lease, st->cancelled, st->cancel);
    struct Untracker {
      EngineImpl* self;
      uint64_t id;
      ~Untracker() { self->Untrack(id); }
    } untracker{this, active_id};
    // A large map leaves much memory free behind it: handed back to the system when the
    // run's execution ends.
    struct Trimmer {
      const RunState* st;
      ~Trimmer() {
        if (st->large) malloc_trim(0);
      }
    } trimmer{st.get()};

    const bool begun = co_await OnPool([&] { return Begin(*st); });
    if (!begun) co_return;
    const auto& run = st->leased.run;
    while (true) {
      const StepConfig& step = *st->step;
      const std::string idem = run.id + "/" + step.id;
      StepContext ctx{run.id,      step,           st->attempt,          st->scope, idem, run, st->record,
                      clock_.Now(), st->cancelled.get(), &st->leased.lease, st->cancel};
      const auto t0 = std::chrono::steady_clock::now();
      Result<StepOutcome> result = Error(ErrorCode::kInternal, "not run");
      if (step.kind == StepKind::kMap) {
        result = co_await RunMap(ctx, st->leased.lease, st->large);
      } else if (auto it = runners_.find(step.kind); it != runners_.end()) {
        result = co_await RunAttempt(*it->second, ctx);
      } else {
        result = Error(ErrorCode::kInvalidRequest, "no runner for step kind " + std::string(StepKindName(step.kind)));
      }
      if (result.ok() && !result->fail && !result->suspend) {
        if (auto storable = CheckStorable(result->record, step.id); !storable.ok()) {
          // A template's value is the same on every attempt: no retry mends it.
          if (step.kind == StepKind::kTransform || step.kind == StepKind::kValidate) {
            StepOutcome failed;
            failed.fail = std::move(storable).error();
            result = std::move(failed);
          } else {
            result = std::move(storable).error();
          }
        }
      }
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const bool ok = result.ok() && !result->fail;
      step_latency_
          .Add({{"pipeline", run.pipeline}, {"kind", std::string(StepKindName(step.kind))},
                {"outcome", ok ? (result->suspend ? "waiting" : "ok") : "error"}},
               obs::LatencyBuckets())
          .Observe(secs);
      const bool more = co_await OnPool([&] { return AfterAttempt(*st, result, ok); });
      if (!more) co_return;
    }
  }

  // Before the first attempt (on the blocking pool): the definition, the scope the
  // checkpoints rebuild, the step to resume at, and its attempt started. False when the
  // run ended or was abandoned instead.
  bool Begin(RunState& st) {
    const auto& run = st.leased.run;
    const store::Lease& lease = st.leased.lease;
    auto def = Definition(run);
    if (!def.ok()) {
      obs::LogError("run cannot execute", {{"run_id", run.id}, {"error", def.error().message}});
      if (store_.FailRun(lease, def.error()).ok()) Finished(run.pipeline, "failed");
      return false;
    }
    st.def = *def;
    const PipelineConfig& pipeline = *st.def;
    auto& index = st.index;
    for (std::size_t i = 0; i < pipeline.steps.size(); ++i) index[pipeline.steps[i].id] = i;
    // Rebuild what the finished steps left, and find where to resume: walk the path the
    // run took, from the first step through its checkpoints.
    json::object steps_scope;
    std::map<std::string, const store::StepRecord*> records;
    for (const auto& s : run.steps) records[s.step_id] = &s;
    std::size_t& cur = st.cur;
    for (std::size_t hops = 0;; ++hops) {
      const auto it = records.find(pipeline.steps[cur].id);
      if (it == records.end() || it->second->status != StepStatus::kSucceeded) break;
      steps_scope[pipeline.steps[cur].id] = it->second->output;
      const std::string next = NextOf(pipeline, cur, it->second->output);
      const auto at = index.find(next);
      if (next == "end" || at == index.end() || hops > pipeline.steps.size()) {
        // The last checkpoint ends the run in the same commit: not reachable through the
        // Store's contract, unless the definition and the checkpoints disagree.
        if (store_.FailRun(lease, Error(ErrorCode::kInternal, "the run's checkpoints lead nowhere (at step \"" +
                                                                  pipeline.steps[cur].id + "\" -> \"" + next + "\")"))
                .ok()) {
          Finished(run.pipeline, "failed");
        }
        return false;
      }
      cur = at->second;
    }
    const StepConfig*& step = st.step;
    step = &pipeline.steps[cur];
    const store::StepRecord*& record = st.record;
    if (const auto it = records.find(step->id); it != records.end()) record = it->second;
    // A step that parks (a task, a wait, a sleep, a child run) does its work outside the
    // worker: an attempt of it interrupted by a crash (typically while it looked at what
    // it waits for and parked again) is resumed, not counted again. Its task, timer,
    // signals and child run are the attempt's, and still there.
    const bool parks = step->kind == StepKind::kTask || step->kind == StepKind::kWaitForSignal ||
                       step->kind == StepKind::kSleep || step->kind == StepKind::kPipeline;
    const bool resume = parks && record && record->status == StepStatus::kRunning && record->attempts > 0;
    // Any other attempt still `running` was cut short: its node was lost (a crash, a
    // wedged worker) before it finished. That is not the step's failure: it counts
    // against engine.max_interrupted_attempts, not retry.max_attempts, so a run that
    // keeps taking its node down cannot spend the attempts of the runs beside it.
    int& interrupted = st.interrupted;
    interrupted = record ? record->interrupted : 0;
    int& attempt = st.attempt;
    if (resume) {
      attempt = record->attempts;
      obs::LogInfo("resuming an interrupted attempt", {{"run_id", run.id}, {"step_id", step->id}, {"attempt", attempt}});
    } else if (record && record->status == StepStatus::kRunning) {
      ++interrupted;
      if (interrupted >= config_.max_interrupted_attempts) {
        Error err(
            ErrorCode::kWorkerLost,
            "step \"" + step->id + "\": " + std::to_string(interrupted) +
                " attempts ended with their node lost (crashed, killed or wedged while running it; "
                "engine.max_interrupted_attempts is " +
                std::to_string(config_.max_interrupted_attempts) +
                "); look for what takes the node down (the logs of the attempt's node), then "
                "redrive");
        FailureDisposition d{FailureDisposition::Kind::kDeadLetter};
        d.interrupted = true;
        obs::LogWarn("step dead-lettered: its node keeps being lost",
                     {{"run_id", run.id}, {"step_id", step->id}, {"interrupted", interrupted}});
        step_errors_
            .Add({{"pipeline", run.pipeline}, {"class", std::string(ErrorCodeName(err.code))}})
            .Increment();
        if (Persist([&] { return store_.FailStep(lease, step->id, err, d); }).ok()) {
          Finished(run.pipeline, "dead_lettered");
        }
        return false;
      }
      obs::LogInfo("attempt interrupted (its node was lost); starting another",
                   {{"run_id", run.id},
                    {"step_id", step->id},
                    {"attempt", record->attempts},
                    {"interrupted", interrupted}});
      auto started = store_.RestartInterruptedStep(lease, step->id);
      if (!started.ok()) {
        LogAbandon(run.id, step->id, started.error());
        return false;
      }
      attempt = *started;
    } else {
      auto started = store_.StartStep(lease, step->id);
      if (!started.ok()) {
        LogAbandon(run.id, step->id, started.error());
        return false;
      }
      attempt = *started;
    }
    // What templates see: the run's input (borrowed from the record, not copied) and the
    // checkpoints of the steps done.
    st.steps_done = std::move(steps_scope);
    st.scope.Bind("input", run.input).Bind("steps", st.steps_done);
    return true;
  }

  // After an attempt (on the blocking pool): its checkpoint, failure, park or hand-back
  // committed; true when the run goes on with the next step (st says which).
  bool AfterAttempt(RunState& st, Result<StepOutcome>& result, bool ok) {
    const auto& run = st.leased.run;
    const store::Lease& lease = st.leased.lease;
    const PipelineConfig& pipeline = *st.def;
    const auto& index = st.index;
    std::size_t& cur = st.cur;
    const StepConfig*& step = st.step;
    const store::StepRecord*& record = st.record;
    int& interrupted = st.interrupted;
    int& attempt = st.attempt;
    json::value& steps_done = st.steps_done;
    StepRecordJson rec;
    std::string next;
    if (!ok && Aborting()) {
      // Stopped by the drain timeout, not by a fault of the step: the attempt is
      // recorded as interrupted and the run is due at once, for another node.
      const Error interrupted_error(
          ErrorCode::kCancelled, "attempt " + std::to_string(attempt) + " of step \"" + step->id +
                                     "\" was interrupted: node " + node_id_ + " was draining");
      FailureDisposition d{FailureDisposition::Kind::kRetry, Duration(0)};
      d.interrupted = true;  // not the step's failure: not counted against max_attempts
      auto handed = store_.FailStep(lease, step->id, interrupted_error, d);
      if (!handed.ok()) LogAbandon(run.id, step->id, handed.error());
      else obs::LogInfo("run handed back (drain)", {{"run_id", run.id}, {"step_id", step->id}, {"attempt", attempt}});
      return false;
    }
    if (!ok) {
      const bool retryable_kind = !result.ok();
      Error error = result.ok() ? *result->fail : std::move(result).error();
      auto recovered = HandleFailure(lease, run, *step, attempt - interrupted, std::move(error),
                                     retryable_kind);
      if (!recovered) return false;
      rec = std::move(recovered->first);
      next = std::move(recovered->second);
    } else if (result->suspend) {
      auto parked = Persist([&] { return store_.SuspendStep(lease, step->id, result->wake_at, result->waiting); });
      if (!parked.ok()) LogAbandon(run.id, step->id, parked.error());
      else obs::LogDebug("step waiting", {{"run_id", run.id}, {"step_id", step->id}});
      return false;
    } else {
      rec = std::move(result->record);
      next = result->next;
      if (!next.empty()) rec["next"] = next;
    }
    if (next.empty()) next = NextOf(pipeline, cur, rec);
    const bool last = next == "end";
    std::optional<json::value> run_output;
    std::optional<std::string> next_step;
    if (last) run_output = rec["output"];
    else next_step = next;
    // Draining: checkpoint this step and hand the run back rather than start another.
    const bool hand_back = !last && Stopping();
    if (hand_back) next_step.reset();
    auto committed = Persist([&] { return store_.CompleteStep(lease, step->id, rec, next_step, run_output); });
    if (!committed.ok()) {
      LogAbandon(run.id, step->id, committed.error());
      return false;
    }
    obs::LogDebug("step succeeded", {{"run_id", run.id}, {"step_id", step->id}, {"attempt", attempt}});
    if (last) {
      Finished(run.pipeline, "succeeded");
      obs::LogInfo("run succeeded", {{"run_id", run.id}, {"pipeline", run.pipeline}});
      return false;
    }
    if (hand_back) {
      (void)store_.ReleaseLease(lease);
      return false;
    }
    steps_done.as_object()[step->id] = std::move(rec);
    cur = index.at(next);
    step = &pipeline.steps[cur];
    record = nullptr;
    interrupted = 0;
    attempt = *committed;
    return true;
  }

  // "an array", "a string", "null": a kind's name in a sentence.
  static std::string WithArticle(std::string_view kind) {
    if (kind == "null") return "null";
    return (kind.front() == 'a' || kind.front() == 'o' ? "an " : "a ") + std::string(kind);
  }

  // Calls `fn` with each checkpointed item of map step `step_id`, in index order, read a
  // page at a time (outputs only when `with_outputs`): what a map holds is a page, never
  // all of its items.
  Result<void> ForEachItem(const std::string& run_id, const std::string& step_id, bool with_outputs,
                           const std::function<void(store::ItemRecord&)>& fn) {
    const int page = with_outputs ? 1000 : 10000;
    int64_t after = -1;
    while (true) {
      auto items = store_.ListItems(run_id, step_id, after, page, with_outputs);
      if (!items.ok()) return std::move(items).error();
      for (auto& item : *items) fn(item);
      if (static_cast<int>(items->size()) < page) return {};
      after = items->back().index;
    }
  }

  // What the lanes of one map share. Lives in RunMap's frame, which waits for every lane.
  struct MapState {
    const StepContext& ctx;
    const store::Lease& lease;
    const StepConfig& item_step;
    StepRunner& runner;
    const json::array& items;
    const std::vector<std::size_t>& todo;
    std::atomic<std::size_t> next{0};
    std::mutex mu;
    std::optional<Error> first_error;  // GUARDED_BY(mu)
    bool final = false;                // GUARDED_BY(mu)
  };

  // One lane of a map: items through the item step, each checkpointed as it finishes.
  asio::awaitable<void> MapLane(MapState& m) {
    const StepContext& ctx = m.ctx;
    // This lane's "item" and "index", bound over the run's scope (never a copy of it: it
    // holds the whole input).
    json::value index;
    TemplateContext scope = ctx.scope;
    while (true) {
      bool failed;
      {
        std::lock_guard lock(m.mu);
        failed = m.first_error.has_value();
      }
      if (failed) co_return;
      if (ctx.cancelled && ctx.cancelled->load()) co_return;
      const std::size_t k = m.next.fetch_add(1);
      if (k >= m.todo.size()) co_return;
      const std::size_t i = m.todo[k];
      index = static_cast<int64_t>(i);
      scope.Bind("item", m.items[i]).Bind("index", index);
      const std::string idem = ctx.idempotency_key + "#" + std::to_string(i);
      StepContext ictx{ctx.run_id, m.item_step, ctx.attempt, scope,      idem,
                       ctx.run,    nullptr,     ctx.now,     ctx.cancelled, ctx.lease, ctx.cancel};
      Result<StepOutcome> r = co_await RunAttempt(m.runner, ictx);
      std::optional<Error> err;
      bool is_final = false;
      if (!r.ok()) {
        err = std::move(r).error();
      } else if (r->fail) {
        err = *r->fail;
        is_final = true;
      } else if (r->suspend) {
        err = Error(ErrorCode::kInvalidRequest, "a map item cannot wait");
        is_final = true;
      }
      if (!err) {
        if (auto storable = CheckStorable(r->record, ctx.step.id + "#" + std::to_string(i)); !storable.ok()) {
          err = std::move(storable).error();
        }
      }
      if (!err) {
        const json::value& out = r->record["output"];
        Result<void> saved = co_await OnPool([&] {
          return Persist([&] { return store_.CompleteItem(m.lease, ctx.step.id, static_cast<int64_t>(i), out); });
        });
        if (saved.ok()) continue;
        err = saved.error();
      }
      std::lock_guard lock(m.mu);
      if (!m.first_error) {
        err->message = "item " + std::to_string(i) + ": " + err->message;
        m.final = is_final;
        m.first_error = std::move(err);
      }
    }
  }

  // A map: each item of `over` through the item step, `concurrency` at once, each
  // checkpointed as it finishes; items checkpointed before (by an earlier attempt, or
  // before a crash) are not run again. It holds the items to do and, per thread, one
  // item's "item" and "index" over the run's scope (shared, never copied); finished
  // items' outputs stay in the store until every item is done, then make the step's output.
  // `large`: set when the map is over enough items that its memory is worth trimming.
  asio::awaitable<Result<StepOutcome>> RunMap(const StepContext& ctx, const store::Lease& lease, bool& large) {
    const auto& spec = ctx.step.spec.as_object();
    // `over` is most often one reference ("{{input.items}}"): the array is borrowed.
    std::optional<Result<json::value>> rendered;
    const json::value* over = FindReferenced(spec.at("over"), ctx.scope);
    if (over == nullptr) {
      rendered = RenderTemplate(spec.at("over"), ctx.scope);
      if (!rendered->ok()) co_return std::move(*rendered).error();
      over = &**rendered;
    }
    if (!over->is_array()) {
      StepOutcome o;
      o.fail = Error(ErrorCode::kInvalidRequest, "step \"" + ctx.step.id + "\": map over must be an array, but " +
                                                     json::serialize(spec.at("over")) + " is " + WithArticle(JsonKindName(*over)));
      co_return o;
    }
    const auto& items = over->as_array();
    const std::size_t n = items.size();
    if (n >= kTrimAfterItems) large = true;
    std::vector<bool> done(n, false);
    Result<void> listed = co_await OnPool([&] {
      return ForEachItem(ctx.run_id, ctx.step.id, false, [&](store::ItemRecord& item) {
        if (item.index >= 0 && static_cast<std::size_t>(item.index) < n) done[static_cast<std::size_t>(item.index)] = true;
      });
    });
    if (!listed.ok()) co_return std::move(listed).error();
    std::vector<std::size_t> todo;
    for (std::size_t i = 0; i < n; ++i) {
      if (!done[i]) todo.push_back(i);
    }
    done = {};
    StepConfig item_step = ctx.step;
    const auto& inner = spec.at("step").as_object();
    item_step.kind = *StepKindFromName(inner.at("kind").as_string());
    item_step.spec = inner.at("spec");
    StepRunner* runner = runners_.at(item_step.kind).get();

    // The items' lanes: `concurrency` coroutines on the I/O threads, each taking the
    // next item to do until none is left or one failed; no thread per item or lane.
    MapState m{ctx, lease, item_step, *runner, items, todo};
    const int64_t cap = spec.at("concurrency").as_int64();
    const std::size_t lanes = std::min<std::size_t>(static_cast<std::size_t>(std::max<int64_t>(1, cap)), todo.size());
    if (lanes > 0) {
      auto ex = co_await asio::this_coro::executor;
      co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
          [this, &m, lanes, ex](auto handler) {
            auto h = std::make_shared<decltype(handler)>(std::move(handler));
            auto left = std::make_shared<std::atomic<std::size_t>>(lanes);
            for (std::size_t lane = 0; lane < lanes; ++lane) {
              asio::co_spawn(ex, MapLane(m), [&m, h, left, ex](std::exception_ptr e) {
                if (e) {
                  std::lock_guard lock(m.mu);
                  if (!m.first_error) m.first_error = Error(ErrorCode::kInternal, "a map item's execution threw");
                }
                if (left->fetch_sub(1) == 1) asio::post(ex, [h] { (*h)(); });
              });
            }
          },
          asio::use_awaitable);
    }
    todo = {};
    if (m.first_error) {
      if (m.final) {
        StepOutcome o;
        o.fail = std::move(*m.first_error);
        co_return o;
      }
      co_return std::move(*m.first_error);
    }
    if (ctx.cancelled && ctx.cancelled->load()) co_return Error(ErrorCode::kCancelled, "the run was cancelled");
    // Every item is checkpointed: their outputs, in order, are the step's.
    json::array out;
    out.reserve(n);
    Result<void> read = co_await OnPool([&] {
      return ForEachItem(ctx.run_id, ctx.step.id, true, [&](store::ItemRecord& item) {
        if (item.index == static_cast<int64_t>(out.size()) && out.size() < n) out.push_back(std::move(item.output));
      });
    });
    if (!read.ok()) co_return std::move(read).error();
    if (out.size() != n) {
      // Not reachable through the Store's contract; the next attempt runs what is missing.
      co_return Error(ErrorCode::kInternal, "step \"" + ctx.step.id + "\": item " + std::to_string(out.size()) +
                                             " of " + std::to_string(n) + " has no checkpoint");
    }
    co_return StepOutcome::Done(StepRecordJson{{"output", std::move(out)}, {"items", static_cast<int64_t>(n)}});
  }

  // A failed attempt (`attempt`: the step's attempts that failed, this one included,
  // not those its node lost): retried later (the lease is given up), or the step failed for
  // good. Then on_error may recover: the checkpoint to make instead and the step to go
  // to (empty: the usual next); nullopt when the run waits for a retry or ended.
  std::optional<std::pair<StepRecordJson, std::string>> HandleFailure(const store::Lease& lease, const store::RunRecord& run,
                                                                      const StepConfig& step, int attempt, Error error,
                                                                      bool retryable_kind) {
    step_errors_.Add({{"pipeline", run.pipeline}, {"class", std::string(ErrorCodeName(error.code))}}).Increment();
    FailureDisposition d;
    std::string_view status;
    if (!retryable_kind || !IsRetryable(error.code) || error.code == ErrorCode::kCancelled) {
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
    if (!status.empty() && step.on_error.is_object() && error.code != ErrorCode::kCancelled &&
        error.code != ErrorCode::kLeaseLost) {
      const auto& oe = step.on_error.as_object();
      obs::LogInfo("step failed; on_error recovers", {{"run_id", run.id}, {"step_id", step.id}, {"attempt", attempt},
                                                      {"error_type", ErrorCodeName(error.code)}, {"error", error.message}});
      StepRecordJson rec{{"output", oe.contains("output") ? oe.at("output") : json::value(nullptr)},
                         {"error", store::ErrorToJson(error)},
                         {"recovered", true}};
      std::string next;
      if (const auto* g = oe.if_contains("goto")) {
        next = std::string(g->as_string());
        rec["next"] = next;
      }
      return std::make_pair(std::move(rec), std::move(next));
    }
    obs::Log(status.empty() ? obs::LogLevel::kInfo : obs::LogLevel::kWarn,
             status.empty() ? "step attempt failed; will retry" : "step failed; run ends",
             {{"run_id", run.id}, {"step_id", step.id}, {"attempt", attempt},
              {"error_type", ErrorCodeName(error.code)}, {"error", error.message},
              {"retry_in_ms", d.delay.count()}});
    auto r = Persist([&] { return store_.FailStep(lease, step.id, error, d); });
    if (!r.ok()) {
      LogAbandon(run.id, step.id, r.error());
      return std::nullopt;
    }
    if (status.empty()) {
      retries_.Add({{"pipeline", run.pipeline}}).Increment();
      Notify();  // another worker may take it when due
    } else {
      Finished(run.pipeline, status);
    }
    return std::nullopt;
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
  prometheus::Gauge& storage_up_;
  prometheus::Counter& lease_failures_;
  prometheus::Family<prometheus::Gauge>& ready_;
  std::atomic<bool> storage_down_{false};
  std::string last_lease_error_;  // GUARDED_BY(mu_)
  std::string node_id_;
  std::mutex definitions_mu_;
  std::map<std::string, std::shared_ptr<const PipelineConfig>> definitions_;  // GUARDED_BY(definitions_mu_)

  mutable std::mutex mu_;
  std::condition_variable cv_;            // workers wait here for work
  std::condition_variable heartbeat_cv_;  // the heartbeat thread waits here
  std::condition_variable idle_cv_;       // Stop waits here for the runs in flight to end
  bool stopping_ = false;        // GUARDED_BY(mu_)
  bool aborting_ = false;        // GUARDED_BY(mu_): the drain timeout passed
  bool heartbeat_stop_ = false;  // GUARDED_BY(mu_)
  uint64_t notifications_ = 0;   // GUARDED_BY(mu_)
  uint64_t next_active_ = 0;     // GUARDED_BY(mu_)
  std::map<uint64_t, Active> active_;  // GUARDED_BY(mu_)
  std::size_t in_flight_ = 0;                 // GUARDED_BY(mu_): runs whose execution has not ended
  uint64_t next_call_ = 0;                    // GUARDED_BY(mu_)
  std::map<uint64_t, Timestamp> pool_calls_;  // GUARDED_BY(mu_): calls on the blocking pool, since
  std::optional<Timestamp> lease_since_;      // GUARDED_BY(mu_): the lease loop in a lease call since
  bool started_ = false;
  asio::io_context io_{kIoThreads};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> io_work_;
  std::vector<std::thread> io_threads_;
  std::unique_ptr<asio::thread_pool> pool_;  // the blocking pool, from Start
  std::thread lease_thread_;
  std::thread heartbeat_;
};

}  // namespace

Readiness Engine::NodeReadiness() {
  std::lock_guard lock(RegistryMu());
  for (const EngineImpl* e : Registry()) {
    if (auto r = e->readiness(); !r.ready) return r;
  }
  return {};
}

std::unique_ptr<Engine> Engine::Create(const EngineConfig& config, store::Store& store, gateway::Gateway& gateway,
                                       const Clock& clock, Random& random, prometheus::Registry& registry) {
  return std::make_unique<EngineImpl>(config, store, gateway, clock, random, registry);
}

}  // namespace keel::engine
