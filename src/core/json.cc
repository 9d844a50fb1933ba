#include "keel/core/json.h"

#include <algorithm>
#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/src.hpp>  // Boost.JSON compiled here, once, for all of keel.
#include <charconv>
#include <cmath>
#include <vector>

namespace keel {

namespace {

// Boost.JSON's value-building handler (detail::handler), plus what keel's rules need:
// the path of the value being parsed, and the lexeme of each number.
class LimitedHandler {
 public:
  static constexpr std::size_t max_object_size = json::object::max_size();
  static constexpr std::size_t max_array_size = json::array::max_size();
  static constexpr std::size_t max_key_size = json::string::max_size();
  static constexpr std::size_t max_string_size = json::string::max_size();

  // `track_path`: keep the path of the value being parsed (for a refusal's message); off
  // on the first pass, which most documents pass (a refusal parses again, with it on).
  LimitedHandler(json::storage_ptr sp, unsigned char* temp, std::size_t temp_size, bool track_path)
      : st(std::move(sp), temp, temp_size), track_(track_path) {}

  json::value_stack st;
  std::string reason;  // why a rule of keel's refused the document, when one did

  bool on_document_begin(json::error_code&) { return true; }
  bool on_document_end(json::error_code&) { return true; }
  bool on_object_begin(json::error_code&) {
    if (track_) frames_.push_back(Frame{false, 0, {}});
    return true;
  }
  bool on_object_end(std::size_t n, json::error_code&) {
    st.push_object(n);
    if (track_) frames_.pop_back();
    return Done();
  }
  bool on_array_begin(json::error_code&) {
    if (track_) frames_.push_back(Frame{true, 0, {}});
    return true;
  }
  bool on_array_end(std::size_t n, json::error_code&) {
    st.push_array(n);
    if (track_) frames_.pop_back();
    return Done();
  }
  bool on_key_part(json::string_view s, std::size_t, json::error_code&) {
    st.push_chars(s);
    if (track_) key_.append(s.data(), s.size());
    return true;
  }
  bool on_key(json::string_view s, std::size_t, json::error_code&) {
    st.push_key(s);
    if (track_) {
      key_.append(s.data(), s.size());
      frames_.back().key = std::move(key_);
      key_.clear();
    }
    return true;
  }
  bool on_string_part(json::string_view s, std::size_t, json::error_code&) {
    st.push_chars(s);
    return true;
  }
  bool on_string(json::string_view s, std::size_t, json::error_code&) {
    st.push_string(s);
    return Done();
  }
  bool on_number_part(json::string_view s, json::error_code&) {
    number_.append(s.data(), s.size());
    return true;
  }
  bool on_int64(std::int64_t i, json::string_view, json::error_code&) {
    number_.clear();
    st.push_int64(i);
    return Done();
  }
  bool on_uint64(std::uint64_t u, json::string_view, json::error_code&) {
    number_.clear();
    st.push_uint64(u);
    return Done();
  }
  bool on_double(double d, json::string_view s, json::error_code& ec) {
    number_.append(s.data(), s.size());
    const bool integer = number_.find_first_of(".eE") == std::string::npos;
    if (!std::isfinite(d)) {
      return Refuse(ec, "the number " + Lexeme() + " is out of range: JSON numbers must be finite");
    }
    // Boost.JSON hands an integer literal to on_double only when it fits in neither int64
    // nor uint64 ("-0" aside); keel keeps integers exact, so it refuses those.
    if (integer && d != 0) {
      return Refuse(
          ec,
          "the integer " + Lexeme() +
              " does not fit in 64 bits: send it as a string, or as a number with a decimal point");
    }
    // Boost.JSON 1.81 parses decimals inexactly (a unit in the last place off, at times);
    // its serializer writes the shortest text that reads back exactly. Reading the text
    // again correctly rounded makes a stored double read back as it was written.
    double exact = d;
    const auto [end, err] = std::from_chars(number_.data(), number_.data() + number_.size(), exact);
    if (err == std::errc() && end == number_.data() + number_.size() && std::isfinite(exact))
      d = exact;
    number_.clear();
    st.push_double(d);
    return Done();
  }
  bool on_bool(bool b, json::error_code&) {
    st.push_bool(b);
    return Done();
  }
  bool on_null(json::error_code&) {
    st.push_null();
    return Done();
  }
  bool on_comment_part(json::string_view, json::error_code&) { return true; }
  bool on_comment(json::string_view, json::error_code&) { return true; }

  // The dotted path of the value being parsed ("input.items.3"), empty at the root.
  std::string Path() const {
    std::string out;
    for (const auto& f : frames_) {
      if (!out.empty()) out.push_back('.');
      out += f.array ? std::to_string(f.index) : f.key;
    }
    return out;
  }

 private:
  struct Frame {
    bool array;
    std::size_t index;  // the element being parsed, in an array
    std::string key;    // the member being parsed, in an object
  };

  bool Done() {
    if (track_ && !frames_.empty() && frames_.back().array) ++frames_.back().index;
    return true;
  }
  bool Refuse(json::error_code& ec, std::string why) {
    reason = std::move(why);
    ec = json::error::exception;  // stands for "refused by keel's rules"; `reason` says why
    return false;
  }
  std::string Lexeme() const {
    return number_.size() > 40 ? number_.substr(0, 40) + "..." : number_;
  }

  bool track_;
  std::vector<Frame> frames_;
  std::string key_;
  std::string number_;
};

}  // namespace

namespace {

Result<json::value> Parse(std::string_view text, std::size_t max_depth, bool track_path) {
  json::parse_options opt;
  opt.max_depth = max_depth;
  // What the value is built in, while it is: on the stack, as json::parse does.
  unsigned char temp[BOOST_JSON_STACK_BUFFER_SIZE];
  json::basic_parser<LimitedHandler> parser(opt, json::storage_ptr(), temp, sizeof temp, track_path);
  json::error_code ec;
  const std::size_t consumed = parser.write_some(false, text.data(), text.size(), ec);
  std::string why;
  if (ec == json::error::exception && !parser.handler().reason.empty()) {
    why = parser.handler().reason;
  } else if (ec == json::error::too_deep) {
    why = "nested deeper than " + std::to_string(max_depth) + " levels";
  } else if (ec) {
    if (text.empty()) return Error(ErrorCode::kInvalidRequest, "invalid JSON: the body is empty");
    why = ec.message();  // message(), not what(): what() carries Boost's source paths
  } else {
    std::size_t pos = consumed;
    while (pos < text.size() &&
           (text[pos] == ' ' || text[pos] == '\n' || text[pos] == '\r' || text[pos] == '\t'))
      ++pos;
    if (pos < text.size()) {
      return Error(ErrorCode::kInvalidRequest,
                   "invalid JSON at byte " + std::to_string(pos) + ": unexpected trailing data");
    }
    return parser.handler().st.release();
  }
  if (!track_path) return Parse(text, max_depth, true);  // again, to say where
  std::string path = parser.handler().Path();
  std::string message = "invalid JSON at byte " + std::to_string(consumed);
  if (!path.empty()) message += " (at " + path + ")";
  return Error(ErrorCode::kInvalidRequest, message + ": " + why, std::move(path));
}

}  // namespace

Result<json::value> ParseJsonWithDepth(std::string_view text, std::size_t max_depth) {
  return Parse(text, max_depth, false);
}

Result<json::value> ParseJson(std::string_view text) {
  return ParseJsonWithDepth(text, JsonLimits::kMaxDepth);
}

Result<json::value> ParseStoredJson(std::string_view text) {
  return ParseJsonWithDepth(text, JsonLimits::kMaxDepth + JsonLimits::kEnvelopeDepth);
}

bool IsValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    std::size_t n;
    unsigned char lo = 0x80, hi = 0xBF;  // the bounds of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      if (c == 0xE0) lo = 0xA0;  // no overlong forms
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;  // at most U+10FFFF
    } else {
      return false;
    }
    if (static_cast<std::size_t>(end - p) <= n) return false;
    if (p[1] < lo || p[1] > hi) return false;
    for (std::size_t i = 2; i <= n; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
    }
    p += n + 1;
  }
  return true;
}

std::string ToValidUtf8(std::string_view text) {
  if (IsValidUtf8(text)) return std::string(text);
  std::string out;
  out.reserve(text.size() + 8);
  std::size_t i = 0;
  while (i < text.size()) {
    // The longest valid sequence starting here, 1 to 4 bytes.
    std::size_t n = 0;
    for (std::size_t len = 1; len <= 4 && i + len <= text.size(); ++len) {
      if (IsValidUtf8(text.substr(i, len))) {
        n = len;
        break;
      }
    }
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(text.substr(i, n));
      i += n;
    }
  }
  return out;
}

namespace {

Result<void> CheckValue(const json::value& v, std::string& path, std::size_t depth,
                        std::size_t max_depth) {
  const auto fail = [&](const std::string& why) {
    return Error(ErrorCode::kInvalidRequest, path + ": " + why, path);
  };
  switch (v.kind()) {
    case json::kind::double_:
      if (!std::isfinite(v.get_double()))
        return fail("the number is not finite (JSON has no infinity or NaN)");
      return {};
    case json::kind::string:
      if (!IsValidUtf8(v.get_string())) return fail("the text is not valid UTF-8");
      return {};
    case json::kind::array:
    case json::kind::object:
      if (depth >= max_depth)
        return fail("nested deeper than " + std::to_string(max_depth) + " levels");
      break;
    default:
      return {};
  }
  const std::size_t len = path.size();
  if (v.is_array()) {
    std::size_t i = 0;
    for (const auto& e : v.get_array()) {
      path += "." + std::to_string(i++);
      if (auto r = CheckValue(e, path, depth + 1, max_depth); !r.ok()) return r;
      path.resize(len);
    }
  } else {
    for (const auto& kv : v.get_object()) {
      path += ".";
      path += kv.key();
      if (!IsValidUtf8(kv.key())) return fail("a key is not valid UTF-8");
      if (auto r = CheckValue(kv.value(), path, depth + 1, max_depth); !r.ok()) return r;
      path.resize(len);
    }
  }
  return {};
}

}  // namespace

Result<void> CheckJsonLimits(const json::value& v, std::string_view what, std::size_t max_depth) {
  std::string path(what);
  return CheckValue(v, path, 0, max_depth);
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
    case json::kind::null:
      return "null";
    case json::kind::bool_:
      return "boolean";
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_:
      return "number";
    case json::kind::string:
      return "string";
    case json::kind::array:
      return "array";
    case json::kind::object:
      return "object";
  }
  return "value";
}

}  // namespace keel
