#pragma once
// How one kind of step executes. The executor is open for more kinds: each kind is a
// StepRunner registered by kind; the engine knows none of them by name, except `map`,
// which it runs itself (it fans out over the other runners and checkpoints each item).

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "keel/core/cancel.h"
#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/result.h"
#include "keel/core/template.h"
#include "keel/store/store.h"

namespace keel::engine {

struct StepContext {
  const std::string& run_id;
  const StepConfig& step;
  int attempt = 1;
  /// {"input": ..., "steps": {ID: {"output": ..., ...}}}: what templates may reference
  /// (inside a map also "item" and "index", over the run's scope, which items share).
  const TemplateContext& scope;
  /// Stable across attempts of this step of this run: "<run_id>/<step_id>".
  const std::string& idempotency_key;
  /// The run as leased: its signals, its definition, its step records.
  const store::RunRecord& run;
  /// This step's record (when it first started, whether it waited), if it has one.
  const store::StepRecord* record = nullptr;
  /// Now, by the engine's clock.
  Timestamp now{};
  /// Set when the run was cancelled or its lease lost: a long step should stop.
  const std::atomic<bool>* cancelled = nullptr;
  /// The lease the run is executed under (for steps that write to the store).
  const store::Lease* lease = nullptr;
  /// Fired with `cancelled` (run cancelled, lease lost, drain timeout): an asynchronous
  /// call in flight (a model call, an HTTP request) registered on it stops at once.
  std::shared_ptr<CancelSignal> cancel;
};

/// The checkpoint a step leaves: {"output": ...} plus kind-specific fields (an llm step
/// adds "text", "model", "provider", "usage"). Templates see it as steps.ID.
using StepRecordJson = json::object;

/// What an attempt came to: done (with its checkpoint), or parked until something
/// happens (a timer, a signal, a child run, an external task), holding no worker.
struct StepOutcome {
  StepRecordJson record;
  /// The step to go to instead of the usual next one (a choice's branch).
  std::string next;
  bool suspend = false;
  /// When suspended: wake by then at the latest (none: only a signal or a child's end).
  std::optional<Timestamp> wake_at;
  /// When suspended: what the run waits for, shown by GET /v1/runs/{id}.
  json::value waiting;
  /// A failure no retry can mend (a wait that timed out without a default, a child run
  /// that failed): the step fails for good, whatever its retry policy; on_error applies.
  std::optional<Error> fail;

  static StepOutcome Done(StepRecordJson record) {
    StepOutcome o;
    o.record = std::move(record);
    return o;
  }
  static StepOutcome Suspend(std::optional<Timestamp> wake_at, json::value waiting) {
    StepOutcome o;
    o.suspend = true;
    o.wake_at = wake_at;
    o.waiting = std::move(waiting);
    return o;
  }
};

/// Where the engine runs an attempt of a kind (StepRunner::execution()).
enum class StepExecution {
  /// Run() is CPU-only and quick (a template, a schema, a condition): called on the
  /// engine's I/O thread.
  kInline,
  /// Run() may block (on the store): called on the engine's small blocking pool.
  kBlocking,
  /// RunAsync() holds no thread while it waits (a model call, an HTTP request): called
  /// on the engine's I/O thread, it returns at once and calls `done` later.
  kAsync,
};

/// One kind's attempts. Thread-safe: the engine runs attempts of many runs at once.
class StepRunner {
 public:
  using Done = std::function<void(Result<StepOutcome>)>;

  virtual ~StepRunner() = default;
  /// Executes one attempt. Blocking; bounded by the step's timeout.
  virtual Result<StepOutcome> Run(const StepContext& ctx) = 0;
  /// How the engine calls this kind. Default: kBlocking.
  virtual StepExecution execution() const { return StepExecution::kBlocking; }
  /// Executes one attempt without holding the calling thread while it waits; `done` is
  /// called exactly once, on `executor` or on a thread of the runner's own (the engine
  /// moves back to its executor). `ctx` and everything it refers to stay valid until
  /// `done` is called. Default: done(Run(ctx)), here.
  virtual void RunAsync(const StepContext& ctx, const boost::asio::any_io_executor& executor, Done done) {
    (void)executor;
    done(Run(ctx));
  }
};

}  // namespace keel::engine
