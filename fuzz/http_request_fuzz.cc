// Fuzzes keel's HTTP request parsing (src/net/http_server.cc: Boost.Beast's request
// parser with keel's limits, then keel's checks and its translation into HttpRequest)
// through the real server: one keel::net::HttpServer on a loopback port for the whole
// run, and each input sent as raw bytes on a new connection (several pipelined requests
// in one input are fine). The handler answers 200 after reading every field a keel
// handler reads. Properties: no crash, no hang (every connection is answered or closed
// within 10 s), what reaches a handler is within the limits (body, header block, no CR,
// LF or NUL in a header), and the server serves the next connection.

#include <memory>

#include "fuzz_support.h"
#include "keel/net/http_server.h"
#include "loopback.h"

namespace {

using keel::net::HttpRequest;
using keel::net::HttpResponse;

constexpr std::size_t kMaxBody = 64 << 10;
constexpr std::size_t kMaxHeader = 8 << 10;

void Handle(HttpRequest&& req, keel::net::Responder respond) {
  if (req.method.empty()) keel::fuzz::Fail("a request without a method reached the handler");
  if (req.body.size() > kMaxBody) keel::fuzz::Fail("a body over the limit reached the handler");
  std::size_t header_bytes = 0;
  for (const auto& [name, value] : req.headers) {
    header_bytes += name.size() + value.size();
    if (name.find_first_of(std::string_view("\r\n\0:", 4)) != std::string::npos ||
        value.find_first_of(std::string_view("\r\n\0", 3)) != std::string::npos) {
      keel::fuzz::Fail("a header with CR, LF or NUL reached the handler", name + ": " + value);
    }
  }
  if (header_bytes > kMaxHeader)
    keel::fuzz::Fail("a header block over the limit reached the handler");
  // What keel's handlers read: headers by name, query parameters, the path.
  std::size_t n = req.Header("content-type").size() + req.Header("idempotency-key").size() +
                  req.Header("x-keel-route").size() + req.Header("host").size();
  for (const char* p : {"limit", "cursor", "status", "pipeline", "after", "wait"}) {
    n += req.QueryParam(p).size() + (req.HasQueryParam(p) ? 1 : 0);
  }
  HttpResponse r;
  r.content_type = "text/plain";
  r.body = std::to_string(n + req.path.size() + req.body.size());
  respond(std::move(r));
}

uint16_t Server() {
  static std::unique_ptr<keel::net::HttpServer> server = [] {
    keel::net::ServerOptions o;
    o.io_threads = 1;
    o.max_body_bytes = kMaxBody;
    o.max_header_bytes = kMaxHeader;
    o.idle_timeout = std::chrono::seconds(5);
    auto s = keel::net::HttpServer::Create(o, Handle);
    if (!s.ok()) keel::fuzz::Fail("cannot start the server", s.error().message);
    return std::move(s).value();
  }();
  return server->port();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  const uint16_t port = Server();
  const std::string answer = fuzz::Exchange(port, fuzz::AsText(data, size));
  for (int status : fuzz::Statuses(answer)) {
    if (status >= 500 && status != 503) fuzz::Fail("the server answered 5xx", answer);
  }
  // The server is still serving (every 16 inputs: a probe is a second connection).
  static unsigned n = 0;
  if (++n % 16 == 0) {
    const std::string probe =
        fuzz::Exchange(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if (probe.rfind("HTTP/1.1 200", 0) != 0) fuzz::Fail("the server stopped serving", probe);
  }
  return 0;
}
