#include <atomic>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <memory>

#include "keel/api/api_server.h"
#include "keel/obs/log.h"
#include "responses.h"

namespace keel::api {
namespace {

using net::HttpRequest;
using net::HttpResponse;

// A stream's bytes queued for a slow reader before the mock waits for them to drain.
constexpr std::size_t kMaxBufferedStream = 64 << 10;

class MockLlmServerImpl final : public MockLlmServer {
 public:
  explicit MockLlmServerImpl(const gateway::MockOptions& options)
      : mock_(options) {}
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

  // Stops the server: streams in flight end with their connections.
  void Stop() override {
    stopping_.store(true);
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

  // Waits (a timer) for the delay and the first byte, then writes the stream from the
  // connection's I/O thread, each stall a timer: a stream holds no thread.
  struct StreamState {
    std::shared_ptr<const gateway::MockDecision> d;
    net::Responder respond;
    std::shared_ptr<net::AsyncChunkedWriter> writer;
    std::size_t next = 0;
    boost::asio::steady_timer timer;
    StreamState(std::shared_ptr<const gateway::MockDecision> dd, net::Responder r)
        : d(std::move(dd)), respond(std::move(r)), timer(respond.executor()) {}
  };

  void Stream(std::shared_ptr<const gateway::MockDecision> d, net::Responder respond) {
    auto st = std::make_shared<StreamState>(std::move(d), std::move(respond));
    const auto wait = st->d->delay + st->d->first_byte;
    if (wait.count() <= 0) {
      boost::asio::dispatch(st->respond.executor(), [this, st] { WriteStream(st); });
      return;
    }
    st->timer.expires_after(wait);
    st->timer.async_wait([this, st](boost::system::error_code ec) {
      if (!ec) WriteStream(st);
    });
  }

  // On the connection's executor: the next events, until a stall, a full buffer or the end.
  void WriteStream(const std::shared_ptr<StreamState>& st) {
    if (stopping_.load()) return;  // the responder answers 500 when dropped
    const gateway::MockDecision& d = *st->d;
    if (!st->writer) {
      st->writer = st->respond.StartStreamAsync(d.status, std::string(gateway::kEventStreamType),
                                                {{"Cache-Control", "no-cache"}});
      if (st->writer == nullptr) return;  // the client is gone
    }
    while (st->next < d.events.size()) {
      if (st->writer->gone()) return;
      if (st->writer->buffered() > kMaxBufferedStream) {
        st->writer->OnDrained([this, st] { WriteStream(st); });
        return;
      }
      const std::size_t i = st->next++;
      if (i > 0 && d.stall.count() > 0) {
        --st->next;
        st->timer.expires_after(d.stall);
        st->timer.async_wait([this, st](boost::system::error_code ec) {
          if (ec || stopping_.load()) return;
          st->writer->Write(st->d->events[st->next++]);
          WriteStream(st);
        });
        return;
      }
      st->writer->Write(d.events[i]);
    }
    if (d.reset_at_end) {
      st->writer->Reset();
    } else {
      st->writer->Finish();
    }
  }

  gateway::MockLlm mock_;
  std::atomic<bool> stopping_{false};
  std::unique_ptr<net::HttpServer> server_;
};

}  // namespace

Result<std::unique_ptr<MockLlmServer>> MockLlmServer::Create(net::ServerOptions server,
                                                             const gateway::MockOptions& mock) {
  auto s = std::make_unique<MockLlmServerImpl>(mock);
  KEEL_RETURN_IF_ERROR(s->Listen(server));
  return std::unique_ptr<MockLlmServer>(std::move(s));
}

}  // namespace keel::api
