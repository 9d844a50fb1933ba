#!/usr/bin/env python3
"""An external worker for keel's `task` steps, in plain Python 3 (standard library only).

A pipeline step such as

    - id: lookup
      task: {queue: retrieval, input: {text: "{{input.question}}"}, heartbeat_timeout: 30s}

parks its run until a worker takes the task from the queue and answers. This worker
long-polls POST /v1/tasks/poll, runs a handler on the task's input, heartbeats while the
handler runs (every heartbeat_timeout / 3), then sends complete {"output"} or fail.

Run it beside a keel serve:

    python3 examples/worker.py --queue retrieval --handler upper
    KEEL_URL=http://10.0.0.5:7420 python3 examples/worker.py --queue retrieval --once

Handlers (--handler): echo, upper, slow, fail, flaky, exit; add your own to HANDLERS.
A handler takes the task's input and returns the output (any JSON value), or raises
TaskFailed; any other exception fails the task as retryable. Logs go to stderr, one line
per event. SIGTERM: the task in hand (or a poll in flight) is finished and answered, then
the worker exits 0. An answer whose lease expired is refused by keel with 409: the result
is dropped (the task is someone else's by then) and the worker goes on.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request


class TaskFailed(Exception):
    """Raised by a handler: the task fails; retryable asks keel to run the step again."""

    def __init__(self, message, retryable):
        super().__init__(message)
        self.retryable = retryable


def upper(inp):
    return {"text": str(inp.get("text", "")).upper()}


def slow(inp):
    time.sleep(float(inp.get("seconds", 1)))  # the heartbeat thread keeps the lease meanwhile
    return inp


def fail(inp):
    raise TaskFailed("the fail handler always fails", retryable=False)


_seen_keys = set()


def flaky(inp):
    key = json.dumps(inp.get("key"))
    if key not in _seen_keys:
        _seen_keys.add(key)
        raise TaskFailed("flaky: first try for key " + key, retryable=True)
    return inp


def crash(inp):
    log("exiting mid-task")
    os._exit(1)


HANDLERS = {"echo": lambda inp: inp, "upper": upper, "slow": slow, "fail": fail, "flaky": flaky, "exit": crash}


def log(msg, **fields):
    print("worker: " + msg + "".join(" %s=%s" % kv for kv in fields.items()), file=sys.stderr, flush=True)


def post(server, path, body, timeout):
    """POSTs JSON; returns (status, parsed body or None). Connection errors raise OSError."""
    req = urllib.request.Request(server + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw) if raw else None
        except ValueError:
            return e.code, None


def heartbeat(server, task, done):
    """Until `done` is set, extends the lease every heartbeat_timeout / 3."""
    every = max(task["heartbeat_timeout_ms"] / 3000.0, 0.05)
    while not done.wait(every):
        try:
            status, _ = post(server, "/v1/tasks/%s/heartbeat" % task["token"], {}, timeout=max(every, 1.0))
        except OSError as e:  # keel may be restarting: keep trying, the lease may still hold
            log("heartbeat failed, will retry", error=e)
            continue
        if status in (404, 409):
            log("lease lost while working", token=task["token"], status=status)
            return


def answer(server, task, body, kind):
    """Sends complete or fail, retrying connection errors for a while (keel may restart)."""
    path = "/v1/tasks/%s/%s" % (task["token"], kind)
    delay = 0.2
    for _ in range(12):
        try:
            status, resp = post(server, path, body, timeout=10)
        except OSError as e:
            log("could not reach keel, retrying", error=e)
            time.sleep(delay)
            delay = min(delay * 2, 3.0)
            continue
        if status == 200:
            log("task completed" if kind == "complete" else "task failed",
                run_id=task["run_id"], step_id=task["step_id"], attempt=task["attempt"])
        elif status == 409:
            log("lease lost, result dropped", token=task["token"])
        else:
            log("unexpected answer", status=status, body=json.dumps(resp))
        return
    log("gave up delivering the result", token=task["token"])


def run_task(server, task, handler):
    done = threading.Event()
    beater = threading.Thread(target=heartbeat, args=(server, task, done), daemon=True)
    beater.start()
    try:
        body, kind = {"output": handler(task["input"])}, "complete"
    except TaskFailed as e:
        body, kind = {"error": {"type": "server_error", "message": str(e)}, "retryable": e.retryable}, "fail"
    except Exception as e:  # a bug in the handler: let keel retry the step
        body, kind = {"error": {"type": "server_error", "message": repr(e)}, "retryable": True}, "fail"
    finally:
        done.set()
    beater.join()
    answer(server, task, body, kind)


def main():
    p = argparse.ArgumentParser(description="A keel external worker.")
    p.add_argument("--server", default=os.environ.get("KEEL_URL", "http://127.0.0.1:7420"))
    p.add_argument("--queue", required=True)
    p.add_argument("--handler", default="echo", choices=sorted(HANDLERS))
    p.add_argument("--worker-id", default="py-%d" % os.getpid())
    p.add_argument("--wait-ms", type=int, default=5000, help="long-poll wait, 0..60000")
    p.add_argument("--once", action="store_true", help="exit after one task")
    args = p.parse_args()
    server, handler = args.server.rstrip("/"), HANDLERS[args.handler]

    # SIGTERM: finish what is in hand, then exit 0. A poll in flight is finished too (at
    # most --wait-ms): keel may hand it a task even if this process stopped listening.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    log("polling", server=server, queue=args.queue, handler=args.handler, worker_id=args.worker_id)
    delay = 0.2
    while not stopping.is_set():
        poll = {"queue": args.queue, "worker_id": args.worker_id, "wait_ms": args.wait_ms}
        try:
            status, task = post(server, "/v1/tasks/poll", poll, timeout=args.wait_ms / 1000.0 + 10)
        except OSError as e:  # keel is down or restarting
            status, task = None, str(e)
        if status == 204:
            continue
        if status is not None and 400 <= status < 500:
            log("poll refused, giving up", status=status, body=json.dumps(task))
            sys.exit(2)
        if status != 200:
            log("poll failed, backing off", error=task, seconds=delay)
            stopping.wait(delay)
            delay = min(delay * 2, 5.0)
            continue
        delay = 0.2
        log("task leased", run_id=task["run_id"], step_id=task["step_id"], attempt=task["attempt"])
        run_task(server, task, handler)
        if args.once:
            break
    log("exiting")


if __name__ == "__main__":
    main()
