#include "keel/core/json.h"

#include <algorithm>
#include <boost/json/src.hpp>  // Boost.JSON compiled here, once, for all of keel.
#include <charconv>
#include <vector>

namespace keel {

Result<json::value> ParseJson(std::string_view text) {
  json::stream_parser parser;
  boost::system::error_code ec;
  const std::size_t consumed = parser.write_some(text.data(), text.size(), ec);
  if (!ec && consumed < text.size()) {
    // Trailing content after a complete document.
    std::size_t pos = consumed;
    while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\n' || text[pos] == '\r' ||
                                 text[pos] == '\t')) {
      ++pos;
    }
    if (pos < text.size()) {
      return Error(ErrorCode::kInvalidRequest,
                   "invalid JSON at byte " + std::to_string(pos) + ": unexpected trailing data");
    }
  }
  if (!ec) parser.finish(ec);
  if (ec) {
    if (text.empty()) return Error(ErrorCode::kInvalidRequest, "invalid JSON: the body is empty");
    return Error(ErrorCode::kInvalidRequest,
                 "invalid JSON at byte " + std::to_string(consumed) + ": " + ec.message());
  }
  return parser.release();
}

namespace {

void Canonicalize(const json::value& v, std::string& out) {
  switch (v.kind()) {
    case json::kind::object: {
      const auto& obj = v.get_object();
      std::vector<const json::key_value_pair*> items;
      items.reserve(obj.size());
      for (const auto& kv : obj) items.push_back(&kv);
      std::sort(items.begin(), items.end(),
                [](const auto* a, const auto* b) { return a->key() < b->key(); });
      out.push_back('{');
      bool first = true;
      for (const auto* kv : items) {
        if (!first) out.push_back(',');
        first = false;
        out += json::serialize(json::value(kv->key()));
        out.push_back(':');
        Canonicalize(kv->value(), out);
      }
      out.push_back('}');
      break;
    }
    case json::kind::array: {
      out.push_back('[');
      bool first = true;
      for (const auto& e : v.get_array()) {
        if (!first) out.push_back(',');
        first = false;
        Canonicalize(e, out);
      }
      out.push_back(']');
      break;
    }
    default:
      out += json::serialize(v);
  }
}

}  // namespace

std::string CanonicalJson(const json::value& v) {
  std::string out;
  Canonicalize(v, out);
  return out;
}

const json::value* FindPath(const json::value& root, std::string_view path) {
  const json::value* cur = &root;
  while (!path.empty()) {
    const auto dot = path.find('.');
    const std::string_view seg = path.substr(0, dot);
    path = dot == std::string_view::npos ? std::string_view() : path.substr(dot + 1);
    if (cur->is_object()) {
      const auto* next = cur->get_object().if_contains(seg);
      if (next == nullptr) return nullptr;
      cur = next;
    } else if (cur->is_array()) {
      std::size_t index = 0;
      const auto [p, ec] = std::from_chars(seg.data(), seg.data() + seg.size(), index);
      if (ec != std::errc() || p != seg.data() + seg.size()) return nullptr;
      const auto& arr = cur->get_array();
      if (index >= arr.size()) return nullptr;
      cur = &arr[index];
    } else {
      return nullptr;
    }
  }
  return cur;
}

double NumberOr(const json::value* v, double fallback) {
  return v != nullptr && v->is_number() ? v->to_number<double>() : fallback;
}

std::string_view JsonKindName(const json::value& v) {
  switch (v.kind()) {
    case json::kind::null: return "null";
    case json::kind::bool_: return "boolean";
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_: return "number";
    case json::kind::string: return "string";
    case json::kind::array: return "array";
    case json::kind::object: return "object";
  }
  return "value";
}

}  // namespace keel
