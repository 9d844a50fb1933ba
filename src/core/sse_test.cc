#include "keel/core/sse.h"

#include <gtest/gtest.h>

#include <vector>

namespace keel {
namespace {

std::vector<SseEvent> ParseInPieces(std::string_view text, std::size_t piece) {
  std::vector<SseEvent> out;
  SseParser p([&](const SseEvent& e) {
    out.push_back(e);
    return true;
  });
  for (std::size_t i = 0; i < text.size(); i += piece) EXPECT_TRUE(p.Feed(text.substr(i, piece)));
  return out;
}

TEST(SseParserTest, ParsesEventsWhateverTheChunkBoundaries) {
  const std::string text =
      ": keep-alive comment\n"
      "data: {\"a\":1}\n\n"
      "event: message_start\r\ndata: one\r\ndata: two\r\n\r\n"
      "id: 7\rdata: [DONE]\r\r";
  for (std::size_t piece : {1u, 2u, 3u, 7u, 1000u}) {
    const auto events = ParseInPieces(text, piece);
    ASSERT_EQ(events.size(), 3u) << "piece " << piece;
    EXPECT_EQ(events[0].data, "{\"a\":1}");
    EXPECT_EQ(events[0].event, "");
    EXPECT_EQ(events[1].event, "message_start");
    EXPECT_EQ(events[1].data, "one\ntwo");
    EXPECT_EQ(events[2].data, "[DONE]");
    EXPECT_EQ(events[2].id, "7");
  }
}

TEST(SseParserTest, AnUnfinishedEventIsHeldAndBlankLinesAloneDispatchNothing) {
  std::vector<SseEvent> out;
  SseParser p([&](const SseEvent& e) {
    out.push_back(e);
    return true;
  });
  EXPECT_TRUE(p.Feed("\n\n\ndata: partial"));
  EXPECT_TRUE(out.empty());
  EXPECT_GT(p.pending(), 0u);
  EXPECT_TRUE(p.Feed("\n\n"));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].data, "partial");
}

TEST(SseParserTest, TheCallbackStopsParsing) {
  int n = 0;
  SseParser p([&](const SseEvent&) { return ++n < 2; });
  EXPECT_FALSE(p.Feed("data: 1\n\ndata: 2\n\ndata: 3\n\n"));
  EXPECT_EQ(n, 2);
}

TEST(SseParserTest, AnOverlongLineIsRefused) {
  SseParser p([](const SseEvent&) { return true; });
  EXPECT_FALSE(p.Feed(std::string(SseParser::kMaxLineBytes + 10, 'x')));
}

TEST(FormatSseTest, RoundTripsThroughTheParser) {
  const std::string text = FormatSse("line1\nline2", "delta") + FormatSse("{}");
  EXPECT_EQ(FormatSse("{}"), "data: {}\n\n");
  const auto events = ParseInPieces(text, 5);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].event, "delta");
  EXPECT_EQ(events[0].data, "line1\nline2");
  EXPECT_EQ(events[1].data, "{}");
}

}  // namespace
}  // namespace keel
