#!/usr/bin/env python3
"""A small tether sub-agent written with the Python library (python/ in the
repository; installed with the tether-agent package).

It serves the topics in $SUBAGENT_TOPICS (comma-separated, default "demo")
on the agent's socket ($TETHER_AGENT_SOCKET, or the first argument):

  echo(**kw)            -> kw
  add(a, b)             -> a + b
  sleep(seconds)        -> seconds, after sleeping (calls run concurrently:
                           a slow call never delays another)
  fail(message)         -> raises ValueError(message)
  fail_custom(message)  -> raises QuotaExceeded(message), a class of its own
                           (an oslo caller gets RemoteError, not a builtin)
  record(**kw)          cast: appends kw as one JSON line to $SUBAGENT_RECORD,
                        once per request unique id (with "_uid" in the line)
  tell_host(**kw)       casts kw upstream to the control plane (topic "demo-events")
  ask_host(**kw)        calls method "answer" upstream (topic "demo-events") with
                        kw and returns its result (or raises what came back)
  notify_host(**kw)     sends an oslo notification "demo.told" with kw as payload
  exit(code)            exits the process (to exercise the supervisor)

The library confirms a call as it starts and a cast once handled, so a cast
this process had not finished when it was killed goes to the sub-agent the
supervisor restarts; `record` (idempotent by the request's unique id, across
restarts of this process too) runs its effect once. When the agent restarts,
the library reconnects and registers again by itself.

The library and the protocol are described in docs/subagent.md.
"""

import json
import os
import sys
import threading
import time

try:
    import tether
except ImportError:  # run from a clone of the repository
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "python", "src"))
    import tether

socket_path = os.environ.get("TETHER_AGENT_SOCKET") or (sys.argv[1] if len(sys.argv) > 1 else None)
topics = [t for t in os.environ.get("SUBAGENT_TOPICS", "demo").split(",") if t]
name = os.environ.get("TETHER_SUBAGENT_NAME", "python-example")
record_path = os.environ.get("SUBAGENT_RECORD")


class QuotaExceeded(Exception):
    pass


class UpstreamError(Exception):
    """What the control plane answered an upstream call with (a class of
    our own: an oslo caller gets RemoteError naming it)."""


class Demo:
    def __init__(self):
        self.agent = None  # set below: methods that talk upstream need it
        self.record_lock = threading.Lock()
        # The unique ids already recorded (an earlier run of this sub-agent
        # may have recorded a cast and died before confirming it).
        self.recorded = set()
        if record_path and os.path.exists(record_path):
            with open(record_path) as f:
                for line in f:
                    try:
                        self.recorded.add(json.loads(line).get("_uid"))
                    except ValueError:
                        pass  # a line cut by a kill

    def __call__(self, req):
        method = getattr(self, "do_" + req.method, None)
        if method is None:
            raise NotImplementedError(f"no method {req.method!r}")
        return method(req, **req.args)

    def do_echo(self, req, **kw):
        return kw

    def do_add(self, req, a, b):
        return a + b

    def do_sleep(self, req, seconds=1):
        time.sleep(float(seconds))
        return seconds

    def do_fail(self, req, message="failed on purpose"):
        raise ValueError(message)

    def do_fail_custom(self, req, message="over quota"):
        raise QuotaExceeded(message)

    def do_record(self, req, **kw):
        if not record_path:
            return None
        with self.record_lock:
            if req.unique_id not in self.recorded:
                # One write of one line: a kill leaves it whole or absent.
                line = json.dumps(dict(kw, _uid=req.unique_id), sort_keys=True) + "\n"
                fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
                self.recorded.add(req.unique_id)
        return None

    # The context claims another identity: the host's proxy overwrites it.
    FORGED = {"tether_instance": "not-me", "request_id": "req-guest"}

    def do_tell_host(self, req, **kw):
        self.agent.cast("demo-events", "told", kw, ctx=self.FORGED)

    def do_ask_host(self, req, **kw):
        try:
            return self.agent.call("demo-events", "answer", kw, ctx=self.FORGED, timeout=30)
        except tether.RemoteError as e:
            raise UpstreamError(f"{e.exc_class}: {e.message}") from None

    def do_notify_host(self, req, **kw):
        self.agent.notify("demo.told", kw, ctx=self.FORGED)

    def do_exit(self, req, code=0):
        # A cast is confirmed first: it is handled by exiting (not a request
        # to hand to the restarted sub-agent again).
        if not req.is_call:
            self.agent.took(req)
        os._exit(int(code))


def refused(r):
    print(f"{name}: host refused cast {r.method} to {r.target.topic}: {r.reason}", file=sys.stderr, flush=True)


demo = Demo()
demo.agent = tether.SubAgent(name, topics, demo, socket_path=socket_path, on_refused=refused)
demo.agent.connect(timeout=10)
print(f"{name}: serving {topics}", flush=True)
demo.agent.serve_forever()
