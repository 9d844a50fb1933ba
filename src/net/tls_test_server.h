#pragma once
// Test-only: a blocking HTTP/1.1 server (plain or TLS) and an HTTP proxy on 127.0.0.1 and
// an ephemeral port, a thread per connection, for the asynchronous client's tests. Their
// handlers may block (on a promise the test keeps), so a test can hold an exchange at a
// chosen point. Counters are atomics; Await() waits for a condition on them without
// polling. Both stop (shutting every connection down and joining its thread) in their
// destructors: a handler that blocks must be released (or time out) by then.

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

// GCC 12 at -O2 with -fsanitize reports Beast's parser (inlined here) as reading an
// uninitialised boost::optional: a false positive, silenced for the tests that include this.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/url/parse.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace keel::net {

#ifdef KEEL_NET_TESTDATA
/// A file of src/net/testdata/tls (README.md there says what each is).
inline std::string TlsFile(std::string_view name) {
  return std::string(KEEL_NET_TESTDATA) + "/tls/" + std::string(name);
}
#endif

namespace test_detail {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// Counters that tests wait on: every change is followed by Bump().
class Events {
 public:
  void Bump() {
    std::lock_guard lock(mu_);
    cv_.notify_all();
  }
  bool Await(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, pred);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

// Accepts on 127.0.0.1:0 and runs `serve` on a thread per connection. Stop() shuts every
// tracked socket down (so blocked reads end) and joins the threads.
class ThreadedAcceptor {
 public:
  using Serve = std::function<void(tcp::socket&)>;

  ThreadedAcceptor(Events& events, Serve serve) : events_(events), serve_(std::move(serve)), acceptor_(io_) {
    const tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), 0);
    acceptor_.open(ep.protocol());
    acceptor_.set_option(asio::socket_base::reuse_address(true));
    acceptor_.bind(ep);
    acceptor_.listen();
    port_ = acceptor_.local_endpoint().port();
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~ThreadedAcceptor() { Stop(); }

  void Stop() {
    {
      std::lock_guard lock(mu_);
      if (stopped_) return;
      stopped_ = true;
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    ::shutdown(acceptor_.native_handle(), SHUT_RDWR);
    accept_thread_.join();
    std::vector<std::thread> threads;
    {
      std::lock_guard lock(mu_);
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
  }

  uint16_t port() const { return port_; }
  int accepted() const { return accepted_.load(); }
  int closed() const { return closed_.load(); }
  bool stopping() {
    std::lock_guard lock(mu_);
    return stopped_;
  }

  // Another socket (a proxy's upstream) to shut down on Stop(). False when stopping.
  bool Track(int fd) {
    std::lock_guard lock(mu_);
    if (stopped_) return false;
    fds_.insert(fd);
    return true;
  }
  void Untrack(int fd) {
    std::lock_guard lock(mu_);
    fds_.erase(fd);
  }

 private:
  void AcceptLoop() {
    for (;;) {
      beast::error_code ec;
      tcp::socket s(io_);
      acceptor_.accept(s, ec);
      std::lock_guard lock(mu_);
      if (stopped_) return;
      if (ec) continue;
      fds_.insert(s.native_handle());
      ++accepted_;
      threads_.emplace_back([this, s = std::move(s)]() mutable {
        const int fd = s.native_handle();
        serve_(s);
        Untrack(fd);
        beast::error_code ignored;
        s.close(ignored);
        ++closed_;
        events_.Bump();
      });
      events_.Bump();
    }
  }

  Events& events_;
  Serve serve_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  uint16_t port_ = 0;
  std::thread accept_thread_;
  std::mutex mu_;
  bool stopped_ = false;           // GUARDED_BY(mu_)
  std::set<int> fds_;              // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;  // GUARDED_BY(mu_)
  std::atomic<int> accepted_{0};
  std::atomic<int> closed_{0};
};

inline bool SendAll(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// Until `from` ends: copies its bytes to `to`, then ends `to`'s sending side.
inline void Pipe(int from, int to) {
  char buf[16384];
  for (;;) {
    const ssize_t n = ::recv(from, buf, sizeof buf, 0);
    if (n <= 0 || !SendAll(to, std::string_view(buf, static_cast<std::size_t>(n)))) break;
  }
  ::shutdown(to, SHUT_WR);
}

}  // namespace test_detail

/// One request's side of a connection of TlsTestServer, for its handler. The handler
/// answers with Respond, or StartChunked + Chunk... + EndChunked; writes block until the
/// bytes are in the socket (so a client that stops reading holds them).
class TestConnection {
 public:
  TestConnection(std::function<bool(std::string_view)> write, int fd) : write_(std::move(write)), fd_(fd) {}

  bool Write(std::string_view bytes) {
    if (!write_(bytes)) {
      keep_alive_ = false;
      return false;
    }
    written_ += bytes.size();
    return true;
  }
  bool Respond(int status, std::string_view body, std::string_view content_type = "text/plain",
               bool close = false) {
    std::string head = "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: " + std::string(content_type) +
                       "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
    if (close) head += "Connection: close\r\n";
    head += "\r\n";
    if (close) keep_alive_ = false;
    return Write(head + std::string(body));
  }
  bool StartChunked(int status = 200, std::string_view content_type = "text/event-stream") {
    return Write("HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: " + std::string(content_type) +
                 "\r\nTransfer-Encoding: chunked\r\n\r\n");
  }
  bool Chunk(std::string_view data) {
    char size[20];
    std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    return Write(std::string(size) + std::string(data) + "\r\n");
  }
  bool EndChunked() { return Write("0\r\n\r\n"); }
  /// Ends the connection after this handler returns (without an answer, if none was sent).
  void Close() { keep_alive_ = false; }
  /// Waits until the client ended (or reset) its side of the connection: true, or false
  /// after `timeout`.
  bool WaitClientClosed(std::chrono::milliseconds timeout) {
    pollfd p{fd_, POLLRDHUP, 0};
    const int n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    keep_alive_ = false;
    return n == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
  }
  bool keep_alive() const { return keep_alive_; }
  std::size_t written() const { return written_; }

 private:
  std::function<bool(std::string_view)> write_;
  int fd_;
  bool keep_alive_ = true;
  std::size_t written_ = 0;
};

using TestRequest = boost::beast::http::request<boost::beast::http::string_body>;
/// Runs on the connection's thread; may block. Answers through `conn` (without an answer
/// the connection is closed).
using TestHandler = std::function<void(const TestRequest& request, TestConnection& conn)>;

struct TlsTestServerOptions {
  /// False: plain HTTP (the same server, for tests run over both).
  bool tls = true;
  std::string cert_file;  // default: server.pem
  std::string key_file;   // default: server.key
  /// Ask for a client certificate and refuse the handshake without one verified against
  /// the test CA (verify_peer | verify_fail_if_no_peer_cert).
  bool require_client_cert = false;
};

/// An HTTP/1.1 keep-alive server, TLS (the test CA's server.pem by default) or plain.
class TlsTestServer {
 public:
  explicit TlsTestServer(TestHandler handler, TlsTestServerOptions options = {})
      : options_(std::move(options)), handler_(std::move(handler)), ctx_(boost::asio::ssl::context::tls_server) {
    namespace ssl = boost::asio::ssl;
#ifdef KEEL_NET_TESTDATA
    if (options_.cert_file.empty()) options_.cert_file = TlsFile("server.pem");
    if (options_.key_file.empty()) options_.key_file = TlsFile("server.key");
    if (options_.tls) {
      ctx_.use_certificate_chain_file(options_.cert_file);
      ctx_.use_private_key_file(options_.key_file, ssl::context::pem);
      if (options_.require_client_cert) {
        ctx_.set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
        ctx_.load_verify_file(TlsFile("ca.pem"));
      }
    }
#endif
    acceptor_.emplace(events_, [this](test_detail::tcp::socket& s) { Serve(s); });
  }
  ~TlsTestServer() { acceptor_->Stop(); }

  uint16_t port() const { return acceptor_->port(); }
  std::string Url(std::string_view target) const {
    return std::string(options_.tls ? "https" : "http") + "://127.0.0.1:" + std::to_string(port()) +
           std::string(target);
  }
  int accepted() const { return acceptor_->accepted(); }
  int closed() const { return acceptor_->closed(); }
  int handshakes() const { return handshakes_.load(); }
  int failed_handshakes() const { return failed_handshakes_.load(); }
  int requests() const { return requests_.load(); }
  /// Waits until `pred` (reading the counters) holds: false after `timeout`.
  bool Await(const std::function<bool()>& pred, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    return events_.Await(pred, timeout);
  }
  void Stop() { acceptor_->Stop(); }

 private:
  template <class Stream>
  void ServeHttp(Stream& stream, int fd) {
    namespace http = test_detail::http;
    test_detail::beast::flat_buffer buffer;
    for (;;) {
      TestRequest req;
      test_detail::beast::error_code ec;
      http::read(stream, buffer, req, ec);
      if (ec) return;
      ++requests_;
      events_.Bump();
      TestConnection conn(
          [&stream](std::string_view bytes) {
            test_detail::beast::error_code wec;
            test_detail::asio::write(stream, test_detail::asio::buffer(bytes.data(), bytes.size()), wec);
            return !wec;
          },
          fd);
      handler_(req, conn);
      if (!conn.keep_alive() || !req.keep_alive()) return;
    }
  }

  void Serve(test_detail::tcp::socket& socket) {
    const int fd = socket.native_handle();
    if (!options_.tls) return ServeHttp(socket, fd);
    boost::asio::ssl::stream<test_detail::tcp::socket&> tls(socket, ctx_);
    test_detail::beast::error_code ec;
    tls.handshake(boost::asio::ssl::stream_base::server, ec);
    if (ec) {
      ++failed_handshakes_;
      events_.Bump();
      // Let the client read the alert before the connection goes: closing with its
      // unread bytes (its request) would reset the connection and lose the alert.
      ::shutdown(fd, SHUT_WR);
      char drain[4096];
      pollfd p{fd, POLLIN, 0};
      while (::poll(&p, 1, 2000) == 1 && ::recv(fd, drain, sizeof drain, 0) > 0) {
      }
      return;
    }
    ++handshakes_;
    events_.Bump();
    ServeHttp(tls, fd);
  }

  TlsTestServerOptions options_;
  TestHandler handler_;
  boost::asio::ssl::context ctx_;
  test_detail::Events events_;
  std::atomic<int> handshakes_{0};
  std::atomic<int> failed_handshakes_{0};
  std::atomic<int> requests_{0};
  std::optional<test_detail::ThreadedAcceptor> acceptor_;  // last: stopped before the rest goes
};

struct TestProxyOptions {
  /// Answer CONNECT with this status (e.g. 403) instead of opening a tunnel. 0: tunnel.
  int refuse_connect = 0;
  /// When set, the Proxy-Authorization every request must carry ("Basic ..."); others
  /// are answered 407.
  std::string require_authorization;
};

/// An HTTP proxy: CONNECT host:port (200, then bytes piped both ways) and absolute-form
/// plain-HTTP requests (forwarded on a new upstream connection each). Records what it saw.
class TestProxy {
 public:
  explicit TestProxy(TestProxyOptions options = {}) : options_(std::move(options)) {
    acceptor_.emplace(events_, [this](test_detail::tcp::socket& s) { Serve(s); });
  }
  ~TestProxy() { acceptor_->Stop(); }

  uint16_t port() const { return acceptor_->port(); }
  std::string Url() const { return "http://127.0.0.1:" + std::to_string(port()); }
  /// "METHOD target" of every request, in order.
  std::vector<std::string> seen() const {
    std::lock_guard lock(mu_);
    return seen_;
  }
  /// The Proxy-Authorization of every request ("" when absent), in order.
  std::vector<std::string> authorizations() const {
    std::lock_guard lock(mu_);
    return authorizations_;
  }
  int accepted() const { return acceptor_->accepted(); }

 private:
  void Record(const TestRequest& req) {
    std::lock_guard lock(mu_);
    seen_.push_back(std::string(req.method_string()) + " " + std::string(req.target()));
    authorizations_.emplace_back(req[test_detail::http::field::proxy_authorization]);
  }

  // A connected socket to host:port, or none.
  static std::optional<test_detail::tcp::socket> Dial(test_detail::asio::io_context& io, const std::string& host,
                                                      const std::string& port) {
    test_detail::beast::error_code ec;
    test_detail::tcp::resolver resolver(io);
    auto results = resolver.resolve(host, port, ec);
    if (ec) return std::nullopt;
    test_detail::tcp::socket s(io);
    test_detail::asio::connect(s, results, ec);
    if (ec) return std::nullopt;
    return s;
  }

  void Serve(test_detail::tcp::socket& client) {
    namespace http = test_detail::http;
    using test_detail::SendAll;
    const int fd = client.native_handle();
    test_detail::asio::io_context io;
    test_detail::beast::flat_buffer buffer;
    for (;;) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(boost::none);
      test_detail::beast::error_code ec;
      http::read(client, buffer, parser, ec);
      if (ec) return;
      TestRequest req = parser.release();
      Record(req);
      if (!options_.require_authorization.empty() &&
          req[http::field::proxy_authorization] != options_.require_authorization) {
        SendAll(fd, "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      if (req.method() == http::verb::connect) {
        if (options_.refuse_connect != 0) {
          SendAll(fd, "HTTP/1.1 " + std::to_string(options_.refuse_connect) +
                          " Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
          return;
        }
        const std::string target(req.target());
        const auto colon = target.rfind(':');
        auto up = colon == std::string::npos ? std::nullopt
                                             : Dial(io, target.substr(0, colon), target.substr(colon + 1));
        if (!up) {
          SendAll(fd, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
          return;
        }
        const int ufd = up->native_handle();
        if (!acceptor_->Track(ufd)) return;
        SendAll(fd, "HTTP/1.1 200 Connection established\r\n\r\n");
        if (buffer.size() > 0) {
          SendAll(ufd, std::string_view(static_cast<const char*>(buffer.data().data()), buffer.size()));
        }
        std::thread to_upstream([fd, ufd] { test_detail::Pipe(fd, ufd); });
        test_detail::Pipe(ufd, fd);
        to_upstream.join();
        acceptor_->Untrack(ufd);
        return;
      }
      auto url = boost::urls::parse_uri(req.target());
      if (!url) {
        SendAll(fd, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      auto up = Dial(io, std::string(url->host()), url->has_port() ? std::string(url->port()) : "80");
      if (!up) {
        SendAll(fd, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      if (!acceptor_->Track(up->native_handle())) return;
      test_detail::beast::flat_buffer ubuffer;
      http::response<http::string_body> res;
      http::write(*up, req, ec);
      if (!ec) http::read(*up, ubuffer, res, ec);
      acceptor_->Untrack(up->native_handle());
      if (ec) {
        SendAll(fd, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      http::write(client, res, ec);
      if (ec || !req.keep_alive() || !res.keep_alive()) return;
    }
  }

  TestProxyOptions options_;
  test_detail::Events events_;
  mutable std::mutex mu_;
  std::vector<std::string> seen_;            // GUARDED_BY(mu_)
  std::vector<std::string> authorizations_;  // GUARDED_BY(mu_)
  std::optional<test_detail::ThreadedAcceptor> acceptor_;  // last: stopped before the rest goes
};

}  // namespace keel::net
