"""The client's own rules, against a scripted agent (a plain UNIX socket
server in the test): duplicates across reconnections, bounds, bad input.
What the real agent does is in test_client.py; these pin down the cases
the real one produces only by chance (a kill between two system calls)."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from pathlib import Path

import pytest

import tether
from tether import _protocol as p
from conftest import BOUND, wait_until


class ScriptedAgent:
    """Accepts connections; each one's lines go to ``self.got[n]``."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="tether-py-fake-")
        self.path = str(Path(self.dir) / "agent.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.srv.settimeout(BOUND)
        self.conns = []
        self.got = []

    def accept(self):
        c, _ = self.srv.accept()
        c.settimeout(BOUND)
        self.conns.append(c)
        self.got.append([])
        n = len(self.conns) - 1
        threading.Thread(target=self._read, args=(c, n), daemon=True).start()
        return c

    def _read(self, c, n):
        buf = b""
        while True:
            try:
                chunk = c.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.got[n].append(json.loads(line))

    @staticmethod
    def hangup(c):
        """As the agent dying: shut down first (a close alone waits for the
        reader thread's recv to return)."""
        c.shutdown(socket.SHUT_RDWR)
        c.close()

    def send(self, c, msg):
        c.sendall(json.dumps(msg).encode() + b"\n")

    def wait_for(self, n, op):
        return wait_until(lambda: next((m for m in self.got[n] if m.get("op") == op), None), f"{op} on connection {n}")

    def registered(self, c, n):
        reg = self.wait_for(n, "register")
        self.send(c, {"op": "registered", "topics": reg["topics"]})
        return reg


def request(rid, uid, kind="cast", method="work", args=None):
    return {"op": "request", "id": rid, "unique_id": uid, "kind": kind, "target": {"topic": "demo"},
            "method": method, "args": args or {}, "ctx": {}}


@pytest.fixture
def fake():
    f = ScriptedAgent()
    yield f
    for c in f.conns:
        c.close()
    f.srv.close()


def test_a_request_handed_over_again_after_a_reconnection_is_not_run_twice(fake):
    ran = []
    agent = tether.SubAgent("t", ["demo"], lambda req: ran.append(req.unique_id) or "done", socket_path=fake.path)
    t = threading.Thread(target=agent.connect, args=(BOUND,))
    t.start()
    c0 = fake.accept()
    reg = fake.registered(c0, 0)
    t.join(BOUND)
    assert reg == {"op": "register", "name": "t", "topics": ["demo"], "ack": True}
    fake.send(c0, request(1, "u-cast"))
    fake.send(c0, request(2, "u-call", kind="call"))
    wait_until(lambda: [m for m in fake.got[0] if m["op"] == "reply"], "the call's reply")
    wait_until(lambda: {"op": "took", "id": 1} in fake.got[0], "the cast confirmed")
    # The agent dies before it journaled those; the restarted one hands both over again.
    fake.hangup(c0)
    c1 = fake.accept()
    fake.registered(c1, 1)
    fake.send(c1, request(1, "u-cast"))
    fake.send(c1, request(2, "u-call", kind="call"))
    fake.send(c1, request(3, "u-new"))
    wait_until(lambda: {"op": "took", "id": 3} in fake.got[1], "the new cast confirmed")
    assert sorted(ran) == ["u-call", "u-cast", "u-new"]  # each once (calls and casts run side by side)
    assert {"op": "took", "id": 1} in fake.got[1]
    reply = next(m for m in fake.got[1] if m["op"] == "reply")
    assert reply["id"] == 2 and reply["error"]["class"] == "GuestRestarted"
    assert agent.connects == 2
    agent.close()


def test_a_request_handed_over_while_it_runs_is_answered_once_it_ends(fake):
    gate = threading.Event()
    started = threading.Event()

    def handler(req):
        started.set()
        gate.wait(BOUND)
        return 42

    agent = tether.SubAgent("t", ["demo"], handler, socket_path=fake.path)
    t = threading.Thread(target=agent.connect, args=(BOUND,))
    t.start()
    c0 = fake.accept()
    fake.registered(c0, 0)
    t.join(BOUND)
    fake.send(c0, request(7, "u-slow", kind="call"))
    assert started.wait(BOUND)
    fake.hangup(c0)
    c1 = fake.accept()
    fake.registered(c1, 1)
    fake.send(c1, request(1, "u-slow", kind="call"))
    # The client has it as the same request (attached to the running one)
    # before that one ends.
    wait_until(lambda: len(agent._handled.waiting("u-slow")) == 2, "the request attached to the running one")
    gate.set()
    reply = fake.wait_for(1, "reply")
    assert reply == {"op": "reply", "id": 1, "result": 42}
    agent.close()


def test_an_answer_that_is_not_json_becomes_an_error_for_the_caller(fake):
    agent = tether.SubAgent("t", ["demo"], lambda req: object(), socket_path=fake.path)
    t = threading.Thread(target=agent.connect, args=(BOUND,))
    t.start()
    c0 = fake.accept()
    fake.registered(c0, 0)
    t.join(BOUND)
    fake.send(c0, request(1, "u1", kind="call"))
    reply = fake.wait_for(0, "reply")
    assert reply["error"]["class"] == "TypeError"
    agent.close()


def test_a_registration_the_agent_refuses_raises(fake):
    agent = tether.SubAgent("t", ["tether.supervisor"], lambda r: None, socket_path=fake.path)
    out = {}

    def connect():
        try:
            agent.connect(BOUND)
        except Exception as e:  # noqa: BLE001
            out["e"] = e

    t = threading.Thread(target=connect)
    t.start()
    c0 = fake.accept()
    fake.wait_for(0, "register")
    fake.send(c0, {"op": "error", "message": "topic tether.supervisor is reserved"})
    t.join(BOUND)
    assert isinstance(out.get("e"), tether.ProtocolError) and "reserved" in str(out["e"])
    agent.close()


def test_a_line_over_the_limit_ends_the_connection_and_the_client_comes_back(fake):
    agent = tether.SubAgent("t", ["demo"], lambda r: None, socket_path=fake.path, max_line=1024)
    t = threading.Thread(target=agent.connect, args=(BOUND,))
    t.start()
    c0 = fake.accept()
    fake.registered(c0, 0)
    t.join(BOUND)
    c0.sendall(b"x" * 4096)  # no newline: the buffer may not grow past the limit
    c1 = fake.accept()
    fake.registered(c1, 1)
    assert agent.connects == 2
    # Not JSON: the same.
    c1.sendall(b"not json\n")
    c2 = fake.accept()
    fake.registered(c2, 2)
    agent.close()


def test_serve_forever_alone_connects_serves_and_returns_on_close(fake):
    # The documented one-liner: no connect() first, no timeout.
    agent = tether.SubAgent("t", ["demo"], lambda req: req.args, socket_path=fake.path)
    done = threading.Event()

    def serve():
        agent.serve_forever()
        done.set()

    threading.Thread(target=serve, daemon=True).start()
    c0 = fake.accept()
    fake.registered(c0, 0)
    fake.send(c0, request(1, "u1", kind="call", args={"a": 1}))
    assert fake.wait_for(0, "reply") == {"op": "reply", "id": 1, "result": {"a": 1}}
    agent.close()
    assert done.wait(BOUND)


def test_the_async_client_serves_forever_without_a_timeout(fake):
    import asyncio

    import tether.aio

    async def main():
        agent = tether.aio.AsyncSubAgent("t", ["demo"], lambda req: req.args, socket_path=fake.path)
        task = asyncio.ensure_future(agent.serve_forever())
        c0 = await asyncio.get_running_loop().run_in_executor(None, fake.accept)
        await asyncio.get_running_loop().run_in_executor(None, fake.registered, c0, 0)
        fake.send(c0, request(1, "u1", kind="call", args={"b": 2}))
        reply = await asyncio.get_running_loop().run_in_executor(None, fake.wait_for, 0, "reply")
        await agent.close()
        task.cancel()
        return reply

    assert asyncio.run(main()) == {"op": "reply", "id": 1, "result": {"b": 2}}


def test_limits_and_shapes():
    with pytest.raises(ValueError, match="over the agent's limit"):
        p.encode({"op": "cast", "args": {"x": "y" * 100}}, max_line=64)
    s = p.LineSplitter(16)
    assert s.feed(b'{"op":"a"}\n{"op"') == [{"op": "a"}]
    assert s.feed(b':"b"}\n') == [{"op": "b"}]
    with pytest.raises(p.ProtocolError):
        s.feed(b"[1]\n")
    with pytest.raises(p.ProtocolError):
        p.LineSplitter(16).feed(b"y" * 17)
    with pytest.raises(p.ProtocolError):
        p.request_from({"op": "request", "id": "1", "method": "m", "target": {"topic": "t"}}, 1)
    with pytest.raises(p.ProtocolError):
        p.request_from({"op": "request", "id": 1, "target": {"topic": "t"}}, 1)
    r = p.request_from({"op": "request", "id": 3, "unique_id": "u", "kind": "call", "method": "m",
                        "target": {"topic": "t", "version": "1.2"}, "args": [], "timeout_ms": 2500}, 5)
    assert (r.args, r.timeout, r.target.version, r.generation) == ({}, 2.5, "1.2", 5)
    assert p.failure_of(KeyError("k")) == {"class": "KeyError", "module": "builtins", "message": "'k'"}
    assert isinstance(p.error_from({"class": "MessagingTimeout", "module": "tether", "message": "m"}), p.CallTimeout)
    b = p.Backoff(0.1, 0.4)
    steps = [b.next() for _ in range(5)]
    assert all(0.05 <= d <= 0.4 for d in steps) and steps[-1] >= 0.2
