#include "keel/obs/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace keel::obs {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// The value of the sample line that starts with `prefix` (name and labels), or -1.
double Sample(const std::string& text, const std::string& prefix) {
  for (const auto& line : Lines(text)) {
    if (line.rfind(prefix + " ", 0) == 0) return std::stod(line.substr(prefix.size() + 1));
  }
  return -1;
}

TEST(MetricsTest, EmptyRegistryRendersNothing) {
  prometheus::Registry registry;
  EXPECT_EQ(RenderPrometheus(registry), "");
}

TEST(MetricsTest, RendersACounterWithLabels) {
  prometheus::Registry registry;
  auto& family = prometheus::BuildCounter()
                     .Name("keel_test_requests_total")
                     .Help("Requests by outcome")
                     .Register(registry);
  family.Add({{"outcome", "ok"}}).Increment(3);
  family.Add({{"outcome", "rate_limited"}}).Increment();

  const std::string text = RenderPrometheus(registry);
  EXPECT_THAT(text, HasSubstr("# HELP keel_test_requests_total Requests by outcome\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE keel_test_requests_total counter\n"));
  EXPECT_EQ(Sample(text, R"(keel_test_requests_total{outcome="ok"})"), 3);
  EXPECT_EQ(Sample(text, R"(keel_test_requests_total{outcome="rate_limited"})"), 1);
}

TEST(MetricsTest, RendersAHistogram) {
  prometheus::Registry registry;
  auto& family = prometheus::BuildHistogram()
                     .Name("keel_test_latency_seconds")
                     .Help("Latency")
                     .Register(registry);
  auto& h = family.Add({{"step", "plan"}}, prometheus::Histogram::BucketBoundaries{0.1, 1, 10});
  h.Observe(0.05);
  h.Observe(0.5);
  h.Observe(0.7);
  h.Observe(20);

  const std::string text = RenderPrometheus(registry);
  EXPECT_THAT(text, HasSubstr("# TYPE keel_test_latency_seconds histogram\n"));
  // Buckets are cumulative, and +Inf counts everything.
  EXPECT_EQ(Sample(text, R"(keel_test_latency_seconds_bucket{step="plan",le="0.1"})"), 1);
  EXPECT_EQ(Sample(text, R"(keel_test_latency_seconds_bucket{step="plan",le="1"})"), 3);
  EXPECT_EQ(Sample(text, R"(keel_test_latency_seconds_bucket{step="plan",le="10"})"), 3);
  EXPECT_EQ(Sample(text, R"(keel_test_latency_seconds_bucket{step="plan",le="+Inf"})"), 4);
  EXPECT_EQ(Sample(text, R"(keel_test_latency_seconds_count{step="plan"})"), 4);
  EXPECT_DOUBLE_EQ(Sample(text, R"(keel_test_latency_seconds_sum{step="plan"})"), 21.25);
}

TEST(MetricsTest, RendersEveryRegisteredFamily) {
  prometheus::Registry registry;
  prometheus::BuildCounter().Name("keel_a_total").Help("a").Register(registry).Add({}).Increment();
  prometheus::BuildGauge().Name("keel_b").Help("b").Register(registry).Add({}).Set(42);
  const std::string text = RenderPrometheus(registry);
  EXPECT_EQ(Sample(text, "keel_a_total"), 1);
  EXPECT_EQ(Sample(text, "keel_b"), 42);
  EXPECT_THAT(text, HasSubstr("# TYPE keel_b gauge\n"));
  EXPECT_THAT(text, Not(HasSubstr("keel_c")));
}

TEST(MetricsTest, LatencyBucketsAreSortedAndSpanTheRange) {
  const auto& buckets = LatencyBuckets();
  ASSERT_FALSE(buckets.empty());
  EXPECT_TRUE(std::is_sorted(buckets.begin(), buckets.end()));
  EXPECT_EQ(std::adjacent_find(buckets.begin(), buckets.end()), buckets.end()) << "duplicate bound";
  EXPECT_DOUBLE_EQ(buckets.front(), 0.0001);  // 100us
  EXPECT_DOUBLE_EQ(buckets.back(), 60);       // 60s
  // The same instance every time.
  EXPECT_EQ(&LatencyBuckets(), &buckets);
}

TEST(MetricsTest, LatencyBucketsWorkInAHistogram) {
  prometheus::Registry registry;
  auto& h = prometheus::BuildHistogram()
                .Name("keel_step_seconds")
                .Help("h")
                .Register(registry)
                .Add({}, LatencyBuckets());
  h.Observe(0.003);
  const std::string text = RenderPrometheus(registry);
  EXPECT_EQ(Sample(text, R"(keel_step_seconds_bucket{le="0.0025"})"), 0);
  EXPECT_EQ(Sample(text, R"(keel_step_seconds_bucket{le="0.005"})"), 1);
  EXPECT_EQ(Sample(text, R"(keel_step_seconds_bucket{le="60"})"), 1);
  EXPECT_EQ(Sample(text, "keel_step_seconds_count"), 1);
}

}  // namespace
}  // namespace keel::obs
