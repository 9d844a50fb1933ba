#pragma once
// An incremental parser of server-sent events (the WHATWG "text/event-stream" format):
// feed it bytes as they arrive, in pieces of any size; it calls back once per complete
// event. Handles "event:", "data:" (several lines joined by "\n"), "id:", comments
// (lines starting with ':'), and LF, CRLF or CR line ends. Pure; not thread-safe.

#include <functional>
#include <string>
#include <string_view>

namespace keel {

struct SseEvent {
  std::string event;  // empty: the default type ("message")
  std::string data;
  std::string id;
};

class SseParser {
 public:
  /// Returning false from the callback stops parsing (Feed then returns false).
  using Callback = std::function<bool(const SseEvent&)>;
  explicit SseParser(Callback on_event) : on_event_(std::move(on_event)) {}

  /// Parses `bytes`; false when the callback asked to stop or a line grew past
  /// max_line_bytes (1 MiB), which a well-formed stream never does.
  bool Feed(std::string_view bytes);
  /// Bytes of an unfinished event held.
  std::size_t pending() const { return line_.size() + current_.data.size(); }

  static constexpr std::size_t kMaxLineBytes = 1 << 20;

 private:
  bool Line(std::string_view line);
  Callback on_event_;
  std::string line_;
  SseEvent current_;
  bool has_data_ = false;
  bool last_was_cr_ = false;
};

/// Formats one event: "event: NAME\n" (when named) then "data: ..." lines and a blank line.
std::string FormatSse(std::string_view data, std::string_view event = {});

}  // namespace keel
