"""The asyncio client against the real tether-agent and tether-proxy."""

from __future__ import annotations

import asyncio
import collections
import threading

import tether
import tether.aio
from conftest import BOUND, random_uuid, wait_until
from test_client import cast_stream


def run_agent_in_thread(world, uuid, handler):
    """An AsyncSubAgent on its own event loop in a thread (the test drives
    the daemons from the main thread); returns it and its loop."""
    loop = asyncio.new_event_loop()
    agent = tether.aio.AsyncSubAgent("py-aio", ["demo"], handler, socket_path=str(world.agent_socket(uuid)))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(agent.connect(BOUND), loop).result(BOUND)
    return agent, loop


def stop(agent, loop):
    asyncio.run_coroutine_threadsafe(agent.close(), loop).result(BOUND)
    loop.call_soon_threadsafe(loop.stop)


def test_async_handlers_serve_calls_concurrently_and_casts_in_order(world):
    world.proxy()
    uuid = random_uuid()
    world.agent(uuid)
    casts = []
    running = [0]
    all_in = None  # an asyncio.Event of the agent's loop, made there

    async def handler(req):
        nonlocal all_in
        if all_in is None:
            all_in = asyncio.Event()
        if req.method == "hold":
            # Each waits until all six are in their handlers at once.
            running[0] += 1
            if running[0] == 6:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), BOUND * 2)
            return "released"
        if req.method == "record":
            casts.append(req.args["i"])
            return None
        if req.method == "fail":
            raise KeyError("missing")
        return {"echo": req.args}

    agent, loop = run_agent_in_thread(world, uuid, handler)
    world.wait_linked(uuid, "demo")
    ctl = world.ctl()
    assert ctl.req(op="call", instance=uuid, topic="demo", method="echo", args={"a": 1})["result"] == {"echo": {"a": 1}}
    r = ctl.req(op="call", instance=uuid, topic="demo", method="fail")
    assert (r["error"]["class"], r["error"]["module"]) == ("KeyError", "builtins")
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        world.ctl().req(op="call", instance=uuid, topic="demo", method="hold", timeout_ms=int(BOUND * 3000))))
        for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND * 3)
    assert [r["result"] for r in out] == ["released"] * 6, out
    for i in range(50):
        assert ctl.req(op="cast", instance=uuid, topic="demo", method="record", args={"i": i})["ok"]
    assert casts == list(range(50))
    stop(agent, loop)


def test_async_cast_and_call_upstream(world):
    world.proxy('[policy.profiles.default]\nmode = "cast"\ntopics = ["*"]\n'
                '[[policy.profiles.default.targets]]\ntopics = ["*"]\nservers = ["*"]\nmethods = ["*"]\n')
    uuid = random_uuid()
    world.agent(uuid)
    agent, loop = run_agent_in_thread(world, uuid, lambda req: None)
    world.wait_linked(uuid, "demo")
    watch = world.ctl()
    assert watch.req(op="watch")["result"] == "watching"
    asyncio.run_coroutine_threadsafe(agent.cast("up", "told", {"x": 1}), loop).result(BOUND)
    ev = watch.line()["event"]
    assert (ev["instance"], ev["method"], ev["args"]) == (uuid, "told", {"x": 1})
    # Casts only: a call is refused by the host's policy, with its class.
    fut = asyncio.run_coroutine_threadsafe(agent.call("up", "ask", {}, timeout=BOUND), loop)
    try:
        fut.result(BOUND * 2)
        raise AssertionError("the call was not refused")
    except tether.RemoteError as e:
        assert (e.exc_class, e.exc_module) == ("Denied", "tether")
    stop(agent, loop)


def test_async_client_reconnects_across_an_agent_restart_and_runs_each_cast_once(world):
    world.proxy()
    uuid = random_uuid()
    world.agent(uuid)
    agent_proc = world.procs[-1]
    ran = collections.Counter()

    async def handler(req):
        ran[req.unique_id] += 1

    agent, loop = run_agent_in_thread(world, uuid, handler)
    world.wait_linked(uuid, "demo")

    def restart():
        agent_proc.kill9()
        world.agent(uuid)

    ids = cast_stream(world, uuid, 2000, on_half=restart)
    assert agent.connects >= 2
    assert set(ran) == set(ids)
    assert [u for u, n in ran.items() if n != 1] == []
    wait_until(lambda: world.ctl().req(op="call", instance=uuid, topic="demo", method="x")["ok"],
               "a call answered on the new connection")
    stop(agent, loop)
