#include "keel/obs/log.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <boost/json/serialize.hpp>

#include "keel/core/secrets.h"

namespace keel::obs {
namespace {

spdlog::logger& Logger() {
  static auto* logger = [] {
    auto* l = new spdlog::logger("keel", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    // The message (%v) is the rest of the JSON object, fields already serialised.
    l->set_pattern(R"({"ts":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l",%v})", spdlog::pattern_time_type::utc);
    l->set_level(spdlog::level::info);
    l->flush_on(spdlog::level::trace);  // every line reaches the pipe at once
    return l;
  }();
  return *logger;
}

spdlog::level::level_enum ToSpd(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return spdlog::level::debug;
    case LogLevel::kInfo: return spdlog::level::info;
    case LogLevel::kWarn: return spdlog::level::warn;
    case LogLevel::kError: return spdlog::level::err;
  }
  return spdlog::level::info;
}

void AppendString(std::string& out, std::string_view s) {
  out += boost::json::serialize(boost::json::value(boost::json::string_view(s.data(), s.size())));
}

}  // namespace

LogLevel ParseLogLevel(std::string_view name) {
  if (name == "debug") return LogLevel::kDebug;
  if (name == "warn") return LogLevel::kWarn;
  if (name == "error") return LogLevel::kError;
  return LogLevel::kInfo;
}

void SetLogLevel(LogLevel level) { Logger().set_level(ToSpd(level)); }

void Log(LogLevel level, std::string_view msg, std::initializer_list<LogField> fields) {
  auto& logger = Logger();
  const auto spd = ToSpd(level);
  if (!logger.should_log(spd)) return;
  std::string line = "\"msg\":";
  AppendString(line, msg);
  for (const auto& [key, value] : fields) {
    line.push_back(',');
    AppendString(line, key);
    line.push_back(':');
    line += boost::json::serialize(value);
  }
  // Whatever a field carries (an upstream's error body, a URL), no configured secret is
  // written: the line is scrubbed whole (docs/operations.md, "Secrets").
  if (!Secrets().empty()) line = Secrets().Redact(line);
  logger.log(spd, line);
}

}  // namespace keel::obs
