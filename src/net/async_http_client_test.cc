#include "keel/net/async_http_client.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "keel/testing/assert.h"
#include "keel/testing/http.h"
#include "test_server.h"
#include "tls_test_server.h"

namespace keel::net {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;

// The proxy variables, cleared for a test and restored after it.
class ProxyEnv {
 public:
  ProxyEnv() {
    for (const char* name : kNames) {
      const char* v = std::getenv(name);
      saved_.emplace_back(name, v == nullptr ? std::optional<std::string>() : std::string(v));
      ::unsetenv(name);
    }
  }
  ~ProxyEnv() {
    for (const auto& [name, value] : saved_) {
      if (value) ::setenv(name, value->c_str(), 1);
      else ::unsetenv(name);
    }
  }
  void Set(const char* name, const std::string& value) { ::setenv(name, value.c_str(), 1); }

 private:
  static constexpr const char* kNames[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                                           "all_proxy",  "ALL_PROXY",  "no_proxy",    "NO_PROXY"};
  std::vector<std::pair<const char*, std::optional<std::string>>> saved_;
};

// Waits for `f` (bounded, so that a bug fails the test instead of hanging it).
template <class T>
T Get(std::future<T>& f, std::chrono::milliseconds within = std::chrono::seconds(20)) {
  if (f.wait_for(within) != std::future_status::ready) {
    ADD_FAILURE() << "no answer within " << within.count() << "ms";
    if constexpr (std::is_constructible_v<T, Error>) {
      return T(Error(ErrorCode::kInternal, "the test gave up waiting"));
    } else {
      return T{};
    }
  }
  return f.get();
}

// A stream's consumer that records what it is told. Callbacks may be customised.
class Recorder : public StreamConsumer {
 public:
  std::function<bool(int, const Headers&)> on_headers;
  std::function<bool(std::string_view, const std::shared_ptr<StreamControl>&)> on_data;
  std::thread::id io_thread;

  bool OnHeaders(int status, const Headers& headers) override {
    EXPECT_EQ(std::this_thread::get_id(), io_thread);
    {
      std::lock_guard lock(mu_);
      status_ = status;
    }
    return on_headers ? on_headers(status, headers) : true;
  }
  bool OnData(std::string_view data, const std::shared_ptr<StreamControl>& control) override {
    EXPECT_EQ(std::this_thread::get_id(), io_thread);
    {
      std::lock_guard lock(mu_);
      EXPECT_EQ(done_calls_, 0) << "OnData after OnDone";
      pieces_.emplace_back(data);
      body_bytes_ += data.size();
    }
    return on_data ? on_data(data, control) : true;
  }
  void OnDone(Result<int> result) override {
    EXPECT_EQ(std::this_thread::get_id(), io_thread);
    int calls = 0;
    {
      std::lock_guard lock(mu_);
      calls = ++done_calls_;
    }
    if (calls == 1) done_.set_value(std::move(result));
  }

  Result<int> Wait(std::chrono::milliseconds within = std::chrono::seconds(20)) { return Get(future_, within); }
  std::string body() const {
    std::lock_guard lock(mu_);
    std::string out;
    for (const auto& p : pieces_) out += p;
    return out;
  }
  std::size_t body_bytes() const {
    std::lock_guard lock(mu_);
    return body_bytes_;
  }
  std::size_t pieces() const {
    std::lock_guard lock(mu_);
    return pieces_.size();
  }
  int done_calls() const {
    std::lock_guard lock(mu_);
    return done_calls_;
  }

 private:
  mutable std::mutex mu_;
  int status_ = 0;
  std::vector<std::string> pieces_;
  std::size_t body_bytes_ = 0;
  int done_calls_ = 0;
  std::promise<Result<int>> done_;
  std::future<Result<int>> future_ = done_.get_future();
};

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
    SendHttpAsync(io_.get_executor(), std::move(r), [&, calls = 0](Result<ClientResponse> got) mutable {
      EXPECT_EQ(std::this_thread::get_id(), thread_.get_id());
      EXPECT_EQ(++calls, 1);
      p.set_value(std::move(got));
    });
    return Get(f);
  }

  // Starts a stream to `consumer` (not waiting).
  void Stream(ClientRequest r, StreamTimeouts timeouts, const std::shared_ptr<Recorder>& consumer) {
    consumer->io_thread = thread_.get_id();
    SendHttpStreamAsync(io_.get_executor(), std::move(r), timeouts, consumer);
  }

  // Returns once every handler queued on the I/O thread before it ran.
  void Drain() {
    std::promise<void> p;
    auto f = p.get_future();
    boost::asio::post(io_, [&] { p.set_value(); });
    f.wait();
  }

  int Idle() { return IdleConnections(io_.get_executor()); }

  static ClientRequest Request(std::string url, std::string method = "GET") {
    ClientRequest r;
    r.method = std::move(method);
    r.url = std::move(url);
    r.connect_timeout = milliseconds(2000);
    r.total_timeout = milliseconds(10000);
    return r;
  }
  static ClientRequest Trusting(ClientRequest r, std::string ca = TlsFile("ca.pem")) {
    r.tls.ca_file = std::move(ca);
    return r;
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

  ProxyEnv env_;  // first: cleared before, restored after everything else
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
  auto r = Send(Post("ftp://127.0.0.1/x", "{}"));
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

// ---- https:// --------------------------------------------------------------------------

// Answers "METHOD target body".
void TlsEcho(const TestRequest& req, TestConnection& conn) {
  conn.Respond(200, std::string(req.method_string()) + " " + std::string(req.target()) + " " + req.body());
}

bool Contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST_F(AsyncHttpClientTest, HttpsGetAndPostTrustingTheTestCaReuseOneConnection) {
  TlsTestServer server(TlsEcho);
  auto get = Send(Trusting(Request(server.Url("/v1/models"))));
  ASSERT_OK(get);
  EXPECT_EQ(get->status, 200);
  EXPECT_EQ(get->body, "GET /v1/models ");
  auto post_req = Trusting(Request(server.Url("/v1/chat?x=1"), "POST"));
  post_req.body = R"({"a":1})";
  auto post = Send(std::move(post_req));
  ASSERT_OK(post);
  EXPECT_EQ(post->status, 200);
  EXPECT_EQ(post->body, R"(POST /v1/chat?x=1 {"a":1})");
  // Keep-alive: one TCP connection, one handshake, back in the pool.
  EXPECT_EQ(server.accepted(), 1);
  EXPECT_EQ(server.handshakes(), 1);
  EXPECT_EQ(Idle(), 1);
}

TEST_F(AsyncHttpClientTest, HttpsTrustsTheSystemBundleByDefaultSoATestCertificateFails) {
  TlsTestServer server(TlsEcho);
  const std::string url = server.Url("/x");
  auto r = Send(Request(url));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "certificate verify failed")) << r.error().message;
  // The X509 reason: the test CA is in no system bundle.
  EXPECT_TRUE(Contains(r.error().message, "local issuer certificate")) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, url)) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "system's CA bundle")) << r.error().message;
  EXPECT_EQ(server.handshakes(), 0);
  EXPECT_EQ(server.requests(), 0);
}

TEST_F(AsyncHttpClientTest, HttpsTrustingAnotherCaFails) {
  TlsTestServer server(TlsEcho);
  auto r = Send(Trusting(Request(server.Url("/x")), TlsFile("self_signed.pem")));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "certificate verify failed")) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "self_signed.pem")) << r.error().message;
  EXPECT_EQ(server.requests(), 0);
}

TEST_F(AsyncHttpClientTest, HttpsTrustsASelfSignedCertificateNamedAsTheCaFile) {
  TlsTestServer server(TlsEcho, {.cert_file = TlsFile("self_signed.pem"), .key_file = TlsFile("self_signed.key")});
  auto r = Send(Trusting(Request(server.Url("/x")), TlsFile("self_signed.pem")));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  // The same server through the test CA's context is refused: contexts are per settings.
  auto other = Send(Trusting(Request(server.Url("/x"))));
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.error().code, ErrorCode::kNetwork);
}

TEST_F(AsyncHttpClientTest, HttpsCertificateForAnotherHostFails) {
  TlsTestServer server(TlsEcho, {.cert_file = TlsFile("wrong_host.pem"), .key_file = TlsFile("wrong_host.key")});
  const std::string url = server.Url("/x");
  auto r = Send(Trusting(Request(url)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, url)) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "IP address mismatch")) << r.error().message;
  auto by_name = Send(Trusting(Request("https://localhost:" + std::to_string(server.port()) + "/x")));
  ASSERT_FALSE(by_name.ok());
  EXPECT_TRUE(Contains(by_name.error().message, "hostname mismatch")) << by_name.error().message;
  EXPECT_EQ(server.requests(), 0);
}

TEST_F(AsyncHttpClientTest, HttpsByHostNameChecksTheName) {
  TlsTestServer server(TlsEcho);  // SAN DNS:localhost too
  auto r = Send(Trusting(Request("https://localhost:" + std::to_string(server.port()) + "/x")));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
}

TEST_F(AsyncHttpClientTest, AServerThatNeverAnswersTheHandshakeHitsTheConnectTimeout) {
  // Listening, never accepting: the kernel completes TCP, nobody speaks TLS or HTTP.
  boost::asio::io_context silent_io;
  boost::asio::ip::tcp::acceptor silent(silent_io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  const std::string port = std::to_string(silent.local_endpoint().port());
  auto req = Trusting(Request("https://127.0.0.1:" + port + "/x"));
  req.connect_timeout = milliseconds(200);
  const auto t0 = SteadyClock::now();
  auto r = Send(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "TLS handshake took over 200ms")) << r.error().message;
  EXPECT_LT(SteadyClock::now() - t0, milliseconds(3000));
  // The same as a proxy: no answer to CONNECT.
  env_.Set("https_proxy", "http://127.0.0.1:" + port);
  req.url = "https://127.0.0.1:1/x";
  auto proxied = Send(req);
  ASSERT_FALSE(proxied.ok());
  EXPECT_EQ(proxied.error().code, ErrorCode::kTimeout) << proxied.error().message;
  EXPECT_TRUE(Contains(proxied.error().message, "CONNECT")) << proxied.error().message;
  EXPECT_TRUE(Contains(proxied.error().message, "200ms")) << proxied.error().message;
}

TEST_F(AsyncHttpClientTest, ABodyEndedByTheServerClosingIsWhole) {
  TlsTestServer server(
      [](const TestRequest&, TestConnection& conn) {
        conn.Write("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end");
        conn.Close();
      },
      {.tls = false});
  auto r = Send(Request(server.Url("/x")));
  ASSERT_OK(r);
  EXPECT_EQ(r->body, "until the end");
  EXPECT_EQ(Idle(), 0);
}

TEST_F(AsyncHttpClientTest, HttpsWithAnUnreadableCaFileNamesTheSettingAndConnectsNowhere) {
  TlsTestServer server(TlsEcho);
  auto r = Send(Trusting(Request(server.Url("/x")), "/nonexistent/keel-ca.pem"));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.error().message, "tls.ca_file")) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "/nonexistent/keel-ca.pem")) << r.error().message;
  EXPECT_EQ(server.accepted(), 0);
}

TEST_F(AsyncHttpClientTest, MutualTlsWithoutAClientCertificateIsAuth) {
  TlsTestServer server(TlsEcho, {.require_client_cert = true});
  auto r = Send(Trusting(Request(server.Url("/x"))));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kAuth) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "tls.client_cert")) << r.error().message;
  EXPECT_EQ(server.requests(), 0);
}

TEST_F(AsyncHttpClientTest, MutualTlsWithTheClientCertificateIsServed) {
  TlsTestServer server(TlsEcho, {.require_client_cert = true});
  auto req = Trusting(Request(server.Url("/x")));
  req.tls.client_cert = TlsFile("client.pem");
  req.tls.client_key = TlsFile("client.key");
  auto r = Send(req);
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  ASSERT_OK(Send(req));
  EXPECT_EQ(server.handshakes(), 1);
}

TEST_F(AsyncHttpClientTest, MutualTlsWithAKeyOfAnotherCertificateNamesTheKey) {
  TlsTestServer server(TlsEcho, {.require_client_cert = true});
  auto req = Trusting(Request(server.Url("/x")));
  req.tls.client_cert = TlsFile("client.pem");
  req.tls.client_key = TlsFile("other.key");
  auto r = Send(req);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.error().message, "tls.client_key")) << r.error().message;
  EXPECT_EQ(server.accepted(), 0);
}

// ---- Proxies ---------------------------------------------------------------------------

TEST_F(AsyncHttpClientTest, HttpsThroughAProxyTunnelsWithConnect) {
  TlsTestServer server(TlsEcho);
  TestProxy proxy;
  env_.Set("https_proxy", proxy.Url());
  auto r = Send(Trusting(Request(server.Url("/v1"))));
  ASSERT_OK(r);
  EXPECT_EQ(r->body, "GET /v1 ");
  ASSERT_OK(Send(Trusting(Request(server.Url("/v2")))));
  // One tunnel, reused; TLS end to end through it.
  EXPECT_EQ(proxy.seen(), std::vector<std::string>{"CONNECT 127.0.0.1:" + std::to_string(server.port())});
  EXPECT_EQ(server.handshakes(), 1);
  EXPECT_EQ(Idle(), 1);
}

TEST_F(AsyncHttpClientTest, HttpThroughAProxySendsTheAbsoluteForm) {
  TestServer server(Echo);
  TestProxy proxy;
  env_.Set("http_proxy", proxy.Url());
  const std::string url = server.Url("/v1/chat?q=1");
  auto r = Send(Post(url, "{}"));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "POST " + url + " yes {}");  // the target the server got
  EXPECT_EQ(proxy.seen(), std::vector<std::string>{"POST " + url});
  EXPECT_EQ(proxy.authorizations(), std::vector<std::string>{""});
}

TEST_F(AsyncHttpClientTest, HttpThroughAProxyWithCredentialsSendsProxyAuthorization) {
  TestServer server(Echo);
  TestProxy proxy({.require_authorization = "Basic dXNlcjpwYTpzcw=="});  // user:pa:ss
  env_.Set("http_proxy", "http://user:pa%3Ass@127.0.0.1:" + std::to_string(proxy.port()));
  auto r = Send(Post(server.Url("/x"), "{}"));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
}

TEST_F(AsyncHttpClientTest, HttpsThroughAProxyWithCredentialsSendsProxyAuthorization) {
  TlsTestServer server(TlsEcho);
  TestProxy proxy({.require_authorization = "Basic dXNlcjpwYTpzcw=="});
  env_.Set("https_proxy", "http://user:pa%3Ass@127.0.0.1:" + std::to_string(proxy.port()));
  auto r = Send(Trusting(Request(server.Url("/x"))));
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
}

TEST_F(AsyncHttpClientTest, AProxyNamedWithoutASchemeIsUsed) {
  TlsTestServer server(TlsEcho);
  TestProxy proxy;
  TestServer plain(Echo);
  env_.Set("https_proxy", "localhost:" + std::to_string(proxy.port()));
  env_.Set("http_proxy", "127.0.0.1:" + std::to_string(proxy.port()));
  ASSERT_OK(Send(Trusting(Request(server.Url("/x")))));
  ASSERT_OK(Send(Post(plain.Url("/y"), "{}")));
  EXPECT_EQ(proxy.seen(), (std::vector<std::string>{"CONNECT 127.0.0.1:" + std::to_string(server.port()),
                                                    "POST " + plain.Url("/y")}));
}

TEST_F(AsyncHttpClientTest, NoProxyBypassesTheProxy) {
  TlsTestServer tls_server(TlsEcho);
  TestServer server(Echo);
  TestProxy proxy;
  env_.Set("http_proxy", proxy.Url());
  env_.Set("https_proxy", proxy.Url());
  env_.Set("no_proxy", "localhost,127.0.0.1");
  ASSERT_OK(Send(Post(server.Url("/x"), "{}")));
  ASSERT_OK(Send(Trusting(Request(tls_server.Url("/x")))));
  EXPECT_EQ(proxy.accepted(), 0);
  EXPECT_TRUE(proxy.seen().empty());
}

TEST_F(AsyncHttpClientTest, AProxyRefusingConnectIsANetworkErrorNamingTheProxyAndStatus) {
  TlsTestServer server(TlsEcho);
  TestProxy proxy({.refuse_connect = 403});
  env_.Set("https_proxy", proxy.Url());
  const std::string url = server.Url("/x");
  auto r = Send(Trusting(Request(url)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kNetwork) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "127.0.0.1:" + std::to_string(proxy.port()))) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "403")) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, url)) << r.error().message;
  EXPECT_EQ(server.accepted(), 0);
}

TEST_F(AsyncHttpClientTest, AProxyAskingForCredentialsIsAuthWithoutThePassword) {
  TlsTestServer server(TlsEcho);
  TestProxy proxy({.require_authorization = "Basic dXNlcjpwYTpzcw=="});
  env_.Set("https_proxy", "http://user:secret@127.0.0.1:" + std::to_string(proxy.port()));
  auto r = Send(Trusting(Request(server.Url("/x"))));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kAuth) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "407")) << r.error().message;
  EXPECT_FALSE(Contains(r.error().message, "secret")) << r.error().message;
  EXPECT_EQ(proxy.authorizations(), std::vector<std::string>{"Basic dXNlcjpzZWNyZXQ="});
}

class AsyncHttpProxyForTest : public ::testing::Test {
 protected:
  ProxyEnv env_;
};

TEST_F(AsyncHttpProxyForTest, NoVariablesMeansDirect) {
  EXPECT_EQ(ProxyFor("http://api.example.com/x"), "");
  EXPECT_EQ(ProxyFor("https://api.example.com/x"), "");
}

TEST_F(AsyncHttpProxyForTest, EachSchemeHasItsVariable) {
  env_.Set("https_proxy", "http://tls-proxy:3128");
  EXPECT_EQ(ProxyFor("https://api.example.com/x"), "http://tls-proxy:3128");
  EXPECT_EQ(ProxyFor("http://api.example.com/x"), "");
  env_.Set("http_proxy", "http://plain-proxy:3128");
  EXPECT_EQ(ProxyFor("http://api.example.com/x"), "http://plain-proxy:3128");
  EXPECT_EQ(ProxyFor("https://api.example.com/x"), "http://tls-proxy:3128");
}

TEST_F(AsyncHttpProxyForTest, UpperCaseHttpsProxyCountsButUpperCaseHttpProxyDoesNot) {
  env_.Set("HTTPS_PROXY", "http://tls-proxy:3128");
  EXPECT_EQ(ProxyFor("https://api.example.com/x"), "http://tls-proxy:3128");
  env_.Set("HTTP_PROXY", "http://cgi-injected:3128");
  EXPECT_EQ(ProxyFor("http://api.example.com/x"), "");
}

TEST_F(AsyncHttpProxyForTest, AllProxyServesBothSchemes) {
  env_.Set("all_proxy", "http://any:1");
  EXPECT_EQ(ProxyFor("http://a.example/x"), "http://any:1");
  EXPECT_EQ(ProxyFor("https://a.example/x"), "http://any:1");
  env_.Set("https_proxy", "http://tls:2");
  EXPECT_EQ(ProxyFor("https://a.example/x"), "http://tls:2");
}

TEST_F(AsyncHttpProxyForTest, NoProxyStarBypassesEverything) {
  env_.Set("https_proxy", "http://p:1");
  env_.Set("no_proxy", "*");
  EXPECT_EQ(ProxyFor("https://api.example.com/x"), "");
}

TEST_F(AsyncHttpProxyForTest, NoProxyDomainSuffixes) {
  env_.Set("https_proxy", "http://p:1");
  env_.Set("no_proxy", "internal, .example.com");
  EXPECT_EQ(ProxyFor("https://api.example.com/x"), "");
  EXPECT_EQ(ProxyFor("https://API.Example.COM/x"), "");
  EXPECT_EQ(ProxyFor("https://example.com/x"), "");
  EXPECT_EQ(ProxyFor("https://vllm.internal/x"), "");
  EXPECT_EQ(ProxyFor("https://notexample.com/x"), "http://p:1");
  EXPECT_EQ(ProxyFor("https://example.com.evil/x"), "http://p:1");
  EXPECT_EQ(ProxyFor("https://internal.evil/x"), "http://p:1");
}

TEST_F(AsyncHttpProxyForTest, NoProxyHostAndPortEntries) {
  env_.Set("http_proxy", "http://p:1");
  env_.Set("NO_PROXY", "127.0.0.1:8080,[::1]:9000,vllm:8000");
  EXPECT_EQ(ProxyFor("http://127.0.0.1:8080/x"), "");
  EXPECT_EQ(ProxyFor("http://127.0.0.1:9090/x"), "http://p:1");
  EXPECT_EQ(ProxyFor("http://[::1]:9000/x"), "");
  EXPECT_EQ(ProxyFor("http://[::1]:9001/x"), "http://p:1");
  EXPECT_EQ(ProxyFor("http://vllm:8000/x"), "");
  EXPECT_EQ(ProxyFor("http://vllm/x"), "http://p:1");  // port 80
}

TEST_F(AsyncHttpProxyForTest, LowerCaseNoProxyWins) {
  env_.Set("https_proxy", "http://p:1");
  env_.Set("NO_PROXY", "a.example");
  env_.Set("no_proxy", "b.example");
  EXPECT_EQ(ProxyFor("https://b.example/x"), "");
  EXPECT_EQ(ProxyFor("https://a.example/x"), "http://p:1");
}

TEST(AsyncHttpSupportsTest, HttpAndHttpsProxiedOrNot) {
  ProxyEnv env;
  EXPECT_TRUE(SupportsAsync("http://127.0.0.1:8080/v1/chat/completions"));
  EXPECT_TRUE(SupportsAsync("https://api.openai.com/v1/chat/completions"));
  env.Set("http_proxy", "http://proxy:3128");
  EXPECT_TRUE(SupportsAsync("http://127.0.0.1:8080/v1"));
  EXPECT_FALSE(SupportsAsync("ftp://127.0.0.1/v1"));
}

// ---- Streams, over plain HTTP and TLS --------------------------------------------------

class AsyncHttpStreamTest : public AsyncHttpClientTest, public ::testing::WithParamInterface<bool> {
 protected:
  bool tls() const { return GetParam(); }
  TlsTestServerOptions Options() const { return {.tls = tls()}; }
  ClientRequest StreamRequest(const TlsTestServer& server) const {
    auto r = Trusting(Request(server.Url("/v1/stream"), "POST"));
    r.body = "{}";
    return r;
  }
};

INSTANTIATE_TEST_SUITE_P(PlainAndTls, AsyncHttpStreamTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Tls" : "Plain"; });

TEST_P(AsyncHttpStreamTest, PiecesArriveAsTheyAreSent) {
  std::promise<void> first_seen;
  auto first_seen_f = first_seen.get_future();
  std::promise<bool> released;  // whether the server sent the rest after the client saw the first
  auto released_f = released.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();
        conn.Chunk("data: first\n\n");
        const bool seen = first_seen_f.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
        released.set_value(seen);
        conn.Chunk("data: second\n\n");
        conn.EndChunked();
      },
      Options());
  auto rec = std::make_shared<Recorder>();
  bool first = true;
  rec->on_data = [&](std::string_view data, const std::shared_ptr<StreamControl>&) {
    if (first) {
      first = false;
      EXPECT_EQ(data, "data: first\n\n");
      first_seen.set_value();
    }
    return true;
  };
  Stream(StreamRequest(server), {}, rec);
  auto r = rec->Wait();
  ASSERT_OK(r);
  EXPECT_EQ(*r, 200);
  EXPECT_TRUE(Get(released_f)) << "the client did not see the first piece before the last was sent";
  EXPECT_EQ(rec->body(), "data: first\n\ndata: second\n\n");
  EXPECT_GE(rec->pieces(), 2u);
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
  EXPECT_EQ(Idle(), 1);  // a whole stream hands its connection back
}

TEST_P(AsyncHttpStreamTest, NoFirstByteInTimeIsATimeout) {
  std::promise<bool> closed;
  auto closed_f = closed.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();  // headers, then nothing
        closed.set_value(conn.WaitClientClosed(std::chrono::seconds(10)));
      },
      Options());
  auto rec = std::make_shared<Recorder>();
  const auto t0 = SteadyClock::now();
  Stream(StreamRequest(server), {.first_byte = milliseconds(200), .idle = milliseconds(5000)}, rec);
  auto r = rec->Wait();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "no first byte")) << r.error().message;
  EXPECT_LT(SteadyClock::now() - t0, milliseconds(3000));
  EXPECT_TRUE(Get(closed_f)) << "the server did not see the connection closed";
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
  EXPECT_EQ(Idle(), 0);
}

TEST_P(AsyncHttpStreamTest, AStalledStreamIsATimeout) {
  std::promise<bool> closed;
  auto closed_f = closed.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();
        conn.Chunk("data: 1\n\n");
        closed.set_value(conn.WaitClientClosed(std::chrono::seconds(10)));
      },
      Options());
  auto rec = std::make_shared<Recorder>();
  const auto t0 = SteadyClock::now();
  Stream(StreamRequest(server), {.first_byte = milliseconds(5000), .idle = milliseconds(200)}, rec);
  auto r = rec->Wait();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_TRUE(Contains(r.error().message, "stalled")) << r.error().message;
  EXPECT_LT(SteadyClock::now() - t0, milliseconds(3000));
  EXPECT_EQ(rec->body(), "data: 1\n\n");
  EXPECT_TRUE(Get(closed_f));
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
}

TEST_P(AsyncHttpStreamTest, PauseHoldsTheUpstreamAndResumeContinues) {
  constexpr std::size_t kBlock = 64 << 10;
  constexpr int kBlocks = 512;  // 32 MiB: far more than the sockets' buffers hold
  std::promise<void> server_done;
  auto server_done_f = server_done.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();
        conn.Chunk("a");
        const std::string block(kBlock, 'x');
        for (int i = 0; i < kBlocks && conn.Chunk(block); ++i) {
        }
        conn.EndChunked();
        server_done.set_value();
      },
      Options());
  std::promise<std::shared_ptr<StreamControl>> paused;
  auto paused_f = paused.get_future();
  std::atomic<bool> resumed{false};
  std::atomic<int> calls_while_paused{0};
  bool first = true;
  auto rec = std::make_shared<Recorder>();
  rec->on_data = [&](std::string_view, const std::shared_ptr<StreamControl>& control) {
    if (first) {
      first = false;
      control->Pause();
      paused.set_value(control);
    } else if (!resumed) {
      ++calls_while_paused;
    }
    return true;
  };
  // The idle bound is shorter than the pause: it must not run while paused. The total
  // bound is far above what 32 MiB over TLS takes in a sanitizer build on a loaded machine.
  auto req = StreamRequest(server);
  req.total_timeout = std::chrono::seconds(120);
  Stream(std::move(req), {.first_byte = milliseconds(5000), .idle = milliseconds(300)}, rec);
  auto control = Get(paused_f);
  ASSERT_NE(control, nullptr);
  // Held: the server's writes do not complete while the client reads nothing.
  EXPECT_EQ(server_done_f.wait_for(milliseconds(400)), std::future_status::timeout);
  EXPECT_EQ(calls_while_paused.load(), 0);
  EXPECT_EQ(rec->done_calls(), 0);
  resumed = true;
  control->Resume();
  auto r = rec->Wait();
  ASSERT_OK(r);
  EXPECT_EQ(rec->body_bytes(), 1 + kBlock * kBlocks);
  EXPECT_EQ(server_done_f.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
}

TEST_P(AsyncHttpStreamTest, TheTotalTimeoutRunsWhilePaused) {
  std::promise<bool> closed;
  auto closed_f = closed.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();
        conn.Chunk("a");
        closed.set_value(conn.WaitClientClosed(std::chrono::seconds(10)));
      },
      Options());
  auto rec = std::make_shared<Recorder>();
  rec->on_data = [&](std::string_view, const std::shared_ptr<StreamControl>& control) {
    control->Pause();  // and never Resume
    return true;
  };
  auto req = StreamRequest(server);
  req.total_timeout = milliseconds(400);
  const auto t0 = SteadyClock::now();
  Stream(std::move(req), {.first_byte = milliseconds(5000), .idle = milliseconds(5000)}, rec);
  auto r = rec->Wait(std::chrono::seconds(5));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout) << r.error().message;
  EXPECT_LT(SteadyClock::now() - t0, milliseconds(3000));
  EXPECT_TRUE(Get(closed_f));
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
}

TEST_P(AsyncHttpStreamTest, AbortingFromOnDataIsCancelledAndClosesTheConnection) {
  std::promise<bool> closed;
  auto closed_f = closed.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();
        conn.Chunk("a");
        closed.set_value(conn.WaitClientClosed(std::chrono::seconds(10)));
      },
      Options());
  auto rec = std::make_shared<Recorder>();
  rec->on_data = [](std::string_view, const std::shared_ptr<StreamControl>&) { return false; };
  Stream(StreamRequest(server), {}, rec);
  auto r = rec->Wait();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCancelled) << r.error().message;
  EXPECT_TRUE(Get(closed_f));
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
  EXPECT_EQ(rec->pieces(), 1u);
  EXPECT_EQ(Idle(), 0);
}

TEST_P(AsyncHttpStreamTest, AbortingFromOnHeadersIsCancelled) {
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked(503);
        conn.WaitClientClosed(std::chrono::seconds(10));
      },
      Options());
  auto rec = std::make_shared<Recorder>();
  int status = 0;
  rec->on_headers = [&](int s, const Headers& headers) {
    status = s;
    EXPECT_EQ(FindHeader(headers, "transfer-encoding"), "chunked");
    return false;
  };
  Stream(StreamRequest(server), {}, rec);
  auto r = rec->Wait();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCancelled) << r.error().message;
  EXPECT_EQ(status, 503);
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
  EXPECT_EQ(rec->pieces(), 0u);
}

TEST_P(AsyncHttpStreamTest, CancelMidStreamIsCancelledPromptly) {
  std::promise<bool> closed;
  auto closed_f = closed.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        conn.StartChunked();
        conn.Chunk("a");
        closed.set_value(conn.WaitClientClosed(std::chrono::seconds(10)));
      },
      Options());
  std::promise<void> got;
  auto got_f = got.get_future();
  auto rec = std::make_shared<Recorder>();
  rec->on_data = [&](std::string_view, const std::shared_ptr<StreamControl>&) {
    got.set_value();
    return true;
  };
  auto req = StreamRequest(server);
  req.cancel = std::make_shared<CancelSignal>();
  auto cancel = req.cancel;
  Stream(std::move(req), {.first_byte = milliseconds(20000), .idle = milliseconds(20000)}, rec);
  Get(got_f);
  const auto t0 = SteadyClock::now();
  cancel->Cancel();
  auto r = rec->Wait();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCancelled) << r.error().message;
  EXPECT_LT(SteadyClock::now() - t0, milliseconds(2000));
  EXPECT_TRUE(Get(closed_f));
  Drain();
  EXPECT_EQ(rec->done_calls(), 1);
}

// ---- Cancellation and limits of whole answers ------------------------------------------

TEST_P(AsyncHttpStreamTest, CancelMidExchangeIsCancelledPromptlyAndClosesTheConnection) {
  std::promise<void> got_request;
  std::promise<bool> closed;
  auto closed_f = closed.get_future();
  TlsTestServer server(
      [&](const TestRequest&, TestConnection& conn) {
        got_request.set_value();
        closed.set_value(conn.WaitClientClosed(std::chrono::seconds(10)));
      },
      Options());
  auto req = Trusting(Request(server.Url("/slow")));
  req.total_timeout = milliseconds(30000);
  req.cancel = std::make_shared<CancelSignal>();
  auto cancel = req.cancel;
  std::promise<Result<ClientResponse>> p;
  auto f = p.get_future();
  SendHttpAsync(io_.get_executor(), std::move(req), [&](Result<ClientResponse> r) { p.set_value(std::move(r)); });
  auto got_f = got_request.get_future();
  Get(got_f);
  const auto t0 = SteadyClock::now();
  cancel->Cancel();
  auto r = Get(f);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCancelled) << r.error().message;
  EXPECT_LT(SteadyClock::now() - t0, milliseconds(2000));
  EXPECT_TRUE(Get(closed_f)) << "the server did not see the connection closed";
  EXPECT_EQ(Idle(), 0);
}

TEST_P(AsyncHttpStreamTest, CancelledBeforeTheStartSendsNothing) {
  TlsTestServer server(TlsEcho, Options());
  // A pooled connection first, so that a cancelled call could reuse it.
  ASSERT_OK(Send(Trusting(Request(server.Url("/warm")))));
  auto req = Trusting(Request(server.Url("/x")));
  req.cancel = std::make_shared<CancelSignal>();
  req.cancel->Cancel();
  auto r = Send(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCancelled) << r.error().message;
  auto rec = std::make_shared<Recorder>();
  Stream(req, {}, rec);
  auto s = rec->Wait();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, ErrorCode::kCancelled) << s.error().message;
  EXPECT_EQ(server.requests(), 1);
}

TEST_P(AsyncHttpStreamTest, AnAnswerPastMaxResponseBytesIsInvalidOutput) {
  TlsTestServer server(
      [&](const TestRequest& req, TestConnection& conn) {
        if (req.target() == "/chunked") {
          conn.StartChunked();
          for (int i = 0; i < 20 && conn.Chunk(std::string(100, 'c')); ++i) {
          }
          conn.EndChunked();
        } else {
          conn.Respond(200, std::string(2000, 'x'));
        }
      },
      Options());
  for (const char* target : {"/length", "/chunked"}) {
    auto req = Trusting(Request(server.Url(target)));
    req.max_response_bytes = 1000;
    auto r = Send(req);
    ASSERT_FALSE(r.ok()) << target;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidOutput) << r.error().message;
    EXPECT_TRUE(Contains(r.error().message, "answered more than 1000 bytes")) << r.error().message;
    EXPECT_EQ(Idle(), 0);
  }
  auto req = Trusting(Request(server.Url("/length")));
  req.max_response_bytes = 2000;  // at the bound: fine
  auto r = Send(req);
  ASSERT_OK(r);
  EXPECT_EQ(r->body.size(), 2000u);
}

TEST_P(AsyncHttpStreamTest, APooledConnectionTheServerDroppedIsReplacedOnce) {
  TlsTestServer server(
      [](const TestRequest&, TestConnection& conn) {
        conn.Respond(200, "once");  // keep-alive by its headers...
        conn.Close();               // ...but closed at once
      },
      Options());
  ASSERT_OK(Send(Trusting(Request(server.Url("/1")))));
  ASSERT_EQ(Idle(), 1);
  ASSERT_TRUE(server.Await([&] { return server.closed() == 1; }));
  auto r = Send(Trusting(Request(server.Url("/2"))));
  ASSERT_OK(r);
  EXPECT_EQ(r->body, "once");
  EXPECT_EQ(server.accepted(), 2);
  EXPECT_EQ(server.requests(), 2);
}

TEST_P(AsyncHttpStreamTest, ConcurrentCallsEachGetTheirAnswer) {
  std::atomic<int> in_flight{0};
  TlsTestServer server(
      [&](const TestRequest& req, TestConnection& conn) {
        ++in_flight;
        conn.Respond(200, std::string(req.target()));
      },
      Options());
  constexpr int kCalls = 16;
  std::vector<std::promise<Result<ClientResponse>>> answers(kCalls);
  for (int i = 0; i < kCalls; ++i) {
    SendHttpAsync(io_.get_executor(), Trusting(Request(server.Url("/" + std::to_string(i)))),
                  [&answers, i](Result<ClientResponse> r) { answers[i].set_value(std::move(r)); });
  }
  for (int i = 0; i < kCalls; ++i) {
    auto f = answers[i].get_future();
    auto r = Get(f);
    ASSERT_OK(r);
    EXPECT_EQ(r->body, "/" + std::to_string(i));
  }
  EXPECT_EQ(Idle(), server.accepted());
  EXPECT_LE(server.accepted(), kCalls);
}

TEST_P(AsyncHttpStreamTest, AHeadAnswerHasNoBodyWhateverItsContentLength) {
  TlsTestServer server(
      [&](const TestRequest& req, TestConnection& conn) {
        if (req.method() == boost::beast::http::verb::head) {
          conn.Write("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        } else {
          conn.Respond(200, "0123456789");
        }
      },
      Options());
  auto head = Trusting(Request(server.Url("/x"), "HEAD"));
  head.total_timeout = milliseconds(2000);
  auto r = Send(head);
  ASSERT_OK(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "");
  auto get = Send(Trusting(Request(server.Url("/x"))));
  ASSERT_OK(get);
  EXPECT_EQ(get->body, "0123456789");
  EXPECT_EQ(server.accepted(), 1);
}

}  // namespace
}  // namespace keel::net
