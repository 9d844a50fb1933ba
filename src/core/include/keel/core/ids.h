#pragma once
// Identifiers: time-ordered, random, URL-safe. A run id is "run_" followed by a 26-char
// ULID (48 bits of milliseconds, 80 random bits, Crockford base32), so that ids sort by
// creation time and serve as pagination cursors.

#include <cstdint>
#include <string>
#include <string_view>

#include "keel/core/clock.h"
#include "keel/core/random.h"

namespace keel {

/// A ULID for time `t`, random part from `random`.
std::string NewUlid(Timestamp t, Random& random);

/// "run_" + NewUlid.
std::string NewRunId(Timestamp t, Random& random);

/// 32 lowercase hex characters of randomness; for lease tokens.
std::string NewToken(Random& random);

/// FNV-1a, 64 bits: a stable, non-cryptographic hash (the same on every build and run).
uint64_t Fnv1a64(std::string_view data);

}  // namespace keel
