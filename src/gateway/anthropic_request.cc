// The request side of the Anthropic provider: OpenAI chat-completions -> Anthropic
// Messages (anthropic_request.h).

#include "anthropic_request.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstddef>
#include <string>
#include <utility>

namespace keel::gateway::detail {

std::string_view StringOr(const json::value* v, std::string_view fallback) {
  return v != nullptr && v->is_string() ? std::string_view(v->get_string()) : fallback;
}

int64_t IntOr(const json::value* v, int64_t fallback) {
  if (v == nullptr) return fallback;
  if (v->is_int64()) return v->get_int64();
  if (v->is_uint64()) return static_cast<int64_t>(std::min<uint64_t>(v->get_uint64(), INT64_MAX));
  if (v->is_double()) return static_cast<int64_t>(v->get_double());
  return fallback;
}

namespace {

constexpr int64_t kDefaultMaxTokens = 4096;

// The media types Anthropic's image blocks take.
constexpr std::array<std::string_view, 4> kImageMediaTypes = {"image/jpeg", "image/png",
                                                              "image/gif", "image/webp"};

bool StartsWithNoCase(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() &&
         std::equal(prefix.begin(), prefix.end(), s.begin(), [](unsigned char a, unsigned char b) {
           return std::tolower(a) == std::tolower(b);
         });
}

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

// Standard base64 (RFC 4648 section 4): its alphabet, with at most two '=' at the end.
bool IsBase64(std::string_view s) {
  const std::size_t body = s.find_last_not_of('=') + 1;
  if (body == 0 || s.size() - body > 2) return false;
  return std::all_of(s.begin(), s.begin() + static_cast<std::ptrdiff_t>(body),
                     [](unsigned char c) { return std::isalnum(c) || c == '+' || c == '/'; });
}

Error Refused(const std::string& path, std::string why) {
  return Error(ErrorCode::kInvalidRequest, path + " " + why, path);
}

// An `image_url` part (at `path`) as an Anthropic image block: a base64 data URL of a media
// type Anthropic takes as a base64 source, an http(s) URL as a url source. `detail` has no
// Anthropic counterpart and is dropped.
Result<json::object> ImageBlock(const json::object& part, const std::string& path) {
  const json::value* image = part.if_contains("image_url");
  const json::value* url =
      image != nullptr && image->is_object() ? image->get_object().if_contains("url") : image;
  const std::string url_path = path + ".image_url.url";
  const std::string_view u = StringOr(url);
  if (StartsWithNoCase(u, "http://") || StartsWithNoCase(u, "https://")) {
    return json::object{{"type", "image"}, {"source", json::object{{"type", "url"}, {"url", u}}}};
  }
  if (!StartsWithNoCase(u, "data:")) {
    return Refused(url_path,
                   "must be a data URL (data:<media type>;base64,<data>) or an http(s) URL");
  }
  const std::size_t comma = u.find(',');
  const std::string_view meta = u.substr(5, comma == std::string_view::npos ? 0 : comma - 5);
  const std::size_t semi = meta.rfind(';');
  if (comma == std::string_view::npos || semi == std::string_view::npos ||
      Lower(meta.substr(semi + 1)) != "base64") {
    return Refused(url_path, "is a data URL that is not data:<media type>;base64,<data>");
  }
  const std::string media_type = Lower(meta.substr(0, meta.find(';')));
  if (std::find(kImageMediaTypes.begin(), kImageMediaTypes.end(), media_type) ==
      kImageMediaTypes.end()) {
    return Refused(url_path, "is an image of type \"" + media_type.substr(0, 64) +
                                 "\", which the Anthropic format does not take (image/jpeg, "
                                 "image/png, image/gif or image/webp)");
  }
  const std::string_view data = u.substr(comma + 1);
  if (!IsBase64(data)) return Refused(url_path, "is a data URL whose data is not base64");
  return json::object{
      {"type", "image"},
      {"source", json::object{{"type", "base64"}, {"media_type", media_type}, {"data", data}}}};
}

// The blocks of the `content` of the message at `path` ("messages[2]"), in order: a
// string is a text block; of a list of parts, `text` parts are text blocks and `image_url`
// parts image blocks (where `images` is true: user and tool messages). Empty texts are
// dropped (Anthropic refuses empty text blocks), and so are part types that have no
// meaning to send (`refusal`, and any type added later). `file` and `input_audio` parts,
// and images where they are not taken, are refused, naming the part.
Result<json::array> ContentBlocks(const json::value* content, const std::string& path,
                                  bool images) {
  json::array blocks;
  if (content == nullptr) return blocks;
  if (content->is_string()) {
    if (!content->get_string().empty())
      blocks.push_back(json::object{{"type", "text"}, {"text", *content}});
    return blocks;
  }
  if (!content->is_array()) return blocks;
  const json::array& parts = content->get_array();
  for (std::size_t j = 0; j < parts.size(); ++j) {
    if (!parts[j].is_object()) continue;
    const auto& po = parts[j].get_object();
    const std::string_view type = StringOr(po.if_contains("type"));
    const std::string part_path = path + ".content[" + std::to_string(j) + "]";
    if (type == "text") {
      const std::string_view text = StringOr(po.if_contains("text"));
      if (!text.empty()) blocks.push_back(json::object{{"type", "text"}, {"text", text}});
    } else if (type == "image_url") {
      if (!images)
        return Refused(part_path, "is an image part, which only user and tool messages take");
      auto block = ImageBlock(po, part_path);
      if (!block.ok()) return std::move(block).error();
      blocks.push_back(std::move(*block));
    } else if (type == "file" || type == "input_audio") {
      return Refused(part_path,
                     "is a " + std::string(type) +
                         " part, which the Anthropic format does not take (send it to an "
                         "OpenAI-compatible target)");
    }
  }
  return blocks;
}

// A message's content as Anthropic's `content`: one text block as a plain string, as most
// clients write it; no block at all as "" (a tool_result with nothing to say).
json::value Simplified(json::array blocks) {
  if (blocks.empty()) return "";
  if (blocks.size() == 1 && StringOr(blocks[0].get_object().if_contains("type")) == "text") {
    return blocks[0].get_object()["text"];
  }
  return blocks;
}

// Anthropic refuses a final assistant message (a prefill) whose text ends in whitespace:
// the trailing whitespace of its last text block is trimmed, and a block (and a message)
// left empty is dropped.
void TrimPrefill(json::array& messages) {
  if (messages.empty() || StringOr(messages.back().get_object().if_contains("role")) != "assistant")
    return;
  json::array& blocks = messages.back().get_object()["content"].get_array();
  if (blocks.empty() || StringOr(blocks.back().get_object().if_contains("type")) != "text") return;
  const std::string_view text = StringOr(blocks.back().get_object().if_contains("text"));
  const std::size_t end = text.find_last_not_of(" \t\r\n\f\v");
  if (end == std::string_view::npos) {
    blocks.pop_back();
    if (blocks.empty()) messages.pop_back();
    return;
  }
  std::string trimmed(text.substr(0, end + 1));  // a copy: `text` views the value replaced
  blocks.back().get_object()["text"] = std::move(trimmed);
}

// max_completion_tokens, else max_tokens, else the default: Anthropic requires one.
Result<int64_t> MaxTokens(const json::object& in) {
  for (const char* key : {"max_completion_tokens", "max_tokens"}) {
    const json::value* v = in.if_contains(key);
    if (v == nullptr || v->is_null()) continue;
    const bool whole = v->is_int64() || v->is_uint64() ||
                       (v->is_double() && v->get_double() == static_cast<double>(IntOr(v)));
    if (!whole || IntOr(v) < 1) {
      return Error(ErrorCode::kInvalidRequest, std::string(key) + " must be a positive integer",
                   key);
    }
    return IntOr(v);
  }
  return kDefaultMaxTokens;
}

// An assistant message's tool_calls as Anthropic tool_use blocks (arguments parsed; an
// argument string that is not a JSON object is sent as {}).
void AddToolUses(const json::object& message, json::array& blocks) {
  const json::value* calls = message.if_contains("tool_calls");
  if (calls == nullptr || !calls->is_array()) return;
  for (const auto& c : calls->get_array()) {
    if (!c.is_object()) continue;
    const auto& co = c.get_object();
    const json::value* fn = co.if_contains("function");
    const json::object empty;
    const json::object& f = fn != nullptr && fn->is_object() ? fn->get_object() : empty;
    boost::system::error_code ec;
    json::value input = json::parse(StringOr(f.if_contains("arguments"), "{}"), ec);
    if (ec || !input.is_object()) input = json::object{};
    blocks.push_back(json::object{{"type", "tool_use"},
                                  {"id", StringOr(co.if_contains("id"))},
                                  {"name", StringOr(f.if_contains("name"))},
                                  {"input", std::move(input)}});
  }
}

// OpenAI's tools and tool_choice in Anthropic's shapes: {name, description, input_schema};
// "auto" {type: auto}, "required" {type: any}, "none" {type: none}, a named function
// {type: tool, name}; parallel_tool_calls: false sets disable_parallel_tool_use.
void AddTools(const json::object& in, json::object& out) {
  if (const auto* tools = in.if_contains("tools"); tools != nullptr && tools->is_array()) {
    json::array list;
    for (const auto& t : tools->get_array()) {
      if (!t.is_object()) continue;
      const json::value* fn = t.get_object().if_contains("function");
      if (fn == nullptr || !fn->is_object()) continue;
      const auto& f = fn->get_object();
      json::object tool{{"name", StringOr(f.if_contains("name"))}};
      if (const auto d = StringOr(f.if_contains("description")); !d.empty())
        tool["description"] = d;
      const json::value* params = f.if_contains("parameters");
      tool["input_schema"] = params != nullptr && params->is_object()
                                 ? *params
                                 : json::value(json::object{{"type", "object"}});
      list.push_back(std::move(tool));
    }
    if (!list.empty()) out["tools"] = std::move(list);
  }
  json::object choice;
  if (const auto* c = in.if_contains("tool_choice"); c != nullptr) {
    if (c->is_string()) {
      const std::string_view v = c->get_string();
      choice["type"] = v == "required" ? "any" : v == "none" ? "none" : "auto";
    } else if (c->is_object()) {
      const json::value* fn = c->get_object().if_contains("function");
      if (fn != nullptr && fn->is_object()) {
        choice["type"] = "tool";
        choice["name"] = StringOr(fn->get_object().if_contains("name"));
      }
    }
  }
  if (const auto* par = in.if_contains("parallel_tool_calls");
      par != nullptr && par->is_bool() && !par->get_bool()) {
    if (!choice.contains("type")) choice["type"] = "auto";
    choice["disable_parallel_tool_use"] = true;
  }
  if (!choice.empty() && out.contains("tools")) out["tool_choice"] = std::move(choice);
}

}  // namespace

Result<json::object> ToAnthropicRequest(const json::object& in) {
  const json::value* msgs = in.if_contains("messages");
  if (msgs == nullptr || !msgs->is_array()) {
    return Error(ErrorCode::kInvalidRequest, "messages must be an array", "messages");
  }
  std::string system;
  json::array messages;
  std::string_view last_role;
  const json::array& list = msgs->get_array();
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (!list[i].is_object()) continue;
    const auto& mo = list[i].get_object();
    const std::string_view role = StringOr(mo.if_contains("role"));
    const bool system_role = role == "system" || role == "developer";
    if (!system_role && role != "user" && role != "assistant" && role != "tool") continue;
    auto blocks = ContentBlocks(mo.if_contains("content"), "messages[" + std::to_string(i) + "]",
                                role == "user" || role == "tool");
    if (!blocks.ok()) return std::move(blocks).error();
    if (system_role) {
      for (const auto& b : *blocks) {
        if (!system.empty()) system += "\n\n";
        system += StringOr(b.get_object().if_contains("text"));
      }
      continue;
    }
    json::array add;
    std::string_view as = role;
    if (role == "tool") {
      add.push_back(json::object{{"type", "tool_result"},
                                 {"tool_use_id", StringOr(mo.if_contains("tool_call_id"))},
                                 {"content", Simplified(std::move(*blocks))}});
      as = "user";
    } else {
      add = std::move(*blocks);
      if (role == "assistant") AddToolUses(mo, add);
    }
    if (add.empty()) continue;
    if (messages.empty() || as != last_role) {
      messages.push_back(json::object{{"role", as}, {"content", json::array{}}});
      last_role = as;
    }
    json::array& content = messages.back().get_object()["content"].get_array();
    for (auto& b : add) content.push_back(std::move(b));
  }
  TrimPrefill(messages);
  if (messages.empty()) {
    return Error(ErrorCode::kInvalidRequest,
                 "messages holds no user or assistant message with anything to send", "messages");
  }
  for (auto& m : messages) {
    json::value& content = m.get_object()["content"];
    content = Simplified(std::move(content.get_array()));
  }
  auto max_tokens = MaxTokens(in);
  if (!max_tokens.ok()) return std::move(max_tokens).error();

  json::object out;
  if (const auto* model = in.if_contains("model"); model != nullptr) out["model"] = *model;
  if (!system.empty()) out["system"] = system;
  out["messages"] = std::move(messages);
  out["max_tokens"] = *max_tokens;
  AddTools(in, out);
  // OpenAI's range is 0..2, Anthropic's 0..1: clamped, so that a request every OpenAI
  // target accepts is not refused here.
  if (const auto* t = in.if_contains("temperature"); t != nullptr && t->is_number()) {
    out["temperature"] = std::clamp(t->to_number<double>(), 0.0, 1.0);
  }
  if (const auto* p = in.if_contains("top_p"); p != nullptr && p->is_number()) out["top_p"] = *p;
  if (const auto* stop = in.if_contains("stop"); stop != nullptr) {
    json::array seqs;
    if (stop->is_string() && !stop->get_string().empty()) seqs.push_back(*stop);
    if (stop->is_array()) {
      for (const auto& s : stop->get_array()) {
        if (s.is_string() && !s.get_string().empty()) seqs.push_back(s);
      }
    }
    if (!seqs.empty()) out["stop_sequences"] = std::move(seqs);
  }
  return out;
}

}  // namespace keel::gateway::detail
