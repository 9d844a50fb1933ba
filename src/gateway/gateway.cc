// GatewayImpl: the public Gateway (keel/gateway/gateway.h) as a thin driver of the parts
// that do the work, each private to keel_gateway:
//
//   gateway_metrics.h   every metric family, and the series per provider, route, target
//   route_table.h       providers, routes and targets as state; strategies and Order()
//   admission.h         whether a target takes a call: windows, limits, breakers
//   attempt_loop.h      the resilience loop: Begin, then Next (one Verdict per decision)
//   call_cache.h        what the response cache does for one call
//   health_prober.h     active health checks
//
// This file makes the provider calls and waits out the backoffs, blocking (Run) or not
// (Step, Attempt), on the injected Timer.

#include "keel/gateway/gateway.h"

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <condition_variable>
#include <mutex>

#include "admission.h"
#include "attempt_loop.h"
#include "executor_timer.h"
#include "gateway_metrics.h"
#include "health_prober.h"
#include "keel/net/worker_pool.h"
#include "provider.h"
#include "redis_client.h"
#include "route_table.h"
#include "shared_limits.h"

namespace keel::gateway {

std::string_view CacheStatusName(CacheStatus status) {
  switch (status) {
    case CacheStatus::kNone:
      return "none";
    case CacheStatus::kHit:
      return "hit";
    case CacheStatus::kMiss:
      return "miss";
    case CacheStatus::kStale:
      return "stale";
    case CacheStatus::kBypass:
      return "bypass";
  }
  return "none";
}

int64_t EstimatePromptTokens(const json::object& body) {
  int64_t bytes = 0;
  if (const auto* input = body.if_contains("input")) {
    if (input->is_string()) bytes += static_cast<int64_t>(input->get_string().size());
    if (input->is_array()) {
      for (const auto& v : input->get_array()) {
        bytes += v.is_string() ? static_cast<int64_t>(v.get_string().size())
                               : static_cast<int64_t>(json::serialize(v).size());
      }
    }
  }
  if (const auto* msgs = body.if_contains("messages"); msgs && msgs->is_array()) {
    for (const auto& m : msgs->get_array()) {
      if (!m.is_object()) continue;
      if (const auto* c = m.get_object().if_contains("content")) {
        bytes += c->is_string() ? static_cast<int64_t>(c->get_string().size())
                                : static_cast<int64_t>(json::serialize(*c).size());
      }
    }
  }
  return (bytes + 3) / 4;
}

namespace {

using detail::AttemptLoop;
using detail::Call;
using detail::MakesAttempt;
using detail::Provider;

// Whether the body asks for the usage chunk of a stream (stream_options.include_usage).
bool WantsUsage(const json::object& body) {
  const json::value* opts = body.if_contains("stream_options");
  const json::value* wants =
      opts && opts->is_object() ? opts->get_object().if_contains("include_usage") : nullptr;
  return wants && wants->is_bool() && wants->get_bool();
}

// The usage chunk of a stream: no choices.
bool UsageOnly(const json::object& chunk) {
  const auto* choices = chunk.if_contains("choices");
  return choices && choices->is_array() && choices->get_array().empty();
}

enum class Kind { kChat, kEmbed, kStream };

class GatewayImpl final : public Gateway {
 public:
  GatewayImpl(prometheus::Registry& registry, const Clock& clock, Random& random, GatewayDeps deps)
      : registry_(registry),
        clock_(clock),
        random_(random),
        deps_(std::move(deps)),
        metrics_(registry) {}

  ~GatewayImpl() override { stopping_.store(true); }

  Result<void> Init(const Config& config) {
    if (config.redis) {
      redis_ = detail::RedisClient::Create(*config.redis, registry_, clock_);
      shared_limits_ = std::make_unique<detail::SharedLimits>(*redis_);
    }
    auto table =
        detail::BuildRouteTable(config, metrics_, deps_.make_provider, redis_.get(), clock_.Now());
    if (!table.ok()) return std::move(table).error();
    table_ = std::move(table).value();
    admission_ = std::make_unique<detail::Admission>(clock_, random_, shared_limits_.get());
    loop_ = std::make_unique<AttemptLoop>(*table_, *admission_, metrics_, clock_, random_);
    bool blocking = false;
    for (const auto& [name, p] : table_->providers) blocking = blocking || !p->provider->async();
    if (blocking)
      blocking_ = std::make_unique<net::WorkerPool>(config.server.handler_threads, 10000);
    prober_ = std::make_unique<detail::HealthProber>(*table_, clock_);
    if (prober_->needed()) prober_->Start();
    return Ok();
  }

  std::vector<RouteInfo> Routes() const override {
    std::vector<RouteInfo> out;
    for (const auto& [name, r] : table_->routes) {
      RouteInfo info{name, std::string(detail::StrategyName(r->strategy)), {}};
      for (const auto& t : r->targets) info.providers.push_back(t->target.provider);
      out.push_back(std::move(info));
    }
    return out;
  }

  Result<ChatResult> Chat(const ChatRequest& req) override {
    return Run(req, Kind::kChat, nullptr);
  }

  Result<ChatResult> Embeddings(const ChatRequest& req) override {
    return Run(req, Kind::kEmbed, nullptr);
  }

  Result<ChatResult> ChatStream(const ChatRequest& req, const ChunkSink& on_chunk) override {
    return Run(req, Kind::kStream, &on_chunk);
  }

  void ChatAsync(ChatRequest req, const boost::asio::any_io_executor& executor,
                 Callback done) override {
    Start(std::make_shared<AsyncCall>(std::move(req), executor, std::move(done), Kind::kChat,
                                      nullptr));
  }

  void EmbeddingsAsync(ChatRequest req, const boost::asio::any_io_executor& executor,
                       Callback done) override {
    Start(std::make_shared<AsyncCall>(std::move(req), executor, std::move(done), Kind::kEmbed,
                                      nullptr));
  }

  void ChatStreamAsync(ChatRequest req, const boost::asio::any_io_executor& executor,
                       std::shared_ptr<StreamSink> sink, Callback done) override {
    Start(std::make_shared<AsyncCall>(std::move(req), executor, std::move(done), Kind::kStream,
                                      std::move(sink)));
  }

 private:
  struct AsyncCall {
    AsyncCall(ChatRequest r, boost::asio::any_io_executor e, Callback d, Kind k,
              std::shared_ptr<StreamSink> s)
        : req(std::move(r)),
          executor(std::move(e)),
          done(std::move(d)),
          kind(k),
          sink(std::move(s)),
          call(req, k == Kind::kStream, k == Kind::kEmbed) {}
    void Complete() {
      sink.reset();
      done(std::move(*call.result));
    }
    ChatRequest req;
    boost::asio::any_io_executor executor;
    Callback done;
    Kind kind;
    std::shared_ptr<StreamSink> sink;  // kStream: the caller's
    Call call;
  };

  // One call through the route, blocking. `sink`: a stream's, else null.
  Result<ChatResult> Run(const ChatRequest& req, Kind kind, const ChunkSink* sink) {
    Call c(req, kind == Kind::kStream, kind == Kind::kEmbed);
    if (loop_->Begin(c)) {
      while (MakesAttempt(loop_->Next(c))) {
        if (c.delay.count() > 0) {
          timer().Sleep(c.delay);
          if (AttemptLoop::Cancelled(req)) {
            loop_->Abandon(c);  // the next decision says so
            continue;
          }
        }
        loop_->OnResult(c, CallTarget(c, kind, sink));
      }
    }
    return std::move(*c.result);
  }

  // Makes the attempt Next chose, blocking.
  Result<ChatResult> CallTarget(Call& c, Kind kind, const ChunkSink* sink) {
    loop_->Prepare(c, timer());
    Provider& provider = *c.target->provider->provider;
    const ChatRequest& req = c.attempt_request();
    switch (kind) {
      case Kind::kChat:
        return provider.Chat(c.body, req, c.left);
      case Kind::kEmbed:
        return provider.Embed(c.body, req, c.left);
      case Kind::kStream:
        break;
    }
    const bool include_usage = WantsUsage(c.req.body);
    const AttemptLoop::ChunkOut out = [sink](const json::object& chunk) { return (*sink)(chunk); };
    auto r = provider.ChatStream(c.body, req, c.left, [&](const json::object& chunk) {
      if (UsageOnly(chunk) && !include_usage) return true;
      return loop_->Relay(c, chunk, out);
    });
    if (r.ok()) loop_->Flush(c, out);
    return r;
  }

  // The asynchronous loop: a backoff is a timer and a call holds no thread, unless the
  // provider can only block, in which case the call runs on the blocking pool.
  void Start(std::shared_ptr<AsyncCall> a) {
    if (!loop_->Begin(a->call)) return a->Complete();
    Step(std::move(a));
  }

  void Step(std::shared_ptr<AsyncCall> a) {
    Call& c = a->call;
    if (!MakesAttempt(loop_->Next(c))) return a->Complete();
    if (c.delay.count() > 0) return Wait(std::move(a));
    Attempt(std::move(a));
  }

  // Waits out the attempt's backoff on the timer, or until the request is cancelled, then
  // goes on on the call's executor.
  void Wait(std::shared_ptr<AsyncCall> a) {
    auto once = std::make_shared<std::atomic<bool>>(false);
    std::shared_ptr<CancelSignal> cancel = a->req.cancel;
    uint64_t handle = 0;
    if (cancel) {
      // Weak: the signal (which the call holds) must not keep the call alive; the pending
      // timer callback does.
      std::weak_ptr<AsyncCall> weak = a;
      handle = cancel->OnCancel([this, weak, once] {
        if (auto call = weak.lock()) Resume(std::move(call), *once);
      });
    }
    auto fired = [this, a, once, cancel, handle] {
      if (cancel) cancel->Remove(handle);
      Resume(a, *once);
    };
    if (deps_.timer != nullptr) {
      deps_.timer->After(a->call.delay, std::move(fired));
    } else {
      detail::ExecutorTimer(a->executor).After(a->call.delay, std::move(fired));
    }
  }

  // After a backoff (or a cancellation during it; whichever comes first, once): the
  // attempt, or the decision that the call was cancelled, on the call's executor.
  void Resume(std::shared_ptr<AsyncCall> a, std::atomic<bool>& once) {
    if (once.exchange(true)) return;
    boost::asio::dispatch(a->executor, [this, a] {
      if (AttemptLoop::Cancelled(a->req)) {
        loop_->Abandon(a->call);
        return Step(a);
      }
      Attempt(a);
    });
  }

  void Attempt(std::shared_ptr<AsyncCall> a) {
    Call& c = a->call;
    detail::ExecutorTimer executor_timer(a->executor);
    loop_->Prepare(c, deps_.timer != nullptr ? *deps_.timer : executor_timer);
    Provider& provider = *c.target->provider->provider;
    const ChatRequest& req = c.attempt_request();
    auto on_result = [this, a](Result<ChatResult> r) {
      if (r.ok() && a->kind == Kind::kStream) {
        loop_->Flush(a->call, [&a](const json::object& chunk) { return a->sink->OnChunk(chunk); });
      }
      loop_->OnResult(a->call, std::move(r));
      Step(a);
    };
    if (provider.async()) {
      switch (a->kind) {
        case Kind::kChat:
          return provider.ChatAsync(c.body, req, c.left, a->executor, std::move(on_result));
        case Kind::kEmbed:
          return provider.EmbedAsync(c.body, req, c.left, a->executor, std::move(on_result));
        case Kind::kStream:
          return provider.ChatStreamAsync(c.body, req, c.left, a->executor,
                                          std::make_shared<AttemptSink>(this, a),
                                          std::move(on_result));
      }
    }
    const bool queued =
        blocking_ && blocking_->Submit([this, &provider, &req, a, on_result]() mutable {
          Result<ChatResult> r = Error(ErrorCode::kInternal, "not called");
          switch (a->kind) {
            case Kind::kChat:
              r = provider.Chat(a->call.body, req, a->call.left);
              break;
            case Kind::kEmbed:
              r = provider.Embed(a->call.body, req, a->call.left);
              break;
            case Kind::kStream: {
              auto bridge = std::make_shared<StreamBridge>(std::make_shared<AttemptSink>(this, a),
                                                           a->executor, stopping_);
              r = provider.ChatStream(
                  a->call.body, req, a->call.left,
                  [&bridge](const json::object& chunk) { return bridge->Relay(chunk); });
              break;
            }
          }
          boost::asio::post(a->executor, [on_result = std::move(on_result),
                                          r = std::move(r)]() mutable { on_result(std::move(r)); });
        });
    if (!queued) {
      Error e(ErrorCode::kOverloaded,
              "keel is overloaded (too many blocking provider calls waiting); retry later");
      e.retry_after = Duration(1000);
      on_result(std::move(e));
    }
  }

  // The sink of one streamed attempt, on the call's executor: drops the usage chunk the
  // client did not ask for, marks the first chunk, and passes the rest to the caller's.
  class AttemptSink final : public StreamSink {
   public:
    AttemptSink(GatewayImpl* g, std::shared_ptr<AsyncCall> a)
        : g_(g), a_(std::move(a)), include_usage_(WantsUsage(a_->req.body)) {}
    bool OnChunk(const json::object& chunk) override {
      if (UsageOnly(chunk) && !include_usage_) return true;
      auto& sink = a_->sink;
      return g_->loop_->Relay(a_->call, chunk,
                              [&sink](const json::object& c) { return sink->OnChunk(c); });
    }
    bool Full() const override { return a_->sink->Full(); }
    void WhenReady(std::function<void()> ready) override { a_->sink->WhenReady(std::move(ready)); }

   private:
    GatewayImpl* g_;
    std::shared_ptr<AsyncCall> a_;
    const bool include_usage_;
  };

  // Relays the chunks of a blocking provider's stream, from a thread of the blocking pool,
  // to a sink on the call's executor: one chunk at a time, each handled before the next is
  // read, and none while the sink is full. Gives up (as a client gone) when the gateway is
  // being destroyed.
  class StreamBridge : public std::enable_shared_from_this<StreamBridge> {
   public:
    StreamBridge(std::shared_ptr<StreamSink> sink, boost::asio::any_io_executor executor,
                 const std::atomic<bool>& stopping)
        : sink_(std::move(sink)), executor_(std::move(executor)), stopping_(stopping) {}

    // On the pool thread: false when the sink is gone.
    bool Relay(const json::object& chunk) {
      {
        std::lock_guard lock(mu_);
        handled_ = false;
      }
      boost::asio::post(executor_, [self = shared_from_this(), chunk] {
        const bool ok = self->sink_->OnChunk(chunk);
        const bool full = ok && self->sink_->Full();
        {
          std::lock_guard lock(self->mu_);
          self->handled_ = true;
          self->gone_ = !ok;
          self->full_ = full;
        }
        self->cv_.notify_all();
        if (full) {
          self->sink_->WhenReady([self] {
            {
              std::lock_guard lock(self->mu_);
              self->full_ = false;
            }
            self->cv_.notify_all();
          });
        }
      });
      std::unique_lock lock(mu_);
      while (!(handled_ && !full_) && !gone_) {
        if (stopping_.load()) return false;
        cv_.wait_for(lock, std::chrono::milliseconds(100));
      }
      return !gone_;
    }

   private:
    std::shared_ptr<StreamSink> sink_;
    boost::asio::any_io_executor executor_;
    const std::atomic<bool>& stopping_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool handled_ = false;  // GUARDED_BY(mu_)
    bool full_ = false;     // GUARDED_BY(mu_)
    bool gone_ = false;     // GUARDED_BY(mu_)
  };

  // The blocking paths' timer: the injected one, or real time.
  Timer& timer() const { return deps_.timer != nullptr ? *deps_.timer : *SystemTimer::Instance(); }

  prometheus::Registry& registry_;
  const Clock& clock_;
  Random& random_;
  const GatewayDeps deps_;
  detail::GatewayMetrics metrics_;
  // With `redis` configured: the client, and the rpm/tpm buckets it keeps. Null without.
  std::unique_ptr<detail::RedisClient> redis_;
  std::unique_ptr<detail::SharedLimits> shared_limits_;
  std::unique_ptr<detail::RouteTable> table_;
  std::unique_ptr<detail::Admission> admission_;
  std::unique_ptr<AttemptLoop> loop_;
  std::unique_ptr<detail::HealthProber> prober_;  // stopped before the table goes
  std::atomic<bool> stopping_{false};             // set first thing in the destructor
  // Where the asynchronous paths run the calls of providers that can only block; none
  // when every provider is asynchronous. Stopped first.
  std::unique_ptr<net::WorkerPool> blocking_;
};

}  // namespace

Result<std::unique_ptr<Gateway>> Gateway::Create(const Config& config,
                                                 prometheus::Registry& registry, const Clock& clock,
                                                 Random& random, GatewayDeps deps) {
  auto g = std::make_unique<GatewayImpl>(registry, clock, random, std::move(deps));
  KEEL_RETURN_IF_ERROR(g->Init(config));
  return std::unique_ptr<Gateway>(std::move(g));
}

}  // namespace keel::gateway
