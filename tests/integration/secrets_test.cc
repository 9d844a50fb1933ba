// Secrets scrubbed at the source: an upstream that echoes the request's headers in its
// error bodies, and a base_url with a password. No configured secret may reach a client
// error, a stored run error, an event or keel's log.

#include <gtest/gtest.h>

#include <mutex>

#include "helpers.h"
#include "keel/net/http_server.h"

namespace keel::testing {
namespace {

constexpr const char* kApiKey = "sk-live-ECHOED-api-key-0123456789";
constexpr const char* kHeaderToken = "tok-ECHOED-header-9876543210";
constexpr const char* kUrlPassword = "pw-ECHOED-in-url-55555";

// Answers every call with an error whose body echoes every request header: 400 when the
// prompt says "four hundred", 500 otherwise.
class EchoingUpstream {
 public:
  EchoingUpstream() {
    auto s = net::HttpServer::Create(
        net::ServerOptions{}, [](net::HttpRequest&& req, net::Responder respond) {
          std::string echoed;
          for (const auto& [k, v] : req.headers) echoed += k + ": " + v + "; ";
          net::HttpResponse r;
          r.status = req.body.find("four hundred") != std::string::npos ? 400 : 500;
          r.body = json::serialize(json::object{
              {"error", json::object{{"message", "rejected request with headers " + echoed},
                                     {"type", "invalid_request_error"}}}});
          respond(std::move(r));
        });
    EXPECT_TRUE(s.ok());
    if (s.ok()) server_ = std::move(s).value();
  }
  ~EchoingUpstream() {
    if (server_) server_->Stop();
  }
  std::string hostport() const {
    return "127.0.0.1:" + std::to_string(server_ ? server_->port() : 0);
  }

 private:
  std::unique_ptr<net::HttpServer> server_;
};

class SecretsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string yaml =
        "storage: sqlite://data/keel.db\n"
        "log_level: debug\n"
        "engine: {workers: 2, poll_interval: 50ms}\n"
        "providers:\n"
        "  echo: {type: openai, base_url: http://" +
        upstream_.hostport() + "/v1, api_key: " + kApiKey +
        ", headers: {X-Api-Token: " + kHeaderToken +
        "}, timeout: {connect: 1s, total: 5s}}\n"
        "  pw: {type: openai, base_url: \"http://keel:" +
        kUrlPassword + "@" + upstream_.hostport() +
        "/v1\", timeout: {connect: 1s, total: 5s}}\n"
        "routes:\n"
        "  r: {targets: [{provider: echo}], retry: {max_attempts: 1}}\n"
        "  p: {targets: [{provider: pw}], retry: {max_attempts: 1}}\n"
        "pipelines:\n"
        "  ask_r:\n"
        "    retry: {max_attempts: 1}\n"
        "    steps:\n"
        "      - id: q\n"
        "        llm: {route: r, messages: [{role: user, content: \"{{input.prompt}}\"}]}\n"
        "  ask_p:\n"
        "    retry: {max_attempts: 1}\n"
        "    steps:\n"
        "      - id: q\n"
        "        llm: {route: p, messages: [{role: user, content: \"{{input.prompt}}\"}]}\n";
    server_ = std::make_unique<KeelServer>(dir_.path(), yaml);
    ASSERT_NE(server_->port(), 0) << "keel serve did not start";
  }

  static void ExpectNoSecret(const std::string& text, const std::string& where) {
    for (const char* secret : {kApiKey, kHeaderToken, kUrlPassword}) {
      EXPECT_EQ(text.find(secret), std::string::npos) << where << " carries " << secret << ":\n"
                                                      << text;
    }
  }

  std::string Log() {
    std::string all;
    for (const auto& line : server_->process().Lines()) all += line + "\n";
    return all;
  }

  EchoingUpstream upstream_;
  TempDir dir_;
  std::unique_ptr<KeelServer> server_;
};

TEST_F(SecretsTest, AnEchoedKeyOrHeaderNeverReachesAClientError) {
  for (const char* prompt : {"four hundred", "five hundred"}) {
    auto r = HttpPostJson(server_->url() + "/v1/chat/completions", Chat("r", prompt));
    EXPECT_GE(r.status, 400) << r.raw;
    ExpectNoSecret(r.raw, std::string("the answer to ") + prompt);
    // What the upstream said is kept, scrubbed: the echo is there with *** in place.
    EXPECT_NE(r.raw.find("Bearer ***"), std::string::npos) << r.raw;
    EXPECT_NE(r.raw.find("X-Api-Token: ***"), std::string::npos) << r.raw;
  }
  auto s = StreamCall(server_->url(), StreamBody("r", "five hundred"));
  ASSERT_TRUE(s.transport_ok);
  EXPECT_GE(s.status, 400);
  ExpectNoSecret(s.raw, "a streamed call's error");
  ExpectNoSecret(Log(), "keel's log");
}

TEST_F(SecretsTest, AnEchoedKeyNeverReachesAStoredRunErrorOrItsEvents) {
  for (const char* prompt : {"four hundred", "five hundred"}) {
    const std::string id =
        workers::Submit(server_->url(), "ask_r", json::object{{"prompt", prompt}});
    ASSERT_FALSE(id.empty());
    const auto run = WaitForTerminal(server_->url(), id);
    ASSERT_TRUE(run.is_object());
    EXPECT_NE(Status(run), "succeeded") << json::serialize(run);
    const std::string body = json::serialize(run);
    ExpectNoSecret(body, "the stored run");
    EXPECT_NE(body.find("***"), std::string::npos)
        << "the upstream's error is kept, scrubbed: " << body;
    ExpectNoSecret(HttpGet(server_->url() + "/v1/runs/" + id + "/events").raw, "the run's events");
  }
  ExpectNoSecret(HttpGet(server_->url() + "/v1/dlq").raw, "the dead-letter queue");
  ExpectNoSecret(Log(), "keel's log");
}

TEST_F(SecretsTest, APasswordInABaseUrlNeverAppears) {
  auto r = HttpPostJson(server_->url() + "/v1/chat/completions", Chat("p", "five hundred"));
  EXPECT_GE(r.status, 400) << r.raw;
  ExpectNoSecret(r.raw, "the client error");
  const std::string id =
      workers::Submit(server_->url(), "ask_p", json::object{{"prompt", "four hundred"}});
  ASSERT_FALSE(id.empty());
  const auto run = WaitForTerminal(server_->url(), id);
  ExpectNoSecret(json::serialize(run), "the stored run");
  ExpectNoSecret(HttpGet(server_->url() + "/v1/runs/" + id + "/events").raw, "the run's events");
  ExpectNoSecret(HttpGet(server_->url() + "/v1/models").raw, "/v1/models");
  ExpectNoSecret(Log(), "keel's log");
}

}  // namespace
}  // namespace keel::testing
