#include "keel/core/random.h"

namespace keel {

Random* ProcessRandom() {
  static auto* random = [] {
    std::random_device rd;
    return new SeededRandom((static_cast<uint64_t>(rd()) << 32) ^ rd());
  }();
  return random;
}

}  // namespace keel
