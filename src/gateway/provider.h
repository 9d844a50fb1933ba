#pragma once
// The provider interface of the gateway and the pieces every wire format shares. Private
// to keel_gateway: each provider (a wire format) implements Provider; the gateway's
// resilience chain is the same for all of them.

#include <map>
#include <optional>
#include <memory>
#include <string>
#include <string_view>

#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/result.h"
#include "keel/gateway/gateway.h"
#include "keel/core/sse.h"
#include "keel/net/http.h"
#include "keel/net/http_client.h"

namespace keel::gateway::detail {

/// One upstream model endpoint speaking one wire format. Requests and chunks are in
/// OpenAI's chat-completions shape whatever the wire format: a provider translates both
/// ways. Thread-safe.
class Provider {
 public:
  virtual ~Provider() = default;
  /// One call, bounded by `timeout`. `body` already names this provider's model.
  virtual Result<ChatResult> Chat(const json::object& body, const ChatRequest& req, Duration timeout) = 0;
  /// True when ChatAsync holds no thread while the provider answers.
  virtual bool async() const { return false; }
  /// Chat, with `done` called on `executor` (at once, blocking, unless async()).
  virtual void ChatAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                         const boost::asio::any_io_executor& executor, std::function<void(Result<ChatResult>)> done) {
    (void)executor;
    done(Chat(body, req, timeout));
  }
  /// One streamed call: every chunk (chat.completion.chunk) goes to `on_chunk` as it
  /// arrives. The result carries the whole text, the model and the usage. Returning
  /// false from `on_chunk` abandons the call (kCancelled).
  virtual Result<ChatResult> ChatStream(const json::object& body, const ChatRequest& req, Duration timeout,
                                        const Gateway::ChunkSink& on_chunk) = 0;
  /// One /v1/embeddings call: the result's `response` is the OpenAI embeddings list and
  /// `usage` its usage. Default: kInvalidRequest (the wire format has no embeddings).
  virtual Result<ChatResult> Embed(const json::object& body, const ChatRequest& req, Duration timeout);

  /// ChatStream without holding a thread (when async()): chunks go to `sink` on
  /// `executor` as they arrive, and a Full() sink holds the provider back. `done` runs on
  /// `executor` once, after the last chunk. `req` must outlive the call. Default: the
  /// blocking ChatStream, inline.
  virtual void ChatStreamAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                               const boost::asio::any_io_executor& executor, std::shared_ptr<Gateway::StreamSink> sink,
                               std::function<void(Result<ChatResult>)> done) {
    (void)executor;
    done(ChatStream(body, req, timeout, [&sink](const json::object& chunk) { return sink->OnChunk(chunk); }));
  }
  /// Embed without holding a thread (when async()). Default: the blocking Embed, inline.
  virtual void EmbedAsync(const json::object& body, const ChatRequest& req, Duration timeout,
                          const boost::asio::any_io_executor& executor, std::function<void(Result<ChatResult>)> done) {
    (void)executor;
    done(Embed(body, req, timeout));
  }
};


/// Classifies an upstream error answer (OpenAI-shaped body when it is one) and reads its
/// Retry-After.
Error UpstreamError(int status, const net::Headers& headers, std::string_view body, const std::string& provider);

/// Reads a chat.completion. Unusable (kInvalidOutput for this provider): not a JSON
/// object, or no `choices` array. Nothing else is checked: content null or absent (tool
/// calls), content parts, refusals, logprobs, several choices and usage details are kept
/// in `response` as they came.
Result<ChatResult> ParseCompletion(std::string_view body, const std::string& provider);

/// The text of a message's (or a delta's) `content`: a string as it is, an array of parts
/// as its `text` parts joined; empty for null, absent or anything else.
std::string MessageText(const json::value* content);

/// Folds one chat.completion.chunk into the result being built (model, usage, text).
void Accumulate(const json::object& chunk, ChatResult& result);

/// What a streamed exchange left once its transfer ended.
struct EventStream {
  int status = 0;
  net::Headers headers;
  std::string error_body;  // the body of a non-2xx answer (64 KiB at most)
};

/// The chunks of an OpenAI-format stream, read event by event: each chunk is folded into
/// the result and passed on; a finish reason followed by the end of the stream is a
/// complete answer even without `data: [DONE]`; an event that is not a JSON object is
/// dropped (counted, logged) and the stream goes on. Not thread-safe.
class OpenAiStreamReader {
 public:
  using Sink = std::function<bool(const json::object& chunk)>;
  OpenAiStreamReader(std::string provider, Sink sink) : provider_(std::move(provider)), sink_(std::move(sink)) {
    result_.provider = provider_;
  }
  /// False: stop reading (the sink is gone, or the provider streamed an error event).
  bool OnEvent(const SseEvent& ev);
  /// The outcome once the transfer ended: `transfer` is how it ended.
  Result<ChatResult> End(Result<EventStream> transfer);
  int dropped() const { return dropped_; }

 private:
  std::string provider_;
  Sink sink_;
  ChatResult result_;
  bool done_ = false;      // [DONE] came
  bool finished_ = false;  // a finish reason came
  bool gone_ = false;
  int dropped_ = 0;
  std::optional<Error> bad_;
};

/// Sends a streamed request. A 2xx body goes event by event to `on_event`; any other
/// status's body is kept for classification. Fails kCancelled when `on_event` stopped the
/// stream, kInvalidOutput when the provider sent a line over 1 MiB, and with the
/// transport's error (named for `provider`) otherwise.
Result<EventStream> StreamEvents(const net::ClientRequest& http, const net::StreamTimeouts& timeouts,
                                 const std::string& provider, const SseParser::Callback& on_event);

/// StreamEvents without holding a thread: a 2xx body goes event by event to `on_event`
/// (on `executor`) and after each piece of the body, a Full() `sink` pauses the transfer
/// until it is ready. `done` runs on `executor` once, with what StreamEvents returns.
void StreamEventsAsync(const boost::asio::any_io_executor& executor, net::ClientRequest http,
                       const net::StreamTimeouts& timeouts, const std::string& provider,
                       std::shared_ptr<Gateway::StreamSink> sink, SseParser::Callback on_event,
                       std::function<void(Result<EventStream>)> done);

/// "?k=v&..." (percent-encoded) for a provider's `query`; empty when there is none.
std::string QueryString(const std::map<std::string, std::string>& query);

std::unique_ptr<Provider> MakeOpenAiProvider(const ProviderConfig& config);
std::unique_ptr<Provider> MakeMockProvider(const ProviderConfig& config);
/// Anthropic's Messages API (anthropic_provider.cc), translated to and from OpenAI's shape.
std::unique_ptr<Provider> MakeAnthropicProvider(const ProviderConfig& config);

}  // namespace keel::gateway::detail
