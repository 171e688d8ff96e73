"""The blocking (thread-based) sub-agent client.

    import tether

    def handle(req: tether.Request):
        if req.method == "update":
            return {"ok": True}
        raise ValueError(f"no method {req.method}")

    agent = tether.SubAgent("lbaas", ["lbaas"], handle)
    agent.serve_forever()

Calls run concurrently (each in a thread of its own, at most
``max_concurrent_calls`` at once); casts run one after another in the order
they came. A handler's return value is the call's result (JSON-serialisable);
an exception it raises goes back to the caller as its class, module and
message. With ``ack`` (the default) a call is confirmed to the agent as its
handler starts and a cast once its handler returned, so a cast this process
had not finished when it died goes to the sub-agent started in its place.

When the agent goes away (it is being restarted) the client reconnects with
backoff and registers its topics again, by itself; requests the agent had not
seen confirmed come again on the new connection.
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from . import _protocol as p
from ._protocol import AgentGone, CastRefused, ProtocolError, Request, Target

LOG = logging.getLogger("tether")

Handler = Callable[[Request], Any]

#: Requests read from the socket but not yet started (calls waiting for a
#: handler slot, casts waiting for the one before them). Past it the client
#: stops reading and the agent holds the rest, so memory stays bounded. The
#: reader never waits below it: a handler waiting for an upstream call's
#: answer needs the reader. (With ``ack``, none of these is confirmed yet,
#: and the host already bounds an instance's unconfirmed requests.)
MAX_WAITING = 4096


def _bounded(seconds: float) -> float:
    """A wait the threading primitives take (``inf`` means for ever; they
    refuse waits over ``threading.TIMEOUT_MAX``)."""
    return min(max(seconds, 0.0), threading.TIMEOUT_MAX)


class _Slot:
    __slots__ = ("event", "msg", "generation")

    def __init__(self, generation: int):
        self.event = threading.Event()
        self.msg: Optional[Dict[str, Any]] = None
        self.generation = generation


class SubAgent:
    """A sub-agent connection to tether-agent (see the module's text).

    ``handler(request)`` serves requests; without one, override
    :meth:`dispatch`. ``on_refused(CastRefused)`` hears of upstream casts the
    host did not pass on (default: a warning in the log).
    """

    def __init__(
        self,
        name: Optional[str] = None,
        topics: Iterable[str] = (),
        handler: Optional[Handler] = None,
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
        self.max_line = max_line
        self.on_refused = on_refused
        self._topics: Tuple[str, ...] = tuple(topics)
        self._lock = threading.Lock()
        self._connected = threading.Condition(self._lock)
        self._sock: Optional[socket.socket] = None
        self._generation = 0
        self._registered_generation = 0
        self._register_error: Optional[str] = None
        self._closed = False
        self._write_lock = threading.Lock()
        self._calls: Dict[int, _Slot] = {}
        self._call_ids = itertools.count(1)
        self.max_concurrent_calls = max(1, max_concurrent_calls)
        self._work = threading.Condition(threading.Lock())
        self._running_calls = 0
        self._waiting_calls: "collections.deque[Request]" = collections.deque()
        self._casts: "collections.deque[Request]" = collections.deque()
        self._handled = p.Handled()
        self._reader: Optional[threading.Thread] = None
        self._cast_worker: Optional[threading.Thread] = None
        #: Connections made (1 after the first; more after agent restarts).
        self.connects = 0

    # -- lifecycle ---------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> "SubAgent":
        """Connect and register; returns once the agent accepted the topics.
        Waits up to ``timeout`` for the agent's socket to appear. Raises
        ProtocolError if the agent refused the registration (a topic another
        sub-agent serves, say), TimeoutError if it never answered."""
        if self._reader is None:
            self._cast_worker = threading.Thread(target=self._run_casts, name=f"tether-{self.name}-casts", daemon=True)
            self._cast_worker.start()
            self._reader = threading.Thread(target=self._run, name=f"tether-{self.name}", daemon=True)
            self._reader.start()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._registered_generation == 0 or self._registered_generation != self._generation:
                if self._register_error is not None:
                    err, self._register_error = self._register_error, None
                    raise ProtocolError(f"the agent refused the registration: {err}")
                if self._closed:
                    raise AgentGone("closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no registration with the agent at {self.path} within {timeout} s")
                self._connected.wait(_bounded(left))
        return self

    def serve_forever(self) -> None:
        """Connect (if not yet) and serve until :meth:`close`."""
        if self._reader is None:
            self.connect(timeout=float("inf"))
        assert self._reader is not None
        while self._reader.is_alive():
            self._reader.join(1.0)

    def close(self) -> None:
        """Stop: the connection is closed, handlers running finish on their own."""
        with self._lock:
            self._closed = True
            s = self._sock
            self._connected.notify_all()
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._work:
            self._work.notify_all()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)

    def __enter__(self) -> "SubAgent":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def topics(self) -> Tuple[str, ...]:
        return self._topics

    def set_topics(self, topics: Iterable[str], timeout: float = 30.0) -> None:
        """Serve these topics from now on (they replace the earlier ones), and
        wait until the agent accepted them if connected."""
        with self._lock:
            self._topics = tuple(topics)
            gen = self._generation
            self._registered_generation = 0
        if self._reader is None:
            return
        try:
            self._send(p.register_msg(self.name, self._topics, self.ack), gen)
        except AgentGone:
            pass  # registered again on the next connection
        self.connect(timeout)

    # -- upstream ----------------------------------------------------------

    def cast(
        self,
        target: Any,
        method: str,
        args: Optional[Dict[str, Any]] = None,
        ctx: Optional[Dict[str, Any]] = None,
        timeout: float = 30.0,
    ) -> None:
        """Cast to the control plane (``target``: a Target, a topic or a dict).
        Waits up to ``timeout`` for a connection if the agent is being
        restarted. The host may still refuse it: see ``on_refused``."""
        msg = {
            "op": "cast",
            "target": p.as_target(target).to_json(),
            "method": method,
            "args": args or {},
            "ctx": ctx or {},
        }
        self._send(msg, self._wait_connected(timeout))

    def notify(
        self,
        event_type: str,
        payload: Any,
        priority: str = "info",
        topic: str = "notifications",
        ctx: Optional[Dict[str, Any]] = None,
        publisher_id: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        """Send an oslo notification to the control plane (what oslo's
        ``Notifier`` sends): it is published on ``<topic>.<priority>``. The
        host decides whether this instance may notify on ``topic`` and
        publishes it as ``tether.<instance uuid>``; a refusal comes to
        ``on_refused`` with ``event_type`` as its method."""
        self._send(p.notify_msg(event_type, payload, priority, topic, ctx, publisher_id),
                   self._wait_connected(timeout))

    def call(
        self,
        target: Any,
        method: str,
        args: Optional[Dict[str, Any]] = None,
        ctx: Optional[Dict[str, Any]] = None,
        timeout: float = p.DEFAULT_CALL_TIMEOUT,
    ) -> Any:
        """Call the control plane and return its result. Raises RemoteError
        (CallTimeout when no answer came in time) with the remote class, or
        AgentGone if the agent went away before the answer."""
        start = time.monotonic()
        gen = self._wait_connected(timeout)
        left = max(timeout - (time.monotonic() - start), 0.001)
        cid = next(self._call_ids)
        slot = _Slot(gen)
        with self._lock:
            self._calls[cid] = slot
        try:
            msg = {
                "op": "call",
                "id": cid,
                "target": p.as_target(target).to_json(),
                "method": method,
                "args": args or {},
                "ctx": ctx or {},
                "timeout_ms": max(int(left * 1000), 1),
            }
            self._send(msg, gen)
            # The agent answers MessagingTimeout itself at the deadline; the
            # margin covers a slow agent, not a normal outcome.
            if not slot.event.wait(_bounded(left + 5.0)):
                raise p.CallTimeout("MessagingTimeout", "tether", f"no answer to {method} within {timeout} s")
        finally:
            with self._lock:
                self._calls.pop(cid, None)
        if slot.msg is None:
            raise AgentGone(f"the agent went away before answering {method}")
        if slot.msg.get("error") is not None:
            raise p.error_from(slot.msg["error"])
        return slot.msg.get("result")

    # -- serving -----------------------------------------------------------

    def dispatch(self, req: Request) -> None:
        """A request arrived (called on the reader thread). A request this
        process already handled or is handling (handed over again after an
        agent restart) is not run twice; the others go to :meth:`start`."""
        with self._work:
            while len(self._waiting_calls) + len(self._casts) >= MAX_WAITING and not self._closed:
                self._work.wait(1.0)
            arrived = self._handled.arrive(req)
        if arrived == p.Handled.AGAIN:
            self._again(req)
        elif arrived == p.Handled.NEW:
            self.start(req)

    def start(self, req: Request) -> None:
        """Run ``handler`` for a new request: calls concurrently, casts in
        order. Called on the reader thread: must not block for long. Whoever
        overrides it answers through :meth:`finish`."""
        with self._work:
            if not req.is_call:
                self._casts.append(req)
                self._work.notify_all()
                return
            if self._running_calls >= self.max_concurrent_calls:
                self._waiting_calls.append(req)
                return
            self._running_calls += 1
        threading.Thread(target=self._serve_calls, args=(req,), daemon=True).start()

    def took(self, req: Request) -> None:
        """Confirm ``req`` is ours (with ``ack``): the agent journals it and the
        host confirms it to its caller. A request from an earlier connection
        is not confirmed (the agent already gave it to someone else)."""
        if self.ack:
            self._send_quiet({"op": "took", "id": req.id}, req.generation)

    def reply(self, req: Request, result: Any = None, error: Any = None) -> None:
        """Answer a call: ``result``, or ``error`` (an exception, or a dict of
        class, module and message). A reply that cannot be sent (the agent
        went away meanwhile: the caller was told) is dropped."""
        msg: Dict[str, Any] = {"op": "reply", "id": req.id}
        if error is not None:
            msg["error"] = error if isinstance(error, dict) else p.failure_of(error)
        else:
            msg["result"] = result
        try:
            data = p.encode(msg, self.max_line)
        except (TypeError, ValueError) as e:
            LOG.error("%s: the reply to %s cannot be sent (%s); the caller gets the error", self.name, req.method, e)
            data = p.encode({"op": "reply", "id": req.id, "error": p.failure_of(e)}, self.max_line)
        self._write(data, req.generation, quiet=True)

    def _again(self, req: Request) -> None:
        """A request we handled came again (see ``p.REMEMBERED``): confirm
        it; a call's answer is gone, so its caller hears that, as the agent
        answers a call it had taken before a restart."""
        LOG.info("%s: %s %s came again after an agent restart; not run twice", self.name, req.kind, req.method)
        if req.is_call:
            self.reply(req, error=p.GUEST_RESTARTED)
        else:
            self.took(req)

    def finish(self, req: Request) -> "list[Request]":
        """``req`` was handled: the requests to answer or confirm (itself,
        and the same request handed over again meanwhile)."""
        with self._work:
            return self._handled.finish(req)

    def _serve_calls(self, req: Optional[Request]) -> None:
        # One handler slot: serve this call, then any waiting for a slot.
        while req is not None:
            self.took(req)
            try:
                result, error = self._handle(req), None
            except Exception as e:  # any error goes back to the caller
                result, error = None, e
            for r in self.finish(req):
                self.reply(r, result=result, error=error)
            with self._work:
                req = self._waiting_calls.popleft() if self._waiting_calls else None
                if req is None:
                    self._running_calls -= 1
                self._work.notify_all()

    def _run_casts(self) -> None:
        while True:
            with self._work:
                while not self._casts and not self._closed:
                    self._work.wait()
                if not self._casts:
                    return
                req = self._casts.popleft()
                self._work.notify_all()
            try:
                self._handle(req)
            except Exception:
                LOG.exception("%s: cast %s failed", self.name, req.method)
            for r in self.finish(req):
                self.took(r)

    def _handle(self, req: Request) -> Any:
        if self.handler is None:
            raise NotImplementedError(f"{self.name} has no handler for {req.method}")
        return self.handler(req)

    # -- connection --------------------------------------------------------

    def _wait_connected(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._sock is None:
                if self._closed or (self._reader is None):
                    raise AgentGone("not connected to the agent")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentGone(f"no connection to the agent at {self.path} within {timeout} s")
                self._connected.wait(_bounded(left))
            return self._generation

    def _send(self, msg: Dict[str, Any], generation: int) -> None:
        self._write(p.encode(msg, self.max_line), generation, quiet=False)

    def _send_quiet(self, msg: Dict[str, Any], generation: int) -> None:
        self._write(p.encode(msg, self.max_line), generation, quiet=True)

    def _write(self, data: bytes, generation: int, quiet: bool) -> None:
        with self._write_lock:
            with self._lock:
                s = self._sock if self._generation == generation else None
            if s is None:
                if quiet:
                    return
                raise AgentGone("the connection to the agent ended")
            try:
                s.sendall(data)
            except OSError as e:
                if not quiet:
                    raise AgentGone(f"the connection to the agent ended: {e}") from None

    def _open(self) -> Optional[socket.socket]:
        backoff = p.Backoff()
        while True:
            with self._lock:
                if self._closed:
                    return None
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError as e:
                s.close()
                if not self.reconnect and self.connects > 0:
                    return None
                delay = backoff.next()
                LOG.debug("%s: cannot connect to %s (%s); again in %.2f s", self.name, self.path, e, delay)
                with self._lock:
                    self._connected.wait(delay)

    def _run(self) -> None:
        while True:
            s = self._open()
            if s is None:
                break
            with self._lock:
                self._generation += 1
                gen = self._generation
                self._sock = s
                self.connects += 1
                self._connected.notify_all()
            try:
                self._send(p.register_msg(self.name, self._topics, self.ack), gen)
                self._read(s, gen)
            except (OSError, ProtocolError, AgentGone) as e:
                LOG.warning("%s: connection to the agent ended: %s", self.name, e)
            with self._lock:
                self._sock = None
                for slot in self._calls.values():
                    if slot.generation == gen:
                        slot.event.set()  # msg None: AgentGone
                closed = self._closed
                self._connected.notify_all()
            s.close()
            if closed or not self.reconnect:
                break
            LOG.info("%s: the agent went away; reconnecting", self.name)
        with self._lock:
            self._closed = True
            self._connected.notify_all()
        with self._work:
            self._work.notify_all()

    def _read(self, s: socket.socket, gen: int) -> None:
        lines = p.LineSplitter(self.max_line)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return
            for msg in lines.feed(chunk):
                self._on_message(msg, gen)

    def _on_message(self, msg: Dict[str, Any], gen: int) -> None:
        op = msg.get("op")
        if op == "request":
            self.dispatch(p.request_from(msg, gen))
        elif op == "result":
            with self._lock:
                slot = self._calls.get(msg.get("id"))  # type: ignore[arg-type]
            if slot is not None:
                slot.msg = msg
                slot.event.set()
        elif op == "registered":
            with self._lock:
                self._registered_generation = gen
                self._connected.notify_all()
            LOG.info("%s: serving %s", self.name, msg.get("topics"))
        elif op == "cast_refused":
            r = p.refusal_from(msg)
            if self.on_refused is not None:
                self.on_refused(r)
            else:
                LOG.warning("%s: the host refused cast %s to %s: %s", self.name, r.method, r.target.topic, r.reason)
        elif op == "error":
            text = str(msg.get("message", ""))
            with self._lock:
                waiting = self._registered_generation != gen
                if waiting:
                    self._register_error = text
                    self._connected.notify_all()
            LOG.error("%s: the agent says: %s", self.name, text)
        else:
            LOG.warning("%s: ignoring an unknown message from the agent: %r", self.name, op)


__all__ = ["SubAgent", "Handler", "Request", "Target", "CastRefused"]
