#include "keel/core/template.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "keel/testing/assert.h"

namespace keel {
namespace {

json::value Context() {
  return json::parse(R"({
    "input": {"ticket": "printer on fire", "count": 3, "ratio": 0.5, "ok": true,
              "nothing": null, "tags": ["a", "b"], "who": {"name": "Ada"}},
    "steps": {"plan": {"output": {"items": ["first", {"x": 1}], "n": 2},
                       "text": "the plan"}}
  })");
}

Result<json::value> Render(std::string_view tmpl_json) {
  return RenderTemplate(json::parse(tmpl_json), Context());
}

TEST(TemplateTest, WholeStringReferenceKeepsTheJsonType) {
  auto r = Render(R"({"n": "{{input.count}}", "r": "{{input.ratio}}", "b": "{{input.ok}}",
                      "z": "{{input.nothing}}", "arr": "{{input.tags}}",
                      "obj": "{{input.who}}", "s": "{{input.ticket}}"})");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::parse(R"({"n": 3, "r": 0.5, "b": true, "z": null, "arr": ["a", "b"],
                                "obj": {"name": "Ada"}, "s": "printer on fire"})"));
}

TEST(TemplateTest, SpacesInsideTheBracesAreIgnored) {
  auto r = Render(R"("{{  input.count }}")");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::value(3));
}

TEST(TemplateTest, ArrayIndicesInPaths) {
  auto r = Render(R"(["{{steps.plan.output.items.0}}", "{{steps.plan.output.items.1.x}}"])");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::parse(R"(["first", 1])"));
}

TEST(TemplateTest, EmbeddedReferencesAreInterpolated) {
  auto r = Render(
      R"j("Ticket: {{input.ticket}} ({{input.count}} times, {{input.ok}}, {{input.nothing}})")j");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::value("Ticket: printer on fire (3 times, true, null)"));
}

TEST(TemplateTest, EmbeddedNonStringValuesAreCompactJson) {
  auto r = Render(R"("tags={{input.tags}} who={{input.who}}")");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::value(R"(tags=["a","b"] who={"name":"Ada"})"));
}

TEST(TemplateTest, TwoAdjacentReferencesAreInterpolatedNotTyped) {
  auto r = Render(R"("{{input.count}}{{input.count}}")");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::value("33"));
}

TEST(TemplateTest, NestedObjectsAndArraysAreRenderedThroughout) {
  auto r = Render(R"({"a": {"b": ["{{input.who.name}}", {"c": "x{{steps.plan.output.n}}y"}]},
                      "keep": 7, "flag": false, "none": null, "plain": "no refs"})");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::parse(R"({"a": {"b": ["Ada", {"c": "x2y"}]},
                                "keep": 7, "flag": false, "none": null, "plain": "no refs"})"));
}

TEST(TemplateTest, NonStringTemplatesAreReturnedAsIs) {
  for (const char* t : {"1", "true", "null", "2.5", "[]", "{}"}) {
    auto r = Render(t);
    ASSERT_OK(r);
    EXPECT_EQ(*r, json::parse(t)) << t;
  }
}

TEST(TemplateTest, MissingReferenceIsAnErrorNamingIt) {
  for (const char* t : {R"("{{input.missing}}")", R"("x {{input.missing}} y")",
                        R"({"deep": ["{{input.missing}}"]})"}) {
    auto r = Render(t);
    ASSERT_FALSE(r.ok()) << t;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
    EXPECT_NE(r.error().message.find("input.missing"), std::string::npos) << r.error().message;
  }
}

TEST(TemplateTest, IndexPastTheEndAndWrongKindAreMissing) {
  auto past = Render(R"("{{input.tags.2}}")");
  ASSERT_FALSE(past.ok());
  EXPECT_NE(past.error().message.find("input.tags.2"), std::string::npos);
  // A key into a string, an index into an object.
  EXPECT_FALSE(Render(R"("{{input.ticket.length}}")").ok());
  EXPECT_FALSE(Render(R"("{{input.who.0}}")").ok());
}

TEST(TemplateTest, UnclosedBracesAreAnError) {
  auto r = Render(R"("hello {{input.ticket")");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_NE(r.error().message.find("{{"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("}}"), std::string::npos) << r.error().message;
}

TEST(TemplateTest, InvalidPathsAreErrors) {
  for (const char* t :
       {R"("{{}}")", R"("{{  }}")", R"("{{.input}}")", R"("{{input.}}")", R"("{{input..ticket}}")",
        R"("{{input ticket}}")", R"("{{input.$x}}")", R"("a {{input/ticket}} b")"}) {
    auto r = Render(t);
    ASSERT_FALSE(r.ok()) << t;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest) << t;
    EXPECT_NE(r.error().message.find("not a dotted path"), std::string::npos)
        << t << ": " << r.error().message;
  }
}

TEST(TemplateTest, ClosingBracesWithoutOpeningAreLiteral) {
  auto r = Render(R"("a }} b { c }")");
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::value("a }} b { c }"));
}

TEST(TemplateTest, RenderTemplateStringAlwaysGivesAString) {
  const auto ctx = Context();
  auto s = RenderTemplateString("{{input.ticket}}", ctx);
  ASSERT_OK(s);
  EXPECT_EQ(*s, "printer on fire");
  auto n = RenderTemplateString("{{input.count}}", ctx);
  ASSERT_OK(n);
  EXPECT_EQ(*n, "3");
  auto o = RenderTemplateString("{{input.who}}", ctx);
  ASSERT_OK(o);
  EXPECT_EQ(*o, R"({"name":"Ada"})");
  auto mixed = RenderTemplateString("Dear {{input.who.name}}, about {{steps.plan.text}}.", ctx);
  ASSERT_OK(mixed);
  EXPECT_EQ(*mixed, "Dear Ada, about the plan.");
  auto empty = RenderTemplateString("", ctx);
  ASSERT_OK(empty);
  EXPECT_EQ(*empty, "");
  auto missing = RenderTemplateString("{{steps.nope.output}}", ctx);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("steps.nope.output"), std::string::npos);
}

TEST(TemplateTest, ReferencesAreListedInOrder) {
  auto refs = TemplateReferences(json::parse(
      R"({"a": "{{input.x}} and {{ steps.one.output }}", "b": ["{{steps.two.output.0}}", 5],
          "c": {"d": "no refs", "e": "{{input}}"}})"));
  ASSERT_OK(refs);
  EXPECT_EQ(*refs, (std::vector<std::string>{"input.x", "steps.one.output", "steps.two.output.0",
                                             "input"}));
}

TEST(TemplateTest, ReferencesOfAPlainValueAreEmpty) {
  auto refs = TemplateReferences(json::parse(R"({"a": 1, "b": [true, null, "text"]})"));
  ASSERT_OK(refs);
  EXPECT_TRUE(refs->empty());
}

TEST(TemplateTest, ReferencesOfAMalformedTemplateAreAnError) {
  EXPECT_FALSE(TemplateReferences(json::value("{{input.x")).ok());
  EXPECT_FALSE(TemplateReferences(json::parse(R"({"a": ["{{}}"]})")).ok());
  EXPECT_FALSE(TemplateReferences(json::value("{{a..b}}")).ok());
}

// A context of bound names borrows its values: a map item sees its own "item" and
// "index" over the run's scope, and a bound name shadows the root's.
TEST(TemplateContextTest, BoundNamesShadowTheRootAndAreBorrowed) {
  const json::value root = Context();
  json::value item = json::object{{"id", 7}};
  json::value index = 3;
  TemplateContext ctx(root);
  ctx.Bind("item", item).Bind("index", index);
  auto r = RenderTemplate(json::parse(R"({"a": "{{item.id}}", "b": "{{index}}", "c": "{{input.who.name}}"})"), ctx);
  ASSERT_OK(r);
  EXPECT_EQ(*r, json::parse(R"({"a": 7, "b": 3, "c": "Ada"})"));
  // Borrowed: a change to the bound value is seen, and rebinding replaces.
  item.as_object()["id"] = 8;
  EXPECT_EQ(*RenderTemplate(json::value("{{item.id}}"), ctx), json::value(8));
  const json::value other = "other input";
  ctx.Bind("input", other);
  EXPECT_EQ(*RenderTemplate(json::value("{{input}}"), ctx), json::value("other input"));
  EXPECT_FALSE(RenderTemplate(json::value("{{input.who.name}}"), ctx).ok());  // shadowed
  EXPECT_EQ(*RenderTemplate(json::value("{{steps.plan.text}}"), ctx), json::value("the plan"));
  // Without a root, only bound names resolve.
  TemplateContext bare;
  bare.Bind("item", item);
  EXPECT_EQ(*RenderTemplate(json::value("x{{item.id}}"), bare), json::value("x8"));
  EXPECT_FALSE(RenderTemplate(json::value("{{steps.plan}}"), bare).ok());
}

TEST(TemplateContextTest, FindReferencedBorrowsAWholeStringReferenceOnly) {
  const json::value root = Context();
  const json::value* tags = FindReferenced(json::value("{{ input.tags }}"), root);
  ASSERT_NE(tags, nullptr);
  EXPECT_EQ(tags, root.at("input").as_object().if_contains("tags"));  // the value itself, not a copy
  EXPECT_EQ(FindReferenced(json::value("tags: {{input.tags}}"), root), nullptr);
  EXPECT_EQ(FindReferenced(json::value("{{input.tags}}{{input.ok}}"), root), nullptr);
  EXPECT_EQ(FindReferenced(json::value("{{input.missing}}"), root), nullptr);
  EXPECT_EQ(FindReferenced(json::value("{{input.tags"), root), nullptr);
  EXPECT_EQ(FindReferenced(json::parse(R"(["{{input.tags}}"])"), root), nullptr);
}

TEST(TemplateEscapeTest, EveryInterpolatedValueGoesThroughTheEscapeButRawOnes) {
  const json::value ctx = json::parse(R"({"input": {"q": "a&b", "n": 3, "p": "x/y"}})");
  std::vector<std::size_t> offsets;
  const TemplateEscape upper = [&](std::string_view v, std::size_t at) -> Result<std::string> {
    offsets.push_back(at);
    return "<" + std::string(v) + ">";
  };
  auto r = RenderTemplateString("/s/{{input.p}}?q={{ input.q }}&n={{input.n}}&raw={{{input.p}}}",
                                ctx, upper);
  ASSERT_OK(r);
  EXPECT_EQ(*r, "/s/<x/y>?q=<a&b>&n=<3>&raw=x/y");
  EXPECT_EQ(offsets, (std::vector<std::size_t>{3, 17, 33}));
  // A lone reference is still a string here.
  auto one = RenderTemplateString("{{input.n}}", ctx, upper);
  ASSERT_OK(one);
  EXPECT_EQ(*one, "<3>");
  // Without an escape, {{{ref}}} is the same reference as {{ref}}.
  auto plain = RenderTemplate(json::value("{{{input.n}}}"), ctx);
  ASSERT_OK(plain);
  EXPECT_EQ(*plain, json::value(3));
}

TEST(TemplateEscapeTest, AnEscapesRefusalNamesTheReference) {
  const json::value ctx = json::parse(R"({"input": {"h": "a/b"}})");
  const TemplateEscape refuse = [](std::string_view, std::size_t) -> Result<std::string> {
    return Error(ErrorCode::kInvalidRequest, "no slashes here");
  };
  auto r = RenderTemplateString("http://{{input.h}}/x", ctx, refuse);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("{{input.h}}: no slashes here"), std::string::npos)
      << r.error().message;
  EXPECT_FALSE(RenderTemplateString("{{{input.h}}", ctx, refuse).ok());
}

}  // namespace
}  // namespace keel
