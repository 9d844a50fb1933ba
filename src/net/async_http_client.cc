#include "keel/net/async_http_client.h"

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/url/parse.hpp>
#include <cctype>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace keel::net {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using SteadyTime = std::chrono::steady_clock::time_point;

constexpr std::size_t kMaxIdlePerHost = 256;
constexpr std::uint64_t kMaxResponseBytes = 64ull << 20;

// Idle keep-alive connections of one I/O context, by "host:port". A service of the
// context: it is shut down (closing the sockets) before the context's reactor goes.
class ConnectionPool final : public asio::execution_context::service {
 public:
  static inline asio::execution_context::id id;
  explicit ConnectionPool(asio::execution_context& ctx) : service(ctx) {}

  std::unique_ptr<beast::tcp_stream> Take(const std::string& key) {
    std::lock_guard lock(mu_);
    auto it = idle_.find(key);
    if (it == idle_.end() || it->second.empty()) return nullptr;
    auto s = std::move(it->second.back());
    it->second.pop_back();
    return s;
  }

  void Put(const std::string& key, std::unique_ptr<beast::tcp_stream> s) {
    std::lock_guard lock(mu_);
    if (shut_) return;
    auto& v = idle_[key];
    if (v.size() < kMaxIdlePerHost) v.push_back(std::move(s));
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
  std::map<std::string, std::vector<std::unique_ptr<beast::tcp_stream>>> idle_;  // GUARDED_BY(mu_)
};

// The I/O context's own executor under a strand: upstream sockets need no strand (one
// exchange uses a connection at a time), and a pooled connection serves any caller.
asio::any_io_executor BaseExecutor(const asio::any_io_executor& ex) {
  if (const auto* s = ex.target<asio::strand<asio::io_context::executor_type>>()) return s->get_inner_executor();
  if (const auto* s = ex.target<asio::strand<asio::any_io_executor>>()) return s->get_inner_executor();
  return ex;
}

ConnectionPool& PoolOf(const asio::any_io_executor& ex) {
  return asio::use_service<ConnectionPool>(asio::query(ex, asio::execution::context));
}

// One request: connect (or reuse), write, read, hand the connection back.
class Exchange : public std::enable_shared_from_this<Exchange> {
 public:
  Exchange(asio::any_io_executor caller, ClientRequest request, std::function<void(Result<ClientResponse>)> done)
      : caller_(std::move(caller)),
        base_(BaseExecutor(caller_)),
        pool_(PoolOf(caller_)),
        request_(std::move(request)),
        done_(std::move(done)),
        deadline_(std::chrono::steady_clock::now() + request_.total_timeout) {}

  void Start() {
    auto url = boost::urls::parse_uri(request_.url);
    if (!url || url->scheme() != "http" || url->host().empty()) {
      return Finish(Error(ErrorCode::kInvalidRequest, "not an http:// URL: " + request_.url));
    }
    host_ = std::string(url->encoded_host());
    port_ = url->has_port() ? std::string(url->port()) : "80";
    key_ = host_ + ":" + port_;
    target_ = std::string(url->encoded_path());
    if (target_.empty()) target_ = "/";
    if (url->has_query()) target_ += "?" + std::string(url->encoded_query());
    BuildRequest();
    stream_ = pool_.Take(key_);
    if (stream_) {
      reused_ = true;
      Write();
    } else {
      Resolve();
    }
  }

 private:
  void BuildRequest() {
    const auto verb = http::string_to_verb(request_.method);
    msg_.method(verb == http::verb::unknown ? http::verb::get : verb);
    msg_.target(target_);
    msg_.version(11);
    msg_.set(http::field::host, port_ == "80" ? host_ : key_);
    for (const auto& [k, v] : request_.headers) msg_.set(k, v);
    msg_.keep_alive(true);
    msg_.body() = std::move(request_.body);
    msg_.prepare_payload();
  }

  void Resolve() {
    resolver_.emplace(base_);
    resolver_->async_resolve(host_, port_, [self = shared_from_this()](beast::error_code ec, tcp::resolver::results_type results) {
      if (ec) return self->Finish(Error(ErrorCode::kNetwork, "cannot resolve " + self->host_ + ": " + ec.message() + self->What()));
      self->Connect(results);
    });
  }

  void Connect(const tcp::resolver::results_type& results) {
    stream_ = std::make_unique<beast::tcp_stream>(base_);
    const auto connect_by = std::min(deadline_, std::chrono::steady_clock::now() + request_.connect_timeout);
    stream_->expires_at(connect_by);
    stream_->async_connect(results, [self = shared_from_this()](beast::error_code ec, const tcp::endpoint&) {
      if (ec == beast::error::timeout) return self->Finish(Error(ErrorCode::kTimeout, "timed out: connect" + self->What()));
      if (ec) return self->Finish(Error(ErrorCode::kNetwork, "cannot connect: " + ec.message() + self->What()));
      beast::error_code ignored;
      self->stream_->socket().set_option(tcp::no_delay(true), ignored);
      self->Write();
    });
  }

  void Write() {
    stream_->expires_at(deadline_);
    http::async_write(*stream_, msg_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) return self->Failed(ec);
      self->Read();
    });
  }

  void Read() {
    parser_.emplace();
    parser_->body_limit(kMaxResponseBytes);
    buffer_.clear();
    http::async_read(*stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) return self->Failed(ec);
      self->Done();
    });
  }

  void Failed(beast::error_code ec) {
    // A reused connection the server closed while it sat idle: try once on a new one.
    const bool nothing_read = !parser_ || !parser_->got_some();
    if (reused_ && nothing_read && ec != beast::error::timeout) {
      reused_ = false;
      stream_.reset();
      parser_.reset();
      return Resolve();
    }
    stream_.reset();
    if (ec == beast::error::timeout) return Finish(Error(ErrorCode::kTimeout, "timed out: the exchange took over " +
                                                                              std::to_string(request_.total_timeout.count()) +
                                                                              "ms" + What()));
    Finish(Error(ErrorCode::kNetwork, ec.message() + What()));
  }

  void Done() {
    auto res = parser_->release();
    ClientResponse out;
    out.status = static_cast<int>(res.result_int());
    for (const auto& f : res) {
      std::string name(f.name_string());
      std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
      out.headers.emplace_back(std::move(name), std::string(f.value()));
    }
    out.body = std::move(res.body());
    if (res.keep_alive() && buffer_.size() == 0) {
      stream_->expires_never();
      pool_.Put(key_, std::move(stream_));
    }
    stream_.reset();
    Finish(std::move(out));
  }

  std::string What() const { return " (" + request_.method + " " + request_.url + ")"; }

  void Finish(Result<ClientResponse> r) {
    asio::dispatch(caller_, [done = std::move(done_), r = std::move(r)]() mutable { done(std::move(r)); });
  }

  asio::any_io_executor caller_;
  asio::any_io_executor base_;
  ConnectionPool& pool_;
  ClientRequest request_;
  std::function<void(Result<ClientResponse>)> done_;
  SteadyTime deadline_;
  std::string host_, port_, key_, target_;
  http::request<http::string_body> msg_;
  std::optional<tcp::resolver> resolver_;
  std::unique_ptr<beast::tcp_stream> stream_;
  beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::string_body>> parser_;
  bool reused_ = false;
};

bool EnvSet(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0';
}

}  // namespace

bool SupportsAsync(const std::string& url) {
  if (url.rfind("http://", 0) != 0) return false;
  return !(EnvSet("http_proxy") || EnvSet("HTTP_PROXY") || EnvSet("all_proxy") || EnvSet("ALL_PROXY"));
}

void SendHttpAsync(const asio::any_io_executor& executor, ClientRequest request,
                   std::function<void(Result<ClientResponse>)> done) {
  std::make_shared<Exchange>(executor, std::move(request), std::move(done))->Start();
}

int IdleConnections(const asio::any_io_executor& executor) { return PoolOf(executor).size(); }

}  // namespace keel::net
