#pragma once
// An HTTP/1.1 server (Boost.Beast) with keep-alive, bounded request sizes, a bound on
// open connections (in all and per client address), and header and idle timeouts.
// Request handlers answer asynchronously, so a handler may hand work to another thread
// (or a timer) and answer from there.
//
// What reaches a handler was checked against RFC 9112 first; the server itself answers
// 400 and closes the connection for: a malformed message, an HTTP/1.1 request without
// a Host header (or with two), a Transfer-Encoding other than a single `chunked` (or
// with a Content-Length too), a request target that is neither a path (origin-form)
// nor an absolute http(s) URL (absolute-form, routed by its path), and a path with a
// malformed escape or one that decodes to a control character or invalid UTF-8. Its
// own error bodies are ASCII JSON: {"error":{"type":...,"message":...}}.

#include <boost/asio/any_io_executor.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "keel/core/cancel.h"
#include "keel/core/result.h"
#include "keel/net/http.h"

namespace keel::net {

/// The body of a streamed answer (chunked transfer encoding), e.g. server-sent events.
/// Used from one thread at a time; calls block until the bytes are handed to the socket,
/// so never use it on an I/O thread.
class ChunkedWriter {
 public:
  virtual ~ChunkedWriter() = default;
  /// Sends one chunk. False when the client has gone (the caller should stop).
  virtual bool Write(std::string_view data) = 0;
  /// Ends the answer with the last chunk; the connection may serve the next request.
  /// Idempotent; the destructor calls it.
  virtual void Finish() = 0;
  /// Resets the connection (RST) instead of finishing: for fault injection.
  virtual void Reset() = 0;
};

/// The body of a streamed answer (chunked transfer encoding) written without blocking:
/// for handlers that run on the connection's I/O thread. Every call must be made on the
/// connection's executor (Responder::executor()). Memory is the caller's to bound: queue
/// a chunk, and once buffered() is past what the caller allows, wait for OnDrained before
/// producing more (that is how a slow reader holds back its upstream).
class AsyncChunkedWriter {
 public:
  virtual ~AsyncChunkedWriter() = default;
  /// Queues one chunk. False when the client has gone (nothing queued; stop producing).
  virtual bool Write(std::string data) = 0;
  /// Bytes queued and not yet handed to the socket.
  virtual std::size_t buffered() const = 0;
  /// Runs `fn` on the connection's executor once nothing is queued or the client has
  /// gone: at once (inline) when that is already so. One waiter at a time (a second call
  /// replaces the first).
  virtual void OnDrained(std::function<void()> fn) = 0;
  /// True once a write failed or the client closed the connection.
  virtual bool gone() const = 0;
  /// Ends the answer with the last chunk once the queue is written; the connection may
  /// serve the next request. Idempotent; the destructor calls it.
  virtual void Finish() = 0;
  /// Resets the connection (RST) instead of finishing, once what was queued is written:
  /// for fault injection.
  virtual void Reset() = 0;
};

/// Answers one request: either once with a whole response (operator()), or by
/// StartStream and then chunks. Copyable; any thread. If every copy is destroyed without
/// an answer, the client gets a 500.
class Responder {
 public:
  struct State;
  explicit Responder(std::shared_ptr<State> state) : state_(std::move(state)) {}
  /// Sends a whole response. Only the first answer counts.
  void operator()(HttpResponse response) const;
  /// Sends the status line and headers of a chunked response (blocking until written)
  /// and returns the writer for its body; null if an answer was already given or the
  /// client is gone. Must not be called on an I/O thread.
  std::unique_ptr<ChunkedWriter> StartStream(int status, std::string content_type,
                                             Headers headers = {}) const;
  /// StartStream without blocking: queues the status line and headers and returns the
  /// writer of the body; null if an answer was already given or the client is gone. Call
  /// it on the connection's executor.
  std::shared_ptr<AsyncChunkedWriter> StartStreamAsync(int status, std::string content_type,
                                                       Headers headers = {}) const;
  /// Cancelled when the client closes its connection (or a write to it fails) before this
  /// request's answer is complete: whatever the handler started for it should stop.
  /// Detected while the server waits for the handler, without reading the next request.
  /// Never null.
  std::shared_ptr<CancelSignal> client_gone() const;
  /// The connection's executor (a strand of the server's I/O context): asynchronous work
  /// for this request (keel/net/async_http_client.h) runs there, and answers from it
  /// without a thread switch.
  boost::asio::any_io_executor executor() const;

 private:
  std::shared_ptr<State> state_;
};

/// Runs on an I/O thread; must not block. Answers through `respond`.
using Handler = std::function<void(HttpRequest&& request, Responder respond)>;

struct ServerOptions {
  /// Address to bind. Default: 127.0.0.1.
  std::string host = "127.0.0.1";
  /// Port; 0 picks a free ephemeral port (see HttpServer::port()). Default: 0.
  uint16_t port = 0;
  /// Threads running the I/O loop. Default: 2. Range: 1..64.
  int io_threads = 2;
  /// Largest body accepted; a larger one is answered 413. Default: 1 MiB.
  std::size_t max_body_bytes = 1 << 20;
  /// The setting that sets max_body_bytes, named in the 413's message so that a client
  /// knows what to ask for. Default: "max_body_bytes".
  std::string max_body_setting = "max_body_bytes";
  /// A request's own body limit and its setting's name, decided from its header (method,
  /// path, segments: already checked) before the body is read; when unset, or when it
  /// answers 0 bytes, max_body_bytes applies. Runs on an I/O thread. Default: unset.
  struct BodyLimit {
    std::size_t bytes = 0;
    std::string setting;
  };
  std::function<BodyLimit(const HttpRequest&)> body_limit;
  /// Largest header block; a larger one is answered 431. Default: 16 KiB.
  std::size_t max_header_bytes = 16 << 10;
  /// Connections open at once; more are answered 503 and closed. Default: 1024.
  int max_connections = 1024;
  /// Connections open at once from one client address (an IPv6 client: its /64); that
  /// address's further connections are answered 503 and closed, other clients' are not
  /// affected. 0: a quarter of max_connections (at least 1). Default: 0.
  int max_connections_per_address = 0;
  /// A keep-alive connection with no request in flight is closed after this; it also
  /// bounds reading a request's body. Default: 60s.
  std::chrono::milliseconds idle_timeout{60000};
  /// A request's header block must arrive whole within this: counted from the accept for
  /// a connection's first request, from its first byte for the next ones. Otherwise the
  /// connection is closed. Default: 10s.
  std::chrono::milliseconds header_timeout{10000};
};

class HttpServer {
 public:
  /// Binds and starts serving. Fails (kUnavailable) when the address cannot be bound.
  static Result<std::unique_ptr<HttpServer>> Create(const ServerOptions& options, Handler handler);

  virtual ~HttpServer() = default;
  /// The bound port (useful with port 0).
  virtual uint16_t port() const = 0;
  /// Runs `fn` on an I/O thread after `delay`, unless the server stops first. Thread-safe.
  virtual void After(std::chrono::milliseconds delay, std::function<void()> fn) = 0;
  /// Stops accepting, closes every connection and joins the I/O threads. Idempotent.
  virtual void Stop() = 0;
  /// Connections open now.
  virtual int open_connections() const = 0;
};

}  // namespace keel::net
