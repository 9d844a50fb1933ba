#include "keel/net/async_http_client.h"

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <algorithm>
#include <array>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/core/detail/base64.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/url/parse.hpp>
#include <cctype>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <variant>
#include <vector>

namespace keel::net {
namespace {

namespace asio = boost::asio;
namespace ssl = asio::ssl;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using SteadyTime = std::chrono::steady_clock::time_point;
using TcpStream = beast::tcp_stream;
using TlsStream = beast::ssl_stream<beast::tcp_stream>;

// Idle connections kept per origin and I/O context: enough to reuse a connection per call
// in flight at thousands of concurrent calls, each idle TLS connection's buffers released
// (SSL_MODE_RELEASE_BUFFERS).
constexpr std::size_t kMaxIdlePerOrigin = 2048;
constexpr std::uint64_t kDefaultMaxResponseBytes = 64ull << 20;
constexpr std::size_t kReadChunk = 16 << 10;

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

// ---- TLS contexts: one per distinct TlsSettings, built at first use -----------------------

std::string ReadSslErrors() {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

Result<std::shared_ptr<ssl::context>> TlsContext(const TlsSettings& tls) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<ssl::context>> contexts;  // GUARDED_BY(mu)
  const std::string key = tls.ca_file + '\n' + tls.client_cert + '\n' + tls.client_key;
  std::lock_guard lock(mu);
  if (auto it = contexts.find(key); it != contexts.end()) return it->second;
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
  beast::error_code ec;
  ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                   ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
  SSL_CTX_set_mode(ctx->native_handle(), SSL_MODE_RELEASE_BUFFERS);
  ctx->set_verify_mode(ssl::verify_peer, ec);
  if (tls.ca_file.empty()) {
    ctx->set_default_verify_paths(ec);
    if (ec) return Error(ErrorCode::kNetwork, "TLS: cannot load the system's CA bundle: " + ec.message());
  } else {
    ctx->load_verify_file(tls.ca_file, ec);
    if (ec) {
      return Error(ErrorCode::kNetwork, "TLS: cannot load tls.ca_file \"" + tls.ca_file + "\": " + ec.message() +
                                            " (it must be a readable PEM file of CA certificates)");
    }
  }
  if (!tls.client_cert.empty()) {
    ctx->use_certificate_chain_file(tls.client_cert, ec);
    if (ec) {
      return Error(ErrorCode::kNetwork, "TLS: cannot load tls.client_cert \"" + tls.client_cert + "\": " +
                                            ec.message() + " (it must be a readable PEM certificate chain)");
    }
  }
  if (!tls.client_key.empty()) {
    ctx->use_private_key_file(tls.client_key, ssl::context::pem, ec);
    if (ec) {
      return Error(ErrorCode::kNetwork, "TLS: cannot load tls.client_key \"" + tls.client_key + "\": " +
                                            ec.message() + " (it must be a readable, unencrypted PEM key)");
    }
  }
  if (!tls.client_cert.empty() && !tls.client_key.empty() && SSL_CTX_check_private_key(ctx->native_handle()) != 1) {
    return Error(ErrorCode::kNetwork, "TLS: tls.client_key does not match tls.client_cert: " + ReadSslErrors());
  }
  contexts.emplace(key, ctx);
  return ctx;
}

// ---- Proxies --------------------------------------------------------------------------

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// no_proxy: "*", or a comma (or space) separated list of host names, domain suffixes
// (".example.com" and "example.com" both match "api.example.com") and addresses, each
// optionally with ":port".
bool Bypassed(std::string_view host, std::string_view port) {
  std::string list = Env("no_proxy");
  if (list.empty()) list = Env("NO_PROXY");
  const std::string h = Lower(host);
  std::size_t i = 0;
  while (i <= list.size()) {
    std::size_t j = list.find_first_of(", ", i);
    if (j == std::string::npos) j = list.size();
    std::string entry = Lower(std::string_view(list).substr(i, j - i));
    i = j + 1;
    if (entry.empty()) continue;
    if (entry == "*") return true;
    // The port of "host:port" or "[v6]:port" (a bare IPv6 address has more than one colon).
    std::size_t colon = std::string::npos;
    if (entry[0] == '[') {
      if (const auto close = entry.find(']'); close != std::string::npos && close + 1 < entry.size() && entry[close + 1] == ':') {
        colon = close + 1;
      }
    } else if (entry.find(':') == entry.rfind(':')) {
      colon = entry.find(':');
    }
    if (colon != std::string::npos) {
      if (entry.substr(colon + 1) != port) continue;
      entry.resize(colon);
    }
    if (!entry.empty() && entry[0] == '.') entry.erase(0, 1);
    if (entry.size() >= 2 && entry.front() == '[' && entry.back() == ']') entry = entry.substr(1, entry.size() - 2);
    if (h == entry) return true;
    if (h.size() > entry.size() && h.compare(h.size() - entry.size(), entry.size(), entry) == 0 &&
        h[h.size() - entry.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

// A parsed request URL (or proxy URL).
struct Origin {
  bool https = false;
  std::string host;  // as in the URL (no brackets for IPv6)
  std::string port;
  std::string target;  // path and query
  std::string user_info;  // decoded "user:password", proxies only
};

Result<Origin> ParseOrigin(std::string_view url, bool proxy) {
  auto u = boost::urls::parse_uri(url);
  // "proxy:3128" parses as a URI of scheme "proxy" without a host: read it as http://. (The
  // view points into `with_scheme`, which must outlive it.)
  const std::string with_scheme = proxy ? "http://" + std::string(url) : std::string();
  if ((!u || u->host().empty()) && proxy) u = boost::urls::parse_uri(with_scheme);
  if (!u || u->host().empty()) {
    return Error(ErrorCode::kInvalidRequest, std::string(proxy ? "not a proxy URL" : "not an http(s) URL"));
  }
  Origin o;
  const std::string scheme = Lower(u->scheme());
  if (scheme == "https" && !proxy) o.https = true;
  else if (scheme != "http") {
    return Error(ErrorCode::kInvalidRequest, proxy ? "unsupported proxy scheme \"" + scheme + "\" (keel speaks to http:// proxies)"
                                                   : "unsupported URL scheme \"" + scheme + "\" (use http:// or https://)");
  }
  o.host = u->host_type() == boost::urls::host_type::ipv6 ? std::string(u->host_address()) : std::string(u->host());
  o.port = u->has_port() ? std::string(u->port()) : (o.https ? "443" : "80");
  o.target = std::string(u->encoded_path());
  if (o.target.empty()) o.target = "/";
  if (u->has_query()) o.target += "?" + std::string(u->encoded_query());
  if (proxy && u->has_userinfo()) o.user_info = std::string(u->userinfo());
  return o;
}

std::string HostPort(const Origin& o, bool always_port) {
  const bool v6 = o.host.find(':') != std::string::npos;
  std::string h = v6 ? "[" + o.host + "]" : o.host;
  const bool default_port = o.port == (o.https ? "443" : "80");
  if (always_port || !default_port) h += ":" + o.port;
  return h;
}

std::string Base64(std::string_view in) {
  std::string out(beast::detail::base64::encoded_size(in.size()), '\0');
  out.resize(beast::detail::base64::encode(out.data(), in.data(), in.size()));
  return out;
}

// ---- Connections and their pool --------------------------------------------------------

// One upstream connection: plain TCP, or TLS over TCP (directly or through a CONNECT
// tunnel).
class Connection {
 public:
  explicit Connection(const asio::any_io_executor& ex) : stream_(std::in_place_type<TcpStream>, ex) {}
  TcpStream& tcp() {
    if (auto* t = std::get_if<TlsStream>(&stream_)) return t->next_layer();
    return std::get<TcpStream>(stream_);
  }
  TlsStream* tls() { return std::get_if<TlsStream>(&stream_); }
  void UpgradeToTls(ssl::context& ctx) {
    TcpStream tcp = std::move(std::get<TcpStream>(stream_));
    stream_.emplace<TlsStream>(std::move(tcp), ctx);
  }
  template <class F>
  void Visit(F&& f) {
    std::visit([&](auto& s) { f(s); }, stream_);
  }
  void Close() {
    beast::error_code ec;
    tcp().socket().shutdown(tcp::socket::shutdown_both, ec);
    tcp().socket().close(ec);
  }

 private:
  std::variant<TcpStream, TlsStream> stream_;
};

// Idle keep-alive connections of one I/O context, by pool key (origin, proxy, TLS
// settings). A service of the context: it is shut down (closing the sockets) before the
// context's reactor goes.
class ConnectionPool final : public asio::execution_context::service {
 public:
  static inline asio::execution_context::id id;
  explicit ConnectionPool(asio::execution_context& ctx) : service(ctx) {}

  std::unique_ptr<Connection> Take(const std::string& key) {
    std::lock_guard lock(mu_);
    auto it = idle_.find(key);
    if (it == idle_.end() || it->second.empty()) return nullptr;
    auto c = std::move(it->second.back());
    it->second.pop_back();
    return c;
  }

  void Put(const std::string& key, std::unique_ptr<Connection> c) {
    std::lock_guard lock(mu_);
    if (shut_) return;
    auto& v = idle_[key];
    if (v.size() < kMaxIdlePerOrigin) v.push_back(std::move(c));
  }

  int size() const {
    std::lock_guard lock(mu_);
    std::size_t n = 0;
    for (const auto& [k, v] : idle_) n += v.size();
    return static_cast<int>(n);
  }

 private:
  void shutdown() override {
    std::lock_guard lock(mu_);
    shut_ = true;
    idle_.clear();
  }

  mutable std::mutex mu_;
  bool shut_ = false;                                                        // GUARDED_BY(mu_)
  std::map<std::string, std::vector<std::unique_ptr<Connection>>> idle_;    // GUARDED_BY(mu_)
};

// The I/O context's own executor under a strand: a connection serves any caller of its
// context.
asio::any_io_executor BaseExecutor(const asio::any_io_executor& ex) {
  if (const auto* s = ex.target<asio::strand<asio::io_context::executor_type>>()) return s->get_inner_executor();
  if (const auto* s = ex.target<asio::strand<asio::any_io_executor>>()) return s->get_inner_executor();
  return ex;
}

ConnectionPool& PoolOf(const asio::any_io_executor& ex) {
  return asio::use_service<ConnectionPool>(asio::query(ex, asio::execution::context));
}

// Says whether a TLS failure is the server refusing keel's client certificate (or asking
// for one keel did not present): an alert about the certificate.
bool ClientCertificateRejected(const beast::error_code& ec) {
  if (ec.category() != asio::error::get_ssl_category()) return false;
  const int reason = ERR_GET_REASON(static_cast<unsigned long>(ec.value()));
  return reason == SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED || reason == SSL_R_SSLV3_ALERT_BAD_CERTIFICATE ||
         reason == SSL_R_TLSV1_ALERT_UNKNOWN_CA || reason == SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN ||
         reason == SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED || reason == SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED ||
         reason == SSL_R_TLSV1_ALERT_ACCESS_DENIED || reason == SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE;
}

// ---- One exchange ----------------------------------------------------------------------

// One request: connect (or reuse), write, read the answer whole or piece by piece, hand
// the connection back. Every handler runs on the exchange's strand.
class Exchange : public std::enable_shared_from_this<Exchange>, public StreamControl {
 public:
  // Whole answers: `done`. Streams: `consumer` (and `timeouts`).
  Exchange(const asio::any_io_executor& caller, ClientRequest request, std::function<void(Result<ClientResponse>)> done,
           std::shared_ptr<StreamConsumer> consumer, StreamTimeouts timeouts)
      : caller_(caller),
        base_(BaseExecutor(caller)),
        strand_(asio::make_strand(caller)),
        pool_(PoolOf(caller)),
        request_(std::move(request)),
        done_(std::move(done)),
        consumer_(std::move(consumer)),
        timeouts_(timeouts),
        deadline_(std::chrono::steady_clock::now() + request_.total_timeout) {}

  void Start() {
    asio::dispatch(strand_, [self = shared_from_this()] { self->Begin(); });
  }

  void Pause() override {
    asio::dispatch(strand_, [self = shared_from_this()] { self->paused_ = true; });
  }
  void Resume() override {
    asio::dispatch(strand_, [self = shared_from_this()] {
      if (!self->paused_ || self->finished_) return;
      self->paused_ = false;
      if (self->waiting_resume_) {
        self->waiting_resume_ = false;
        if (self->pause_timer_) self->pause_timer_->cancel();
        self->ReadBody();
      }
    });
  }

 private:
  void Begin() {
    if (request_.cancel && request_.cancel->cancelled()) return Finish(Error(ErrorCode::kCancelled, "cancelled" + What()));
    auto origin = ParseOrigin(request_.url, false);
    if (!origin.ok()) return Finish(Error(ErrorCode::kInvalidRequest, origin.error().message + What()));
    origin_ = std::move(origin).value();
    if (const std::string proxy = ProxyFor(request_.url); !proxy.empty()) {
      auto p = ParseOrigin(proxy, true);
      if (!p.ok()) return Finish(Error(ErrorCode::kInvalidRequest, p.error().message + " (a proxy variable)" + What()));
      proxy_ = std::move(p).value();
    }
    if (origin_.https) {
      auto ctx = TlsContext(request_.tls);
      if (!ctx.ok()) return Finish(Error(ctx.error().code, ctx.error().message + What()));
      tls_ = std::move(ctx).value();
    }
    key_ = (origin_.https ? "https://" : "http://") + HostPort(origin_, true) +
           (proxy_ ? "|proxy " + HostPort(*proxy_, true) + " " + proxy_->user_info : std::string()) +
           (origin_.https ? "|" + request_.tls.ca_file + "|" + request_.tls.client_cert + "|" + request_.tls.client_key
                          : std::string());
    if (request_.cancel) {
      std::weak_ptr<Exchange> weak = weak_from_this();
      cancel_handle_ = request_.cancel->OnCancel([weak, strand = strand_] {
        asio::post(strand, [weak] {
          if (auto self = weak.lock()) self->Cancel();
        });
      });
    }
    BuildRequest();
    conn_ = pool_.Take(key_);
    if (conn_) {
      reused_ = true;
      Write();
    } else {
      Resolve();
    }
  }

  void Cancel() {
    if (finished_) return;
    cancelled_ = true;
    if (conn_) conn_->Close();  // pending operations end with operation_aborted
    if (resolver_) resolver_->cancel();
    if (waiting_resume_) {
      waiting_resume_ = false;
      Fail(asio::error::operation_aborted);
    }
  }

  void BuildRequest() {
    const auto verb = http::string_to_verb(request_.method);
    msg_.method(verb == http::verb::unknown ? http::verb::get : verb);
    // Through a proxy without a tunnel (http://), the target is the whole URL.
    msg_.target(proxy_ && !origin_.https ? "http://" + HostPort(origin_, false) + origin_.target : origin_.target);
    msg_.version(11);
    msg_.set(http::field::host, HostPort(origin_, false));
    for (const auto& [k, v] : request_.headers) msg_.set(k, v);
    if (proxy_ && !origin_.https && !proxy_->user_info.empty()) {
      msg_.set(http::field::proxy_authorization, "Basic " + Base64(proxy_->user_info));
    }
    msg_.keep_alive(true);
    msg_.body() = std::move(request_.body);
    msg_.prepare_payload();
  }

  template <class F>
  auto OnStrand(F&& f) {
    return asio::bind_executor(strand_, std::forward<F>(f));
  }
  template <class F>
  static auto OnStrandOf(const std::shared_ptr<Exchange>& self, F&& f) {
    return asio::bind_executor(self->strand_, std::forward<F>(f));
  }

  void Resolve() {
    const Origin& to = proxy_ ? *proxy_ : origin_;
    resolver_.emplace(strand_);
    resolver_->async_resolve(to.host, to.port, OnStrand([self = shared_from_this()](beast::error_code ec,
                                                                                     tcp::resolver::results_type results) {
      if (self->cancelled_) return self->Fail(asio::error::operation_aborted);
      const Origin& to = self->proxy_ ? *self->proxy_ : self->origin_;
      if (ec) {
        return self->Finish(Error(ErrorCode::kNetwork, "cannot resolve " + std::string(self->proxy_ ? "the proxy " : "") +
                                                           to.host + ": " + ec.message() + self->What()));
      }
      self->Connect(results);
    }));
  }

  void Connect(const tcp::resolver::results_type& results) {
    conn_ = std::make_unique<Connection>(base_);
    const auto connect_by = std::min(deadline_, std::chrono::steady_clock::now() + request_.connect_timeout);
    conn_->tcp().expires_at(connect_by);
    conn_->tcp().async_connect(results, OnStrand([self = shared_from_this()](beast::error_code ec, const tcp::endpoint&) {
      if (self->cancelled_) return self->Fail(asio::error::operation_aborted);
      const std::string to = self->proxy_ ? " to the proxy " + HostPort(*self->proxy_, true) : std::string();
      if (ec == beast::error::timeout) {
        return self->Finish(Error(ErrorCode::kTimeout, "timed out: connect" + to + " took over " +
                                                           std::to_string(self->request_.connect_timeout.count()) +
                                                           "ms" + self->What()));
      }
      if (ec) return self->Finish(Error(ErrorCode::kNetwork, "cannot connect" + to + ": " + ec.message() + self->What()));
      beast::error_code ignored;
      self->conn_->tcp().socket().set_option(tcp::no_delay(true), ignored);
      if (self->proxy_ && self->origin_.https) return self->Tunnel();
      if (self->origin_.https) return self->Handshake();
      self->Write();
    }));
  }

  // CONNECT host:port through the proxy, then TLS end to end.
  void Tunnel() {
    auto req = std::make_shared<http::request<http::empty_body>>(http::verb::connect, HostPort(origin_, true), 11);
    req->set(http::field::host, HostPort(origin_, true));
    if (!proxy_->user_info.empty()) req->set(http::field::proxy_authorization, "Basic " + Base64(proxy_->user_info));
    conn_->tcp().expires_at(std::min(deadline_, std::chrono::steady_clock::now() + request_.connect_timeout));
    http::async_write(conn_->tcp(), *req, OnStrand([self = shared_from_this(), req](beast::error_code ec, std::size_t) {
      if (ec) return self->Fail(ec, "the CONNECT request to the proxy");
      auto parser = std::make_shared<http::response_parser<http::empty_body>>();
      parser->skip(true);  // a 2xx answer to CONNECT has no body: the tunnel follows
      http::async_read_header(self->conn_->tcp(), self->buffer_, *parser,
                              OnStrandOf(self, [self, parser](beast::error_code ec, std::size_t) {
                                if (ec) return self->Fail(ec, "the proxy's answer to CONNECT");
                                const int status = static_cast<int>(parser->get().result_int());
                                if (status < 200 || status > 299) {
                                  return self->Finish(Error(
                                      status == 407 ? ErrorCode::kAuth : ErrorCode::kNetwork,
                                      "the proxy " + HostPort(*self->proxy_, true) + " refused CONNECT to " +
                                          HostPort(self->origin_, true) + ": " + std::to_string(status) + " " +
                                          std::string(parser->get().reason()) + self->What()));
                                }
                                if (self->buffer_.size() > 0) {
                                  return self->Finish(Error(ErrorCode::kNetwork, "the proxy sent bytes after its answer "
                                                                                 "to CONNECT" + self->What()));
                                }
                                self->Handshake();
                              }));
    }));
  }

  void Handshake() {
    conn_->UpgradeToTls(*tls_);
    TlsStream& s = *conn_->tls();
    beast::error_code not_ip;
    (void)asio::ip::make_address(origin_.host, not_ip);
    if (not_ip) SSL_set_tlsext_host_name(s.native_handle(), origin_.host.c_str());  // SNI takes names only
    // OpenSSL checks the name (or address) itself, so that a mismatch is named in the error
    // ("hostname mismatch") rather than left "unspecified" by a verify callback.
    if (not_ip) SSL_set1_host(s.native_handle(), origin_.host.c_str());
    else X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s.native_handle()), origin_.host.c_str());
    conn_->tcp().expires_at(std::min(deadline_, std::chrono::steady_clock::now() + request_.connect_timeout));
    s.async_handshake(ssl::stream_base::client, OnStrand([self = shared_from_this()](beast::error_code ec) {
      if (ec && self->conn_ && self->conn_->tls()) self->verify_result_ = SSL_get_verify_result(self->conn_->tls()->native_handle());
      if (ec) return self->Fail(ec, "the TLS handshake");
      self->Write();
    }));
  }

  void Write() {
    conn_->tcp().expires_at(deadline_);
    conn_->Visit([&](auto& s) {
      http::async_write(s, msg_, OnStrand([self = shared_from_this()](beast::error_code ec, std::size_t) {
        if (ec) return self->Fail(ec, "sending the request");
        self->sent_at_ = std::chrono::steady_clock::now();
        self->ReadHeader();
      }));
    });
  }

  void ReadHeader() {
    parser_.emplace();
    parser_->body_limit(boost::none);  // bounded here, per mode
    if (msg_.method() == http::verb::head) parser_->skip(true);  // its Content-Length is the GET's
    buffer_.clear();
    conn_->tcp().expires_at(ReadBy());
    conn_->Visit([&](auto& s) {
      http::async_read_header(s, buffer_, *parser_, OnStrand([self = shared_from_this()](beast::error_code ec, std::size_t) {
        if (ec) return self->Fail(ec, "reading the answer");
        self->OnHeader();
      }));
    });
  }

  void OnHeader() {
    const auto& res = parser_->get();
    status_ = static_cast<int>(res.result_int());
    for (const auto& f : res) headers_.emplace_back(Lower(f.name_string()), std::string(f.value()));
    if (consumer_ && !consumer_->OnHeaders(status_, headers_)) {
      aborted_ = true;
      return Fail(asio::error::operation_aborted);
    }
    ReadBody();
  }

  // The deadline of the next read: the total one, and for streams the first-byte or the
  // idle one.
  SteadyTime ReadBy() const {
    if (!consumer_) return deadline_;
    const auto now = std::chrono::steady_clock::now();
    const SteadyTime by = got_body_ ? now + timeouts_.idle : sent_at_ + timeouts_.first_byte;
    return std::min(deadline_, by);
  }

  void ReadBody() {
    if (parser_->is_done()) return Done();
    if (paused_) {
      waiting_resume_ = true;
      // No read is pending, so the stream's timer does not run: the total deadline still does.
      pause_timer_.emplace(strand_, deadline_);
      pause_timer_->async_wait(OnStrand([self = shared_from_this()](beast::error_code ec) {
        if (ec || !self->waiting_resume_) return;
        self->waiting_resume_ = false;
        self->Fail(beast::error::timeout, "paused by the reader");
      }));
      return;
    }
    chunk_.resize(kReadChunk);
    parser_->get().body().data = chunk_.data();
    parser_->get().body().size = chunk_.size();
    conn_->tcp().expires_at(ReadBy());
    conn_->Visit([&](auto& s) {
      http::async_read_some(s, buffer_, *parser_, OnStrand([self = shared_from_this()](beast::error_code ec, std::size_t) {
        if (ec == http::error::need_buffer) ec = {};
        if (ec) return self->Fail(ec, "reading the answer");
        self->OnBody(self->chunk_.size() - self->parser_->get().body().size);
      }));
    });
  }

  void OnBody(std::size_t n) {
    if (n > 0) {
      got_body_ = true;
      const std::string_view data(chunk_.data(), n);
      if (consumer_) {
        if (!consumer_->OnData(data, shared_from_this())) {
          aborted_ = true;
          return Fail(asio::error::operation_aborted);
        }
      } else {
        const std::uint64_t limit = request_.max_response_bytes > 0 ? request_.max_response_bytes : kDefaultMaxResponseBytes;
        if (body_.size() + n > limit) {
          if (conn_) conn_->Close();
          conn_.reset();
          return Finish(Error(ErrorCode::kInvalidOutput, request_.method + " " + request_.url + " answered more than " +
                                                             std::to_string(limit) + " bytes"));
        }
        body_.append(data);
      }
    }
    ReadBody();
  }

  void Done() {
    if (parser_->get().keep_alive() && buffer_.size() == 0 && !cancelled_) {
      conn_->tcp().expires_never();
      pool_.Put(key_, std::move(conn_));
    }
    conn_.reset();
    ClientResponse out;
    out.status = status_;
    out.headers = std::move(headers_);
    out.body = std::move(body_);
    Finish(std::move(out));
  }

  // `during`: what was being done, for the message.
  void Fail(beast::error_code ec, std::string_view during = {}) {
    // A reused connection the server closed while it sat idle: try once on a new one.
    const bool nothing_read = !parser_ || !parser_->got_some();
    if (reused_ && nothing_read && !cancelled_ && !aborted_ && ec != beast::error::timeout) {
      reused_ = false;
      conn_.reset();
      parser_.reset();
      headers_.clear();
      return Resolve();
    }
    if (conn_) conn_->Close();
    conn_.reset();
    if (cancelled_) return Finish(Error(ErrorCode::kCancelled, "cancelled" + What()));
    if (aborted_) return Finish(Error(ErrorCode::kCancelled, "the stream was abandoned by its reader" + What()));
    const std::string where = during.empty() ? std::string() : " (" + std::string(during) + ")";
    if (ec == beast::error::timeout) {
      // A stream's read that timed out before the total deadline hit its first-byte or
      // idle bound.
      if (consumer_ && sent_at_ != SteadyTime{} && std::chrono::steady_clock::now() < deadline_) {
        return Finish(Error(ErrorCode::kTimeout,
                            (got_body_ ? "timed out: the stream stalled for over " + std::to_string(timeouts_.idle.count()) + "ms"
                                       : "timed out: no first byte within " + std::to_string(timeouts_.first_byte.count()) + "ms") +
                                What()));
      }
      // Before the request went out and before the total deadline: the connect timeout
      // (which bounds the CONNECT exchange and the TLS handshake too).
      if (sent_at_ == SteadyTime{} && !during.empty() && std::chrono::steady_clock::now() < deadline_) {
        return Finish(Error(ErrorCode::kTimeout, "timed out: " + std::string(during) + " took over " +
                                                     std::to_string(request_.connect_timeout.count()) +
                                                     "ms (the connect timeout)" + What()));
      }
      return Finish(Error(ErrorCode::kTimeout, "timed out: the exchange took over " +
                                                   std::to_string(request_.total_timeout.count()) + "ms" + where + What()));
    }
    if (ClientCertificateRejected(ec)) {
      return Finish(Error(ErrorCode::kAuth, "TLS: the server rejected keel's client certificate" +
                                                std::string(request_.tls.client_cert.empty() ? " (none is configured: set tls.client_cert "
                                                                                               "and tls.client_key)"
                                                                                             : "") +
                                                ": " + ec.message() + What()));
    }
    if (ec.category() == asio::error::get_ssl_category()) {
      std::string detail = ec.message();
      if (verify_result_ != X509_V_OK) detail += ": " + std::string(X509_verify_cert_error_string(verify_result_));
      return Finish(Error(ErrorCode::kNetwork, "TLS" + where + ": " + detail +
                                                   (request_.tls.ca_file.empty() ? " (trusting the system's CA bundle)"
                                                                                 : " (trusting tls.ca_file " + request_.tls.ca_file + ")") +
                                                   What()));
    }
    Finish(Error(ErrorCode::kNetwork, ec.message() + where + What()));
  }

  std::string What() const { return " (" + request_.method + " " + request_.url + ")"; }

  void Finish(Result<ClientResponse> r) {
    if (finished_) return;
    finished_ = true;
    if (pause_timer_) pause_timer_->cancel();
    if (request_.cancel) request_.cancel->Remove(cancel_handle_);
    if (consumer_) {
      auto consumer = std::move(consumer_);
      consumer->OnDone(r.ok() ? Result<int>(r->status) : Result<int>(std::move(r).error()));
      return;
    }
    asio::dispatch(caller_, [done = std::move(done_), r = std::move(r)]() mutable { done(std::move(r)); });
  }

  asio::any_io_executor caller_;
  asio::any_io_executor base_;
  asio::strand<asio::any_io_executor> strand_;
  ConnectionPool& pool_;
  ClientRequest request_;
  std::function<void(Result<ClientResponse>)> done_;
  std::shared_ptr<StreamConsumer> consumer_;
  StreamTimeouts timeouts_;
  SteadyTime deadline_;
  SteadyTime sent_at_{};
  Origin origin_;
  std::optional<Origin> proxy_;
  std::shared_ptr<ssl::context> tls_;
  std::string key_;
  http::request<http::string_body> msg_;
  std::optional<tcp::resolver> resolver_;
  std::optional<asio::steady_timer> pause_timer_;  // the total deadline while paused
  std::unique_ptr<Connection> conn_;
  beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::buffer_body>> parser_;
  std::vector<char> chunk_;
  int status_ = 0;
  Headers headers_;
  std::string body_;
  long verify_result_ = X509_V_OK;
  uint64_t cancel_handle_ = 0;
  bool reused_ = false;
  bool got_body_ = false;
  bool paused_ = false;
  bool waiting_resume_ = false;
  bool cancelled_ = false;
  bool aborted_ = false;
  bool finished_ = false;
};

}  // namespace

std::string ProxyFor(std::string_view url) {
  auto o = ParseOrigin(url, false);
  if (!o.ok()) return {};
  std::string proxy;
  if (o->https) {
    proxy = Env("https_proxy");
    if (proxy.empty()) proxy = Env("HTTPS_PROXY");
  } else {
    proxy = Env("http_proxy");  // lower case only for http:// (as curl: HTTP_PROXY is settable by CGI clients)
  }
  if (proxy.empty()) proxy = Env("all_proxy");
  if (proxy.empty()) proxy = Env("ALL_PROXY");
  if (proxy.empty() || Bypassed(o->host, o->port)) return {};
  return proxy;
}

bool SupportsAsync(const std::string& url) {
  return url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0;
}

void SendHttpAsync(const asio::any_io_executor& executor, ClientRequest request,
                   std::function<void(Result<ClientResponse>)> done) {
  std::make_shared<Exchange>(executor, std::move(request), std::move(done), nullptr, StreamTimeouts{})->Start();
}

void SendHttpStreamAsync(const asio::any_io_executor& executor, ClientRequest request, StreamTimeouts timeouts,
                         std::shared_ptr<StreamConsumer> consumer) {
  std::make_shared<Exchange>(executor, std::move(request), nullptr, std::move(consumer), timeouts)->Start();
}

int IdleConnections(const asio::any_io_executor& executor) { return PoolOf(executor).size(); }

}  // namespace keel::net
