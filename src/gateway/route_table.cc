#include "route_table.h"

#include <algorithm>
#include <utility>

namespace keel::gateway::detail {

std::string_view StrategyName(Strategy strategy) {
  switch (strategy) {
    case Strategy::kPriority:
      return "priority";
    case Strategy::kRoundRobin:
      return "round_robin";
    case Strategy::kWeighted:
      return "weighted";
    case Strategy::kLatency:
      return "latency";
    case Strategy::kLeastBusy:
      return "least_busy";
  }
  return "priority";
}

std::optional<Strategy> ParseStrategy(std::string_view name) {
  for (Strategy s : {Strategy::kPriority, Strategy::kRoundRobin, Strategy::kWeighted,
                     Strategy::kLatency, Strategy::kLeastBusy}) {
    if (StrategyName(s) == name) return s;
  }
  return std::nullopt;
}

ProviderState::ProviderState(std::string n, ProviderConfig c, std::unique_ptr<Provider> p,
                             GatewayMetrics& m, Timestamp now)
    : name(std::move(n)), config(std::move(c)), provider(std::move(p)), metrics(m, name) {
  if (config.limits.rpm > 0) {
    rpm.emplace(static_cast<double>(config.limits.rpm), config.limits.rpm / 60.0, now);
  }
  if (config.limits.tpm > 0) {
    tpm.emplace(static_cast<double>(config.limits.tpm), config.limits.tpm / 60.0, now);
  }
}

TargetState::TargetState(ProviderState* p, RouteTarget t, std::string r, std::size_t i,
                         const CircuitBreakerOptions& o, GatewayMetrics& m)
    : provider(p),
      target(std::move(t)),
      route(std::move(r)),
      index(i),
      breaker(o),
      metrics(m, route, target.provider) {}

namespace {

RetryBudgetOptions BudgetOptions(const RouteConfig& rc) {
  RetryBudgetOptions b;
  b.ratio = rc.retry_budget.ratio;
  b.min_per_second = rc.retry_budget.min_per_second;
  return b;
}

CircuitBreakerOptions BreakerOptions(const RouteConfig& rc) {
  CircuitBreakerOptions o;
  o.failure_rate = rc.circuit_breaker.failure_rate;
  o.min_requests = rc.circuit_breaker.min_requests;
  o.window = rc.circuit_breaker.window;
  o.consecutive_failures = rc.circuit_breaker.consecutive_failures;
  o.open_for = rc.circuit_breaker.open_for;
  return o;
}

std::unique_ptr<Provider> MakeProvider(const ProviderConfig& p, const ProviderFactory& make) {
  if (make) {
    if (auto provider = make(p)) return provider;
  }
  if (p.type == "openai") return MakeOpenAiProvider(p);
  if (p.type == "anthropic") return MakeAnthropicProvider(p);
  return MakeMockProvider(p);
}

}  // namespace

RouteState::RouteState(RouteConfig c, Strategy s, GatewayMetrics& m)
    : config(std::move(c)),
      strategy(s),
      budget(BudgetOptions(config)),
      metrics(m, config.name, config.cache.has_value()) {}

RouteState* RouteTable::Find(const std::string& route) const {
  const auto it = routes.find(route);
  return it == routes.end() ? nullptr : it->second.get();
}

Result<std::unique_ptr<RouteTable>> BuildRouteTable(const Config& config, GatewayMetrics& metrics,
                                                    const ProviderFactory& make_provider,
                                                    RedisClient* redis, Timestamp now) {
  auto table = std::make_unique<RouteTable>();
  for (const auto& [name, p] : config.providers) {
    table->providers[name] =
        std::make_unique<ProviderState>(name, p, MakeProvider(p, make_provider), metrics, now);
  }
  auto add_route = [&](const RouteConfig& rc) -> Result<void> {
    const auto strategy = ParseStrategy(rc.strategy);
    if (!strategy) {
      return Error(ErrorCode::kInvalidRequest,
                   "route \"" + rc.name + "\": unknown strategy \"" + rc.strategy + "\"");
    }
    auto route = std::make_unique<RouteState>(rc, *strategy, metrics);
    if (rc.cache)
      route->cache = std::make_unique<RouteCache>(*rc.cache, redis, route->metrics.cache_corrupt);
    if (*strategy == Strategy::kLatency)
      route->latency = std::make_unique<LatencyRanking>(rc.targets.size());
    const CircuitBreakerOptions breaker = BreakerOptions(rc);
    for (const auto& t : rc.targets) {
      const auto provider = table->providers.find(t.provider);
      if (provider == table->providers.end()) {
        return Error(ErrorCode::kInvalidRequest,
                     "route \"" + rc.name + "\": no provider named \"" + t.provider + "\"");
      }
      route->targets.push_back(std::make_unique<TargetState>(
          provider->second.get(), t, rc.name, route->targets.size(), breaker, metrics));
    }
    table->routes[rc.name] = std::move(route);
    return Ok();
  };
  for (const auto& [name, r] : config.routes) KEEL_RETURN_IF_ERROR(add_route(r));
  for (const auto& [name, p] : config.providers) {
    if (table->routes.count(name)) continue;
    RouteConfig rc;
    rc.name = name;
    rc.targets.push_back(RouteTarget{name, 1, 1});
    KEEL_RETURN_IF_ERROR(add_route(rc));
  }
  for (auto& [name, route] : table->routes) {
    for (auto& t : route->targets)
      table->targets_by_provider[t->target.provider].push_back(t.get());
  }
  return table;
}

std::vector<TargetState*> Order(RouteState& route, Timestamp now, Random& random) {
  std::vector<TargetState*> order;
  for (auto& t : route.targets) order.push_back(t.get());
  if (order.empty()) return order;
  switch (route.strategy) {
    case Strategy::kPriority:
      std::stable_sort(order.begin(), order.end(), [](const TargetState* a, const TargetState* b) {
        return a->target.tier < b->target.tier;
      });
      break;
    case Strategy::kRoundRobin: {
      const std::size_t shift = route.next.fetch_add(1) % order.size();
      std::rotate(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(shift), order.end());
      break;
    }
    case Strategy::kWeighted: {
      // Each next target is drawn with probability ~ its weight.
      std::vector<TargetState*> out;
      while (!order.empty()) {
        double total = 0;
        for (auto* t : order) total += t->target.weight;
        std::size_t pick = 0;
        if (total > 0) {
          double x = random.Uniform() * total;
          for (; pick + 1 < order.size(); ++pick) {
            x -= order[pick]->target.weight;
            if (x < 0) break;
          }
        }
        out.push_back(order[pick]);
        order.erase(order.begin() + static_cast<std::ptrdiff_t>(pick));
      }
      order = std::move(out);
      break;
    }
    case Strategy::kLatency: {
      if (!route.latency) break;
      const auto ranked = route.latency->Order(now);
      for (std::size_t i = 0; i < ranked.size() && i < order.size(); ++i) {
        order[i] = route.targets[ranked[i]].get();
      }
      break;
    }
    case Strategy::kLeastBusy: {
      std::vector<std::pair<double, TargetState*>> keyed;
      for (auto* t : order) {
        auto& p = *t->provider;
        const double cap = p.config.limits.max_concurrency > 0
                               ? static_cast<double>(p.config.limits.max_concurrency)
                               : 1000.0;
        double load = static_cast<double>(p.in_flight.load()) / cap;
        {
          std::lock_guard lock(p.mu);
          if (p.rpm) load += 1.0 - std::max(0.0, p.rpm->Available(now)) / p.rpm->capacity();
        }
        keyed.emplace_back(load, t);
      }
      std::stable_sort(keyed.begin(), keyed.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      for (std::size_t i = 0; i < keyed.size(); ++i) order[i] = keyed[i].second;
      break;
    }
  }
  return order;
}

bool CountsAgainstBreaker(ErrorCode code) {
  return FailsOver(code) && code != ErrorCode::kRateLimited && code != ErrorCode::kInvalidOutput;
}

void RecordHealth(TargetState& t, bool healthy, Timestamp now) {
  std::lock_guard lock(t.mu);
  if (healthy)
    t.breaker.OnSuccess(now);
  else
    t.breaker.OnFailure(now);
  t.metrics.SetBreaker(t.breaker.state(now));
}

}  // namespace keel::gateway::detail
