// Anthropic's Messages API (POST {base_url}/messages) behind the gateway's OpenAI-shaped
// Provider interface. Requests, answers, errors and streams are translated both ways, so
// that routes mix Anthropic and OpenAI-compatible targets freely.

#include <algorithm>
#include <cctype>
#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "anthropic_request.h"
#include "keel/core/secrets.h"
#include "keel/core/sse.h"
#include "keel/net/async_http_client.h"
#include "keel/net/http_client.h"
#include "keel/obs/log.h"
#include "provider.h"

namespace keel::gateway::detail {
namespace {

constexpr std::string_view kDefaultBaseUrl = "https://api.anthropic.com/v1";
constexpr std::string_view kApiVersion = "2023-06-01";

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---- Answers: Anthropic -> OpenAI chat.completion ----------------------------------------

std::string_view FinishReason(std::string_view stop_reason) {
  if (stop_reason == "max_tokens") return "length";
  if (stop_reason == "tool_use") return "tool_calls";
  if (stop_reason == "refusal") return "content_filter";
  return "stop";  // end_turn, stop_sequence, pause_turn, or none given
}

// Anthropic's usage counts cached prompt tokens apart from input_tokens; OpenAI's
// prompt_tokens includes them.
struct Usage {
  int64_t input = 0;
  int64_t output = 0;
  int64_t cache_read = 0;
  int64_t cache_creation = 0;

  // Folds in an Anthropic usage object: counts it holds replace the ones known.
  void Read(const json::value* u) {
    if (u == nullptr || !u->is_object()) return;
    const auto& o = u->get_object();
    input = IntOr(o.if_contains("input_tokens"), input);
    output = IntOr(o.if_contains("output_tokens"), output);
    cache_read = IntOr(o.if_contains("cache_read_input_tokens"), cache_read);
    cache_creation = IntOr(o.if_contains("cache_creation_input_tokens"), cache_creation);
  }
  json::object ToOpenAi() const {
    const int64_t prompt = input + cache_read + cache_creation;
    json::object u{{"prompt_tokens", prompt},
                   {"completion_tokens", output},
                   {"total_tokens", prompt + output}};
    if (cache_read > 0) u["prompt_tokens_details"] = json::object{{"cached_tokens", cache_read}};
    return u;
  }
};

json::object Completion(std::string_view id, int64_t created, std::string_view model,
                        std::string_view text, json::array tool_calls, std::string_view finish,
                        json::value usage) {
  json::object message{{"role", "assistant"}, {"content", text}};
  if (!tool_calls.empty()) {
    if (text.empty()) message["content"] = nullptr;  // as OpenAI answers a tool call
    message["tool_calls"] = std::move(tool_calls);
  }
  json::object r{{"id", id},
                 {"object", "chat.completion"},
                 {"created", created},
                 {"model", model},
                 {"choices", json::array{json::object{{"index", 0},
                                                      {"message", std::move(message)},
                                                      {"logprobs", nullptr},
                                                      {"finish_reason", finish}}}}};
  if (!usage.is_null()) r["usage"] = std::move(usage);
  return r;
}

bool PromptTooLong(std::string message) {
  std::transform(message.begin(), message.end(), message.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return message.find("prompt is too long") != std::string::npos ||
         message.find("context limit") != std::string::npos ||
         message.find("context window") != std::string::npos;
}

// The class of an Anthropic error type (and message), when the type says more than the
// status does.
std::optional<ErrorCode> CodeForType(std::string_view type, std::string_view message) {
  if (type == "overloaded_error") return ErrorCode::kOverloaded;
  if (type == "rate_limit_error") return ErrorCode::kRateLimited;
  if (type == "api_error") return ErrorCode::kServerError;
  if (type == "timeout_error") return ErrorCode::kTimeout;
  if (type == "authentication_error" || type == "permission_error") return ErrorCode::kAuth;
  if (type == "request_too_large") return ErrorCode::kContextLength;
  if (type == "invalid_request_error" || type == "not_found_error" || type == "billing_error") {
    return PromptTooLong(std::string(message)) ? ErrorCode::kContextLength
                                               : ErrorCode::kInvalidRequest;
  }
  return std::nullopt;
}

// Reads {"type": "error", "error": {"type", "message"}}: the type and the message.
std::pair<std::string, std::string> ErrorFields(std::string_view body) {
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  if (ec || !v.is_object()) return {};
  const json::value* e = v.get_object().if_contains("error");
  if (e == nullptr || !e->is_object()) return {};
  return {std::string(StringOr(e->get_object().if_contains("type"))),
          std::string(StringOr(e->get_object().if_contains("message")))};
}

// An error answer: classified by its status (keel's taxonomy), refined by Anthropic's
// error type (overloaded, rate limited, prompt too long); Retry-After honoured.
Error AnthropicError(int status, const net::Headers& headers, std::string_view body,
                     const std::string& provider) {
  Error err = UpstreamError(status, headers, body, provider);  // message and Retry-After
  err.code = ClassifyHttpStatus(status);
  const auto [type, message] = ErrorFields(body);
  if (type == "overloaded_error") err.code = ErrorCode::kOverloaded;
  if (type == "rate_limit_error") err.code = ErrorCode::kRateLimited;
  if (err.code == ErrorCode::kInvalidRequest && PromptTooLong(message)) {
    err.code = ErrorCode::kContextLength;
  }
  return err;
}

// An `error` event of a stream (or an error object answered with 2xx): no status to go
// by, so the type decides; an unknown type is a server error.
Error StreamedError(std::string_view data, const std::string& provider) {
  const auto [type, message] = ErrorFields(data);
  const ErrorCode code = CodeForType(type, message).value_or(ErrorCode::kServerError);
  return Error(code, "provider " + provider + " streamed an error (" +
                         (type.empty() ? std::string("unknown") : type) +
                         "): " + RedactSecrets(message.empty() ? RedactSecrets(data).substr(0, 200) : message));
}

Error BadOutput(const std::string& provider, std::string_view why) {
  return Error(ErrorCode::kInvalidOutput,
               "provider " + provider + " answered an unusable message: " + std::string(why));
}

// Reads an Anthropic message into a chat.completion; garbage is kInvalidOutput.
Result<ChatResult> ParseMessage(std::string_view body, const std::string& provider,
                                std::string_view fallback_model) {
  boost::system::error_code ec;
  const json::value v = json::parse(body, ec);
  if (ec) return BadOutput(provider, "not JSON (" + ec.message() + ")");
  if (!v.is_object()) return BadOutput(provider, "not a JSON object");
  const auto& o = v.get_object();
  const std::string_view type = StringOr(o.if_contains("type"), "message");
  if (type == "error") return StreamedError(body, provider);
  if (type != "message") return BadOutput(provider, "type is \"" + std::string(type) + "\"");
  const json::value* content = o.if_contains("content");
  if (content == nullptr || !content->is_array()) return BadOutput(provider, "no content list");
  std::string text;
  json::array tool_calls;
  for (const auto& block : content->get_array()) {
    if (!block.is_object()) continue;
    const auto& b = block.get_object();
    const std::string_view btype = StringOr(b.if_contains("type"));
    if (btype == "text") {
      const json::value* t = b.if_contains("text");
      if (t == nullptr || !t->is_string()) return BadOutput(provider, "a text block has no text");
      text.append(t->get_string().data(), t->get_string().size());
    } else if (btype == "tool_use") {
      const json::value* input = b.if_contains("input");
      tool_calls.push_back(json::object{
          {"id", StringOr(b.if_contains("id"))},
          {"type", "function"},
          {"function",
           json::object{{"name", StringOr(b.if_contains("name"))},
                        {"arguments", input != nullptr ? json::serialize(*input) : "{}"}}}});
    }
  }
  ChatResult r;
  r.provider = provider;
  r.model = std::string(StringOr(o.if_contains("model"), fallback_model));
  json::value usage = nullptr;
  if (const auto* u = o.if_contains("usage"); u != nullptr && u->is_object()) {
    Usage counts;
    counts.Read(u);
    usage = counts.ToOpenAi();
  }
  r.usage = usage;
  r.response =
      Completion(StringOr(o.if_contains("id")), UnixSeconds(), r.model, text, std::move(tool_calls),
                 FinishReason(StringOr(o.if_contains("stop_reason"))), std::move(usage));
  r.text = std::move(text);
  return r;
}

// ---- Streams: Anthropic events -> OpenAI chat.completion.chunk ---------------------------

// Folds Anthropic's events into OpenAI chunks for `sink`. The first chunk (the role) goes
// out with the first text, so that an error before any text still fails over invisibly.
class StreamTranslator {
 public:
  StreamTranslator(std::string provider, std::string fallback_model, Gateway::ChunkSink sink)
      : provider_(std::move(provider)), model_(std::move(fallback_model)), sink_(std::move(sink)) {
    result_.provider = provider_;
  }

  // One SSE event; false stops the stream (an error, or the reader went away).
  bool OnEvent(const SseEvent& ev) {
    if (done_) return true;
    boost::system::error_code ec;
    const json::value v = json::parse(ev.data, ec);
    if (ec || !v.is_object()) {
      // One malformed event does not end a stream that can go on.
      obs::LogWarn("dropped a malformed stream event",
                   {{"provider", provider_}, {"bytes", static_cast<int64_t>(ev.data.size())}});
      return true;
    }
    const auto& o = v.get_object();
    const std::string_view type = StringOr(o.if_contains("type"), ev.event);
    if (type == "error") {
      error_ = StreamedError(ev.data, provider_);
      return false;
    }
    if (type == "message_start") {
      if (const auto* m = o.if_contains("message"); m != nullptr && m->is_object()) {
        const auto& mo = m->get_object();
        if (const auto id = StringOr(mo.if_contains("id")); !id.empty()) id_ = id;
        if (const auto model = StringOr(mo.if_contains("model")); !model.empty()) model_ = model;
        usage_.Read(mo.if_contains("usage"));
      }
      return true;
    }
    if (type == "content_block_delta") {
      const json::value* delta = o.if_contains("delta");
      if (delta == nullptr || !delta->is_object()) return true;
      const auto& d = delta->get_object();
      if (StringOr(d.if_contains("type")) == "input_json_delta") {
        const auto it = tool_index_.find(IntOr(o.if_contains("index"), -1));
        const std::string_view partial = StringOr(d.if_contains("partial_json"));
        if (it == tool_index_.end() || partial.empty()) return true;
        tool_calls_[static_cast<std::size_t>(it->second)].args += partial;
        return Start() && Emit(Chunk(json::object{{"tool_calls", json::array{json::object{
                                                      {"index", it->second},
                                                      {"function", json::object{{"arguments", partial}}}}}}},
                                     nullptr));
      }
      if (StringOr(d.if_contains("type")) != "text_delta") return true;  // thinking
      const std::string_view text = StringOr(d.if_contains("text"));
      if (text.empty()) return true;
      return Start() && Emit(Chunk(json::object{{"content", text}}, nullptr));
    }
    if (type == "content_block_start") {
      // A tool_use block: an OpenAI tool call, its id and name first (its input follows in
      // input_json_delta events).
      const json::value* block = o.if_contains("content_block");
      if (block == nullptr || !block->is_object() || StringOr(block->get_object().if_contains("type")) != "tool_use") {
        return true;
      }
      const auto& b = block->get_object();
      const int64_t call = static_cast<int64_t>(tool_calls_.size());
      tool_index_[IntOr(o.if_contains("index"), -1)] = call;
      tool_calls_.push_back(ToolCall{std::string(StringOr(b.if_contains("id"))), std::string(StringOr(b.if_contains("name"))), ""});
      return Start() &&
             Emit(Chunk(json::object{{"tool_calls",
                                      json::array{json::object{{"index", call},
                                                               {"id", tool_calls_.back().id},
                                                               {"type", "function"},
                                                               {"function", json::object{{"name", tool_calls_.back().name},
                                                                                         {"arguments", ""}}}}}}},
                        nullptr));
    }
    if (type == "message_delta") {
      if (const auto* d = o.if_contains("delta"); d != nullptr && d->is_object()) {
        if (const auto sr = StringOr(d->get_object().if_contains("stop_reason")); !sr.empty()) {
          stop_reason_ = sr;
        }
      }
      usage_.Read(o.if_contains("usage"));
      return true;
    }
    if (type == "message_stop") {
      const std::string_view finish = FinishReason(stop_reason_);
      if (!Start() || !Emit(Chunk(json::object{}, json::string(finish)))) return false;
      json::object usage_chunk = Chunk(json::object{}, nullptr);
      usage_chunk["choices"] = json::array{};
      usage_chunk["usage"] = usage_.ToOpenAi();
      if (!Emit(std::move(usage_chunk))) return false;
      result_.model = model_;
      result_.usage = usage_.ToOpenAi();
      json::array calls;
      for (const auto& c : tool_calls_) {
        calls.push_back(json::object{{"id", c.id},
                                     {"type", "function"},
                                     {"function", json::object{{"name", c.name}, {"arguments", c.args.empty() ? "{}" : c.args}}}});
      }
      result_.response = Completion(id_, created_, model_, result_.text, std::move(calls), finish, result_.usage);
      done_ = true;
      return true;
    }
    return true;  // ping, content_block_start/stop, and event types added later
  }

  // Marks a stop that no event asked for (a line past the parser's bound).
  bool done() const { return done_; }
  bool cancelled() const { return cancelled_; }
  const std::optional<Error>& error() const { return error_; }
  ChatResult& result() { return result_; }

 private:
  json::object Chunk(json::object delta, json::value finish) const {
    return json::object{
        {"id", id_},
        {"object", "chat.completion.chunk"},
        {"created", created_},
        {"model", model_},
        {"choices", json::array{json::object{{"index", 0},
                                             {"delta", std::move(delta)},
                                             {"logprobs", nullptr},
                                             {"finish_reason", std::move(finish)}}}}};
  }

  bool Start() {
    if (started_) return true;
    started_ = true;
    return Emit(Chunk(json::object{{"role", "assistant"}}, nullptr));
  }

  bool Emit(json::object chunk) {
    Accumulate(chunk, result_);
    if (!sink_(chunk)) {
      cancelled_ = true;
      return false;
    }
    return true;
  }

  std::string provider_;
  std::string model_;
  Gateway::ChunkSink sink_;
  std::string id_ = "msg";
  int64_t created_ = UnixSeconds();
  Usage usage_;
  std::string stop_reason_;
  struct ToolCall {
    std::string id, name, args;
  };
  std::vector<ToolCall> tool_calls_;         // the stream's tool_use blocks, in order
  std::map<int64_t, int64_t> tool_index_;    // Anthropic block index -> tool call index
  bool started_ = false;
  bool done_ = false;
  bool cancelled_ = false;
  std::optional<Error> error_;
  ChatResult result_;
};

bool HasHeader(const std::map<std::string, std::string>& headers, std::string_view name) {
  return std::any_of(headers.begin(), headers.end(), [&](const auto& kv) {
    return std::equal(
        kv.first.begin(), kv.first.end(), name.begin(), name.end(),
        [](unsigned char a, unsigned char b) { return std::tolower(a) == std::tolower(b); });
  });
}

class AnthropicProvider final : public Provider {
 public:
  explicit AnthropicProvider(ProviderConfig config)
      : config_(std::move(config)),
        url_((config_.base_url.empty() ? std::string(kDefaultBaseUrl) : config_.base_url) +
             "/messages") {}

  bool async() const override { return true; }

  Result<ChatResult> Chat(const json::object& body, const ChatRequest& req,
                          Duration timeout) override {
    auto translated = ToAnthropicRequest(body);
    if (!translated.ok()) return Local(std::move(translated).error());
    return Answer(net::SendHttp(Request(*translated, req, timeout, "application/json")));
  }

  void ChatAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                 const boost::asio::any_io_executor& executor,
                 std::function<void(Result<ChatResult>)> done) override {
    auto translated = ToAnthropicRequest(body);
    if (!translated.ok()) return done(Local(std::move(translated).error()));
    net::SendHttpAsync(executor, Request(*translated, req, timeout, "application/json"),
                       [this, done = std::move(done)](Result<net::ClientResponse> resp) {
                         done(Answer(std::move(resp)));
                       });
  }

  Result<ChatResult> ChatStream(const json::object& body, const ChatRequest& req, Duration timeout,
                                const Gateway::ChunkSink& on_chunk) override {
    auto translated = ToAnthropicRequest(body);
    if (!translated.ok()) return Local(std::move(translated).error());
    (*translated)["stream"] = true;
    StreamTranslator translator(config_.name, config_.model, on_chunk);
    auto r = StreamEvents(Request(*translated, req, timeout, "text/event-stream"), Timeouts(timeout),
                          config_.name, [&](const SseEvent& ev) { return translator.OnEvent(ev); });
    return End(translator, std::move(r));
  }

  void ChatStreamAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                       const boost::asio::any_io_executor& executor,
                       std::shared_ptr<Gateway::StreamSink> sink,
                       std::function<void(Result<ChatResult>)> done) override {
    auto translated = ToAnthropicRequest(body);
    if (!translated.ok()) return done(Local(std::move(translated).error()));
    (*translated)["stream"] = true;
    auto translator = std::make_shared<StreamTranslator>(
        config_.name, config_.model, [sink](const json::object& chunk) { return sink->OnChunk(chunk); });
    StreamEventsAsync(
        executor, Request(*translated, req, timeout, "text/event-stream"), Timeouts(timeout),
        config_.name, sink, [translator](const SseEvent& ev) { return translator->OnEvent(ev); },
        [this, translator, done = std::move(done)](Result<EventStream> r) {
          done(End(*translator, std::move(r)));
        });
  }

 private:
  Result<ChatResult> Answer(Result<net::ClientResponse> resp) const {
    if (!resp.ok()) {
      Error e = std::move(resp).error();
      e.message = "provider " + config_.name + ": " + e.message;
      return e;
    }
    if (resp->status < 200 || resp->status >= 300) {
      return AnthropicError(resp->status, resp->headers, resp->body, config_.name);
    }
    return ParseMessage(resp->body, config_.name, config_.model);
  }

  // The outcome of a streamed call once its transfer ended. A transfer cut after
  // message_stop lost nothing of the answer.
  Result<ChatResult> End(StreamTranslator& translator, Result<EventStream> r) const {
    if (translator.error()) return *translator.error();
    if (translator.cancelled()) return Error(ErrorCode::kCancelled, "the client went away");
    if (!r.ok()) {
      if (translator.done() && r.error().code != ErrorCode::kCancelled) return std::move(translator.result());
      return std::move(r).error();
    }
    if (r->status < 200 || r->status >= 300) {
      return AnthropicError(r->status, r->headers, r->error_body, config_.name);
    }
    if (!translator.done()) {
      return Error(
          ErrorCode::kInvalidOutput,
          "provider " + config_.name + ": the stream ended before message_stop (truncated)");
    }
    return std::move(translator.result());
  }

  net::StreamTimeouts Timeouts(Duration timeout) const {
    return net::StreamTimeouts{std::min(config_.timeout.first_byte, timeout), config_.timeout.idle};
  }

  net::ClientRequest Request(const json::object& body, const ChatRequest& req, Duration timeout,
                             std::string accept) const {
    net::ClientRequest http;
    http.method = "POST";
    http.url = url_;
    http.headers = {{"Content-Type", "application/json"}, {"Accept", std::move(accept)}};
    if (!config_.api_key.empty()) http.headers.emplace_back("x-api-key", config_.api_key);
    if (!HasHeader(config_.headers, "anthropic-version")) {
      http.headers.emplace_back("anthropic-version", std::string(kApiVersion));
    }
    if (!req.idempotency_key.empty())
      http.headers.emplace_back("Idempotency-Key", req.idempotency_key);
    for (const auto& [k, v] : config_.headers) http.headers.emplace_back(k, v);
    http.body = json::serialize(body);
    http.cancelled = req.cancelled;
    http.cancel = req.cancel;
    http.tls = config_.tls;
    http.connect_timeout = std::min(config_.timeout.connect, timeout);
    http.total_timeout = std::min(config_.timeout.total, timeout);
    return http;
  }

  // A request this format cannot express, refused before any call.
  Error Local(Error e) const {
    e.message = "provider " + config_.name + " (anthropic): " + e.message;
    return e;
  }

  ProviderConfig config_;
  std::string url_;
};

}  // namespace

std::unique_ptr<Provider> MakeAnthropicProvider(const ProviderConfig& config) {
  return std::make_unique<AnthropicProvider>(config);
}

}  // namespace keel::gateway::detail
