#pragma once
// keel's HTTP API (docs/api.md): runs, the dead-letter queue, health, readiness and
// metrics. Handlers that touch storage run on a bounded pool of handler threads, never
// on an I/O thread.

#include <memory>
#include <prometheus/registry.h>

#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/random.h"
#include "keel/gateway/gateway.h"
#include "keel/gateway/mock_llm.h"
#include "keel/net/http_server.h"
#include "keel/store/store.h"

namespace keel::api {

class ApiServer {
 public:
  /// Listens at `listen` (host and port of `server`, port 0 for an ephemeral one).
  /// `ops_only`: only /healthz, /readyz and /metrics (a `keel worker` node). Everything
  /// passed must outlive the server. Runs it queues reach the workers through the store
  /// (Store::SetWorkListener).
  static Result<std::unique_ptr<ApiServer>> Create(const Config& config, net::ServerOptions server,
                                                   store::Store& store, gateway::Gateway& gateway,
                                                   const Clock& clock, Random& random,
                                                   prometheus::Registry& registry, bool ops_only = false);
  virtual ~ApiServer() = default;
  virtual uint16_t port() const = 0;
  /// Answers 503 on /readyz from now on (for a load balancer), keeps serving the rest.
  virtual void SetDraining() = 0;
  /// Closes connections and waits for handlers in flight. Idempotent.
  virtual void Stop() = 0;
};

/// The `keel mock-llm` server: an OpenAI-compatible /v1/chat/completions with injected
/// faults (see keel/gateway/mock_llm.h), GET /v1/models, GET /mock/stats and
/// POST /mock/reset.
class MockLlmServer {
 public:
  static Result<std::unique_ptr<MockLlmServer>> Create(net::ServerOptions server,
                                                      const gateway::MockOptions& mock);
  virtual ~MockLlmServer() = default;
  virtual uint16_t port() const = 0;
  virtual void Stop() = 0;
};

}  // namespace keel::api
