#include "keel/testing/http.h"

#include <thread>

#include "keel/net/http_client.h"

namespace keel::testing {
namespace {
JsonResponse Send(net::ClientRequest req) {
  req.total_timeout = std::chrono::seconds(30);
  JsonResponse out;
  auto r = net::SendHttp(req);
  if (!r.ok()) return out;
  out.status = r->status;
  out.raw = r->body;
  out.headers = r->headers;
  // keel's own codec, with room for the store's envelope: a body keel's rules would
  // refuse (an Infinity, invalid UTF-8) is null here, so tests notice it.
  auto parsed = ParseStoredJson(r->body);
  out.body = parsed.ok() ? std::move(parsed).value() : json::value(nullptr);
  return out;
}
}  // namespace

JsonResponse HttpGet(const std::string& url) {
  net::ClientRequest req;
  req.url = url;
  return Send(std::move(req));
}

JsonResponse HttpPost(const std::string& url, const std::string& body, net::Headers headers) {
  net::ClientRequest req;
  req.method = "POST";
  req.url = url;
  req.body = body;
  req.headers = std::move(headers);
  req.headers.emplace_back("Content-Type", "application/json");
  return Send(std::move(req));
}

JsonResponse HttpPostJson(const std::string& url, const json::value& body, net::Headers headers) {
  return HttpPost(url, json::serialize(body), std::move(headers));
}

bool Eventually(const std::function<bool()>& fn, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (fn()) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace keel::testing
