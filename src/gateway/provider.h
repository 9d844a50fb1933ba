#pragma once
// The provider interface of the gateway and the pieces every wire format shares. Private
// to keel_gateway: each provider (a wire format) implements Provider; the gateway's
// resilience chain is the same for all of them.

#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "keel/core/config.h"
#include "keel/core/json.h"
#include "keel/core/result.h"
#include "keel/gateway/gateway.h"
#include "keel/net/http.h"

namespace keel::gateway::detail {

/// One upstream model endpoint speaking one wire format. Requests and chunks are in
/// OpenAI's chat-completions shape whatever the wire format: a provider translates both
/// ways. Thread-safe.
class Provider {
 public:
  virtual ~Provider() = default;
  /// One call, bounded by `timeout`. `body` already names this provider's model.
  virtual Result<ChatResult> Chat(const json::object& body, const ChatRequest& req, Duration timeout) = 0;
  /// One streamed call: every chunk (chat.completion.chunk) goes to `on_chunk` as it
  /// arrives. The result carries the whole text, the model and the usage. Returning
  /// false from `on_chunk` abandons the call (kCancelled).
  virtual Result<ChatResult> ChatStream(const json::object& body, const ChatRequest& req, Duration timeout,
                                        const Gateway::ChunkSink& on_chunk) = 0;
  /// One /v1/embeddings call: the result's `response` is the OpenAI embeddings list and
  /// `usage` its usage. Default: kInvalidRequest (the wire format has no embeddings).
  virtual Result<ChatResult> Embed(const json::object& body, const ChatRequest& req, Duration timeout);
};

/// Classifies an upstream error answer (OpenAI-shaped body when it is one) and reads its
/// Retry-After.
Error UpstreamError(int status, const net::Headers& headers, std::string_view body, const std::string& provider);

/// Reads a chat.completion; anything unusable is kInvalidOutput for this provider.
Result<ChatResult> ParseCompletion(std::string_view body, const std::string& provider);

/// Folds one chat.completion.chunk into the result being built (model, usage, text).
void Accumulate(const json::object& chunk, ChatResult& result);

/// "?k=v&..." (percent-encoded) for a provider's `query`; empty when there is none.
std::string QueryString(const std::map<std::string, std::string>& query);

std::unique_ptr<Provider> MakeOpenAiProvider(const ProviderConfig& config);
std::unique_ptr<Provider> MakeMockProvider(const ProviderConfig& config);
/// Anthropic's Messages API (anthropic_provider.cc), translated to and from OpenAI's shape.
std::unique_ptr<Provider> MakeAnthropicProvider(const ProviderConfig& config);

}  // namespace keel::gateway::detail
