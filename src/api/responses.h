#pragma once
// Building HTTP answers in keel's shapes.

#include "keel/core/error.h"
#include "keel/core/json.h"
#include "keel/net/digest.h"
#include "keel/net/http.h"
#include "keel/store/store.h"

namespace keel::api {

inline net::HttpResponse JsonResponse(int status, const json::value& body) {
  net::HttpResponse r;
  r.status = status;
  r.body = json::serialize(body);
  r.body.push_back('\n');
  return r;
}

/// {"error": {"type", "message", "param"}} with the status of the error's class, and
/// Retry-After when the error names a delay.
inline net::HttpResponse ErrorResponse(const Error& e, int status = 0) {
  // OpenAI's shape: type, message, param, code (the class again, for SDKs that read it).
  json::object err{{"type", ErrorCodeName(e.code)}, {"message", e.message},
                   {"param", e.param.empty() ? json::value(nullptr) : json::value(e.param)},
                   {"code", ErrorCodeName(e.code)}};
  auto r = JsonResponse(status ? status : HttpStatusFor(e.code), json::object{{"error", std::move(err)}});
  if (e.retry_after) {
    r.headers.emplace_back("Retry-After", std::to_string(std::max<int64_t>(1, (e.retry_after->count() + 999) / 1000)));
  }
  return r;
}

using net::Sha256Hex;

json::value RunToJson(const store::RunRecord& run, bool with_steps);
json::value EventToJson(const store::Event& e);

}  // namespace keel::api
