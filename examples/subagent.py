#!/usr/bin/env python3
"""A tether sub-agent in plain Python (standard library only).

It connects to the super-agent's socket ($TETHER_AGENT_SOCKET, or the first
argument), registers its topics ($SUBAGENT_TOPICS, comma-separated, default
"demo"), and serves:

  echo(**kw)            -> kw
  add(a, b)             -> a + b
  sleep(seconds)        -> seconds, after sleeping (each request runs in its own
                           thread: a slow call never delays another)
  fail(message)         -> raises ValueError(message)
  fail_custom(message)  -> raises QuotaExceeded(message), a class of its own
                           (an oslo caller gets RemoteError, not a builtin)
  record(**kw)          cast: appends kw as one JSON line to $SUBAGENT_RECORD,
                        once per request unique id (with "_uid" in the line)
  tell_host(**kw)       casts kw upstream to the control plane (topic "demo-events")
  ask_host(**kw)        calls method "answer" upstream (topic "demo-events") with
                        kw and returns its result (or raises what came back)
  exit(code)            exits the process (to exercise the supervisor)

It registers with "ack": a call is confirmed ("took") as it starts, a cast
once handled; so a cast it had not finished when it was killed goes to the
sub-agent the supervisor restarts, and `record` (idempotent by the request's
unique id) runs its effect once.

The protocol is in docs/subagent.md.
"""

import json
import os
import socket
import sys
import threading
import time

sock_path = os.environ.get("TETHER_AGENT_SOCKET") or (sys.argv[1] if len(sys.argv) > 1 else "/run/tether/agent.sock")
topics = [t for t in os.environ.get("SUBAGENT_TOPICS", "demo").split(",") if t]
name = os.environ.get("TETHER_SUBAGENT_NAME", "python-example")
record_path = os.environ.get("SUBAGENT_RECORD")

for _ in range(100):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"cannot connect to {sock_path}")

write_lock = threading.Lock()
# Upstream calls in flight: our id -> [event, result message].
calls = {}
calls_lock = threading.Lock()
next_call = [1]


class UpstreamError(Exception):
    pass


def ask(target, method, args, timeout_ms=30000):
    with calls_lock:
        cid = next_call[0]
        next_call[0] += 1
        slot = calls[cid] = [threading.Event(), None]
    # The context claims another identity: the host's proxy overwrites it.
    send({"op": "call", "id": cid, "target": target, "method": method, "args": args,
          "ctx": {"tether_instance": "not-me", "request_id": "req-guest"},
          "timeout_ms": timeout_ms})
    slot[0].wait(timeout_ms / 1000 + 5)
    with calls_lock:
        calls.pop(cid, None)
    msg = slot[1]
    if msg is None:
        raise TimeoutError("no result from the host")
    if msg.get("error"):
        raise UpstreamError(f"{msg['error'].get('class')}: {msg['error'].get('message')}")
    return msg.get("result")
record_lock = threading.Lock()
# The unique ids already recorded (an earlier run of this sub-agent may have
# recorded a cast and died before confirming it).
recorded = set()
if record_path and os.path.exists(record_path):
    with open(record_path) as f:
        for line in f:
            try:
                recorded.add(json.loads(line).get("_uid"))
            except ValueError:
                pass  # a line cut by a kill


def send(msg):
    data = (json.dumps(msg) + "\n").encode()
    with write_lock:
        s.sendall(data)


class QuotaExceeded(Exception):
    pass


def handle(req):
    method, args = req["method"], req.get("args") or {}
    uid = req.get("unique_id")
    if method == "echo":
        return args
    if method == "add":
        return args["a"] + args["b"]
    if method == "sleep":
        time.sleep(float(args.get("seconds", 1)))
        return args.get("seconds", 1)
    if method == "fail_custom":
        raise QuotaExceeded(args.get("message", "over quota"))
    if method == "fail":
        raise ValueError(args.get("message", "failed on purpose"))
    if method == "record":
        if record_path:
            with record_lock:
                if uid not in recorded:
                    # One write of one line: a kill leaves it whole or absent.
                    line = json.dumps(dict(args, _uid=uid), sort_keys=True) + "\n"
                    fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    try:
                        os.write(fd, line.encode())
                    finally:
                        os.close(fd)
                    recorded.add(uid)
        return None
    if method == "tell_host":
        send({"op": "cast", "target": {"topic": "demo-events"}, "method": "told", "args": args})
        return None
    if method == "ask_host":
        return ask({"topic": "demo-events"}, "answer", args)
    if method == "exit":
        # Confirmed first: this request is handled by exiting (not a
        # request to hand to the restarted sub-agent again).
        if req.get("kind") != "call":
            send({"op": "took", "id": req["id"]})
        os._exit(int(args.get("code", 0)))
    raise NotImplementedError(f"no method {method!r}")


def serve(req):
    if req.get("kind") == "call":
        send({"op": "took", "id": req["id"]})
    try:
        result = handle(req)
        reply = {"op": "reply", "id": req["id"], "result": result}
    except Exception as e:  # any error goes back to the caller, oslo-style
        cls = type(e)
        module = "builtins" if cls.__module__ == "builtins" else cls.__module__
        reply = {"op": "reply", "id": req["id"], "error": {"class": cls.__name__, "module": module, "message": str(e)}}
    if req.get("kind") == "call":
        send(reply)
    else:
        send({"op": "took", "id": req["id"]})


send({"op": "register", "name": name, "topics": topics, "ack": True})
buf = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        sys.exit(0)
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        msg = json.loads(line)
        if msg.get("op") == "request":
            if msg.get("kind") == "call":
                threading.Thread(target=serve, args=(msg,), daemon=True).start()
            else:
                serve(msg)  # casts in order
        elif msg.get("op") == "result":
            with calls_lock:
                slot = calls.get(msg.get("id"))
            if slot:
                slot[1] = msg
                slot[0].set()
        elif msg.get("op") == "registered":
            print(f"{name}: serving {msg['topics']}", flush=True)
        elif msg.get("op") == "cast_refused":
            print(f"{name}: host refused cast {msg['method']} to {msg['target'].get('topic')}: {msg['reason']}",
                  file=sys.stderr, flush=True)
        elif msg.get("op") == "error":
            print(f"{name}: agent says: {msg['message']}", file=sys.stderr, flush=True)
