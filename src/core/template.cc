#include "keel/core/template.h"

namespace keel {
namespace {

bool ValidPath(std::string_view path) {
  if (path.empty() || path.front() == '.' || path.back() == '.') return false;
  char prev = 0;
  for (char c : path) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-' || c == '.';
    if (!ok || (c == '.' && prev == '.')) return false;
    prev = c;
  }
  return true;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

// One piece of a parsed template string: literal text or a reference path.
struct Piece {
  bool is_ref;
  std::string_view text;
  bool raw = false;        // {{{path}}}: inserted without the caller's escaping
  std::size_t offset = 0;  // of the piece in the template string
};

Result<std::vector<Piece>> Split(std::string_view s) {
  std::vector<Piece> pieces;
  std::size_t pos = 0;
  while (pos < s.size()) {
    const auto open = s.find("{{", pos);
    if (open == std::string_view::npos) {
      pieces.push_back({false, s.substr(pos), false, pos});
      break;
    }
    if (open > pos) pieces.push_back({false, s.substr(pos, open - pos), false, pos});
    const bool raw = s.substr(open, 3) == "{{{";
    const std::size_t inner = open + (raw ? 3 : 2);
    const auto close = s.find(raw ? "}}}" : "}}", inner);
    if (close == std::string_view::npos) {
      return Error(ErrorCode::kInvalidRequest,
                   "template \"" + std::string(s) + "\" opens \"" + (raw ? "{{{" : "{{") +
                       "\" without a closing \"" + (raw ? "}}}" : "}}") + "\"");
    }
    const auto path = Trim(s.substr(inner, close - inner));
    if (!ValidPath(path)) {
      return Error(ErrorCode::kInvalidRequest,
                   "template reference \"{{" + std::string(s.substr(open + 2, close - open - 2)) +
                       "}}\" is not a dotted path such as input.name or steps.ID.output");
    }
    pieces.push_back({true, path, raw, open});
    pos = close + (raw ? 3 : 2);
  }
  return pieces;
}

Result<json::value> Lookup(std::string_view path, const TemplateContext& context) {
  const json::value* v = context.Find(path);
  if (v == nullptr) {
    return Error(ErrorCode::kInvalidRequest,
                 "template reference {{" + std::string(path) + "}} names no value");
  }
  return *v;
}

// Interpolates every reference of `pieces` into one string, each through `escape`
// unless it is raw (or there is no escape).
Result<std::string> Interpolate(const std::vector<Piece>& pieces, const TemplateContext& context,
                                const TemplateEscape* escape) {
  std::string out;
  for (const auto& p : pieces) {
    if (!p.is_ref) {
      out.append(p.text);
      continue;
    }
    auto v = Lookup(p.text, context);
    if (!v.ok()) return std::move(v).error();
    std::string text = v->is_string() ? std::string(v->get_string()) : json::serialize(*v);
    if (escape != nullptr && *escape && !p.raw) {
      auto escaped = (*escape)(text, p.offset);
      if (!escaped.ok()) {
        Error e = std::move(escaped).error();
        e.message = "{{" + std::string(p.text) + "}}: " + e.message;
        return e;
      }
      text = std::move(escaped).value();
    }
    out += text;
  }
  return out;
}

Result<json::value> RenderString(const json::string& s, const TemplateContext& context) {
  auto pieces = Split(std::string_view(s.data(), s.size()));
  if (!pieces.ok()) return std::move(pieces).error();
  if (pieces->size() == 1 && (*pieces)[0].is_ref) return Lookup((*pieces)[0].text, context);
  auto out = Interpolate(*pieces, context, nullptr);
  if (!out.ok()) return std::move(out).error();
  return json::value(std::move(out).value());
}

}  // namespace

TemplateContext& TemplateContext::Bind(std::string name, const json::value& value) {
  for (auto& [n, v] : names_) {
    if (n == name) {
      v = &value;
      return *this;
    }
  }
  names_.emplace_back(std::move(name), &value);
  return *this;
}

const json::value* TemplateContext::Find(std::string_view path) const {
  const auto dot = path.find('.');
  const std::string_view first = path.substr(0, dot);
  for (const auto& [n, v] : names_) {
    if (n == first) return dot == std::string_view::npos ? v : FindPath(*v, path.substr(dot + 1));
  }
  return root_ != nullptr ? FindPath(*root_, path) : nullptr;
}

const json::value* FindReferenced(const json::value& tmpl, const TemplateContext& context) {
  if (!tmpl.is_string()) return nullptr;
  auto pieces = Split(std::string_view(tmpl.get_string().data(), tmpl.get_string().size()));
  if (!pieces.ok() || pieces->size() != 1 || !(*pieces)[0].is_ref) return nullptr;
  return context.Find((*pieces)[0].text);
}

Result<json::value> RenderTemplate(const json::value& tmpl, const TemplateContext& context) {
  switch (tmpl.kind()) {
    case json::kind::string:
      return RenderString(tmpl.get_string(), context);
    case json::kind::array: {
      json::array out;
      out.reserve(tmpl.get_array().size());
      for (const auto& e : tmpl.get_array()) {
        auto r = RenderTemplate(e, context);
        if (!r.ok()) return std::move(r).error();
        out.push_back(std::move(r).value());
      }
      return json::value(std::move(out));
    }
    case json::kind::object: {
      json::object out;
      out.reserve(tmpl.get_object().size());
      for (const auto& kv : tmpl.get_object()) {
        auto r = RenderTemplate(kv.value(), context);
        if (!r.ok()) return std::move(r).error();
        out.emplace(kv.key(), std::move(r).value());
      }
      return json::value(std::move(out));
    }
    default:
      return tmpl;
  }
}

Result<std::string> RenderTemplateString(std::string_view tmpl, const TemplateContext& context) {
  auto r = RenderString(json::string(tmpl), context);
  if (!r.ok()) return std::move(r).error();
  if (r->is_string()) return std::string(r->get_string());
  return json::serialize(*r);
}

Result<std::string> RenderTemplateString(std::string_view tmpl, const TemplateContext& context,
                                         const TemplateEscape& escape) {
  auto pieces = Split(tmpl);
  if (!pieces.ok()) return std::move(pieces).error();
  return Interpolate(*pieces, context, &escape);
}

namespace {
Result<void> CollectRefs(const json::value& v, std::vector<std::string>& out) {
  if (v.is_string()) {
    auto pieces = Split(std::string_view(v.get_string().data(), v.get_string().size()));
    if (!pieces.ok()) return std::move(pieces).error();
    for (const auto& p : *pieces) {
      if (p.is_ref) out.emplace_back(p.text);
    }
  } else if (v.is_array()) {
    for (const auto& e : v.get_array()) KEEL_RETURN_IF_ERROR(CollectRefs(e, out));
  } else if (v.is_object()) {
    for (const auto& kv : v.get_object()) KEEL_RETURN_IF_ERROR(CollectRefs(kv.value(), out));
  }
  return Ok();
}
}  // namespace

Result<std::vector<std::string>> TemplateReferences(const json::value& tmpl) {
  std::vector<std::string> out;
  KEEL_RETURN_IF_ERROR(CollectRefs(tmpl, out));
  return out;
}

}  // namespace keel
