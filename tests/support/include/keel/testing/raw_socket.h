#pragma once
// A raw TCP client for tests that send what no HTTP client would (malformed requests,
// idle or half-sent connections) and read exactly what the server answers.

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace keel::testing {

/// One IPv4 connection to 127.0.0.1:`port`, from `source` when given (another loopback
/// address, such as "127.0.0.2", stands for another client). Every read and write is
/// bounded by `timeout`. Not thread-safe; closes on destruction.
class RawSocket {
 public:
  explicit RawSocket(uint16_t port, std::chrono::milliseconds timeout = std::chrono::seconds(10),
                     const char* source = nullptr);
  ~RawSocket();
  RawSocket(const RawSocket&) = delete;
  RawSocket& operator=(const RawSocket&) = delete;

  bool connected() const { return connected_; }
  /// False when the server stopped reading (closed, reset) before everything was sent.
  bool Send(std::string_view bytes);
  /// Shuts down the sending side (the server reads an end of stream).
  void HalfClose();
  /// Everything until the server closes (`*closed` true) or a read times out (false).
  std::string ReadToEnd(bool* closed = nullptr);
  /// One whole response (header and Content-Length body); "" on a timeout or a close first.
  std::string ReadResponse();

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string pending_;  // read past the last whole response
};

}  // namespace keel::testing
