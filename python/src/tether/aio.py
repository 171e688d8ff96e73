"""The asyncio sub-agent client: the same protocol and behaviour as
:class:`tether.SubAgent`, for programs built on an event loop.

    import asyncio, tether.aio

    async def handle(req):
        return {"pool": req.args["pool"], "ok": True}

    async def main():
        agent = tether.aio.AsyncSubAgent("lbaas", ["lbaas"], handle)
        await agent.serve_forever()

    asyncio.run(main())

A handler may be a coroutine function or a plain function (a plain one runs
on the loop: keep it short). Calls run concurrently (at most
``max_concurrent_calls`` at once), casts one after another in order; with
``ack`` a call is confirmed as it starts and a cast once handled. The client
reconnects and registers again by itself when the agent restarts.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
from typing import Any, Awaitable, Callable, Dict, Iterable, Optional, Tuple, Union

from . import _protocol as p
from ._protocol import AgentGone, CastRefused, ProtocolError, Request

LOG = logging.getLogger("tether")

AsyncHandler = Callable[[Request], Union[Any, Awaitable[Any]]]

#: As in the blocking client: requests read but not started, past which the
#: reader waits (and the agent holds the rest).
MAX_WAITING = 4096


class AsyncSubAgent:
    """See the module's text; the parameters are those of :class:`tether.SubAgent`."""

    def __init__(
        self,
        name: Optional[str] = None,
        topics: Iterable[str] = (),
        handler: Optional[AsyncHandler] = None,
        *,
        socket_path: Optional[str] = None,
        ack: bool = True,
        reconnect: bool = True,
        max_concurrent_calls: int = p.DEFAULT_MAX_CONCURRENT_CALLS,
        on_refused: Optional[Callable[[CastRefused], None]] = None,
        max_line: int = p.MAX_LINE,
    ):
        self.name = name or p.default_name()
        self.path = p.socket_path(socket_path)
        self.handler = handler
        self.ack = ack
        self.reconnect = reconnect
        self.on_refused = on_refused
        self.max_line = max_line
        self.max_concurrent_calls = max(1, max_concurrent_calls)
        self._topics: Tuple[str, ...] = tuple(topics)
        self._writer: Optional[asyncio.StreamWriter] = None
        self._generation = 0
        self._registered: Optional[asyncio.Future] = None
        self._changed: Optional[asyncio.Condition] = None
        self._closed = False
        self._calls: Dict[int, Tuple[asyncio.Future, int]] = {}
        self._call_ids = itertools.count(1)
        self._slots: Optional[asyncio.Semaphore] = None
        self._waiting = 0
        self._casts: "collections.deque[Request]" = collections.deque()
        self._tasks: set = set()
        self._handled = p.Handled()
        self._runner: Optional[asyncio.Task] = None
        self._cast_task: Optional[asyncio.Task] = None
        #: Connections made (1 after the first; more after agent restarts).
        self.connects = 0

    async def connect(self, timeout: float = 30.0) -> "AsyncSubAgent":
        """Connect and register; returns once the agent accepted the topics."""
        if self._runner is None:
            self._changed = asyncio.Condition()
            self._slots = asyncio.Semaphore(self.max_concurrent_calls)
            self._registered = asyncio.get_running_loop().create_future()
            self._runner = asyncio.ensure_future(self._run())
            self._cast_task = asyncio.ensure_future(self._run_casts())
        assert self._registered is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._registered), None if timeout == float("inf") else timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no registration with the agent at {self.path} within {timeout} s") from None
        return self

    async def serve_forever(self) -> None:
        if self._runner is None:
            await self.connect(timeout=float("inf"))
        assert self._runner is not None
        await asyncio.shield(self._runner)

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        for t in (self._runner, self._cast_task):
            if t is not None:
                t.cancel()
        for t in (self._runner, self._cast_task):
            if t is not None:
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass

    async def __aenter__(self) -> "AsyncSubAgent":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- upstream ----------------------------------------------------------

    async def cast(self, target: Any, method: str, args: Optional[Dict[str, Any]] = None,
                   ctx: Optional[Dict[str, Any]] = None, timeout: float = 30.0) -> None:
        gen = await self._wait_connected(timeout)
        await self._send({"op": "cast", "target": p.as_target(target).to_json(), "method": method,
                          "args": args or {}, "ctx": ctx or {}}, gen, quiet=False)

    async def notify(self, event_type: str, payload: Any, priority: str = "info", topic: str = "notifications",
                     ctx: Optional[Dict[str, Any]] = None, publisher_id: Optional[str] = None,
                     timeout: float = 30.0) -> None:
        """See :meth:`tether.SubAgent.notify`."""
        gen = await self._wait_connected(timeout)
        await self._send(p.notify_msg(event_type, payload, priority, topic, ctx, publisher_id), gen, quiet=False)

    async def call(self, target: Any, method: str, args: Optional[Dict[str, Any]] = None,
                   ctx: Optional[Dict[str, Any]] = None, timeout: float = p.DEFAULT_CALL_TIMEOUT) -> Any:
        loop = asyncio.get_running_loop()
        start = loop.time()
        gen = await self._wait_connected(timeout)
        left = max(timeout - (loop.time() - start), 0.001)
        cid = next(self._call_ids)
        fut: asyncio.Future = loop.create_future()
        self._calls[cid] = (fut, gen)
        try:
            await self._send({"op": "call", "id": cid, "target": p.as_target(target).to_json(), "method": method,
                              "args": args or {}, "ctx": ctx or {}, "timeout_ms": max(int(left * 1000), 1)},
                             gen, quiet=False)
            try:
                msg = await asyncio.wait_for(fut, None if left == float("inf") else left + 5.0)
            except asyncio.TimeoutError:
                raise p.CallTimeout("MessagingTimeout", "tether", f"no answer to {method} within {timeout} s") from None
        finally:
            self._calls.pop(cid, None)
        if msg is None:
            raise AgentGone(f"the agent went away before answering {method}")
        if msg.get("error") is not None:
            raise p.error_from(msg["error"])
        return msg.get("result")

    # -- serving -----------------------------------------------------------

    async def took(self, req: Request) -> None:
        if self.ack:
            await self._send({"op": "took", "id": req.id}, req.generation, quiet=True)

    async def reply(self, req: Request, result: Any = None, error: Any = None) -> None:
        msg: Dict[str, Any] = {"op": "reply", "id": req.id}
        if error is not None:
            msg["error"] = error if isinstance(error, dict) else p.failure_of(error)
        else:
            msg["result"] = result
        try:
            p.encode(msg, self.max_line)
        except (TypeError, ValueError) as e:
            LOG.error("%s: the reply to %s cannot be sent (%s); the caller gets the error", self.name, req.method, e)
            msg = {"op": "reply", "id": req.id, "error": p.failure_of(e)}
        await self._send(msg, req.generation, quiet=True)

    async def _handle(self, req: Request) -> Any:
        if self.handler is None:
            raise NotImplementedError(f"{self.name} has no handler for {req.method}")
        out = self.handler(req)
        if inspect.isawaitable(out):
            out = await out
        return out

    async def _serve_call(self, req: Request) -> None:
        assert self._slots is not None and self._changed is not None
        try:
            async with self._slots:
                self._waiting -= 1
                async with self._changed:
                    self._changed.notify_all()
                await self.took(req)
                try:
                    result, error = await self._handle(req), None
                except Exception as e:
                    result, error = None, e
                for r in self._finish(req):
                    await self.reply(r, result=result, error=error)
        except asyncio.CancelledError:
            pass

    async def _run_casts(self) -> None:
        assert self._changed is not None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._casts))
                req = self._casts.popleft()
                self._changed.notify_all()
            try:
                await self._handle(req)
            except Exception:
                LOG.exception("%s: cast %s failed", self.name, req.method)
            for r in self._finish(req):
                await self.took(r)

    def _finish(self, req: Request) -> "list[Request]":
        return self._handled.finish(req)

    async def _dispatch(self, req: Request) -> None:
        assert self._changed is not None
        arrived = self._handled.arrive(req)
        if arrived == p.Handled.ATTACHED:
            return
        if arrived == p.Handled.AGAIN:
            # Handled before the agent restarted; not run twice.
            LOG.info("%s: %s %s came again after an agent restart; not run twice", self.name, req.kind, req.method)
            if req.is_call:
                await self.reply(req, error=p.GUEST_RESTARTED)
            else:
                await self.took(req)
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self._waiting + len(self._casts) < MAX_WAITING)
            if not req.is_call:
                self._casts.append(req)
                self._changed.notify_all()
                return
            self._waiting += 1
        t = asyncio.ensure_future(self._serve_call(req))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- connection --------------------------------------------------------

    async def _wait_connected(self, timeout: float) -> int:
        if self._changed is None or self._closed:
            raise AgentGone("not connected to the agent")
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._writer is not None or self._closed),
                                       None if timeout == float("inf") else timeout)
        except asyncio.TimeoutError:
            raise AgentGone(f"no connection to the agent at {self.path} within {timeout} s") from None
        if self._writer is None:
            raise AgentGone("closed")
        return self._generation

    async def _send(self, msg: Dict[str, Any], generation: int, quiet: bool) -> None:
        data = p.encode(msg, self.max_line)
        w = self._writer if self._generation == generation else None
        if w is None:
            if quiet:
                return
            raise AgentGone("the connection to the agent ended")
        try:
            w.write(data)
            await w.drain()
        except (OSError, RuntimeError) as e:
            if not quiet:
                raise AgentGone(f"the connection to the agent ended: {e}") from None

    async def _run(self) -> None:
        assert self._changed is not None and self._registered is not None
        backoff = p.Backoff()
        while not self._closed:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=self.max_line + 1)
            except OSError as e:
                delay = backoff.next()
                LOG.debug("%s: cannot connect to %s (%s); again in %.2f s", self.name, self.path, e, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._generation += 1
            gen = self._generation
            self.connects += 1
            async with self._changed:
                self._writer = writer
                self._changed.notify_all()
            try:
                await self._send(p.register_msg(self.name, self._topics, self.ack), gen, quiet=False)
                lines = p.LineSplitter(self.max_line)
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    for msg in lines.feed(chunk):
                        await self._on_message(msg, gen)
            except (OSError, ProtocolError, AgentGone) as e:
                LOG.warning("%s: connection to the agent ended: %s", self.name, e)
            async with self._changed:
                self._writer = None
                self._changed.notify_all()
            writer.close()
            for fut, g in list(self._calls.values()):
                if g == gen and not fut.done():
                    fut.set_result(None)
            if not self.reconnect:
                break
            LOG.info("%s: the agent went away; reconnecting", self.name)
        self._closed = True
        async with self._changed:
            self._changed.notify_all()

    async def _on_message(self, msg: Dict[str, Any], gen: int) -> None:
        assert self._registered is not None
        op = msg.get("op")
        if op == "request":
            await self._dispatch(p.request_from(msg, gen))
        elif op == "result":
            entry = self._calls.get(msg.get("id"))  # type: ignore[arg-type]
            if entry is not None and not entry[0].done():
                entry[0].set_result(msg)
        elif op == "registered":
            if not self._registered.done():
                self._registered.set_result(True)
            LOG.info("%s: serving %s", self.name, msg.get("topics"))
        elif op == "cast_refused":
            r = p.refusal_from(msg)
            if self.on_refused is not None:
                self.on_refused(r)
            else:
                LOG.warning("%s: the host refused cast %s to %s: %s", self.name, r.method, r.target.topic, r.reason)
        elif op == "error":
            text = str(msg.get("message", ""))
            if not self._registered.done():
                self._registered.set_exception(ProtocolError(f"the agent refused the registration: {text}"))
            LOG.error("%s: the agent says: %s", self.name, text)
        else:
            LOG.warning("%s: ignoring an unknown message from the agent: %r", self.name, op)


__all__ = ["AsyncSubAgent", "AsyncHandler"]
