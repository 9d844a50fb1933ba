#include "keel/core/json.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "keel/testing/assert.h"

namespace keel {
namespace {

TEST(ParseJsonTest, ParsesValidDocuments) {
  auto obj = ParseJson(R"({"a": [1, 2.5, "x", true, null], "b": {"c": -3}})");
  ASSERT_OK(obj);
  ASSERT_TRUE(obj->is_object());
  EXPECT_EQ(obj->at("a").at(1).as_double(), 2.5);
  EXPECT_EQ(obj->at("b").at("c").as_int64(), -3);

  auto num = ParseJson("123");
  ASSERT_OK(num);
  EXPECT_EQ(*num, json::value(123));

  auto str = ParseJson(R"("h\u00e9")");
  ASSERT_OK(str);
  EXPECT_EQ(str->as_string(), "h\xc3\xa9");
}

TEST(ParseJsonTest, TrailingWhitespaceIsAccepted) {
  auto r = ParseJson("{\"a\":1} \n\t\r ");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::parse(R"({"a":1})"));
}

std::string Nested(std::size_t depth, std::string_view leaf = "1") {
  return std::string(depth, '[') + std::string(leaf) + std::string(depth, ']');
}

TEST(ParseJsonTest, NonFiniteNumbersAreRefusedWithTheirPath) {
  for (const char* doc : {R"({"input": {"m": 1e400}})", R"({"input": {"m": -1e400}})"}) {
    auto r = ParseJson(doc);
    ASSERT_FALSE(r.ok()) << doc;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
    EXPECT_EQ(r.error().param, "input.m") << r.error().message;
    EXPECT_NE(r.error().message.find("finite"), std::string::npos) << r.error().message;
  }
  auto in_array = ParseJson(R"({"a": [1, 2, 1E999]})");
  ASSERT_FALSE(in_array.ok());
  EXPECT_EQ(in_array.error().param, "a.2");
  // Underflow is not overflow: a tiny number is a finite zero.
  auto tiny = ParseJson("1e-400");
  ASSERT_OK(tiny);
  EXPECT_EQ(tiny->as_double(), 0.0);
}

TEST(ParseJsonTest, IntegersBeyondSixtyFourBitsAreRefusedNotRounded) {
  auto big = ParseJson(R"({"id": 123456789012345678901234567890})");
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.error().param, "id");
  EXPECT_NE(big.error().message.find("64 bits"), std::string::npos) << big.error().message;
  EXPECT_FALSE(ParseJson("18446744073709551616").ok());
  EXPECT_FALSE(ParseJson("-9223372036854775809").ok());
  // The edges of int64 and uint64 are kept exactly.
  auto max_u = ParseJson("18446744073709551615");
  ASSERT_OK(max_u);
  EXPECT_EQ(max_u->as_uint64(), 18446744073709551615ULL);
  auto min_i = ParseJson("-9223372036854775808");
  ASSERT_OK(min_i);
  EXPECT_EQ(min_i->as_int64(), INT64_MIN);
  // A number written with an exponent or a point is a double, as the sender meant.
  ASSERT_OK(ParseJson("1e30"));
  ASSERT_OK(ParseJson("-0"));
  ASSERT_OK(ParseJson("123456789012345678901234567890.0"));
}

TEST(ParseJsonTest, DepthLimitIsTheSameAtTheEdgeAndInTheStore) {
  ASSERT_OK(ParseJson(Nested(JsonLimits::kMaxDepth)));
  auto deep = ParseJson(Nested(JsonLimits::kMaxDepth + 1));
  ASSERT_FALSE(deep.ok());
  EXPECT_NE(deep.error().message.find("deeper than 64"), std::string::npos) << deep.error().message;
  // What the edge accepted, wrapped in the store's envelope, the store reads back.
  auto value = ParseJson(Nested(JsonLimits::kMaxDepth));
  ASSERT_OK(value);
  json::value record = json::object{{"output", json::object{{"items", json::array{*value}}}}};
  ASSERT_OK(CheckJsonLimits(*value, "input"));
  auto back = ParseStoredJson(json::serialize(record));
  ASSERT_OK(back);
  EXPECT_EQ(*back, record);
  // 10,000 levels: refused without deep recursion.
  EXPECT_FALSE(ParseJson(Nested(10000)).ok());
}

TEST(ParseJsonTest, DoublesReadBackExactlyAsWritten) {
  // Boost.JSON alone parses some of these a unit in the last place off.
  for (const char* text :
       {"0.1", "2.2250738585072014e-308", "1.7976931348623157e308", "0.30000000000000004",
        "123456.789e3", "5e-324", "9007199254740993.0", "1.0000000000000002", "-1.0e-150"}) {
    auto v = ParseJson(text);
    ASSERT_OK(v);
    const double expected = std::strtod(text, nullptr);
    EXPECT_EQ(v->as_double(), expected) << text;
    auto again = ParseJson(json::serialize(*v));
    ASSERT_OK(again);
    EXPECT_EQ(json::serialize(*again), json::serialize(*v)) << text;
  }
}

TEST(ParseJsonTest, InvalidUtf8IsRefused) {
  EXPECT_FALSE(ParseJson("\"\xff\"").ok());
  EXPECT_FALSE(ParseJson("{\"\xc0\xaf\": 1}").ok());
  ASSERT_OK(ParseJson("\"\xe2\x82\xac\""));
}

TEST(ParseJsonTest, ErrorsCarryNoSourcePaths) {
  for (const char* doc : {"{", "[1,", "{\"a\" 1}", "\"\xff\"", "tru"}) {
    auto r = ParseJson(doc);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().message.find("/usr/"), std::string::npos) << r.error().message;
    EXPECT_EQ(r.error().message.find(".hpp"), std::string::npos) << r.error().message;
  }
}

TEST(CheckJsonLimitsTest, NamesThePathOfWhatBreaksARule) {
  json::value ok = json::parse(R"({"a": [1, {"b": "x"}]})");
  ASSERT_OK(CheckJsonLimits(ok, "steps.t.output"));

  json::value inf = json::object{{"a", json::array{1, std::numeric_limits<double>::infinity()}}};
  auto r = CheckJsonLimits(inf, "steps.t.output");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().param, "steps.t.output.a.1");

  json::value bad_text = json::object{{"body", json::string("\xff\xfe")}};
  auto t = CheckJsonLimits(bad_text, "output");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().param, "output.body");

  json::value deep = 1;
  for (std::size_t i = 0; i < JsonLimits::kMaxDepth; ++i) deep = json::array{deep};
  ASSERT_OK(CheckJsonLimits(deep, "v"));
  deep = json::array{deep};
  EXPECT_FALSE(CheckJsonLimits(deep, "v").ok());
  EXPECT_TRUE(CheckJsonLimits(deep, "v", JsonLimits::kMaxDepth + 1).ok());
}

TEST(IsValidUtf8Test, RejectsOverlongSurrogatesAndTruncation) {
  EXPECT_TRUE(IsValidUtf8("plain"));
  EXPECT_TRUE(IsValidUtf8("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xc0\x80"));          // overlong NUL
  EXPECT_FALSE(IsValidUtf8("\xe0\x80\xaf"));      // overlong
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));      // a surrogate
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\xe2\x82"));          // truncated
  EXPECT_FALSE(IsValidUtf8("\x80"));
}

TEST(ParseJsonTest, EmptyInputIsAnError) {
  auto r = ParseJson("");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_NE(r.error().message.find("empty"), std::string::npos) << r.error().message;
}

TEST(ParseJsonTest, WhitespaceOnlyIsAnError) {
  auto r = ParseJson("   ");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
}

TEST(ParseJsonTest, TrailingGarbageNamesItsByte) {
  auto r = ParseJson(R"({"a":1} x)");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_NE(r.error().message.find("byte 8"), std::string::npos) << r.error().message;

  auto glued = ParseJson(R"({"a":1}x)");
  ASSERT_FALSE(glued.ok());
  EXPECT_NE(glued.error().message.find("byte 7"), std::string::npos) << glued.error().message;

  auto two = ParseJson("1 2");
  ASSERT_FALSE(two.ok());
  EXPECT_NE(two.error().message.find("byte 2"), std::string::npos) << two.error().message;

  EXPECT_FALSE(ParseJson("{} {}").ok());
}

TEST(ParseJsonTest, TruncatedDocumentNamesTheEnd) {
  for (const std::string text : {R"({"a": 1)", "[1,2", R"("abc)", "nul"}) {
    auto r = ParseJson(text);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
    EXPECT_NE(r.error().message.find("byte " + std::to_string(text.size())), std::string::npos)
        << text << ": " << r.error().message;
  }
}

TEST(ParseJsonTest, SyntaxErrorNamesTheOffendingByte) {
  auto r = ParseJson(R"({"a" 1})");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_NE(r.error().message.find("byte 5"), std::string::npos) << r.error().message;
  EXPECT_FALSE(ParseJson("{'a': 1}").ok());
  EXPECT_FALSE(ParseJson("[1,]").ok());
}

TEST(CanonicalJsonTest, KeyOrderDoesNotMatter) {
  const auto a = json::parse(R"({"b": 1, "a": 2, "c": {"z": 1, "y": [3, {"q": 1, "p": 2}]}})");
  const auto b = json::parse(R"({"c": {"y": [3, {"p": 2, "q": 1}], "z": 1}, "a": 2, "b": 1})");
  EXPECT_EQ(CanonicalJson(a), CanonicalJson(b));
  EXPECT_EQ(CanonicalJson(a), R"({"a":2,"b":1,"c":{"y":[3,{"p":2,"q":1}],"z":1}})");
}

TEST(CanonicalJsonTest, DifferentValuesDiffer) {
  EXPECT_NE(CanonicalJson(json::parse(R"({"a": 1})")), CanonicalJson(json::parse(R"({"a": 2})")));
  // Array order is significant.
  EXPECT_NE(CanonicalJson(json::parse("[1, 2]")), CanonicalJson(json::parse("[2, 1]")));
  EXPECT_NE(CanonicalJson(json::parse(R"({"a": "1"})")), CanonicalJson(json::parse(R"({"a": 1})")));
}

TEST(CanonicalJsonTest, EscapesKeysAndScalars) {
  const auto v = json::parse(R"({"k\"ey": "v\nal", "n": null, "t": true, "e": [], "o": {}})");
  EXPECT_EQ(CanonicalJson(v), R"({"e":[],"k\"ey":"v\nal","n":null,"o":{},"t":true})");
  // The canonical form is itself valid JSON equal to the input.
  EXPECT_EQ(json::parse(CanonicalJson(v)), v);
}

TEST(FindPathTest, WalksObjectsAndArrays) {
  const auto root = json::parse(R"({"a": {"b": [10, {"c": "deep"}], "n": null}, "x.y": 1})");
  const json::value* v = FindPath(root, "a.b.1.c");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(*v, json::value("deep"));
  v = FindPath(root, "a.b.0");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(*v, json::value(10));
  v = FindPath(root, "a.n");
  ASSERT_NE(v, nullptr);
  EXPECT_TRUE(v->is_null());
  // The empty path is the root itself.
  EXPECT_EQ(FindPath(root, ""), &root);
  // The result points into `root`, not at a copy.
  EXPECT_EQ(FindPath(root, "a"), &root.at("a"));
}

TEST(FindPathTest, MissingSegmentsAreNull) {
  const auto root = json::parse(R"({"a": {"b": [10, 20]}})");
  EXPECT_EQ(FindPath(root, "z"), nullptr);
  EXPECT_EQ(FindPath(root, "a.z"), nullptr);
  EXPECT_EQ(FindPath(root, "a.b.2"), nullptr);
  EXPECT_EQ(FindPath(root, "a.b.0.c"), nullptr);
}

TEST(FindPathTest, WrongKindIsNull) {
  const auto root = json::parse(R"({"s": "text", "n": 5, "arr": [1, 2], "obj": {"0": "zero"}})");
  EXPECT_EQ(FindPath(root, "s.length"), nullptr);  // no keys in a string
  EXPECT_EQ(FindPath(root, "s.0"), nullptr);
  EXPECT_EQ(FindPath(root, "n.x"), nullptr);
  EXPECT_EQ(FindPath(root, "arr.first"), nullptr);  // an array takes only indices
  EXPECT_EQ(FindPath(root, "arr.-1"), nullptr);
  EXPECT_EQ(FindPath(root, "arr.1x"), nullptr);
  // An object key that looks like an index is still a key.
  const json::value* zero = FindPath(root, "obj.0");
  ASSERT_NE(zero, nullptr);
  EXPECT_EQ(*zero, json::value("zero"));
}

TEST(JsonKindNameTest, NamesEveryKind) {
  EXPECT_EQ(JsonKindName(json::value(nullptr)), "null");
  EXPECT_EQ(JsonKindName(json::value(true)), "boolean");
  EXPECT_EQ(JsonKindName(json::value(1)), "number");
  EXPECT_EQ(JsonKindName(json::value(1u)), "number");
  EXPECT_EQ(JsonKindName(json::value(1.5)), "number");
  EXPECT_EQ(JsonKindName(json::value("s")), "string");
  EXPECT_EQ(JsonKindName(json::value(json::array{})), "array");
  EXPECT_EQ(JsonKindName(json::value(json::object{})), "object");
}

}  // namespace
}  // namespace keel
