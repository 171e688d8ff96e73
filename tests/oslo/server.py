"""A real oslo.messaging RPC server on the control side, for the test suite.

Serves `told(**kw)` and `record(**kw)` (casts: print them), `answer(**kw)` (call: returns kw
plus the caller's context) and `echo(**kw)` (returns kw, quietly: the
benchmark's baseline). Prints one JSON line per request received, and
"ready" once consuming.
argv: transport_url control_exchange topic server
(oslo_messaging_rabbit options ride in the transport_url's query, e.g.
`?rabbit_quorum_queue=true`, as oslo.messaging reads them from there.)
"""
import json
import sys
import threading
import warnings

warnings.simplefilter("ignore")
from oslo_config import cfg  # noqa: E402
import oslo_messaging as om  # noqa: E402

url, exchange, topic, server = sys.argv[1:5]
cfg.CONF([], project="tether-test")
transport = om.get_rpc_transport(cfg.CONF, url=url)
lock = threading.Lock()


def emit(d):
    with lock:
        print(json.dumps(d, sort_keys=True), flush=True)


class Endpoint:
    def echo(self, ctxt, **kw):
        return kw

    def told(self, ctxt, **kw):
        emit({"method": "told", "ctx": ctxt, "args": kw})

    def record(self, ctxt, **kw):
        emit({"method": "record", "ctx": ctxt, "args": kw})

    def answer(self, ctxt, **kw):
        emit({"method": "answer", "ctx": ctxt, "args": kw})
        return {"args": kw, "instance": ctxt.get("tether_instance")}


target = om.Target(exchange=exchange, topic=topic, server=server)
srv = om.get_rpc_server(transport, target, [Endpoint()], executor="threading")
srv.start()
print("ready", flush=True)
try:
    sys.stdin.read()  # until the test closes stdin (or kills us)
finally:
    srv.stop()
