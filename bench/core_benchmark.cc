// Google Benchmark over the hot pure functions of keel_core: the ones every submitted run
// or executed step goes through. Not a test: it prints figures and asserts nothing.
//
//   ninja -C build-bench keel_core_benchmark && build-bench/bench/keel_core_benchmark
//
// The inputs mirror bench/run_throughput.sh: the 3-step "bench3" pipeline (llm -> llm ->
// transform) and its per-run input. ParseJson reads the fixed gateway body
// /work/shared/bench/chat-body.json (override with KEEL_BENCH_CHAT_BODY=FILE); when that
// file is missing, an embedded copy of the same 518 bytes is used and the row is labelled.

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "keel/core/backoff.h"
#include "keel/core/clock.h"
#include "keel/core/ids.h"
#include "keel/core/json.h"
#include "keel/core/json_schema.h"
#include "keel/core/random.h"
#include "keel/core/template.h"

#ifndef KEEL_BENCH_CHAT_BODY
#define KEEL_BENCH_CHAT_BODY "/work/shared/bench/chat-body.json"
#endif

namespace {

using keel::json::value;

// Parses a JSON literal of this file; aborts on a typo (a benchmark bug, not a result).
value J(std::string_view text) {
  auto v = keel::ParseJson(text);
  if (!v.ok()) {
    std::fprintf(stderr, "bad JSON in benchmark: %s\n", v.error().message.c_str());
    std::abort();
  }
  return std::move(v).value();
}

// The step specs of the bench3 pipeline of run_throughput.sh, as the engine holds them.
const value& Step1Messages() {
  static const value v = J(R"([
    {"role": "system", "content": "You write terse answers."},
    {"role": "user", "content": "Answer ticket {{input.n}} from {{input.customer}}:\n{{input.ticket}}"}])");
  return v;
}
const value& Step2Messages() {
  static const value v = J(R"([
    {"role": "user", "content": "Improve this answer to ticket {{input.n}}:\n{{steps.draft.text}}"}])");
  return v;
}
const value& Step3Transform() {
  static const value v = J(R"({"n": "{{input.n}}", "answer": "{{steps.refine.text}}",
                               "model": "{{steps.refine.model}}", "draft": "{{steps.draft.text}}"})");
  return v;
}

// The scope a worker renders step 3 against: the run's input and two LLM step records
// shaped like the mock's answers.
const value& Scope() {
  static const value v = J(R"({
    "input": {"n": 123456, "customer": "acme-corp",
              "ticket": "The export button does nothing when I click it in Firefox 128 on Linux."},
    "steps": {
      "draft": {"output": "mock answer 1f2e3d4c: Answer ticket 123456 from acme-corp: The export button does nothing when I click it in Firefox 128 on Linux.",
                "text": "mock answer 1f2e3d4c: Answer ticket 123456 from acme-corp: The export button does nothing when I click it in Firefox 128 on Linux.",
                "model": "mock-1", "provider": "mock",
                "usage": {"prompt_tokens": 31, "completion_tokens": 36, "total_tokens": 67}},
      "refine": {"output": "mock answer 9a8b7c6d: Improve this answer to ticket 123456: mock answer 1f2e3d4c: Answer ticket 123456 from acme-corp: The export button does nothing",
                 "text": "mock answer 9a8b7c6d: Improve this answer to ticket 123456: mock answer 1f2e3d4c: Answer ticket 123456 from acme-corp: The export button does nothing",
                 "model": "mock-1", "provider": "mock",
                 "usage": {"prompt_tokens": 40, "completion_tokens": 41, "total_tokens": 81}}}})");
  return v;
}

// ~500 bytes of run input with nested objects and unsorted keys: what an
// Idempotency-Key fingerprint canonicalises.
const value& Input500() {
  static const value v = J(R"({
    "pipeline": "bench3",
    "input": {"ticket": "The export button does nothing when I click it in Firefox 128 on Linux; the console shows a CSP error.",
              "n": 123456, "customer": "acme-corp", "priority": "high", "tags": ["export", "firefox", "csp", "ui"],
              "reporter": {"name": "Ada Example", "email": "ada@example.com", "plan": "enterprise", "seats": 250},
              "context": {"browser": "Firefox", "version": "128.0.3", "os": "Linux", "locale": "en-GB",
                          "url": "https://app.example.com/reports/export?id=42", "retries": 3, "beta": false},
              "created": "2026-11-25T01:45:50.123Z", "score": 0.875}})");
  return v;
}

std::string ChatBody(bool& embedded) {
  const char* env = std::getenv("KEEL_BENCH_CHAT_BODY");
  std::ifstream in(env ? env : KEEL_BENCH_CHAT_BODY);
  if (in) {
    std::stringstream ss;
    ss << in.rdbuf();
    embedded = false;
    return ss.str();
  }
  embedded = true;
  return R"({"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a concise assistant for a geography quiz application. Answer in one or two short sentences and never invent facts."},{"role":"user","content":"What is the capital of France, and why has it been the political and cultural center of the country for so long? Please keep it short."}],"temperature":0.2,"top_p":1,"max_tokens":128,"n":1,"stream":false,"presence_penalty":0,"frequency_penalty":0,"user":"bench-user-0001","metadata":{"bench":"gateway"}})"
         "\n";
}

void RenderBench(benchmark::State& state, const value& tmpl) {
  const value& scope = Scope();
  for (auto _ : state) {
    auto r = keel::RenderTemplate(tmpl, scope);
    if (!r.ok()) {
      state.SkipWithError(r.error().message.c_str());
      break;
    }
    benchmark::DoNotOptimize(r);
  }
}

void BM_RenderTemplate_Step1Messages(benchmark::State& state) { RenderBench(state, Step1Messages()); }
void BM_RenderTemplate_Step2Messages(benchmark::State& state) { RenderBench(state, Step2Messages()); }
void BM_RenderTemplate_Step3Transform(benchmark::State& state) { RenderBench(state, Step3Transform()); }
BENCHMARK(BM_RenderTemplate_Step1Messages);
BENCHMARK(BM_RenderTemplate_Step2Messages);
BENCHMARK(BM_RenderTemplate_Step3Transform);

void BM_CanonicalJson_500B(benchmark::State& state) {
  const value& v = Input500();
  std::size_t bytes = 0;
  for (auto _ : state) {
    std::string s = keel::CanonicalJson(v);
    bytes = s.size();
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.counters["out_bytes"] = static_cast<double>(bytes);
}
BENCHMARK(BM_CanonicalJson_500B);

// For scale: plain (non-canonical) serialisation of the same value.
void BM_Serialize_500B_Baseline(benchmark::State& state) {
  const value& v = Input500();
  for (auto _ : state) {
    std::string s = keel::json::serialize(v);
    benchmark::DoNotOptimize(s);
  }
}
BENCHMARK(BM_Serialize_500B_Baseline);

void BM_ParseJson_ChatBody(benchmark::State& state) {
  bool embedded = false;
  const std::string body = ChatBody(embedded);
  for (auto _ : state) {
    auto r = keel::ParseJson(body);
    if (!r.ok()) {
      state.SkipWithError(r.error().message.c_str());
      break;
    }
    benchmark::DoNotOptimize(r);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * body.size()));
  if (embedded) state.SetLabel("embedded copy (chat-body.json not found)");
}
BENCHMARK(BM_ParseJson_ChatBody);

void BM_ComputeBackoff(benchmark::State& state) {
  keel::SeededRandom random(42);
  keel::BackoffPolicy policy;  // 1s, x2, max 30s, proportional jitter 0.2
  policy.jitter = static_cast<keel::JitterMode>(state.range(0));
  int retry = 0;
  for (auto _ : state) {
    retry = retry % 8 + 1;
    benchmark::DoNotOptimize(keel::ComputeBackoff(policy, retry, std::nullopt, random));
  }
}
BENCHMARK(BM_ComputeBackoff)->ArgName("jitter")->Arg(0)->Arg(1)->Arg(2);  // none, full, proportional

void BM_ComputeBackoff_RetryAfter(benchmark::State& state) {
  keel::SeededRandom random(42);
  keel::BackoffPolicy policy;
  const std::optional<keel::Duration> retry_after = keel::Duration(5000);
  for (auto _ : state) {
    benchmark::DoNotOptimize(keel::ComputeBackoff(policy, 3, retry_after, random));
  }
}
BENCHMARK(BM_ComputeBackoff_RetryAfter);

// NewRunId with the production Random (a SeededRandom behind a mutex, shared by every
// thread of the process). Threads(2): the same on both cores, to show lock contention.
void BM_NewRunId(benchmark::State& state) {
  keel::Random& random = *keel::ProcessRandom();
  const keel::Timestamp t = keel::FromMillis(1'764'035'150'123);
  for (auto _ : state) {
    std::string id = keel::NewRunId(t, random);
    benchmark::DoNotOptimize(id);
  }
}
BENCHMARK(BM_NewRunId);
BENCHMARK(BM_NewRunId)->Threads(2)->UseRealTime();

// With the real clock read, as the submit handler does.
void BM_NewRunId_SystemClock(benchmark::State& state) {
  keel::Random& random = *keel::ProcessRandom();
  const keel::Clock& clock = *keel::SystemClock::Instance();
  for (auto _ : state) {
    std::string id = keel::NewRunId(clock.Now(), random);
    benchmark::DoNotOptimize(id);
  }
}
BENCHMARK(BM_NewRunId_SystemClock);

// A step output checked against its declared schema: required, properties, types,
// minLength, minimum and items, on a small valid object.
void BM_JsonSchema_Validate(benchmark::State& state) {
  auto schema = keel::JsonSchema::Compile(J(R"({
    "type": "object",
    "required": ["name", "age"],
    "properties": {
      "name": {"type": "string", "minLength": 1},
      "age": {"type": "integer", "minimum": 0},
      "tags": {"type": "array", "items": {"type": "string", "minLength": 1}}}})"));
  if (!schema.ok()) {
    state.SkipWithError(schema.error().message.c_str());
    return;
  }
  const value instance = J(R"({"name":"Ada","age":36,"tags":["a","b"]})");
  for (auto _ : state) {
    auto r = schema->Validate(instance);
    if (!r.ok()) {
      state.SkipWithError(r.error().message.c_str());
      break;
    }
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_JsonSchema_Validate);

}  // namespace

BENCHMARK_MAIN();
