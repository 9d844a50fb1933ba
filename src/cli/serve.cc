#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "keel/api/api_server.h"
#include "keel/core/config.h"
#include "keel/engine/engine.h"
#include "keel/gateway/gateway.h"
#include "keel/obs/log.h"
#include "keel/store/sqlite_store.h"

namespace keel::cli {
namespace {

std::optional<std::string> GetEnv(const std::string& name) {
  const char* v = std::getenv(name.c_str());
  return v ? std::optional<std::string>(v) : std::nullopt;
}

// Loads FILE, or the embedded default when `path` is empty.
Result<Config> LoadConfig(const std::string& path) {
  if (path.empty()) return ParseConfig(DefaultConfigYaml(), GetEnv, "default config");
  std::ifstream in(path);
  if (!in) return Error(ErrorCode::kInvalidRequest, "cannot read config file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseConfig(ss.str(), GetEnv, path);
}

int Serve(const std::string& config_path, const std::string& listen_flag) {
  BlockStopSignals();
  auto config = LoadConfig(config_path);
  if (!config.ok()) {
    std::cerr << "keel: " << config.error().message << "\n";
    return 2;
  }
  obs::SetLogLevel(obs::ParseLogLevel(config->log_level));
  net::ServerOptions server;
  std::string error;
  if (!ParseListen(listen_flag.empty() ? config->listen : listen_flag, server.host, server.port, error)) {
    std::cerr << "keel: " << error << "\n";
    return 2;
  }
  server.max_body_bytes = config->server.max_body_bytes;
  server.max_connections = config->server.max_connections;
  server.io_threads = config->server.io_threads;
  server.idle_timeout = config->server.idle_timeout;

  const Clock& clock = *SystemClock::Instance();
  Random& random = *ProcessRandom();
  prometheus::Registry registry;
  store::SqliteOptions sopts;
  sopts.path = config->storage.substr(std::string("sqlite://").size());
  auto store = store::OpenSqliteStore(sopts, clock, random);
  if (!store.ok()) {
    std::cerr << "keel: storage: " << store.error().message << "\n";
    return 1;
  }
  auto gateway = gateway::Gateway::Create(*config, registry, clock, random);
  if (!gateway.ok()) {
    std::cerr << "keel: gateway: " << gateway.error().message << "\n";
    return 1;
  }
  auto engine = engine::Engine::Create(config->engine, **store, **gateway, clock, random, registry);
  auto api = api::ApiServer::Create(*config, server, **store, engine.get(), **gateway, clock, random, registry);
  if (!api.ok()) {
    std::cerr << "keel: " << api.error().message << "\n";
    return 1;
  }
  engine->Start();
  obs::LogInfo("listening", {{"addr", server.host + ":" + std::to_string((*api)->port())},
                             {"storage", config->storage},
                             {"workers", config->engine.workers},
                             {"pipelines", static_cast<int64_t>(config->pipelines.size())}});
  const char* sig = WaitForStopSignal();
  obs::LogInfo("draining", {{"signal", sig}});
  (*api)->SetDraining();
  engine->Stop();
  (*api)->Stop();
  obs::LogInfo("stopped");
  return 0;
}

}  // namespace

void AddServeCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Run the keel server: the HTTP API and the workers");
  auto config = std::make_shared<std::string>();
  auto listen = std::make_shared<std::string>();
  cmd->add_option("--config", *config, "keel.yaml to load (default: the built-in example config)");
  cmd->add_option("--listen", *listen, "HOST:PORT to listen on; overrides the config (port 0: any free port)");
  cmd->callback([config, listen] { ExitCode() = Serve(*config, *listen); });
}

// keel migrate: brings the storage's schema to this keel's version (serve does it too, at
// start); refuses a database of a newer version.
int Migrate(const std::string& config_path) {
  auto config = LoadConfig(config_path);
  if (!config.ok()) {
    std::cerr << "keel: " << config.error().message << "\n";
    return 2;
  }
  const std::string path = config->storage.substr(std::string("sqlite://").size());
  auto before = store::ReadSqliteSchemaVersion(path);
  if (!before.ok()) {
    std::cerr << "keel: storage: " << before.error().message << "\n";
    return 1;
  }
  store::SqliteOptions sopts;
  sopts.path = path;
  sopts.read_connections = 1;
  auto opened = store::OpenSqliteStore(sopts, *SystemClock::Instance(), *ProcessRandom());
  if (!opened.ok()) {
    std::cerr << "keel: storage: " << opened.error().message << "\n";
    return 1;
  }
  const int to = store::SqliteSchemaVersion();
  std::cout << config->storage << ": schema version " << to
            << (*before == to ? " (up to date)" : *before == 0 ? " (created)" : " (migrated from " + std::to_string(*before) + ")")
            << "\n";
  return 0;
}

void AddMigrateCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("migrate", "Create or migrate the storage's schema to this keel's version");
  auto config = std::make_shared<std::string>();
  cmd->add_option("--config", *config, "keel.yaml naming the storage (default: the built-in example config)");
  cmd->callback([config] { ExitCode() = Migrate(*config); });
}

void AddConfigCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("config", "Work with configuration files");
  cmd->require_subcommand(1);
  auto* check = cmd->add_subcommand("check", "Validate a config file; errors name the line");
  auto file = std::make_shared<std::string>();
  check->add_option("FILE", *file, "the keel.yaml to check")->required();
  check->callback([file] {
    auto config = LoadConfig(*file);
    if (!config.ok()) {
      std::cerr << config.error().message << "\n";
      { ExitCode() = 1; return; }
    }
    std::cout << *file << ": ok (" << config->providers.size() << " providers, " << config->routes.size()
              << " routes, " << config->pipelines.size() << " pipelines)\n";
  });
}

}  // namespace keel::cli
