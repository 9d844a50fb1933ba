#pragma once
// keel's outbound HTTP/1.1 client (Boost.Beast on Asio, TLS by OpenSSL): every call runs on
// the caller's I/O threads, so a call holds no thread while it waits, whatever it is (a
// whole answer or a stream, http:// or https://, direct or through a proxy).
//
// - Keep-alive connections are pooled per I/O context, per origin (scheme, host, port),
//   per proxy and per TLS settings (an Asio service, so they go away with the context).
// - https://: certificate verification is always on, with SNI and host name checks;
//   trusted CAs are the system bundle or request.tls.ca_file, and request.tls may present
//   a client certificate (mTLS). TLS contexts are built once per distinct TlsSettings.
// - Proxies: http_proxy/HTTP_PROXY for http:// URLs (absolute-form requests),
//   https_proxy/HTTPS_PROXY for https:// URLs (a CONNECT tunnel, then TLS end to end),
//   all_proxy/ALL_PROXY for both, no_proxy/NO_PROXY to bypass ("*", host names, domain
//   suffixes such as ".internal", optionally with :port). A proxy URL's user and password
//   are sent as Proxy-Authorization: Basic.
// - Failures are classified as the blocking client does: kTimeout (connect, first byte,
//   idle or total deadline), kNetwork (DNS, refused, reset, TLS handshake or certificate
//   verification, a proxy that refuses CONNECT), kAuth (the server rejected keel's client
//   certificate), kCancelled (request.cancel fired); every message names the method and
//   URL (never a password) and what failed. Any HTTP status is a success here.

#include <boost/asio/any_io_executor.hpp>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "keel/core/result.h"
#include "keel/net/http.h"
#include "keel/net/http_client.h"

namespace keel::net {

/// True for the URLs this client serves: http:// and https://. (Kept for callers that
/// choose between clients; every such URL is served, proxied or not.)
bool SupportsAsync(const std::string& url);

/// Sends `request` with its connect and total timeouts. The exchange runs on `executor`'s
/// I/O context, and `done` runs on `executor`, exactly once. A pooled connection that the
/// server closed meanwhile is replaced by a new one, once, before any byte of an answer
/// came. A body past request.max_response_bytes (or 64 MiB when that is 0) fails
/// kInvalidOutput.
void SendHttpAsync(const boost::asio::any_io_executor& executor, ClientRequest request,
                   std::function<void(Result<ClientResponse>)> done);

/// Controls a streamed exchange from its consumer. Thread-safe.
class StreamControl {
 public:
  virtual ~StreamControl() = default;
  /// Stop reading the body after the current OnData until Resume(): the upstream is held
  /// by TCP flow control, the idle timeout does not run while paused (the total one does).
  virtual void Pause() = 0;
  virtual void Resume() = 0;
};

/// What a streamed exchange tells its consumer. Every callback runs on the executor given
/// to SendHttpStreamAsync, one at a time.
class StreamConsumer {
 public:
  virtual ~StreamConsumer() = default;
  /// The status and headers (names lower-cased) are in. Return false to abort
  /// (kCancelled).
  virtual bool OnHeaders(int status, const Headers& headers) = 0;
  /// A piece of the body, as it arrived (chunked framing removed). Return false to abort
  /// (kCancelled). For backpressure, call control->Pause() (and later Resume(), from any
  /// thread; after the exchange ended it does nothing).
  virtual bool OnData(std::string_view data, const std::shared_ptr<StreamControl>& control) = 0;
  /// The exchange ended: the status once the body is whole, or the failure. Exactly once,
  /// last (also after an abort).
  virtual void OnDone(Result<int> result) = 0;
};

/// Sends one request and hands its body to `consumer` piece by piece as it arrives (for
/// server-sent events). Besides the request's connect and total timeouts, fails kTimeout
/// when no body byte came within `timeouts.first_byte` of sending the request, or none
/// for `timeouts.idle` after the last one while reading. The consumer is kept alive until
/// OnDone returned.
void SendHttpStreamAsync(const boost::asio::any_io_executor& executor,
                                                   ClientRequest request, StreamTimeouts timeouts,
                                                   std::shared_ptr<StreamConsumer> consumer);

/// Idle keep-alive connections pooled on `executor`'s I/O context (for tests).
int IdleConnections(const boost::asio::any_io_executor& executor);

/// The proxy URL the environment names for `url` (empty: connect directly), by the rules
/// above. Read at each call, so that tests may set the variables.
std::string ProxyFor(std::string_view url);

}  // namespace keel::net
