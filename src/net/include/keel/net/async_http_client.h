#pragma once
// A non-blocking HTTP/1.1 client (Boost.Beast) for plain-HTTP upstreams without a proxy,
// such as an inference server beside keel: it runs on the caller's I/O threads, so a call
// holds no thread while it waits. Keep-alive connections are pooled per I/O context and
// per host and port (an Asio service, so they go away with the context). TLS and proxied
// URLs are for the blocking client (keel/net/http_client.h): SupportsAsync() says which
// one a URL needs.

#include <boost/asio/any_io_executor.hpp>
#include <functional>
#include <string>

#include "keel/core/result.h"
#include "keel/net/http.h"
#include "keel/net/http_client.h"

namespace keel::net {

/// True for an http:// URL when no proxy variable (http_proxy, HTTP_PROXY, all_proxy,
/// ALL_PROXY) is set.
bool SupportsAsync(const std::string& url);

/// Sends `request` with its connect and total timeouts, classified as SendHttp does:
/// transport failures are kTimeout or kNetwork, any HTTP status is a success. The
/// exchange runs on `executor`'s I/O context, and `done` runs on `executor`, exactly
/// once. A pooled connection that the server closed meanwhile is replaced by a new one,
/// once, before any byte of an answer came. The URL must be one SupportsAsync() accepts.
void SendHttpAsync(const boost::asio::any_io_executor& executor, ClientRequest request,
                   std::function<void(Result<ClientResponse>)> done);

/// Idle keep-alive connections pooled on `executor`'s I/O context (for tests).
int IdleConnections(const boost::asio::any_io_executor& executor);

}  // namespace keel::net
