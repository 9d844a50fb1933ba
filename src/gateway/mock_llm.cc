#include "keel/gateway/mock_llm.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "keel/core/ids.h"
#include "keel/net/digest.h"

namespace keel::gateway {
namespace {

constexpr int64_t kCreated = 1700000000;

struct Directives {
  std::optional<int64_t> sleep_ms;
  std::string fail;  // "503", "429", "context_length", ...
  int retry_after = 0;
  std::optional<int64_t> times;
  int64_t after = 0;  // the first `after` calls with the prompt ignore the directives
  bool hang = false;
  bool malformed = false;
  bool reset = false;
  std::optional<std::string> reply;
  std::vector<std::string> tools;  // tool=NAME[,NAME...]: answer with calls of these tools
  // Streams only.
  std::optional<int64_t> first_byte_ms;
  std::optional<int64_t> stall_ms;
  bool truncate = false;
  std::optional<int64_t> truncate_after;  // truncate=N
  std::optional<int64_t> reset_after;
};

int64_t ToInt(std::string_view s, int64_t fallback) {
  int64_t v = 0;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && p == s.data() + s.size() ? v : fallback;
}

int64_t NonNegative(std::string_view s, int64_t fallback) {
  return std::max<int64_t>(0, ToInt(s, fallback));
}

Directives ParseDirectives(std::string_view prompt) {
  Directives d;
  std::size_t pos = 0;
  while (pos <= prompt.size()) {
    auto end = prompt.find('\n', pos);
    if (end == std::string_view::npos) end = prompt.size();
    std::string_view line = prompt.substr(pos, end - pos);
    pos = end + 1;
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (line.rfind("#mock", 0) != 0 || (line.size() > 5 && line[5] != ' ' && line[5] != '\t'))
      continue;
    line.remove_prefix(5);
    // reply= takes the rest of the line.
    if (const auto r = line.find("reply="); r != std::string_view::npos) {
      d.reply = std::string(line.substr(r + 6));
      line = line.substr(0, r);
    }
    std::size_t p = 0;
    while (p < line.size()) {
      while (p < line.size() && line[p] == ' ') ++p;
      auto q = line.find(' ', p);
      if (q == std::string_view::npos) q = line.size();
      const std::string_view word = line.substr(p, q - p);
      p = q;
      if (word.empty()) continue;
      const auto eq = word.find('=');
      const std::string_view key = word.substr(0, eq);
      const std::string_view val =
          eq == std::string_view::npos ? std::string_view() : word.substr(eq + 1);
      if (key == "truncate") {  // truncate or truncate=N
        d.truncate = true;
        if (!val.empty()) d.truncate_after = NonNegative(val, 0);
        continue;
      }
      if (key == "sleep")
        d.sleep_ms = ToInt(val, 0);
      else if (key == "fail")
        d.fail = std::string(val);
      else if (key == "retry_after")
        d.retry_after = static_cast<int>(ToInt(val, 1));
      else if (key == "times")
        d.times = ToInt(val, 1);
      else if (key == "after")
        d.after = NonNegative(val, 0);
      else if (key == "hang")
        d.hang = true;
      else if (key == "malformed")
        d.malformed = true;
      else if (key == "reset")
        d.reset = true;
      else if (key == "first_byte")
        d.first_byte_ms = NonNegative(val, 0);
      else if (key == "stall")
        d.stall_ms = NonNegative(val, 0);
      else if (key == "reset_after")
        d.reset_after = NonNegative(val, 0);
      else if (key == "tool") {
        for (std::size_t a = 0; a <= val.size();) {
          const auto comma = std::min(val.find(',', a), val.size());
          if (comma > a) d.tools.emplace_back(val.substr(a, comma - a));
          a = comma + 1;
        }
      }
    }
    if (end == prompt.size()) break;
  }
  return d;
}

// ---- Requests ---------------------------------------------------------------------------

// A request of either API, reduced to what the mock needs.
struct Request {
  std::string prompt;        // the text of the last user message
  int64_t prompt_chars = 0;  // all message (and system) text
  std::string model = "mock-1";
  bool stream = false;
  bool include_usage = false;  // OpenAI: stream_options.include_usage
  json::value schema;          // OpenAI: response_format json_schema's schema, if asked
  bool json_object = false;    // OpenAI: response_format json_object
  // Tools offered (name -> parameters' schema), and what tool_choice asks: a call of any
  // tool (required / any), of the named one, or none.
  std::vector<std::pair<std::string, json::value>> tools;
  bool tool_required = false;
  std::string tool_forced;
  bool tool_none = false;
  bool after_tool_result = false;  // the last message is a tool's result
};

// Reads `tools` and `tool_choice`, in OpenAI's shapes ({type: function, function: {name,
// parameters}}; "required", {type: function, function: {name}}) or Anthropic's ({name,
// input_schema}; {type: any}, {type: tool, name}).
void ParseTools(const json::object& req, Request& out) {
  if (const auto* tools = req.if_contains("tools"); tools && tools->is_array()) {
    for (const auto& t : tools->get_array()) {
      if (!t.is_object()) continue;
      const json::object* fn = &t.get_object();
      if (const auto* f = fn->if_contains("function"); f && f->is_object()) fn = &f->get_object();
      const auto* name = fn->if_contains("name");
      if (!name || !name->is_string()) continue;
      const json::value* params = fn->if_contains("parameters");
      if (!params) params = fn->if_contains("input_schema");
      out.tools.emplace_back(std::string(name->get_string()),
                             params ? *params : json::value(json::object{}));
    }
  }
  if (const auto* c = req.if_contains("tool_choice")) {
    if (c->is_string()) {
      out.tool_required = c->get_string() == "required" || c->get_string() == "any";
      out.tool_none = c->get_string() == "none";
    } else if (c->is_object()) {
      const auto& co = c->get_object();
      const std::string_view type = co.if_contains("type") && co.at("type").is_string()
                                        ? std::string_view(co.at("type").get_string())
                                        : "";
      const json::value* name = co.if_contains("name");
      if (const auto* f = co.if_contains("function"); f && f->is_object())
        name = f->get_object().if_contains("name");
      if (name && name->is_string()) out.tool_forced = std::string(name->get_string());
      out.tool_required = type == "any" || type == "required";
      out.tool_none = type == "none";
    }
  }
}

// A small value that satisfies common schemas (structured output without a model):
// required properties with values of their types, enums' first member, minimum numbers,
// minItems items, minLength strings.
json::value InstanceOf(const json::value& schema, int depth = 0) {
  if (!schema.is_object() || depth > 16) return nullptr;
  const auto& s = schema.get_object();
  if (const auto* c = s.if_contains("const")) return *c;
  if (const auto* e = s.if_contains("enum"); e && e->is_array() && !e->get_array().empty())
    return e->get_array()[0];
  for (const char* k : {"anyOf", "oneOf", "allOf"}) {
    if (const auto* a = s.if_contains(k); a && a->is_array() && !a->get_array().empty())
      return InstanceOf(a->get_array()[0], depth + 1);
  }
  std::string type = "object";
  if (const auto* t = s.if_contains("type")) {
    if (t->is_string())
      type = t->get_string();
    else if (t->is_array() && !t->get_array().empty() && t->get_array()[0].is_string())
      type = t->get_array()[0].get_string();
  } else if (!s.contains("properties")) {
    return nullptr;
  }
  auto num = [&](const char* k, double def) {
    const auto* v = s.if_contains(k);
    return v && v->is_number() ? v->to_number<double>() : def;
  };
  if (type == "string")
    return json::string(
        std::string(static_cast<std::size_t>(std::max(1.0, num("minLength", 4))), 'x'));
  if (type == "integer")
    return static_cast<int64_t>(
        std::ceil(std::max(num("minimum", 0), num("exclusiveMinimum", -1) + 1)));
  if (type == "number") return std::max(num("minimum", 0), num("exclusiveMinimum", -1) + 1);
  if (type == "boolean") return true;
  if (type == "null") return nullptr;
  if (type == "array") {
    json::array a;
    const auto* items = s.if_contains("items");
    for (int i = 0; i < static_cast<int>(num("minItems", 0)); ++i)
      a.push_back(items ? InstanceOf(*items, depth + 1) : json::value(nullptr));
    return a;
  }
  json::object o;
  const auto* props = s.if_contains("properties");
  if (const auto* req = s.if_contains("required"); req && req->is_array()) {
    for (const auto& name : req->get_array()) {
      if (!name.is_string()) continue;
      const json::value* ps = props && props->is_object()
                                  ? props->get_object().if_contains(name.get_string())
                                  : nullptr;
      o[name.get_string()] = ps ? InstanceOf(*ps, depth + 1) : json::value("x");
    }
  }
  return o;
}

// The text of a message's content: a string, or the text parts / blocks
// ([{"type": "text", "text": ...}]) joined by newlines. Other parts are ignored.
std::optional<std::string> ContentText(const json::value& content) {
  if (content.is_string()) return std::string(content.get_string());
  if (!content.is_array()) return std::nullopt;
  std::string text;
  bool first = true;
  for (const auto& part : content.get_array()) {
    if (!part.is_object()) continue;
    const auto* type = part.get_object().if_contains("type");
    const auto* t = part.get_object().if_contains("text");
    if (type == nullptr || !type->is_string() || type->get_string() != "text") continue;
    if (t == nullptr || !t->is_string()) continue;
    if (!first) text.push_back('\n');
    first = false;
    text.append(t->get_string());
  }
  return text;
}

// Reads model, messages and stream flags; an error message when the request is unusable.
std::string ParseMessages(const json::object& req, Request& out) {
  if (const auto* m = req.if_contains("model"); m != nullptr && m->is_string()) {
    out.model = std::string(m->get_string());
  }
  if (const auto* s = req.if_contains("stream"); s != nullptr && s->is_bool())
    out.stream = s->get_bool();
  const auto* messages = req.if_contains("messages");
  if (messages == nullptr || !messages->is_array() || messages->get_array().empty()) {
    return "messages must be a non-empty array";
  }
  for (const auto& m : messages->get_array()) {
    if (!m.is_object()) continue;
    const auto* content = m.get_object().if_contains("content");
    const auto* role = m.get_object().if_contains("role");
    // A tool's result: OpenAI's role "tool", or Anthropic's user message of tool_result blocks.
    out.after_tool_result = role != nullptr && role->is_string() && role->get_string() == "tool";
    if (content != nullptr && content->is_array()) {
      for (const auto& part : content->get_array()) {
        const auto* type = part.is_object() ? part.get_object().if_contains("type") : nullptr;
        if (type && type->is_string() && type->get_string() == "tool_result")
          out.after_tool_result = true;
      }
    }
    if (content == nullptr) continue;
    auto text = ContentText(*content);
    if (!text) continue;
    out.prompt_chars += static_cast<int64_t>(text->size());
    if (role != nullptr && role->is_string() && role->get_string() == "user")
      out.prompt = std::move(*text);
  }
  return {};
}

std::string ParseOpenAi(const json::object& req, Request& out) {
  ParseTools(req, out);
  if (const auto* rf = req.if_contains("response_format"); rf != nullptr && rf->is_object()) {
    if (const auto* js = rf->get_object().if_contains("json_schema"); js && js->is_object()) {
      if (const auto* sc = js->get_object().if_contains("schema")) out.schema = *sc;
    } else if (const auto* t = rf->get_object().if_contains("type");
               t && t->is_string() && t->get_string() == "json_object") {
      out.json_object = true;
    }
  }
  if (const auto* o = req.if_contains("stream_options"); o != nullptr && o->is_object()) {
    const auto* u = o->get_object().if_contains("include_usage");
    out.include_usage = u != nullptr && u->is_bool() && u->get_bool();
  }
  return ParseMessages(req, out);
}

std::string ParseAnthropic(const json::object& req, Request& out) {
  ParseTools(req, out);
  const auto* max_tokens = req.if_contains("max_tokens");
  if (max_tokens == nullptr || !(max_tokens->is_int64() || max_tokens->is_uint64())) {
    return "max_tokens: Field required (a positive integer)";
  }
  if (max_tokens->is_int64() && max_tokens->get_int64() < 1)
    return "max_tokens: must be at least 1";
  if (const auto* system = req.if_contains("system"); system != nullptr && !system->is_null()) {
    const auto text = ContentText(*system);
    if (!text) return "system: must be a string or a list of text blocks";
    out.prompt_chars += static_cast<int64_t>(text->size());
  }
  return ParseMessages(req, out);
}

// ---- Errors -----------------------------------------------------------------------------

std::string OpenAiError(std::string_view type, std::string_view code, std::string_view message) {
  json::object err{{"message", message},
                   {"type", type},
                   {"code", code.empty() ? json::value(nullptr) : json::value(code)}};
  return json::serialize(json::object{{"error", std::move(err)}});
}

std::string_view AnthropicErrorType(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 402:
      return "billing_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 413:
      return "request_too_large";
    case 429:
      return "rate_limit_error";
    case 504:
      return "timeout_error";
    case 529:
      return "overloaded_error";
    default:
      return status >= 500 ? "api_error" : "invalid_request_error";
  }
}

std::string AnthropicError(int status, std::string_view message) {
  return json::serialize(json::object{
      {"type", "error"},
      {"error", json::object{{"type", AnthropicErrorType(status)}, {"message", message}}}});
}

// An error answer in the request's API: `openai_type` and `code` shape OpenAI's body,
// Anthropic's type follows from the status.
void SetError(MockDecision& out, bool anthropic, int status, std::string_view openai_type,
              std::string_view code, std::string_view message) {
  out.kind = MockDecision::Kind::kError;
  out.status = status;
  out.body = anthropic ? AnthropicError(status, message) : OpenAiError(openai_type, code, message);
}

// ---- Answers ----------------------------------------------------------------------------

struct ToolUse {
  std::string id;
  std::string name;
  std::string arguments;  // JSON text
};

struct Answer {
  std::string id;
  std::string model;
  std::string text;
  std::vector<ToolUse> calls;  // not empty: the answer calls tools (and has no text)
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

// The deterministic text: the same prompt always gets the same answer.
std::string AnswerText(const std::string& prompt, const Directives& d) {
  if (d.reply) return *d.reply;
  std::string gist = prompt.substr(0, 200);
  for (auto& c : gist) {
    if (c == '\n') c = ' ';
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(Fnv1a64(prompt)));
  return "mock answer " + std::string(hex, 8) + ": " + gist;
}

bool IsSpace(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// Splits `text` into the pieces of a stream, one word each with the blanks that follow it
// (leading blanks go with the first word), so that the pieces concatenate to `text`.
std::vector<std::string> StreamPieces(std::string_view text) {
  std::vector<std::string> pieces;
  std::size_t start = 0;
  std::size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && IsSpace(text[i])) ++i;
    while (i < text.size() && !IsSpace(text[i])) ++i;
    while (i < text.size() && IsSpace(text[i])) ++i;
    pieces.emplace_back(text.substr(start, i - start));
    start = i;
  }
  return pieces;
}

std::string SseData(const json::value& v) { return "data: " + json::serialize(v) + "\n\n"; }

std::string SseEvent(std::string_view name, const json::value& v) {
  return "event: " + std::string(name) + "\ndata: " + json::serialize(v) + "\n\n";
}

// A stream in three parts: what precedes the content, one event per content piece, and
// what ends the answer.
struct StreamParts {
  std::vector<std::string> prologue;
  std::vector<std::string> content;
  std::vector<std::string> epilogue;
};

json::object OpenAiChunk(const Answer& a, json::object delta, json::value finish_reason,
                         bool include_usage) {
  json::object chunk{
      {"id", a.id},
      {"object", "chat.completion.chunk"},
      {"created", kCreated},
      {"model", a.model},
      {"choices", json::array{json::object{{"index", 0},
                                           {"delta", std::move(delta)},
                                           {"logprobs", nullptr},
                                           {"finish_reason", std::move(finish_reason)}}}}};
  // As OpenAI does: with include_usage, every chunk but the last has "usage": null.
  if (include_usage) chunk["usage"] = nullptr;
  return chunk;
}

json::object OpenAiUsage(const Answer& a) {
  return json::object{{"prompt_tokens", a.prompt_tokens},
                      {"completion_tokens", a.completion_tokens},
                      {"total_tokens", a.prompt_tokens + a.completion_tokens}};
}

json::array OpenAiToolCalls(const Answer& a) {
  json::array calls;
  for (const auto& c : a.calls) {
    calls.push_back(
        json::object{{"id", c.id},
                     {"type", "function"},
                     {"function", json::object{{"name", c.name}, {"arguments", c.arguments}}}});
  }
  return calls;
}

std::string OpenAiBody(const Answer& a) {
  json::object message{{"role", "assistant"}, {"content", a.text}};
  if (!a.calls.empty()) {
    message["content"] = nullptr;  // as OpenAI answers a tool call
    message["tool_calls"] = OpenAiToolCalls(a);
  }
  json::object resp{{"id", a.id},
                    {"object", "chat.completion"},
                    {"created", kCreated},
                    {"model", a.model},
                    {"choices", json::array{json::object{
                                    {"index", 0},
                                    {"message", std::move(message)},
                                    {"finish_reason", a.calls.empty() ? "stop" : "tool_calls"}}}},
                    {"usage", OpenAiUsage(a)}};
  return json::serialize(resp);
}

StreamParts OpenAiStream(const Answer& a, bool include_usage) {
  StreamParts s;
  if (a.calls.empty()) {
    s.prologue.push_back(
        SseData(OpenAiChunk(a, json::object{{"role", "assistant"}}, nullptr, include_usage)));
    for (const auto& piece : StreamPieces(a.text)) {
      s.content.push_back(
          SseData(OpenAiChunk(a, json::object{{"content", piece}}, nullptr, include_usage)));
    }
  } else {
    // As OpenAI streams tool calls: each call's id and name first, then its arguments in
    // pieces, every delta naming the call by its index.
    s.prologue.push_back(SseData(OpenAiChunk(
        a, json::object{{"role", "assistant"}, {"content", nullptr}}, nullptr, include_usage)));
    for (std::size_t i = 0; i < a.calls.size(); ++i) {
      const auto& c = a.calls[i];
      const auto index = static_cast<int64_t>(i);
      s.content.push_back(SseData(OpenAiChunk(
          a,
          json::object{{"tool_calls",
                        json::array{json::object{
                            {"index", index},
                            {"id", c.id},
                            {"type", "function"},
                            {"function", json::object{{"name", c.name}, {"arguments", ""}}}}}}},
          nullptr, include_usage)));
      const std::size_t half = c.arguments.size() / 2;
      for (const std::string& piece : {c.arguments.substr(0, half), c.arguments.substr(half)}) {
        if (piece.empty()) continue;
        s.content.push_back(SseData(OpenAiChunk(
            a,
            json::object{{"tool_calls", json::array{json::object{
                                            {"index", index},
                                            {"function", json::object{{"arguments", piece}}}}}}},
            nullptr, include_usage)));
      }
    }
  }
  s.epilogue.push_back(SseData(
      OpenAiChunk(a, json::object{}, a.calls.empty() ? "stop" : "tool_calls", include_usage)));
  if (include_usage) {
    s.epilogue.push_back(SseData(json::object{{"id", a.id},
                                              {"object", "chat.completion.chunk"},
                                              {"created", kCreated},
                                              {"model", a.model},
                                              {"choices", json::array{}},
                                              {"usage", OpenAiUsage(a)}}));
  }
  s.epilogue.push_back("data: [DONE]\n\n");
  return s;
}

json::array AnthropicContent(const Answer& a) {
  if (a.calls.empty()) return json::array{json::object{{"type", "text"}, {"text", a.text}}};
  json::array content;
  for (const auto& c : a.calls) {
    content.push_back(json::object{
        {"type", "tool_use"}, {"id", c.id}, {"name", c.name}, {"input", json::parse(c.arguments)}});
  }
  return content;
}

std::string AnthropicBody(const Answer& a) {
  json::object resp{{"id", a.id},
                    {"type", "message"},
                    {"role", "assistant"},
                    {"model", a.model},
                    {"content", AnthropicContent(a)},
                    {"stop_reason", a.calls.empty() ? "end_turn" : "tool_use"},
                    {"stop_sequence", nullptr},
                    {"usage", json::object{{"input_tokens", a.prompt_tokens},
                                           {"output_tokens", a.completion_tokens}}}};
  return json::serialize(resp);
}

// message_start and content_block_start.
std::vector<std::string> AnthropicPrologue(const Answer& a, bool text_block = true) {
  json::object message{
      {"id", a.id},
      {"type", "message"},
      {"role", "assistant"},
      {"model", a.model},
      {"content", json::array{}},
      {"stop_reason", nullptr},
      {"stop_sequence", nullptr},
      {"usage", json::object{{"input_tokens", a.prompt_tokens}, {"output_tokens", 0}}}};
  std::vector<std::string> events{SseEvent(
      "message_start", json::object{{"type", "message_start"}, {"message", std::move(message)}})};
  if (text_block) {
    events.push_back(
        SseEvent("content_block_start",
                 json::object{{"type", "content_block_start"},
                              {"index", 0},
                              {"content_block", json::object{{"type", "text"}, {"text", ""}}}}));
  }
  return events;
}

std::string AnthropicStop() {
  return SseEvent("message_stop", json::object{{"type", "message_stop"}});
}

StreamParts AnthropicStream(const Answer& a) {
  StreamParts s;
  s.prologue = AnthropicPrologue(a, a.calls.empty());
  if (a.calls.empty()) {
    for (const auto& piece : StreamPieces(a.text)) {
      s.content.push_back(
          SseEvent("content_block_delta",
                   json::object{{"type", "content_block_delta"},
                                {"index", 0},
                                {"delta", json::object{{"type", "text_delta"}, {"text", piece}}}}));
    }
    s.epilogue.push_back(
        SseEvent("content_block_stop", json::object{{"type", "content_block_stop"}, {"index", 0}}));
  } else {
    // One tool_use block per call: its start (id, name, empty input), its input as
    // input_json_delta pieces, its stop.
    for (std::size_t i = 0; i < a.calls.size(); ++i) {
      const auto& c = a.calls[i];
      const auto index = static_cast<int64_t>(i);
      s.content.push_back(
          SseEvent("content_block_start",
                   json::object{{"type", "content_block_start"},
                                {"index", index},
                                {"content_block", json::object{{"type", "tool_use"},
                                                               {"id", c.id},
                                                               {"name", c.name},
                                                               {"input", json::object{}}}}}));
      const std::size_t half = c.arguments.size() / 2;
      for (const std::string& piece : {c.arguments.substr(0, half), c.arguments.substr(half)}) {
        if (piece.empty()) continue;
        s.content.push_back(SseEvent(
            "content_block_delta", json::object{{"type", "content_block_delta"},
                                                {"index", index},
                                                {"delta", json::object{{"type", "input_json_delta"},
                                                                       {"partial_json", piece}}}}));
      }
      s.content.push_back(SseEvent("content_block_stop",
                                   json::object{{"type", "content_block_stop"}, {"index", index}}));
    }
  }
  s.epilogue.push_back(SseEvent(
      "message_delta",
      json::object{
          {"type", "message_delta"},
          {"delta", json::object{{"stop_reason", a.calls.empty() ? "end_turn" : "tool_use"},
                                 {"stop_sequence", nullptr}}},
          {"usage", json::object{{"output_tokens", a.completion_tokens}}}}));
  s.epilogue.push_back(AnthropicStop());
  return s;
}

constexpr std::string_view kMalformedOpenAi =
    R"({"id":"chatcmpl-mock","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"trunc)";
constexpr std::string_view kMalformedAnthropic =
    R"({"id":"msg_mock","type":"message","role":"assistant","content":[{"type":"text","text":"trunc)";

// A stream whose one content event does not parse, then its normal end.
std::vector<std::string> MalformedStream(bool anthropic, const Answer& a) {
  if (anthropic) {
    auto events = AnthropicPrologue(a);
    events.push_back(
        R"(event: content_block_delta)"
        "\n"
        R"(data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"trunc)"
        "\n\n");
    events.push_back(AnthropicStop());
    return events;
  }
  return {
      SseData(OpenAiChunk(a, json::object{{"role", "assistant"}}, nullptr, false)),
      R"(data: {"id":")" + a.id +
          R"(","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"trunc)"
          "\n\n",
      "data: [DONE]\n\n"};
}

}  // namespace

int64_t EstimateTokens(std::string_view text) { return static_cast<int64_t>(text.size() + 3) / 4; }

MockLlm::MockLlm(MockOptions options) : options_(options), rng_(options.seed) {}

MockDecision MockLlm::HandleChat(std::string_view body, std::chrono::steady_clock::time_point now) {
  return Handle(false, body, now);
}

MockDecision MockLlm::HandleMessages(std::string_view body,
                                     std::chrono::steady_clock::time_point now) {
  return Handle(true, body, now);
}

MockDecision MockLlm::Handle(bool anthropic, std::string_view body,
                             std::chrono::steady_clock::time_point now) {
  MockDecision out;
  out.delay = options_.latency;
  boost::system::error_code ec;
  const json::value parsed = json::parse(body, ec);
  if (ec || !parsed.is_object()) {
    SetError(out, anthropic, 400, "invalid_request_error", "", "the body is not a JSON object");
    return out;
  }
  Request req;
  const std::string invalid =
      anthropic ? ParseAnthropic(parsed.get_object(), req) : ParseOpenAi(parsed.get_object(), req);
  if (!invalid.empty()) {
    SetError(out, anthropic, 400, "invalid_request_error", "", invalid);
    return out;
  }
  const Directives d = ParseDirectives(req.prompt);
  const int64_t prompt_tokens = (req.prompt_chars + 3) / 4;

  int64_t seen = 0;
  bool random_fail = false;
  bool limited = false;
  {
    std::lock_guard lock(mu_);
    ++total_;
    seen = by_prompt_[req.prompt]++;  // calls with this prompt before this one
    if (options_.fail_rate > 0) {
      random_fail = std::uniform_real_distribution<double>(0, 1)(rng_) < options_.fail_rate;
    }
    if (options_.rpm > 0 || options_.tpm > 0) {
      if (now - window_start_ >= std::chrono::minutes(1)) {
        window_start_ = now;
        window_requests_ = 0;
        window_tokens_ = 0;
      }
      if ((options_.rpm > 0 && window_requests_ + 1 > options_.rpm) ||
          (options_.tpm > 0 && window_tokens_ + prompt_tokens > options_.tpm)) {
        limited = true;
      } else {
        ++window_requests_;
        window_tokens_ += prompt_tokens;
      }
    }
  }
  if (d.sleep_ms) out.delay = std::chrono::milliseconds(*d.sleep_ms);
  if (limited) {
    SetError(out, anthropic, 429, "rate_limit_error", "rate_limit_exceeded",
             "mock rate limit reached (rpm/tpm)");
    out.retry_after_s = 1;
    return out;
  }
  const bool directed = seen >= d.after && (!d.times || seen < d.after + *d.times);
  if (directed && d.hang) {
    out.kind = MockDecision::Kind::kHang;
    out.delay = options_.hang;
    out.status = 504;
    out.body = anthropic ? AnthropicError(504, "mock hang ended")
                         : OpenAiError("server_error", "", "mock hang ended");
    return out;
  }
  if (directed && d.reset) {
    out.kind = MockDecision::Kind::kReset;
    return out;
  }

  const uint64_t id = Fnv1a64(req.prompt) ^ static_cast<uint64_t>(seen);
  Answer a;
  if (anthropic) {
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(id));
    a.id = "msg_mock" + std::string(hex);
  } else {
    a.id = "chatcmpl-" + std::to_string(id);
  }
  a.model = req.model;
  a.prompt_tokens = prompt_tokens;

  if (directed && d.malformed) {
    out.kind = MockDecision::Kind::kMalformed;
    out.body = std::string(anthropic ? kMalformedAnthropic : kMalformedOpenAi);
    if (req.stream) {
      out.stream = true;
      out.events = MalformedStream(anthropic, a);
    }
    return out;
  }
  if ((directed && !d.fail.empty()) || random_fail) {
    const std::string fail =
        random_fail && d.fail.empty() ? std::to_string(options_.fail_status) : d.fail;
    if (fail == "context_length") {
      SetError(out, anthropic, 400, "invalid_request_error", "context_length_exceeded",
               anthropic ? "prompt is too long: " + std::to_string(prompt_tokens) +
                               " tokens > the model's maximum (mock)"
                         : "This model's maximum context length was exceeded (mock)");
      return out;
    }
    int status = static_cast<int>(ToInt(fail, 500));
    if (status < 400 || status > 599) status = 500;
    SetError(out, anthropic, status,
             status == 429   ? "rate_limit_error"
             : status >= 500 ? "server_error"
                             : "invalid_request_error",
             "", "mock failure " + std::to_string(status));
    if (status == 429) out.retry_after_s = d.retry_after > 0 ? d.retry_after : 1;
    return out;
  }

  // Tool calls: when tool_choice asks for one (required / any, or a named tool), or a
  // `#mock tool=NAME[,NAME]` directive does (several names: parallel calls), unless the
  // last message is already a tool's result (so that a tool loop ends) or tool_choice is
  // none. The arguments are an instance of the tool's parameters schema.
  std::vector<std::string> call_names;
  if (!req.tool_none && !req.tools.empty()) {
    if (!req.tool_forced.empty())
      call_names.push_back(req.tool_forced);
    else if (directed && !d.tools.empty() && !req.after_tool_result)
      call_names = d.tools;
    else if (req.tool_required)
      call_names.push_back(req.tools.front().first);
  }
  for (std::size_t i = 0; i < call_names.size(); ++i) {
    json::value params = json::object{};
    for (const auto& [name, schema] : req.tools) {
      if (name == call_names[i]) params = schema;
    }
    json::value args = InstanceOf(params);
    if (!args.is_object()) args = json::object{};
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx",
                  static_cast<unsigned long long>(id ^ (i * 0x9e3779b97f4a7c15ULL)));
    a.calls.push_back(ToolUse{(anthropic ? "toolu_mock" : "call_mock") + std::string(hex),
                              call_names[i], json::serialize(args)});
  }
  // Structured output: an instance of the schema (json_object: {"answer": TEXT}), unless a
  // directive scripts the reply.
  if (!a.calls.empty()) {
    a.text.clear();
  } else if (!d.reply && !req.schema.is_null()) {
    a.text = json::serialize(InstanceOf(req.schema));
  } else if (!d.reply && req.json_object) {
    a.text = json::serialize(json::object{{"answer", AnswerText(req.prompt, d)}});
  } else {
    a.text = AnswerText(req.prompt, d);
  }
  a.completion_tokens = EstimateTokens(a.text);
  for (const auto& c : a.calls)
    a.completion_tokens += EstimateTokens(c.name) + EstimateTokens(c.arguments);
  out.body = anthropic ? AnthropicBody(a) : OpenAiBody(a);
  if (!req.stream) return out;

  out.stream = true;
  StreamParts parts = anthropic ? AnthropicStream(a) : OpenAiStream(a, req.include_usage);
  std::size_t keep = parts.content.size();
  if (directed && d.reset_after) {
    keep = std::min<std::size_t>(keep, static_cast<std::size_t>(*d.reset_after));
    out.reset_at_end = true;
    out.truncated = true;
  } else if (directed && d.truncate) {
    keep = d.truncate_after
               ? std::min<std::size_t>(keep, static_cast<std::size_t>(*d.truncate_after))
               : (keep + 1) / 2;
    out.truncated = true;
  }
  if (directed && d.first_byte_ms) out.first_byte = std::chrono::milliseconds(*d.first_byte_ms);
  if (directed && d.stall_ms) out.stall = std::chrono::milliseconds(*d.stall_ms);
  out.content_events = static_cast<int>(keep);
  out.events = std::move(parts.prologue);
  out.events.insert(
      out.events.end(), std::make_move_iterator(parts.content.begin()),
      std::make_move_iterator(parts.content.begin() + static_cast<std::ptrdiff_t>(keep)));
  if (!out.truncated) {
    out.events.insert(out.events.end(), std::make_move_iterator(parts.epilogue.begin()),
                      std::make_move_iterator(parts.epilogue.end()));
  }
  return out;
}

MockDecision MockLlm::HandleEmbeddings(std::string_view body,
                                       std::chrono::steady_clock::time_point) {
  MockDecision out;
  out.delay = options_.latency;
  boost::system::error_code ec;
  const json::value req = json::parse(body, ec);
  const json::value* input =
      !ec && req.is_object() ? req.get_object().if_contains("input") : nullptr;
  std::vector<std::string> texts;
  if (input && input->is_string()) texts.emplace_back(input->get_string());
  if (input && input->is_array()) {
    for (const auto& v : input->get_array()) {
      if (v.is_string()) texts.emplace_back(v.get_string());
    }
  }
  if (texts.empty()) {
    out.kind = MockDecision::Kind::kError;
    out.status = 400;
    out.body =
        R"({"error":{"message":"input must be a non-empty string or array of strings","type":"invalid_request_error","code":null}})";
    return out;
  }
  bool base64 = false;
  if (const auto* f = req.get_object().if_contains("encoding_format"); f && !f->is_null()) {
    base64 = f->is_string() && f->get_string() == "base64";
    if (!base64 && !(f->is_string() && f->get_string() == "float")) {
      out.kind = MockDecision::Kind::kError;
      out.status = 400;
      out.body =
          R"({"error":{"message":"encoding_format must be \"float\" or \"base64\"","type":"invalid_request_error","param":"encoding_format","code":null}})";
      return out;
    }
  }
  bool random_fail = false;
  {
    std::lock_guard lock(mu_);
    ++total_;
    ++by_prompt_["embeddings: " + texts[0]];
    if (options_.fail_rate > 0)
      random_fail = std::uniform_real_distribution<double>(0, 1)(rng_) < options_.fail_rate;
  }
  if (random_fail) {
    out.kind = MockDecision::Kind::kError;
    out.status = options_.fail_status;
    out.body = R"({"error":{"message":"mock failure","type":"server_error","code":null}})";
    return out;
  }
  json::array data;
  int64_t tokens = 0;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    uint64_t h = Fnv1a64(texts[i]);
    json::array v;
    double norm = 0;
    std::vector<double> xs;
    for (int d = 0; d < 8; ++d) {
      const double x = static_cast<double>((h >> (d * 8)) & 0xff) - 127.5;
      xs.push_back(x);
      norm += x * x;
    }
    norm = std::sqrt(norm);
    // Float32 values, as OpenAI's are: the "float" answer and the "base64" one (the
    // little-endian bytes of the same float32 array) decode to exactly the same numbers.
    std::string bytes;
    for (double x : xs) {
      const float f = static_cast<float>(x / norm);
      v.push_back(static_cast<double>(f));
      uint32_t u = 0;
      std::memcpy(&u, &f, sizeof u);
      for (int b = 0; b < 4; ++b) bytes.push_back(static_cast<char>((u >> (8 * b)) & 0xff));
    }
    json::value embedding = base64 ? json::value(net::Base64(bytes)) : json::value(std::move(v));
    data.push_back(json::object{{"object", "embedding"},
                                {"index", static_cast<int64_t>(i)},
                                {"embedding", std::move(embedding)}});
    tokens += EstimateTokens(texts[i]);
  }
  std::string model = "mock-embed-1";
  if (const auto* m = req.get_object().if_contains("model"); m && m->is_string())
    model = m->get_string();
  out.body = json::serialize(
      json::object{{"object", "list"},
                   {"data", std::move(data)},
                   {"model", model},
                   {"usage", json::object{{"prompt_tokens", tokens}, {"total_tokens", tokens}}}});
  return out;
}

json::value MockLlm::Stats() const {
  std::lock_guard lock(mu_);
  json::object by;
  for (const auto& [prompt, n] : by_prompt_) by[prompt] = n;
  return json::object{{"total", total_}, {"by_prompt", std::move(by)}};
}

void MockLlm::Reset() {
  std::lock_guard lock(mu_);
  total_ = 0;
  by_prompt_.clear();
  window_start_ = {};
  window_requests_ = 0;
  window_tokens_ = 0;
}

}  // namespace keel::gateway
