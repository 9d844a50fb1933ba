// The Gateway interface's default asynchronous calls, for implementations that have only
// the blocking ones (test doubles): they run inline, holding the caller's thread.

#include "keel/gateway/gateway.h"

namespace keel::gateway {

void Gateway::ChatStreamAsync(ChatRequest request, const boost::asio::any_io_executor&, std::shared_ptr<StreamSink> sink,
                              Callback done) {
  done(ChatStream(request, [&sink](const json::object& chunk) { return sink->OnChunk(chunk); }));
}

void Gateway::EmbeddingsAsync(ChatRequest request, const boost::asio::any_io_executor&, Callback done) {
  done(Embeddings(request));
}

}  // namespace keel::gateway
