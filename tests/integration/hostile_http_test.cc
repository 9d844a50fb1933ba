// Hostile and careless requests against a real `keel serve` over raw sockets: the
// built-in configuration (examples/keel.yaml) with a short server.header_timeout, on an
// ephemeral loopback port. Every request of the table must be answered 4xx or have its
// connection closed (never 5xx, never a hang: reads are bounded), and the node must
// answer GET /healthz promptly after each; at the end its RSS stays bounded.
// KEEL_HOSTILE_VERBOSE=1 prints each row's answer; the last line names the rows that
// failed (and the item of issue 10 a row depends on, when it is not the HTTP surface).

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "helpers.h"
#include "keel/core/json.h"
#include "keel/testing/raw_socket.h"

namespace keel::testing {
namespace {

using namespace std::chrono_literals;
using namespace std::string_literals;
using std::chrono::milliseconds;

struct Exchanged {
  bool connected = false;
  int status = 0;       // of the first answer; 0: none
  std::string first;    // the first answer, header and body
  std::string rest;     // what came after it (a second answer would be a smuggled request)
  bool closed = false;  // the server closed the connection
  bool timed_out = false;
};

int StatusOf(std::string_view response) {
  if (response.size() < 12 || response.substr(0, 5) != "HTTP/") return 0;
  return std::atoi(std::string(response.substr(9, 3)).c_str());
}

// Splits `all` after its first answer (Content-Length framed: keel's answers are).
void SplitFirst(const std::string& all, Exchanged& e) {
  const auto end = all.find("\r\n\r\n");
  if (end == std::string::npos) {
    e.first = all;
    return;
  }
  std::size_t length = 0;
  std::string head = all.substr(0, end);
  for (auto& c : head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (const auto cl = head.find("\r\ncontent-length:"); cl != std::string::npos) {
    length = std::strtoul(head.c_str() + cl + 17, nullptr, 10);
  }
  const std::size_t cut = std::min(all.size(), end + 4 + length);
  e.first = all.substr(0, cut);
  e.rest = all.substr(cut);
}

// Sends `request` on a new connection, half-closes (unless told not to) and reads
// everything the server answers until it closes, each read bounded by `timeout`.
Exchanged Exchange(uint16_t port, std::string_view request, bool half_close = true,
                   milliseconds timeout = 5s, const char* source = nullptr) {
  Exchanged e;
  RawSocket s(port, timeout, source);
  e.connected = s.connected();
  if (!e.connected) return e;
  s.Send(request);  // a server that closes early (huge headers) may stop reading
  if (half_close) s.HalfClose();
  bool closed = false;
  const std::string all = s.ReadToEnd(&closed);
  e.closed = closed;
  e.timed_out = !closed;
  SplitFirst(all, e);
  e.status = StatusOf(e.first);
  return e;
}

std::string BodyOf(const std::string& response) {
  const auto end = response.find("\r\n\r\n");
  return end == std::string::npos ? std::string() : response.substr(end + 4);
}

// A request as a careful client would frame it, around a hostile part.
std::string Request(std::string_view method, std::string_view target, std::string_view body = {},
                    std::string_view extra_headers = {}) {
  std::string r =
      std::string(method) + " " + std::string(target) + " HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  r += extra_headers;
  if (!body.empty() || method == "POST") {
    r +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  r += "\r\n";
  r += body;
  return r;
}

std::string Nested(int depth, std::string_view leaf = "1") {
  std::string s;
  for (int i = 0; i < depth; ++i) s += "{\"a\":";
  s += leaf;
  for (int i = 0; i < depth; ++i) s += "}";
  return s;
}

std::string Run(std::string_view input) {
  return R"({"pipeline":"echo","input":)" + std::string(input) + "}";
}

enum class Expect {
  kRefused,        // 4xx, or closed without an answer
  kStored,         // 201, and the run ends and reads back (GET answers 200 with valid JSON)
  kRefusedOrExact  // 4xx, or 201 and the run reads back with `exact` in its input as sent
};

struct Row {
  std::string name;
  std::string request;
  Expect expect = Expect::kRefused;
  std::string exact;       // kRefusedOrExact: the literal that must come back as sent
  bool half_close = true;  // false: the client sends and then waits (header timeout rows)
  std::string depends_on;  // an item of issue 10 that is not the HTTP surface's, if any
};

std::vector<Row> HostileRows(uint16_t port) {
  std::vector<Row> rows;
  auto add = [&rows](std::string name, std::string request, std::string depends_on = {}) {
    rows.push_back(Row{
        std::move(name), std::move(request), Expect::kRefused, {}, true, std::move(depends_on)});
  };
  const std::string kSmuggled = "GET /v1/runs?limit=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

  // Request lines.
  add("empty request line", "\r\n\r\n\r\n");
  add("method only", "GET\r\n\r\n");
  add("no version", "GET /healthz\r\n\r\n");
  add("three words and more", "GET /healthz HTTP/1.1 extra\r\nHost: x\r\n\r\n");
  add("bad method characters", "G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
  add("HTTP/2.0 text", "GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n");
  add("HTTP/0.9", "GET /healthz HTTP/0.9\r\n\r\n");
  add("HTTP/9.9", "GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n");
  add("bad protocol name", "GET /healthz HTTX/1.1\r\nHost: x\r\n\r\n");
  add("double space", "GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
  add("tab separator", "GET\t/healthz\tHTTP/1.1\r\nHost: x\r\n\r\n");
  add("NUL in the request line", "GET /\0 HTTP/1.1\r\nHost: x\r\n\r\n"s);
  add("TLS client hello", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00"s);
  add("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
  add("binary garbage", "\xff\xfe\xfd\x00\x01\x02\r\n\r\n"s);
  add("a 20 KB method", std::string(20000, 'A') + " / HTTP/1.1\r\nHost: x\r\n\r\n");
  add("lower-case method", "get /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
  add("unknown method", "BREW /v1/runs HTTP/1.1\r\nHost: x\r\n\r\n");
  add("DELETE a collection", Request("DELETE", "/v1/runs"));
  add("PUT a collection", Request("PUT", "/v1/runs", "{}"));
  add("PATCH a run", Request("PATCH", "/v1/runs/run_x", "{}"));
  add("TRACE", Request("TRACE", "/"));
  add("CONNECT authority-form", "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n");
  add("OPTIONS asterisk-form", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
  add("GET asterisk-form", "GET * HTTP/1.1\r\nHost: x\r\n\r\n");
  add("HEAD on a GET endpoint", Request("HEAD", "/v1/nope"));
  add("bare LF line ends", "GET /v1/nope HTTP/1.1\nHost: x\n\n");
  add("bare CR line ends", "GET /v1/nope HTTP/1.1\rHost: x\r\r");

  // Targets and paths.
  add("%2F in a run id (cancel)",
      Request("POST", "/v1/runs/run_01M886XH108SYZNQZAW2234B90%2Fcancel", "{}"));
  add("%2f in a run id (events)",
      Request("GET", "/v1/runs/run_01M886XH108SYZNQZAW2234B90%2fevents"));
  add("escaped dot segments", Request("GET", "/v1/runs/%2e%2e/%2e%2e/etc/passwd"));
  add("dot segments", Request("GET", "/../../../etc/passwd"));
  add("%00 in a run id", Request("GET", "/v1/runs/run_x%00"));
  add("%00 alone", Request("GET", "/%00"));
  add("malformed escape", Request("GET", "/v1/runs/%zz"));
  add("truncated escape", Request("GET", "/v1/runs/%4"));
  add("invalid UTF-8 escape", Request("GET", "/v1/runs/%FF%FE"));
  add("overlong UTF-8 escape", Request("GET", "/v1/runs/%C0%AF"));
  add("surrogate escape", Request("GET", "/v1/runs/%ED%A0%80"));
  add("CR LF escapes in the path", Request("GET", "/v1/runs/x%0D%0ASet-Cookie:%20a=b"));
  add("raw byte beyond ASCII", Request("GET", "/v1/runs/\xc3\xa9"));
  add("fragment in the target", Request("GET", "/healthz#frag"));
  add("a relative target", Request("GET", "healthz"));
  add("absolute-form with another scheme", Request("GET", "ftp://127.0.0.1/healthz"));
  add("absolute-form to an unknown path",
      Request("GET", "http://127.0.0.1:" + std::to_string(port) + "/v1/nope"));
  add("absolute-form without a host", Request("GET", "http:///healthz"));
  add("overlong URL (over the header limit)",
      Request("GET", "/v1/runs/" + std::string(20000, 'a')));
  add("long URL (under the header limit)", Request("GET", "/v1/runs/" + std::string(12000, 'a')));
  add("long query", Request("GET", "/v1/runs?cursor=" + std::string(12000, 'z')));
  add("limit=-1", Request("GET", "/v1/runs?limit=-1"));
  add("limit=0", Request("GET", "/v1/runs?limit=0"));
  add("limit beyond 64 bits", Request("GET", "/v1/runs?limit=123456789012345678901234567890"));
  add("limit=1e400", Request("GET", "/v1/runs?limit=1e400"));
  add("limit=abc", Request("GET", "/v1/runs?limit=abc"));
  add("events after=-5 of an unknown run", Request("GET", "/v1/runs/run_x/events?after=-5"));
  add("signal name with %00", Request("POST", "/v1/runs/run_x/signals/a%00b", "{}"));
  add("signal name too long",
      Request("POST", "/v1/runs/run_x/signals/" + std::string(300, 's'), "{}"));
  add("unknown endpoint", Request("GET", "/v2/runs"));
  add("too many segments", Request("GET", "/v1/runs/a/b/c/d/e/f"));

  // Headers.
  add("HTTP/1.1 without Host", "GET /healthz HTTP/1.1\r\n\r\n");
  add("two Host headers", "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
  add("header without a colon", "GET /healthz HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n");
  add("space in a header name", "GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n");
  add("space before the colon", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A : v\r\n\r\n");
  add("NUL in a header value", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n"s);
  add("CR inside a header value", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\n\r\n");
  add("obsolete line folding", "GET /v1/nope HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n");
  add("a 20 KB header value",
      "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(20000, 'v') + "\r\n\r\n");
  add("3,000 small headers", [] {
    std::string r = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
    for (int i = 0; i < 3000; ++i) r += "X-" + std::to_string(i) + ": v\r\n";
    return r + "\r\n";
  }());
  add("header block never ended, then EOF", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: v\r\n");
  add("Content-Length -1", "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}");
  add("Content-Length abc", "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}");
  add("Content-Length beyond 64 bits",
      "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: "
      "123456789012345678901234567890\r\n\r\n{}");
  add("Content-Length over the body limit",
      "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{}");
  add("body shorter than Content-Length, then EOF",
      "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pipeline\":");
  add("Idempotency-Key of 300 characters",
      Request("POST", "/v1/runs", Run("{}"), "Idempotency-Key: " + std::string(300, 'k') + "\r\n"));
  add("Idempotency-Key with a control character",
      Request("POST", "/v1/runs", Run("{}"), "Idempotency-Key: a\x7f b\r\n"));
  add("X-Keel-Route naming a provider, not a route",
      Request("POST", "/v1/chat/completions",
              R"({"model":"default","messages":[{"role":"user","content":"hi"}]})",
              "X-Keel-Route: mock\r\n"),
      "item 6: X-Keel-Route names routes only (gateway)");

  // Transfer codings and smuggling.
  const std::string post = "POST /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  add("TE gzip, body is a request", post + "Transfer-Encoding: gzip\r\n\r\n" + kSmuggled);
  add("TE chunked, gzip", post + "Transfer-Encoding: chunked, gzip\r\n\r\n" + kSmuggled);
  add("TE gzip, chunked", post + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + kSmuggled);
  add("TE identity", post + "Transfer-Encoding: identity\r\n\r\n" + kSmuggled);
  add("TE unknown coding", post + "Transfer-Encoding: x-custom\r\n\r\n" + kSmuggled);
  add("TE empty", post + "Transfer-Encoding: \r\n\r\n" + kSmuggled);
  add("TE xchunked", post + "Transfer-Encoding: xchunked\r\n\r\n" + kSmuggled);
  add("TE chunked twice",
      post + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" +
          kSmuggled);
  add("TE gzip then TE chunked",
      post + "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + kSmuggled);
  add("TE on HTTP/1.0",
      "POST /v1/nope HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + kSmuggled);
  add("CL then TE (CL.TE)",
      post + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG" + kSmuggled);
  add("TE then CL (TE.CL)", post + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" +
                                kSmuggled + "\r\n0\r\n\r\n");
  add("two different Content-Lengths",
      post + "Content-Length: 0\r\nContent-Length: 44\r\n\r\n" + kSmuggled);
  add("Content-Length list that disagrees", post + "Content-Length: 0, 44\r\n\r\n" + kSmuggled);
  add("bad chunk size", post + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n");
  add("chunk size beyond 64 bits",
      post + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n0\r\n\r\n");
  add("negative chunk size", post + "Transfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n");
  add("chunk data without its CRLF",
      post + "Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n");
  add("chunk over the body limit", post + "Transfer-Encoding: chunked\r\n\r\n200000\r\nabc");
  add("chunk extension of 20 KB", post + "Transfer-Encoding: chunked\r\n\r\n3;" +
                                      std::string(20000, 'e') + "\r\nabc\r\n0\r\n\r\n");
  add("trailer of 20 KB",
      post + "Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + std::string(20000, 't') + "\r\n\r\n");
  add("chunked body cut short, then EOF", post + "Transfer-Encoding: chunked\r\n\r\n10\r\nabc");
  add("many small chunks over the body limit", [&post] {
    std::string r = post + "Transfer-Encoding: chunked\r\n\r\n";
    const std::string chunk = "400\r\n" + std::string(1024, 'c') + "\r\n";
    for (int i = 0; i < 1100; ++i) r += chunk;
    return r + "0\r\n\r\n";
  }());

  // Bad JSON bodies for every endpoint that takes one.
  const std::vector<std::pair<std::string, std::string>> endpoints = {
      {"submit", "/v1/runs"},
      {"signal", "/v1/runs/run_01M886XH108SYZNQZAW2234B90/signals/approval"},
      {"task poll", "/v1/tasks/poll"},
      {"task complete", "/v1/tasks/tok_not_a_token/complete"},
      {"task fail", "/v1/tasks/tok_not_a_token/fail"},
      {"chat", "/v1/chat/completions"},
      {"embeddings", "/v1/embeddings"},
  };
  const std::vector<std::pair<std::string, std::string>> bodies = {
      {"an unfinished object", "{"},
      {"a stray brace", "}"},
      {"text", "not json"},
      {"an array", "[]"},
      {"null", "null"},
      {"a string", "\"text\""},
      {"two documents", R"({"a":1}{"b":2})"},
      {"a trailing comma", R"({"a":1,})"},
      {"single quotes", "{'a':1}"},
      {"invalid UTF-8", "{\"model\":\"\xff\xfe\",\"queue\":\"\xc0\xaf\"}"},
      {"a lone surrogate escape", R"({"model":"\ud800","queue":"\ud800"})"},
      {"nesting 10,000 deep", std::string(10000, '[') + std::string(10000, ']')},
      {"objects 10,000 deep", Nested(10000)},
      {"1e400", R"({"model":1e400,"queue":1e400,"pipeline":1e400})"},
      {"a NUL byte", "{\"a\":\0}"s},
  };
  for (const auto& [ename, target] : endpoints) {
    for (const auto& [bname, body] : bodies)
      add(ename + ": " + bname, Request("POST", target, body));
  }

  // Run inputs.
  auto stored = [&rows](std::string name, std::string body, std::string depends_on = {}) {
    rows.push_back(Row{std::move(name),
                       Request("POST", "/v1/runs", body),
                       Expect::kStored,
                       {},
                       true,
                       std::move(depends_on)});
  };
  auto exact = [&rows](std::string name, std::string literal, std::string depends_on = {}) {
    rows.push_back(Row{std::move(name), Request("POST", "/v1/runs", Run("{\"m\":" + literal + "}")),
                       Expect::kRefusedOrExact, literal, true, std::move(depends_on)});
  };
  const std::string codec = "item 1: one JSON contract (the codec, the lead)";
  add("input 1e400", Request("POST", "/v1/runs", Run(R"({"m":1e400})")), codec);
  add("input -1e400", Request("POST", "/v1/runs", Run(R"({"m":-1e400})")), codec);
  add("input 1e400 in an array", Request("POST", "/v1/runs", Run(R"({"m":[1,2,1e400]})")), codec);
  add("input nested 100 deep", Request("POST", "/v1/runs", Run(Nested(100))), codec);
  add("input nested 10,000 deep", Request("POST", "/v1/runs", Run(Nested(10000))));
  add("input invalid UTF-8", Request("POST", "/v1/runs", Run("{\"s\":\"\xed\xa0\x80\"}")));
  add("input over the body limit",
      Request("POST", "/v1/runs", Run("{\"s\":\"" + std::string(1100000, 'x') + "\"}")));
  add("pipeline name with CR LF",
      Request("POST", "/v1/runs", R"({"pipeline":"echo\r\nX-Injected: 1","input":{}})"));
  add("pipeline name of 100 KB",
      Request("POST", "/v1/runs", "{\"pipeline\":\"" + std::string(100000, 'p') + "\"}"));
  add("pipeline not a string", Request("POST", "/v1/runs", R"({"pipeline":["echo"],"input":{}})"));
  add("an unknown field",
      Request("POST", "/v1/runs", R"({"pipeline":"echo","input":{},"priority":1})"));
  {
    const std::string body = Run(R"({"m":1e400})");
    char size[16];
    std::snprintf(size, sizeof size, "%zx", body.size());
    add("submit through chunked with 1e400",
        "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: "
        "chunked\r\n\r\n" +
            std::string(size) + "\r\n" + body + "\r\n0\r\n\r\n",
        codec);
  }
  add("chat max_tokens 1e400",
      Request(
          "POST", "/v1/chat/completions",
          R"({"model":"default","messages":[{"role":"user","content":"hi"}],"max_tokens":1e400})"),
      codec);
  add("chat messages not an array",
      Request("POST", "/v1/chat/completions", R"({"model":"default","messages":"hi"})"));
  add("chat unknown model",
      Request("POST", "/v1/chat/completions",
              R"({"model":"no-such-route","messages":[{"role":"user","content":"hi"}]})"));
  add("embeddings input 1e400",
      Request("POST", "/v1/embeddings", R"({"model":"default","input":1e400})"), codec);
  exact("input integer beyond 64 bits", "123456789012345678901234567890", codec);
  exact("input negative integer beyond 64 bits", "-123456789012345678901234567890", codec);
  exact("input 2^64", "18446744073709551616", codec);
  stored("input nested 30 deep", Run(Nested(30)), codec);
  stored("input with an escaped NUL", Run(R"({"s":"a\u0000b"})"));
  stored("input with escaped CR LF", Run(R"({"s":"a\r\nGET /smuggled HTTP/1.1\r\n"})"));

  // A header that never ends while the client waits: closed by server.header_timeout.
  rows.push_back(Row{"header never completed (header timeout)",
                     "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                     Expect::kRefused,
                     {},
                     false,
                     {}});
  return rows;
}

// RSS of `pid` in bytes (VmRSS of /proc/PID/status); -1 when unreadable.
int64_t RssBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

class HostileHttpTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Room for the idle-socket test's 1,100 sockets, here and in the keel child.
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < 4096) {
      lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 4096);
      ::setrlimit(RLIMIT_NOFILE, &lim);
    }
    std::ifstream in(std::string(KEEL_SOURCE_DIR) + "/examples/keel.yaml");
    std::stringstream builtin;
    builtin << in.rdbuf();
    dir_ = new TempDir();
    // The built-in config (what `keel serve` runs without --config), with a header
    // timeout short enough for a test to see it.
    server_ = new KeelServer(dir_->path(), builtin.str() + "\nserver: {header_timeout: 1s}\n");
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }
  static void TearDownTestSuite() {
    delete server_;
    delete dir_;
  }
  static uint16_t port() { return server_->port(); }
  static std::string Url(const std::string& path) { return server_->url() + path; }

  // GET /healthz on a new connection from `source`, answered within 2s.
  static int Healthz(const char* source = nullptr) {
    return Exchange(port(), "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                    true, 2s, source)
        .status;
  }

  // A row that must be accepted: 201, the run ends, and it reads back (run, events, list).
  static void CheckStoredRun(const Exchanged& a, const Row& row) {
    ASSERT_EQ(a.status, 201) << a.first.substr(0, 400);
    auto created = ParseJson(BodyOf(a.first));
    ASSERT_TRUE(created.ok()) << a.first.substr(0, 400);
    const auto* id_value = created->is_object() ? created->as_object().if_contains("id") : nullptr;
    ASSERT_TRUE(id_value != nullptr && id_value->is_string()) << a.first.substr(0, 400);
    const std::string id(id_value->as_string());
    const auto run = WaitForTerminal(server_->url(), id, 10s);
    ASSERT_TRUE(run.is_object()) << "GET /v1/runs/" << id << " never answered 200";
    EXPECT_EQ(Status(run), "succeeded") << json::serialize(run).substr(0, 400);
    const uint16_t p = port();
    const auto get = Exchange(p, "GET /v1/runs/" + id + " HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(get.status, 200) << get.first.substr(0, 400);
    EXPECT_TRUE(ParseJson(BodyOf(get.first)).ok()) << get.first.substr(0, 400);
    if (row.expect == Expect::kRefusedOrExact) {
      EXPECT_NE(BodyOf(get.first).find(row.exact), std::string::npos)
          << "not kept exactly: " << get.first.substr(0, 400);
    }
    const auto events = Exchange(p, "GET /v1/runs/" + id + "/events HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(events.status, 200) << events.first.substr(0, 400);
    const auto list = Exchange(p, "GET /v1/runs?limit=5 HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(list.status, 200) << list.first.substr(0, 400);
  }

  static TempDir* dir_;
  static KeelServer* server_;
};
TempDir* HostileHttpTest::dir_ = nullptr;
KeelServer* HostileHttpTest::server_ = nullptr;

TEST_F(HostileHttpTest, EscapedSlashIsNotAPathSeparator) {
  // A run that waits for a signal: cancellable, so a misrouted cancel would show.
  auto r = HttpPostJson(Url("/v1/runs"),
                        json::object{{"pipeline", "review"}, {"input", {{"topic", "tides"}}}});
  ASSERT_EQ(r.status, 201) << r.raw;
  const std::string id(r.body.at("id").as_string());
  ASSERT_TRUE(workers::AwaitRun(server_->url(), id,
                                [](const json::value& run) { return Status(run) == "waiting"; }));
  for (const std::string escaped : {"%2F", "%2f"}) {
    // The run "ID/cancel" under /v1/runs/{id}: not the cancel endpoint (405 or 404).
    auto cancel = Exchange(port(), "POST /v1/runs/" + id + escaped +
                                       "cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    EXPECT_TRUE(cancel.status == 404 || cancel.status == 405) << cancel.first;
    auto events =
        Exchange(port(), "GET /v1/runs/" + id + escaped + "events HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(events.status, 404) << events.first;
  }
  auto get = HttpGet(Url("/v1/runs/" + id));
  ASSERT_EQ(get.status, 200) << get.raw;
  EXPECT_EQ(Status(get.body), "waiting") << "the run was cancelled through %2F";
  // The real endpoint still works.
  auto cancel = Exchange(
      port(), "POST /v1/runs/" + id + "/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  EXPECT_EQ(cancel.status / 100, 2) << cancel.first;
}

TEST_F(HostileHttpTest, AbsoluteFormTargetsAreServed) {
  auto r = Exchange(port(), "GET http://127.0.0.1:" + std::to_string(port()) +
                                "/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
  EXPECT_EQ(r.status, 200) << r.first;
  r = Exchange(port(), "GET http://127.0.0.1/v1/runs?limit=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
  EXPECT_EQ(r.status, 200) << r.first;
}

TEST_F(HostileHttpTest, Http11WithoutHostIs400AndHttp10WithoutHostIsServed) {
  auto r = Exchange(port(), "GET /healthz HTTP/1.1\r\n\r\n");
  EXPECT_EQ(r.status, 400) << r.first;
  EXPECT_TRUE(r.closed);
  r = Exchange(port(), "GET /healthz HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r.status, 200) << r.first;
}

TEST_F(HostileHttpTest, ATransferEncodingNotEndingInChunkedIs400AndItsBodyIsNeverServed) {
  // Listing runs would be a 200: if the body were read as a second request, a second
  // answer would follow the first.
  for (const std::string te : {"gzip", "chunked, gzip", "x-unknown"}) {
    auto r = Exchange(port(),
                      "POST /v1/runs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te +
                          "\r\n\r\nGET /v1/runs?limit=1 HTTP/1.1\r\nHost: x\r\n\r\n",
                      /*half_close=*/false);
    EXPECT_EQ(r.status, 400) << te << ": " << r.first;
    EXPECT_TRUE(r.closed) << te << ": the connection was kept";
    EXPECT_EQ(r.rest, "") << te << ": the body was served as a request";
  }
}

TEST_F(HostileHttpTest, ASilentConnectionIsClosedAfterTheHeaderTimeout) {
  RawSocket silent(port(), 10s);
  ASSERT_TRUE(silent.connected());
  bool closed = false;
  EXPECT_EQ(silent.ReadToEnd(&closed), "");
  EXPECT_TRUE(closed) << "kept past server.header_timeout (1s)";
  EXPECT_EQ(Healthz(), 200);
}

TEST_F(HostileHttpTest, IdleSocketsFromOneAddressLeaveOtherClientsServed) {
  // 1,024 idle sockets from 127.0.0.1: once its share (max_connections_per_ip, 256) is
  // taken, its further connections are refused; 127.0.0.2 is still served. (Before the
  // bound, they took every slot and every client got 503 for server.idle_timeout.)
  std::vector<std::unique_ptr<RawSocket>> idle;
  for (int i = 0; i < 1024; ++i) {
    idle.push_back(std::make_unique<RawSocket>(port(), 5s));
    ASSERT_TRUE(idle.back()->connected()) << i;
  }
  EXPECT_EQ(Healthz("127.0.0.2"), 200);
  EXPECT_EQ(Healthz("127.0.0.3"), 200);
  idle.clear();
  // Its slots come back once those sockets are gone.
  EXPECT_TRUE(Eventually([] { return Healthz() == 200; }, 10s));
}

TEST_F(HostileHttpTest, HostileRequestsAreRefusedAndTheNodeStaysHealthy) {
  const auto rows = HostileRows(port());
  ASSERT_GE(rows.size(), 100u);
  std::vector<std::string> failed;
  for (const auto& row : rows) {
    SCOPED_TRACE("row: " + row.name);
    const int failures_before =
        ::testing::UnitTest::GetInstance()->current_test_info()->result()->total_part_count();
    const auto a = Exchange(port(), row.request, row.half_close, 5s);
    EXPECT_TRUE(a.connected);
    if (std::getenv("KEEL_HOSTILE_VERBOSE") != nullptr) {
      std::cerr << "row " << row.name << ": "
                << (a.status ? std::to_string(a.status) : std::string("no answer"))
                << (a.closed ? ", closed" : "") << "\n";
    }
    EXPECT_FALSE(a.timed_out) << "no answer and no close within 5s (a hang)";
    EXPECT_FALSE(a.status >= 500) << "answered " << a.status << ": " << a.first.substr(0, 400);
    EXPECT_EQ(a.rest.find("HTTP/1."), std::string::npos)
        << "a second answer: " << a.rest.substr(0, 300);
    if (a.status != 0) {
      const std::string body = BodyOf(a.first);
      auto parsed = ParseJson(body);
      EXPECT_TRUE(parsed.ok()) << "the answer is not valid UTF-8 JSON: " << body.substr(0, 300);
      EXPECT_EQ(body.find("/usr/"), std::string::npos) << body.substr(0, 300);
      EXPECT_EQ(body.find(".hpp"), std::string::npos) << body.substr(0, 300);
    }
    switch (row.expect) {
      case Expect::kRefused:
        EXPECT_TRUE((a.status >= 400 && a.status < 500) || (a.status == 0 && a.closed))
            << "answered " << a.status << ": " << a.first.substr(0, 400);
        break;
      case Expect::kStored:
      case Expect::kRefusedOrExact:
        if (row.expect == Expect::kRefusedOrExact && a.status >= 400 && a.status < 500) break;
        CheckStoredRun(a, row);
        break;
    }
    EXPECT_EQ(Healthz(), 200) << "the node did not answer /healthz promptly after the row";
    const int failures_after =
        ::testing::UnitTest::GetInstance()->current_test_info()->result()->total_part_count();
    if (failures_after != failures_before) {
      failed.push_back(row.name + (row.depends_on.empty() ? "" : " [" + row.depends_on + "]"));
    }
  }
  // The node is up, still serves normal requests, and holds its memory.
  EXPECT_EQ(HttpGet(Url("/v1/runs?limit=1")).status, 200);
  const int64_t rss = RssBytes(server_->process().pid());
  ASSERT_GT(rss, 0);
  EXPECT_LT(rss, int64_t{512} << 20)
      << "RSS " << (rss >> 20) << " MiB after " << rows.size() << " hostile requests";
  std::string summary;
  for (const auto& f : failed) summary += "\n  " + f;
  RecordProperty("rows", static_cast<int>(rows.size()));
  EXPECT_TRUE(failed.empty()) << failed.size() << " of " << rows.size()
                              << " rows failed:" << summary;
  std::cerr << "hostile rows: " << rows.size() << ", failed: " << failed.size() << summary << "\n";
}

}  // namespace
}  // namespace keel::testing
