#pragma once
// The metrics registry of a keel process, exposed at GET /metrics in the Prometheus
// text format. Built on prometheus-cpp (core); every layer registers its families on the
// one Registry it is given. prometheus-cpp metrics are thread-safe.

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

namespace keel::obs {

/// Renders every family of `registry` in the Prometheus text exposition format 0.0.4.
std::string RenderPrometheus(prometheus::Registry& registry);

/// Latency buckets in seconds, 100us to 60s, for step and request histograms.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets();

}  // namespace keel::obs
