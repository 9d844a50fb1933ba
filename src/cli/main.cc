// The keel binary: one executable, many subcommands (keel --help).

#include <CLI/CLI.hpp>

#include "commands.h"

namespace keel::cli {
int& ExitCode() {
  static int code = 0;
  return code;
}
}  // namespace keel::cli

int main(int argc, char** argv) {
  CLI::App app{"keel: a fault-tolerant runtime for AI pipelines"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "keel 0.1.0");
  keel::cli::AddServeCommand(app);
  keel::cli::AddWorkerCommand(app);
  keel::cli::AddClientCommands(app);
  keel::cli::AddConfigCommand(app);
  keel::cli::AddMigrateCommand(app);
  keel::cli::AddMockLlmCommand(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return keel::cli::ExitCode();
}
