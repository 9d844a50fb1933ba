#pragma once
// Structured logs: one JSON object per line on stderr, e.g.
//   {"ts":"2026-11-25T01:45:50.123Z","level":"info","msg":"step succeeded",
//    "run_id":"run_01J...","step_id":"plan","attempt":1}
// Thread-safe. Callers pass fields explicitly; secrets (API keys, Authorization
// headers, request bodies) are never passed to the logger.

#include <initializer_list>
#include <string_view>
#include <type_traits>
#include <utility>

#include <boost/json/string.hpp>

#include <boost/json/value.hpp>

namespace keel::obs {

enum class LogLevel { kDebug, kInfo, kWarn, kError };

/// Parses "debug" | "info" | "warn" | "error"; anything else is kInfo.
LogLevel ParseLogLevel(std::string_view name);

/// Sets the minimum level written. Default: kInfo. May be called at any time.
void SetLogLevel(LogLevel level);

/// One field of a log line: a key and any value Boost.JSON can hold (strings included).
struct LogField {
  template <typename T>
  LogField(std::string_view k, T&& v) : key(k) {  // NOLINT: implicit by design
    if constexpr (std::is_convertible_v<T, std::string_view>) {
      const std::string_view sv(v);
      value = boost::json::string(sv.data(), sv.size());
    } else {
      value = boost::json::value(std::forward<T>(v));
    }
  }
  std::string_view key;
  boost::json::value value;
};

/// Writes one line if `level` is enabled. Field values are JSON (strings are escaped).
void Log(LogLevel level, std::string_view msg, std::initializer_list<LogField> fields = {});

inline void LogDebug(std::string_view m, std::initializer_list<LogField> f = {}) { Log(LogLevel::kDebug, m, f); }
inline void LogInfo(std::string_view m, std::initializer_list<LogField> f = {}) { Log(LogLevel::kInfo, m, f); }
inline void LogWarn(std::string_view m, std::initializer_list<LogField> f = {}) { Log(LogLevel::kWarn, m, f); }
inline void LogError(std::string_view m, std::initializer_list<LogField> f = {}) { Log(LogLevel::kError, m, f); }

}  // namespace keel::obs
