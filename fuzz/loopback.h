#pragma once
// A blocking loopback HTTP exchange for the fuzz targets that drive keel's real server
// (http_request_fuzz, api_fuzz): the fuzz input goes to the server as raw bytes on a
// fresh connection, the write side is then closed, and the answer is read until the
// server closes. Header-only, POSIX sockets.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "fuzz_support.h"

namespace keel::fuzz {

/// Sends `bytes` to 127.0.0.1:`port` and returns everything the server answered before it
/// closed the connection. A server that neither answers nor closes within `timeout` is a
/// hang: the process stops (libFuzzer records it). The connection is reset on close
/// (SO_LINGER 0), so that millions of exchanges leave no TIME_WAIT sockets behind.
inline std::string Exchange(uint16_t port, std::string_view bytes,
                            std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  // Connecting may fail for a moment when the loopback's ephemeral ports are all in
  // TIME_WAIT (thousands of exchanges a second; the server closes first): retry for up
  // to 5 s. A server that stopped listening still fails, with the errno.
  int fd = -1;
  int last_errno = 0;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    if (attempt > 0) ::usleep(50'000);
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) Fail("socket() failed", std::strerror(errno));
    const linger no_linger{1, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &no_linger, sizeof no_linger);
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
      last_errno = errno;
      ::close(fd);
      fd = -1;
    }
  }
  if (fd < 0) Fail("cannot connect to the server under test for 5 s", std::strerror(last_errno));
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server answered early (413) and closed: fine
    sent += static_cast<std::size_t>(n);
  }
  ::shutdown(fd, SHUT_WR);
  std::string answer;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  char buf[16384];
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      ::close(fd);
      Fail("the server neither answered nor closed the connection in time",
           std::string(bytes.substr(0, 2000)));
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;  // closed (or reset)
    answer.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return answer;
}

/// The status codes of the answers in `wire` ("HTTP/1.1 200 OK\r\n..." -> 200), in
/// order; each status line found at the start or after a blank line.
inline std::vector<int> Statuses(std::string_view wire) {
  std::vector<int> out;
  std::size_t pos = 0;
  while ((pos = wire.find("HTTP/1.", pos)) != std::string_view::npos) {
    if (pos + 12 <= wire.size() && wire[pos + 8] == ' ') {
      const auto code = wire.substr(pos + 9, 3);
      if (code.find_first_not_of("0123456789") == std::string_view::npos)
        out.push_back(std::stoi(std::string(code)));
    }
    pos += 7;
  }
  return out;
}

}  // namespace keel::fuzz
