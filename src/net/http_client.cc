#include "keel/net/http_client.h"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <mutex>

namespace keel::net {
namespace {

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// One handle per thread: curl keeps the thread's connections alive between requests.
struct Handle {
  CURL* curl = nullptr;
  Handle() {
    GlobalInit();
    curl = curl_easy_init();
  }
  ~Handle() {
    if (curl) curl_easy_cleanup(curl);
  }
};

// The body of SendHttp, up to its bound.
struct BodySink {
  std::string* body;
  std::size_t max;  // 0: no bound
  bool exceeded = false;
};

size_t OnBody(char* data, size_t size, size_t n, void* user) {
  auto* sink = static_cast<BodySink*>(user);
  if (sink->max != 0 && sink->body->size() + size * n > sink->max) {
    sink->exceeded = true;
    return 0;  // curl abandons the transfer (CURLE_WRITE_ERROR)
  }
  sink->body->append(data, size * n);
  return size * n;
}

size_t OnHeader(char* data, size_t size, size_t n, void* user) {
  auto* headers = static_cast<Headers*>(user);
  std::string_view line(data, size * n);
  if (line.rfind("HTTP/", 0) == 0) {
    headers->clear();  // a new response (after 100-continue or a redirect)
    return size * n;
  }
  const auto colon = line.find(':');
  if (colon == std::string_view::npos) return size * n;
  std::string name(line.substr(0, colon));
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  std::string_view value = line.substr(colon + 1);
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
  while (!value.empty() && (value.back() == '\r' || value.back() == '\n' || value.back() == ' '))
    value.remove_suffix(1);
  headers->emplace_back(std::move(name), std::string(value));
  return size * n;
}

// State of one streaming exchange, shared by curl's callbacks.
struct StreamState {
  const OnHeaders* on_headers;
  const OnData* on_data;
  CURL* curl;
  Headers headers;
  bool headers_done = false;
  bool aborted_by_callback = false;
  bool timed_out = false;
  std::string timeout_what;
  std::chrono::steady_clock::time_point start;
  std::chrono::steady_clock::time_point last_byte;
  bool any_byte = false;
  StreamTimeouts timeouts;
  const ClientRequest* request = nullptr;
  bool was_cancelled = false;
};

size_t OnStreamBody(char* data, size_t size, size_t n, void* user) {
  auto* st = static_cast<StreamState*>(user);
  if (!st->headers_done) {
    st->headers_done = true;
    long status = 0;
    curl_easy_getinfo(st->curl, CURLINFO_RESPONSE_CODE, &status);
    if (*st->on_headers && !(*st->on_headers)(static_cast<int>(status), st->headers)) {
      st->aborted_by_callback = true;
      return 0;
    }
  }
  st->any_byte = true;
  st->last_byte = std::chrono::steady_clock::now();
  if (!(*st->on_data)(std::string_view(data, size * n))) {
    st->aborted_by_callback = true;
    return 0;
  }
  return size * n;
}

bool Cancelled(const ClientRequest& r) {
  return (r.cancelled != nullptr && r.cancelled->load()) || (r.cancel && r.cancel->cancelled());
}

int OnCancelProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  return Cancelled(*static_cast<const ClientRequest*>(user)) ? 1 : 0;
}

int OnStreamProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto* st = static_cast<StreamState*>(user);
  if (Cancelled(*st->request)) {
    st->was_cancelled = true;
    return 1;
  }
  const auto now = std::chrono::steady_clock::now();
  if (!st->any_byte && now - st->start > st->timeouts.first_byte) {
    st->timed_out = true;
    st->timeout_what =
        "no first byte within " + std::to_string(st->timeouts.first_byte.count()) + "ms";
    return 1;
  }
  if (st->any_byte && now - st->last_byte > st->timeouts.idle) {
    st->timed_out = true;
    st->timeout_what =
        "the stream stalled for over " + std::to_string(st->timeouts.idle.count()) + "ms";
    return 1;
  }
  return 0;
}

// Options every request sets; returns the header list to free after the transfer.
curl_slist* SetCommon(CURL* c, const ClientRequest& request) {
  curl_slist* headers = nullptr;
  for (const auto& [k, v] : request.headers)
    headers = curl_slist_append(headers, (k + ": " + v).c_str());
  // No "Expect: 100-continue" round trip for large bodies.
  headers = curl_slist_append(headers, "Expect:");
  curl_easy_setopt(c, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
  // curl reads 0 as "no timeout" (300s for connect): a spent budget must not become none.
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                   std::max(1L, static_cast<long>(request.connect_timeout.count())));
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS,
                   std::max(1L, static_cast<long>(request.total_timeout.count())));
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  if (!request.tls.ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, request.tls.ca_file.c_str());
  if (!request.tls.client_cert.empty()) curl_easy_setopt(c, CURLOPT_SSLCERT, request.tls.client_cert.c_str());
  if (!request.tls.client_key.empty()) curl_easy_setopt(c, CURLOPT_SSLKEY, request.tls.client_key.c_str());
  return headers;
}

}  // namespace

Result<int> SendHttpStreaming(const ClientRequest& request, const StreamTimeouts& timeouts,
                              const OnHeaders& on_headers, const OnData& on_data) {
  // A dedicated handle: a stream may be abandoned mid-body, which must not poison the
  // thread's keep-alive handle.
  thread_local Handle handle;
  CURL* c = handle.curl;
  if (c == nullptr) return Error(ErrorCode::kInternal, "curl_easy_init failed");
  curl_easy_reset(c);
  StreamState st{&on_headers, &on_data, c};
  st.start = st.last_byte = std::chrono::steady_clock::now();
  st.timeouts = timeouts;
  st.request = &request;
  curl_slist* headers = SetCommon(c, request);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, OnStreamBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &st);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &st.headers);
  curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, OnStreamProgress);
  curl_easy_setopt(c, CURLOPT_XFERINFODATA, &st);
  curl_easy_setopt(c, CURLOPT_POST, 1L);
  curl_easy_setopt(c, CURLOPT_POSTFIELDS, request.body.data());
  curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  const CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  if (rc == CURLE_OK && !st.headers_done && on_headers) {
    // An empty body: the headers callback has not run yet.
    if (!on_headers(static_cast<int>(status), st.headers))
      return Error(ErrorCode::kCancelled, "aborted");
  }
  if (rc != CURLE_OK) {
    const std::string what = " (" + request.method + " " + request.url + ")";
    if (st.was_cancelled) return Error(ErrorCode::kCancelled, "cancelled" + what);
    if (st.timed_out) return Error(ErrorCode::kTimeout, "timed out: " + st.timeout_what + what);
    if (st.aborted_by_callback)
      return Error(ErrorCode::kCancelled, "the stream was abandoned by its reader" + what);
    if (rc == CURLE_OPERATION_TIMEDOUT)
      return Error(ErrorCode::kTimeout, std::string("timed out: ") + curl_easy_strerror(rc) + what);
    return Error(ErrorCode::kNetwork, curl_easy_strerror(rc) + what);
  }
  return static_cast<int>(status);
}

Result<ClientResponse> SendHttp(const ClientRequest& request) {
  thread_local Handle handle;
  CURL* c = handle.curl;
  if (c == nullptr) return Error(ErrorCode::kInternal, "curl_easy_init failed");
  curl_easy_reset(c);
  ClientResponse response;
  curl_slist* headers = SetCommon(c, request);
  BodySink sink{&response.body, request.max_response_bytes};
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &sink);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &response.headers);
  if (request.method == "POST" || request.method == "PUT" || request.method == "PATCH") {
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, request.body.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  }
  if (request.method != "GET" && request.method != "POST") {
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  }
  if (request.cancelled != nullptr || request.cancel) {
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, OnCancelProgress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, const_cast<ClientRequest*>(&request));
  }
  const CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  if (sink.exceeded) {
    return Error(ErrorCode::kInvalidOutput,
                 request.method + " " + request.url + " answered more than " +
                     std::to_string(request.max_response_bytes) + " bytes");
  }
  if (rc != CURLE_OK) {
    const std::string what =
        std::string(curl_easy_strerror(rc)) + " (" + request.method + " " + request.url + ")";
    switch (rc) {
      case CURLE_ABORTED_BY_CALLBACK:
        return Error(ErrorCode::kCancelled,
                     "cancelled (" + request.method + " " + request.url + ")");
      case CURLE_OPERATION_TIMEDOUT:
        return Error(ErrorCode::kTimeout, "timed out: " + what);
      default:
        return Error(ErrorCode::kNetwork, what);
    }
  }
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  response.status = static_cast<int>(status);
  return response;
}

}  // namespace keel::net
