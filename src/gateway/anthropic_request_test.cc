// ToAnthropicRequest: OpenAI chat-completions bodies in, Anthropic Messages bodies out
// (anthropic_request.h). The provider's tests check that these bodies reach the upstream.

#include "anthropic_request.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "keel/core/json.h"
#include "keel/testing/assert.h"

namespace keel::gateway::detail {
namespace {

constexpr std::string_view kPng =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+"
    "M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

json::object Body(std::string_view messages_json) {
  return json::object{{"model", "claude-test"}, {"messages", json::parse(messages_json)}};
}

json::object Translated(std::string_view messages_json) {
  auto r = ToAnthropicRequest(Body(messages_json));
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
  return r.ok() ? *r : json::object{};
}

// The refusal of `messages_json`: its param, with the message checked to name it too.
std::string RefusedParam(std::string_view messages_json) {
  auto r = ToAnthropicRequest(Body(messages_json));
  if (r.ok()) return "(accepted: " + json::serialize(*r) + ")";
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest) << r.error().message;
  EXPECT_NE(r.error().message.find(r.error().param), std::string::npos) << r.error().message;
  return r.error().param;
}

std::string ImagePart(std::string_view url) {
  return R"({"type": "image_url", "image_url": {"url": ")" + std::string(url) + R"("}})";
}

std::string Canonical(const json::value& v) { return CanonicalJson(v); }

TEST(AnthropicRequestTest, UserImagesAndTextsKeepTheirOrder) {
  const auto out = Translated(R"([{"role": "user", "content": [
      {"type": "text", "text": "Compare"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,)" +
                              std::string(kPng) + R"(", "detail": "high"}},
      {"type": "text", "text": "with"},
      {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}}]}])");
  const json::value expected = json::parse(R"([{"role": "user", "content": [
      {"type": "text", "text": "Compare"},
      {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ")" +
                                           std::string(kPng) + R"("}},
      {"type": "text", "text": "with"},
      {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]}])");
  EXPECT_EQ(Canonical(out.at("messages")), Canonical(expected));
}

TEST(AnthropicRequestTest, EveryMediaTypeAnthropicTakesIsSentAsBase64) {
  const std::pair<std::string, std::string> cases[] = {{"image/jpeg", "image/jpeg"},
                                                       {"image/png", "image/png"},
                                                       {"image/gif", "image/gif"},
                                                       {"image/webp", "image/webp"},
                                                       {"IMAGE/PNG", "image/png"}};
  for (const auto& [type, sent] : cases) {
    const auto out = Translated(R"([{"role": "user", "content": [)" +
                                ImagePart("data:" + type + ";base64,AAAA") + "]}]");
    ASSERT_FALSE(out.empty()) << type;
    const auto& source = out.at("messages").at(0).at("content").at(0).at("source");
    EXPECT_EQ(source.at("type").as_string(), "base64") << type;
    EXPECT_EQ(source.at("media_type").as_string(), sent) << type;
    EXPECT_EQ(source.at("data").as_string(), "AAAA") << type;
  }
}

TEST(AnthropicRequestTest, AMessageOfOnlyAnImageIsSent) {
  const auto out = Translated(R"([{"role": "user", "content": [)" +
                              ImagePart("http://example.com/a.png") + "]}]");
  EXPECT_EQ(Canonical(out.at("messages")), Canonical(json::parse(R"([{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "http://example.com/a.png"}}]}])")));
}

TEST(AnthropicRequestTest, AnImageOfAnotherMediaTypeIsRefusedNamingItsPath) {
  const std::string messages = R"([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi"},
      {"role": "user", "content": [{"type": "text", "text": "look"}, )" +
                               ImagePart("data:image/tiff;base64,AAAA") + "]}]";
  EXPECT_EQ(RefusedParam(messages), "messages[2].content[1].image_url.url");
  auto r = ToAnthropicRequest(Body(messages));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("image/tiff"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("image/webp"), std::string::npos) << "says what is taken";
}

TEST(AnthropicRequestTest, MalformedImageUrlsAreRefusedNamingTheirPath) {
  for (const std::string url : {"data:image/png,AAAA",          // not base64
                                "data:image/png;base64",        // no data
                                "data:image/png;base64,",       // empty data
                                "data:image/png;base64,AA AA",  // not the base64 alphabet
                                "data:image/png;base64,AA===",  // three pads
                                "data:;base64,AAAA",            // no media type
                                "ftp://example.com/a.png", "cat.png", ""}) {
    EXPECT_EQ(RefusedParam(R"([{"role": "user", "content": [)" + ImagePart(url) + "]}]"),
              "messages[0].content[0].image_url.url")
        << url;
  }
  EXPECT_EQ(RefusedParam(R"([{"role": "user", "content": "a"}, {"role": "user", "content": [
                {"type": "text", "text": "b"}, {"type": "image_url", "image_url": {"detail": "low"}}]}])"),
            "messages[1].content[1].image_url.url");
}

TEST(AnthropicRequestTest, ImagesInSystemOrAssistantMessagesAreRefused) {
  EXPECT_EQ(RefusedParam(R"([{"role": "system", "content": [)" + ImagePart("https://e.com/a.png") +
                         R"(]}, {"role": "user", "content": "Hi"}])"),
            "messages[0].content[0]");
  EXPECT_EQ(RefusedParam(R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
                {"type": "text", "text": "here"}, )" +
                         ImagePart("https://e.com/a.png") + "]}]"),
            "messages[1].content[1]");
}

TEST(AnthropicRequestTest, FileAndAudioPartsAreRefusedNamingTheirPath) {
  const std::string file =
      R"({"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,AAAA"}})";
  const std::string audio =
      R"({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})";
  EXPECT_EQ(
      RefusedParam(
          R"([{"role": "user", "content": "Hi"}, {"role": "user", "content": [{"type": "text", "text": "read"}, )" +
          file + "]}]"),
      "messages[1].content[1]");
  EXPECT_EQ(RefusedParam(R"([{"role": "user", "content": [)" + audio + "]}]"),
            "messages[0].content[0]");
  EXPECT_EQ(RefusedParam(R"([{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [)" +
                         audio + "]}]"),
            "messages[2].content[0]");
  auto r = ToAnthropicRequest(Body(R"([{"role": "user", "content": [)" + audio + "]}]"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("input_audio part, which the Anthropic format does not take"),
            std::string::npos)
      << r.error().message;
}

TEST(AnthropicRequestTest, ToolResultsCarryTextAndImageBlocks) {
  const auto out = Translated(R"([{"role": "user", "content": "Screenshot the page"},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "shot", "arguments": "{\"url\":\"a\"}"}},
        {"id": "c2", "type": "function", "function": {"name": "shot", "arguments": "{\"url\":\"b\"}"}},
        {"id": "c3", "type": "function", "function": {"name": "log", "arguments": "{}"}},
        {"id": "c4", "type": "function", "function": {"name": "log", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "page a"}, )" +
                              ImagePart("data:image/webp;base64,AAAA") + R"(]},
      {"role": "tool", "tool_call_id": "c2", "content": "page b"},
      {"role": "tool", "tool_call_id": "c3", "content": ""},
      {"role": "tool", "tool_call_id": "c4"},
      {"role": "user", "content": "Which is nicer?"}])");
  const json::value expected = json::parse(R"([
      {"role": "user", "content": "Screenshot the page"},
      {"role": "assistant", "content": [
        {"type": "tool_use", "id": "c1", "name": "shot", "input": {"url": "a"}},
        {"type": "tool_use", "id": "c2", "name": "shot", "input": {"url": "b"}},
        {"type": "tool_use", "id": "c3", "name": "log", "input": {}},
        {"type": "tool_use", "id": "c4", "name": "log", "input": {}}]},
      {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "c1", "content": [
          {"type": "text", "text": "page a"},
          {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "AAAA"}}]},
        {"type": "tool_result", "tool_use_id": "c2", "content": "page b"},
        {"type": "tool_result", "tool_use_id": "c3", "content": ""},
        {"type": "tool_result", "tool_use_id": "c4", "content": ""},
        {"type": "text", "text": "Which is nicer?"}]}])");
  EXPECT_EQ(Canonical(out.at("messages")), Canonical(expected));
}

TEST(AnthropicRequestTest, AToolResultOfSeveralTextsKeepsThemAsBlocks) {
  const auto out = Translated(R"([{"role": "user", "content": "go"},
      {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": ""}, {"type": "text", "text": "two"}]}])");
  EXPECT_EQ(Canonical(out.at("messages").at(2).at("content").at(0).at("content")),
            Canonical(json::parse(
                R"([{"type": "text", "text": "one"}, {"type": "text", "text": "two"}])")));
}

TEST(AnthropicRequestTest, AnAssistantWithNullContentAndToolCallsSendsToolUses) {
  const auto out = Translated(R"([{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])");
  EXPECT_EQ(Canonical(out.at("messages")), Canonical(json::parse(R"([
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "get_weather", "input": {"city": "Paris"}}]},
      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "sunny"}]}])")));
}

TEST(AnthropicRequestTest, AnAssistantPrefillIsTheLastMessageWithoutTrailingWhitespace) {
  auto out = Translated(R"([{"role": "user", "content": "Name a colour as JSON"},
      {"role": "assistant", "content": "{\"colour\": \n"}])");
  EXPECT_EQ(Canonical(out.at("messages")), Canonical(json::parse(R"([
      {"role": "user", "content": "Name a colour as JSON"},
      {"role": "assistant", "content": "{\"colour\":"}])")));

  // Parts: the last text is trimmed, the others are kept as they are.
  out = Translated(R"([{"role": "user", "content": "Go"},
      {"role": "assistant", "content": [{"type": "text", "text": "One "}, {"type": "text", "text": "two "}]}])");
  EXPECT_EQ(Canonical(out.at("messages").at(1).at("content")),
            Canonical(json::parse(
                R"([{"type": "text", "text": "One "}, {"type": "text", "text": "two"}])")));

  // A prefill of whitespace alone says nothing: it is not sent.
  out =
      Translated(R"([{"role": "user", "content": "Go"}, {"role": "assistant", "content": " \n"}])");
  EXPECT_EQ(Canonical(out.at("messages")),
            Canonical(json::parse(R"([{"role": "user", "content": "Go"}])")));

  // Whitespace ends only the last message: an earlier assistant turn is left alone.
  out = Translated(
      R"([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b "}, {"role": "user", "content": "c"}])");
  EXPECT_EQ(out.at("messages").at(1).at("content").as_string(), "b ");
}

TEST(AnthropicRequestTest, OtherPartTypesAreDropped) {
  const auto out = Translated(R"([{"role": "user", "content": "Hi"},
      {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}, {"type": "text", "text": "But"}]},
      {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://e.com/v.mp4"}}, {"type": "text", "text": "ok"}]}])");
  EXPECT_EQ(Canonical(out.at("messages")), Canonical(json::parse(R"([
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "But"}, {"role": "user", "content": "ok"}])")));
}

TEST(AnthropicRequestTest, NothingToSendIsRefused) {
  EXPECT_EQ(
      RefusedParam(
          R"([{"role": "system", "content": "Be kind."}, {"role": "user", "content": [{"type": "text", "text": ""}]}])"),
      "messages");
  EXPECT_EQ(
      RefusedParam(R"([{"role": "user", "content": null}, {"role": "assistant", "content": " "}])"),
      "messages");
  // A user's whitespace is sent as it is: only a prefill is trimmed.
  const auto out =
      Translated(R"([{"role": "user", "content": "  "}, {"role": "assistant", "content": "  "}])");
  EXPECT_EQ(Canonical(out.at("messages")),
            Canonical(json::parse(R"([{"role": "user", "content": "  "}])")));
}

}  // namespace
}  // namespace keel::gateway::detail
