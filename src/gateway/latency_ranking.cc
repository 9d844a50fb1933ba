#include "latency_ranking.h"

#include <algorithm>

namespace keel::gateway::detail {

LatencyRanking::LatencyRanking(std::size_t targets, Duration reprobe_after, Duration half_life)
    : reprobe_after_(reprobe_after),
      half_life_(half_life),
      targets_(std::max<std::size_t>(targets, 1), Target(half_life)) {}

void LatencyRanking::Observe(std::size_t target, double ms, Timestamp now) {
  std::lock_guard lock(mu_);
  if (target >= targets_.size()) return;
  Target& t = targets_[target];
  if (t.measured && now - t.measured_at >= reprobe_after_)
    t.average = Ewma(half_life_);  // stale: start over
  t.average.Observe(ms, now);
  t.measured_at = now;
  t.measured = true;
}

std::vector<std::size_t> LatencyRanking::Order(Timestamp now) {
  std::lock_guard lock(mu_);
  std::vector<std::size_t> unmeasured, measured;
  for (std::size_t i = 0; i < targets_.size(); ++i)
    (targets_[i].measured ? measured : unmeasured).push_back(i);
  std::stable_sort(measured.begin(), measured.end(), [&](std::size_t a, std::size_t b) {
    return *targets_[a].average.value() < *targets_[b].average.value();
  });
  std::vector<std::size_t> order = unmeasured;
  order.insert(order.end(), measured.begin(), measured.end());
  // A measured target other than the first whose sample is old, and that was not put
  // first for it lately, goes first: the one measured longest ago.
  std::optional<std::size_t> due;
  for (std::size_t k = 1; k < order.size(); ++k) {
    const Target& t = targets_[order[k]];
    if (!t.measured || now - t.measured_at < reprobe_after_ || now - t.probed_at < reprobe_after_)
      continue;
    if (!due || t.measured_at < targets_[order[*due]].measured_at) due = k;
  }
  if (due) {
    targets_[order[*due]].probed_at = now;
    std::rotate(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(*due),
                order.begin() + static_cast<std::ptrdiff_t>(*due) + 1);
  }
  return order;
}

std::optional<double> LatencyRanking::Average(std::size_t target) const {
  std::lock_guard lock(mu_);
  if (target >= targets_.size()) return std::nullopt;
  return targets_[target].average.value();
}

}  // namespace keel::gateway::detail
