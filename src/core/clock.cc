#include "keel/core/clock.h"

#include <ctime>
#include <cstdio>

namespace keel {

Timestamp SystemClock::Now() const {
  return std::chrono::time_point_cast<std::chrono::milliseconds>(std::chrono::system_clock::now());
}

SteadyTime SystemClock::SteadyNow() const { return std::chrono::steady_clock::now(); }

SystemClock* SystemClock::Instance() {
  static auto* clock = new SystemClock();
  return clock;
}

std::string FormatRfc3339(Timestamp t) {
  const int64_t ms = ToMillis(t);
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  int millis = static_cast<int>(ms % 1000);
  if (millis < 0) {
    millis += 1000;
    --secs;
  }
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
  return buf;
}

}  // namespace keel
