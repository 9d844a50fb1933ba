#include "keel/net/async_http_client.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <future>
#include <set>
#include <thread>

#include "keel/testing/assert.h"
#include "keel/testing/http.h"
#include "test_server.h"

namespace keel::net {
namespace {

using std::chrono::milliseconds;

// An I/O context on its own thread, as the server's I/O threads run the client.
class AsyncHttpClientTest : public ::testing::Test {
 protected:
  AsyncHttpClientTest() : guard_(boost::asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}
  ~AsyncHttpClientTest() override {
    guard_.reset();
    io_.stop();
    thread_.join();
  }

  // Sends and waits; checks that the callback ran on the I/O thread.
  Result<ClientResponse> Send(ClientRequest r) {
    std::promise<Result<ClientResponse>> p;
    auto f = p.get_future();
    SendHttpAsync(io_.get_executor(), std::move(r), [&](Result<ClientResponse> got) {
      EXPECT_EQ(std::this_thread::get_id(), thread_.get_id());
      p.set_value(std::move(got));
    });
    return f.get();
  }

  static ClientRequest Post(std::string url, std::string body) {
    ClientRequest r;
    r.method = "POST";
    r.url = std::move(url);
    r.body = std::move(body);
    r.headers = {{"Content-Type", "application/json"}, {"X-Test", "yes"}};
    r.connect_timeout = milliseconds(1000);
    r.total_timeout = milliseconds(5000);
    return r;
  }

  boost::asio::io_context io_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_;
  std::thread thread_;
};

// Answers with the request's method, target, header and body, and who sent it.
void Echo(HttpRequest&& req, Responder respond) {
  HttpResponse r;
  r.status = req.path == "/teapot" ? 418 : 200;
  r.content_type = "text/plain";
  r.headers.emplace_back("X-Remote", req.remote);
  r.body = req.method + " " + req.target + " " + std::string(req.Header("x-test")) + " " + req.body;
  respond(std::move(r));
}

TEST_F(AsyncHttpClientTest, SendsARequestAndReadsTheWholeAnswer) {
  TestServer server(Echo);
  ASSERT_TRUE(server.ok());
  auto r = Send(Post(server.Url("/v1/chat/completions?api-version=1"), R"({"a":1})"));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, R"(POST /v1/chat/completions?api-version=1 yes {"a":1})");
  EXPECT_EQ(r->Header("content-type"), "text/plain");
  // Header names are lower-cased, as the blocking client gives them.
  bool lower = false;
  for (const auto& [k, v] : r->headers) lower = lower || k == "x-remote";
  EXPECT_TRUE(lower);
}

TEST_F(AsyncHttpClientTest, AnyStatusIsAnAnswerNotAFailure) {
  TestServer server(Echo);
  auto r = Send(Post(server.Url("/teapot"), "{}"));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 418);
}

TEST_F(AsyncHttpClientTest, KeepsTheConnectionAliveAcrossRequests) {
  TestServer server(Echo);
  std::set<std::string> remotes;
  for (int i = 0; i < 5; ++i) {
    auto r = Send(Post(server.Url("/x"), "{}"));
    ASSERT_OK(r);
    remotes.insert(std::string(r->Header("x-remote")));
  }
  EXPECT_EQ(remotes.size(), 1u);
  EXPECT_EQ(IdleConnections(io_.get_executor()), 1);
  EXPECT_EQ(server->open_connections(), 1);
}

TEST_F(AsyncHttpClientTest, AConnectionTheServerClosesIsNotPooled) {
  TestServer server([](HttpRequest&&, Responder respond) {
    HttpResponse r;
    r.close = true;
    r.body = "bye";
    respond(std::move(r));
  });
  auto r = Send(Post(server.Url("/x"), "{}"));
  ASSERT_OK(r);
  EXPECT_EQ(r->body, "bye");
  EXPECT_EQ(IdleConnections(io_.get_executor()), 0);
}

TEST_F(AsyncHttpClientTest, APooledConnectionClosedWhileIdleIsReplacedOnce) {
  ServerOptions options;
  options.idle_timeout = milliseconds(50);
  TestServer server(Echo, options);
  auto first = Send(Post(server.Url("/x"), "{}"));
  ASSERT_OK(first);
  ASSERT_EQ(IdleConnections(io_.get_executor()), 1);
  // The server drops the idle connection; the client still holds it in its pool.
  ASSERT_TRUE(testing::Eventually([&] { return server->open_connections() == 0; }));
  auto second = Send(Post(server.Url("/x"), "{}"));
  ASSERT_OK(second);
  EXPECT_EQ(second->status, 200);
  EXPECT_NE(second->Header("x-remote"), first->Header("x-remote"));
}

TEST_F(AsyncHttpClientTest, AnAnswerLaterThanTheTotalTimeoutIsATimeout) {
  TestServer* self = nullptr;
  TestServer server([&self](HttpRequest&&, Responder respond) {
    (*self)->After(milliseconds(3000), [respond] { respond(HttpResponse{}); });
  });
  self = &server;
  auto req = Post(server.Url("/slow"), "{}");
  req.total_timeout = milliseconds(150);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = Send(std::move(req));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(2000));
  // The timed-out connection is not handed back to the pool.
  EXPECT_EQ(IdleConnections(io_.get_executor()), 0);
}

TEST_F(AsyncHttpClientTest, ARefusedConnectionIsANetworkError) {
  int port = 0;
  {
    TestServer server(Echo);
    port = server->port();
  }
  auto r = Send(Post("http://127.0.0.1:" + std::to_string(port) + "/x", "{}"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
  EXPECT_NE(r.error().message.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << r.error().message;
}

TEST_F(AsyncHttpClientTest, ANonHttpUrlIsRefusedWithoutAConnection) {
  auto r = Send(Post("https://example.invalid/x", "{}"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
}

TEST_F(AsyncHttpClientTest, RunsOnAStrandToo) {
  TestServer server(Echo);
  auto strand = boost::asio::make_strand(io_);
  std::promise<Result<ClientResponse>> p;
  SendHttpAsync(strand, Post(server.Url("/x"), "{}"), [&](Result<ClientResponse> r) {
    EXPECT_TRUE(strand.running_in_this_thread());
    p.set_value(std::move(r));
  });
  auto r = p.get_future().get();
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
}

TEST(SupportsAsyncTest, PlainHttpWithoutAProxyOnly) {
  EXPECT_TRUE(SupportsAsync("http://127.0.0.1:8080/v1/chat/completions"));
  EXPECT_FALSE(SupportsAsync("https://api.openai.com/v1/chat/completions"));
  ::setenv("http_proxy", "http://proxy:3128", 1);
  EXPECT_FALSE(SupportsAsync("http://127.0.0.1:8080/v1"));
  ::unsetenv("http_proxy");
  EXPECT_TRUE(SupportsAsync("http://127.0.0.1:8080/v1"));
}

}  // namespace
}  // namespace keel::net
