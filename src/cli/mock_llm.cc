#include <iostream>

#include "commands.h"
#include "keel/api/api_server.h"
#include "keel/obs/log.h"

namespace keel::cli {

void AddMockLlmCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("mock-llm", "Run a fault-injecting OpenAI-compatible mock LLM provider");
  struct Flags {
    std::string listen = "127.0.0.1:7421";
    int64_t latency_ms = 0;
    double fail_rate = 0;
    int fail_status = 503;
    uint64_t seed = 1;
    int rpm = 0;
    int tpm = 0;
    int io_threads = 2;
    int max_connections = 1024;
  };
  auto f = std::make_shared<Flags>();
  cmd->add_option("--listen", f->listen, "HOST:PORT (port 0: any free port)")->capture_default_str();
  cmd->add_option("--latency-ms", f->latency_ms, "delay before every answer")->check(CLI::Range(0, 3600000));
  cmd->add_option("--fail-rate", f->fail_rate, "share of calls that fail with --fail-status")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--fail-status", f->fail_status, "HTTP status of random failures")->check(CLI::Range(400, 599))->capture_default_str();
  cmd->add_option("--seed", f->seed, "seed of the random failures")->capture_default_str();
  cmd->add_option("--rpm", f->rpm, "requests per minute before 429 (0: unlimited)")->check(CLI::Range(0, 100000000));
  cmd->add_option("--tpm", f->tpm, "tokens per minute before 429 (0: unlimited)")->check(CLI::Range(0, 2000000000));
  cmd->add_option("--io-threads", f->io_threads, "I/O threads")->check(CLI::Range(1, 64))->capture_default_str();
  cmd->add_option("--max-connections", f->max_connections,
                  "connections open at once, from any one address too (a load test's client is one address)")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  cmd->callback([f] {
    BlockStopSignals();
    net::ServerOptions server;
    std::string error;
    if (!ParseListen(f->listen, server.host, server.port, error)) {
      std::cerr << "keel mock-llm: " << error << "\n";
      { ExitCode() = 2; return; }
    }
    server.io_threads = f->io_threads;
    server.max_connections = f->max_connections;
    server.max_connections_per_address = f->max_connections;
    server.max_body_bytes = 16 << 20;
    gateway::MockOptions mock;
    mock.latency = std::chrono::milliseconds(f->latency_ms);
    mock.fail_rate = f->fail_rate;
    mock.fail_status = f->fail_status;
    mock.seed = f->seed;
    mock.rpm = f->rpm;
    mock.tpm = f->tpm;
    auto s = api::MockLlmServer::Create(server, mock);
    if (!s.ok()) {
      std::cerr << "keel mock-llm: " << s.error().message << "\n";
      { ExitCode() = 1; return; }
    }
    obs::LogInfo("listening", {{"addr", server.host + ":" + std::to_string((*s)->port())}, {"service", "mock-llm"}});
    WaitForStopSignal();
    (*s)->Stop();
  });
}

}  // namespace keel::cli
