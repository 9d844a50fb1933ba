#include "shared_limits.h"

#include <charconv>

namespace keel::gateway::detail {
namespace {

// Shared by both scripts: the server's time in milliseconds (with microseconds), a
// bucket's level now (refilled at cap/60 per second; a missing bucket is full), and
// saving a level with an expiry at the moment the bucket would be full again. `last`
// never moves back, so a server clock that steps back refills nothing twice.
constexpr const char* kPrelude = R"lua(
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function level(key, cap)
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, last = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or last == nil then return cap, now end
  if now > last then return math.min(cap, tokens + (now - last) * cap / 60000), now end
  return tokens, last
end
local function save(key, cap, tokens, last)
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', last))
  redis.call('PEXPIRE', key, math.ceil((cap - tokens) * 60000 / cap) + 1000)
end
)lua";

// KEYS: the rpm and tpm buckets; ARGV: their limits (0: none) and the tokens to take from
// tpm (rpm gives 1). Both or neither; 0 when taken, else the milliseconds until both
// could be. A take that is due within a rounding is not refused for it (as TokenBucket).
constexpr const char* kTake = R"lua(
local caps = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local want = {1, tonumber(ARGV[3])}
local have, at = {}, {}
local wait = 0
for i = 1, 2 do
  if caps[i] > 0 then
    have[i], at[i] = level(KEYS[i], caps[i])
    local n = math.min(want[i], caps[i])
    if have[i] + 1e-9 * math.max(1, caps[i]) < n then
      wait = math.max(wait, math.ceil((n - have[i]) * 60000 / caps[i]))
    end
  end
end
if wait > 0 then return wait end
for i = 1, 2 do
  if caps[i] > 0 then save(KEYS[i], caps[i], have[i] - math.min(want[i], caps[i]), at[i]) end
end
return 0
)lua";

// KEYS: the rpm and tpm buckets; ARGV: their limits (0: none) and the tokens to add to
// each (negative: take, below zero if need be), capped at the limit.
constexpr const char* kAdjust = R"lua(
for i = 1, 2 do
  local cap, delta = tonumber(ARGV[i]), tonumber(ARGV[i + 2])
  if cap > 0 and delta ~= 0 then
    local tokens, last = level(KEYS[i], cap)
    save(KEYS[i], cap, math.min(cap, tokens + delta), last)
  end
end
return 1
)lua";

const RedisScript& TakeScript() {
  static const RedisScript* script = new RedisScript(std::string(kPrelude) + kTake);
  return *script;
}

const RedisScript& AdjustScript() {
  static const RedisScript* script = new RedisScript(std::string(kPrelude) + kAdjust);
  return *script;
}

std::string Number(double v) {
  char buf[64];
  const auto [p, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, p) : std::string("0");
}

}  // namespace

SharedLimits::SharedLimits(RedisClient& redis) : redis_(redis) {}

std::string SharedLimits::Key(const std::string& provider, const char* which) const {
  return redis_.config().key_prefix + "rate:{" + provider + "}:" + which;
}

Result<Duration> SharedLimits::Take(const std::string& provider, int64_t rpm, int64_t tpm,
                                    double tokens) {
  const std::string rpm_key = Key(provider, "rpm"), tpm_key = Key(provider, "tpm");
  const std::string a1 = std::to_string(rpm), a2 = std::to_string(tpm), a3 = Number(tokens);
  auto r = redis_.Eval(RedisOp::kRateTake, TakeScript(), {rpm_key, tpm_key}, {a1, a2, a3});
  if (!r.ok()) return std::move(r).error();
  if (r->kind != RedisReply::Kind::kInteger || r->integer < 0) {
    return Error(ErrorCode::kInternal,
                 "redis: the rate-limit script answered something other than a wait");
  }
  return Duration(r->integer);
}

Result<void> SharedLimits::Adjust(const std::string& provider, int64_t rpm, int64_t tpm,
                                  double requests, double tokens) {
  const std::string rpm_key = Key(provider, "rpm"), tpm_key = Key(provider, "tpm");
  const std::string a1 = std::to_string(rpm), a2 = std::to_string(tpm), a3 = Number(requests),
                    a4 = Number(tokens);
  auto r = redis_.Eval(RedisOp::kRateAdjust, AdjustScript(), {rpm_key, tpm_key}, {a1, a2, a3, a4});
  if (!r.ok()) return std::move(r).error();
  return Ok();
}

}  // namespace keel::gateway::detail
