#include "keel/net/http_server.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/url/decode_view.hpp>
#include <future>
#include <mutex>
#include <thread>
#include <unordered_set>
#include <vector>

#include "keel/obs/log.h"

namespace keel::net {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

std::string ErrorBody(std::string_view type, std::string_view message) {
  std::string out = R"({"error":{"type":")";
  out += type;
  out += R"(","message":")";
  for (char c : message) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  out += "\"}}";
  return out;
}

class ServerImpl;

// One client connection. Lives while an async operation or a pending Responder refers
// to it.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, ServerImpl& server);
  ~Session();
  void Start() { ReadNext(); }
  void Close();

  void Send(HttpResponse response);
  asio::any_io_executor executor() { return stream_.get_executor(); }
  // Streaming: WriteRaw blocks the calling (non-I/O) thread until the bytes are written.
  bool WriteRaw(std::string bytes);
  void EndStream(bool reset);

 private:
  friend class ServerImpl;
  void ReadNext();
  void OnRead(beast::error_code ec);
  void Write(HttpResponse response, bool keep_alive);

  beast::tcp_stream stream_;
  ServerImpl& server_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<http::response<http::string_body>> out_;
  unsigned version_ = 11;
  bool keep_alive_ = true;
};

}  // namespace

// The responder's shared state owns a reference to the session; its destructor answers
// 500 if no copy of the responder answered.
struct Responder::State {
  std::shared_ptr<Session> session;
  std::atomic<bool> sent{false};
  ~State();
};

namespace {

class ServerImpl final : public HttpServer {
 public:
  // One I/O context per thread (each with a concurrency hint of 1, so that a ready
  // handler never wakes another thread): the acceptor hands connections round robin.
  ServerImpl(const ServerOptions& options, Handler handler)
      : options_(options), handler_(std::move(handler)), contexts_(MakeContexts(options.io_threads)), acceptor_(*contexts_[0]) {}

  static std::vector<std::unique_ptr<asio::io_context>> MakeContexts(int n) {
    std::vector<std::unique_ptr<asio::io_context>> out;
    for (int i = 0; i < std::max(1, n); ++i) out.push_back(std::make_unique<asio::io_context>(1));
    return out;
  }

  bool stopping() const { return stopping_.load(); }

  Result<void> Start() {
    beast::error_code ec;
    const auto address = asio::ip::make_address(options_.host, ec);
    if (ec) return Error(ErrorCode::kInvalidRequest, "bad listen address \"" + options_.host + "\": " + ec.message());
    tcp::endpoint endpoint(address, options_.port);
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return Error(ErrorCode::kUnavailable, "cannot listen on " + options_.host + ":" +
                                                std::to_string(options_.port) + ": " + ec.message());
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
  void Unregister(Session* s) {
    std::lock_guard lock(mu_);
    sessions_.erase(s);
    open_.fetch_sub(1);
  }

 private:
  void Accept() {
    auto& ctx = *contexts_[next_context_++ % contexts_.size()];
    acceptor_.async_accept(ctx, [this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
        obs::LogWarn("accept failed", {{"error", ec.message()}});
      } else {
        socket.set_option(tcp::no_delay(true), ec);
        const int open = open_.fetch_add(1) + 1;
        auto session = std::make_shared<Session>(std::move(socket), *this);
        if (open > options_.max_connections) {
          HttpResponse r;
          r.status = 503;
          r.body = ErrorBody("overloaded", "too many open connections; retry later");
          r.headers.emplace_back("Retry-After", "1");
          r.close = true;
          session->Write(std::move(r), false);
        } else {
          session->Start();
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
  std::unordered_set<Session*> sessions_;  // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
  uint16_t port_ = 0;
  std::once_flag stopped_;
  std::size_t next_context_ = 0;
  std::vector<std::unique_ptr<asio::io_context>> contexts_;
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards_;
  tcp::acceptor acceptor_;
};

Session::Session(tcp::socket socket, ServerImpl& server) : stream_(std::move(socket)), server_(server) {
  server_.Register(this);
}

Session::~Session() { server_.Unregister(this); }

void Session::Close() {
  asio::post(stream_.get_executor(), [self = shared_from_this()] {
    beast::error_code ec;
    self->stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    self->stream_.close();
  });
}

void Session::ReadNext() {
  parser_.emplace();
  parser_->body_limit(server_.options().max_body_bytes);
  parser_->header_limit(static_cast<std::uint32_t>(server_.options().max_header_bytes));
  stream_.expires_after(server_.options().idle_timeout);
  http::async_read(stream_, buffer_, *parser_,
                   [self = shared_from_this()](beast::error_code ec, std::size_t) { self->OnRead(ec); });
}

void Session::OnRead(beast::error_code ec) {
  if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
      ec == asio::error::operation_aborted || ec == asio::error::connection_reset ||
      ec == asio::error::eof) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    return;
  }
  if (ec) {
    HttpResponse r;
    r.close = true;
    if (ec == http::error::body_limit) {
      r.status = 413;
      r.body = ErrorBody("payload_too_large", "request body is larger than the limit of " +
                                                  std::to_string(server_.options().max_body_bytes) + " bytes");
    } else if (ec == http::error::header_limit) {
      r.status = 431;
      r.body = ErrorBody("invalid_request", "request headers are larger than the limit of " +
                                                std::to_string(server_.options().max_header_bytes) + " bytes");
    } else {
      r.status = 400;
      r.body = ErrorBody("invalid_request", "malformed HTTP request: " + ec.message());
    }
    Write(std::move(r), false);
    return;
  }
  auto msg = parser_->release();
  version_ = msg.version();
  keep_alive_ = msg.keep_alive();
  HttpRequest req;
  req.method = std::string(msg.method_string());
  req.target = std::string(msg.target());
  const auto q = req.target.find('?');
  const std::string_view raw_path = std::string_view(req.target).substr(0, q);
  if (q != std::string::npos) req.query = req.target.substr(q + 1);
  auto decoded = boost::urls::make_pct_string_view(raw_path);
  if (decoded) {
    req.path.reserve(raw_path.size());
    for (char c : boost::urls::decode_view(*decoded)) req.path.push_back(c);
  } else {
    req.path = std::string(raw_path);
  }
  req.headers.reserve(std::distance(msg.begin(), msg.end()));
  for (const auto& f : msg) req.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
  req.body = std::move(msg.body());
  beast::error_code rec;
  const auto ep = stream_.socket().remote_endpoint(rec);
  if (!rec) req.remote = ep.address().to_string() + ":" + std::to_string(ep.port());
  stream_.expires_never();  // the handler may take its time (long polls)

  auto state = std::make_shared<Responder::State>();
  state->session = shared_from_this();
  server_.handler()(std::move(req), Responder(std::move(state)));
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

void Responder::operator()(HttpResponse r) const {
  if (state_->sent.exchange(true)) return;
  state_->session->Send(std::move(r));
}

namespace {

std::string_view ReasonFor(int status) {
  return http::obsolete_reason(static_cast<http::status>(status));
}

class SessionChunkedWriter final : public ChunkedWriter {
 public:
  explicit SessionChunkedWriter(std::shared_ptr<Session> s) : session_(std::move(s)) {}
  ~SessionChunkedWriter() override { Finish(); }
  bool Write(std::string_view data) override {
    if (done_ || data.empty()) return !done_;
    char size[20];
    std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    std::string frame(size);
    frame.append(data);
    frame.append("\r\n");
    if (!session_->WriteRaw(std::move(frame))) {
      done_ = true;
      session_->EndStream(true);
      return false;
    }
    return true;
  }
  void Finish() override {
    if (done_) return;
    done_ = true;
    if (session_->WriteRaw("0\r\n\r\n")) session_->EndStream(false);
    else session_->EndStream(true);
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

std::unique_ptr<ChunkedWriter> Responder::StartStream(int status, std::string content_type, Headers headers) const {
  if (state_->sent.exchange(true)) return nullptr;
  std::string head = "HTTP/1.1 " + std::to_string(status) + " " + std::string(ReasonFor(status)) + "\r\n";
  head += "Server: keel\r\nContent-Type: " + content_type + "\r\nTransfer-Encoding: chunked\r\n";
  for (const auto& [k, v] : headers) head += k + ": " + v + "\r\n";
  head += "\r\n";
  if (!state_->session->WriteRaw(std::move(head))) {
    state_->session->EndStream(true);
    return nullptr;
  }
  return std::make_unique<SessionChunkedWriter>(state_->session);
}

namespace {

bool Session::WriteRaw(std::string bytes) {
  if (server_.stopping()) return false;
  auto done = std::make_shared<std::promise<bool>>();
  auto fut = done->get_future();
  asio::post(stream_.get_executor(), [self = shared_from_this(), bytes = std::move(bytes), done]() mutable {
    auto buf = std::make_shared<std::string>(std::move(bytes));
    self->stream_.expires_after(std::chrono::seconds(30));
    asio::async_write(self->stream_, asio::buffer(*buf), [buf, done, self](beast::error_code ec, std::size_t) {
      self->stream_.expires_never();
      done->set_value(!ec);
    });
  });
  return fut.get();
}

void Session::EndStream(bool reset) {
  asio::post(stream_.get_executor(), [self = shared_from_this(), reset] {
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
  asio::dispatch(stream_.get_executor(), [self = shared_from_this(), r = std::move(response)]() mutable {
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
  out_ = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(r.status), version_);
  out_->set(http::field::server, "keel");
  if (!r.content_type.empty()) out_->set(http::field::content_type, r.content_type);
  for (auto& [k, v] : r.headers) out_->set(k, v);
  out_->body() = std::move(r.body);
  out_->keep_alive(keep_alive);
  out_->prepare_payload();
  stream_.expires_after(std::chrono::seconds(30));
  http::async_write(stream_, *out_, [self = shared_from_this(), keep_alive](beast::error_code ec, std::size_t) {
    self->out_.reset();
    if (ec) return;
    if (!keep_alive) {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
      return;
    }
    self->ReadNext();
  });
}

}  // namespace

Result<std::unique_ptr<HttpServer>> HttpServer::Create(const ServerOptions& options, Handler handler) {
  auto server = std::make_unique<ServerImpl>(options, std::move(handler));
  auto started = server->Start();
  if (!started.ok()) return std::move(started).error();
  return std::unique_ptr<HttpServer>(std::move(server));
}

}  // namespace keel::net
