#include "keel/core/json_schema.h"

#include <algorithm>
#include <cassert>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "keel/core/regex.h"

namespace keel {
namespace detail {

// The JSON types a value has, as bits: 3 is both a number and an integer, 3.5 only a
// number. A node's `types` is the union of the types it allows (0: any).
enum TypeBit : std::uint8_t {
  kNullBit = 1 << 0,
  kBooleanBit = 1 << 1,
  kObjectBit = 1 << 2,
  kArrayBit = 1 << 3,
  kNumberBit = 1 << 4,
  kIntegerBit = 1 << 5,
  kStringBit = 1 << 6,
};

struct Pattern {
  Regex regex;
};

// A numeric keyword: its value for comparing and its JSON form for messages.
struct Bound {
  long double value = 0;
  const json::value* raw = nullptr;  // into CompiledSchema::document
};

// One compiled schema object (or boolean schema). Pointers to other nodes and into the
// document stay valid as long as the CompiledSchema that owns them.
struct SchemaNode {
  std::string location;  // JSON Pointer in the document, for compile-time errors
  bool always_false = false;
  std::uint8_t types = 0;
  const json::value* const_value = nullptr;
  const json::array* enum_values = nullptr;
  // Numbers.
  std::optional<Bound> minimum, maximum, exclusive_minimum, exclusive_maximum, multiple_of;
  // Strings.
  std::optional<std::size_t> min_length, max_length;
  std::optional<Pattern> pattern;
  // Arrays.
  std::vector<const SchemaNode*> prefix_items;
  const SchemaNode* items = nullptr;  // for the elements after prefix_items
  std::optional<std::size_t> min_items, max_items;
  bool unique_items = false;
  // Objects.
  std::map<std::string, const SchemaNode*, std::less<>> properties;
  std::vector<std::pair<Pattern, const SchemaNode*>> pattern_properties;
  const SchemaNode* additional_properties = nullptr;
  std::vector<std::string> required;
  std::optional<std::size_t> min_properties, max_properties;
  // Applicators that evaluate the same instance location.
  const SchemaNode* ref = nullptr;
  std::vector<const SchemaNode*> all_of, any_of, one_of;
  const SchemaNode* not_schema = nullptr;
};

struct CompiledSchema {
  json::value document;  // the schema as given; nodes point into it
  std::vector<std::unique_ptr<SchemaNode>> nodes;
  const SchemaNode* root = nullptr;
};

}  // namespace detail

namespace {

using detail::Bound;
using detail::Pattern;
using detail::SchemaNode;

static_assert(sizeof(wchar_t) == 4, "patterns are matched on UTF-32 code points");
static_assert(std::numeric_limits<long double>::digits >= 64,
              "numbers are compared exactly as long double, which must hold any int64/uint64");

// multipleOf with a non-integer operand: the quotient may be this far (relative) from
// an integer, which absorbs the binary rounding of decimals like 0.0075 / 0.0001.
constexpr long double kMultipleOfTolerance = 0x1p-50L;
// Longest excerpt of an instance or schema value quoted in a message, in bytes.
constexpr std::size_t kMaxQuotedBytes = 80;

// ---------------------------------------------------------------------------------------
// Values.

bool IsNumber(const json::value& v) { return v.is_int64() || v.is_uint64() || v.is_double(); }

// Exact for every int64, uint64 and double (a 64-bit mantissa).
long double ToLongDouble(const json::value& v) {
  switch (v.kind()) {
    case json::kind::int64:
      return static_cast<long double>(v.get_int64());
    case json::kind::uint64:
      return static_cast<long double>(v.get_uint64());
    case json::kind::double_:
      return static_cast<long double>(v.get_double());
    default:
      return 0;
  }
}

// Whether a number has no fractional part (3 and 3.0, not 3.5).
bool IsIntegral(const json::value& v) {
  if (v.is_int64() || v.is_uint64()) return true;
  if (!v.is_double()) return false;
  const double d = v.get_double();
  return std::isfinite(d) && std::trunc(d) == d;
}

std::uint8_t TypeBitsOf(const json::value& v) {
  switch (v.kind()) {
    case json::kind::null:
      return detail::kNullBit;
    case json::kind::bool_:
      return detail::kBooleanBit;
    case json::kind::object:
      return detail::kObjectBit;
    case json::kind::array:
      return detail::kArrayBit;
    case json::kind::string:
      return detail::kStringBit;
    case json::kind::int64:
    case json::kind::uint64:
      return detail::kNumberBit | detail::kIntegerBit;
    case json::kind::double_:
      return IsIntegral(v) ? detail::kNumberBit | detail::kIntegerBit : detail::kNumberBit;
  }
  return 0;
}

// Structural equality as JSON Schema defines it: numbers by value, objects regardless
// of key order.
bool JsonEqual(const json::value& a, const json::value& b) {
  if (IsNumber(a) && IsNumber(b)) return ToLongDouble(a) == ToLongDouble(b);
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case json::kind::null:
      return true;
    case json::kind::bool_:
      return a.get_bool() == b.get_bool();
    case json::kind::string:
      return a.get_string() == b.get_string();
    case json::kind::array: {
      const auto& x = a.get_array();
      const auto& y = b.get_array();
      if (x.size() != y.size()) return false;
      for (std::size_t i = 0; i < x.size(); ++i) {
        if (!JsonEqual(x[i], y[i])) return false;
      }
      return true;
    }
    case json::kind::object: {
      const auto& x = a.get_object();
      const auto& y = b.get_object();
      if (x.size() != y.size()) return false;
      for (const auto& kv : x) {
        const json::value* other = y.if_contains(kv.key());
        if (other == nullptr || !JsonEqual(kv.value(), *other)) return false;
      }
      return true;
    }
    default:
      return false;
  }
}

// A string that is the same for two values exactly when JsonEqual holds: canonical JSON
// with sorted keys and numbers printed from their long double value.
void AppendEqualityKey(const json::value& v, std::string& out) {
  switch (v.kind()) {
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_: {
      long double x = ToLongDouble(v);
      if (x == 0) x = 0;  // -0.0 equals 0
      char buf[64];
      const int n = std::snprintf(buf, sizeof buf, "%.21Lg", x);  // round-trips 64 bits
      out.append(buf, static_cast<std::size_t>(n));
      break;
    }
    case json::kind::array:
      out.push_back('[');
      for (const auto& e : v.get_array()) {
        AppendEqualityKey(e, out);
        out.push_back(',');
      }
      out.push_back(']');
      break;
    case json::kind::object: {
      std::vector<const json::key_value_pair*> items;
      for (const auto& kv : v.get_object()) items.push_back(&kv);
      std::sort(items.begin(), items.end(),
                [](const auto* a, const auto* b) { return a->key() < b->key(); });
      out.push_back('{');
      for (const auto* kv : items) {
        out += json::serialize(kv->key());
        out.push_back(':');
        AppendEqualityKey(kv->value(), out);
        out.push_back(',');
      }
      out.push_back('}');
      break;
    }
    default:
      out += json::serialize(v);
  }
}

// Code points in UTF-8 text: the bytes that do not continue a sequence.
std::size_t CountCodePoints(std::string_view s) {
  std::size_t n = 0;
  for (const char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Cuts UTF-8 text to at most `max` bytes without splitting a code point.
std::string_view TruncateUtf8(std::string_view s, std::size_t max) {
  if (s.size() <= max) return s;
  std::size_t end = max;
  while (end > 0 && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) --end;
  return s.substr(0, end);
}

std::string FormatNumber(const json::value& v) {
  if (v.is_int64()) return std::to_string(v.get_int64());
  if (v.is_uint64()) return std::to_string(v.get_uint64());
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v.get_double());
  return std::string(buf, r.ptr);
}

std::string QuoteString(std::string_view s) {
  const std::string_view cut = TruncateUtf8(s, kMaxQuotedBytes);
  std::string out = json::serialize(json::string_view(cut.data(), cut.size()));
  if (cut.size() < s.size()) out.insert(out.size() - 1, "...");
  return out;
}

// A value for "got ...": scalars as JSON, containers by kind.
std::string Describe(const json::value& v) {
  if (IsNumber(v)) return FormatNumber(v);
  if (v.is_string()) return QuoteString(v.get_string());
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return json::serialize(v);
}

// A schema constant (enum, const) as JSON, cut at kMaxQuotedBytes.
std::string QuoteValue(const json::value& v) {
  if (IsNumber(v)) return FormatNumber(v);
  const std::string text = json::serialize(v);
  const std::string_view cut = TruncateUtf8(text, kMaxQuotedBytes);
  return cut.size() < text.size() ? std::string(cut) + "..." : text;
}

std::string DescribeTypes(std::uint8_t types) {
  static constexpr std::pair<std::uint8_t, const char*> kNames[] = {
      {detail::kStringBit, "a string"},    {detail::kNumberBit, "a number"},
      {detail::kIntegerBit, "an integer"}, {detail::kBooleanBit, "a boolean"},
      {detail::kObjectBit, "an object"},   {detail::kArrayBit, "an array"},
      {detail::kNullBit, "null"}};
  std::string out;
  for (const auto& [bit, name] : kNames) {
    if ((types & bit) == 0) continue;
    if (bit == detail::kIntegerBit && (types & detail::kNumberBit) != 0) continue;
    if (!out.empty()) out += " or ";
    out += name;
  }
  return out.empty() ? "nothing" : out;
}

std::string Plural(std::size_t n, const char* singular, const char* plural) {
  return std::to_string(n) + " " + (n == 1 ? singular : plural);
}

// ---------------------------------------------------------------------------------------
// Schema locations (JSON Pointers, "#/properties/a~1b") and instance paths ("$.a[2]").

std::string PointerToken(std::string_view key) {
  std::string out;
  for (const char c : key) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// One reference token of a URI-fragment JSON Pointer: %-decoded, then ~1 -> '/', ~0 -> '~'.
std::optional<std::string> DecodePointerToken(std::string_view raw) {
  std::string decoded;
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] != '%') {
      decoded.push_back(raw[i]);
      continue;
    }
    if (i + 2 >= raw.size()) return std::nullopt;
    const int hi = HexDigit(raw[i + 1]);
    const int lo = HexDigit(raw[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    decoded.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  std::string out;
  for (std::size_t i = 0; i < decoded.size(); ++i) {
    if (decoded[i] != '~') {
      out.push_back(decoded[i]);
    } else if (i + 1 < decoded.size() && (decoded[i + 1] == '0' || decoded[i + 1] == '1')) {
      out.push_back(decoded[++i] == '0' ? '~' : '/');
    } else {
      return std::nullopt;
    }
  }
  return out;
}

bool IsIdentifier(std::string_view key) {
  if (key.empty() || (key[0] >= '0' && key[0] <= '9')) return false;
  for (const char c : key) {
    const bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
    if (!ok) return false;
  }
  return true;
}

constexpr std::size_t kNoIndex = static_cast<std::size_t>(-1);

// Where the validator is in the instance: a chain of frames on the stack, rendered only
// when a message needs it.
struct InstancePath {
  const InstancePath* parent = nullptr;
  std::string_view key;
  std::size_t index = kNoIndex;

  std::string ToString() const {
    std::vector<const InstancePath*> chain;
    for (const InstancePath* p = this; p->parent != nullptr; p = p->parent) chain.push_back(p);
    std::string out = "$";
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
      const InstancePath& p = **it;
      if (p.index != kNoIndex) {
        out += "[" + std::to_string(p.index) + "]";
      } else if (IsIdentifier(p.key)) {
        out += "." + std::string(p.key);
      } else {
        out += "[" + json::serialize(json::string_view(p.key.data(), p.key.size())) + "]";
      }
    }
    return out;
  }
};

// ---------------------------------------------------------------------------------------
// Compiling.

Error InvalidSchema(const std::string& location, const std::string& what) {
  return Error(ErrorCode::kInvalidRequest, "invalid JSON Schema at " + location + ": " + what,
               location);
}

Error Unsupported(const std::string& location, const std::string& what) {
  return Error(ErrorCode::kInvalidRequest, "unsupported " + what + " at " + location, location);
}

Result<Pattern> CompilePattern(std::string_view source, const std::string& location) {
  auto regex = Regex::Compile(source);
  if (!regex.ok()) {
    return InvalidSchema(location, "invalid regular expression " + QuoteString(source) + ": " +
                                       regex.error().message);
  }
  return Pattern{std::move(regex).value()};
}

// Recognised values of a root "$schema", without scheme and trailing '#'.
enum class Dialect { kDraft07, kDraft2020 };
std::optional<Dialect> DialectOf(std::string_view uri) {
  for (const std::string_view scheme : {"https://", "http://"}) {
    if (uri.substr(0, scheme.size()) == scheme) uri.remove_prefix(scheme.size());
  }
  if (!uri.empty() && uri.back() == '#') uri.remove_suffix(1);
  if (uri == "json-schema.org/draft-07/schema" || uri == "json-schema.org/draft-06/schema") {
    return Dialect::kDraft07;
  }
  if (uri == "json-schema.org/draft/2020-12/schema" ||
      uri == "json-schema.org/draft/2019-09/schema") {
    return Dialect::kDraft2020;
  }
  return std::nullopt;
}

class Compiler {
 public:
  explicit Compiler(detail::CompiledSchema& out) : out_(out) {}

  Result<void> CompileDocument() {
    const json::value& root = out_.document;
    if (const auto* obj = root.if_object(); obj != nullptr) {
      if (const json::value* uri = obj->if_contains("$schema"); uri != nullptr) {
        if (!uri->is_string()) return InvalidSchema("#/$schema", "expected a string");
        const auto dialect = DialectOf(uri->get_string());
        if (!dialect) {
          return Unsupported("#/$schema", "$schema " + QuoteString(uri->get_string()) +
                                              " (known: draft-06, draft-07, 2019-09, 2020-12)");
        }
        ref_overrides_siblings_ = *dialect == Dialect::kDraft07;
      }
    }
    auto node = Compile(root, "#", 0);
    if (!node.ok()) return std::move(node).error();
    out_.root = *node;
    std::unordered_map<const SchemaNode*, int> state;
    for (const auto& n : out_.nodes) KEEL_RETURN_IF_ERROR(CheckInPlaceCycles(*n, state, 0));
    return Ok();
  }

 private:
  Result<SchemaNode*> Compile(const json::value& schema, const std::string& location, int depth) {
    if (depth > JsonSchema::kMaxDepth) {
      return InvalidSchema(location,
                           "schemas nested deeper than " + std::to_string(JsonSchema::kMaxDepth));
    }
    if (auto it = compiled_.find(&schema); it != compiled_.end()) return it->second;
    SchemaNode& node = *out_.nodes.emplace_back(std::make_unique<SchemaNode>());
    node.location = location;
    compiled_.emplace(&schema, &node);  // before the keywords: a $ref cycle finds it here
    if (schema.is_bool()) {
      node.always_false = !schema.get_bool();
      return &node;
    }
    if (!schema.is_object()) {
      return InvalidSchema(location,
                           "a schema must be an object or a boolean, got " + Describe(schema));
    }
    const json::object& obj = schema.get_object();
    if (ref_overrides_siblings_) {
      if (const json::value* ref = obj.if_contains("$ref"); ref != nullptr) {
        // Draft-07: "All other properties in a "$ref" object MUST be ignored."
        auto target = CompileRef(*ref, location + "/$ref", depth);
        if (!target.ok()) return std::move(target).error();
        node.ref = *target;
        return &node;
      }
    }
    for (const auto& kv : obj) {
      const std::string_view key(kv.key().data(), kv.key().size());
      KEEL_RETURN_IF_ERROR(CompileKeyword(node, schema, key, kv.value(), location, depth));
    }
    return &node;
  }

  Result<void> CompileKeyword(SchemaNode& node, const json::value& schema, std::string_view key,
                              const json::value& value, const std::string& location, int depth) {
    const json::object& obj = schema.get_object();
    const std::string at = location + "/" + PointerToken(key);
    const int next = depth + 1;
    // Assertions.
    if (key == "type") return CompileType(node, value, at);
    if (key == "enum") {
      if (!value.is_array()) return InvalidSchema(at, "expected an array, got " + Describe(value));
      node.enum_values = &value.get_array();
      return Ok();
    }
    if (key == "const") {
      node.const_value = &value;
      return Ok();
    }
    if (key == "minimum") return SetBound(node.minimum, value, at);
    if (key == "maximum") return SetBound(node.maximum, value, at);
    if (key == "exclusiveMinimum") return SetBound(node.exclusive_minimum, value, at);
    if (key == "exclusiveMaximum") return SetBound(node.exclusive_maximum, value, at);
    if (key == "multipleOf") {
      KEEL_RETURN_IF_ERROR(SetBound(node.multiple_of, value, at));
      if (node.multiple_of->value <= 0) return InvalidSchema(at, "expected a number > 0");
      return Ok();
    }
    if (key == "minLength") return SetCount(node.min_length, value, at);
    if (key == "maxLength") return SetCount(node.max_length, value, at);
    if (key == "minItems") return SetCount(node.min_items, value, at);
    if (key == "maxItems") return SetCount(node.max_items, value, at);
    if (key == "minProperties") return SetCount(node.min_properties, value, at);
    if (key == "maxProperties") return SetCount(node.max_properties, value, at);
    if (key == "pattern") {
      if (!value.is_string()) return InvalidSchema(at, "expected a string, got " + Describe(value));
      auto pattern = CompilePattern(value.get_string(), at);
      if (!pattern.ok()) return std::move(pattern).error();
      node.pattern = std::move(pattern).value();
      return Ok();
    }
    if (key == "uniqueItems") {
      if (!value.is_bool()) return InvalidSchema(at, "expected a boolean, got " + Describe(value));
      node.unique_items = value.get_bool();
      return Ok();
    }
    if (key == "required") {
      if (!value.is_array()) return InvalidSchema(at, "expected an array, got " + Describe(value));
      std::unordered_set<std::string_view> seen;
      for (const auto& name : value.get_array()) {
        if (!name.is_string()) {
          return InvalidSchema(at, "expected property names, got " + Describe(name));
        }
        const std::string_view s(name.get_string().data(), name.get_string().size());
        if (!seen.insert(s).second) {
          return InvalidSchema(at, "property " + QuoteString(s) + " is listed twice");
        }
        node.required.emplace_back(s);
      }
      return Ok();
    }
    // Applicators on array elements.
    if (key == "prefixItems") {
      if (const json::value* items = obj.if_contains("items"); items && items->is_array()) {
        return Unsupported(location, "mix of \"prefixItems\" and array-form \"items\"");
      }
      return CompileSchemaList(node.prefix_items, value, at, next);
    }
    if (key == "items") {
      if (value.is_array()) return CompileSchemaList(node.prefix_items, value, at, next);
      return CompileInto(node.items, value, at, next);
    }
    if (key == "additionalItems") {
      if (const json::value* items = obj.if_contains("items"); !items || !items->is_array()) {
        return Unsupported(location,
                           "JSON Schema keyword \"additionalItems\" without array-form \"items\"");
      }
      return CompileInto(node.items, value, at, next);
    }
    // Applicators on object members.
    if (key == "properties") {
      if (!value.is_object())
        return InvalidSchema(at, "expected an object, got " + Describe(value));
      for (const auto& kv : value.get_object()) {
        const std::string_view name(kv.key().data(), kv.key().size());
        auto sub = Compile(kv.value(), at + "/" + PointerToken(name), next);
        if (!sub.ok()) return std::move(sub).error();
        node.properties.emplace(std::string(name), *sub);
      }
      return Ok();
    }
    if (key == "patternProperties") {
      if (!value.is_object())
        return InvalidSchema(at, "expected an object, got " + Describe(value));
      for (const auto& kv : value.get_object()) {
        const std::string_view source(kv.key().data(), kv.key().size());
        const std::string sub_at = at + "/" + PointerToken(source);
        auto pattern = CompilePattern(source, sub_at);
        if (!pattern.ok()) return std::move(pattern).error();
        auto sub = Compile(kv.value(), sub_at, next);
        if (!sub.ok()) return std::move(sub).error();
        node.pattern_properties.emplace_back(std::move(pattern).value(), *sub);
      }
      return Ok();
    }
    if (key == "additionalProperties")
      return CompileInto(node.additional_properties, value, at, next);
    // Applicators on the same instance.
    if (key == "allOf") return CompileSchemaList(node.all_of, value, at, next);
    if (key == "anyOf") return CompileSchemaList(node.any_of, value, at, next);
    if (key == "oneOf") return CompileSchemaList(node.one_of, value, at, next);
    if (key == "not") return CompileInto(node.not_schema, value, at, next);
    if (key == "$ref") {
      auto target = CompileRef(value, at, depth);
      if (!target.ok()) return std::move(target).error();
      node.ref = *target;
      return Ok();
    }
    if (key == "$defs" || key == "definitions") {
      // Compiled even when nothing refers to them: a mistake there is still a mistake.
      if (!value.is_object())
        return InvalidSchema(at, "expected an object, got " + Describe(value));
      for (const auto& kv : value.get_object()) {
        const std::string_view name(kv.key().data(), kv.key().size());
        auto sub = Compile(kv.value(), at + "/" + PointerToken(name), next);
        if (!sub.ok()) return std::move(sub).error();
      }
      return Ok();
    }
    // Annotations and identifiers.
    if (key == "$id") {
      if (&schema != &out_.document) {
        return Unsupported(location, "\"$id\" in a subschema (embedded schema resources)");
      }
      return ExpectString(value, at);
    }
    if (key == "$schema" || key == "$comment" || key == "title" || key == "description" ||
        key == "format") {
      return ExpectString(value, at);
    }
    if (key == "deprecated" || key == "readOnly" || key == "writeOnly") {
      if (!value.is_bool()) return InvalidSchema(at, "expected a boolean, got " + Describe(value));
      return Ok();
    }
    if (key == "default" || key == "examples") return Ok();
    return Unsupported(location, "JSON Schema keyword " + QuoteString(key));
  }

  Result<void> CompileType(SchemaNode& node, const json::value& value, const std::string& at) {
    auto bit_of = [](const json::value& name) -> std::uint8_t {
      if (!name.is_string()) return 0;
      const json::string& s = name.get_string();
      if (s == "null") return detail::kNullBit;
      if (s == "boolean") return detail::kBooleanBit;
      if (s == "object") return detail::kObjectBit;
      if (s == "array") return detail::kArrayBit;
      if (s == "number") return detail::kNumberBit;
      if (s == "integer") return detail::kIntegerBit;
      if (s == "string") return detail::kStringBit;
      return 0;
    };
    const json::array single{value};
    const json::array& names = value.is_array() ? value.get_array() : single;
    if (names.empty()) return InvalidSchema(at, "expected at least one type");
    for (const auto& name : names) {
      const std::uint8_t bit = bit_of(name);
      if (bit == 0) {
        return InvalidSchema(at,
                             "expected a type name (null, boolean, object, array, number, "
                             "integer, string), got " +
                                 Describe(name));
      }
      if ((node.types & bit) != 0) {
        return InvalidSchema(at, "type " + Describe(name) + " is listed twice");
      }
      node.types |= bit;
    }
    return Ok();
  }

  Result<void> SetBound(std::optional<Bound>& out, const json::value& value,
                        const std::string& at) {
    if (!IsNumber(value)) return InvalidSchema(at, "expected a number, got " + Describe(value));
    out = Bound{ToLongDouble(value), &value};
    return Ok();
  }

  Result<void> SetCount(std::optional<std::size_t>& out, const json::value& value,
                        const std::string& at) {
    if (!IsIntegral(value) || ToLongDouble(value) < 0) {
      return InvalidSchema(at, "expected a non-negative integer, got " + Describe(value));
    }
    const long double n = ToLongDouble(value);
    constexpr auto kMax = std::numeric_limits<std::size_t>::max();
    out = n >= static_cast<long double>(kMax) ? kMax : static_cast<std::size_t>(n);
    return Ok();
  }

  Result<void> ExpectString(const json::value& value, const std::string& at) {
    if (!value.is_string()) return InvalidSchema(at, "expected a string, got " + Describe(value));
    return Ok();
  }

  Result<void> CompileInto(const SchemaNode*& out, const json::value& value, const std::string& at,
                           int depth) {
    auto sub = Compile(value, at, depth);
    if (!sub.ok()) return std::move(sub).error();
    out = *sub;
    return Ok();
  }

  // A non-empty array of schemas (allOf, anyOf, oneOf, prefixItems, array-form items).
  Result<void> CompileSchemaList(std::vector<const SchemaNode*>& out, const json::value& value,
                                 const std::string& at, int depth) {
    if (!value.is_array() || value.get_array().empty()) {
      return InvalidSchema(at, "expected a non-empty array of schemas, got " + Describe(value));
    }
    const json::array& list = value.get_array();
    for (std::size_t i = 0; i < list.size(); ++i) {
      auto sub = Compile(list[i], at + "/" + std::to_string(i), depth);
      if (!sub.ok()) return std::move(sub).error();
      out.push_back(*sub);
    }
    return Ok();
  }

  // Resolves a "#" or "#/json/pointer" reference within the document and compiles its
  // target (once, however many references lead to it).
  Result<SchemaNode*> CompileRef(const json::value& value, const std::string& at, int depth) {
    if (!value.is_string()) return InvalidSchema(at, "expected a string, got " + Describe(value));
    const std::string_view ref(value.get_string().data(), value.get_string().size());
    if (ref.empty() || ref[0] != '#' || (ref.size() > 1 && ref[1] != '/')) {
      return Unsupported(at, "$ref " + QuoteString(ref) +
                                 ": only references within the document (\"#\" or \"#/...\")"
                                 " are supported");
    }
    const json::value* target = &out_.document;
    std::size_t pos = 1;
    while (pos < ref.size()) {  // ref[pos] == '/'
      const std::size_t end = std::min(ref.find('/', pos + 1), ref.size());
      const auto token = DecodePointerToken(ref.substr(pos + 1, end - pos - 1));
      if (!token) return InvalidSchema(at, "malformed JSON Pointer in $ref " + QuoteString(ref));
      if (target->is_object()) {
        target = target->get_object().if_contains(*token);
      } else if (target->is_array()) {
        std::size_t index = 0;
        const char* first = token->data();
        const char* last = first + token->size();
        const auto [p, ec] = std::from_chars(first, last, index);
        const bool canonical = !token->empty() && (token->size() == 1 || (*token)[0] != '0');
        const auto& arr = target->get_array();
        target = ec == std::errc() && p == last && canonical && index < arr.size() ? &arr[index]
                                                                                   : nullptr;
      } else {
        target = nullptr;
      }
      if (target == nullptr) {
        return InvalidSchema(at, "$ref " + QuoteString(ref) + " points to nothing in the document");
      }
      pos = end;
    }
    return Compile(*target, std::string(ref), depth + 1);
  }

  // Refuses cycles among $ref, allOf, anyOf, oneOf and not: they evaluate the same
  // instance location, so such a cycle would recurse until the depth limit, every time.
  Result<void> CheckInPlaceCycles(const SchemaNode& node,
                                  std::unordered_map<const SchemaNode*, int>& state, int depth) {
    enum { kUnseen = 0, kOnPath = 1, kDone = 2 };
    const int s = state[&node];
    if (s == kDone) return Ok();
    if (s == kOnPath) {
      return InvalidSchema(node.location,
                           "a cycle of $ref/allOf/anyOf/oneOf/not that never "
                           "moves into the instance (it would recurse forever)");
    }
    if (depth > JsonSchema::kMaxDepth) {
      return InvalidSchema(node.location, "a chain of $ref/allOf/anyOf/oneOf/not deeper than " +
                                              std::to_string(JsonSchema::kMaxDepth));
    }
    state[&node] = kOnPath;
    std::vector<const SchemaNode*> next = node.all_of;
    next.insert(next.end(), node.any_of.begin(), node.any_of.end());
    next.insert(next.end(), node.one_of.begin(), node.one_of.end());
    if (node.ref != nullptr) next.push_back(node.ref);
    if (node.not_schema != nullptr) next.push_back(node.not_schema);
    for (const SchemaNode* n : next) KEEL_RETURN_IF_ERROR(CheckInPlaceCycles(*n, state, depth + 1));
    state[&node] = kDone;
    return Ok();
  }

  detail::CompiledSchema& out_;
  std::unordered_map<const json::value*, SchemaNode*> compiled_;
  bool ref_overrides_siblings_ = false;  // draft-07 $ref semantics
};

// ---------------------------------------------------------------------------------------
// Validating.

// One evaluation of an instance. `want` asks a check to describe its first violation in
// error_; without it a failing check only returns false (anyOf, oneOf and not probe
// their branches so). A fatal condition (depth, regex engine limits) sets fatal_ and
// error_ whatever `want` says, and every caller passes it up: it never turns into a
// "valid" under not or anyOf.
class Validator {
 public:
  bool Check(const SchemaNode& s, const json::value& v, const InstancePath& path, int depth,
             bool want) {
    if (depth > JsonSchema::kMaxDepth) {
      return Fatal(path, "schemas nested deeper than " + std::to_string(JsonSchema::kMaxDepth) +
                             " while validating (a very deep instance or a recursive schema)");
    }
    if (s.always_false) {
      return Fail(want, path, [&] { return "no value is allowed here, got " + Describe(v); });
    }
    if (s.types != 0 && (TypeBitsOf(v) & s.types) == 0) {
      return Fail(want, path,
                  [&] { return "expected " + DescribeTypes(s.types) + ", got " + Describe(v); });
    }
    if (s.const_value != nullptr && !JsonEqual(v, *s.const_value)) {
      return Fail(want, path, [&] {
        return "expected " + QuoteValue(*s.const_value) + ", got " + Describe(v);
      });
    }
    if (s.enum_values != nullptr) {
      bool found = false;
      for (const auto& e : *s.enum_values) found = found || JsonEqual(v, e);
      if (!found) {
        return Fail(want, path, [&] {
          return "expected one of " + QuoteValue(*s.enum_values) + ", got " + Describe(v);
        });
      }
    }
    bool ok = true;
    switch (v.kind()) {
      case json::kind::int64:
      case json::kind::uint64:
      case json::kind::double_:
        ok = CheckNumber(s, v, path, want);
        break;
      case json::kind::string:
        ok = CheckString(s, v.get_string(), path, want);
        break;
      case json::kind::array:
        ok = CheckArray(s, v.get_array(), path, depth, want);
        break;
      case json::kind::object:
        ok = CheckObject(s, v.get_object(), path, depth, want);
        break;
      default:
        break;
    }
    return ok && CheckInPlace(s, v, path, depth, want);
  }

  bool fatal() const { return fatal_; }
  Error& error() { return error_; }

 private:
  template <typename MakeMessage>
  bool Fail(bool want, const InstancePath& path, MakeMessage&& make_message) {
    if (want) {
      const std::string where = path.ToString();
      error_ = Error(ErrorCode::kInvalidRequest, where + ": " + make_message(), where);
    }
    return false;
  }

  bool Fatal(const InstancePath& path, const std::string& message) {
    fatal_ = true;
    const std::string where = path.ToString();
    error_ = Error(ErrorCode::kInvalidRequest, where + ": " + message, where);
    return false;
  }

  bool CheckNumber(const SchemaNode& s, const json::value& v, const InstancePath& path, bool want) {
    const long double x = ToLongDouble(v);
    const char* what = s.types == detail::kIntegerBit ? "an integer" : "a number";
    auto fail = [&](const char* op, const Bound& b) {
      return Fail(want, path, [&] {
        return std::string("expected ") + what + " " + op + " " + FormatNumber(*b.raw) + ", got " +
               FormatNumber(v);
      });
    };
    if (s.minimum && x < s.minimum->value) return fail(">=", *s.minimum);
    if (s.exclusive_minimum && x <= s.exclusive_minimum->value)
      return fail(">", *s.exclusive_minimum);
    if (s.maximum && x > s.maximum->value) return fail("<=", *s.maximum);
    if (s.exclusive_maximum && x >= s.exclusive_maximum->value)
      return fail("<", *s.exclusive_maximum);
    if (s.multiple_of && !IsMultipleOf(v, x, *s.multiple_of)) {
      return Fail(want, path, [&] {
        return "expected a multiple of " + FormatNumber(*s.multiple_of->raw) + ", got " +
               FormatNumber(v);
      });
    }
    return true;
  }

  static bool IsMultipleOf(const json::value& v, long double x, const Bound& m) {
    if (IsIntegral(v) && IsIntegral(*m.raw)) return std::fmod(x, m.value) == 0;  // exact
    const long double q = x / m.value;
    // A quotient beyond the range of double is not a multiple (as where it is computed
    // in double and overflows to infinity).
    if (!std::isfinite(static_cast<double>(q))) return false;
    return std::fabs(q - std::nearbyint(q)) <= std::fabs(q) * kMultipleOfTolerance;
  }

  bool CheckString(const SchemaNode& s, const json::string& str, const InstancePath& path,
                   bool want) {
    const std::string_view text(str.data(), str.size());
    if (s.min_length || s.max_length) {
      const std::size_t n = CountCodePoints(text);
      if (s.min_length && n < *s.min_length) {
        return Fail(want, path, [&] {
          return "expected a string of at least " +
                 Plural(*s.min_length, "character", "characters") + ", got " + std::to_string(n);
        });
      }
      if (s.max_length && n > *s.max_length) {
        return Fail(want, path, [&] {
          return "expected a string of at most " +
                 Plural(*s.max_length, "character", "characters") + ", got " + std::to_string(n);
        });
      }
    }
    if (s.pattern) {
      const Match m = Search(*s.pattern, text, path);
      if (m == Match::kError) return false;
      if (m == Match::kNo) {
        return Fail(want, path, [&] {
          return "expected a string matching the pattern " +
                 QuoteString(s.pattern->regex.source()) + ", got " + QuoteString(text);
        });
      }
    }
    return true;
  }

  bool CheckArray(const SchemaNode& s, const json::array& arr, const InstancePath& path, int depth,
                  bool want) {
    const std::size_t n = arr.size();
    if (s.min_items && n < *s.min_items) {
      return Fail(want, path, [&] {
        return "expected an array of at least " + Plural(*s.min_items, "item", "items") + ", got " +
               std::to_string(n);
      });
    }
    if (s.max_items && n > *s.max_items) {
      return Fail(want, path, [&] {
        return "expected an array of at most " + Plural(*s.max_items, "item", "items") + ", got " +
               std::to_string(n);
      });
    }
    const std::size_t prefix = std::min(n, s.prefix_items.size());
    for (std::size_t i = 0; i < prefix; ++i) {
      if (!Check(*s.prefix_items[i], arr[i], InstancePath{&path, {}, i}, depth + 1, want)) {
        return false;
      }
    }
    if (s.items != nullptr && n > prefix) {
      if (s.items->always_false) {
        return Fail(want, path, [&] {
          return "expected an array of at most " + Plural(prefix, "item", "items") + ", got " +
                 std::to_string(n);
        });
      }
      for (std::size_t i = prefix; i < n; ++i) {
        if (!Check(*s.items, arr[i], InstancePath{&path, {}, i}, depth + 1, want)) return false;
      }
    }
    if (s.unique_items && n > 1) {
      std::unordered_map<std::string, std::size_t> first_seen;
      for (std::size_t i = 0; i < n; ++i) {
        std::string key;
        AppendEqualityKey(arr[i], key);
        const auto [it, inserted] = first_seen.emplace(std::move(key), i);
        if (!inserted) {
          const std::size_t first = it->second;  // clang 14 cannot capture a structured binding
          return Fail(want, path, [&] {
            return "expected unique items, got equal items at [" + std::to_string(first) +
                   "] and [" + std::to_string(i) + "]";
          });
        }
      }
    }
    return true;
  }

  bool CheckObject(const SchemaNode& s, const json::object& obj, const InstancePath& path,
                   int depth, bool want) {
    if (s.min_properties && obj.size() < *s.min_properties) {
      return Fail(want, path, [&] {
        return "expected an object of at least " +
               Plural(*s.min_properties, "property", "properties") + ", got " +
               std::to_string(obj.size());
      });
    }
    if (s.max_properties && obj.size() > *s.max_properties) {
      return Fail(want, path, [&] {
        return "expected an object of at most " +
               Plural(*s.max_properties, "property", "properties") + ", got " +
               std::to_string(obj.size());
      });
    }
    for (const std::string& name : s.required) {
      if (!obj.contains(name)) {
        return Fail(want, path, [&] { return "missing required property " + QuoteString(name); });
      }
    }
    if (s.properties.empty() && s.pattern_properties.empty() &&
        s.additional_properties == nullptr) {
      return true;
    }
    for (const auto& kv : obj) {
      const std::string_view key(kv.key().data(), kv.key().size());
      const InstancePath child{&path, key};
      bool matched = false;
      if (const auto it = s.properties.find(key); it != s.properties.end()) {
        matched = true;
        if (!Check(*it->second, kv.value(), child, depth + 1, want)) return false;
      }
      for (const auto& [pattern, sub] : s.pattern_properties) {
        const Match m = Search(pattern, key, child);
        if (m == Match::kError) return false;
        if (m == Match::kNo) continue;
        matched = true;
        if (!Check(*sub, kv.value(), child, depth + 1, want)) return false;
      }
      if (matched || s.additional_properties == nullptr) continue;
      if (s.additional_properties->always_false) {
        return Fail(want, path, [&] { return "unexpected property " + QuoteString(key); });
      }
      if (!Check(*s.additional_properties, kv.value(), child, depth + 1, want)) return false;
    }
    return true;
  }

  bool CheckInPlace(const SchemaNode& s, const json::value& v, const InstancePath& path, int depth,
                    bool want) {
    if (s.ref != nullptr && !Check(*s.ref, v, path, depth + 1, want)) return false;
    for (const SchemaNode* sub : s.all_of) {
      if (!Check(*sub, v, path, depth + 1, want)) return false;
    }
    if (!s.any_of.empty()) {
      bool any = false;
      for (const SchemaNode* sub : s.any_of) {
        if (Check(*sub, v, path, depth + 1, false)) {
          any = true;
          break;
        }
        if (fatal_) return false;
      }
      if (!any) {
        return FailWithFirstBranch(want, "anyOf", "at least one", *s.any_of[0], v, path, depth);
      }
    }
    if (!s.one_of.empty()) {
      std::vector<std::size_t> matching;
      for (std::size_t i = 0; i < s.one_of.size() && matching.size() < 2; ++i) {
        if (Check(*s.one_of[i], v, path, depth + 1, false)) matching.push_back(i);
        if (fatal_) return false;
      }
      if (matching.empty()) {
        return FailWithFirstBranch(want, "oneOf", "exactly one", *s.one_of[0], v, path, depth);
      }
      if (matching.size() > 1) {
        return Fail(want, path, [&] {
          return "expected a value matching exactly one schema of oneOf, got one matching "
                 "oneOf[" +
                 std::to_string(matching[0]) + "] and oneOf[" + std::to_string(matching[1]) + "]";
        });
      }
    }
    if (s.not_schema != nullptr) {
      if (Check(*s.not_schema, v, path, depth + 1, false)) {
        return Fail(want, path, [&] {
          return "expected a value not matching the \"not\" schema, got " + Describe(v);
        });
      }
      if (fatal_) return false;
    }
    return true;
  }

  // No branch of anyOf/oneOf matched: explains why with the first branch's violation.
  bool FailWithFirstBranch(bool want, const char* keyword, const char* how_many,
                           const SchemaNode& first, const json::value& v, const InstancePath& path,
                           int depth) {
    if (!want) return false;
    (void)Check(first, v, path, depth + 1, true);  // fails again, now with a message
    const std::string where = path.ToString();
    error_ = Error(ErrorCode::kInvalidRequest,
                   where + ": expected a value matching " + how_many + " schema of " + keyword +
                       ", got one matching none (" + keyword + "[0]: " + error_.message + ")",
                   where);
    return false;
  }

  enum class Match { kYes, kNo, kError };
  Match Search(const Pattern& pattern, std::string_view text, const InstancePath& path) {
    auto found = pattern.regex.Search(text);
    if (found.ok()) return *found ? Match::kYes : Match::kNo;
    Fatal(path, "could not match the pattern " + QuoteString(pattern.regex.source()) + ": " +
                    found.error().message);
    return Match::kError;
  }

  Error error_;
  bool fatal_ = false;
};

}  // namespace

JsonSchema::JsonSchema(std::shared_ptr<const detail::CompiledSchema> compiled)
    : compiled_(std::move(compiled)) {}

Result<JsonSchema> JsonSchema::Compile(const json::value& schema) {
  auto compiled = std::make_shared<detail::CompiledSchema>();
  compiled->document = schema;
  KEEL_RETURN_IF_ERROR(Compiler(*compiled).CompileDocument());
  return JsonSchema(std::move(compiled));
}

Result<void> JsonSchema::Validate(const json::value& instance) const {
  Validator validator;
  if (validator.Check(*compiled_->root, instance, InstancePath{}, 0, true)) return Ok();
  assert(!validator.error().message.empty());
  return std::move(validator.error());
}

bool JsonSchema::IsValid(const json::value& instance) const {
  Validator validator;
  return validator.Check(*compiled_->root, instance, InstancePath{}, 0, false);
}

}  // namespace keel
