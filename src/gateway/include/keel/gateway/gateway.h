#pragma once
// The gateway: the one path for every model call, from the OpenAI-compatible endpoint and
// from pipelines' llm steps alike. A call names a route (a virtual model name); the route
// spreads calls over its targets (providers) by its strategy, through a resilience chain
// per target: a circuit breaker, rpm/tpm token buckets (charged with an estimate, then
// corrected with the usage the provider reports), and a concurrency limit. Failures are
// classified (keel/core/error.h): a class that fails over moves to the next target at
// once, a rate limit honours Retry-After, a context_length error moves to a target with a
// larger window, and any other class fails fast. Retries are bounded three ways: the
// route's max_attempts, its retry budget (a share of requests, so an outage does not
// become a retry storm), and the call's deadline, which includes the retries.
//
// A route with `cache` answers non-streamed chat completions and embeddings from its
// response cache when it can (a hit calls no provider), and serves an answer past its ttl
// ("stale") when every attempt failed with a class that fails over and the answer is
// within stale_if_error. With `redis` configured, rpm/tpm limits and route caches are
// shared by every node through Redis; while Redis is not usable each node decides with
// its own limits and cache, and no call fails for it (docs/gateway.md).
//
// Thread-safe. A Gateway outlives every call made through it.

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <functional>
#include <memory>
#include <prometheus/registry.h>
#include <string>
#include <vector>

#include "keel/core/cancel.h"
#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/random.h"
#include "keel/core/result.h"
#include "keel/core/timer.h"

namespace keel::gateway {

namespace detail {
class Provider;  // src/gateway/provider.h: private to keel_gateway, for tests' fakes
}  // namespace detail

/// How a call uses its route's response cache: the request directives of HTTP's
/// Cache-Control.
enum class CacheMode {
  kDefault,  // read, and store the answer
  kNoCache,  // do not read (no hit, no stale answer); store the answer
  kNoStore,  // neither read nor store
};

/// What the route's response cache did for a call.
enum class CacheStatus {
  kNone,    // the route has no cache
  kHit,     // answered from the cache, no provider called
  kMiss,    // a provider answered; the answer was stored
  kStale,   // every attempt failed over; an answer past its ttl was served
  kBypass,  // the cache was not used: a stream, or Cache-Control: no-store
};
/// "none", "hit", "miss", "stale", "bypass".
std::string_view CacheStatusName(CacheStatus status);

struct ChatRequest {
  std::string route;
  /// The OpenAI chat-completions body (messages, temperature, max_tokens, ...); `model`
  /// is set per target and `stream` is not supported here.
  json::object body;
  /// Passed to providers as the Idempotency-Key header. Default: none.
  std::string idempotency_key;
  /// Bound on the whole call, retries and failovers included; the route's timeout also
  /// bounds it. Default: 60s.
  Duration timeout{60000};
  /// Overrides the route's retry.max_attempts when > 0 (1..10).
  int max_attempts = 0;
  /// Fail over to targets not yet tried, but never call a tried target again: for callers
  /// that retry durably themselves (pipeline steps retry with backoff in the run queue,
  /// holding no worker). Default: false.
  bool failover_only = false;
  /// When set, the call stops (kCancelled): no further attempt starts, and a blocking
  /// provider call in flight is abandoned within a second. Must outlive the call.
  const std::atomic<bool>* cancelled = nullptr;
  /// When set and cancelled (a client that hung up, a run cancelled), the call stops at
  /// once (kCancelled): the provider call in flight is closed, no further attempt starts,
  /// and its concurrency slot is free. Default: none.
  std::shared_ptr<CancelSignal> cancel;
  /// Default: read and store (when the route has a cache).
  CacheMode cache = CacheMode::kDefault;
};

struct ChatResult {
  json::object response;  // the provider's chat.completion, as it answered
  std::string text;       // choices[0].message.content (its text parts joined when it is an
                          // array); empty when there is none (an answer of tool calls only)
  std::string model;      // the model that really answered (the response's `model`)
  std::string provider;   // the provider (target) that answered
  json::value usage;      // {prompt_tokens, completion_tokens, total_tokens}, or null
  double cost = 0;        // of this answer, by the provider's prices
  int attempts = 0;       // provider calls made, failed ones included
  int failovers = 0;      // times the call moved to another target
  Duration duration{0};
  Duration time_to_first_token{0};  // streamed calls: until the first chunk was passed on
  CacheStatus cache = CacheStatus::kNone;
  /// kHit, kStale: how long ago the answer was stored. The answer's provider, model and
  /// usage are those of the call that produced it; its cost is 0 (nothing was paid now).
  Duration cache_age{0};
};

struct RouteInfo {
  std::string name;
  std::string strategy;
  std::vector<std::string> providers;
};

/// What a gateway waits with and calls, when not its own: the seam for tests, which drive
/// the resilience loop on a ManualClock and ManualTimer with scripted providers.
struct GatewayDeps {
  /// Waits out backoffs, on every path; paired with the `clock` given to Create (a
  /// ManualTimer on the same ManualClock). ChatAsync dispatches the continuation to the
  /// call's executor, so `done` still runs there; a pending wait on an injected timer does
  /// not keep that executor's io_context running (run it again once the timer fired).
  /// Must outlive the gateway. Default: null, real time: ChatAsync waits on a timer of the
  /// call's executor, the blocking calls sleep on their thread (SystemTimer).
  Timer* timer = nullptr;
  /// Makes the provider of each configured provider, once, at Create; a null return (or
  /// no function) gives the built-in one of its `type`. Default: none.
  std::function<std::unique_ptr<detail::Provider>(const ProviderConfig&)> make_provider;
};

class Gateway {
 public:
  /// Builds providers and routes from a validated config. `registry`, `clock` and
  /// `random` must outlive the gateway; `deps` as GatewayDeps says (default: real time,
  /// built-in providers).
  static Result<std::unique_ptr<Gateway>> Create(const Config& config, prometheus::Registry& registry,
                                                 const Clock& clock, Random& random,
                                                 GatewayDeps deps = {});
  virtual ~Gateway() = default;

  /// Calls the route. Errors carry the class of the deciding failure: kNotFound for an
  /// unknown route, kContextLength when no target's window fits the prompt, kRateLimited
  /// (with retry_after) when every target is rate-limited, kOverloaded when every circuit
  /// is open, kTimeout when the deadline passed.
  virtual Result<ChatResult> Chat(const ChatRequest& request) = 0;

  using Callback = std::function<void(Result<ChatResult>)>;

  /// Chat without holding a thread: provider calls over plain HTTP and backoffs run on
  /// `executor`'s I/O threads, calls to providers that can only block (TLS, proxies, the
  /// built-in mock) on a pool of server.handler_threads threads. `done` runs on
  /// `executor`, exactly once.
  virtual void ChatAsync(ChatRequest request, const boost::asio::any_io_executor& executor, Callback done) = 0;

  /// Receives one chat.completion.chunk of a streamed answer; false: stop (the client is
  /// gone).
  using ChunkSink = std::function<bool(const json::object& chunk)>;

  /// Receives a streamed answer without blocking, with backpressure. Every call is made
  /// on the executor given to ChatStreamAsync.
  class StreamSink {
   public:
    virtual ~StreamSink() = default;
    /// One chat.completion.chunk; false: stop (the client is gone).
    virtual bool OnChunk(const json::object& chunk) = 0;
    /// True while the sink holds more than it allows: the call reads nothing more from
    /// the provider until the function given to WhenReady runs.
    virtual bool Full() const = 0;
    /// Runs `ready` once the sink takes chunks again (or its client is gone).
    virtual void WhenReady(std::function<void()> ready) = 0;
  };

  /// ChatStream without holding a thread: the provider's events are relayed to `sink` as
  /// they arrive, and a sink that is Full() holds the provider back (TCP flow control),
  /// so a slow client costs a bounded buffer. Same failover rules as ChatStream. `done`
  /// runs on `executor`, exactly once, after the last chunk.
  virtual void ChatStreamAsync(ChatRequest request, const boost::asio::any_io_executor& executor,
                               std::shared_ptr<StreamSink> sink, Callback done);

  /// Embeddings without holding a thread; `done` runs on `executor`, exactly once.
  virtual void EmbeddingsAsync(ChatRequest request, const boost::asio::any_io_executor& executor, Callback done);

  /// Calls the route with a streamed answer. Until the first chunk reaches `on_chunk`,
  /// failures fail over exactly as in Chat; after it, a failure ends the call with an
  /// error (the caller has already sent part of an answer and must end it with an error
  /// event, never silently). The usage chunk (choices: []) is passed on only when the
  /// body asked for it with stream_options.include_usage; the result always carries the
  /// usage when the provider reported it.
  virtual Result<ChatResult> ChatStream(const ChatRequest& request, const ChunkSink& on_chunk) = 0;

  /// Calls the route's targets for embeddings (`body`: the OpenAI /v1/embeddings request
  /// without model). The result's `response` is the OpenAI embeddings list. Same
  /// resilience chain as Chat.
  virtual Result<ChatResult> Embeddings(const ChatRequest& request) = 0;

  /// The routes, for GET /v1/models. A provider's name is also a route of one target.
  virtual std::vector<RouteInfo> Routes() const = 0;
};

/// Rough token estimate: one token per 4 bytes of message content (or embeddings input).
int64_t EstimatePromptTokens(const json::object& body);

}  // namespace keel::gateway
