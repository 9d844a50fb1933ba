#pragma once
// The typed model of keel.yaml (docs/configuration.md), validated once at load: unknown
// keys, wrong types, out-of-range values and dangling references are refused with the
// line that holds them. Each field below states its default and range.

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "keel/core/backoff.h"
#include "keel/core/clock.h"
#include "keel/core/tls.h"
#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel {

struct RetryConfig {
  /// Attempts in all, the first included. Default: 3. Range: 1..100.
  int max_attempts = 3;
  BackoffPolicy backoff;
};

struct TimeoutConfig {
  /// TCP (and TLS) connect. Default: 2s.
  Duration connect{2000};
  /// The whole call. Default: 60s.
  Duration total{60000};
  /// Streaming: from the request to the first byte of the answer. Default: 20s.
  Duration first_byte{20000};
  /// Streaming: between two chunks of the answer. Default: 10s.
  Duration idle{10000};
  /// Streaming: from the request to the first chunk that carries part of the answer
  /// (content, a tool call, a refusal or a finish reason), not the headers nor a role-only
  /// chunk. Past it the attempt is abandoned as a timeout before anything reached the
  /// caller, and the call fails over (docs/gateway.md). 0: off. Default: 0 (off).
  Duration first_token{0};
};

struct LimitsConfig {
  /// Requests per minute (0: unlimited). Default: 0.
  int64_t rpm = 0;
  /// Tokens per minute, prompt and completion (0: unlimited). Default: 0.
  int64_t tpm = 0;
  /// Calls in flight at once (0: unlimited). Default: 0.
  int64_t max_concurrency = 0;
};

struct CostConfig {
  /// Price per million input (prompt) tokens. Default: 0.
  double input_per_mtok = 0;
  /// Price per million output (completion) tokens. Default: 0.
  double output_per_mtok = 0;
};

struct ProviderConfig {
  std::string name;
  /// "openai" (the chat-completions wire format), "anthropic" (the Messages API) or "mock"
  /// (the built-in fault-injecting mock, answered in-process).
  std::string type;
  /// For openai: e.g. "https://api.openai.com/v1". Required for openai. For anthropic:
  /// default "https://api.anthropic.com/v1".
  std::string base_url;
  /// Sent as "Authorization: Bearer ..." (openai) or "x-api-key: ..." (anthropic); never
  /// logged. Default: none.
  std::string api_key;
  /// The upstream model name. Default: the provider's name.
  std::string model;
  /// Tokens. Default: 128000. Range: >= 1.
  int64_t context_window = 128000;
  /// Whether context_window was configured (false: the default, a guess). A context_length
  /// error from a target whose window is a guess moves on to the next target whatever its
  /// window. Default: false.
  bool context_window_set = false;
  TimeoutConfig timeout;
  LimitsConfig limits;
  CostConfig cost;
  /// Active health checks: how often a provider whose circuit is not closed on some route
  /// is probed with a one-token call (0: off, only user traffic probes). Default: 0.
  Duration health_check_interval{0};
  /// Query parameters added to every request URL (Azure OpenAI: {api-version: ...}).
  std::map<std::string, std::string> query;
  /// Extra request headers (e.g. an Azure api-key). Values are never logged.
  std::map<std::string, std::string> headers;
  /// https:// base URLs: the CAs to trust and an optional client certificate
  /// (keel/core/tls.h). Default: the system's CA bundle, no client certificate.
  TlsSettings tls;
  int line = 0;
};

struct RouteTarget {
  std::string provider;
  /// Share of traffic under the weighted strategy. Default: 1. Range: 0..1000000.
  int weight = 1;
  /// Priority tier (1 first) under the priority strategy. Default: 1. Range: 1..100.
  int tier = 1;
};

struct BreakerConfig {
  double failure_rate = 0.5;      ///< Default: 0.5. Range: (0, 1].
  int min_requests = 20;          ///< Default: 20. Range: >= 1.
  Duration window{30000};         ///< Default: 30s.
  int consecutive_failures = 5;   ///< Default: 5 (0: off).
  Duration open_for{15000};       ///< Default: 15s.
};

struct RetryBudgetConfig {
  double ratio = 0.2;             ///< Retries per request. Default: 0.2. Range: 0..10.
  double min_per_second = 5;      ///< Floor. Default: 5.
};

/// A route's response cache (docs/gateway.md, "Response cache"): non-streamed chat
/// completions and embeddings, keyed by the route and the request body.
struct RouteCacheConfig {
  /// How long a stored answer is served as it is ("hit"). Required. Range: 1ms..365d.
  Duration ttl{0};
  /// After ttl, how much longer an answer may be served ("stale") when every attempt of a
  /// call failed with a class that fails over. Default: 0 (never). Range: 0..365d.
  Duration stale_if_error{0};
  /// Answers this node keeps in memory for the route; the least recently used goes first.
  /// Default: 10000. Range: 1..10000000.
  int64_t max_entries = 10000;
};

struct RouteConfig {
  std::string name;
  /// round_robin | weighted | latency | priority | least_busy. Default: priority.
  std::string strategy = "priority";
  std::vector<RouteTarget> targets;
  /// Attempts in all per call, failovers included. Default: 3. Range: 1..10.
  RetryConfig retry{3, BackoffPolicy{Duration(200), 2.0, Duration(5000), JitterMode::kProportional, 0.2}};
  RetryBudgetConfig retry_budget;
  BreakerConfig circuit_breaker;
  /// retry.same_target_retry_after_max: a 429 whose Retry-After is at most this (and fits
  /// the deadline) retries the same target after it instead of failing over. 0: a 429
  /// always fails over first. Default: 5s. Range: 0..1h.
  Duration same_target_retry_after_max{5000};
  /// retry.same_target_on_5xx: a server_error (500, 502, 504) retries the same target this
  /// many times in a row, after a backoff, before the call fails over. Default: 1.
  /// Range: 0..10.
  int same_target_on_5xx = 1;
  /// Distinct targets one call may try. Default: 3. Range: 1..10.
  int max_failover = 3;
  /// Bound on a call, retries included. Default: 120s.
  Duration timeout{120000};
  /// The response cache; absent: answers are not cached. Default: absent.
  std::optional<RouteCacheConfig> cache;
  int line = 0;
};

enum class StepKind { kLlm, kTransform, kHttp, kTask, kValidate, kChoice, kMap, kWaitForSignal, kSleep, kPipeline };
std::string_view StepKindName(StepKind kind);
std::optional<StepKind> StepKindFromName(std::string_view name);

struct StepConfig {
  std::string id;
  StepKind kind = StepKind::kTransform;
  /// The kind's body as JSON, templates unrendered (llm: {route, messages, ...}).
  json::value spec;
  /// The step's retry policy; default: the pipeline's.
  RetryConfig retry;
  /// Bound on one attempt of the step. Default: 60s.
  Duration timeout{60000};
  /// When the step fails for good: null (the run fails), {"output": V} (the step succeeds
  /// with V instead) or {"goto": ID} (the run goes on at step ID). Default: null.
  json::value on_error;
  /// The step after this one: empty for the next in the list, "end" to end the run.
  std::string next;
  int line = 0;
};

struct PipelineConfig {
  std::string name;
  std::string description;
  std::vector<StepConfig> steps;
  /// A JSON Schema the input must satisfy at submit; null: any input. Default: null.
  json::value input_schema;
  int line = 0;
};


struct ServerConfig {
  /// Largest request body accepted. Default: 1 MiB. Range: 1 KiB..64 MiB.
  std::size_t max_body_bytes = 1 << 20;
  /// Largest request body of the model endpoints (chat completions, embeddings): prompts
  /// with base64 images or documents. Default: 32 MiB. Range: 1 KiB..256 MiB.
  std::size_t max_model_body_bytes = 32 << 20;
  /// Open connections at most; more are refused. Default: 1024. Range: 1..65536.
  int max_connections = 1024;
  /// Threads that run request handlers (storage calls block them). Default: 64.
  int handler_threads = 64;
  /// Threads running the I/O loop: connections, and gateway calls to plain-HTTP
  /// providers. Default: 2. Range: 1..64.
  int io_threads = 2;
  /// An idle keep-alive connection is closed after this. Default: 60s.
  Duration idle_timeout{60000};
  /// Open connections from one client address at most (an IPv6 client: its /64); that
  /// address's further connections are answered 503 and closed, other clients' are not.
  /// Default: a quarter of max_connections (at least 1). Range: 1..65536.
  int max_connections_per_ip = 256;
  /// A connection must send a whole request header within this (counted from its accept,
  /// or from the first byte of a keep-alive connection's next request), or it is closed.
  /// Default: 10s. Range: >= 100ms.
  Duration header_timeout{10000};
};

struct HttpToolConfig {
  /// Hosts ("host" or "host:port") that `http` steps may call besides the ones their URLs
  /// name literally in the config. Default: none.
  std::vector<std::string> allow_hosts;
  /// The largest answer an `http` step reads (its body, in bytes); a larger one fails the
  /// step for good (invalid_output) without being kept. A step's own
  /// `max_response_bytes` overrides it. Default: 10 MiB. Range: 1 KiB..1 GiB.
  int64_t max_response_bytes = 10 << 20;
};

struct EngineConfig {
  /// Runs executed at once by this node. Default: 64. Range: 0..1024 (0: no workers).
  int workers = 64;
  /// How long a lease lasts without a heartbeat. Default: 30s. Range: >= 1s.
  Duration lease_timeout{30000};
  /// How often leases in flight are extended. Default: lease_timeout / 3.
  Duration heartbeat_interval{10000};
  /// Longest wait between two looks at the queue when idle. Default: 200ms.
  Duration poll_interval{200};
  /// Runs queued at most; a submit beyond answers 429. Default: 100000.
  int64_t max_queue_depth = 100000;
  /// On SIGTERM, how long steps in flight may go on before they are stopped and their
  /// runs handed back to the queue for another node. Default: 30s.
  Duration drain_timeout{30000};
  /// Attempts of one step cut short because their node was lost (its lease expired with
  /// the attempt in flight: a crash, a wedged worker) or drained. They do not count
  /// against the step's retry.max_attempts; when this many were lost, the run is
  /// dead-lettered with class worker_lost. Default: 3. Range: 1..100.
  int max_interrupted_attempts = 3;
  /// /readyz answers 503 when every worker has been inside one lease call or one step
  /// attempt for longer than this (all stalled or wedged). Default: 5m. Range: >= 1s.
  Duration stall_timeout{300000};
  /// The top-level `http` key: what `http` steps may call.
  HttpToolConfig http;
};

/// The `postgres` key: the connection pool of a node whose storage is postgres://.
struct PostgresConfig {
  /// Connections per node, opened on demand. Default: 16. Range: 1..1000.
  int pool_size = 16;
  /// Bound on opening one connection. Default: 5s. Range: >= 1s.
  Duration connect_timeout{5000};
  /// Bound on waiting for a free connection; past it the call answers 503. Default: 5s.
  Duration pool_timeout{5000};
  /// Server-side bound on one statement, lock waits included (0: none). Default: 30s.
  Duration statement_timeout{30000};
};

/// Where a Redis server is: the parts of redis://[[USER]:PASSWORD@]HOST[:PORT][/DB].
struct RedisAddress {
  std::string host;
  /// Default: 6379. Range: 1..65535.
  int port = 6379;
  /// Sent with AUTH (Redis 6 ACL user) when not empty. Default: none.
  std::string username;
  /// Sent with AUTH when not empty; never logged. Default: none.
  std::string password;
  /// Chosen with SELECT when not 0. Default: 0. Range: 0..65535.
  int db = 0;
};

/// The optional Redis that nodes share for rpm/tpm limits and route caches
/// (docs/gateway.md, "Redis").
struct RedisConfig {
  RedisAddress address;
  /// Bound on one command (and on connecting): the gateway waits this long at most, on
  /// its I/O threads, before it falls back to local limits and cache. Default: 50ms.
  /// Range: 1ms..10s.
  Duration timeout{50};
  /// Prepended to every key keel writes. Default: "keel:". Length: 0..128.
  std::string key_prefix = "keel:";
  /// After a failure, how long keel makes no Redis call at all (local limits and cache
  /// decide) before it tries again. Default: 1s. Range: 10ms..1h.
  Duration retry_interval{1000};
  /// Connections opened at most, so that concurrent callers do not wait for each other.
  /// Default: 8. Range: 1..256.
  int pool_size = 8;
};

struct Config {
  /// Default: 127.0.0.1:7420.
  std::string listen = "127.0.0.1:7420";
  /// "sqlite://PATH" (relative to the working directory) or a PostgreSQL URL
  /// "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?PARAM=VALUE...]" (libpq's).
  /// Default: sqlite://keel-data/keel.db
  std::string storage = "sqlite://keel-data/keel.db";
  PostgresConfig postgres;
  /// debug | info | warn | error. Default: info.
  std::string log_level = "info";
  ServerConfig server;
  EngineConfig engine;
  std::map<std::string, ProviderConfig> providers;
  std::map<std::string, RouteConfig> routes;
  std::map<std::string, PipelineConfig> pipelines;
  /// Absent: limits and caches are this node's own. Default: absent.
  std::optional<RedisConfig> redis;
};

/// Whether `name` may name a signal: 1 to 128 letters, digits, '_', '-' and '.'.
bool IsSignalName(std::string_view name);

/// The host ("host" or "host:port", lower-cased) of an http(s) URL; empty when it has none.
std::string UrlHost(std::string_view url);

/// `url` with its password (in the user info, or a `password=` parameter) replaced by
/// "***": what may appear in messages and logs.
std::string RedactUrl(std::string_view url);

/// Parses redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (user and password percent-decoded,
/// an IPv6 host in brackets). Error messages never repeat the URL (it may hold a password).
Result<RedisAddress> ParseRedisUrl(std::string_view url);

/// Looks up environment variables for ${NAME} interpolation; nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

/// Parses and validates a keel.yaml document. Errors read "line N: what is wrong".
/// `source` names the file in messages.
Result<Config> ParseConfig(std::string_view yaml, const EnvLookup& env,
                           std::string_view source = "keel.yaml");

/// Parses "250ms", "2s", "5m", "1h", "1d".
Result<Duration> ParseDuration(std::string_view text);

/// Parses a byte size: "1048576", "64KiB", "1MiB".
Result<std::size_t> ParseByteSize(std::string_view text);

}  // namespace keel
