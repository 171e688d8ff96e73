"""An unmodified oslo.messaging program, as a guest would run it: an
RPCServer with endpoints, an RPCClient to the control plane and a Notifier,
all on the ``tether://`` transport. Only its transport URL names tether.

argv: transport_url topic control_topic record_file notify_topic [exchange]
(the exchange, for running the same program straight on RabbitMQ as a
baseline: benches/oslo.rs)
Prints "ready" once its server is started.
"""

import json
import os
import sys
import time
import warnings

warnings.simplefilter("ignore")
from oslo_config import cfg  # noqa: E402
from oslo_context import context  # noqa: E402
import oslo_messaging as om  # noqa: E402

url, topic, control_topic, record, notify_topic = sys.argv[1:6]
exchange = sys.argv[6] if len(sys.argv) > 6 else None
cfg.CONF([], project="guest-program")
transport = om.get_rpc_transport(cfg.CONF, url=url)
notify_transport = om.get_notification_transport(cfg.CONF, url=url)
control = om.get_rpc_client(transport, om.Target(topic=control_topic), timeout=20)
notifier = om.Notifier(notify_transport, publisher_id="lbaas.guest", driver="messaging", topics=[notify_topic])


class QuotaExceeded(Exception):
    pass


class Endpoint:
    target = om.Target(version="1.1")

    def echo(self, ctxt, **kw):
        return {"args": kw, "ctxt_user": ctxt.get("user")}

    def fail(self, ctxt, message):
        raise ValueError(message)

    def fail_custom(self, ctxt):
        raise QuotaExceeded("over quota")

    def slow(self, ctxt, seconds):
        time.sleep(seconds)
        return seconds

    def record(self, ctxt, **kw):
        # One write of one line, so that a kill leaves it whole or absent.
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(kw, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)

    def ask_control(self, ctxt, **kw):
        # The guest's own RPCClient, calling a control-plane oslo server.
        return control.call({"request_id": "req-guest", "tether_instance": "not-me"}, "answer", **kw)

    def ask_control_fail(self, ctxt, **kw):
        try:
            control.call({}, "explode", **kw)
        except Exception as e:  # the class the guest's caller sees
            return {"class": type(e).__name__, "module": type(e).__module__, "message": str(e)[:200]}
        return None

    def ask_control_nobody(self, ctxt):
        try:
            control.prepare(topic="nobody-serves-this", timeout=2).call({}, "answer")
        except Exception as e:
            return {"class": type(e).__name__, "module": type(e).__module__}
        return None

    def notify(self, ctxt, event_type, payload, priority="info"):
        # A service's own request context (oslo's notifier sends no plain
        # dict); the identity it claims is the guest's word only.
        c = context.RequestContext(request_id="req-n", user_id="not-me")
        getattr(notifier, priority)(c, event_type, payload)


server = om.get_rpc_server(transport, om.Target(exchange=exchange, topic=topic, server="whatever-the-guest-says"),
                           [Endpoint()])
server.start()
print("ready", flush=True)
try:
    while True:
        time.sleep(3600)
except KeyboardInterrupt:
    pass
