#include "response_cache.h"

#include "keel/net/digest.h"

#include "redis_client.h"

namespace keel::gateway::detail {
namespace {

constexpr int64_t kFormat = 1;


}  // namespace

std::string CacheKey(std::string_view kind, std::string_view route, const json::object& body) {
  json::object keyed;
  for (const auto& kv : body) {
    const std::string_view k = kv.key();
    if (k == "model" || k == "stream" || k == "stream_options" || k == "user") continue;
    keyed.emplace(k, kv.value());
  }
  // Lengths first, so that no kind or route name can run into the next part.
  std::string text = std::to_string(kind.size()) + ":" + std::string(kind) +
                     std::to_string(route.size()) + ":" + std::string(route) + CanonicalJson(keyed);
  return net::Sha256Hex(text);
}

std::string EncodeCacheEntry(const CacheEntry& entry) {
  const CachedAnswer& a = *entry.answer;
  return json::serialize(json::object{{"v", kFormat},
                                      {"stored_at_ms", ToMillis(entry.stored_at)},
                                      {"provider", a.provider},
                                      {"model", a.model},
                                      {"text", a.text},
                                      {"usage", a.usage},
                                      {"response", a.response}});
}

Result<CacheEntry> DecodeCacheEntry(std::string_view value) {
  auto bad = [](const char* why) {
    return Error(ErrorCode::kInvalidOutput,
                 std::string("a cached answer that does not decode: ") + why);
  };
  auto parsed = ParseJson(value);
  if (!parsed.ok()) return bad("not JSON");
  if (!parsed->is_object()) return bad("not an object");
  auto& o = parsed->as_object();
  const auto* v = o.if_contains("v");
  if (v == nullptr || !v->is_int64() || v->as_int64() != kFormat) return bad("an unknown format");
  const auto* at = o.if_contains("stored_at_ms");
  const auto* provider = o.if_contains("provider");
  const auto* model = o.if_contains("model");
  const auto* text = o.if_contains("text");
  const auto* usage = o.if_contains("usage");
  auto* response = o.if_contains("response");
  if (at == nullptr || !at->is_int64() || provider == nullptr || !provider->is_string() ||
      model == nullptr || !model->is_string() || text == nullptr || !text->is_string() ||
      usage == nullptr || response == nullptr || !response->is_object()) {
    return bad("a missing or mistyped field");
  }
  auto answer = std::make_shared<CachedAnswer>();
  answer->provider = std::string(provider->as_string());
  answer->model = std::string(model->as_string());
  answer->text = std::string(text->as_string());
  answer->usage = *usage;
  answer->response = std::move(response->as_object());
  return CacheEntry{std::move(answer), FromMillis(at->as_int64())};
}

std::optional<CacheEntry> LruCache::Get(const std::string& key, Timestamp now, Duration keep) {
  auto entry = map_.Get(key);
  if (entry && now - entry->stored_at >= keep) {
    map_.Erase(key);
    return std::nullopt;
  }
  return entry;
}

RouteCache::RouteCache(const RouteCacheConfig& config, RedisClient* redis,
                       prometheus::Counter* corrupt)
    : config_(config),
      redis_(redis),
      corrupt_(corrupt),
      local_(static_cast<std::size_t>(config.max_entries)) {}

std::string RouteCache::RedisKey(const std::string& key) const {
  return redis_->config().key_prefix + "cache:" + key;
}

std::optional<CacheEntry> RouteCache::Lookup(const std::string& key, Timestamp now) {
  auto mine = local_.Get(key, now, keep());
  if ((mine && now - mine->stored_at < config_.ttl) || redis_ == nullptr) return mine;
  const std::string redis_key = RedisKey(key);
  auto r = redis_->Command(RedisOp::kCacheGet, {"GET", redis_key});
  if (!r.ok() || r->kind != RedisReply::Kind::kString)
    return mine;  // unusable (counted there) or absent
  auto shared = DecodeCacheEntry(r->str);
  if (!shared.ok()) {
    if (corrupt_ != nullptr) corrupt_->Increment();
    return mine;
  }
  // A node whose clock runs ahead may have stored it "in the future"; an entry older than
  // keep by this node's clock is not served.
  if (now - shared->stored_at >= keep()) return mine;
  if (mine && mine->stored_at >= shared->stored_at) return mine;
  local_.Put(key, *shared);
  return std::move(shared).value();
}

void RouteCache::Store(const std::string& key, const CacheEntry& entry) {
  local_.Put(key, entry);
  if (redis_ == nullptr) return;
  const std::string redis_key = RedisKey(key);
  const std::string value = EncodeCacheEntry(entry);
  const std::string px = std::to_string(std::max<int64_t>(1, keep().count()));
  (void)redis_->Command(RedisOp::kCacheSet, {"SET", redis_key, value, "PX", px});
}

}  // namespace keel::gateway::detail
