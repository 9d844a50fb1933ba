#pragma once
// The engine: a pool of workers that lease queued runs from the Store and execute their
// pipelines step by step, checkpointing each finished step before the next starts.
//
// Per step attempt: a success is committed together with the start of the next step; a
// retryable failure gives the lease back with a backoff delay (the run waits in the
// queue, holding no worker); a non-retryable failure ends the run `failed`; a retryable
// failure on the last allowed attempt ends it `dead_lettered`. Leases in flight are
// extended by a heartbeat thread. A crash leaves the lease to expire; the run is then
// leased again and resumes at the step that was running (docs/guarantees.md).

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
  /// (every worker has been inside one lease call or step attempt for longer than
  /// engine.stall_timeout). Empty when ready.
  std::string reason;
  /// What the reason is about: the lease error, how many workers for how long.
  std::string detail;
};

class Engine {
 public:
  /// `store`, `gateway`, `clock`, `random` and `registry` must outlive the engine.
  static std::unique_ptr<Engine> Create(const EngineConfig& config, store::Store& store,
                                        gateway::Gateway& gateway, const Clock& clock,
                                        Random& random, prometheus::Registry& registry);
  virtual ~Engine() = default;

  /// Starts the workers and the heartbeat thread, and registers as the store's work
  /// listener (Store::SetWorkListener) until Stop, so that runs queued or woken anywhere
  /// wake an idle worker at once.
  virtual void Start() = 0;
  /// Says that a run was queued, so an idle worker looks at once. Thread-safe.
  virtual void Notify() = 0;
  /// Drains: no new leases; runs in flight finish the step they are in, checkpoint it and
  /// give their lease back. Steps still running after engine.drain_timeout are stopped
  /// (llm and http calls are abandoned, maps take no more items); their attempts are
  /// recorded as interrupted and their runs are due at once, for another node. Returns
  /// when every worker has stopped. Idempotent.
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
