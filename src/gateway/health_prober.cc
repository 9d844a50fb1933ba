#include "health_prober.h"

#include <algorithm>
#include <vector>

#include "keel/obs/log.h"

namespace keel::gateway::detail {

HealthProber::HealthProber(RouteTable& table, const Clock& clock) : table_(table), clock_(clock) {}

HealthProber::~HealthProber() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool HealthProber::needed() const {
  for (const auto& [name, p] : table_.providers) {
    if (p->config.health_check_interval.count() > 0) return true;
  }
  return false;
}

void HealthProber::Start(Duration tick) {
  thread_ = std::thread([this, tick] {
    std::unique_lock lock(mu_);
    while (!stop_) {
      // The poll's real-time tick; whether a provider is due is the clock's to say.
      cv_.wait_for(lock, tick, [&] { return stop_; });
      if (stop_) break;
      lock.unlock();
      ProbeDue();
      lock.lock();
    }
  });
}

int HealthProber::ProbeDue() {
  std::lock_guard round(round_mu_);
  const SteadyTime now = clock_.SteadyNow();
  int probed = 0;
  for (auto& [name, p] : table_.providers) {
    const Duration interval = p->config.health_check_interval;
    if (interval.count() <= 0) continue;
    const auto next = next_.find(name);
    if (next != next_.end() && now < next->second) continue;
    next_[name] = now + interval;
    probed += ProbeProvider(*p) ? 1 : 0;
  }
  return probed;
}

bool HealthProber::ProbeProvider(ProviderState& p) {
  std::vector<TargetState*> trial;
  const Timestamp now = clock_.Now();
  if (const auto it = table_.targets_by_provider.find(p.name);
      it != table_.targets_by_provider.end()) {
    for (auto* t : it->second) {
      std::lock_guard lock(t->mu);
      if (t->breaker.state(now) == BreakerState::kHalfOpen && t->breaker.Allow(now))
        trial.push_back(t);
    }
  }
  if (trial.empty()) return false;
  json::object body{{"model", p.config.model},
                    {"messages", json::array{json::object{{"role", "user"}, {"content", "ping"}}}},
                    {"max_tokens", 1}};
  ChatRequest req;
  auto r = p.provider->Chat(body, req, std::min(p.config.timeout.total, Duration(10000)));
  const bool healthy = r.ok() || !CountsAgainstBreaker(r.error().code);
  p.metrics.probes.Increment(healthy ? nullptr : &r.error());
  const Timestamp after = clock_.Now();
  for (auto* t : trial) RecordHealth(*t, healthy, after);
  obs::Log(healthy ? obs::LogLevel::kInfo : obs::LogLevel::kWarn, "health probe",
           {{"provider", p.name},
            {"healthy", healthy},
            {"targets", static_cast<int64_t>(trial.size())}});
  return true;
}

}  // namespace keel::gateway::detail
