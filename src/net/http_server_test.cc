#include "keel/net/http_server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "keel/core/json.h"
#include "keel/net/async_http_client.h"
#include "keel/net/http_client.h"
#include "keel/testing/assert.h"
#include "keel/testing/http.h"
#include "keel/testing/raw_socket.h"
#include "test_server.h"

namespace keel::net {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;
using testing::RawSocket;

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
                                         {"segments", json::value_from(req.segments)},
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

TEST(HttpServerTest, DecodesEachSegmentAfterSplittingThePath) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  auto r = SendHttp(Get(server.Url("/runs//a%20b%2Fc/%C3%A9?q=x%26y")));
  ASSERT_OK(r);
  const auto body = ParseBody(*r);
  EXPECT_EQ(body.at("path"), json::value("/runs//a%20b%2Fc/%C3%A9"));  // as sent
  // %2F is inside its segment, not a separator; empty segments are dropped.
  EXPECT_EQ(body.at("segments"), (json::array{"runs", "a b/c", "\xc3\xa9"}));
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

int StatusOf(std::string_view response) {
  if (response.size() < 12 || response.substr(0, 5) != "HTTP/") return 0;
  return std::atoi(std::string(response.substr(9, 3)).c_str());
}

std::string BodyOf(std::string_view response) {
  const auto end = response.find("\r\n\r\n");
  return end == std::string_view::npos ? std::string() : std::string(response.substr(end + 4));
}

// Sends `request` on a new connection; the first response, and whether the server then
// closed the connection.
struct RawAnswer {
  std::string response;
  bool closed = false;
  std::string
      rest;  // anything after the first response (a second answer would be a smuggled request)
};
RawAnswer SendRaw(uint16_t port, std::string_view request) {
  RawSocket c(port);
  RawAnswer a;
  if (!c.connected() || !c.Send(request)) return a;
  a.response = c.ReadResponse();
  a.rest = c.ReadToEnd(&a.closed);
  return a;
}

// Counts requests by path; answers 200 with the echo.
struct CountingHandler {
  std::shared_ptr<std::mutex> mu = std::make_shared<std::mutex>();
  std::shared_ptr<std::vector<std::string>> paths = std::make_shared<std::vector<std::string>>();
  void operator()(HttpRequest&& req, Responder respond) const {
    {
      std::lock_guard lock(*mu);
      paths->push_back(req.path);
    }
    EchoHandler(std::move(req), std::move(respond));
  }
  std::vector<std::string> Seen() const {
    std::lock_guard lock(*mu);
    return *paths;
  }
};

TEST(HttpServerTest, AbsoluteFormTargetsAreRoutedByTheirPath) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  const std::string port = std::to_string(server->port());
  auto a = SendRaw(
      server->port(),
      "GET http://127.0.0.1:" + port +
          "/v1/runs/a%2Fb?limit=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  ASSERT_EQ(StatusOf(a.response), 200) << a.response;
  auto body = ParseJson(BodyOf(a.response));
  ASSERT_OK(body);
  EXPECT_EQ(body->at("path"), json::value("/v1/runs/a%2Fb"));
  EXPECT_EQ(body->at("segments"), (json::array{"v1", "runs", "a/b"}));
  EXPECT_EQ(body->at("query"), json::value("limit=2"));

  // No path at all is "/"; the scheme is case-insensitive.
  a = SendRaw(server->port(),
              "GET HTTP://localhost HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
  ASSERT_EQ(StatusOf(a.response), 200) << a.response;
  body = ParseJson(BodyOf(a.response));
  ASSERT_OK(body);
  EXPECT_EQ(body->at("path"), json::value("/"));
  EXPECT_EQ(body->at("segments"), json::array{});
}

TEST(HttpServerTest, TargetsThatAreNeitherPathsNorHttpUrlsAre400) {
  CountingHandler handler;
  TestServer server(handler);
  ASSERT_TRUE(server.ok());
  for (std::string target :
       {"healthz", "ftp://host/healthz", "http:///healthz", "/healthz#frag", "//", "/a\x80"}) {
    auto a = SendRaw(server->port(),
                     "GET " + target + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if (target == "//") {  // only empty segments: the root
      EXPECT_EQ(StatusOf(a.response), 200) << a.response;
      continue;
    }
    EXPECT_EQ(StatusOf(a.response), 400) << target << ": " << a.response;
    EXPECT_TRUE(a.closed) << target;
  }
  EXPECT_EQ(handler.Seen().size(), 1u);
}

TEST(HttpServerTest, MalformedOrControlEscapesInThePathAre400) {
  CountingHandler handler;
  TestServer server(handler);
  ASSERT_TRUE(server.ok());
  for (std::string path : {"/a%zz", "/a%", "/a%4", "/v1/runs/x%00", "/x%0D%0AInjected:%201",
                           "/x%FF", "/x%C0%AF", "/%ED%A0%80"}) {
    auto a = SendRaw(server->port(), "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(StatusOf(a.response), 400) << path << ": " << a.response;
    auto body = ParseJson(BodyOf(a.response));
    ASSERT_OK(body);
    EXPECT_EQ(body->at("error").at("type"), json::value("invalid_request"));
  }
  EXPECT_TRUE(handler.Seen().empty());
}

TEST(HttpServerTest, Http11WithoutHostIs400Http10WithoutHostIsServed) {
  CountingHandler handler;
  TestServer server(handler);
  ASSERT_TRUE(server.ok());
  auto a = SendRaw(server->port(), "GET /no-host HTTP/1.1\r\n\r\n");
  EXPECT_EQ(StatusOf(a.response), 400) << a.response;
  EXPECT_NE(a.response.find("Host"), std::string::npos) << a.response;
  EXPECT_TRUE(a.closed);
  a = SendRaw(server->port(), "GET /two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
  EXPECT_EQ(StatusOf(a.response), 400) << a.response;
  a = SendRaw(server->port(), "GET /http10 HTTP/1.0\r\n\r\n");
  EXPECT_EQ(StatusOf(a.response), 200) << a.response;
  a = SendRaw(server->port(), "GET /http11 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(StatusOf(a.response), 200) << a.response;
  EXPECT_EQ(handler.Seen(), (std::vector<std::string>{"/http10", "/http11"}));
}

TEST(HttpServerTest, TransferEncodingNotEndingInChunkedIs400AndClosesWithoutServingTheBody) {
  CountingHandler handler;
  TestServer server(handler);
  ASSERT_TRUE(server.ok());
  // The body is a whole second request: it must never be served.
  const std::string smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
  for (std::string te : {"gzip", "chunked, gzip", "gzip, chunked", "identity", "x-unknown",
                         "chunked, chunked", "", "chunked;x=1"}) {
    auto a = SendRaw(server->port(), "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te +
                                         "\r\n\r\n" + smuggled);
    EXPECT_EQ(StatusOf(a.response), 400) << "Transfer-Encoding: " << te << ": " << a.response;
    EXPECT_TRUE(a.closed) << te;
    EXPECT_EQ(a.rest, "") << te;
  }
  // Two Transfer-Encoding fields, the last one chunked; TE with Content-Length; TE on HTTP/1.0.
  for (std::string headers : {"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                              "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                              "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"}) {
    auto a = SendRaw(server->port(),
                     "POST /te HTTP/1.1\r\nHost: x\r\n" + headers + "\r\n0\r\n\r\n" + smuggled);
    EXPECT_EQ(StatusOf(a.response), 400) << headers << a.response;
    EXPECT_TRUE(a.closed);
  }
  auto a = SendRaw(server->port(),
                   "POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled);
  EXPECT_EQ(StatusOf(a.response), 400) << a.response;
  EXPECT_TRUE(handler.Seen().empty());

  // Plain chunked is still read as the body.
  a = SendRaw(
      server->port(),
      "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
      "3\r\nabc\r\n0\r\n\r\n");
  ASSERT_EQ(StatusOf(a.response), 200) << a.response;
  auto body = ParseJson(BodyOf(a.response));
  ASSERT_OK(body);
  EXPECT_EQ(body->at("body"), json::value("abc"));
  EXPECT_EQ(handler.Seen(), (std::vector<std::string>{"/chunked"}));
}

TEST(HttpServerTest, AConnectionThatSendsNoWholeHeaderIsClosedAfterTheHeaderTimeout) {
  ServerOptions options;
  options.header_timeout = milliseconds(100);  // idle_timeout stays 60s
  TestServer server(EchoHandler, options);
  ASSERT_TRUE(server.ok());
  {
    RawSocket silent(server->port());
    ASSERT_TRUE(silent.connected());
    bool closed = false;
    EXPECT_EQ(silent.ReadToEnd(&closed), "");
    EXPECT_TRUE(closed) << "a connection that sent nothing was kept past the header timeout";
  }
  {
    RawSocket partial(server->port());
    ASSERT_TRUE(partial.connected());
    ASSERT_TRUE(partial.Send("GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "));
    bool closed = false;
    partial.ReadToEnd(&closed);
    EXPECT_TRUE(closed) << "a header that never ended was waited for past the header timeout";
  }
  // A request in time is served.
  auto a = SendRaw(server->port(), "GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(StatusOf(a.response), 200) << a.response;
}

TEST(HttpServerTest, OneAddressCannotTakeEveryConnection) {
  ServerOptions options;
  options.max_connections = 8;  // max_connections_per_address 0: a quarter, 2
  TestServer server(EchoHandler, options);
  ASSERT_TRUE(server.ok());
  RawSocket first(server->port());
  RawSocket second(server->port());
  ASSERT_TRUE(first.connected() && second.connected());
  // The server accepts in arrival order: the third connection from 127.0.0.1 is over.
  RawSocket third(server->port());
  ASSERT_TRUE(third.connected());
  bool closed = false;
  const std::string refused = third.ReadToEnd(&closed);
  EXPECT_EQ(StatusOf(refused), 503) << refused;
  EXPECT_NE(refused.find("max_connections_per_ip is 2"), std::string::npos) << refused;
  EXPECT_TRUE(closed);

  // Another address is served (all of 127/8 is loopback on Linux).
  RawSocket other(server->port(), std::chrono::seconds(10), "127.0.0.2");
  ASSERT_TRUE(other.connected());
  ASSERT_TRUE(other.Send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
  const std::string ok = other.ReadResponse();
  EXPECT_EQ(StatusOf(ok), 200) << ok;
  auto body = ParseJson(BodyOf(ok));
  ASSERT_OK(body);
  EXPECT_EQ(std::string(body->at("remote").as_string()).substr(0, 10), "127.0.0.2:");

  // The held connections still work.
  ASSERT_TRUE(first.Send("GET /first HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_EQ(StatusOf(first.ReadResponse()), 200);
}

TEST(HttpServerTest, AnExplicitPerAddressBoundIsKept) {
  ServerOptions options;
  options.max_connections = 100;
  options.max_connections_per_address = 1;
  TestServer server(EchoHandler, options);
  ASSERT_TRUE(server.ok());
  RawSocket first(server->port());
  ASSERT_TRUE(first.connected());
  RawSocket second(server->port());
  ASSERT_TRUE(second.connected());
  const std::string refused = second.ReadToEnd();
  EXPECT_EQ(StatusOf(refused), 503) << refused;
  EXPECT_NE(refused.find("Retry-After: 1"), std::string::npos) << refused;
}

TEST(HttpServerTest, ErrorBodiesAreJsonWithoutSourcePaths) {
  TestServer server(EchoHandler);
  ASSERT_TRUE(server.ok());
  for (std::string request :
       {std::string("\xff\xfe GET / HTTP/1.1\r\n\r\n"),
        std::string("GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: v\r\n\r\n"),
        std::string("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
        std::string("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        std::string("GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
        std::string("GET /%zz\xc3 HTTP/1.1\r\nHost: x\r\n\r\n")}) {
    auto a = SendRaw(server->port(), request);
    const int status = StatusOf(a.response);
    EXPECT_GE(status, 400) << request << a.response;
    EXPECT_LT(status, 500) << request << a.response;
    const std::string body = BodyOf(a.response);
    auto parsed = ParseJson(body);  // the codec also checks UTF-8
    ASSERT_OK(parsed);
    EXPECT_TRUE(parsed->at("error").at("message").is_string());
    EXPECT_EQ(body.find("/usr/"), std::string::npos) << body;
    EXPECT_EQ(body.find(".hpp"), std::string::npos) << body;
  }
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

// ---- Non-blocking streamed answers and client-gone detection ----------------------------

// A raw loopback connection that reads up to a given terminator (chunked answers have no
// Content-Length). Reads are bounded by 10s; closes on destruction.
class StreamClient {
 public:
  explicit StreamClient(uint16_t port, int receive_buffer = 0) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (receive_buffer > 0) ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
    timeval tv{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  }
  ~StreamClient() { Close(); }
  bool connected() const { return connected_; }
  bool Send(std::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
  }
  // Everything up to and including `terminator` (the rest is kept for the next read); ""
  // on a timeout or a close first.
  std::string ReadUntil(std::string_view terminator) {
    for (;;) {
      if (const auto at = pending_.find(terminator); at != std::string::npos) {
        std::string out = pending_.substr(0, at + terminator.size());
        pending_.erase(0, at + terminator.size());
        return out;
      }
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return {};
      pending_.append(buf, static_cast<std::size_t>(n));
    }
  }
  // Reads and drops exactly `n` bytes: false on a timeout or a close first.
  bool Skip(std::size_t n) {
    const std::size_t from_pending = std::min(n, pending_.size());
    pending_.erase(0, from_pending);
    n -= from_pending;
    char buf[65536];
    while (n > 0) {
      const ssize_t got = ::recv(fd_, buf, std::min(n, sizeof buf), 0);
      if (got <= 0) return false;
      n -= static_cast<std::size_t>(got);
    }
    return true;
  }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string pending_;
};

constexpr std::string_view kGetStream = "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n";
constexpr std::string_view kGetNext = "GET /next HTTP/1.1\r\nHost: x\r\n\r\n";

HttpResponse Text(std::string body) {
  HttpResponse r;
  r.content_type = "text/plain";
  r.body = std::move(body);
  return r;
}

TEST(HttpServerStreamTest, StartStreamAsyncSendsChunksInOrderThenServesTheNextRequest) {
  TestServer server([](HttpRequest&& req, Responder respond) {
    if (req.path != "/stream") return respond(Text("next"));
    auto w = respond.StartStreamAsync(200, "text/event-stream", {{"X-Stream", "1"}});
    ASSERT_NE(w, nullptr);
    EXPECT_TRUE(w->Write("a"));
    EXPECT_TRUE(w->Write(""));  // nothing to send: no chunk (an empty one would end the body)
    // The rest from later turns of the connection's executor, as an upstream would feed it.
    boost::asio::post(respond.executor(), [w, ex = respond.executor()] {
      EXPECT_TRUE(w->Write("bb"));
      boost::asio::post(ex, [w] {
        EXPECT_TRUE(w->Write(std::string(300, 'c')));
        w->Finish();
        w->Finish();  // idempotent
        EXPECT_FALSE(w->Write("late"));
      });
    });
  });
  ASSERT_TRUE(server.ok());
  StreamClient c(server->port());
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.Send(kGetStream));
  const std::string head = c.ReadUntil("\r\n\r\n");
  EXPECT_EQ(StatusOf(head), 200) << head;
  EXPECT_NE(head.find("Transfer-Encoding: chunked"), std::string::npos) << head;
  EXPECT_NE(head.find("X-Stream: 1"), std::string::npos) << head;
  EXPECT_NE(head.find("Content-Type: text/event-stream"), std::string::npos) << head;
  const std::string body = c.ReadUntil("0\r\n\r\n");
  EXPECT_EQ(body, "1\r\na\r\n2\r\nbb\r\n12c\r\n" + std::string(300, 'c') + "\r\n0\r\n\r\n");
  // Keep-alive: the same connection serves the next request.
  ASSERT_TRUE(c.Send(kGetNext));
  const std::string next = c.ReadUntil("next");
  EXPECT_EQ(StatusOf(next), 200) << next;
  EXPECT_EQ(server->open_connections(), 1);
}

// Streams `total` bytes in `block`s, waiting for OnDrained whenever more than `allowed`
// bytes are queued: the handler's side of backpressure. Runs on the connection's executor.
struct Producer : std::enable_shared_from_this<Producer> {
  static constexpr std::size_t kBlock = 16 << 10;
  static constexpr std::size_t kAllowed = 64 << 10;
  static constexpr std::size_t kTotal = 16 << 20;
  std::shared_ptr<AsyncChunkedWriter> writer;
  std::atomic<std::size_t> produced{0};
  std::atomic<std::size_t> max_buffered{0};
  std::atomic<int> waits{0};
  std::atomic<bool> saw_gone{false};
  std::promise<void> first_wait;
  std::promise<bool> done;  // true: all sent; false: the client went away

  void Run() {
    const std::string block(kBlock, 'x');
    while (produced < kTotal) {
      if (!writer->Write(block)) {
        saw_gone = writer->gone();
        writer.reset();  // here, on the connection's executor: the writer holds the connection
        done.set_value(false);
        return;
      }
      produced += kBlock;
      max_buffered = std::max(max_buffered.load(), writer->buffered());
      if (writer->buffered() > kAllowed) {
        if (++waits == 1) first_wait.set_value();
        writer->OnDrained([self = shared_from_this()] { self->Run(); });
        return;
      }
    }
    writer->Finish();
    writer.reset();
    done.set_value(true);
  }
};

TEST(HttpServerStreamTest, ASlowReaderHoldsBackTheHandlerAndBufferingStaysBounded) {
  auto producer = std::make_shared<Producer>();
  TestServer server([producer](HttpRequest&&, Responder respond) {
    producer->writer = respond.StartStreamAsync(200, "application/octet-stream");
    ASSERT_NE(producer->writer, nullptr);
    producer->Run();
  });
  ASSERT_TRUE(server.ok());
  StreamClient c(server->port(), 32 << 10);  // a small window: the reader holds back soon
  ASSERT_TRUE(c.Send(kGetStream));
  auto first_wait = producer->first_wait.get_future();
  ASSERT_EQ(first_wait.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  // Reading nothing: the handler is held well before the end, its queue bounded.
  auto done = producer->done.get_future();
  EXPECT_EQ(done.wait_for(milliseconds(300)), std::future_status::timeout);
  EXPECT_LT(producer->produced.load(), Producer::kTotal / 2);
  // Now read it all: OnDrained lets the handler go on to the end.
  ASSERT_NE(c.ReadUntil("\r\n\r\n"), "");
  constexpr std::size_t kFrame = 4 + 2 + Producer::kBlock + 2;  // "4000\r\n" data "\r\n"
  ASSERT_TRUE(c.Skip(Producer::kTotal / Producer::kBlock * kFrame));
  EXPECT_EQ(c.ReadUntil("0\r\n\r\n"), "0\r\n\r\n");
  ASSERT_EQ(done.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(done.get());
  EXPECT_GT(producer->waits.load(), 1);
  EXPECT_LE(producer->max_buffered.load(), Producer::kAllowed + Producer::kBlock + 64);
}

TEST(HttpServerStreamTest, AClientGoneMidStreamWakesOnDrainedAndRefusesWrites) {
  auto producer = std::make_shared<Producer>();
  std::promise<void> gone;
  TestServer server([&, producer](HttpRequest&&, Responder respond) {
    respond.client_gone()->OnCancel([&] { gone.set_value(); });
    producer->writer = respond.StartStreamAsync(200, "application/octet-stream");
    ASSERT_NE(producer->writer, nullptr);
    producer->Run();
  });
  ASSERT_TRUE(server.ok());
  StreamClient c(server->port(), 32 << 10);
  ASSERT_TRUE(c.Send(kGetStream));
  auto first_wait = producer->first_wait.get_future();
  ASSERT_EQ(first_wait.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  c.Close();  // while the handler waits for OnDrained
  auto done = producer->done.get_future();
  ASSERT_EQ(done.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(done.get());
  EXPECT_EQ(gone.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(producer->saw_gone.load());
  ASSERT_TRUE(testing::Eventually([&] { return server->open_connections() == 0; }, std::chrono::seconds(10)));
}

TEST(HttpServerStreamTest, ClientGoneFiresWhenTheClientClosesBeforeTheAnswer) {
  std::promise<Responder> pending;
  std::promise<void> gone;
  TestServer server([&](HttpRequest&&, Responder respond) {
    respond.client_gone()->OnCancel([&] { gone.set_value(); });
    pending.set_value(respond);
  });
  ASSERT_TRUE(server.ok());
  StreamClient c(server->port());
  ASSERT_TRUE(c.Send(kGetStream));
  auto responder = pending.get_future();
  ASSERT_EQ(responder.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  Responder respond = responder.get();
  EXPECT_FALSE(respond.client_gone()->cancelled());
  c.Close();
  EXPECT_EQ(gone.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(respond.client_gone()->cancelled());
  // Too late for a stream too: no writer for a client gone.
  std::promise<bool> got_writer;
  boost::asio::post(respond.executor(), [&] { got_writer.set_value(respond.StartStreamAsync(200, "text/plain") != nullptr); });
  auto w = got_writer.get_future();
  ASSERT_EQ(w.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(w.get());
  respond(Text("too late"));  // ignored, harmless
}

TEST(HttpServerStreamTest, ClientGoneFiresWhenTheAsyncClientCancels) {
  std::promise<void> got;
  std::promise<void> gone;
  std::promise<Responder> keep;
  TestServer server([&](HttpRequest&&, Responder respond) {
    respond.client_gone()->OnCancel([&] { gone.set_value(); });
    keep.set_value(respond);
    got.set_value();
  });
  ASSERT_TRUE(server.ok());
  boost::asio::io_context io;
  auto cancel = std::make_shared<CancelSignal>();
  ClientRequest req = Get(server.Url("/slow"));
  req.total_timeout = std::chrono::seconds(30);
  req.cancel = cancel;
  std::promise<Result<ClientResponse>> answer;
  SendHttpAsync(io.get_executor(), std::move(req), [&](Result<ClientResponse> r) { answer.set_value(std::move(r)); });
  std::thread io_thread([&] { io.run(); });
  ASSERT_EQ(got.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  cancel->Cancel();
  auto r = answer.get_future();
  ASSERT_EQ(r.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(r.get().error().code, ErrorCode::kCancelled);
  EXPECT_EQ(gone.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  io_thread.join();
  keep.get_future().get()(Text("too late"));  // answered (and dropped) before the server goes
}

TEST(HttpServerStreamTest, ClientGoneDoesNotFireForAnsweredRequests) {
  std::mutex mu;
  std::vector<std::shared_ptr<CancelSignal>> signals;  // by request, as each handler saw it
  std::vector<Responder> responders;  // of /keep and /hold (a Responder holds its connection)
  std::promise<void> second;
  TestServer server([&](HttpRequest&& req, Responder respond) {
    {
      std::lock_guard lock(mu);
      signals.push_back(respond.client_gone());
      if (req.path == "/keep" || req.path == "/hold") responders.push_back(respond);
    }
    if (req.path == "/hold") return second.set_value();  // never answered
    respond(Text("answered"));
  });
  ASSERT_TRUE(server.ok());
  {
    // An answered request, then the client closes: nothing to cancel.
    StreamClient c(server->port());
    ASSERT_TRUE(c.Send(kGetNext));
    ASSERT_NE(c.ReadUntil("answered"), "");
    ASSERT_TRUE(c.Send(kGetNext));
    ASSERT_NE(c.ReadUntil("answered"), "");
  }
  ASSERT_TRUE(testing::Eventually([&] { return server->open_connections() == 0; }, std::chrono::seconds(10)));
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(signals.size(), 2u);
    EXPECT_FALSE(signals[0]->cancelled());
    EXPECT_FALSE(signals[1]->cancelled());
  }
  {
    // An answered request and a held one on one connection; the client leaves: only the
    // held one is cancelled, also through the first request's Responder.
    StreamClient c(server->port());
    ASSERT_TRUE(c.Send("GET /keep HTTP/1.1\r\nHost: x\r\n\r\n"));
    ASSERT_NE(c.ReadUntil("answered"), "");
    ASSERT_TRUE(c.Send("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"));
    ASSERT_EQ(second.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  }
  std::shared_ptr<CancelSignal> held;
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(signals.size(), 4u);
    held = signals[3];
  }
  std::promise<void> held_gone;
  held->OnCancel([&] { held_gone.set_value(); });
  ASSERT_EQ(held_gone.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  std::lock_guard lock(mu);
  EXPECT_FALSE(signals[2]->cancelled());
  ASSERT_EQ(responders.size(), 2u);
  EXPECT_FALSE(responders[0].client_gone()->cancelled());
  EXPECT_TRUE(responders[1].client_gone()->cancelled());
  responders.clear();
}

TEST(HttpServerStreamTest, PipelinedRequestsAreServedInOrderWhileTheFirstIsPending) {
  std::mutex mu;
  std::vector<std::string> paths;
  std::vector<std::shared_ptr<CancelSignal>> signals;
  std::promise<Responder> first;
  std::atomic<int> firsts{0};
  TestServer server([&](HttpRequest&& req, Responder respond) {
    {
      std::lock_guard lock(mu);
      paths.push_back(req.path);
      signals.push_back(respond.client_gone());
    }
    if (req.path == "/first") {
      ++firsts;
      return first.set_value(respond);  // answered later, from the test thread
    }
    respond(Text("answer " + req.path));
  });
  ASSERT_TRUE(server.ok());
  for (const bool together : {true, false}) {
    SCOPED_TRACE(together ? "sent together" : "second sent while the first is pending");
    first = std::promise<Responder>();
    {
      std::lock_guard lock(mu);
      paths.clear();
      signals.clear();
    }
    StreamClient c(server->port());
    const std::string a = "GET /first HTTP/1.1\r\nHost: x\r\n\r\n";
    const std::string b = "GET /second HTTP/1.1\r\nHost: x\r\n\r\n";
    ASSERT_TRUE(c.Send(together ? a + b : a));
    auto f = first.get_future();
    ASSERT_EQ(f.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    Responder respond = f.get();
    if (!together) {
      ASSERT_TRUE(c.Send(b));
    }
    // A pipelined request is no sign of a client gone.
    EXPECT_FALSE(respond.client_gone()->cancelled());
    respond(Text("answer /first"));
    const std::string one = c.ReadUntil("answer /first");
    const std::string two = c.ReadUntil("answer /second");
    EXPECT_EQ(StatusOf(one), 200) << one;
    EXPECT_EQ(StatusOf(two), 200) << two;
    std::lock_guard lock(mu);
    EXPECT_EQ(paths, (std::vector<std::string>{"/first", "/second"}));
    ASSERT_EQ(signals.size(), 2u);
    EXPECT_FALSE(signals[0]->cancelled());
  }
}

}  // namespace
}  // namespace keel::net
