#pragma once
// The subcommands of the keel binary. Each returns the process exit code.

#include <CLI/CLI.hpp>
#include <string>

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

/// Blocks SIGINT and SIGTERM in this thread and the threads it starts; call first.
void BlockStopSignals();
/// Waits for SIGINT or SIGTERM; returns its name.
const char* WaitForStopSignal();

}  // namespace keel::cli
