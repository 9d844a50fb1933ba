#include "keel/core/retry_budget.h"

#include <algorithm>

namespace keel {
namespace {

constexpr int64_t kBuckets = 10;

int64_t SliceMs(Duration window) { return std::max<int64_t>(1, window.count() / kBuckets); }

int64_t EpochOf(Timestamp now, int64_t slice_ms) {
  const int64_t ms = ToMillis(now);
  int64_t q = ms / slice_ms;
  if (ms % slice_ms != 0 && ms < 0) --q;
  return q;
}

size_t IndexOf(int64_t epoch) {
  return static_cast<size_t>(((epoch % kBuckets) + kBuckets) % kBuckets);
}

// Slack for products such as 0.29 * 100 that land a rounding below a whole number.
constexpr double kEpsilon = 1e-9;

}  // namespace

RetryBudget::RetryBudget(RetryBudgetOptions options) : options_(options) {
  options_.ratio = std::max(0.0, options_.ratio);
  options_.min_per_second = std::max(0.0, options_.min_per_second);
}

void RetryBudget::OnRequest(Timestamp now) { ++At(now).requests; }

bool RetryBudget::TryRetry(Timestamp now) {
  int64_t requests = 0;
  int64_t retries = 0;
  Totals(now, requests, retries);
  if (static_cast<double>(retries + 1) > Allowed(now) + kEpsilon) return false;
  ++At(now).retries;
  return true;
}

double RetryBudget::Allowed(Timestamp now) const {
  int64_t requests = 0;
  int64_t retries = 0;
  Totals(now, requests, retries);
  const double window_seconds = static_cast<double>(options_.window.count()) / 1000.0;
  return options_.min_per_second * window_seconds + options_.ratio * static_cast<double>(requests);
}

int64_t RetryBudget::Retries(Timestamp now) const {
  int64_t requests = 0;
  int64_t retries = 0;
  Totals(now, requests, retries);
  return retries;
}

RetryBudget::Bucket& RetryBudget::At(Timestamp now) {
  const int64_t epoch = EpochOf(now, SliceMs(options_.window));
  Bucket& b = buckets_[IndexOf(epoch)];
  // Only a newer slice recycles the bucket (see CircuitBreaker::BucketAt).
  if (b.epoch < epoch) b = Bucket{epoch, 0, 0};
  return b;
}

void RetryBudget::Totals(Timestamp now, int64_t& requests, int64_t& retries) const {
  const int64_t epoch = EpochOf(now, SliceMs(options_.window));
  requests = 0;
  retries = 0;
  for (const Bucket& b : buckets_) {
    if (b.epoch > epoch - kBuckets && b.epoch <= epoch) {
      requests += b.requests;
      retries += b.retries;
    }
  }
}

}  // namespace keel
