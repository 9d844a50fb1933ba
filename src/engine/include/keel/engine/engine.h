#pragma once
// The engine: leases queued runs from the Store and executes their pipelines step by
// step, checkpointing each finished step before the next starts.
//
// Threads (fixed, whatever engine.workers is): a lease loop (its own thread: it leases
// while fewer than engine.workers runs are in flight), two I/O threads on which every
// run's execution is a C++20 coroutine, a blocking pool of four threads for store calls
// (commits, which SQLite groups) and for steps that can only block (StepExecution::
// kBlocking), and the heartbeat thread. An llm or http step, or a map item of one, waits
// on the network holding no thread (StepRunner::RunAsync on the gateway's and the HTTP
// client's asynchronous calls); transform, validate, choice, sleep and wait steps run
// inline on the I/O thread. So engine.workers (default 64, up to 100000) bounds memory
// and the load sent to providers and tools, not threads.
//
// Per step attempt: a success is committed together with the start of the next step; a
// retryable failure gives the lease back with a backoff delay (the run waits in the
// queue, holding nothing); a non-retryable failure ends the run `failed`; a retryable
// failure on the last allowed attempt ends it `dead_lettered`. Leases in flight are
// extended by the heartbeat thread; a lease it finds lost (the run was cancelled or taken
// over), and the drain timeout, fire the run's CancelSignal, which stops the model or
// HTTP call in flight at once (and sets StepContext::cancelled for runners that block).
// A crash leaves the lease to expire; the run is then leased again and resumes at the
// step that was running (docs/guarantees.md).

#include <memory>
#include <prometheus/registry.h>
#include <string>

#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/random.h"
#include "keel/gateway/gateway.h"
#include "keel/store/store.h"

namespace keel::engine {

/// Whether a node's engine can lease work now (what /readyz answers).
struct Readiness {
  bool ready = true;
  /// Why not, when not ready: "draining", "storage" (its lease calls fail), "stalled"
  /// (the lease loop has been inside one lease call, or every thread of the blocking
  /// pool inside one store call or blocking step, for longer than engine.stall_timeout; a
  /// step waiting on the network holds no thread and is no stall). Empty when ready.
  std::string reason;
  /// What the reason is about: the lease error, which threads for how long.
  std::string detail;
};

class Engine {
 public:
  /// `store`, `gateway`, `clock`, `random` and `registry` must outlive the engine.
  static std::unique_ptr<Engine> Create(const EngineConfig& config, store::Store& store,
                                        gateway::Gateway& gateway, const Clock& clock,
                                        Random& random, prometheus::Registry& registry);
  virtual ~Engine() = default;

  /// Starts the engine's threads (none when engine.workers is 0), and registers as the
  /// store's work listener (Store::SetWorkListener) until Stop, so that runs queued or
  /// woken anywhere wake the lease loop at once. Call once.
  virtual void Start() = 0;
  /// Says that a run was queued, so the lease loop looks at once. Thread-safe.
  virtual void Notify() = 0;
  /// Drains: no new leases; runs in flight finish the step they are in, checkpoint it and
  /// give their lease back. Steps still running after engine.drain_timeout are stopped
  /// (llm and http calls are abandoned, maps take no more items); their attempts are
  /// recorded as interrupted and their runs are due at once, for another node. Returns
  /// when every run's execution has ended and the engine's threads are joined. Idempotent.
  virtual void Stop() = 0;
  /// Whether Stop() has begun.
  virtual bool draining() const = 0;

  /// Whether this engine can lease work now; also sets the gauge keel_engine_ready{reason}
  /// (1 for the current reason, "" when ready). An engine without workers is ready.
  /// Thread-safe.
  virtual Readiness readiness() const = 0;

  /// The readiness of every engine alive in this process (the first that is not ready
  /// wins); ready when there is none. Thread-safe.
  static Readiness NodeReadiness();
};

}  // namespace keel::engine
