"""A real oslo.messaging notification listener on the control side, for the
test suite: prints one JSON line per notification it receives (priority,
context, publisher_id, event_type, payload), and "ready" once consuming.
argv: transport_url control_exchange topic
"""
import json
import sys
import threading
import warnings

warnings.simplefilter("ignore")
from oslo_config import cfg  # noqa: E402
import oslo_messaging as om  # noqa: E402

url, exchange, topic = sys.argv[1:4]
cfg.CONF([], project="tether-test")
transport = om.get_notification_transport(cfg.CONF, url=url)
lock = threading.Lock()


class Endpoint:
    def _emit(self, priority, ctxt, publisher_id, event_type, payload):
        with lock:
            print(json.dumps({"priority": priority, "ctxt": ctxt, "publisher_id": publisher_id,
                              "event_type": event_type, "payload": payload}, sort_keys=True), flush=True)


# One method per oslo priority, each reporting its own name.
for _p in ("audit", "debug", "info", "warn", "error", "critical", "sample"):
    setattr(Endpoint, _p, lambda self, ctxt, publisher_id, event_type, payload, metadata, _p=_p:
            self._emit(_p, ctxt, publisher_id, event_type, payload))

listener = om.get_notification_listener(transport, [om.Target(exchange=exchange, topic=topic)], [Endpoint()],
                                        executor="threading")
listener.start()
print("ready", flush=True)
try:
    sys.stdin.read()  # until the test closes stdin (or kills us)
finally:
    listener.stop()
