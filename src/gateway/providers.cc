#include <cctype>
#include <charconv>
#include <chrono>
#include <thread>

#include "keel/core/secrets.h"
#include "keel/core/sse.h"
#include "keel/gateway/mock_llm.h"
#include "keel/net/async_http_client.h"
#include "keel/net/http_client.h"
#include "provider.h"

namespace keel::gateway::detail {

// Reads an OpenAI-shaped error body: {"error": {"message", "type", "code"}}.
Error UpstreamError(int status, const net::Headers& headers, std::string_view body, const std::string& provider) {
  ErrorCode code = ClassifyHttpStatus(status);
  std::string message;
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  if (!ec && v.is_object()) {
    if (const auto* e = v.get_object().if_contains("error"); e && e->is_object()) {
      const auto& eo = e->get_object();
      if (const auto* m = eo.if_contains("message"); m && m->is_string()) message = m->get_string();
      std::string c;
      if (const auto* cv = eo.if_contains("code"); cv && cv->is_string()) c = cv->get_string();
      if (c == "context_length_exceeded") code = ErrorCode::kContextLength;
      if (c == "content_filter" || c == "content_policy_violation") code = ErrorCode::kContentPolicy;
    }
  }
  // Scrubbed before it is cut, so that a cut cannot leave part of a secret.
  if (message.empty()) message = RedactSecrets(body).substr(0, 200);
  Error err(code, "provider " + provider + " answered " + std::to_string(status) + ": " + RedactSecrets(message));
  const auto ra = net::FindHeader(headers, "retry-after");
  int64_t secs = 0;
  if (!ra.empty()) {
    const auto [p, rc] = std::from_chars(ra.data(), ra.data() + ra.size(), secs);
    if (rc == std::errc() && secs >= 0) err.retry_after = Duration(secs * 1000);
  }
  return err;
}

std::string MessageText(const json::value* content) {
  if (content == nullptr) return {};
  if (content->is_string()) return std::string(content->get_string());
  std::string text;
  if (content->is_array()) {
    for (const auto& part : content->get_array()) {
      if (!part.is_object()) continue;
      const auto& po = part.get_object();
      const auto* type = po.if_contains("type");
      const auto* t = po.if_contains("text");
      if (type && type->is_string() && type->get_string() == "text" && t && t->is_string()) {
        text.append(t->get_string().data(), t->get_string().size());
      }
    }
  }
  return text;
}

// Reads a chat-completions success body; garbage is an invalid_output of this target.
// Only what keel needs is checked: a JSON object with a `choices` array; `model` and
// `usage` are read when they have their types. Everything else (tool calls, refusals,
// logprobs, several choices, content parts, usage details) is relayed as it came.
Result<ChatResult> ParseCompletion(std::string_view body, const std::string& provider) {
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  auto bad = [&](std::string_view why) {
    return Error(ErrorCode::kInvalidOutput, "provider " + provider + " answered an unusable completion: " + std::string(why));
  };
  if (ec) return bad("not JSON (" + ec.message() + ")");
  if (!v.is_object()) return bad("not a JSON object");
  const auto& o = v.get_object();
  const auto* choices = o.if_contains("choices");
  if (!choices || !choices->is_array()) return bad("no \"choices\" array");
  ChatResult r;
  if (!choices->get_array().empty()) {
    const auto& first = choices->get_array()[0];
    r.text = MessageText(first.is_object() ? FindPath(first, "message.content") : nullptr);
  }
  r.response = o;
  if (const auto* m = o.if_contains("model"); m && m->is_string()) r.model = m->get_string();
  if (const auto* u = o.if_contains("usage"); u && u->is_object()) r.usage = *u;
  r.provider = provider;
  return r;
}

// Folds one chat.completion.chunk into the result being built.
void Accumulate(const json::object& chunk, ChatResult& r) {
  if (const auto* m = chunk.if_contains("model"); m && m->is_string() && r.model.empty()) r.model = m->get_string();
  if (const auto* u = chunk.if_contains("usage"); u && u->is_object()) r.usage = *u;
  const auto* choices = chunk.if_contains("choices");
  if (!choices || !choices->is_array()) return;
  for (const auto& c : choices->get_array()) {
    if (!c.is_object()) continue;
    // The text of the first choice (index 0, or no index); other choices are relayed only.
    const auto* index = c.get_object().if_contains("index");
    if (index != nullptr && !(index->is_int64() && index->get_int64() == 0) &&
        !(index->is_uint64() && index->get_uint64() == 0)) {
      continue;
    }
    r.text += MessageText(FindPath(c, "delta.content"));
  }
}

Result<ChatResult> Provider::Embed(const json::object&, const ChatRequest&, Duration) {
  return Error(ErrorCode::kInvalidRequest, "this provider's wire format has no embeddings");
}

// Reads an OpenAI embeddings list.
Result<ChatResult> ParseEmbeddings(std::string_view body, const std::string& provider) {
  boost::system::error_code ec;
  json::value v = json::parse(body, ec);
  if (ec || !v.is_object() || !v.get_object().contains("data") || !v.get_object().at("data").is_array()) {
    return Error(ErrorCode::kInvalidOutput, "provider " + provider + " answered an unusable embeddings list");
  }
  ChatResult r;
  r.response = std::move(v.as_object());
  if (const auto* m = r.response.if_contains("model"); m && m->is_string()) r.model = m->get_string();
  if (const auto* u = r.response.if_contains("usage"); u && u->is_object()) r.usage = *u;
  r.provider = provider;
  return r;
}

Result<EventStream> StreamEvents(const net::ClientRequest& http, const net::StreamTimeouts& timeouts,
                                 const std::string& provider, const SseParser::Callback& on_event) {
  EventStream out;
  bool stopped = false;
  SseParser parser([&](const SseEvent& ev) {
    stopped = !on_event(ev);
    return !stopped;
  });
  bool overlong = false;
  auto r = net::SendHttpStreaming(
      http, timeouts,
      [&](int s, const net::Headers& h) {
        out.status = s;
        out.headers = h;
        return true;
      },
      [&](std::string_view data) {
        if (out.status < 200 || out.status >= 300) {
          if (out.error_body.size() < 65536) out.error_body.append(data);
          return true;
        }
        if (parser.Feed(data)) return true;
        overlong = !stopped;
        return false;
      });
  if (stopped) return Error(ErrorCode::kCancelled, "the stream was stopped by its reader");
  if (overlong) return Error(ErrorCode::kInvalidOutput, "provider " + provider + " streamed a line longer than 1 MiB");
  if (!r.ok()) {
    Error e = std::move(r).error();
    e.message = "provider " + provider + ": " + e.message;
    return e;
  }
  return out;
}

std::string QueryString(const std::map<std::string, std::string>& query) {
  std::string out;
  for (const auto& [k, v] : query) out += (out.empty() ? "?" : "&") + net::PercentEncode(k) + "=" + net::PercentEncode(v);
  return out;
}

namespace {

class OpenAiProvider final : public Provider {
 public:
  explicit OpenAiProvider(ProviderConfig config)
      : config_(std::move(config)),
        url_(config_.base_url + "/chat/completions" + QueryString(config_.query)),
        embeddings_url_(config_.base_url + "/embeddings" + QueryString(config_.query)) {}

  Result<ChatResult> Chat(const json::object& body, const ChatRequest& req, Duration timeout) override {
    return Completion(net::SendHttp(Request(url_, json::serialize(body), "application/json", req, timeout)));
  }

  bool async() const override { return async_; }

  void ChatAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                 const boost::asio::any_io_executor& executor, std::function<void(Result<ChatResult>)> done) override {
    if (!async_) return Provider::ChatAsync(body, req, timeout, executor, std::move(done));
    net::SendHttpAsync(executor, Request(url_, json::serialize(body), "application/json", req, timeout),
                       [this, done = std::move(done)](Result<net::ClientResponse> resp) { done(Completion(std::move(resp))); });
  }

  Result<ChatResult> Embed(const json::object& body, const ChatRequest& req, Duration timeout) override {
    auto resp = Checked(net::SendHttp(Request(embeddings_url_, json::serialize(body), "application/json", req, timeout)));
    if (!resp.ok()) return std::move(resp).error();
    return ParseEmbeddings(resp->body, config_.name);
  }

  Result<ChatResult> ChatStream(const json::object& body, const ChatRequest& req, Duration timeout,
                                const Gateway::ChunkSink& on_chunk) override {
    json::object b = body;
    b["stream"] = true;
    b["stream_options"] = json::object{{"include_usage", true}};  // always: for limits and cost
    const net::ClientRequest http = Request(url_, json::serialize(b), "text/event-stream", req, timeout);
    net::StreamTimeouts st{std::min(config_.timeout.first_byte, timeout), config_.timeout.idle};

    ChatResult result;
    result.provider = config_.name;
    bool done = false;
    std::optional<Error> bad;
    bool reader_gone = false;
    auto r = StreamEvents(http, st, config_.name, [&](const SseEvent& ev) {
      if (ev.data == "[DONE]") {
        done = true;
        return true;
      }
      boost::system::error_code ec;
      json::value v = json::parse(ev.data, ec);
      if (ec || !v.is_object()) {
        bad = Error(ErrorCode::kInvalidOutput, "provider " + config_.name + " streamed a chunk that is not a JSON object");
        return false;
      }
      if (const auto* err = v.get_object().if_contains("error"); err && err->is_object()) {
        bad = UpstreamError(500, {}, ev.data, config_.name);
        return false;
      }
      Accumulate(v.get_object(), result);
      if (!on_chunk(v.get_object())) {
        reader_gone = true;
        return false;
      }
      return true;
    });
    if (bad) return *bad;
    if (reader_gone) return Error(ErrorCode::kCancelled, "the client went away");
    if (!r.ok()) return std::move(r).error();
    if (r->status < 200 || r->status >= 300) return UpstreamError(r->status, r->headers, r->error_body, config_.name);
    if (!done) {
      return Error(ErrorCode::kInvalidOutput, "provider " + config_.name + ": the stream ended before [DONE] (truncated)");
    }
    return result;
  }

 private:
  net::ClientRequest Request(const std::string& url, std::string body, const char* accept, const ChatRequest& req,
                             Duration timeout) const {
    net::ClientRequest http;
    http.method = "POST";
    http.url = url;
    http.headers = {{"Content-Type", "application/json"}, {"Accept", accept}};
    if (!config_.api_key.empty()) http.headers.emplace_back("Authorization", "Bearer " + config_.api_key);
    if (!req.idempotency_key.empty()) http.headers.emplace_back("Idempotency-Key", req.idempotency_key);
    for (const auto& [k, v] : config_.headers) http.headers.emplace_back(k, v);
    http.body = std::move(body);
    http.cancelled = req.cancelled;
    http.connect_timeout = std::min(config_.timeout.connect, timeout);
    http.total_timeout = std::min(config_.timeout.total, timeout);
    return http;
  }

  // The answer to a whole request: transport failures and error answers become this
  // provider's classified errors.
  Result<net::ClientResponse> Checked(Result<net::ClientResponse> resp) const {
    if (!resp.ok()) {
      Error e = std::move(resp).error();
      e.message = "provider " + config_.name + ": " + e.message;
      return e;
    }
    if (resp->status < 200 || resp->status >= 300) return UpstreamError(resp->status, resp->headers, resp->body, config_.name);
    return resp;
  }

  Result<ChatResult> Completion(Result<net::ClientResponse> resp) const {
    auto checked = Checked(std::move(resp));
    if (!checked.ok()) return std::move(checked).error();
    return ParseCompletion(checked->body, config_.name);
  }

  ProviderConfig config_;
  std::string url_;
  std::string embeddings_url_;
  bool async_ = net::SupportsAsync(url_);
};

// The built-in mock, answered in-process: the default provider when keel starts with no
// configuration, so that the example pipelines run with no network at all.
class MockProvider final : public Provider {
 public:
  explicit MockProvider(ProviderConfig config) : config_(std::move(config)), mock_(MockOptions{}) {}

  Result<ChatResult> Chat(const json::object& body, const ChatRequest&, Duration timeout) override {
    const auto d = mock_.HandleChat(json::serialize(body), std::chrono::steady_clock::now());
    const auto wait = std::min<Duration>(std::chrono::duration_cast<Duration>(d.delay), timeout);
    // Simulated provider latency, bounded by the call's timeout.
    if (wait.count() > 0) std::this_thread::sleep_for(wait);
    if (d.delay > timeout || d.kind == MockDecision::Kind::kHang) {
      return Error(ErrorCode::kTimeout, "provider " + config_.name + ": timed out after " + std::to_string(timeout.count()) + "ms");
    }
    switch (d.kind) {
      case MockDecision::Kind::kReset:
        return Error(ErrorCode::kNetwork, "provider " + config_.name + ": connection reset (mock)");
      case MockDecision::Kind::kError: {
        net::Headers h;
        if (d.retry_after_s > 0) h.emplace_back("retry-after", std::to_string(d.retry_after_s));
        return UpstreamError(d.status, h, d.body, config_.name);
      }
      default:
        return ParseCompletion(d.body, config_.name);
    }
  }

  Result<ChatResult> Embed(const json::object& body, const ChatRequest&, Duration) override {
    const auto d = mock_.HandleEmbeddings(json::serialize(body), std::chrono::steady_clock::now());
    if (d.kind == MockDecision::Kind::kError) return UpstreamError(d.status, {}, d.body, config_.name);
    return ParseEmbeddings(d.body, config_.name);
  }

  // The in-process mock streams the events the mock decides (OpenAI's chunks: text word
  // by word, tool calls delta by delta), with its faults: a truncated stream, a reset, a
  // chunk that does not parse. A `sleep` delays it (bounded by the call's timeout) as it
  // does a whole answer; the stream pacing directives (first_byte, stall) are the
  // `keel mock-llm` server's and are not waited out in-process.
  Result<ChatResult> ChatStream(const json::object& body, const ChatRequest&, Duration timeout,
                                const Gateway::ChunkSink& on_chunk) override {
    json::object b = body;
    b["stream"] = true;
    b["stream_options"] = json::object{{"include_usage", true}};  // always: for limits and cost
    const auto start = std::chrono::steady_clock::now();
    const auto d = mock_.HandleChat(json::serialize(b), start);
    const auto deadline = start + timeout;
    auto wait = [&](std::chrono::milliseconds ms) {
      const auto until = std::min(std::chrono::steady_clock::now() + ms, deadline);
      if (until > std::chrono::steady_clock::now()) std::this_thread::sleep_until(until);
      return std::chrono::steady_clock::now() < deadline;
    };
    auto timed_out = [&] {
      return Error(ErrorCode::kTimeout, "provider " + config_.name + ": timed out after " + std::to_string(timeout.count()) + "ms");
    };
    if (d.kind == MockDecision::Kind::kHang || !wait(std::chrono::duration_cast<std::chrono::milliseconds>(d.delay))) {
      return timed_out();
    }
    if (d.kind == MockDecision::Kind::kReset) return Error(ErrorCode::kNetwork, "provider " + config_.name + ": connection reset (mock)");
    if (d.kind == MockDecision::Kind::kError) {
      net::Headers h;
      if (d.retry_after_s > 0) h.emplace_back("retry-after", std::to_string(d.retry_after_s));
      return UpstreamError(d.status, h, d.body, config_.name);
    }
    ChatResult result;
    result.provider = config_.name;
    bool done = false;
    for (std::size_t i = 0; i < d.events.size(); ++i) {
      std::string_view ev = d.events[i];
      if (ev.rfind("data: ", 0) != 0) continue;
      ev.remove_prefix(6);
      while (!ev.empty() && (ev.back() == '\n' || ev.back() == '\r')) ev.remove_suffix(1);
      if (ev == "[DONE]") {
        done = true;
        break;
      }
      boost::system::error_code ec;
      json::value v = json::parse(ev, ec);
      if (ec || !v.is_object()) {
        return Error(ErrorCode::kInvalidOutput, "provider " + config_.name + " streamed a chunk that is not a JSON object");
      }
      Accumulate(v.get_object(), result);
      if (!on_chunk(v.get_object())) return Error(ErrorCode::kCancelled, "the client went away");
    }
    if (d.reset_at_end) return Error(ErrorCode::kNetwork, "provider " + config_.name + ": connection reset (mock)");
    if (!done) return Error(ErrorCode::kInvalidOutput, "provider " + config_.name + ": the stream ended before [DONE] (truncated)");
    return result;
  }

 private:
  ProviderConfig config_;
  MockLlm mock_;
};

}  // namespace

std::unique_ptr<Provider> MakeOpenAiProvider(const ProviderConfig& config) {
  return std::make_unique<OpenAiProvider>(config);
}

std::unique_ptr<Provider> MakeMockProvider(const ProviderConfig& config) {
  return std::make_unique<MockProvider>(config);
}

}  // namespace keel::gateway::detail
