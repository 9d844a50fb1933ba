#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cctype>
#include <charconv>
#include <chrono>
#include <thread>

#include "keel/core/secrets.h"
#include "keel/core/sse.h"
#include "keel/gateway/mock_llm.h"
#include "keel/net/async_http_client.h"
#include "keel/net/http_client.h"
#include "keel/obs/log.h"
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

namespace {

// The consumer of one asynchronous event stream: the same rules as StreamEvents, with the
// sink's backpressure.
class EventConsumer final : public net::StreamConsumer {
 public:
  EventConsumer(std::string provider, std::shared_ptr<Gateway::StreamSink> sink, SseParser::Callback on_event,
                std::function<void(Result<EventStream>)> done)
      : provider_(std::move(provider)),
        sink_(std::move(sink)),
        on_event_(std::move(on_event)),
        done_(std::move(done)),
        parser_([this](const SseEvent& ev) {
          stopped_ = !on_event_(ev);
          return !stopped_;
        }) {}

  bool OnHeaders(int status, const net::Headers& headers) override {
    out_.status = status;
    out_.headers = headers;
    return true;
  }

  bool OnData(std::string_view data, const std::shared_ptr<net::StreamControl>& control) override {
    if (out_.status < 200 || out_.status >= 300) {
      if (out_.error_body.size() < 65536) out_.error_body.append(data);
      return true;
    }
    if (!parser_.Feed(data)) {
      overlong_ = !stopped_;
      return false;
    }
    if (sink_ && sink_->Full()) {
      control->Pause();
      sink_->WhenReady([control] { control->Resume(); });
    }
    return true;
  }

  void OnDone(Result<int> r) override {
    if (stopped_) return done_(Error(ErrorCode::kCancelled, "the stream was stopped by its reader"));
    if (overlong_) return done_(Error(ErrorCode::kInvalidOutput, "provider " + provider_ + " streamed a line longer than 1 MiB"));
    if (!r.ok()) {
      Error e = std::move(r).error();
      e.message = "provider " + provider_ + ": " + e.message;
      return done_(std::move(e));
    }
    done_(std::move(out_));
  }

 private:
  std::string provider_;
  std::shared_ptr<Gateway::StreamSink> sink_;
  SseParser::Callback on_event_;
  std::function<void(Result<EventStream>)> done_;
  SseParser parser_;
  EventStream out_;
  bool stopped_ = false;
  bool overlong_ = false;
};

}  // namespace

void StreamEventsAsync(const boost::asio::any_io_executor& executor, net::ClientRequest http,
                       const net::StreamTimeouts& timeouts, const std::string& provider,
                       std::shared_ptr<Gateway::StreamSink> sink, SseParser::Callback on_event,
                       std::function<void(Result<EventStream>)> done) {
  net::SendHttpStreamAsync(executor, std::move(http), timeouts,
                           std::make_shared<EventConsumer>(provider, std::move(sink), std::move(on_event), std::move(done)));
}

bool OpenAiStreamReader::OnEvent(const SseEvent& ev) {
  if (ev.data == "[DONE]") {
    done_ = true;
    return true;
  }
  boost::system::error_code ec;
  json::value v = json::parse(ev.data, ec);
  if (ec || !v.is_object()) {
    // One malformed event does not end a stream that can go on.
    ++dropped_;
    obs::LogWarn("dropped a malformed stream event",
                 {{"provider", provider_}, {"bytes", static_cast<int64_t>(ev.data.size())}});
    return true;
  }
  if (const auto* err = v.get_object().if_contains("error"); err && err->is_object()) {
    bad_ = UpstreamError(500, {}, ev.data, provider_);
    return false;
  }
  if (const auto* choices = v.get_object().if_contains("choices"); choices && choices->is_array()) {
    for (const auto& c : choices->get_array()) {
      if (const auto* f = c.is_object() ? c.get_object().if_contains("finish_reason") : nullptr; f && f->is_string()) {
        finished_ = true;
      }
    }
  }
  Accumulate(v.get_object(), result_);
  if (!sink_(v.get_object())) {
    gone_ = true;
    return false;
  }
  return true;
}

Result<ChatResult> OpenAiStreamReader::End(Result<EventStream> transfer) {
  if (bad_) return *bad_;
  if (gone_) return Error(ErrorCode::kCancelled, "the client went away");
  if (!transfer.ok()) {
    // A transfer cut after the finish reason (and usage) lost nothing of the answer.
    if (finished_ && transfer.error().code != ErrorCode::kCancelled) return std::move(result_);
    return std::move(transfer).error();
  }
  if (transfer->status < 200 || transfer->status >= 300) {
    return UpstreamError(transfer->status, transfer->headers, transfer->error_body, provider_);
  }
  if (!done_ && !finished_) {
    return Error(ErrorCode::kInvalidOutput, "provider " + provider_ + ": the stream ended before its finish reason "
                                                                    "or [DONE] (truncated)");
  }
  return std::move(result_);
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
    return Embeddings(net::SendHttp(Request(embeddings_url_, json::serialize(body), "application/json", req, timeout)));
  }

  void EmbedAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                  const boost::asio::any_io_executor& executor, std::function<void(Result<ChatResult>)> done) override {
    if (!async_) return Provider::EmbedAsync(body, req, timeout, executor, std::move(done));
    net::SendHttpAsync(executor, Request(embeddings_url_, json::serialize(body), "application/json", req, timeout),
                       [this, done = std::move(done)](Result<net::ClientResponse> resp) { done(Embeddings(std::move(resp))); });
  }

  Result<ChatResult> ChatStream(const json::object& body, const ChatRequest& req, Duration timeout,
                                const Gateway::ChunkSink& on_chunk) override {
    OpenAiStreamReader reader(config_.name, on_chunk);
    auto r = StreamEvents(StreamRequest(body, req, timeout), StreamTimeouts(timeout), config_.name,
                          [&](const SseEvent& ev) { return reader.OnEvent(ev); });
    return reader.End(std::move(r));
  }

  void ChatStreamAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                       const boost::asio::any_io_executor& executor, std::shared_ptr<Gateway::StreamSink> sink,
                       std::function<void(Result<ChatResult>)> done) override {
    if (!async_) return Provider::ChatStreamAsync(body, req, timeout, executor, std::move(sink), std::move(done));
    auto reader = std::make_shared<OpenAiStreamReader>(config_.name,
                                                       [sink](const json::object& chunk) { return sink->OnChunk(chunk); });
    StreamEventsAsync(
        executor, StreamRequest(body, req, timeout), StreamTimeouts(timeout), config_.name, sink,
        [reader](const SseEvent& ev) { return reader->OnEvent(ev); },
        [reader, done = std::move(done)](Result<EventStream> r) { done(reader->End(std::move(r))); });
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
    http.cancel = req.cancel;
    http.tls = config_.tls;
    http.connect_timeout = std::min(config_.timeout.connect, timeout);
    http.total_timeout = std::min(config_.timeout.total, timeout);
    return http;
  }

  net::ClientRequest StreamRequest(const json::object& body, const ChatRequest& req, Duration timeout) const {
    json::object b = body;
    b["stream"] = true;
    b["stream_options"] = json::object{{"include_usage", true}};  // always: for limits and cost
    return Request(url_, json::serialize(b), "text/event-stream", req, timeout);
  }

  net::StreamTimeouts StreamTimeouts(Duration timeout) const {
    return net::StreamTimeouts{std::min(config_.timeout.first_byte, timeout), config_.timeout.idle};
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

  Result<ChatResult> Embeddings(Result<net::ClientResponse> resp) const {
    auto checked = Checked(std::move(resp));
    if (!checked.ok()) return std::move(checked).error();
    return ParseEmbeddings(checked->body, config_.name);
  }

  ProviderConfig config_;
  std::string url_;
  std::string embeddings_url_;
  bool async_ = net::SupportsAsync(url_);
};

// Runs `fn(cancelled)` on `executor` after `delay`, or at once (cancelled = true) when
// `cancel` fires first. The timer holds no thread.
void AfterOrCancel(const boost::asio::any_io_executor& executor, Duration delay, const std::shared_ptr<CancelSignal>& cancel,
                   std::function<void(bool cancelled)> fn) {
  auto timer = std::make_shared<boost::asio::steady_timer>(executor, delay);
  uint64_t handle = 0;
  if (cancel) {
    std::weak_ptr<boost::asio::steady_timer> weak = timer;
    handle = cancel->OnCancel([weak, executor] {
      boost::asio::post(executor, [weak] {
        if (auto t = weak.lock()) t->cancel();
      });
    });
  }
  timer->async_wait([timer, cancel, handle, fn = std::move(fn)](boost::system::error_code ec) {
    if (cancel) cancel->Remove(handle);
    fn(ec == boost::asio::error::operation_aborted || (cancel && cancel->cancelled()));
  });
}

// The built-in mock, answered in-process: the default provider when keel starts with no
// configuration, so that the example pipelines run with no network at all. Its latency
// (a `sleep` directive) is a timer on the asynchronous paths: no thread waits it out.
class MockProvider final : public Provider {
 public:
  explicit MockProvider(ProviderConfig config) : config_(std::move(config)), mock_(MockOptions{}) {}

  bool async() const override { return true; }

  Result<ChatResult> Chat(const json::object& body, const ChatRequest&, Duration timeout) override {
    const auto d = mock_.HandleChat(json::serialize(body), std::chrono::steady_clock::now());
    const auto wait = Wait(d, timeout);
    if (wait.count() > 0) std::this_thread::sleep_for(wait);  // the blocking path: simulated latency
    return Answer(d, timeout);
  }

  void ChatAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                 const boost::asio::any_io_executor& executor, std::function<void(Result<ChatResult>)> done) override {
    auto d = mock_.HandleChat(json::serialize(body), std::chrono::steady_clock::now());
    const auto wait = Wait(d, timeout);
    if (wait.count() <= 0) return done(Answer(d, timeout));
    AfterOrCancel(executor, wait, req.cancel, [this, d = std::move(d), timeout, done = std::move(done)](bool cancelled) {
      if (cancelled) return done(Cancelled());
      done(Answer(d, timeout));
    });
  }

  Result<ChatResult> Embed(const json::object& body, const ChatRequest&, Duration) override {
    const auto d = mock_.HandleEmbeddings(json::serialize(body), std::chrono::steady_clock::now());
    if (d.kind == MockDecision::Kind::kError) return UpstreamError(d.status, {}, d.body, config_.name);
    return ParseEmbeddings(d.body, config_.name);
  }

  void EmbedAsync(const json::object& body, const ChatRequest& req, Duration timeout, const boost::asio::any_io_executor&,
                  std::function<void(Result<ChatResult>)> done) override {
    done(Embed(body, req, timeout));  // answered at once: nothing to wait for
  }

  // The in-process mock streams the events the mock decides (OpenAI's chunks: text word
  // by word, tool calls delta by delta), with its faults: a truncated stream, a reset, a
  // chunk that does not parse. A `sleep` delays it (bounded by the call's timeout) as it
  // does a whole answer; the stream pacing directives (first_byte, stall) are the
  // `keel mock-llm` server's and are not waited out in-process.
  Result<ChatResult> ChatStream(const json::object& body, const ChatRequest&, Duration timeout,
                                const Gateway::ChunkSink& on_chunk) override {
    const auto d = mock_.HandleChat(json::serialize(StreamBody(body)), std::chrono::steady_clock::now());
    const auto wait = Wait(d, timeout);
    if (wait.count() > 0) std::this_thread::sleep_for(wait);
    if (auto early = Early(d, timeout)) return std::move(*early);
    OpenAiStreamReader reader(config_.name, on_chunk);
    SseParser parser([&](const SseEvent& ev) { return reader.OnEvent(ev); });
    for (const auto& ev : d.events) {
      if (!parser.Feed(ev)) break;
    }
    return reader.End(Transfer(d));
  }

  void ChatStreamAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                       const boost::asio::any_io_executor& executor, std::shared_ptr<Gateway::StreamSink> sink,
                       std::function<void(Result<ChatResult>)> done) override {
    auto st = std::make_shared<StreamState>();
    st->d = mock_.HandleChat(json::serialize(StreamBody(body)), std::chrono::steady_clock::now());
    st->timeout = timeout;
    st->sink = std::move(sink);
    st->done = std::move(done);
    st->reader.emplace(config_.name, [s = st.get()](const json::object& chunk) { return s->sink->OnChunk(chunk); });
    st->parser.emplace([s = st.get()](const SseEvent& ev) { return s->reader->OnEvent(ev); });
    const auto wait = Wait(st->d, timeout);
    if (wait.count() <= 0) return Emit(st);
    AfterOrCancel(executor, wait, req.cancel, [this, st](bool cancelled) {
      if (cancelled) return st->Done(Cancelled());
      Emit(st);
    });
  }

 private:
  struct StreamState {
    MockDecision d;
    Duration timeout{0};
    std::shared_ptr<Gateway::StreamSink> sink;
    std::function<void(Result<ChatResult>)> done;
    std::optional<OpenAiStreamReader> reader;
    std::optional<SseParser> parser;
    std::size_t next = 0;
    void Done(Result<ChatResult> r) {
      auto fn = std::move(done);
      sink.reset();
      fn(std::move(r));
    }
  };

  // Relays the decided events, pausing while the sink is full.
  void Emit(const std::shared_ptr<StreamState>& st) {
    if (st->next == 0) {
      if (auto early = Early(st->d, st->timeout)) return st->Done(std::move(*early));
    }
    while (st->next < st->d.events.size()) {
      if (!st->parser->Feed(st->d.events[st->next++])) return st->Done(st->reader->End(Transfer(st->d)));
      if (st->sink->Full() && st->next < st->d.events.size()) {
        st->sink->WhenReady([this, st] { Emit(st); });
        return;
      }
    }
    st->Done(st->reader->End(Transfer(st->d)));
  }

  static json::object StreamBody(const json::object& body) {
    json::object b = body;
    b["stream"] = true;
    b["stream_options"] = json::object{{"include_usage", true}};  // always: for limits and cost
    return b;
  }

  // How long to wait before answering: the decided delay, bounded by the call's timeout.
  static Duration Wait(const MockDecision& d, Duration timeout) {
    if (d.kind == MockDecision::Kind::kHang) return timeout;
    return std::min<Duration>(std::chrono::duration_cast<Duration>(d.delay), timeout);
  }

  Error TimedOut(Duration timeout) const {
    return Error(ErrorCode::kTimeout, "provider " + config_.name + ": timed out after " + std::to_string(timeout.count()) + "ms");
  }
  Error Reset() const { return Error(ErrorCode::kNetwork, "provider " + config_.name + ": connection reset (mock)"); }
  static Error Cancelled() { return Error(ErrorCode::kCancelled, "the call was cancelled"); }

  Error UpstreamFailure(const MockDecision& d) const {
    net::Headers h;
    if (d.retry_after_s > 0) h.emplace_back("retry-after", std::to_string(d.retry_after_s));
    return UpstreamError(d.status, h, d.body, config_.name);
  }

  // What ends a call before any answer: a timeout, a reset, an error status.
  std::optional<Error> Early(const MockDecision& d, Duration timeout) const {
    if (d.delay > timeout || d.kind == MockDecision::Kind::kHang) return TimedOut(timeout);
    if (d.kind == MockDecision::Kind::kReset) return Reset();
    if (d.kind == MockDecision::Kind::kError) return UpstreamFailure(d);
    return std::nullopt;
  }

  // How a streamed answer's transfer ended.
  Result<EventStream> Transfer(const MockDecision& d) const {
    if (d.reset_at_end) return Reset();
    EventStream out;
    out.status = 200;
    return out;
  }

  Result<ChatResult> Answer(const MockDecision& d, Duration timeout) const {
    if (auto early = Early(d, timeout)) return std::move(*early);
    return ParseCompletion(d.body, config_.name);
  }

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
