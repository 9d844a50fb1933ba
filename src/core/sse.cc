#include "keel/core/sse.h"

namespace keel {

bool SseParser::Feed(std::string_view bytes) {
  for (char c : bytes) {
    if (c == '\n' && last_was_cr_) {  // the LF of a CRLF
      last_was_cr_ = false;
      continue;
    }
    last_was_cr_ = c == '\r';
    if (c == '\n' || c == '\r') {
      if (!Line(line_)) return false;
      line_.clear();
      continue;
    }
    line_.push_back(c);
    if (line_.size() > kMaxLineBytes) return false;
  }
  return true;
}

bool SseParser::Line(std::string_view line) {
  if (line.empty()) {  // dispatch
    if (!has_data_) {
      current_ = SseEvent{};
      return true;
    }
    SseEvent ev = std::move(current_);
    current_ = SseEvent{};
    has_data_ = false;
    return on_event_(ev);
  }
  if (line.front() == ':') return true;  // comment
  const auto colon = line.find(':');
  std::string_view field = line.substr(0, colon);
  std::string_view value = colon == std::string_view::npos ? std::string_view() : line.substr(colon + 1);
  if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  if (field == "data") {
    if (has_data_) current_.data.push_back('\n');
    current_.data.append(value);
    has_data_ = true;
  } else if (field == "event") {
    current_.event = std::string(value);
  } else if (field == "id") {
    current_.id = std::string(value);
  }
  return true;
}

std::string FormatSse(std::string_view data, std::string_view event) {
  std::string out;
  if (!event.empty()) {
    out += "event: ";
    out += event;
    out += '\n';
  }
  std::size_t pos = 0;
  while (true) {
    const auto nl = data.find('\n', pos);
    out += "data: ";
    out += data.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    out += '\n';
    if (nl == std::string_view::npos) break;
    pos = nl + 1;
  }
  out += '\n';
  return out;
}

}  // namespace keel
