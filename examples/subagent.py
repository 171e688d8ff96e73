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
  record(**kw)          cast: appends kw as one JSON line to $SUBAGENT_RECORD
  tell_host(**kw)       casts kw upstream to the control plane (topic "demo-events")
  exit(code)            exits the process (to exercise the supervisor)

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
record_lock = threading.Lock()


def send(msg):
    data = (json.dumps(msg) + "\n").encode()
    with write_lock:
        s.sendall(data)


class QuotaExceeded(Exception):
    pass


def handle(req):
    method, args = req["method"], req.get("args") or {}
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
            with record_lock, open(record_path, "a") as f:
                f.write(json.dumps(args, sort_keys=True) + "\n")
        return None
    if method == "tell_host":
        send({"op": "cast", "target": {"topic": "demo-events"}, "method": "told", "args": args})
        return None
    if method == "exit":
        os._exit(int(args.get("code", 0)))
    raise NotImplementedError(f"no method {method!r}")


def serve(req):
    try:
        result = handle(req)
        reply = {"op": "reply", "id": req["id"], "result": result}
    except Exception as e:  # any error goes back to the caller, oslo-style
        cls = type(e)
        module = "builtins" if cls.__module__ == "builtins" else cls.__module__
        reply = {"op": "reply", "id": req["id"], "error": {"class": cls.__name__, "module": module, "message": str(e)}}
    if req.get("kind") == "call":
        send(reply)


send({"op": "register", "name": name, "topics": topics})
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
        elif msg.get("op") == "registered":
            print(f"{name}: serving {msg['topics']}", flush=True)
        elif msg.get("op") == "error":
            print(f"{name}: agent says: {msg['message']}", file=sys.stderr, flush=True)
