// Fuzzes the JSON body of every endpoint of keel's HTTP API (src/api/api_server.cc)
// end to end: one in-process ApiServer for the whole run, on the example config
// (examples/keel.yaml: its pipelines and input schemas, the built-in mock provider) with
// a SQLite store in a temporary directory, no workers. Each input is
//   "METHOD PATH\nBODY"  e.g.  "POST /v1/runs\n{\"pipeline\":\"triage\",\"input\":{...}}"
// sent as one HTTP/1.1 request with Content-Type: application/json on a new connection.
// The method is kept to its letters and the path to printable ASCII, so that the body is
// what is fuzzed (fuzz/http_request_fuzz.cc fuzzes the raw bytes). "#mock" directives,
// the mock provider's fault injection (hangs, delays), are defused, and a task poll's
// wait_ms is set to 0. Properties: no crash, an answer within 10 s, the server serving
// the next request.

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "fuzz_support.h"
#include "keel/api/api_server.h"
#include "keel/core/clock.h"
#include "keel/core/config.h"
#include "keel/core/random.h"
#include "keel/gateway/gateway.h"
#include "keel/store/sqlite_store.h"
#include "loopback.h"

#ifndef KEEL_SOURCE_DIR
#error "KEEL_SOURCE_DIR must name the source tree (fuzz/CMakeLists.txt defines it)"
#endif

namespace {

struct Node {
  std::string dir;
  keel::Config config;
  std::unique_ptr<keel::Random> random;
  prometheus::Registry registry;
  std::unique_ptr<keel::store::Store> store;
  std::unique_ptr<keel::gateway::Gateway> gateway;
  std::unique_ptr<keel::api::ApiServer> api;
};

Node& Get() {
  static Node* node = [] {
    auto* n = new Node;
    // KEEL_FUZZ_TMP (scripts/fuzz.sh sets it), else /dev/shm, else /tmp.
    const char* base = std::getenv("KEEL_FUZZ_TMP");
    if (base == nullptr) base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = std::string(base) + "/keel-api-fuzz-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) keel::fuzz::Fail("mkdtemp failed");
    n->dir = tmpl;
    // At exit (libFuzzer's -max_total_time ends with exit()), the server, the gateway and
    // the store stop and join their threads before static destructors run; then the
    // directory goes. A crashed run leaves it (scripts/fuzz.sh removes its KEEL_FUZZ_TMP).
    std::atexit([] {
      Node& n = Get();
      if (n.api) n.api->Stop();
      n.api.reset();
      n.gateway.reset();
      n.store.reset();
      std::error_code ec;
      std::filesystem::remove_all(n.dir, ec);
    });
    std::ifstream in(KEEL_SOURCE_DIR "/examples/keel.yaml");
    std::stringstream ss;
    ss << in.rdbuf();
    std::string yaml = ss.str();
    const std::string from = "storage: sqlite://keel-data/keel.db";
    const auto at = yaml.find(from);
    if (at == std::string::npos)
      keel::fuzz::Fail("examples/keel.yaml has no storage line to replace");
    yaml.replace(at, from.size(), "storage: sqlite://" + n->dir + "/keel.db");
    auto config =
        keel::ParseConfig(yaml, [](const std::string&) { return std::optional<std::string>(); });
    if (!config.ok()) keel::fuzz::Fail("examples/keel.yaml does not parse", config.error().message);
    n->config = std::move(config).value();
    n->config.server.handler_threads = 4;
    n->random = std::make_unique<keel::SeededRandom>(1);
    const keel::Clock& clock = *keel::SystemClock::Instance();
    keel::store::SqliteOptions so;
    so.path = n->dir + "/keel.db";
    so.read_connections = 2;
    auto store = keel::store::OpenSqliteStore(so, clock, *n->random);
    if (!store.ok()) keel::fuzz::Fail("cannot open the store", store.error().message);
    n->store = std::move(store).value();
    auto gateway = keel::gateway::Gateway::Create(n->config, n->registry, clock, *n->random);
    if (!gateway.ok()) keel::fuzz::Fail("cannot build the gateway", gateway.error().message);
    n->gateway = std::move(gateway).value();
    keel::net::ServerOptions server;
    server.io_threads = 1;
    server.max_body_bytes = n->config.server.max_body_bytes;
    auto api = keel::api::ApiServer::Create(n->config, server, *n->store, *n->gateway, clock,
                                            *n->random, n->registry);
    if (!api.ok()) keel::fuzz::Fail("cannot start the API", api.error().message);
    n->api = std::move(api).value();
    return n;
  }();
  return *node;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel;
  Node& node = Get();
  const std::string_view text = fuzz::AsText(data, size);
  const auto nl = text.find('\n');
  const std::string_view line = text.substr(0, nl);
  std::string body(nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1));

  std::string method, path;
  const auto space = line.find(' ');
  for (char c : line.substr(0, space)) {
    if (c >= 'A' && c <= 'Z') method.push_back(c);
  }
  if (space != std::string_view::npos) {
    for (char c : line.substr(space + 1)) {
      if (c > 0x20 && c < 0x7f) path.push_back(c);
    }
  }
  if (method.empty()) method = "POST";
  if (path.empty() || path[0] != '/') path.insert(0, "/");

  for (std::size_t at = 0; (at = body.find("#mock", at)) != std::string::npos; at += 5)
    body[at + 3] = '_';
  if (path.find("tasks/poll") != std::string::npos) {
    if (auto v = ParseJson(body); v.ok() && v->is_object() && v->get_object().contains("wait_ms")) {
      v->get_object()["wait_ms"] = 0;
      body = json::serialize(*v);
    }
  }

  std::string request =
      method + " " + path + " HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n" +
      "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  const std::string answer = fuzz::Exchange(node.api->port(), request);
  if (answer.rfind("HTTP/1.1 ", 0) != 0) fuzz::Fail("no HTTP answer", request.substr(0, 2000));
  return 0;
}
