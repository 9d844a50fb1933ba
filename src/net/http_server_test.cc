#include "keel/net/http_server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "keel/core/json.h"
#include "keel/net/http_client.h"
#include "keel/testing/assert.h"
#include "test_server.h"

namespace keel::net {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;

ClientRequest Get(std::string url) {
  ClientRequest r;
  r.url = std::move(url);
  r.connect_timeout = milliseconds(1000);
  r.total_timeout = milliseconds(5000);
  return r;
}

ClientRequest Post(std::string url, std::string body) {
  ClientRequest r = Get(std::move(url));
  r.method = "POST";
  r.body = std::move(body);
  r.headers.emplace_back("Content-Type", "application/json");
  return r;
}

HttpResponse JsonResponse(int status, const json::value& body) {
  HttpResponse r;
  r.status = status;
  r.body = json::serialize(body);
  return r;
}

// Answers with what it received.
void EchoHandler(HttpRequest&& req, Responder respond) {
  respond(JsonResponse(200, json::object{{"method", req.method},
                                         {"target", req.target},
                                         {"path", req.path},
                                         {"query", req.query},
                                         {"body", req.body},
                                         {"remote", req.remote},
                                         {"content_type", req.Header("content-type")}}));
}

json::value ParseBody(const ClientResponse& r) {
  auto v = ParseJson(r.body);
  EXPECT_TRUE(v.ok()) << r.body;
  return v.ok() ? *v : json::value();
}

TEST(HttpServerTest, AnswersJson) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  EXPECT_NE(server->port(), 0);
  auto r = SendHttp(Post(server.Url("/v1/runs?limit=10"), R"({"pipeline":"echo"})"));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->Header("content-type"), "application/json");
  EXPECT_EQ(r->Header("Server"), "keel");
  const auto body = ParseBody(*r);
  EXPECT_EQ(body.at("method"), json::value("POST"));
  EXPECT_EQ(body.at("target"), json::value("/v1/runs?limit=10"));
  EXPECT_EQ(body.at("path"), json::value("/v1/runs"));
  EXPECT_EQ(body.at("query"), json::value("limit=10"));
  EXPECT_EQ(body.at("body"), json::value(R"({"pipeline":"echo"})"));
  EXPECT_EQ(body.at("content_type"), json::value("application/json"));
  EXPECT_EQ(std::string(body.at("remote").as_string()).substr(0, 10), "127.0.0.1:");
}

TEST(HttpServerTest, ResponseStatusAndHeadersArePassedThrough) {
  TestServer server([](HttpRequest&&, Responder respond) {
    HttpResponse r;
    r.status = 418;
    r.content_type = "text/plain";
    r.headers.emplace_back("X-Keel-Test", "yes");
    r.body = "teapot";
    respond(std::move(r));
  });
  ASSERT_TRUE(server.ok());
  auto r = SendHttp(Get(server.Url("/")));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 418);
  EXPECT_EQ(r->Header("content-type"), "text/plain");
  EXPECT_EQ(r->Header("x-keel-test"), "yes");
  EXPECT_EQ(r->body, "teapot");
}

TEST(HttpServerTest, DecodesThePath) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  auto r = SendHttp(Get(server.Url("/runs/a%20b%2Fc?q=x%26y")));
  ASSERT_OK(r);
  const auto body = ParseBody(*r);
  EXPECT_EQ(body.at("path"), json::value("/runs/a b/c"));
  EXPECT_EQ(body.at("query"), json::value("q=x%26y"));  // the raw query
}

TEST(HttpServerTest, KeepAliveServesManyRequestsOnOneConnection) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  std::set<std::string> remotes;
  for (int i = 0; i < 5; ++i) {
    auto r = SendHttp(Post(server.Url("/n"), std::to_string(i)));
    ASSERT_OK(r);
    ASSERT_EQ(r->status, 200) << i;
    const auto body = ParseBody(*r);
    EXPECT_EQ(body.at("body"), json::value(std::to_string(i)));
    remotes.insert(std::string(body.at("remote").as_string()));
  }
  // One client port for all five: the connection was reused.
  EXPECT_EQ(remotes.size(), 1u);
  EXPECT_EQ(server->open_connections(), 1);
}

TEST(HttpServerTest, BodyOverTheLimitGets413) {
  ServerOptions options;
  options.max_body_bytes = 1024;
  std::atomic<int> handled{0};
  TestServer server(
      [&](HttpRequest&& req, Responder respond) {
        ++handled;
        EchoHandler(std::move(req), std::move(respond));
      },
      options);
  ASSERT_TRUE(server.ok());

  auto at_limit = SendHttp(Post(server.Url("/"), std::string(1024, 'a')));
  ASSERT_OK(at_limit);
  EXPECT_EQ(at_limit->status, 200);
  EXPECT_EQ(handled.load(), 1);

  auto over = SendHttp(Post(server.Url("/"), std::string(1025, 'a')));
  ASSERT_OK(over);
  EXPECT_EQ(over->status, 413);
  EXPECT_EQ(over->Header("content-type"), "application/json");
  const auto body = ParseBody(*over);
  const json::value* type = FindPath(body, "error.type");
  ASSERT_NE(type, nullptr) << over->body;
  EXPECT_EQ(*type, json::value("payload_too_large"));
  const json::value* message = FindPath(body, "error.message");
  ASSERT_NE(message, nullptr);
  EXPECT_NE(std::string(message->as_string()).find("1024"), std::string::npos);
  EXPECT_EQ(handled.load(), 1) << "the handler saw the oversized request";
}

TEST(HttpServerTest, AnswersFromAnotherThreadWithoutBlockingTheIoLoop) {
  ServerOptions options;
  options.io_threads = 1;  // one loop: a blocked loop could not serve /fast
  std::promise<Responder> slow_responder;
  TestServer server(
      [&](HttpRequest&& req, Responder respond) {
        if (req.path == "/slow") {
          slow_responder.set_value(std::move(respond));
        } else {
          respond(JsonResponse(200, json::object{{"fast", true}}));
        }
      },
      options);
  ASSERT_TRUE(server.ok());

  auto slow = std::async(std::launch::async, [&] { return SendHttp(Get(server.Url("/slow"))); });
  auto responder_future = slow_responder.get_future();
  ASSERT_EQ(responder_future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  Responder respond = responder_future.get();

  // While /slow waits for its answer, the loop serves other connections.
  auto fast = SendHttp(Get(server.Url("/fast")));
  ASSERT_OK(fast);
  EXPECT_EQ(fast->status, 200);
  EXPECT_EQ(slow.wait_for(milliseconds(0)), std::future_status::timeout);

  // Answer /slow from this thread, which is not an I/O thread.
  respond(JsonResponse(201, json::object{{"from", "test thread"}}));
  respond(JsonResponse(500, json::object{}));  // a second call is ignored
  auto r = slow.get();
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 201);
  EXPECT_EQ(ParseBody(*r).at("from"), json::value("test thread"));
}

TEST(HttpServerTest, DroppedResponderAnswers500) {
  TestServer server([](HttpRequest&&, Responder) {});
  ASSERT_TRUE(server.ok());
  auto r = SendHttp(Get(server.Url("/")));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 500);
  const auto body = ParseBody(*r);
  const json::value* type = FindPath(body, "error.type");
  ASSERT_NE(type, nullptr);
  EXPECT_EQ(*type, json::value("internal"));
}

TEST(HttpServerTest, AfterDelaysTheAnswer) {
  std::atomic<bool> handler_returned_first{false};
  std::atomic<bool> answered{false};
  std::unique_ptr<HttpServer> server;
  auto created = HttpServer::Create(ServerOptions{}, [&](HttpRequest&&, Responder respond) {
    server->After(milliseconds(80), [&answered, respond = std::move(respond)]() mutable {
      answered = true;
      respond(JsonResponse(200, json::object{{"late", true}}));
    });
    handler_returned_first = !answered.load();
  });
  ASSERT_OK(created);
  server = std::move(created).value();

  const auto start = SteadyClock::now();
  auto r = SendHttp(Get("http://127.0.0.1:" + std::to_string(server->port()) + "/"));
  const auto elapsed = SteadyClock::now() - start;
  server->Stop();
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(ParseBody(*r).at("late"), json::value(true));
  EXPECT_GE(elapsed, milliseconds(80));
  EXPECT_TRUE(handler_returned_first.load());
}

TEST(HttpServerTest, ResetConnectionFailsTheClientWithNetwork) {
  TestServer server([](HttpRequest&&, Responder respond) {
    HttpResponse r;
    r.reset_connection = true;
    respond(std::move(r));
  });
  ASSERT_TRUE(server.ok());
  auto r = SendHttp(Get(server.Url("/")));
  ASSERT_FALSE(r.ok()) << "status " << r->status;
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
}

TEST(HttpServerTest, ClientTotalTimeoutGivesTimeout) {
  std::unique_ptr<HttpServer> server;
  auto created = HttpServer::Create(ServerOptions{}, [&server](HttpRequest&&, Responder respond) {
    server->After(std::chrono::seconds(10),
                  [respond = std::move(respond)] { respond(JsonResponse(200, json::object{})); });
  });
  ASSERT_OK(created);
  server = std::move(created).value();

  ClientRequest req = Get("http://127.0.0.1:" + std::to_string(server->port()) + "/");
  req.total_timeout = milliseconds(100);
  const auto start = SteadyClock::now();
  auto r = SendHttp(req);
  const auto elapsed = SteadyClock::now() - start;
  // The pending timer never fires: Stop() ends the loop first.
  server->Stop();
  ASSERT_FALSE(r.ok()) << "status " << r->status;
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_GE(elapsed, milliseconds(100));
  EXPECT_LT(elapsed, milliseconds(2000));
}

TEST(HttpServerTest, ZeroTotalTimeoutIsSpentNotUnlimited) {
  // A deadline already used up must time out at once, not wait without bound.
  std::unique_ptr<HttpServer> server;
  auto created = HttpServer::Create(ServerOptions{}, [&server](HttpRequest&&, Responder respond) {
    server->After(std::chrono::seconds(10),
                  [respond = std::move(respond)] { respond(JsonResponse(200, json::object{})); });
  });
  ASSERT_OK(created);
  server = std::move(created).value();

  ClientRequest req = Get("http://127.0.0.1:" + std::to_string(server->port()) + "/");
  req.total_timeout = milliseconds(0);
  const auto start = SteadyClock::now();
  auto r = SendHttp(req);
  const auto elapsed = SteadyClock::now() - start;
  server->Stop();
  ASSERT_FALSE(r.ok()) << "status " << r->status;
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_LT(elapsed, milliseconds(2000));
}

TEST(HttpServerTest, ClosedPortGivesNetwork) {
  uint16_t port = 0;
  {
    TestServer server(EchoHandler);
    ASSERT_TRUE(server.ok());
    port = server->port();
  }
  auto r = SendHttp(Get("http://127.0.0.1:" + std::to_string(port) + "/"));
  ASSERT_FALSE(r.ok()) << "status " << r->status;
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
}

TEST(HttpServerTest, CreateFailsOnABadAddress) {
  ServerOptions options;
  options.host = "not-an-address";
  auto bad = HttpServer::Create(options, EchoHandler);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("not-an-address"), std::string::npos);

  // A port in use cannot be bound twice.
  TestServer first(EchoHandler);
  ASSERT_TRUE(first.ok());
  ServerOptions same;
  same.port = first->port();
  auto second = HttpServer::Create(same, EchoHandler);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, ErrorCode::kUnavailable);
}

// A plain TCP connection that sends nothing; closed by the destructor.
class IdleConnection {
 public:
  explicit IdleConnection(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  }
  ~IdleConnection() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool connected() const { return connected_; }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

TEST(HttpServerTest, ConnectionsOverTheLimitGet503) {
  ServerOptions options;
  options.max_connections = 1;
  TestServer server(EchoHandler, options);
  ASSERT_TRUE(server.ok());
  // The first connection takes the only slot; the server accepts in arrival order.
  IdleConnection idle(server->port());
  ASSERT_TRUE(idle.connected());
  auto r = SendHttp(Get(server.Url("/")));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(r->Header("retry-after"), "1");
  const auto body = ParseBody(*r);
  const json::value* type = FindPath(body, "error.type");
  ASSERT_NE(type, nullptr) << r->body;
  EXPECT_EQ(*type, json::value("overloaded"));
}

TEST(HttpServerTest, StopIsIdempotent) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  ASSERT_OK(SendHttp(Get(server.Url("/"))));
  server->Stop();
  server->Stop();
  auto r = SendHttp(Get(server.Url("/")));
  EXPECT_FALSE(r.ok() && r->status == 200) << "answered after Stop()";
}

TEST(HttpRequestTest, QueryParamDecodesPercentEscapes) {
  HttpRequest req;
  req.query = "name=hello%20world&sum=a%2Bb&amp=x%26y&empty=&flag&utf=%C3%A9&n%61me2=v";
  EXPECT_EQ(req.QueryParam("name"), "hello world");
  EXPECT_EQ(req.QueryParam("sum"), "a+b");
  EXPECT_EQ(req.QueryParam("amp"), "x&y");
  EXPECT_EQ(req.QueryParam("utf"), "\xc3\xa9");
  EXPECT_EQ(req.QueryParam("name2"), "v");  // keys are decoded too
  EXPECT_EQ(req.QueryParam("empty"), "");
  EXPECT_EQ(req.QueryParam("missing"), "");
  EXPECT_TRUE(req.HasQueryParam("empty"));
  EXPECT_TRUE(req.HasQueryParam("flag"));
  EXPECT_TRUE(req.HasQueryParam("name"));
  EXPECT_FALSE(req.HasQueryParam("missing"));
  EXPECT_FALSE(req.HasQueryParam("nam"));
}

TEST(HttpRequestTest, QueryParamTakesTheFirstOfRepeatedKeys) {
  HttpRequest req;
  req.query = "a=1&a=2";
  EXPECT_EQ(req.QueryParam("a"), "1");
}

TEST(HttpRequestTest, QueryParamThroughTheServer) {
  TestServer server([](HttpRequest&& req, Responder respond) {
    respond(JsonResponse(200, json::object{{"cursor", req.QueryParam("cursor")},
                                           {"state", req.QueryParam("state")}}));
  });
  ASSERT_TRUE(server.ok());
  auto r = SendHttp(Get(server.Url("/v1/runs?state=dead%20letter&cursor=run_01%2F2")));
  ASSERT_OK(r);
  const auto body = ParseBody(*r);
  EXPECT_EQ(body.at("state"), json::value("dead letter"));
  EXPECT_EQ(body.at("cursor"), json::value("run_01/2"));
}

TEST(HttpHeadersTest, FindHeaderIgnoresCase) {
  const Headers headers{{"Content-Type", "text/plain"}, {"X-A", "1"}};
  EXPECT_EQ(FindHeader(headers, "content-type"), "text/plain");
  EXPECT_EQ(FindHeader(headers, "CONTENT-TYPE"), "text/plain");
  EXPECT_EQ(FindHeader(headers, "x-a"), "1");
  EXPECT_EQ(FindHeader(headers, "x-b"), "");
  EXPECT_EQ(FindHeader(headers, "X"), "");
}

}  // namespace
}  // namespace keel::net
