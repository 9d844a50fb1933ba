#pragma once
// Active health checks, private to keel_gateway (docs/gateway.md, "How a call is served",
// 6): a provider with `health_check: {interval}` whose circuit on some route target is
// half-open (open for open_for already) is probed with a one-token call, which makes the
// half-open trial instead of a user's call: success closes those circuits, failure opens
// them again. So a recovered provider is back in rotation without waiting for traffic.
// Counted in keel_gateway_health_probes_total{provider, outcome}.
//
// Thread-safe. Probes are blocking provider calls (at most 10s each), made one provider
// after the other on the prober's own thread, or on the caller's by ProbeDue.

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "keel/core/clock.h"
#include "route_table.h"

namespace keel::gateway::detail {

class HealthProber {
 public:
  /// `table` and `clock` must outlive the prober. Starts nothing: see Start.
  HealthProber(RouteTable& table, const Clock& clock);
  /// Stops and joins the thread (after the probe in flight, if any).
  ~HealthProber();
  HealthProber(const HealthProber&) = delete;
  HealthProber& operator=(const HealthProber&) = delete;

  /// Whether any provider of the table has a health check.
  bool needed() const;

  /// Starts the prober's thread, which calls ProbeDue every `tick` of real time (a poll:
  /// when a provider is due comes from the clock). Call once.
  void Start(Duration tick = Duration(100));

  /// One round at the clock's SteadyNow(): each provider with a health check whose
  /// interval has passed since its previous round (or that never had one) is probed if a
  /// circuit of its targets is half-open. Returns the providers probed.
  int ProbeDue();

 private:
  // Probes `p` if a circuit of its targets is half-open; true when it did.
  bool ProbeProvider(ProviderState& p);

  RouteTable& table_;
  const Clock& clock_;
  std::mutex round_mu_;                     // one round at a time
  std::map<std::string, SteadyTime> next_;  // GUARDED_BY(round_mu_): the next round due
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace keel::gateway::detail
