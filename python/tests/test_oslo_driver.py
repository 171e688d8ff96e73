"""The tether:// oslo.messaging driver end to end: the real RabbitMQ, the
real oslo.messaging on the control plane (this process) and in the guest (an
unmodified oslo program, tests/guest_oslo_program.py, on tether://), the
real tether-proxy bridging them and the real tether-agent.

Needs the test broker: ``$TETHER_AMQP_URL`` (scripts/test starts one and
sets it; ``scripts/broker start`` does for a local run). Missing, the tests
fail: they are never skipped.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings

import pytest

from conftest import BOUND, LAB_POLICY, REPO, random_uuid, wait_until

warnings.simplefilter("ignore")
from oslo_config import cfg  # noqa: E402
import oslo_messaging as om  # noqa: E402

EXCHANGE = "tether-pytest"


def amqp_url() -> str:
    url = os.environ.get("TETHER_AMQP_URL")
    if not url:
        pytest.fail("TETHER_AMQP_URL is not set: start the test broker (scripts/broker start) and export it")
    return url


def broker_section() -> str:
    return (f'[broker]\ntransport_url = "{amqp_url()}"\ncontrol_exchange = "{EXCHANGE}"\n'
            "reconnect_min_ms = 100\nreconnect_max_ms = 1000\nrequeue_grace_ms = 500\n")


class Control:
    """The control plane: oslo.messaging over RabbitMQ in this process."""

    def __init__(self):
        # oslo's server reads options registered on the global config only.
        self.conf = cfg.CONF
        if not self.conf._args:
            self.conf([], project="control-plane")
        self.transport = om.get_rpc_transport(self.conf, url=amqp_url())
        self.servers = []

    def client(self, topic, server=None, **kw):
        return om.get_rpc_client(self.transport, om.Target(exchange=EXCHANGE, topic=topic, server=server), **kw)

    def serve(self, topic, endpoint):
        s = om.get_rpc_server(self.transport, om.Target(exchange=EXCHANGE, topic=topic, server="control-1"),
                              [endpoint])
        s.start()
        self.servers.append(s)
        return s

    def close(self):
        for s in self.servers:
            s.stop()
            s.wait()
        self.transport.cleanup()


@pytest.fixture
def control():
    c = Control()
    yield c
    c.close()


class Guest:
    def __init__(self, world, uuid, topic, control_topic, notify_topic):
        self.world, self.uuid, self.topic, self.control_topic = world, uuid, topic, control_topic
        self.notify_topic = notify_topic
        self.record = world.path(f"record-{uuid}.jsonl")
        self.url = f"tether://{world.agent_socket(uuid)}"
        env = {"PYTHONPATH": str(REPO / "python" / "src")}
        self.proc = world.spawn("guest-program", [sys.executable, str(REPO / "python/tests/guest_oslo_program.py"),
                                                  self.url, topic, control_topic, str(self.record),
                                                  self.notify_topic], env)
        wait_until(lambda: "ready" in self.proc.log_text() or self.proc.p.poll() is not None,
                   "the guest program's server", BOUND * 2)
        assert self.proc.p.poll() is None, self.proc.log_text()
        world.wait_linked(uuid, topic)
        # Linked is not yet served: a message published before the proxy
        # consumes the instance's queue and the topic's fanout reaches nobody
        # (oslo's semantics too). This proxy serves this one instance.
        ctl = world.ctl()
        wait_until(lambda: (lambda b: b["connected"] and b["instances_consumed"] >= 1 and b["fanout_topics"] >= 1)(
            ctl.req(op="broker")["result"]), "the proxy consuming the guest's queues", every=0.05)
        ctl.close()

    def recorded(self):
        # Complete lines only: a read can land in the middle of the
        # sub-agent's append (a line crossing a page boundary is copied page
        # by page); what follows the last newline is still being written.
        try:
            with open(self.record) as f:
                return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
        except FileNotFoundError:
            return []


def guest(world, topic="lbaas", control_topic="lbaas-plugin"):
    # Notification queues are shared by name on the broker: one per test,
    # listed exactly in the profile (the proxy declares the queue of an
    # exactly listed notification topic only, as oslo's notifier does).
    notify_topic = "notif-" + random_uuid()[:8]
    policy = LAB_POLICY.replace('notifications = ["*"]', f'notifications = ["{notify_topic}"]')
    assert notify_topic in policy
    world.proxy(broker_section() + policy)
    uuid = random_uuid()
    agent = world.agent(uuid)
    return Guest(world, uuid, topic, control_topic, notify_topic), agent


def test_the_url_is_understood_by_oslo(world):
    # oslo finds the driver by its entry point and hands it the socket path.
    conf = cfg.ConfigOpts()
    conf([], project="t")
    t = om.get_rpc_transport(conf, url="tether:///run/tether/agent.sock")
    assert type(t._driver).__name__ == "TetherDriver"
    assert t._driver._path == "/run/tether/agent.sock"
    t2 = om.get_rpc_transport(conf, url="tether://")
    assert t2._driver._path is None  # $TETHER_AGENT_SOCKET or /run/tether/agent.sock


def test_calls_casts_and_fanouts_reach_an_unmodified_oslo_server_in_the_guest(world, control):
    g, _ = guest(world)
    c = control.client(g.topic, server=g.uuid, timeout=BOUND)
    assert c.call({"user": "u-1"}, "echo", pool="p1") == {"args": {"pool": "p1"}, "ctxt_user": "u-1"}
    # The endpoint's version is checked by oslo's dispatcher as over RabbitMQ.
    with pytest.raises(om.RemoteError) as e:
        c.prepare(version="2.0").call({}, "echo")
    assert e.value.exc_type == "UnsupportedVersion"
    c.cast({}, "record", i=1)
    control.client(g.topic).prepare(fanout=True).cast({}, "record", i=2)
    wait_until(lambda: len(g.recorded()) == 2, "the cast and the fanout handled")
    assert sorted(r["i"] for r in g.recorded()) == [1, 2]


def test_errors_come_back_as_their_classes(world, control):
    g, _ = guest(world)
    c = control.client(g.topic, server=g.uuid, timeout=BOUND)
    with pytest.raises(ValueError, match="bad pool"):
        c.call({}, "fail", message="bad pool")
    with pytest.raises(om.RemoteError) as e:
        c.call({}, "fail_custom")
    assert e.value.exc_type == "QuotaExceeded"
    with pytest.raises(om.RemoteError) as e:
        c.call({}, "no_such_method")
    assert e.value.exc_type == "NoSuchMethod"


def test_timeouts_and_call_monitor_timeout_hold(world, control):
    g, _ = guest(world)
    c = control.client(g.topic, server=g.uuid)
    with pytest.raises(om.MessagingTimeout):
        c.prepare(timeout=1).call({}, "slow", seconds=3)
    # Heartbeats (the proxy's, while the guest works) keep a call alive past
    # its monitor timeout, up to its own timeout.
    # (A monitor of 3 s against heartbeats every 1.5 s: margin for a loaded
    # machine; the call lasts longer than the monitor, so it needs them.)
    assert c.prepare(timeout=BOUND, call_monitor_timeout=3).call({}, "slow", seconds=5) == 5


def test_the_guest_programs_own_client_calls_the_control_plane(world, control):
    g, _ = guest(world)
    seen = []

    class Plugin:
        def answer(self, ctxt, **kw):
            seen.append(ctxt)
            return {"got": kw}

        def explode(self, ctxt, **kw):
            raise ValueError("control plane says no")

    control.serve(g.control_topic, Plugin())
    c = control.client(g.topic, server=g.uuid, timeout=BOUND)
    assert c.call({}, "ask_control", x=1) == {"got": {"x": 1}}
    # The identity is the host's, whatever the guest put in its context.
    assert seen[0]["tether_instance"] == g.uuid
    assert seen[0]["request_id"] == "req-guest"
    # (oslo appends the remote traceback's lines to the message, here none.)
    assert c.call({}, "ask_control_fail") == {"class": "ValueError", "module": "builtins",
                                             "message": "control plane says no\n"}
    # Nobody consumes the topic: as over RabbitMQ, the guest's caller gets a timeout.
    assert c.call({}, "ask_control_nobody")["class"] == "MessagingTimeout"


def test_oslo_casts_survive_a_kill_of_the_agent_each_handled_once(world, control):
    g, agent = guest(world)
    c = control.client(g.topic, server=g.uuid)
    n = 1000
    done = threading.Event()

    def send():
        for i in range(n):
            c.cast({}, "record", i=i)
        done.set()

    t = threading.Thread(target=send)
    t.start()
    wait_until(lambda: len(g.recorded()) >= n // 4, "a quarter of the casts handled", BOUND * 2)
    agent.kill9()
    world.agent(g.uuid)
    t.join(BOUND * 4)
    assert done.is_set()
    wait_until(lambda: len(g.recorded()) >= n, "every cast handled", BOUND * 4, every=0.1)
    got = sorted(r["i"] for r in g.recorded())
    assert got == list(range(n)), f"missing {sorted(set(range(n)) - set(got))[:20]}, " \
                                  f"twice {[i for i in set(got) if got.count(i) > 1][:20]}"
    # The program reconnected by itself and still serves calls.
    assert control.client(g.topic, server=g.uuid, timeout=BOUND).call({}, "echo", a=1)["args"] == {"a": 1}


def test_the_guest_programs_notifier_reaches_a_control_plane_listener_as_the_host_says(world, control):
    g, _ = guest(world)
    c = control.client(g.topic, server=g.uuid, timeout=BOUND)
    # Sent before anyone listens: the queue <topic>.info is declared on the
    # way, as oslo's notifier does, and keeps it for the listener.
    c.call({}, "notify", event_type="lbaas.pool.update.end", payload={"pool": "p1"})
    got = []

    class Listener:
        def info(self, ctxt, publisher_id, event_type, payload, metadata):
            got.append((ctxt, publisher_id, event_type, payload))

        def error(self, ctxt, publisher_id, event_type, payload, metadata):
            got.append((ctxt, publisher_id, event_type, payload))

    transport = om.get_notification_transport(control.conf, url=amqp_url())
    listener = om.get_notification_listener(transport, [om.Target(topic=g.notify_topic, exchange=EXCHANGE)],
                                            [Listener()])
    listener.start()
    try:
        wait_until(lambda: got, "the notification at the listener")
        c.call({}, "notify", event_type="lbaas.pool.error", payload={"pool": "p2"}, priority="error")
        wait_until(lambda: len(got) == 2, "the error notification")
    finally:
        listener.stop()
        listener.wait()
        transport.cleanup()
    ctxt, publisher, event, payload = got[0]
    # Identity is the host's: the publisher and the context's instance,
    # whatever the guest's program said ("lbaas.guest", "not-me").
    assert publisher == f"tether.{g.uuid}"
    assert ctxt["tether_instance"] == g.uuid and ctxt["request_id"] == "req-n"
    assert "user_id" not in ctxt  # not among the profile's context_keys
    assert (event, payload) == ("lbaas.pool.update.end", {"pool": "p1"})
    assert got[1][2:] == ("lbaas.pool.error", {"pool": "p2"})
