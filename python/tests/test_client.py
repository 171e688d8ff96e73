"""The blocking client against the real tether-agent and tether-proxy."""

from __future__ import annotations

import collections
import threading
import time
import uuid as uuidlib

import pytest

import tether
from conftest import BOUND, random_uuid, wait_until


class Recorder:
    """A handler that records what it ran, by unique id."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ran = collections.Counter()
        self.casts = []
        self.gate = threading.Event()

    def __call__(self, req: tether.Request):
        with self.lock:
            self.ran[req.unique_id] += 1
        if req.method == "echo":
            return {"args": req.args, "kind": req.kind, "topic": req.target.topic}
        if req.method == "fail":
            raise ValueError(req.args.get("message", "failed"))
        if req.method == "fail_custom":
            raise QuotaExceeded("over quota")
        if req.method == "record":
            with self.lock:
                self.casts.append(req.args)
            return None
        if req.method == "hold":
            assert self.gate.wait(BOUND * 2), "never released"
            return "released"
        raise NotImplementedError(req.method)


class QuotaExceeded(Exception):
    pass


def guest(world, topics=("demo",), handler=None, **kw):
    uuid = random_uuid()
    world.agent(uuid)
    agent = tether.SubAgent("py-test", topics, handler or Recorder(),
                            socket_path=str(world.agent_socket(uuid)), **kw)
    agent.connect(BOUND)
    for t in topics:
        world.wait_linked(uuid, t)
    return uuid, agent


def test_calls_and_casts_from_the_host_reach_the_handler(world):
    world.proxy()
    rec = Recorder()
    uuid, agent = guest(world, handler=rec)
    ctl = world.ctl()
    r = ctl.req(op="call", instance=uuid, topic="demo", method="echo", args={"x": 1})
    assert r["ok"], r
    assert r["result"] == {"args": {"x": 1}, "kind": "call", "topic": "demo"}
    # A cast is confirmed only once the handler ran it (ack: took after).
    r = ctl.req(op="cast", instance=uuid, topic="demo", method="record", args={"n": 1})
    assert r["ok"], r
    assert rec.casts == [{"n": 1}]
    # Errors carry their class and module.
    r = ctl.req(op="call", instance=uuid, topic="demo", method="fail", args={"message": "nope"})
    assert not r["ok"]
    assert (r["error"]["kind"], r["error"]["class"], r["error"]["module"]) == ("remote", "ValueError", "builtins")
    assert "nope" in r["error"]["message"]
    r = ctl.req(op="call", instance=uuid, topic="demo", method="fail_custom")
    assert (r["error"]["class"], r["error"]["module"]) == ("QuotaExceeded", "test_client")
    agent.close()


def test_calls_run_concurrently(world):
    world.proxy()
    rec = Recorder()
    uuid, agent = guest(world, handler=rec)
    results = []

    def held():
        c = world.ctl()
        results.append(c.req(op="call", instance=uuid, topic="demo", method="hold"))

    threads = [threading.Thread(target=held) for _ in range(8)]
    for t in threads:
        t.start()
    # Eight calls held in their handlers at once, and another answered
    # meanwhile: no handler waits for another.
    wait_until(lambda: agent._running_calls == 8, "eight calls running at once")
    r = world.ctl().req(op="call", instance=uuid, topic="demo", method="echo")
    assert r["ok"], r
    # None of the eight answered meanwhile (still held: the gate is closed).
    # (Not the running count: a call's slot is given back just after its
    # reply is written, so the echo may still count for a moment.)
    assert results == []
    rec.gate.set()
    for t in threads:
        t.join(BOUND)
    assert [r["result"] for r in results] == ["released"] * 8
    agent.close()


def test_a_cast_upstream_reaches_the_host_with_the_identity_it_stamps(world):
    world.proxy()
    uuid, agent = guest(world)
    watch = world.ctl()
    assert watch.req(op="watch")["result"] == "watching"
    agent.cast("demo-events", "told", {"pool": "p1"}, ctx={"tether_instance": "not-me", "request_id": "req-1"})
    ev = watch.line()["event"]
    assert ev["instance"] == uuid and ev["method"] == "told" and ev["args"] == {"pool": "p1"}
    assert ev["ctx"]["tether_instance"] == uuid
    assert ev["ctx"]["request_id"] == "req-1"
    agent.close()


def test_an_upstream_call_the_host_refuses_raises_its_class(world):
    # The proxy's default policy: reply-only (guests may not call).
    world.proxy('[policy.profiles.default]\nmode = "reply-only"\ntopics = ["*"]\n')
    uuid, agent = guest(world)
    with pytest.raises(tether.RemoteError) as e:
        agent.call("demo-events", "answer", {}, timeout=BOUND)
    assert (e.value.exc_class, e.value.exc_module) == ("Denied", "tether")
    refused = []
    agent.on_refused = refused.append
    agent.cast("demo-events", "told", {})
    wait_until(lambda: refused, "the refusal of the cast")
    assert refused[0].method == "told" and refused[0].reason.startswith("Denied")
    agent.close()


def test_a_topic_another_sub_agent_serves_is_refused_clearly(world):
    world.proxy()
    uuid, first = guest(world)
    second = tether.SubAgent("second", ["demo"], Recorder(), socket_path=str(world.agent_socket(uuid)))
    with pytest.raises(tether.ProtocolError, match="demo"):
        second.connect(BOUND)
    second.close()
    first.close()


def cast_stream(world, uuid, n, on_half=None, streams=16):
    """Cast ``n`` records through the control socket from ``streams``
    connections at once (so that casts are in flight in every part of the
    path when ``on_half`` runs, once half are confirmed), each retried with
    its unique id until a sub-agent took it (a timeout or a restarting agent
    is not an answer)."""
    ids = [uuid_str(i) for i in range(n)]
    confirmed = [0]
    lock = threading.Lock()
    half = threading.Event()
    errors = []

    def stream(k):
        ctl = world.ctl()
        for i in range(k, n, streams):
            end = time.monotonic() + BOUND * 4
            while True:
                r = ctl.req(op="cast", instance=uuid, topic="demo", method="record", args={"i": i},
                            unique_id=ids[i], timeout_ms=5000)
                if r["ok"]:
                    break
                if r["error"]["kind"] not in ("timeout", "not_connected") or time.monotonic() > end:
                    errors.append(r)
                    return
                time.sleep(0.05)
            with lock:
                confirmed[0] += 1
                if confirmed[0] == n // 2:
                    half.set()

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    if on_half is not None:
        assert half.wait(BOUND * 4), "half the casts never confirmed"
        on_half()
    for t in threads:
        t.join(BOUND * 8)
    assert not errors, errors
    assert confirmed[0] == n
    return ids


def uuid_str(i):
    return str(uuidlib.UUID(int=i + 1))


def test_reconnects_across_an_agent_restart_and_runs_each_cast_once(world):
    world.proxy()
    rec = Recorder()
    uuid, agent = guest(world, handler=rec)
    agent_proc = world.procs[-1]

    def restart():
        agent_proc.kill9()
        world.agent(uuid)

    ids = cast_stream(world, uuid, 2000, on_half=restart)
    # Every confirmed cast ran, and none twice. (A reconnection can land in
    # the dying agent's listen queue and be reset with it: two or more.)
    assert agent.connects >= 2
    assert set(rec.ran) == set(ids)
    twice = [u for u, n in rec.ran.items() if n != 1]
    assert not twice, f"run more than once: {twice}"
    assert sorted(c["i"] for c in rec.casts) == list(range(2000))
    # And it serves calls on the new connection.
    r = world.ctl().req(op="call", instance=uuid, topic="demo", method="echo")
    assert r["ok"], r
    agent.close()


def test_an_upstream_call_in_flight_when_the_agent_dies_fails_clearly(world):
    # A broker that is away (nothing listens on port 1): the proxy holds
    # the guest's call for it, so the call is still in flight when the
    # agent dies.
    world.proxy('[broker]\ntransport_url = "rabbit://guest:guest@127.0.0.1:1/"\n'
                '[policy.profiles.default]\nmode = "call"\ntopics = ["*"]\n'
                '[[policy.profiles.default.targets]]\ntopics = ["*"]\nservers = ["*"]\nmethods = ["*"]\n')
    uuid, agent = guest(world)
    agent_proc = world.procs[-1]
    out = {}

    def call():
        try:
            out["r"] = agent.call("nobody-serves", "answer", {}, timeout=BOUND * 2)
        except Exception as e:  # noqa: BLE001 - what it raises is the point
            out["e"] = e

    t = threading.Thread(target=call)
    t.start()
    ctl = world.ctl()
    wait_until(lambda: ctl.req(op="broker")["result"]["held"] >= 1, "the call held by the proxy")
    agent_proc.kill9()
    t.join(BOUND)
    assert isinstance(out.get("e"), tether.AgentGone), out
    world.agent(uuid)
    wait_until(lambda: agent.connects >= 2 and agent._sock is not None, "the client reconnected")
    agent.close()


def test_notifications_are_stamped_by_the_host_and_refused_unless_allowed(world):
    world.proxy()
    uuid, agent = guest(world)
    watch = world.ctl()
    assert watch.req(op="watch")["result"] == "watching"
    agent.notify("lbaas.pool.create.end", {"pool": "p1"}, publisher_id="nova-compute.host1",
                 ctx={"request_id": "r-1", "tether_instance": "not-me"})
    ev = watch.line()["event"]
    assert ev["target"] == {"topic": "notifications.info"} and ev["method"] == "lbaas.pool.create.end"
    assert ev["args"]["publisher_id"] == f"tether.{uuid}"
    assert ev["args"]["priority"] == "INFO" and ev["args"]["payload"] == {"pool": "p1"}
    assert ev["ctx"] == {"request_id": "r-1", "tether_instance": uuid}
    # A priority oslo does not have, a field it does not know: refused, and told.
    refused = []
    agent.on_refused = refused.append
    agent.notify("x.y", {}, priority="loud")
    agent._send({"op": "notify", "target": {"topic": "notifications.info"},
                 "message": {"event_type": "x.y", "priority": "INFO", "payload": {}, "extra": 1}}, agent._generation)
    wait_until(lambda: len(refused) == 2, "both refusals")
    assert "priority" in refused[0].reason and refused[0].method == "x.y"
    assert "extra" in refused[1].reason
    agent.close()


def test_notifications_are_refused_by_a_profile_without_notification_topics(world):
    world.proxy('[policy.profiles.default]\nmode = "cast"\ntopics = ["*"]\n'
                '[[policy.profiles.default.targets]]\ntopics = ["*"]\nservers = ["*"]\nmethods = ["*"]\n')
    uuid, agent = guest(world)
    refused = []
    agent.on_refused = refused.append
    agent.notify("lbaas.pool.create.end", {"pool": "p1"})
    wait_until(lambda: refused, "the refusal")
    assert refused[0].reason.startswith("Denied") and "notification" in refused[0].reason
    agent.close()
