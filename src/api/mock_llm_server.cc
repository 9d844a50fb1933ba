#include <chrono>

#include "keel/api/api_server.h"
#include "keel/obs/log.h"
#include "responses.h"

namespace keel::api {
namespace {

using net::HttpRequest;
using net::HttpResponse;

class MockLlmServerImpl final : public MockLlmServer {
 public:
  explicit MockLlmServerImpl(const gateway::MockOptions& options) : mock_(options) {}
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
  void Stop() override {
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
    if (req.path != "/v1/chat/completions" || req.method != "POST") {
      respond(ErrorResponse(Error(ErrorCode::kNotFound, "the mock serves POST /v1/chat/completions, GET /v1/models, "
                                                        "GET /mock/stats and POST /mock/reset")));
      return;
    }
    const auto d = mock_.HandleChat(req.body, std::chrono::steady_clock::now());
    HttpResponse r;
    r.status = d.status;
    r.body = d.body;
    if (d.retry_after_s > 0) r.headers.emplace_back("Retry-After", std::to_string(d.retry_after_s));
    using Kind = gateway::MockDecision::Kind;
    if (d.kind == Kind::kReset) r.reset_connection = true;
    if (d.kind == Kind::kHang) {
      r.status = 504;
      r.close = true;
      r.body = R"({"error":{"message":"mock hang ended","type":"server_error","code":null}})";
    }
    if (d.delay.count() <= 0) {
      respond(std::move(r));
      return;
    }
    server_->After(d.delay, [respond = std::move(respond), r = std::move(r)]() mutable { respond(std::move(r)); });
  }

  gateway::MockLlm mock_;
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
