// The keel binary's subcommands, run as a user would.

#include <gtest/gtest.h>

#include <fstream>

#include "helpers.h"

namespace keel::testing {
namespace {

struct Output {
  int code;
  std::string err;
};

// Runs `keel ARGS...` to completion; returns its exit code and stderr.
Output RunKeel(std::vector<std::string> args, std::vector<std::string> env = {}) {
  args.insert(args.begin(), KEEL_BINARY);
  Process p(args, {}, env);
  const int code = p.Wait();
  std::string err;
  for (const auto& l : p.Lines()) err += l + "\n";
  return {code, err};
}

Output RunShell(const std::string& command) {
  Process p({"/bin/sh", "-c", command});
  const int code = p.Wait();
  std::string err;
  for (const auto& l : p.Lines()) err += l + "\n";
  return {code, err};
}

TEST(CliTest, MigrateCreatesTheSchemaIsIdempotentAndRefusesANewerOne) {
  // Process keeps stderr only: the report on stdout is sent there.
  auto migrate = [](const std::string& cfg) {
    return RunShell(std::string(KEEL_BINARY) + " migrate --config " + cfg + " 1>&2");
  };
  TempDir dir;
  const std::string cfg = dir.path() + "/keel.yaml";
  std::ofstream(cfg) << "storage: sqlite://" << dir.path() << "/data/keel.db\n";
  auto out = migrate(cfg);
  EXPECT_EQ(out.code, 0) << out.err;
  EXPECT_NE(out.err.find("schema version 4 (created)"), std::string::npos) << out.err;
  out = migrate(cfg);
  EXPECT_EQ(out.code, 0) << out.err;
  EXPECT_NE(out.err.find("(up to date)"), std::string::npos) << out.err;
  ASSERT_EQ(RunShell("sqlite3 " + dir.path() + "/data/keel.db 'PRAGMA user_version=7'").code, 0);
  out = migrate(cfg);
  EXPECT_EQ(out.code, 1);
  EXPECT_NE(out.err.find("schema version 7, newer than this keel understands"), std::string::npos) << out.err;
}

TEST(CliTest, ConfigCheckAcceptsTheExampleAndNamesTheLineOfAnError) {
  EXPECT_EQ(RunKeel({"config", "check", KEEL_SOURCE_DIR "/examples/keel.yaml"}).code, 0);
  TempDir dir;
  const std::string bad = dir.path() + "/bad.yaml";
  std::ofstream(bad) << "listen: 127.0.0.1:7420\n"
                        "pipelines:\n"
                        "  p:\n"
                        "    steps:\n"
                        "      - id: a\n"
                        "        transform: {x: \"{{steps.b.output}}\"}\n"
                        "      - id: b\n"
                        "        transform: {y: 1}\n";
  auto out = RunKeel({"config", "check", bad});
  EXPECT_EQ(out.code, 1);
  EXPECT_NE(out.err.find("line 5"), std::string::npos) << out.err;
  EXPECT_NE(out.err.find("cannot have run before it"), std::string::npos) << out.err;
  std::ofstream(bad) << "listen: 127.0.0.1:7420\nlisten_port: 3\n";
  out = RunKeel({"config", "check", bad});
  EXPECT_EQ(out.code, 1);
  EXPECT_NE(out.err.find("line 2"), std::string::npos) << out.err;
  EXPECT_NE(out.err.find("unknown key \"listen_port\""), std::string::npos) << out.err;
}

TEST(CliTest, ServeRefusesABadConfigAndNamesTheLine) {
  TempDir dir;
  const std::string bad = dir.path() + "/keel.yaml";
  std::ofstream(bad) << "engine:\n  workers: many\n";
  auto out = RunKeel({"serve", "--config", bad, "--listen", "127.0.0.1:0"});
  EXPECT_EQ(out.code, 2);
  EXPECT_NE(out.err.find("line 2"), std::string::npos) << out.err;
  EXPECT_NE(out.err.find("engine.workers"), std::string::npos) << out.err;
}

TEST(CliTest, RunWaitPrintsTheFinishedRunAndRunsCommandsWork) {
  TempDir dir;
  KeelServer server(dir.path(), "");
  const std::vector<std::string> env{"KEEL_URL=" + server.url()};
  auto out = RunKeel({"run", "echo", "--input", R"({"hello": "world"})", "--wait"}, env);
  EXPECT_EQ(out.code, 0) << out.err;
  auto list = HttpGet(server.url() + "/v1/runs");
  ASSERT_EQ(list.body.at("data").as_array().size(), 1u);
  const std::string id(list.body.at("data").as_array()[0].at("id").as_string());
  EXPECT_EQ(list.body.at("data").as_array()[0].at("status").as_string(), "succeeded");
  for (const char* sub : {"get", "events"}) EXPECT_EQ(RunKeel({"runs", sub, id}, env).code, 0) << sub;
  EXPECT_EQ(RunKeel({"runs", "list", "--status", "succeeded"}, env).code, 0);
  EXPECT_EQ(RunKeel({"dlq", "list"}, env).code, 0);
  // Cancelling an ended run is refused: exit 1 with the API's message.
  auto cancel = RunKeel({"runs", "cancel", id}, env);
  EXPECT_EQ(cancel.code, 1);
  EXPECT_NE(cancel.err.find("already ended"), std::string::npos) << cancel.err;
  auto bad_input = RunKeel({"run", "echo", "--input", "not json"}, env);
  EXPECT_EQ(bad_input.code, 2);
  EXPECT_NE(bad_input.err.find("--input must be a JSON object"), std::string::npos);
  auto unknown = RunKeel({"run", "nope"}, env);
  EXPECT_EQ(unknown.code, 1);
  EXPECT_NE(unknown.err.find("unknown pipeline"), std::string::npos);
}

TEST(CliTest, EverySubcommandHasHelp) {
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"serve", "--help"}, {"run", "--help"}, {"runs", "list", "--help"}, {"runs", "get", "--help"},
           {"runs", "events", "--help"}, {"runs", "cancel", "--help"}, {"runs", "redrive", "--help"},
           {"dlq", "list", "--help"}, {"config", "check", "--help"}, {"mock-llm", "--help"}}) {
    EXPECT_EQ(RunKeel(args).code, 0) << args.front();
  }
}

TEST(CliTest, ClientCommandsSayWhenTheServerIsUnreachable) {
  auto out = RunKeel({"runs", "list", "--server", "http://127.0.0.1:1"});
  EXPECT_EQ(out.code, 1);
  EXPECT_NE(out.err.find("cannot reach"), std::string::npos) << out.err;
}

}  // namespace
}  // namespace keel::testing
