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
#include "keel/store/postgres_store.h"
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

// The storage the config names, opened (created or migrated as needed).
// `read_connections`: SQLite's read pool.
Result<std::unique_ptr<store::Store>> OpenStorage(const Config& config, const Clock& clock, Random& random,
                                                  int read_connections = 4) {
  if (config.storage.rfind("sqlite://", 0) == 0) {
    store::SqliteOptions o;
    o.path = config.storage.substr(std::string("sqlite://").size());
    o.read_connections = read_connections;
    return store::OpenSqliteStore(o, clock, random);
  }
  store::PostgresOptions o;
  o.url = config.storage;
  o.pool_size = config.postgres.pool_size;
  o.connect_timeout = config.postgres.connect_timeout;
  o.pool_timeout = config.postgres.pool_timeout;
  o.statement_timeout = config.postgres.statement_timeout;
  return store::OpenPostgresStore(o, clock, random);
}

// A node: the API and workers (`keel serve`), or workers only (`keel worker`, with the
// operations endpoints when it has a --listen address).
int RunNode(const std::string& config_path, const std::string& listen_flag, bool api_node) {
  BlockStopSignals();
  auto config = LoadConfig(config_path);
  if (!config.ok()) {
    std::cerr << "keel: " << config.error().message << "\n";
    return 2;
  }
  RegisterConfigSecrets(*config);  // before anything can log, answer or store a secret
  obs::SetLogLevel(obs::ParseLogLevel(config->log_level));
  net::ServerOptions server;
  const std::string listen = api_node ? (listen_flag.empty() ? config->listen : listen_flag) : listen_flag;
  std::string error;
  if (!listen.empty() && !ParseListen(listen, server.host, server.port, error)) {
    std::cerr << "keel: " << error << "\n";
    return 2;
  }
  if (!api_node && config->storage.rfind("sqlite://", 0) == 0) {
    std::cerr << "keel: keel worker needs storage that nodes share (postgres://...); with sqlite:// the workers run "
                 "inside keel serve\n";
    return 2;
  }
  if (!api_node && config->engine.workers == 0) {
    std::cerr << "keel: engine.workers is 0: a worker node with no workers has nothing to do\n";
    return 2;
  }
  server.max_body_bytes = config->server.max_body_bytes;
  server.max_connections = config->server.max_connections;
  server.io_threads = config->server.io_threads;
  server.idle_timeout = config->server.idle_timeout;
  server.max_connections_per_address = config->server.max_connections_per_ip;
  server.header_timeout = config->server.header_timeout;

  const Clock& clock = *SystemClock::Instance();
  Random& random = *ProcessRandom();
  prometheus::Registry registry;
  auto store = OpenStorage(*config, clock, random);
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
  std::unique_ptr<api::ApiServer> api;
  if (!listen.empty()) {
    auto created = api::ApiServer::Create(*config, server, **store, **gateway, clock, random, registry,
                                          /*ops_only=*/!api_node);
    if (!created.ok()) {
      std::cerr << "keel: " << created.error().message << "\n";
      return 1;
    }
    api = std::move(created).value();
  }
  engine->Start();
  const std::string storage = RedactUrl(config->storage);
  const char* role = api_node ? "serve" : "worker";
  if (api) {
    obs::LogInfo("listening", {{"addr", server.host + ":" + std::to_string(api->port())},
                               {"role", role},
                               {"storage", storage},
                               {"workers", config->engine.workers},
                               {"pipelines", static_cast<int64_t>(config->pipelines.size())}});
  } else {
    obs::LogInfo("worker started", {{"role", role}, {"storage", storage}, {"workers", config->engine.workers}});
  }
  const char* sig = WaitForStopSignal();
  obs::LogInfo("draining", {{"signal", sig}, {"drain_timeout_ms", static_cast<int64_t>(config->engine.drain_timeout.count())}});
  if (api) api->SetDraining();
  engine->Stop();
  if (api) api->Stop();
  obs::LogInfo("stopped");
  return 0;
}

}  // namespace

void AddServeCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Run a keel node: the HTTP API and the workers");
  auto config = std::make_shared<std::string>();
  auto listen = std::make_shared<std::string>();
  cmd->add_option("--config", *config, "keel.yaml to load (default: the built-in example config)");
  cmd->add_option("--listen", *listen, "HOST:PORT to listen on; overrides the config (port 0: any free port)");
  cmd->callback([config, listen] { ExitCode() = RunNode(*config, *listen, /*api_node=*/true); });
}

void AddWorkerCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "worker", "Run a worker node: executes the runs queued in the shared storage (postgres://), serves no API");
  auto config = std::make_shared<std::string>();
  auto listen = std::make_shared<std::string>();
  cmd->add_option("--config", *config, "keel.yaml to load (default: the built-in example config)");
  cmd->add_option("--listen", *listen,
                  "HOST:PORT for /healthz, /readyz and /metrics (port 0: any free port); default: none");
  cmd->callback([config, listen] { ExitCode() = RunNode(*config, *listen, /*api_node=*/false); });
}

// keel migrate: brings the storage's schema to this keel's version (serve does it too, at
// start); refuses a database of a newer version.
int Migrate(const std::string& config_path) {
  auto config = LoadConfig(config_path);
  if (!config.ok()) {
    std::cerr << "keel: " << config.error().message << "\n";
    return 2;
  }
  const bool sqlite = config->storage.rfind("sqlite://", 0) == 0;
  store::PostgresOptions pg;
  pg.url = config->storage;
  pg.connect_timeout = config->postgres.connect_timeout;
  auto before = sqlite ? store::ReadSqliteSchemaVersion(config->storage.substr(std::string("sqlite://").size()))
                       : store::ReadPostgresSchemaVersion(pg);
  if (!before.ok()) {
    std::cerr << "keel: storage: " << before.error().message << "\n";
    return 1;
  }
  Config one = *config;
  one.postgres.pool_size = 1;
  auto opened = OpenStorage(one, *SystemClock::Instance(), *ProcessRandom(), /*read_connections=*/1);
  if (!opened.ok()) {
    std::cerr << "keel: storage: " << opened.error().message << "\n";
    return 1;
  }
  const int to = sqlite ? store::SqliteSchemaVersion() : store::PostgresSchemaVersion();
  std::cout << RedactUrl(config->storage) << ": schema version " << to
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
