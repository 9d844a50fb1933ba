// Fuzzes the server-sent events parser (keel/core/sse.h), as a provider's stream reaches
// it: the input is the stream; its first byte seeds the sizes of the pieces it arrives
// in. Properties: no crash; the events do not depend on how the bytes were cut; what
// FormatSse writes parses back to the same data and event.

#include <vector>

#include "fuzz_support.h"
#include "keel/core/sse.h"

namespace {

struct Collected {
  std::vector<keel::SseEvent> events;
  bool ok = true;
};

Collected ParseInPieces(std::string_view stream, uint8_t seed) {
  Collected out;
  keel::SseParser parser([&](const keel::SseEvent& e) {
    out.events.push_back(e);
    return true;
  });
  std::size_t pos = 0;
  uint32_t state = seed * 2654435761u + 1;
  while (pos < stream.size() && out.ok) {
    state = state * 1103515245u + 12345u;
    const std::size_t n = seed == 0 ? stream.size() : 1 + (state >> 16) % 64;
    out.ok = parser.Feed(stream.substr(pos, n));
    pos += n;
  }
  return out;
}

bool Same(const std::vector<keel::SseEvent>& a, const std::vector<keel::SseEvent>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].data != b[i].data || a[i].event != b[i].event || a[i].id != b[i].id) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  if (size == 0) return 0;
  const uint8_t seed = data[0];
  const std::string_view stream = fuzz::AsText(data + 1, size - 1);

  const auto whole = ParseInPieces(stream, 0);
  const auto pieces = ParseInPieces(stream, seed | 1);
  if (whole.ok != pieces.ok || !Same(whole.events, pieces.events)) {
    fuzz::Fail("the events depend on how the stream was cut");
  }

  // FormatSse round trip: data without CR (FormatSse splits on LF only; a CR would end a
  // line on the reading side) and an event name without line ends.
  const auto [d, e] = fuzz::SplitInput(stream);
  if (d.find('\r') == std::string_view::npos && e.find_first_of("\r\n") == std::string_view::npos &&
      d.size() < SseParser::kMaxLineBytes) {
    const std::string wire = FormatSse(d, e);
    const auto back = ParseInPieces(wire, seed);
    if (!back.ok || back.events.size() != 1 || back.events[0].data != d ||
        back.events[0].event != e) {
      // An event name of "" reads back as ""; a leading space in data or the name is
      // eaten by the one optional space after the colon, which FormatSse always writes.
      fuzz::Fail("FormatSse does not parse back", wire);
    }
  }
  return 0;
}
