#pragma once
// Injected randomness, so that jitter and ids are reproducible in tests.

#include <cstdint>
#include <mutex>
#include <random>

namespace keel {

/// A source of uniform random numbers. Implementations are thread-safe.
class Random {
 public:
  virtual ~Random() = default;
  /// A uniform double in [0, 1).
  virtual double Uniform() = 0;
  /// 64 uniform random bits.
  virtual uint64_t Bits() = 0;
};

/// A seeded Mersenne Twister behind a mutex. Same seed, same sequence.
class SeededRandom final : public Random {
 public:
  explicit SeededRandom(uint64_t seed) : engine_(seed) {}
  double Uniform() override {
    std::lock_guard lock(mu_);
    return std::uniform_real_distribution<double>(0.0, 1.0)(engine_);
  }
  uint64_t Bits() override {
    std::lock_guard lock(mu_);
    return engine_();
  }

 private:
  std::mutex mu_;
  std::mt19937_64 engine_;
};

/// A SeededRandom seeded from std::random_device; for production wiring.
Random* ProcessRandom();

}  // namespace keel
