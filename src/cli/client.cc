// Client subcommands: talk to a running keel over its HTTP API.

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "commands.h"
#include "keel/core/json.h"
#include "keel/net/http_client.h"

namespace keel::cli {
namespace {

struct ClientFlags {
  std::string server;
};

std::string ServerUrl(const ClientFlags& f) {
  if (!f.server.empty()) return f.server;
  if (const char* env = std::getenv("KEEL_URL"); env && *env) return env;
  return "http://127.0.0.1:7420";
}

// Sends a request and prints the body. Returns the exit code: 0 on 2xx, 1 otherwise.
int Call(const ClientFlags& f, const std::string& method, const std::string& path, const std::string& body = {},
         net::Headers headers = {}, json::value* out = nullptr) {
  net::ClientRequest req;
  req.method = method;
  req.url = ServerUrl(f) + path;
  req.body = body;
  req.headers = std::move(headers);
  if (!body.empty()) req.headers.emplace_back("Content-Type", "application/json");
  req.total_timeout = std::chrono::seconds(30);
  auto resp = net::SendHttp(req);
  if (!resp.ok()) {
    std::cerr << "keel: cannot reach " << ServerUrl(f) << ": " << resp.error().message
              << "\n(is `keel serve` running? set --server or KEEL_URL)\n";
    return 1;
  }
  const bool ok = resp->status >= 200 && resp->status < 300;
  if (out) {
    boost::system::error_code ec;
    *out = json::parse(resp->body, ec);
  }
  if (!out || !ok) (ok ? std::cout : std::cerr) << resp->body << (resp->body.empty() || resp->body.back() != '\n' ? "\n" : "");
  return ok ? 0 : 1;
}

bool Terminal(std::string_view status) {
  return status == "succeeded" || status == "failed" || status == "cancelled" || status == "dead_lettered";
}

}  // namespace

void AddClientCommands(CLI::App& app) {
  auto flags = std::make_shared<ClientFlags>();
  auto add_server = [flags](CLI::App* cmd) {
    cmd->add_option("--server", flags->server, "keel server URL (default: $KEEL_URL or http://127.0.0.1:7420)");
  };

  // keel run PIPELINE --input JSON [--idempotency-key K] [--wait]
  {
    struct RunFlags {
      std::string pipeline, input = "{}", key;
      bool wait = false;
      int timeout_s = 300;
    };
    auto r = std::make_shared<RunFlags>();
    auto* cmd = app.add_subcommand("run", "Submit a run of a pipeline");
    cmd->add_option("PIPELINE", r->pipeline, "pipeline name")->required();
    cmd->add_option("--input", r->input, "the run's input, a JSON object")->capture_default_str();
    cmd->add_option("--idempotency-key", r->key, "the same key returns the same run");
    cmd->add_flag("--wait", r->wait, "wait until the run ends; exit 0 only if it succeeded");
    cmd->add_option("--timeout", r->timeout_s, "with --wait: give up after this many seconds")->capture_default_str();
    add_server(cmd);
    cmd->callback([flags, r] {
      boost::system::error_code ec;
      const json::value input = json::parse(r->input, ec);
      if (ec || !input.is_object()) {
        std::cerr << "keel run: --input must be a JSON object, e.g. '{\"text\": \"hello\"}'\n";
        ExitCode() = 2;
        return;
      }
      const std::string body = json::serialize(json::object{{"pipeline", r->pipeline}, {"input", input}});
      net::Headers h;
      if (!r->key.empty()) h.emplace_back("Idempotency-Key", r->key);
      json::value run;
      if (!r->wait) {
        ExitCode() = Call(*flags, "POST", "/v1/runs", body, h);
        return;
      }
      if (Call(*flags, "POST", "/v1/runs", body, h, &run) != 0 || !run.is_object()) {
        ExitCode() = 1;
        return;
      }
      const std::string id(run.at("id").as_string());
      std::cerr << "run " << id << " submitted; waiting\n";
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(r->timeout_s);
      auto delay = std::chrono::milliseconds(20);
      while (true) {
        json::value cur;
        if (Call(*flags, "GET", "/v1/runs/" + id, {}, {}, &cur) != 0 || !cur.is_object()) {
          ExitCode() = 1;
          return;
        }
        const std::string status(cur.at("status").as_string());
        if (Terminal(status)) {
          std::cout << json::serialize(cur) << "\n";
          ExitCode() = status == "succeeded" ? 0 : 1;
          return;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          std::cerr << "keel run: run " << id << " is still " << status << " after " << r->timeout_s << "s\n";
          ExitCode() = 1;
          return;
        }
        // Polling a remote server from the CLI: real time is the point here.
        std::this_thread::sleep_for(delay);
        delay = std::min(delay * 2, std::chrono::milliseconds(500));
      }
    });
  }

  // keel runs list|get|events|cancel|redrive|signal
  {
    auto* runs = app.add_subcommand("runs", "Inspect and act on runs");
    runs->require_subcommand(1);
    struct ListFlags {
      std::string status, pipeline, cursor;
      int limit = 50;
    };
    auto lf = std::make_shared<ListFlags>();
    auto* list = runs->add_subcommand("list", "List runs, newest first");
    list->add_option("--status", lf->status, "queued|running|waiting|succeeded|failed|cancelled|dead_lettered");
    list->add_option("--pipeline", lf->pipeline, "only runs of this pipeline");
    list->add_option("--limit", lf->limit, "runs per page (1..1000)")->capture_default_str();
    list->add_option("--cursor", lf->cursor, "next_cursor of the previous page");
    add_server(list);
    list->callback([flags, lf] {
      std::string q = "?limit=" + std::to_string(lf->limit);
      if (!lf->status.empty()) q += "&status=" + net::PercentEncode(lf->status);
      if (!lf->pipeline.empty()) q += "&pipeline=" + net::PercentEncode(lf->pipeline);
      if (!lf->cursor.empty()) q += "&cursor=" + net::PercentEncode(lf->cursor);
      ExitCode() = Call(*flags, "GET", "/v1/runs" + q);
    });
    auto id = std::make_shared<std::string>();
    struct Single {
      const char* name;
      const char* help;
      const char* method;
      const char* suffix;
    };
    for (const Single& s : {Single{"get", "Show a run with its steps", "GET", ""},
                            Single{"events", "Show a run's event log", "GET", "/events"},
                            Single{"cancel", "Cancel a run that has not ended", "POST", "/cancel"},
                            Single{"redrive", "Queue a dead-lettered or failed run again", "POST", "/redrive"}}) {
      auto* cmd = runs->add_subcommand(s.name, s.help);
      cmd->add_option("RUN_ID", *id, "the run's id")->required();
      add_server(cmd);
      cmd->callback([flags, id, s] { ExitCode() = Call(*flags, s.method, "/v1/runs/" + net::PercentEncode(*id) + s.suffix); });
    }
    struct SignalFlags {
      std::string run_id, name, payload = "null";
    };
    auto sf = std::make_shared<SignalFlags>();
    auto* signal = runs->add_subcommand("signal", "Send a signal (with a JSON payload) to a run, e.g. one waiting for it");
    signal->add_option("RUN_ID", sf->run_id, "the run's id")->required();
    signal->add_option("NAME", sf->name, "the signal's name (a wait_for_signal step's name)")->required();
    signal->add_option("--payload", sf->payload, "the payload: any JSON")->capture_default_str();
    add_server(signal);
    signal->callback([flags, sf] {
      auto parsed = ParseJson(sf->payload);
      if (!parsed.ok()) {
        std::cerr << "keel: --payload is not JSON: " << parsed.error().message << "\n";
        ExitCode() = 2;
        return;
      }
      ExitCode() = Call(*flags, "POST", "/v1/runs/" + net::PercentEncode(sf->run_id) + "/signals/" + net::PercentEncode(sf->name),
                        sf->payload, {{"Content-Type", "application/json"}});
    });
  }

  // keel dlq list
  {
    auto* dlq = app.add_subcommand("dlq", "The dead-letter queue");
    dlq->require_subcommand(1);
    auto limit = std::make_shared<int>(50);
    auto* list = dlq->add_subcommand("list", "List dead-lettered runs, newest first");
    list->add_option("--limit", *limit, "runs per page (1..1000)")->capture_default_str();
    add_server(list);
    list->callback([flags, limit] { ExitCode() = Call(*flags, "GET", "/v1/dlq?limit=" + std::to_string(*limit)); });
  }
}

}  // namespace keel::cli
