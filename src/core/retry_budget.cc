#include "keel/core/retry_budget.h"

#include <algorithm>

namespace keel {
namespace {

// Slack for products such as 0.29 * 100 that land a rounding below a whole number.
constexpr double kEpsilon = 1e-9;

}  // namespace

RetryBudget::RetryBudget(RetryBudgetOptions options) : options_(options), window_(options.window) {
  options_.ratio = std::max(0.0, options_.ratio);
  options_.min_per_second = std::max(0.0, options_.min_per_second);
}

void RetryBudget::OnRequest(Timestamp now) { window_.Add(now, 1, 0); }

bool RetryBudget::TryRetry(Timestamp now) {
  if (static_cast<double>(Retries(now) + 1) > Allowed(now) + kEpsilon) return false;
  window_.Add(now, 0, 1);
  return true;
}

double RetryBudget::Allowed(Timestamp now) const {
  const int64_t requests = window_.Sum(now).first;
  const double window_seconds = static_cast<double>(options_.window.count()) / 1000.0;
  return options_.min_per_second * window_seconds + options_.ratio * static_cast<double>(requests);
}

int64_t RetryBudget::Retries(Timestamp now) const { return window_.Sum(now).second; }

}  // namespace keel
