"""The real oslo.messaging RPC client, driven by the test suite.

Reads one JSON op per line on stdin, prints one JSON result per line:
  {"op": "call"|"cast", "topic", "server", "fanout", "method", "args",
   "timeout", "monitor"}     one request
  {"op": "casts", ..., "n": N, "start": K}   N casts, args + {"i": K..K+N-1}
  {"op": "bench", ..., "n": N}               N sequential calls: mean/p50/p99 µs
argv: transport_url control_exchange
"""
import json
import sys
import warnings

warnings.simplefilter("ignore")
from oslo_config import cfg  # noqa: E402
import oslo_messaging as om  # noqa: E402

url, exchange = sys.argv[1], sys.argv[2]
cfg.CONF([], project="tether-test")
transport = om.get_rpc_transport(cfg.CONF, url=url)


def client_for(op):
    target = om.Target(exchange=exchange, topic=op["topic"], server=op.get("server"),
                       fanout=op.get("fanout", False))
    return om.get_rpc_client(transport, target, timeout=op.get("timeout", 10),
                             call_monitor_timeout=op.get("monitor"))


for line in sys.stdin:
    op = json.loads(line)
    ctxt = op.get("ctx", {})
    args = op.get("args", {})
    try:
        c = client_for(op)
        if op["op"] == "call":
            out = {"ok": True, "result": c.call(ctxt, op["method"], **args)}
        elif op["op"] == "cast":
            c.cast(ctxt, op["method"], **args)
            out = {"ok": True}
        elif op["op"] == "bench":
            import time
            durations = []
            for _ in range(op["n"]):
                t = time.perf_counter()
                c.call(ctxt, op["method"], **args)
                durations.append((time.perf_counter() - t) * 1e6)
            durations.sort()
            out = {"ok": True, "mean_us": sum(durations) / len(durations),
                   "p50_us": durations[len(durations) // 2],
                   "p99_us": durations[len(durations) * 99 // 100]}
        elif op["op"] == "casts":
            start = op.get("start", 0)
            for i in range(start, start + op["n"]):
                c.cast(ctxt, op["method"], **dict(args, i=i))
            out = {"ok": True}
        else:
            out = {"ok": False, "class": "BadOp", "message": op["op"]}
    except Exception as e:  # reported to the test, which asserts on it
        out = {"ok": False, "class": type(e).__name__, "module": type(e).__module__,
               "message": str(e), "exc_type": getattr(e, "exc_type", None)}
    print(json.dumps(out), flush=True)
