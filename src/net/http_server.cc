#include "keel/net/http_server.h"

#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/url/parse.hpp>
#include <deque>
#include <future>
#include <mutex>
#include <sys/socket.h>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "keel/obs/log.h"

namespace keel::net {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// The server's own error bodies: {"error":{"type":...,"message":...}}, always valid JSON
// and ASCII (a control character is escaped, a byte beyond ASCII becomes U+FFFD; the
// server's messages are ASCII, so neither happens in practice).
std::string ErrorBody(std::string_view type, std::string_view message) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = R"({"error":{"type":")";
  auto append = [&out](std::string_view text) {
    for (unsigned char c : text) {
      if (c == '"' || c == '\\') {
        out.push_back('\\');
        out.push_back(static_cast<char>(c));
      } else if (c < 0x20 || c == 0x7F) {
        out += "\\u00";
        out.push_back(kHex[c >> 4]);
        out.push_back(kHex[c & 15]);
      } else if (c >= 0x80) {
        out += "\\ufffd";
      } else {
        out.push_back(static_cast<char>(c));
      }
    }
  };
  append(type);
  out += R"(","message":")";
  append(message);
  out += "\"}}";
  return out;
}

// The key that per-address connection counts are kept under: the address itself, or for
// IPv6 (not IPv4-mapped) its /64, which one client usually holds whole.
std::string AddressKey(const asio::ip::address& a) {
  if (a.is_v6() && !a.to_v6().is_v4_mapped()) {
    auto bytes = a.to_v6().to_bytes();
    for (std::size_t i = 8; i < bytes.size(); ++i) bytes[i] = 0;
    return asio::ip::address_v6(bytes).to_string() + "/64";
  }
  return a.to_string();
}

// What the header of a request says about where its body ends and what it targets,
// checked before the body is read (RFC 9112). On success fills `req`'s method, target,
// path, query, segments and headers.
Result<void> CheckHeader(const http::request<http::string_body>& msg, HttpRequest& req) {
  auto bad = [](std::string message) {
    return Error(ErrorCode::kInvalidRequest, std::move(message));
  };
  if (msg.version() < 10 || msg.version() > 19) {
    return bad("unsupported HTTP version " + std::to_string(msg.version() / 10) + "." +
               std::to_string(msg.version() % 10) + ": keel serves HTTP/1.0 and HTTP/1.1");
  }
  int hosts = 0;
  std::vector<std::string_view> codings;
  bool content_length = false;
  for (const auto& f : msg) {
    if (f.name() == http::field::host) ++hosts;
    if (f.name() == http::field::content_length) content_length = true;
    if (f.name() == http::field::transfer_encoding) {
      for (auto coding : http::token_list(f.value())) codings.push_back(coding);
    }
  }
  if (hosts > 1)
    return bad("the request has " + std::to_string(hosts) + " Host headers; send exactly one");
  if (hosts == 0 && msg.version() >= 11) return bad("an HTTP/1.1 request must carry a Host header");
  if (msg.count(http::field::transfer_encoding) > 0) {
    if (msg.version() < 11)
      return bad("Transfer-Encoding is not allowed in an HTTP/1.0 request; send Content-Length");
    if (codings.size() != 1 || !beast::iequals(codings[0], "chunked")) {
      return bad(
          "unsupported Transfer-Encoding \"" + std::string(msg[http::field::transfer_encoding]) +
          "\": keel accepts only \"chunked\" (or a Content-Length) and decodes no other coding");
    }
    if (content_length)
      return bad("the request has both Transfer-Encoding and Content-Length; send one of them");
  }

  const std::string_view target = msg.target();
  for (unsigned char c : target) {
    if (c <= 0x20 || c >= 0x7F)
      return bad("the request target must be ASCII; percent-encode other bytes (%XX)");
    if (c == '#')
      return bad("the request target must not carry a fragment ('#'); percent-encode it as %23");
  }
  std::string_view path, query;
  if (!target.empty() && target[0] == '/') {  // origin-form
    const auto q = target.find('?');
    path = target.substr(0, q);
    if (q != std::string_view::npos) query = target.substr(q + 1);
  } else if (target == "*" && msg.method() == http::verb::options) {  // asterisk-form
    path = target;
  } else {  // absolute-form (RFC 9112 3.2.2): routed by its path, like origin-form
    auto url = boost::urls::parse_absolute_uri(target);
    if (!url || !url->has_authority() || url->encoded_host().empty() ||
        (!beast::iequals(url->scheme(), "http") && !beast::iequals(url->scheme(), "https"))) {
      return bad("malformed request target \"" + std::string(target.substr(0, 200)) +
                 "\": send a path starting with '/' (or an absolute http:// URL)");
    }
    path = url->encoded_path();
    if (url->has_query()) query = url->encoded_query();
  }
  if (path != "*") {
    auto segments = SplitPath(path);
    if (!segments.ok()) return std::move(segments).error();
    req.segments = std::move(segments).value();
  }
  req.method = std::string(msg.method_string());
  req.target = std::string(target);
  req.path = path.empty() ? std::string("/") : std::string(path);
  req.query = std::string(query);
  req.headers.reserve(std::distance(msg.begin(), msg.end()));
  for (const auto& f : msg)
    req.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
  return Ok();
}

class ServerImpl;

// One client connection. Lives while an async operation or a pending Responder refers
// to it.
class Session : public std::enable_shared_from_this<Session> {
 public:
  // `address_key` is the client's AddressKey when the session counts against its
  // per-address bound (released by the destructor), empty when it does not.
  Session(tcp::socket socket, ServerImpl& server, std::string address_key = {});
  ~Session();
  void Start() { ReadNext(); }
  void Close();
  // Answers `r` and closes at once, without reading anything (a refused connection).
  void Refuse(HttpResponse r);

  void Send(HttpResponse response);
  asio::any_io_executor executor() { return stream_.get_executor(); }
  // Streaming: WriteRaw blocks the calling (non-I/O) thread until the bytes are written.
  bool WriteRaw(std::string bytes);
  void EndStream(bool reset);
  // Streaming without blocking (on the session's executor): queues bytes; `drained` runs
  // once the queue is empty or the client is gone.
  bool QueueRaw(std::string bytes);
  std::size_t queued() const { return queued_bytes_; }
  void WhenDrained(std::function<void()> fn);
  bool gone() const { return gone_; }
  // The client of the request being answered went away.
  void ClientGone();
  const std::shared_ptr<CancelSignal>& client_gone() const { return client_gone_; }

 private:
  friend class ServerImpl;
  void ReadNext();
  void ReadHeader();
  void OnHeader(beast::error_code ec);
  void OnRead(beast::error_code ec);
  // Answers a read that failed: silently closes on a timeout or a client gone, else an
  // error answer (400, 413, 431) and close.
  void OnReadError(beast::error_code ec);
  void Write(HttpResponse response, bool keep_alive);
  // While a handler works on a request: notices the client closing its connection (a
  // readable socket with nothing to read), without consuming a pipelined next request.
  void WatchClient();
  void WriteQueued();
  // After an answer that closes the connection: reads and drops what the client still
  // sends (at most 1 MiB for at most 2s) so that the answer is not lost to a reset.
  void Linger();

  beast::tcp_stream stream_;
  ServerImpl& server_;
  const std::string address_key_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  HttpRequest request_;  // the request being read: filled from its header, then its body
  std::shared_ptr<http::response<http::string_body>> out_;
  unsigned version_ = 11;
  bool keep_alive_ = true;
  bool first_request_ = true;
  bool linger_ = true;
  std::size_t lingered_ = 0;
  std::array<char, 4096> drain_{};
  // The request being answered: its number on this connection, and its client-gone signal.
  std::size_t body_limit_ = 0;  // the request being read: its body limit and what sets it
  std::string body_setting_;
  uint64_t generation_ = 0;
  std::shared_ptr<CancelSignal> client_gone_ = std::make_shared<CancelSignal>();
  // Non-blocking streaming.
  std::deque<std::string> queue_;
  std::size_t queued_bytes_ = 0;
  bool writing_ = false;
  bool gone_ = false;
  std::function<void()> drained_;
};

}  // namespace

// The responder's shared state owns a reference to the session; its destructor answers
// 500 if no copy of the responder answered.
struct Responder::State {
  std::shared_ptr<Session> session;
  // This request's, not the session's current one (which is the next request's once this
  // one is answered).
  std::shared_ptr<CancelSignal> client_gone;
  std::atomic<bool> sent{false};
  ~State();
};

namespace {

class ServerImpl final : public HttpServer {
 public:
  // One I/O context per thread (each with a concurrency hint of 1, so that a ready
  // handler never wakes another thread): the acceptor hands connections round robin.
  ServerImpl(const ServerOptions& options, Handler handler)
      : options_(options),
        handler_(std::move(handler)),
        contexts_(MakeContexts(options.io_threads)),
        acceptor_(*contexts_[0]) {}

  static std::vector<std::unique_ptr<asio::io_context>> MakeContexts(int n) {
    std::vector<std::unique_ptr<asio::io_context>> out;
    for (int i = 0; i < std::max(1, n); ++i) out.push_back(std::make_unique<asio::io_context>(1));
    return out;
  }

  bool stopping() const { return stopping_.load(); }

  Result<void> Start() {
    beast::error_code ec;
    const auto address = asio::ip::make_address(options_.host, ec);
    if (ec)
      return Error(ErrorCode::kInvalidRequest,
                   "bad listen address \"" + options_.host + "\": " + ec.message());
    tcp::endpoint endpoint(address, options_.port);
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return Error(ErrorCode::kUnavailable, "cannot listen on " + options_.host + ":" +
                                                std::to_string(options_.port) + ": " +
                                                ec.message());
    }
    port_ = acceptor_.local_endpoint().port();
    Accept();
    for (auto& ctx : contexts_) {
      guards_.emplace_back(asio::make_work_guard(*ctx));
      threads_.emplace_back([c = ctx.get()] { c->run(); });
    }
    return Ok();
  }

  ~ServerImpl() override { Stop(); }

  uint16_t port() const override { return port_; }

  void After(std::chrono::milliseconds delay, std::function<void()> fn) override {
    auto timer = std::make_shared<asio::steady_timer>(*contexts_[0], delay);
    timer->async_wait([timer, fn = std::move(fn)](beast::error_code ec) {
      if (!ec) fn();
    });
  }

  void Stop() override {
    std::call_once(stopped_, [this] {
      stopping_.store(true);
      asio::post(*contexts_[0], [this] {
        beast::error_code ec;
        acceptor_.close(ec);
        std::lock_guard lock(mu_);
        for (auto* s : sessions_) s->Close();
        // Let sessions finish closing (posted to their contexts), then end the loops.
        for (auto& ctx : contexts_) asio::post(*ctx, [c = ctx.get()] { c->stop(); });
      });
      for (auto& t : threads_) {
        if (t.joinable()) t.join();
      }
    });
  }

  int open_connections() const override { return open_.load(); }

  const ServerOptions& options() const { return options_; }
  const Handler& handler() const { return handler_; }

  void Register(Session* s) {
    std::lock_guard lock(mu_);
    sessions_.insert(s);
  }
  void Unregister(Session* s, const std::string& address_key) {
    std::lock_guard lock(mu_);
    sessions_.erase(s);
    if (!address_key.empty()) {
      if (auto it = per_address_.find(address_key); it != per_address_.end() && --it->second <= 0)
        per_address_.erase(it);
    }
    open_.fetch_sub(1);
  }

  int per_address_limit() const {
    if (options_.max_connections_per_address > 0) return options_.max_connections_per_address;
    return std::max(1, options_.max_connections / 4);
  }

 private:
  static HttpResponse Refusal(std::string message) {
    HttpResponse r;
    r.status = 503;
    r.body = ErrorBody("overloaded", message);
    r.headers.emplace_back("Retry-After", "1");
    r.close = true;
    return r;
  }

  void Accept() {
    auto& ctx = *contexts_[next_context_++ % contexts_.size()];
    acceptor_.async_accept(ctx, [this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
        // Out of file descriptors (EMFILE) fails every accept at once: pause instead of
        // spinning (and logging) until a connection closes.
        obs::LogWarn("accept failed; accepting again in 50ms", {{"error", ec.message()}});
        auto timer =
            std::make_shared<asio::steady_timer>(*contexts_[0], std::chrono::milliseconds(50));
        timer->async_wait([this, timer](beast::error_code e) {
          if (!e && acceptor_.is_open()) Accept();
        });
        return;
      } else {
        socket.set_option(tcp::no_delay(true), ec);
        const auto remote = socket.remote_endpoint(ec);
        const int open = open_.fetch_add(1) + 1;
        if (ec) {
          // Gone before we looked: nothing to answer.
          auto session = std::make_shared<Session>(std::move(socket), *this);
          session->Close();
        } else if (open > options_.max_connections) {
          auto session = std::make_shared<Session>(std::move(socket), *this);
          session->Refuse(Refusal("too many open connections (server.max_connections is " +
                                  std::to_string(options_.max_connections) + "); retry later"));
        } else {
          std::string key = AddressKey(remote.address());
          bool admitted = false;
          {
            std::lock_guard lock(mu_);
            int& n = per_address_[key];  // at the limit (so at least 1) when not admitted
            admitted = n < per_address_limit();
            if (admitted) ++n;
          }
          if (admitted) {
            std::make_shared<Session>(std::move(socket), *this, std::move(key))->Start();
          } else {
            auto session = std::make_shared<Session>(std::move(socket), *this);
            session->Refuse(Refusal(
                "too many open connections from this address (server.max_connections_per_ip is " +
                std::to_string(per_address_limit()) + "); close idle ones or retry later"));
          }
        }
      }
      Accept();
    });
  }

  // Declaration order matters: the contexts are destroyed before the state their pending
  // handlers (sessions) touch, and the acceptor and work guards before the contexts.
  ServerOptions options_;
  Handler handler_;
  std::atomic<int> open_{0};
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::unordered_set<Session*> sessions_;             // GUARDED_BY(mu_)
  std::unordered_map<std::string, int> per_address_;  // GUARDED_BY(mu_): by AddressKey
  std::vector<std::thread> threads_;
  uint16_t port_ = 0;
  std::once_flag stopped_;
  std::size_t next_context_ = 0;
  std::vector<std::unique_ptr<asio::io_context>> contexts_;
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards_;
  tcp::acceptor acceptor_;
};

Session::Session(tcp::socket socket, ServerImpl& server, std::string address_key)
    : stream_(std::move(socket)), server_(server), address_key_(std::move(address_key)) {
  server_.Register(this);
}

Session::~Session() { server_.Unregister(this, address_key_); }

void Session::Close() {
  // Called by Stop() with a raw pointer: the session may be mid-destruction (its last
  // reference gone, Unregister waiting for the lock); then its socket closes with it.
  auto self = weak_from_this().lock();
  if (!self) return;
  asio::post(stream_.get_executor(), [self = std::move(self)] {
    beast::error_code ec;
    self->stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    self->stream_.close();
  });
}

void Session::Refuse(HttpResponse r) {
  linger_ = false;  // a refused client must not hold its socket open by sending more
  asio::dispatch(stream_.get_executor(), [self = shared_from_this(), r = std::move(r)]() mutable {
    self->Write(std::move(r), false);
  });
}

void Session::ReadNext() {
  parser_.emplace();
  // The body's limit depends on the request (ServerOptions::body_limit): set once its
  // header is in, before any body byte is parsed.
  parser_->body_limit(boost::none);
  parser_->header_limit(static_cast<std::uint32_t>(server_.options().max_header_bytes));
  request_ = HttpRequest();
  if (first_request_ || buffer_.size() > 0) {
    first_request_ = false;
    ReadHeader();
    return;
  }
  // Keep-alive between requests: wait up to idle_timeout for the next one's first bytes.
  stream_.expires_after(server_.options().idle_timeout);
  stream_.async_read_some(buffer_.prepare(4096),
                          [self = shared_from_this()](beast::error_code ec, std::size_t n) {
                            self->buffer_.commit(n);
                            if (ec) {
                              beast::error_code ignored;
                              self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
                              return;
                            }
                            self->ReadHeader();
                          });
}

void Session::ReadHeader() {
  stream_.expires_after(server_.options().header_timeout);
  http::async_read_header(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, std::size_t) { self->OnHeader(ec); });
}

void Session::OnHeader(beast::error_code ec) {
  if (ec) {
    OnReadError(ec);
    return;
  }
  const auto& msg = parser_->get();
  version_ = msg.version() == 10 ? 10 : 11;
  if (auto checked = CheckHeader(msg, request_); !checked.ok()) {
    HttpResponse r;
    r.status = 400;
    r.body = ErrorBody("invalid_request", checked.error().message);
    r.close = true;
    Write(std::move(r), false);
    return;
  }
  body_limit_ = server_.options().max_body_bytes;
  body_setting_ = server_.options().max_body_setting;
  if (server_.options().body_limit) {
    auto limit = server_.options().body_limit(request_);
    if (limit.bytes > 0) {
      body_limit_ = limit.bytes;
      body_setting_ = std::move(limit.setting);
    }
  }
  // The header is in: the body's own limit. A declared length past it is refused before
  // a byte of the body is read.
  if (const auto length = parser_->content_length(); length && *length > body_limit_) {
    OnReadError(http::error::body_limit);
    return;
  }
  parser_->body_limit(body_limit_);
  if (parser_->is_done()) {
    OnRead({});
    return;
  }
  stream_.expires_after(server_.options().idle_timeout);
  http::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, std::size_t) { self->OnRead(ec); });
}

void Session::OnReadError(beast::error_code ec) {
  if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
      ec == asio::error::operation_aborted || ec == asio::error::connection_reset ||
      ec == asio::error::eof) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    return;
  }
  HttpResponse r;
  r.close = true;
  if (ec == http::error::body_limit) {
    r.status = 413;
    r.body = ErrorBody("payload_too_large", "request body is larger than the limit of " +
                                                std::to_string(body_limit_) + " bytes (set by " +
                                                body_setting_ + ")");
  } else if (ec == http::error::header_limit) {
    r.status = 431;
    r.body = ErrorBody("invalid_request", "request headers are larger than the limit of " +
                                              std::to_string(server_.options().max_header_bytes) +
                                              " bytes");
  } else {
    r.status = 400;
    // message(), never what(): the latter carries the source location of the error.
    r.body = ErrorBody("invalid_request", "malformed HTTP request: " + ec.message());
  }
  Write(std::move(r), false);
}

void Session::OnRead(beast::error_code ec) {
  if (ec) {
    OnReadError(ec);
    return;
  }
  auto msg = parser_->release();
  keep_alive_ = msg.keep_alive();
  HttpRequest req = std::move(request_);
  req.body = std::move(msg.body());
  beast::error_code rec;
  const auto ep = stream_.socket().remote_endpoint(rec);
  if (!rec) req.remote = ep.address().to_string() + ":" + std::to_string(ep.port());
  stream_.expires_never();  // the handler may take its time (long polls)

  ++generation_;
  client_gone_ = std::make_shared<CancelSignal>();
  gone_ = false;
  WatchClient();
  auto state = std::make_shared<Responder::State>();
  state->session = shared_from_this();
  state->client_gone = client_gone_;
  server_.handler()(std::move(req), Responder(std::move(state)));
}

void Session::WatchClient() {
  stream_.socket().async_wait(
      tcp::socket::wait_read, [self = shared_from_this(), gen = generation_](beast::error_code ec) {
        if (ec || gen != self->generation_ || self->buffer_.size() > 0) return;
        char byte;
        const ssize_t n = ::recv(self->stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n > 0) return;  // a pipelined request: read once this answer is out
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
          self->WatchClient();
          return;
        }
        self->ClientGone();
      });
}

void Session::ClientGone() {
  gone_ = true;
  auto signal = client_gone_;
  signal->Cancel();
  if (drained_) {
    auto fn = std::move(drained_);
    drained_ = nullptr;
    fn();
  }
}

bool Session::QueueRaw(std::string bytes) {
  if (gone_ || server_.stopping()) return false;
  queued_bytes_ += bytes.size();
  queue_.push_back(std::move(bytes));
  WriteQueued();
  return true;
}

void Session::WriteQueued() {
  if (writing_ || queue_.empty()) return;
  writing_ = true;
  stream_.expires_after(std::chrono::seconds(30));
  asio::async_write(stream_, asio::buffer(queue_.front()),
                    [self = shared_from_this()](beast::error_code ec, std::size_t) {
                      self->writing_ = false;
                      self->stream_.expires_never();
                      self->queued_bytes_ -= self->queue_.front().size();
                      self->queue_.pop_front();
                      if (ec) {
                        self->queue_.clear();
                        self->queued_bytes_ = 0;
                        self->ClientGone();
                        return;
                      }
                      if (!self->queue_.empty()) return self->WriteQueued();
                      if (self->drained_) {
                        auto fn = std::move(self->drained_);
                        self->drained_ = nullptr;
                        fn();
                      }
                    });
}

void Session::WhenDrained(std::function<void()> fn) {
  if (gone_ || queue_.empty()) {
    fn();
    return;
  }
  drained_ = std::move(fn);
}

void Session::Linger() {
  stream_.async_read_some(asio::buffer(drain_),
                          [self = shared_from_this()](beast::error_code ec, std::size_t n) {
                            self->lingered_ += n;
                            if (ec || self->lingered_ > (1u << 20))
                              return;  // the last reference goes: closed
                            self->Linger();
                          });
}

}  // namespace

Responder::State::~State() {
  if (!sent.load() && session) {
    HttpResponse r;
    r.status = 500;
    r.body = ErrorBody("internal", "the handler returned no response");
    session->Send(std::move(r));
  }
}

asio::any_io_executor Responder::executor() const { return state_->session->executor(); }

std::shared_ptr<CancelSignal> Responder::client_gone() const { return state_->client_gone; }

void Responder::operator()(HttpResponse r) const {
  if (state_->sent.exchange(true)) return;
  state_->session->Send(std::move(r));
}

namespace {

std::string_view ReasonFor(int status) {
  return http::obsolete_reason(static_cast<http::status>(status));
}

// One chunk of a chunked body: its size in hex, the bytes, CRLF.
std::string ChunkFrame(std::string_view data) {
  char size[20];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  std::string frame(size);
  frame.append(data);
  frame.append("\r\n");
  return frame;
}

// The status line and headers of a chunked answer.
std::string StreamHead(int status, std::string_view content_type, const Headers& headers) {
  std::string head = "HTTP/1.1 " + std::to_string(status) + " " + std::string(ReasonFor(status)) + "\r\n";
  head += "Server: keel\r\nContent-Type: " + std::string(content_type) + "\r\nTransfer-Encoding: chunked\r\n";
  for (const auto& [k, v] : headers) head += k + ": " + v + "\r\n";
  head += "\r\n";
  return head;
}

class SessionChunkedWriter final : public ChunkedWriter {
 public:
  explicit SessionChunkedWriter(std::shared_ptr<Session> s) : session_(std::move(s)) {}
  ~SessionChunkedWriter() override { Finish(); }
  bool Write(std::string_view data) override {
    if (done_ || data.empty()) return !done_;
    if (!session_->WriteRaw(ChunkFrame(data))) {
      done_ = true;
      session_->EndStream(true);
      return false;
    }
    return true;
  }
  void Finish() override {
    if (done_) return;
    done_ = true;
    if (session_->WriteRaw("0\r\n\r\n"))
      session_->EndStream(false);
    else
      session_->EndStream(true);
  }
  void Reset() override {
    if (done_) return;
    done_ = true;
    session_->EndStream(true);
  }

 private:
  std::shared_ptr<Session> session_;
  bool done_ = false;
};

}  // namespace

std::unique_ptr<ChunkedWriter> Responder::StartStream(int status, std::string content_type,
                                                      Headers headers) const {
  if (state_->sent.exchange(true)) return nullptr;
  if (!state_->session->WriteRaw(StreamHead(status, content_type, headers))) {
    state_->session->EndStream(true);
    return nullptr;
  }
  return std::make_unique<SessionChunkedWriter>(state_->session);
}

namespace {

class SessionAsyncWriter final : public AsyncChunkedWriter {
 public:
  explicit SessionAsyncWriter(std::shared_ptr<Session> s) : session_(std::move(s)) {}
  ~SessionAsyncWriter() override { Finish(); }
  bool Write(std::string data) override {
    if (done_) return false;
    if (data.empty()) return !session_->gone();
    return session_->QueueRaw(ChunkFrame(data));
  }
  std::size_t buffered() const override { return session_->queued(); }
  void OnDrained(std::function<void()> fn) override { session_->WhenDrained(std::move(fn)); }
  bool gone() const override { return session_->gone(); }
  void Finish() override {
    if (done_) return;
    done_ = true;
    if (!session_->QueueRaw("0\r\n\r\n")) return session_->EndStream(true);
    session_->WhenDrained([s = session_] { s->EndStream(s->gone()); });
  }
  void Reset() override {
    if (done_) return;
    done_ = true;
    // What was queued goes out first: the reset comes where the caller put it.
    session_->WhenDrained([s = session_] { s->EndStream(true); });
  }

 private:
  std::shared_ptr<Session> session_;
  bool done_ = false;
};

}  // namespace

std::shared_ptr<AsyncChunkedWriter> Responder::StartStreamAsync(int status, std::string content_type,
                                                                Headers headers) const {
  if (state_->sent.exchange(true)) return nullptr;
  if (!state_->session->QueueRaw(StreamHead(status, content_type, headers))) {
    state_->session->EndStream(true);
    return nullptr;
  }
  return std::make_shared<SessionAsyncWriter>(state_->session);
}

namespace {

bool Session::WriteRaw(std::string bytes) {
  if (server_.stopping()) return false;
  auto done = std::make_shared<std::promise<bool>>();
  auto fut = done->get_future();
  asio::post(stream_.get_executor(),
             [self = shared_from_this(), bytes = std::move(bytes), done]() mutable {
               auto buf = std::make_shared<std::string>(std::move(bytes));
               self->stream_.expires_after(std::chrono::seconds(30));
               asio::async_write(self->stream_, asio::buffer(*buf),
                                 [buf, done, self](beast::error_code ec, std::size_t) {
                                   self->stream_.expires_never();
                                   done->set_value(!ec);
                                 });
             });
  return fut.get();
}

void Session::EndStream(bool reset) {
  asio::post(stream_.get_executor(), [self = shared_from_this(), reset] {
    ++self->generation_;  // answered: the client may close now without cancelling it
    if (reset || !self->keep_alive_) {
      beast::error_code ec;
      if (reset) self->stream_.socket().set_option(asio::socket_base::linger(true, 0), ec);
      self->stream_.socket().close(ec);
      return;
    }
    self->ReadNext();
  });
}

void Session::Send(HttpResponse response) {
  if (server_.stopping()) return;
  asio::dispatch(stream_.get_executor(),
                 [self = shared_from_this(), r = std::move(response)]() mutable {
                   const bool keep = self->keep_alive_ && !r.close;
                   self->Write(std::move(r), keep);
                 });
}

void Session::Write(HttpResponse r, bool keep_alive) {
  if (r.reset_connection) {
    beast::error_code ec;
    stream_.socket().set_option(asio::socket_base::linger(true, 0), ec);
    stream_.socket().close(ec);
    return;
  }
  out_ = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(r.status),
                                                             version_);
  out_->set(http::field::server, "keel");
  if (!r.content_type.empty()) out_->set(http::field::content_type, r.content_type);
  for (auto& [k, v] : r.headers) out_->set(k, v);
  out_->body() = std::move(r.body);
  out_->keep_alive(keep_alive);
  out_->prepare_payload();
  stream_.expires_after(std::chrono::seconds(30));
  http::async_write(stream_, *out_,
                    [self = shared_from_this(), keep_alive](beast::error_code ec, std::size_t) {
                      self->out_.reset();
                      if (ec) return;
                      ++self->generation_;  // answered: the client may close now without cancelling it
                      if (!keep_alive) {
                        beast::error_code ignored;
                        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                        if (self->linger_ && !self->server_.stopping()) {
                          self->stream_.expires_after(std::chrono::seconds(2));
                          self->Linger();
                        }
                        return;
                      }
                      self->ReadNext();
                    });
}

}  // namespace

Result<std::unique_ptr<HttpServer>> HttpServer::Create(const ServerOptions& options,
                                                       Handler handler) {
  auto server = std::make_unique<ServerImpl>(options, std::move(handler));
  auto started = server->Start();
  if (!started.ok()) return std::move(started).error();
  return std::unique_ptr<HttpServer>(std::move(server));
}

}  // namespace keel::net
