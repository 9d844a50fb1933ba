#include "keel/core/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>

#include "keel/testing/assert.h"

namespace keel {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;

// An environment with a fixed set of variables.
EnvLookup Env(std::map<std::string, std::string> vars = {}) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

// Parses `yaml` and expects a failure whose message holds every one of `parts`.
void ExpectConfigError(std::string_view yaml, std::initializer_list<std::string_view> parts,
                       const EnvLookup& env = Env()) {
  auto r = ParseConfig(yaml, env);
  ASSERT_FALSE(r.ok()) << "parsed unexpectedly:\n" << yaml;
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  for (const auto part : parts) {
    EXPECT_THAT(r.error().message, HasSubstr(std::string(part))) << yaml;
  }
}

// A provider and a route, for pipelines with llm steps. 5 lines.
constexpr std::string_view kProviders = R"(providers:
  mock: {type: mock}
routes:
  default:
    targets: [{provider: mock}]
)";

std::string WithProviders(std::string_view rest) {
  return std::string(kProviders) + std::string(rest);
}

void ExpectDefaultRetry(const RetryConfig& r) {
  EXPECT_EQ(r.max_attempts, 3);
  EXPECT_EQ(r.backoff.initial, milliseconds(1000));
  EXPECT_EQ(r.backoff.multiplier, 2.0);
  EXPECT_EQ(r.backoff.max, milliseconds(30000));
  EXPECT_EQ(r.backoff.jitter, JitterMode::kProportional);
  EXPECT_EQ(r.backoff.jitter_fraction, 0.2);
}

TEST(ConfigTest, EmptyDocumentGivesDefaults) {
  for (std::string_view yaml : {"", "# only a comment\n", "~"}) {
    auto c = ParseConfig(yaml, Env());
    ASSERT_OK(c);
    EXPECT_EQ(c->listen, "127.0.0.1:7420");
    EXPECT_EQ(c->storage, "sqlite://keel-data/keel.db");
    EXPECT_EQ(c->log_level, "info");
    EXPECT_EQ(c->server.max_body_bytes, 1u << 20);
    EXPECT_EQ(c->server.max_connections, 1024);
    EXPECT_EQ(c->server.handler_threads, 64);
    EXPECT_EQ(c->server.idle_timeout, milliseconds(60000));
    EXPECT_EQ(c->engine.workers, 64);
    EXPECT_EQ(c->engine.lease_timeout, milliseconds(30000));
    EXPECT_EQ(c->engine.heartbeat_interval, milliseconds(10000));
    EXPECT_EQ(c->engine.poll_interval, milliseconds(200));
    EXPECT_EQ(c->engine.max_queue_depth, 100000);
    EXPECT_TRUE(c->providers.empty());
    EXPECT_TRUE(c->routes.empty());
    EXPECT_TRUE(c->pipelines.empty());
  }
}

TEST(ConfigTest, ExplicitValuesAreRead) {
  auto c = ParseConfig(R"(listen: 0.0.0.0:8080
storage: sqlite:///var/lib/keel.db
log_level: debug
server: {max_body_bytes: 64KiB, max_connections: 10, handler_threads: 4, io_threads: 3, idle_timeout: 5s}
engine: {workers: 0, lease_timeout: 10s, heartbeat_interval: 2s, poll_interval: 50ms,
         max_queue_depth: 7}
)",
                       Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->listen, "0.0.0.0:8080");
  EXPECT_EQ(c->storage, "sqlite:///var/lib/keel.db");
  EXPECT_EQ(c->log_level, "debug");
  EXPECT_EQ(c->server.max_body_bytes, 64u * 1024);
  EXPECT_EQ(c->server.max_connections, 10);
  EXPECT_EQ(c->server.handler_threads, 4);
  EXPECT_EQ(c->server.io_threads, 3);
  EXPECT_EQ(c->server.idle_timeout, milliseconds(5000));
  EXPECT_EQ(c->engine.workers, 0);
  EXPECT_EQ(c->engine.lease_timeout, milliseconds(10000));
  EXPECT_EQ(c->engine.heartbeat_interval, milliseconds(2000));
  EXPECT_EQ(c->engine.poll_interval, milliseconds(50));
  EXPECT_EQ(c->engine.max_queue_depth, 7);
}

TEST(ConfigTest, HeartbeatDefaultsToAThirdOfTheLease) {
  auto c = ParseConfig("engine:\n  lease_timeout: 9s\n", Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->engine.lease_timeout, milliseconds(9000));
  EXPECT_EQ(c->engine.heartbeat_interval, milliseconds(3000));

  auto other = ParseConfig("engine: {workers: 4}\n", Env());
  ASSERT_OK(other);
  EXPECT_EQ(other->engine.heartbeat_interval, milliseconds(10000));
}

TEST(ConfigTest, HeartbeatMustBeShorterThanTheLease) {
  ExpectConfigError("engine:\n  lease_timeout: 5s\n  heartbeat_interval: 5s\n",
                    {"line 2", "heartbeat_interval"});
  ExpectConfigError("engine:\n  lease_timeout: 500ms\n", {"line 2", "at least 1s"});
}

TEST(ConfigTest, RetryDefaultsApplyToEverySteps) {
  auto c = ParseConfig(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: 1}
)"),
                       Env());
  ASSERT_OK(c);
  const auto& p = c->pipelines.at("p");
  ASSERT_EQ(p.steps.size(), 1u);
  ExpectDefaultRetry(p.steps[0].retry);
  EXPECT_EQ(p.steps[0].timeout, milliseconds(60000));
  EXPECT_EQ(p.steps[0].kind, StepKind::kTransform);
}

TEST(ConfigTest, StepRetryOverridesThePipelines) {
  auto c = ParseConfig(WithProviders(R"(pipelines:
  p:
    retry: {max_attempts: 4, initial_backoff: 100ms, multiplier: 3, max_backoff: 2s, jitter: 0}
    steps:
      - id: a
        transform: {x: 1}
      - id: b
        transform: {x: 2}
        retry: {max_attempts: 9}
        timeout: 1500ms
)"),
                       Env());
  ASSERT_OK(c);
  const auto& steps = c->pipelines.at("p").steps;
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].retry.max_attempts, 4);
  EXPECT_EQ(steps[0].retry.backoff.initial, milliseconds(100));
  EXPECT_EQ(steps[0].retry.backoff.multiplier, 3.0);
  EXPECT_EQ(steps[0].retry.backoff.max, milliseconds(2000));
  EXPECT_EQ(steps[0].retry.backoff.jitter, JitterMode::kNone);
  // Only max_attempts is overridden; the rest comes from the pipeline.
  EXPECT_EQ(steps[1].retry.max_attempts, 9);
  EXPECT_EQ(steps[1].retry.backoff.initial, milliseconds(100));
  EXPECT_EQ(steps[1].retry.backoff.max, milliseconds(2000));
  EXPECT_EQ(steps[1].timeout, milliseconds(1500));
}

TEST(ConfigTest, RetryBackoffMaxMustNotBeShorterThanInitial) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    retry: {initial_backoff: 5s, max_backoff: 1s}
    steps:
      - id: a
        transform: {x: 1}
)"),
                    {"line 8", "max_backoff"});
}

TEST(ConfigTest, EnvironmentVariablesAreInterpolated) {
  auto c = ParseConfig(R"(listen: ${HOST}:${PORT}
engine: {workers: "${WORKERS}"}
providers:
  up:
    type: openai
    base_url: http://${HOST}:9000/v1/
    api_key: ${API_KEY}
    headers: {x-tenant: "t-${TENANT}"}
)",
                       Env({{"HOST", "10.0.0.1"},
                            {"PORT", "7000"},
                            {"WORKERS", "5"},
                            {"API_KEY", "sk-secret"},
                            {"TENANT", "acme"}}));
  ASSERT_OK(c);
  EXPECT_EQ(c->listen, "10.0.0.1:7000");
  EXPECT_EQ(c->engine.workers, 5);
  const auto& up = c->providers.at("up");
  EXPECT_EQ(up.base_url, "http://10.0.0.1:9000/v1");  // trailing slash dropped
  EXPECT_EQ(up.api_key, "sk-secret");
  EXPECT_EQ(up.headers.at("x-tenant"), "t-acme");
  EXPECT_EQ(up.model, "up");  // defaults to the provider's name
  EXPECT_EQ(up.context_window, 128000);
  EXPECT_EQ(up.timeout.connect, milliseconds(2000));
  EXPECT_EQ(up.timeout.total, milliseconds(60000));
}

TEST(ConfigTest, UnsetEnvironmentVariableIsAnErrorNamingTheLine) {
  ExpectConfigError(R"(listen: 127.0.0.1:1
providers:
  up:
    type: openai
    base_url: https://api.example.com/v1
    api_key: ${OPENAI_API_KEY}
)",
                    {"keel.yaml: line 6", "OPENAI_API_KEY", "not set"}, Env({{"OTHER", "x"}}));
  // No lookup at all: every variable is unset.
  auto r = ParseConfig("listen: ${LISTEN}\n", EnvLookup());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("line 1"));
  EXPECT_THAT(r.error().message, HasSubstr("LISTEN"));
}

TEST(ConfigTest, UnclosedInterpolationIsAnError) {
  ExpectConfigError("log_level: info\nlisten: ${HOST\n", {"line 2", "${"}, Env({{"HOST", "h"}}));
}

TEST(ConfigTest, SourceNamesTheFileInMessages) {
  auto r = ParseConfig("bogus: 1\n", Env(), "/etc/keel/prod.yaml");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, ::testing::StartsWith("/etc/keel/prod.yaml: line 1: "));
}

TEST(ConfigTest, UnknownKeysAreRefusedWithTheirLine) {
  ExpectConfigError("listen: 127.0.0.1:1\nlisen: 127.0.0.1:2\n",
                    {"line 2", "unknown key \"lisen\"", "the top level", "listen"});
  ExpectConfigError("engine:\n  workers: 2\n  wrokers: 3\n", {"line 3", "\"wrokers\"", "engine"});
  ExpectConfigError("server:\n  max_body: 1KiB\n", {"line 2", "\"max_body\"", "server"});
  ExpectConfigError(R"(providers:
  mock:
    type: mock
    temperature: 1
)",
                    {"line 4", "\"temperature\"", "provider \"mock\""});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: 1}
        retries: 3
)"),
                    {"line 11", "\"retries\""});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        llm:
          route: default
          prompt: hi
          messages: [{role: user, content: hi}]
)"),
                    {"line 12", "\"prompt\""});
}

TEST(ConfigTest, WrongTypesAreRefused) {
  ExpectConfigError("engine:\n  workers: many\n", {"line 2", "engine.workers", "whole number"});
  ExpectConfigError("engine:\n  workers: 2.5\n", {"line 2", "whole number"});
  ExpectConfigError("engine:\n  workers: [1]\n", {"line 2", "whole number"});
  ExpectConfigError("listen: [a, b]\n", {"line 1", "listen must be a string"});
  ExpectConfigError("engine: 5\n", {"line 1", "engine must be a mapping"});
  ExpectConfigError("engine:\n  lease_timeout: 30\n", {"line 2", "not a duration"});
  ExpectConfigError("server:\n  max_body_bytes: lots\n", {"line 2", "not a size"});
  ExpectConfigError("providers: [mock]\n", {"line 1", "providers must be a mapping"});
  ExpectConfigError("log_level: loud\n", {"line 1", "log_level"});
  ExpectConfigError("storage: mysql://db/keel\n",
                    {"line 1", "storage must be sqlite://PATH or postgres://"});
  ExpectConfigError("storage: sqlite://\n", {"line 1", "storage"});
}

TEST(ConfigTest, PostgresStorageAndItsPool) {
  auto c = ParseConfig(R"(storage: postgres://keel:${PGPASS}@db.internal:5433/keel?sslmode=require
postgres: {pool_size: 32, connect_timeout: 3s, pool_timeout: 250ms, statement_timeout: 0s}
engine: {drain_timeout: 10s}
)",
                       Env({{"PGPASS", "s3cret"}}));
  ASSERT_OK(c);
  EXPECT_EQ(c->storage, "postgres://keel:s3cret@db.internal:5433/keel?sslmode=require");
  EXPECT_EQ(c->postgres.pool_size, 32);
  EXPECT_EQ(c->postgres.connect_timeout, milliseconds(3000));
  EXPECT_EQ(c->postgres.pool_timeout, milliseconds(250));
  EXPECT_EQ(c->postgres.statement_timeout, milliseconds(0));
  EXPECT_EQ(c->engine.drain_timeout, milliseconds(10000));
  ASSERT_OK(ParseConfig("storage: postgresql://keel@127.0.0.1/keel\n", Env()));
}

TEST(ConfigTest, PostgresDefaults) {
  auto c = ParseConfig("storage: postgres://keel@127.0.0.1/keel\n", Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->postgres.pool_size, 16);
  EXPECT_EQ(c->postgres.connect_timeout, milliseconds(5000));
  EXPECT_EQ(c->postgres.pool_timeout, milliseconds(5000));
  EXPECT_EQ(c->postgres.statement_timeout, milliseconds(30000));
  EXPECT_EQ(c->engine.drain_timeout, milliseconds(30000));
}

TEST(ConfigTest, BadPostgresSettingsAreRefusedWithoutShowingThePassword) {
  ExpectConfigError("storage: postgres://\n", {"line 1", "not a PostgreSQL URL"});
  ExpectConfigError("storage: postgres://keel:pw@/keel\n", {"line 1", "not a PostgreSQL URL"});
  ExpectConfigError("storage: postgres://keel@host\n",
                    {"line 1", "not a PostgreSQL URL", "/DATABASE"});
  auto r = ParseConfig("storage: postgres://keel:hunter2@\n", Env());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message.find("hunter2"), std::string::npos) << r.error().message;
  ExpectConfigError("postgres: {pool_size: 0}\n",
                    {"line 1", "postgres.pool_size", "between 1 and 1000"});
  ExpectConfigError("postgres: {connect_timeout: 10ms}\n", {"line 1", "postgres.connect_timeout"});
  ExpectConfigError("postgres: {pool: 3}\n", {"line 1", "pool"});
  ExpectConfigError("engine: {drain_timeout: soon}\n", {"line 1", "not a duration"});
}

TEST(ConfigTest, RedactUrlHidesPasswords) {
  EXPECT_EQ(RedactUrl("postgres://keel:s3cret@db:5432/keel"), "postgres://keel:***@db:5432/keel");
  EXPECT_EQ(RedactUrl("postgres://keel@db/keel"), "postgres://keel@db/keel");
  EXPECT_EQ(RedactUrl("postgres://db/keel?user=k&password=s3cret&sslmode=require"),
            "postgres://db/keel?user=k&password=***&sslmode=require");
  EXPECT_EQ(RedactUrl("redis://:pw@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
  EXPECT_EQ(RedactUrl("sqlite://keel-data/keel.db"), "sqlite://keel-data/keel.db");
  EXPECT_EQ(RedactUrl("postgres://a:b@c@host/db"), "postgres://a:***@host/db");
}

TEST(ConfigTest, OutOfRangeValuesAreRefused) {
  ExpectConfigError("engine:\n  workers: 100001\n", {"line 2", "between 0 and 100000"});
  ExpectConfigError("engine:\n  workers: -1\n", {"line 2", "between 0 and 100000"});
  ExpectConfigError("server:\n  max_connections: 0\n", {"line 2", "max_connections"});
  ExpectConfigError("server:\n  max_body_bytes: 100\n", {"line 2", "1KiB and 64MiB"});
  ExpectConfigError("server:\n  max_body_bytes: 65MiB\n", {"line 2", "1KiB and 64MiB"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    retry: {max_attempts: 0}
    steps: [{id: a, transform: {x: 1}}]
)"),
                    {"line 8", "max_attempts", "between 1 and 100"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    retry: {jitter: 1.5}
    steps: [{id: a, transform: {x: 1}}]
)"),
                    {"line 8", "jitter"});
  ExpectConfigError("providers:\n  m: {type: mock, context_window: 0}\n",
                    {"line 2", "context_window"});
}

TEST(ConfigTest, BoundaryValuesAreAccepted) {
  auto c = ParseConfig(
      "server: {max_body_bytes: 1KiB, max_connections: 65536}\nengine: {workers: 100000, "
      "lease_timeout: 1s}\n",
      Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->server.max_body_bytes, 1024u);
  EXPECT_EQ(c->server.max_connections, 65536);
  EXPECT_EQ(c->engine.workers, 100000);
  EXPECT_EQ(c->engine.heartbeat_interval, milliseconds(333));
}

TEST(ConfigTest, ProvidersAreValidated) {
  ExpectConfigError("providers:\n  x: {model: m}\n", {"line 2", "needs a type"});
  ExpectConfigError("providers:\n  x: {type: gemini}\n", {"line 2", "openai, anthropic or mock"});
  ExpectConfigError("providers:\n  x:\n    type: openai\n", {"line 3", "base_url"});
  ExpectConfigError("providers:\n  x:\n    type: openai\n    base_url: ftp://h\n",
                    {"line 4", "base_url"});
}

TEST(ConfigTest, DuplicateStepIdsAreRefused) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: 1}
      - id: a
        transform: {x: 2}
)"),
                    {"line 11", "\"a\"", "used twice", "pipeline \"p\""});
}

TEST(ConfigTest, StepIdsAreValidated) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: "has space"
        transform: {x: 1}
)"),
                    {"line 9", "has space"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - transform: {x: 1}
)"),
                    {"line 9", "needs an id"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: 1}
        llm: {route: default, messages: [{role: user, content: hi}]}
)"),
                    {"line 9", "exactly one kind"});
  ExpectConfigError(WithProviders("pipelines:\n  p:\n    steps: []\n"), {"line 8", "steps"});
}

TEST(ConfigTest, ReferenceToALaterStepIsRefused) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: first
        transform: {x: "{{steps.second.output}}"}
      - id: second
        transform: {y: 1}
)"),
                    {"line 9", "\"first\"", "steps.second.output", "cannot have run before it"});
}

TEST(ConfigTest, ReferenceToAnUnknownStepIsRefused) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: first
        transform: {x: 1}
      - id: second
        transform: {y: "{{steps.ghost.output}}"}
)"),
                    {"line 11", "ghost", "has no step \"ghost\""});
}

TEST(ConfigTest, ReferenceToItselfIsRefused) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: first
        transform: {x: 1}
      - id: loop
        llm:
          route: default
          messages:
            - {role: user, content: "again: {{steps.loop.text}}"}
)"),
                    {"line 11", "\"loop\"", "its own result"});
}

TEST(ConfigTest, ReferenceOutsideInputAndStepsIsRefused) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: "{{env.HOME}}"}
)"),
                    {"line 9", "env.HOME"});
}

TEST(ConfigTest, MalformedTemplateIsRefusedWithTheStepLine) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: "{{input.name"}
)"),
                    {"line 9", "step \"a\"", "}}"});
}

TEST(ConfigTest, ReferencesToInputAndEarlierStepsAreAccepted) {
  auto c = ParseConfig(WithProviders(R"(pipelines:
  p:
    steps:
      - id: a
        transform: {x: "{{input.name}}", all: "{{input}}"}
      - id: b
        transform: {y: "{{steps.a.output.x}}", n: 2, s: "2", t: true, z: null}
)"),
                       Env());
  ASSERT_OK(c);
  const auto& steps = c->pipelines.at("p").steps;
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].line, 9);
  EXPECT_EQ(steps[1].line, 11);
  // Plain scalars take their JSON type; quoted ones stay strings.
  EXPECT_EQ(steps[1].spec, json::parse(R"({"y": "{{steps.a.output.x}}", "n": 2, "s": "2",
                                            "t": true, "z": null})"));
}

TEST(ConfigTest, LlmStepWithUnknownRouteIsRefused) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          route: nowhere
          messages: [{role: user, content: hi}]
)"),
                    {"line 9", "\"ask\"", "\"nowhere\"", "not defined"});
}

TEST(ConfigTest, LlmStepMayNameAProviderAsItsRoute) {
  auto c = ParseConfig(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          route: mock
          temperature: 0.5
          messages: [{role: system, content: be brief}, {role: user, content: hi}]
)"),
                       Env());
  ASSERT_OK(c);
  const auto& step = c->pipelines.at("p").steps.at(0);
  EXPECT_EQ(step.kind, StepKind::kLlm);
  EXPECT_EQ(step.spec.at("route"), json::value("mock"));
  EXPECT_EQ(step.spec.at("temperature"), json::value(0.5));
  EXPECT_EQ(step.spec.at("messages").as_array().size(), 2u);
}

TEST(ConfigTest, LlmStepMessagesAreValidated) {
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          route: default
          messages: [{role: robot, content: hi}]
)"),
                    {"line 12", "robot"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          messages: [{role: user, content: hi}]
)"),
                    {"line 11", "needs a route"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          route: default
)"),
                    {"line 11", "messages"});
}

TEST(ConfigTest, LlmRouteIsAlwaysAName) {
  // A route that reads as a number is still a name, and a wrong-kind route is an error
  // with its line (not an exception text from the JSON library).
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          route: 5
          messages: [{role: user, content: hi}]
)"),
                    {"line 9", "\"5\"", "not defined"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps:
      - id: ask
        llm:
          route: [mock]
          messages: [{role: user, content: hi}]
)"),
                    {"line 11", "route must be a string"});
  auto c = ParseConfig(R"(providers:
  "7": {type: mock}
pipelines:
  p:
    steps:
      - id: ask
        llm: {route: 7, messages: [{role: user, content: hi}]}
)",
                       Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->pipelines.at("p").steps[0].spec.at("route"), json::value("7"));
}

TEST(ConfigTest, RepeatedKeysAreRefused) {
  // yaml-cpp would keep the first and silently drop the second.
  ExpectConfigError("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n",
                    {"line 2", "\"listen\"", "twice"});
  ExpectConfigError("engine:\n  workers: 1\n  workers: 2\n", {"line 3", "\"workers\"", "twice"});
  ExpectConfigError("providers:\n  m: {type: mock}\n  m: {type: mock}\n",
                    {"line 3", "\"m\"", "twice", "providers"});
  ExpectConfigError(WithProviders(R"(pipelines:
  p:
    steps: [{id: a, transform: {x: 1}}]
  p:
    steps: [{id: b, transform: {x: 1}}]
)"),
                    {"line 9", "\"p\"", "twice", "pipelines"});
}

TEST(ConfigTest, RouteNamingAnUnknownProviderIsRefused) {
  ExpectConfigError(R"(providers:
  mock: {type: mock}
routes:
  main:
    targets:
      - provider: mock
      - provider: missing
)",
                    {"line 7", "route \"main\"", "\"missing\"", "not defined under providers"});
}

TEST(ConfigTest, RoutesAreValidated) {
  ExpectConfigError("providers:\n  m: {type: mock}\nroutes:\n  r: {targets: []}\n",
                    {"line 4", "targets"});
  ExpectConfigError(
      "providers:\n  m: {type: mock}\nroutes:\n  r:\n    strategy: random\n    targets: "
      "[{provider: m}]\n",
      {"line 5", "round_robin, weighted, latency, priority or least_busy"});
  auto c = ParseConfig(std::string(kProviders), Env());
  ASSERT_OK(c);
  const auto& route = c->routes.at("default");
  EXPECT_EQ(route.strategy, "priority");
  ASSERT_EQ(route.targets.size(), 1u);
  EXPECT_EQ(route.targets[0].provider, "mock");
  EXPECT_EQ(route.targets[0].weight, 1);
  EXPECT_EQ(route.targets[0].tier, 1);
  EXPECT_EQ(route.retry.max_attempts, 3);
  EXPECT_EQ(route.max_failover, 3);
  EXPECT_EQ(route.circuit_breaker.min_requests, 20);
  EXPECT_DOUBLE_EQ(route.retry_budget.ratio, 0.2);
  EXPECT_EQ(route.line, 5);
}

TEST(ConfigTest, YamlSyntaxErrorNamesTheLine) {
  auto r = ParseConfig("listen: 127.0.0.1:1\nengine: {workers: 3\nstorage: x\n", Env());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidRequest);
  EXPECT_THAT(r.error().message, ::testing::ContainsRegex("line [0-9]+"));
}

TEST(ConfigTest, ExampleFileParses) {
  std::ifstream in(KEEL_SOURCE_DIR "/examples/keel.yaml");
  ASSERT_TRUE(in) << "cannot open " KEEL_SOURCE_DIR "/examples/keel.yaml";
  std::stringstream text;
  text << in.rdbuf();
  auto c = ParseConfig(text.str(), Env(), "examples/keel.yaml");
  ASSERT_OK(c);
  EXPECT_EQ(c->listen, "127.0.0.1:7420");
  EXPECT_EQ(c->storage, "sqlite://keel-data/keel.db");
  ASSERT_EQ(c->providers.size(), 1u);
  EXPECT_EQ(c->providers.at("mock").type, "mock");
  EXPECT_EQ(c->providers.at("mock").model, "mock-1");
  ASSERT_EQ(c->routes.count("default"), 1u);
  ASSERT_EQ(c->routes.at("default").targets.size(), 1u);
  EXPECT_EQ(c->routes.at("default").targets[0].provider, "mock");

  ASSERT_EQ(c->pipelines.size(), 4u);
  ASSERT_EQ(c->pipelines.count("review"), 1u);
  EXPECT_EQ(c->pipelines.at("review").steps[1].kind, StepKind::kMap);
  EXPECT_FALSE(c->pipelines.at("review").input_schema.is_null());
  ASSERT_EQ(c->pipelines.count("summarize"), 1u);
  ASSERT_EQ(c->pipelines.count("triage"), 1u);
  ASSERT_EQ(c->pipelines.count("echo"), 1u);

  const auto& summarize = c->pipelines.at("summarize");
  ASSERT_EQ(summarize.steps.size(), 3u);
  EXPECT_EQ(summarize.steps[0].id, "outline");
  EXPECT_EQ(summarize.steps[0].kind, StepKind::kLlm);
  EXPECT_EQ(summarize.steps[2].kind, StepKind::kTransform);
  EXPECT_EQ(summarize.steps[1].retry.backoff.initial, milliseconds(500));
  EXPECT_EQ(summarize.steps[1].retry.backoff.max, milliseconds(10000));
  EXPECT_EQ(summarize.steps[1].retry.backoff.jitter_fraction, 0.2);

  const auto& triage = c->pipelines.at("triage");
  ASSERT_EQ(triage.steps.size(), 3u);
  EXPECT_EQ(triage.steps[0].retry.max_attempts, 3);
  EXPECT_EQ(triage.steps[1].id, "draft");
  EXPECT_EQ(triage.steps[1].retry.max_attempts, 5);
  EXPECT_EQ(triage.steps[1].timeout, milliseconds(30000));

  const auto& echo = c->pipelines.at("echo");
  ASSERT_EQ(echo.steps.size(), 1u);
  EXPECT_EQ(echo.steps[0].spec, json::parse(R"({"echo": "{{input}}"})"));
}

TEST(ParseDurationTest, GoodInputs) {
  const std::pair<std::string_view, int64_t> cases[] = {
      {"250ms", 250},   {"0ms", 0},     {"2s", 2000},
      {"1.5s", 1500},   {"5m", 300000}, {"1h", 3600000},
      {"1d", 86400000}, {"0.25s", 250}, {"365d", 365LL * 86400000},
  };
  for (const auto& [text, ms] : cases) {
    auto d = ParseDuration(text);
    ASSERT_OK(d);
    EXPECT_EQ(d->count(), ms) << text;
  }
}

TEST(ParseDurationTest, BadInputs) {
  for (std::string_view text : {"", "s", "10", "-1s", "1x", "1 s", " 1s", "2S", "1.2.3s", "1sec",
                                "ms", "366d", "1e3ms", ".s"}) {
    auto d = ParseDuration(text);
    ASSERT_FALSE(d.ok()) << "\"" << text << "\" parsed as " << d->count();
    EXPECT_EQ(d.error().code, ErrorCode::kInvalidRequest);
    EXPECT_THAT(d.error().message, HasSubstr("\"" + std::string(text) + "\""));
  }
}

TEST(ParseByteSizeTest, GoodInputs) {
  const std::pair<std::string_view, std::size_t> cases[] = {
      {"1048576", 1048576}, {"0", 0},          {"10B", 10},
      {"64KiB", 65536},     {"1MiB", 1048576}, {"64MiB", 64u << 20},
  };
  for (const auto& [text, bytes] : cases) {
    auto n = ParseByteSize(text);
    ASSERT_OK(n);
    EXPECT_EQ(*n, bytes) << text;
  }
}

TEST(ParseByteSizeTest, BadInputs) {
  for (std::string_view text : {"", "KiB", "1GiB", "1.5MiB", "-1", "1 MiB", "1kb", "1KB", "1mib",
                                "99999999999999999999999", "0x10"}) {
    auto n = ParseByteSize(text);
    ASSERT_FALSE(n.ok()) << "\"" << text << "\" parsed as " << *n;
    EXPECT_EQ(n.error().code, ErrorCode::kInvalidRequest);
    EXPECT_THAT(n.error().message, HasSubstr("not a size"));
  }
}

}  // namespace
}  // namespace keel

namespace keel {
namespace {

TEST(ConfigTest, RouteResilienceOptionsAreRead) {
  auto c = ParseConfig(R"(providers:
  a: {type: mock, limits: {rpm: 600, tpm: 100000, max_concurrency: 8}, cost: {input_per_mtok: 0.15, output_per_mtok: 0.6},
      health_check: {interval: 5s}, timeout: {connect: 1s, first_byte: 3s, idle: 4s}}
  b: {type: mock}
routes:
  r:
    strategy: weighted
    targets: [{provider: a, weight: 90}, {provider: b, weight: 10, tier: 2}]
    retry: {max_attempts: 4, initial_backoff: 50ms}
    retry_budget: {ratio: 0.1, min_per_second: 1}
    circuit_breaker: {failure_rate: 0.25, min_requests: 4, window: 10s, consecutive_failures: 0, open_for: 2s}
    max_failover: 2
    timeout: 30s
)",
                       [](const std::string&) { return std::nullopt; });
  ASSERT_TRUE(c.ok()) << c.error().message;
  const auto& a = c->providers.at("a");
  EXPECT_EQ(a.limits.rpm, 600);
  EXPECT_EQ(a.limits.tpm, 100000);
  EXPECT_EQ(a.limits.max_concurrency, 8);
  EXPECT_DOUBLE_EQ(a.cost.output_per_mtok, 0.6);
  EXPECT_EQ(a.health_check_interval, Duration(5000));
  EXPECT_EQ(a.timeout.first_byte, Duration(3000));
  EXPECT_EQ(a.timeout.idle, Duration(4000));
  EXPECT_EQ(c->providers.at("b").health_check_interval, Duration(0));
  EXPECT_EQ(c->providers.at("b").timeout.first_byte, Duration(20000));
  const auto& r = c->routes.at("r");
  EXPECT_EQ(r.strategy, "weighted");
  EXPECT_EQ(r.targets[0].weight, 90);
  EXPECT_EQ(r.targets[1].tier, 2);
  EXPECT_EQ(r.retry.max_attempts, 4);
  EXPECT_EQ(r.retry.backoff.initial, Duration(50));
  EXPECT_DOUBLE_EQ(r.retry_budget.ratio, 0.1);
  EXPECT_DOUBLE_EQ(r.circuit_breaker.failure_rate, 0.25);
  EXPECT_EQ(r.circuit_breaker.min_requests, 4);
  EXPECT_EQ(r.circuit_breaker.consecutive_failures, 0);
  EXPECT_EQ(r.circuit_breaker.open_for, Duration(2000));
  EXPECT_EQ(r.max_failover, 2);
  EXPECT_EQ(r.timeout, Duration(30000));
}

TEST(ConfigTest, FirstTokenSameTargetRulesAndGuessedWindowsAreRead) {
  auto c = ParseConfig(R"(providers:
  a: {type: mock, context_window: 32000, timeout: {first_token: 15s}}
  b: {type: mock}
routes:
  plain: {targets: [{provider: a}]}
  tuned:
    targets: [{provider: a}, {provider: b}]
    retry: {max_attempts: 4, same_target_retry_after_max: 2s, same_target_on_5xx: 0}
)",
                       Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->providers.at("a").timeout.first_token, milliseconds(15000));
  EXPECT_EQ(c->providers.at("b").timeout.first_token, milliseconds(0)) << "default: off";
  EXPECT_TRUE(c->providers.at("a").context_window_set);
  EXPECT_FALSE(c->providers.at("b").context_window_set);
  EXPECT_EQ(c->providers.at("b").context_window, 128000);
  const auto& plain = c->routes.at("plain");
  EXPECT_EQ(plain.same_target_retry_after_max, milliseconds(5000));
  EXPECT_EQ(plain.same_target_on_5xx, 1);
  const auto& tuned = c->routes.at("tuned");
  EXPECT_EQ(tuned.retry.max_attempts, 4);
  EXPECT_EQ(tuned.same_target_retry_after_max, milliseconds(2000));
  EXPECT_EQ(tuned.same_target_on_5xx, 0);

  const std::string head =
      "providers:\n  a: {type: mock}\nroutes:\n  r:\n    targets: [{provider: a}]\n";
  ExpectConfigError(head + "    retry: {same_target_on_5xx: 11}\n",
                    {"line 6", "same_target_on_5xx must be between 0 and 10"});
  ExpectConfigError(head + "    retry: {same_target_retry_after_max: 2h}\n",
                    {"line 6", "same_target_retry_after_max must be at most 1h"});
  ExpectConfigError(head + "    retry: {same_target_retry_after_max: soon}\n",
                    {"line 6", "same_target_retry_after_max"});
  ExpectConfigError("providers:\n  a: {type: mock, timeout: {first_token: soon}}\n",
                    {"line 2", "timeout.first_token"});
  // The same-target rules are a route's: a pipeline's retry refuses them.
  ExpectConfigError(R"(providers:
  a: {type: mock}
pipelines:
  p:
    retry: {same_target_on_5xx: 1}
    steps:
      - id: s
        llm: {route: a, messages: [{role: user, content: hi}]}
)",
                    {"line 5", "unknown key \"same_target_on_5xx\""});
}

TEST(ConfigTest, RouteCacheIsAbsentByDefaultAndReadWithDefaults) {
  auto c = ParseConfig(R"(providers:
  a: {type: mock}
routes:
  plain: {targets: [{provider: a}]}
  cached:
    targets: [{provider: a}]
    cache: {ttl: 1h}
  full:
    targets: [{provider: a}]
    cache: {ttl: 30s, stale_if_error: 24h, max_entries: 5}
)",
                       Env());
  ASSERT_OK(c);
  EXPECT_FALSE(c->routes.at("plain").cache.has_value());
  const auto& cached = c->routes.at("cached").cache;
  ASSERT_TRUE(cached.has_value());
  EXPECT_EQ(cached->ttl, milliseconds(3'600'000));
  EXPECT_EQ(cached->stale_if_error, milliseconds(0));
  EXPECT_EQ(cached->max_entries, 10000);
  const auto& full = c->routes.at("full").cache;
  ASSERT_TRUE(full.has_value());
  EXPECT_EQ(full->ttl, milliseconds(30'000));
  EXPECT_EQ(full->stale_if_error, milliseconds(86'400'000));
  EXPECT_EQ(full->max_entries, 5);
  EXPECT_FALSE(c->redis.has_value());
}

TEST(ConfigTest, RouteCacheIsValidated) {
  const std::string head =
      "providers:\n  a: {type: mock}\nroutes:\n  r:\n    targets: [{provider: a}]\n";
  ExpectConfigError(head + "    cache: {stale_if_error: 1h}\n", {"line 6", "cache needs ttl"});
  ExpectConfigError(head + "    cache: {ttl: 0s}\n", {"line 6", "cache.ttl must be at least 1ms"});
  ExpectConfigError(head + "    cache: {ttl: soon}\n", {"line 6", "cache.ttl"});
  ExpectConfigError(head + "    cache: {ttl: 1h, max_entries: 0}\n",
                    {"line 6", "max_entries must be between 1 and 10000000"});
  ExpectConfigError(head + "    cache: {ttl: 1h, max_entries: 10000001}\n",
                    {"line 6", "max_entries"});
  ExpectConfigError(head + "    cache: {ttl: 1h, stale: 1h}\n",
                    {"line 6", "unknown key \"stale\"", "stale_if_error"});
  ExpectConfigError(head + "    cache: 1h\n", {"line 6", "cache must be a mapping"});
  auto edge = ParseConfig(
      head + "    cache: {ttl: 1ms, stale_if_error: 0s, max_entries: 10000000}\n", Env());
  ASSERT_OK(edge);
  EXPECT_EQ(edge->routes.at("r").cache->ttl, milliseconds(1));
  EXPECT_EQ(edge->routes.at("r").cache->max_entries, 10'000'000);
}

TEST(ConfigTest, RedisIsReadWithDefaults) {
  auto c = ParseConfig("redis: {url: \"redis://10.0.0.7:6380\"}\n", Env());
  ASSERT_OK(c);
  ASSERT_TRUE(c->redis.has_value());
  EXPECT_EQ(c->redis->address.host, "10.0.0.7");
  EXPECT_EQ(c->redis->address.port, 6380);
  EXPECT_EQ(c->redis->address.password, "");
  EXPECT_EQ(c->redis->address.db, 0);
  EXPECT_EQ(c->redis->timeout, milliseconds(50));
  EXPECT_EQ(c->redis->key_prefix, "keel:");
  EXPECT_EQ(c->redis->retry_interval, milliseconds(1000));
  EXPECT_EQ(c->redis->pool_size, 8);
}

TEST(ConfigTest, RedisExplicitValuesAndAnInterpolatedPasswordAreRead) {
  auto c = ParseConfig(R"(redis:
  url: "redis://:${REDIS_PASSWORD}@cache.internal:7000/3"
  timeout: 20ms
  key_prefix: "prod:"
  retry_interval: 5s
  pool_size: 16
)",
                       Env({{"REDIS_PASSWORD", "s3cr@t"}}));
  ASSERT_OK(c);
  const auto& r = *c->redis;
  EXPECT_EQ(r.address.host, "cache.internal");
  EXPECT_EQ(r.address.port, 7000);
  EXPECT_EQ(r.address.username, "");
  EXPECT_EQ(r.address.password, "s3cr@t");
  EXPECT_EQ(r.address.db, 3);
  EXPECT_EQ(r.timeout, milliseconds(20));
  EXPECT_EQ(r.key_prefix, "prod:");
  EXPECT_EQ(r.retry_interval, milliseconds(5000));
  EXPECT_EQ(r.pool_size, 16);
  auto empty_prefix = ParseConfig("redis: {url: \"redis://h\", key_prefix: \"\"}\n", Env());
  ASSERT_OK(empty_prefix);
  EXPECT_EQ(empty_prefix->redis->key_prefix, "");
}

TEST(ConfigTest, RedisIsValidatedWithLinesAndNeverEchoesThePassword) {
  ExpectConfigError("listen: 127.0.0.1:0\nredis: {timeout: 10ms}\n", {"line 2", "redis needs url"});
  ExpectConfigError("listen: 127.0.0.1:0\nredis:\n  url: \"http://h:6379\"\n",
                    {"line 3", "redis.url", "redis://"});
  ExpectConfigError("redis: {url: \"redis://h:0\"}\n",
                    {"line 1", "port must be a number from 1 to 65535"});
  ExpectConfigError("redis: {url: \"redis://h:99999\"}\n", {"line 1", "port"});
  ExpectConfigError("redis: {url: \"redis://h:6379/x\"}\n",
                    {"line 1", "database must be a number"});
  ExpectConfigError("redis: {url: \"redis://:6379\"}\n", {"line 1", "no host"});
  ExpectConfigError("redis: {url: \"rediss://h:6379\"}\n",
                    {"line 1", "rediss://", "not supported"});
  ExpectConfigError("redis: {url: \"redis://h?timeout=1\"}\n", {"line 1", "no query"});
  ExpectConfigError("redis: {url: redis://h, timeout: 11s}\n",
                    {"line 1", "redis.timeout must be at most 10s"});
  ExpectConfigError("redis: {url: redis://h, timeout: 0ms}\n",
                    {"line 1", "redis.timeout must be at least 1ms"});
  ExpectConfigError("redis: {url: redis://h, retry_interval: 5ms}\n",
                    {"line 1", "retry_interval must be at least 10ms"});
  ExpectConfigError("redis: {url: redis://h, retry_interval: 2h}\n",
                    {"line 1", "retry_interval must be at most 1h"});
  ExpectConfigError("redis: {url: redis://h, pool_size: 0}\n",
                    {"line 1", "pool_size must be between 1 and 256"});
  ExpectConfigError("redis: {url: redis://h, key_prefix: " + std::string(129, 'k') + "}\n",
                    {"line 1", "at most 128 bytes"});
  ExpectConfigError("redis: {url: redis://h, ttl: 1s}\n",
                    {"line 1", "unknown key \"ttl\" in redis"});
  ExpectConfigError("redis: redis://h\n", {"line 1", "redis must be a mapping"});
  // The password never appears in a message about the URL.
  auto r = ParseConfig("redis: {url: \"redis://:hunter2@h:notaport\"}\n", Env());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("port"));
  EXPECT_THAT(r.error().message, ::testing::Not(HasSubstr("hunter2")));
}

TEST(ParseRedisUrlTest, Forms) {
  auto plain = ParseRedisUrl("redis://localhost");
  ASSERT_OK(plain);
  EXPECT_EQ(plain->host, "localhost");
  EXPECT_EQ(plain->port, 6379);
  EXPECT_EQ(plain->db, 0);
  auto full = ParseRedisUrl("redis://app:p%40ss%3Aw%2Fd@127.0.0.1:6390/15");
  ASSERT_OK(full);
  EXPECT_EQ(full->username, "app");
  EXPECT_EQ(full->password, "p@ss:w/d");
  EXPECT_EQ(full->host, "127.0.0.1");
  EXPECT_EQ(full->port, 6390);
  EXPECT_EQ(full->db, 15);
  auto v6 = ParseRedisUrl("redis://[::1]:6400/");
  ASSERT_OK(v6);
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->port, 6400);
  EXPECT_EQ(v6->db, 0);
  auto at_in_password = ParseRedisUrl("redis://:a@b@h:1");
  ASSERT_OK(at_in_password);
  EXPECT_EQ(at_in_password->password, "a@b");
  EXPECT_EQ(at_in_password->host, "h");
  for (std::string_view bad : {"", "redis://", "redis://user@h", "redis://:@h", "redis://h:",
                               "redis://[::1", "redis://[::1]x", "redis://:%zz@h", "redis://:%4@h",
                               "redis://h/70000", "redis://h:-1", "tcp://h:6379"}) {
    EXPECT_FALSE(ParseRedisUrl(bad).ok()) << bad;
  }
}

TEST(ConfigTest, ServerHeaderTimeoutAndPerIpBound) {
  auto d = ParseConfig("", Env());
  ASSERT_OK(d);
  EXPECT_EQ(d->server.header_timeout, milliseconds(10000));
  EXPECT_EQ(d->server.max_connections_per_ip, 256);  // a quarter of max_connections
  auto derived = ParseConfig("server: {max_connections: 10}\n", Env());
  ASSERT_OK(derived);
  EXPECT_EQ(derived->server.max_connections_per_ip, 2);
  auto one = ParseConfig("server: {max_connections: 3}\n", Env());
  ASSERT_OK(one);
  EXPECT_EQ(one->server.max_connections_per_ip, 1);
  auto c = ParseConfig("server: {max_connections_per_ip: 50, header_timeout: 2s}\n", Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->server.max_connections_per_ip, 50);
  EXPECT_EQ(c->server.header_timeout, milliseconds(2000));
  ExpectConfigError("server:\n  max_connections_per_ip: 0\n", {"line 2", "max_connections_per_ip"});
  ExpectConfigError("server:\n  header_timeout: 10ms\n", {"line 2", "header_timeout"});
}

// ---- untrusted config (issue 10) ----------------------------------------------------

namespace untrusted {

std::string Choice(std::string_view matches) {
  return WithProviders(std::string(R"(pipelines:
  p:
    steps:
      - id: c
        choice:
          cases:
            - when: {value: "{{input.t}}", matches: )") +
                       std::string(matches) + R"(}
              goto: a
          default: a
      - id: a
        transform: {x: 1}
)");
}

TEST(ConfigUntrustedTest, MatchesMustBeAStringThatCompiles) {
  ExpectConfigError(Choice("123"), {"line 12", "matches must be a string", "not number"});
  ExpectConfigError(Choice("true"), {"matches must be a string"});
  ExpectConfigError(Choice("\"(unclosed\""), {"line 12", "not a valid regular expression"});
  ASSERT_OK(ParseConfig(Choice("\"123\""), Env()));
  ASSERT_OK(ParseConfig(Choice("\"^a+$\""), Env()));
}

TEST(ConfigUntrustedTest, AnAliasBombIsRefusedInBoundedTime) {
  // Nine levels of ten aliases each: 10^9 values if expanded.
  // The bomb goes off where keel reads a value as JSON: a transform's body.
  std::string bomb =
      WithProviders("pipelines:\n  p:\n    steps:\n      - id: t\n        transform:\n");
  bomb += "          x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n";
  for (int i = 1; i <= 9; ++i) {
    const std::string prev = "*x" + std::to_string(i - 1);
    bomb += "          x" + std::to_string(i) + ": &x" + std::to_string(i) + " [" + prev;
    for (int k = 1; k < 10; ++k) bomb += ", " + prev;
    bomb += "]\n";
  }
  ExpectConfigError(bomb, {"more than 1000000 values", "aliases"});
}

TEST(ConfigUntrustedTest, ValuesNestedPastTheJsonLimitAreRefused) {
  std::string deep(70, '[');
  deep += "1" + std::string(70, ']');
  ExpectConfigError(
      WithProviders("pipelines:\n  p:\n    steps:\n      - id: t\n        transform: {v: " + deep +
                    "}\n"),
      {"nest deeper than 64"});
}

TEST(ConfigUntrustedTest, AFileThatIsNotUtf8IsRefusedWithItsLine) {
  ExpectConfigError(WithProviders("pipelines:\n  p:\n    steps:\n      - id: t\n        transform: {\"rep\x93y\": 1}\n"),
                    {"line 10", "not valid UTF-8"});
}

TEST(ConfigUntrustedTest, InfAndNanStayText) {
  auto c = ParseConfig(WithProviders("pipelines:\n  p:\n    steps:\n      - id: t\n        "
                                     "transform: {a: inf, b: nan, c: 1e400, d: 2.5}\n"),
                       Env());
  ASSERT_OK(c);
  const auto& spec = c->pipelines.at("p").steps.at(0).spec;
  EXPECT_EQ(spec.at("a"), "inf");
  EXPECT_EQ(spec.at("b"), "nan");
  EXPECT_EQ(spec.at("c"), "1e400");
  EXPECT_EQ(spec.at("d").as_double(), 2.5);
}

TEST(ConfigUntrustedTest, HttpStepHeadersAndResponseBound) {
  const std::string base =
      "pipelines:\n  p:\n    steps:\n      - id: h\n        http: {url: \"http://127.0.0.1:9/x\", ";
  ExpectConfigError(WithProviders(base + "headers: {\"X A\": v}}\n"),
                    {"line 10", "not a valid HTTP header name"});
  ExpectConfigError(WithProviders(base + "headers: {X-A: \"a\\r\\nB: c\"}}\n"),
                    {"line 10", "CR, LF or NUL"});
  ExpectConfigError(WithProviders(base + "max_response_bytes: 10}\n"),
                    {"max_response_bytes must be between 1024"});
  auto c = ParseConfig(
      WithProviders(base + "max_response_bytes: 2048}\nhttp: {max_response_bytes: 4096}\n"), Env());
  ASSERT_OK(c);
  EXPECT_EQ(c->pipelines.at("p").steps.at(0).spec.at("max_response_bytes").as_int64(), 2048);
  EXPECT_EQ(c->engine.http.max_response_bytes, 4096);
  auto d = ParseConfig("", Env());
  ASSERT_OK(d);
  EXPECT_EQ(d->engine.http.max_response_bytes, 10 << 20);
}

}  // namespace untrusted

}  // namespace
}  // namespace keel

namespace keel {
namespace {

// A provider's tls block: files must be readable; a client certificate needs its key.
TEST(ConfigTest, ProviderTlsFilesAreReadAndChecked) {
  const std::string dir = ::testing::TempDir();
  const std::string ca = dir + "/keel-config-test-ca.pem";
  const std::string key = dir + "/keel-config-test-key.pem";
  std::ofstream(ca) << "-----BEGIN CERTIFICATE-----\n";
  std::ofstream(key) << "-----BEGIN PRIVATE KEY-----\n";
  auto r = ParseConfig("providers:\n  p:\n    type: openai\n    base_url: https://h/v1\n    tls: {ca_file: " + ca +
                           ", client_cert: " + ca + ", client_key: " + key + "}\n",
                       Env());
  ASSERT_OK(r);
  EXPECT_EQ(r->providers.at("p").tls.ca_file, ca);
  EXPECT_EQ(r->providers.at("p").tls.client_cert, ca);
  EXPECT_EQ(r->providers.at("p").tls.client_key, key);

  ExpectConfigError("providers:\n  p:\n    type: openai\n    base_url: https://h/v1\n    tls: {ca_file: /no/such/ca.pem}\n",
                    {"line 5", "tls.ca_file", "/no/such/ca.pem", "cannot be read"});
  ExpectConfigError("providers:\n  p:\n    type: openai\n    base_url: https://h/v1\n    tls: {client_cert: " + ca + "}\n",
                    {"both client_cert and client_key"});
  ExpectConfigError("providers:\n  p:\n    type: openai\n    base_url: https://h/v1\n    tls: {verify: false}\n",
                    {"verify"});
  ExpectConfigError("providers:\n  p:\n    type: openai\n    base_url: https://h/v1\n    tls: /etc/ca.pem\n",
                    {"tls must be a mapping"});
}

}  // namespace
}  // namespace keel
