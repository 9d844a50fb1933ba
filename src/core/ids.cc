#include "keel/core/ids.h"

namespace keel {
namespace {
constexpr char kCrockford[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
}

std::string NewUlid(Timestamp t, Random& random) {
  std::string out(26, '0');
  uint64_t ms = static_cast<uint64_t>(ToMillis(t)) & ((uint64_t{1} << 48) - 1);
  for (int i = 9; i >= 0; --i) {
    out[i] = kCrockford[ms & 31];
    ms >>= 5;
  }
  uint64_t hi = random.Bits();
  uint64_t lo = random.Bits();
  // 80 random bits: 16 chars of 5 bits.
  for (int i = 25; i >= 10; --i) {
    out[i] = kCrockford[lo & 31];
    lo = (lo >> 5) | ((hi & 31) << 59);
    hi >>= 5;
  }
  return out;
}

uint64_t Fnv1a64(std::string_view data) {
  uint64_t h = 14695981039346656037ull;  // the offset basis
  for (unsigned char c : data) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string NewRunId(Timestamp t, Random& random) { return "run_" + NewUlid(t, random); }

std::string NewToken(Random& random) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(32);
  for (int w = 0; w < 2; ++w) {
    uint64_t bits = random.Bits();
    for (int i = 0; i < 16; ++i) {
      out.push_back(kHex[bits & 15]);
      bits >>= 4;
    }
  }
  return out;
}

}  // namespace keel
