#include <csignal>
#include <charconv>

#include "commands.h"

namespace keel::cli {

bool ParseListen(const std::string& listen, std::string& host, uint16_t& port, std::string& error) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    error = "listen address \"" + listen + "\" must be HOST:PORT, e.g. 127.0.0.1:7420";
    return false;
  }
  host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const std::string p = listen.substr(colon + 1);
  unsigned v = 0;
  const auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
  if (ec != std::errc() || ptr != p.data() + p.size() || v > 65535) {
    error = "listen port \"" + p + "\" must be a number from 0 to 65535";
    return false;
  }
  port = static_cast<uint16_t>(v);
  return true;
}

void BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
}

const char* WaitForStopSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  sigwait(&set, &sig);
  return sig == SIGINT ? "SIGINT" : "SIGTERM";
}

}  // namespace keel::cli
