#pragma once
// Test-only: an HttpServer on 127.0.0.1 and an ephemeral port, for the net layer's tests.

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <string_view>

#include "keel/net/http_server.h"

namespace keel::net {

// A server on 127.0.0.1, port 0, stopped by the destructor before it is destroyed.
class TestServer {
 public:
  explicit TestServer(Handler handler, ServerOptions options = {}) {
    options.host = "127.0.0.1";
    options.port = 0;
    auto created = HttpServer::Create(options, std::move(handler));
    if (!created.ok()) {
      ADD_FAILURE() << "cannot start the server: " << created.error().message;
      return;
    }
    server_ = std::move(created).value();
    url_ = "http://127.0.0.1:" + std::to_string(server_->port());
  }
  ~TestServer() { Stop(); }
  void Stop() {
    if (server_) server_->Stop();
  }
  HttpServer* operator->() { return server_.get(); }
  bool ok() const { return server_ != nullptr; }
  std::string Url(std::string_view target) const { return url_ + std::string(target); }

 private:
  std::unique_ptr<HttpServer> server_;
  std::string url_;
};

}  // namespace keel::net
