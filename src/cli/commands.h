#pragma once
// The subcommands of the keel binary. Each returns the process exit code.

#include <CLI/CLI.hpp>
#include <string>

#include "keel/core/config.h"

namespace keel::cli {

/// The exit code the chosen subcommand asks for. Default: 0.
int& ExitCode();

/// examples/keel.yaml, embedded at build time.
const char* DefaultConfigYaml();

void AddServeCommand(CLI::App& app);
void AddWorkerCommand(CLI::App& app);
void AddConfigCommand(CLI::App& app);
void AddMigrateCommand(CLI::App& app);
void AddMockLlmCommand(CLI::App& app);
void AddClientCommands(CLI::App& app);

/// Splits "HOST:PORT"; false with a message on a malformed address.
bool ParseListen(const std::string& listen, std::string& host, uint16_t& port, std::string& error);

/// Registers every secret `config` holds with the process-wide redactor (keel/core/secrets.h):
/// providers' api_key and header values, http steps' literal header values, and the
/// passwords of the storage URL, providers' base_url and Redis. Well-known headers that
/// carry no secret (Content-Type, Accept, User-Agent, anthropic-version, ...) are left out,
/// and so are templated values (rendered per call). Call once, after the config is loaded.
void RegisterConfigSecrets(const Config& config);

/// Blocks SIGINT and SIGTERM in this thread and the threads it starts; call first.
void BlockStopSignals();
/// Waits for SIGINT or SIGTERM; returns its name.
const char* WaitForStopSignal();

}  // namespace keel::cli
