#include "call_cache.h"

#include <algorithm>
#include <memory>

namespace keel::gateway::detail {

std::optional<CacheEntry> CallCache::Open(RouteState& route, const ChatRequest& req, bool stream,
                                          bool embed, Timestamp now) {
  route_ = &route;
  if (!route.cache) return std::nullopt;
  if (stream || req.cache == CacheMode::kNoStore) {
    status_ = CacheStatus::kBypass;  // streams are never cached
    return std::nullopt;
  }
  status_ = CacheStatus::kMiss;
  key_ = CacheKey(embed ? "embeddings" : "chat", route.config.name, req.body);
  if (req.cache != CacheMode::kDefault) return std::nullopt;
  auto entry = route.cache->Lookup(key_, now);
  if (!entry) return std::nullopt;
  if (now - entry->stored_at < route.cache->config().ttl) return entry;
  stale_ = std::move(entry);
  return std::nullopt;
}

void CallCache::Store(const ChatResult& answer, Timestamp now) {
  if (key_.empty()) return;
  auto stored = std::make_shared<CachedAnswer>(
      CachedAnswer{answer.response, answer.text, answer.model, answer.provider, answer.usage});
  route_->cache->Store(key_, CacheEntry{std::move(stored), now});
}

ChatResult CallCache::Answer(const CacheEntry& entry, CacheStatus status, Timestamp now) {
  ChatResult r;
  const CachedAnswer& a = *entry.answer;
  r.response = a.response;
  r.text = a.text;
  r.model = a.model;
  r.provider = a.provider;
  r.usage = a.usage;
  r.cache = status;
  r.cache_age = std::max(Duration(0), std::chrono::duration_cast<Duration>(now - entry.stored_at));
  return r;
}

}  // namespace keel::gateway::detail
