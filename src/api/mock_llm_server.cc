#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "keel/api/api_server.h"
#include "keel/net/worker_pool.h"
#include "keel/obs/log.h"
#include "responses.h"

namespace keel::api {
namespace {

using net::HttpRequest;
using net::HttpResponse;

// Threads that write streamed answers: a stream's calls block, and a stalled stream
// sleeps between its events, so streams never run on an I/O thread.
constexpr int kStreamThreads = 32;
constexpr std::size_t kMaxQueuedStreams = 4096;

class MockLlmServerImpl final : public MockLlmServer {
 public:
  explicit MockLlmServerImpl(const gateway::MockOptions& options)
      : mock_(options), streams_(kStreamThreads, kMaxQueuedStreams) {}
  ~MockLlmServerImpl() override { Stop(); }

  Result<void> Listen(const net::ServerOptions& options) {
    auto server = net::HttpServer::Create(options, [this](HttpRequest&& req, net::Responder respond) {
      Handle(std::move(req), std::move(respond));
    });
    if (!server.ok()) return std::move(server).error();
    server_ = std::move(server).value();
    return Ok();
  }

  uint16_t port() const override { return server_->port(); }

  // Wakes stalled streams (they reset their connections) and lets the stream threads
  // finish while the I/O threads still run, then stops the server.
  void Stop() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    streams_.Stop();
    if (server_) server_->Stop();
  }

 private:
  // Runs on an I/O thread: nothing here blocks; delays are timers.
  void Handle(HttpRequest&& req, net::Responder respond) {
    if (req.path == "/mock/stats" && req.method == "GET") {
      respond(JsonResponse(200, mock_.Stats()));
      return;
    }
    if (req.path == "/mock/reset" && req.method == "POST") {
      mock_.Reset();
      respond(JsonResponse(200, json::object{{"status", "reset"}}));
      return;
    }
    if (req.path == "/healthz") {
      respond(JsonResponse(200, json::object{{"status", "ok"}}));
      return;
    }
    if (req.path == "/v1/models" && req.method == "GET") {
      respond(JsonResponse(200, json::object{{"object", "list"},
                                             {"data", json::array{json::object{{"id", "mock-1"}, {"object", "model"},
                                                                               {"owned_by", "keel-mock"}}}}}));
      return;
    }
    const bool chat = req.path == "/v1/chat/completions" && req.method == "POST";
    const bool messages = req.path == "/v1/messages" && req.method == "POST";
    const bool embeddings = req.path == "/v1/embeddings" && req.method == "POST";
    if (!chat && !messages && !embeddings) {
      respond(ErrorResponse(Error(ErrorCode::kNotFound,
                                  "the mock serves POST /v1/chat/completions, "
                                  "POST /v1/messages, POST /v1/embeddings, GET /v1/models, "
                                  "GET /mock/stats and POST /mock/reset")));
      return;
    }
    const auto now = std::chrono::steady_clock::now();
    auto d = chat         ? mock_.HandleChat(req.body, now)
             : embeddings ? mock_.HandleEmbeddings(req.body, now)
                          : mock_.HandleMessages(req.body, now);
    if (d.stream) {
      Stream(std::make_shared<gateway::MockDecision>(std::move(d)), std::move(respond));
      return;
    }
    HttpResponse r;
    r.status = d.status;
    r.body = d.body;
    if (d.retry_after_s > 0) r.headers.emplace_back("Retry-After", std::to_string(d.retry_after_s));
    using Kind = gateway::MockDecision::Kind;
    if (d.kind == Kind::kReset) r.reset_connection = true;
    if (d.kind == Kind::kHang) {
      r.status = 504;
      r.close = true;
      if (r.body.empty()) {
        r.body = R"({"error":{"message":"mock hang ended","type":"server_error","code":null}})";
      }
    }
    if (d.delay.count() <= 0) {
      respond(std::move(r));
      return;
    }
    server_->After(d.delay, [respond = std::move(respond), r = std::move(r)]() mutable { respond(std::move(r)); });
  }

  // Waits (a timer) for the delay and the first byte, then writes the stream on a
  // stream thread.
  void Stream(std::shared_ptr<const gateway::MockDecision> d, net::Responder respond) {
    const auto wait = d->delay + d->first_byte;
    auto start = [this, d, respond]() mutable {
      const bool queued = streams_.Submit([this, d, respond] { WriteStream(*d, respond); });
      if (!queued) {
        respond(ErrorResponse(
            Error(ErrorCode::kUnavailable, "the mock is writing too many streams"), 503));
      }
    };
    if (wait.count() <= 0) {
      start();
      return;
    }
    server_->After(wait, std::move(start));
  }

  // Runs on a stream thread: blocking and sleeping are fine here.
  void WriteStream(const gateway::MockDecision& d, const net::Responder& respond) {
    if (Stopping()) return;  // the responder answers 500 when dropped
    auto writer = respond.StartStream(d.status, std::string(gateway::kEventStreamType),
                                      {{"Cache-Control", "no-cache"}});
    if (writer == nullptr) return;  // the client is gone
    for (std::size_t i = 0; i < d.events.size(); ++i) {
      if (i > 0 && d.stall.count() > 0 && !Sleep(d.stall)) {
        writer->Reset();
        return;
      }
      if (!writer->Write(d.events[i])) return;
    }
    if (d.reset_at_end) {
      writer->Reset();
    } else {
      writer->Finish();
    }
  }

  bool Stopping() {
    std::lock_guard lock(mu_);
    return stopping_;
  }

  // Sleeps for `duration`; false when the server stops first.
  bool Sleep(std::chrono::milliseconds duration) {
    std::unique_lock lock(mu_);
    return !cv_.wait_for(lock, duration, [this] { return stopping_; });
  }

  gateway::MockLlm mock_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;  // GUARDED_BY(mu_)
  std::unique_ptr<net::HttpServer> server_;
  // Declared after server_ so that it is destroyed (joined) first.
  net::WorkerPool streams_;
};

}  // namespace

Result<std::unique_ptr<MockLlmServer>> MockLlmServer::Create(net::ServerOptions server,
                                                             const gateway::MockOptions& mock) {
  auto s = std::make_unique<MockLlmServerImpl>(mock);
  KEEL_RETURN_IF_ERROR(s->Listen(server));
  return std::unique_ptr<MockLlmServer>(std::move(s));
}

}  // namespace keel::api
