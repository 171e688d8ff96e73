"""The sub-agent protocol: JSON lines between a sub-agent and tether-agent.

The whole protocol is specified in the repository's docs/subagent.md. This
module holds what both client flavours share: message encoding with its
bounds, the request and refusal types, and how exceptions travel.
"""

from __future__ import annotations

import collections
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

#: Where tether-agent listens unless told otherwise (its default).
DEFAULT_SOCKET = "/run/tether/agent.sock"

#: The agent refuses a longer line and closes the connection (its default
#: ``max_line``); the client refuses to send one, and treats a longer line
#: from the agent as a broken connection rather than buffer without bound.
MAX_LINE = 1024 * 1024

#: Reconnection backoff after the agent goes away (it is being restarted):
#: from 50 ms, doubling, to 2 s, each step jittered to [step/2, step] so a
#: VM's sub-agents do not reconnect in lockstep.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0

#: Unique ids of requests a client handled, remembered to recognise one the
#: agent hands over again: when the agent is killed between the client's
#: ``took`` and its journal write, the host gives the request to the
#: restarted agent, which gives it to the client again. As many as the
#: agent's own journal keeps.
REMEMBERED = 16384

#: What a call handed over again after it ran is answered (as the agent
#: answers a call it had taken before a restart).
GUEST_RESTARTED = {"class": "GuestRestarted", "module": "tether",
                   "message": "the call ran before the agent restarted; its answer was lost"}

#: Upstream calls wait this long unless the caller says otherwise (the
#: agent's own default, 60 s).
DEFAULT_CALL_TIMEOUT = 60.0

#: Concurrent call handlers per sub-agent. Past it the client stops reading
#: its socket, and the agent keeps further requests for it (its queue and
#: backlog, then an explicit SubAgentBusy): memory and threads stay bounded.
DEFAULT_MAX_CONCURRENT_CALLS = 64


def socket_path(path: Optional[str] = None) -> str:
    """The socket to use: ``path``, else ``$TETHER_AGENT_SOCKET`` (set by the
    agent's supervisor for the sub-agents it starts), else the default."""
    return path or os.environ.get("TETHER_AGENT_SOCKET") or DEFAULT_SOCKET


def default_name() -> str:
    """``$TETHER_SUBAGENT_NAME`` (set by the supervisor), else the program's name."""
    import sys

    name = os.environ.get("TETHER_SUBAGENT_NAME")
    if name:
        return name
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return prog or "python-subagent"


class TetherError(Exception):
    """Base class of the errors this library raises itself."""


class ProtocolError(TetherError):
    """The agent sent something that is not the protocol, or refused what we sent."""


class AgentGone(TetherError, ConnectionError):
    """The connection to the agent ended while an upstream call waited for its
    answer. The call may or may not have reached the control plane."""


class RemoteError(TetherError):
    """An error raised on the other side: by the control plane's server, or by
    tether itself (module ``tether``: ``Denied``, ``BrokerUnavailable``,
    ``MessagingTimeout``, ...). ``exc_class`` and ``exc_module`` name it."""

    def __init__(self, exc_class: str, exc_module: str, message: str):
        super().__init__(f"{exc_class}: {message}")
        self.exc_class = exc_class
        self.exc_module = exc_module
        self.message = message


class CallTimeout(RemoteError):
    """No answer from the control plane within the call's timeout."""


@dataclass(frozen=True)
class Target:
    """Where a message goes, in oslo.messaging terms."""

    topic: str
    server: Optional[str] = None
    namespace: Optional[str] = None
    version: Optional[str] = None
    exchange: Optional[str] = None

    def to_json(self) -> Dict[str, str]:
        out = {"topic": self.topic}
        for k in ("server", "namespace", "version", "exchange"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @classmethod
    def from_json(cls, v: Any) -> "Target":
        if isinstance(v, str):
            return cls(topic=v)
        if not isinstance(v, dict) or not isinstance(v.get("topic"), str):
            raise ProtocolError(f"not a target: {v!r}")

        def opt(k: str) -> Optional[str]:
            x = v.get(k)
            return x if isinstance(x, str) else None

        return cls(v["topic"], opt("server"), opt("namespace"), opt("version"), opt("exchange"))


def as_target(t: Any) -> Target:
    """A `Target` from a Target, a topic string or a dict."""
    return t if isinstance(t, Target) else Target.from_json(t)


@dataclass
class Request:
    """A request from the control plane, as the agent handed it over."""

    id: int
    unique_id: str
    kind: str  # "call" or "cast" (fanouts arrive as casts)
    target: Target
    method: str
    args: Dict[str, Any]
    ctx: Dict[str, Any]
    #: Seconds the caller had left when the agent handed it over (calls).
    timeout: Optional[float] = None
    #: Which connection it came on: its id means nothing on another.
    generation: int = field(default=0, repr=False)

    @property
    def is_call(self) -> bool:
        return self.kind == "call"


@dataclass(frozen=True)
class CastRefused:
    """One of our upstream casts went no further than the host. ``reason``
    starts with ``Denied``, ``BrokerUnavailable`` or ``NoRoute``."""

    target: Target
    method: str
    reason: str


def request_from(msg: Dict[str, Any], generation: int) -> Request:
    """Parse a ``request`` line (raises ProtocolError when it is not one)."""
    try:
        rid = msg["id"]
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ProtocolError(f"request id is not a number: {rid!r}")
        args = msg.get("args")
        ctx = msg.get("ctx")
        t = msg.get("timeout_ms")
        return Request(
            id=rid,
            unique_id=str(msg.get("unique_id", "")),
            kind=str(msg.get("kind", "cast")),
            target=Target.from_json(msg.get("target")),
            method=str(msg["method"]),
            args=args if isinstance(args, dict) else {},
            ctx=ctx if isinstance(ctx, dict) else {},
            timeout=t / 1000.0 if isinstance(t, (int, float)) and not isinstance(t, bool) else None,
            generation=generation,
        )
    except KeyError as e:
        raise ProtocolError(f"request without {e.args[0]!r}") from None


def refusal_from(msg: Dict[str, Any]) -> CastRefused:
    return CastRefused(Target.from_json(msg.get("target")), str(msg.get("method", "")), str(msg.get("reason", "")))


def failure_of(exc: BaseException) -> Dict[str, str]:
    """How an exception travels: its class, module (``builtins`` for built-in
    classes) and message. The caller sees the class (oslo re-raises builtins
    as themselves and others as ``RemoteError``)."""
    cls = type(exc)
    module = cls.__module__ or "builtins"
    return {"class": cls.__name__, "module": module, "message": str(exc)}


def error_from(e: Any) -> RemoteError:
    if not isinstance(e, dict):
        return RemoteError("RemoteError", "tether", str(e))
    cls = str(e.get("class", "RemoteError"))
    mod = str(e.get("module", ""))
    text = str(e.get("message", ""))
    if cls == "MessagingTimeout":
        return CallTimeout(cls, mod, text)
    return RemoteError(cls, mod, text)


def encode(msg: Dict[str, Any], max_line: int = MAX_LINE) -> bytes:
    """One line; ValueError if it is longer than the agent takes (it would
    close the connection), TypeError if ``msg`` is not JSON."""
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if len(data) > max_line:
        raise ValueError(f"message of {len(data)} bytes is over the agent's limit of {max_line}")
    return data


class LineSplitter:
    """Bytes in, JSON objects out; a line over ``max_line`` is an error
    (the buffer never grows past it)."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self.buf = b""

    def feed(self, chunk: bytes) -> List[Dict[str, Any]]:
        self.buf += chunk
        out = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 1 :]
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError as e:
                raise ProtocolError(f"the agent sent a line that is not JSON: {e}") from None
            if not isinstance(msg, dict):
                raise ProtocolError("the agent sent a line that is not a JSON object")
            out.append(msg)
        if len(self.buf) > self.max_line:
            raise ProtocolError(f"the agent sent a line over {self.max_line} bytes")
        return out


class Handled:
    """The requests a client handled or is handling, by unique id (the last
    REMEMBERED), so that one handed over again after an agent restart is
    not run twice. Not locked: the blocking client holds its own lock
    around it, the asyncio one runs on one loop."""

    NEW, AGAIN, ATTACHED = "new", "again", "attached"

    def __init__(self, limit: int = REMEMBERED):
        self.limit = limit
        # unique id -> None (handled) or the requests waiting for its answer.
        self._seen: "collections.OrderedDict[str, Optional[List[Request]]]" = collections.OrderedDict()

    def arrive(self, req: Request) -> str:
        """NEW (run it), AGAIN (handled before: confirm or answer it again,
        do not run it) or ATTACHED (running or queued: answered with it)."""
        if not req.unique_id:
            return self.NEW
        if req.unique_id in self._seen:
            waiting = self._seen[req.unique_id]
            if waiting is None:
                return self.AGAIN
            waiting.append(req)
            return self.ATTACHED
        self._seen[req.unique_id] = [req]
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return self.NEW

    def finish(self, req: Request) -> List[Request]:
        """``req`` was handled: the requests to answer or confirm (itself,
        and the same request handed over again meanwhile)."""
        if not req.unique_id:
            return [req]
        waiting = self._seen.get(req.unique_id) or [req]
        self._seen[req.unique_id] = None
        return waiting

    def forget(self, req: Request) -> None:
        """``req`` was not started after all: if it comes again, run it."""
        self._seen.pop(req.unique_id, None)

    def waiting(self, unique_id: str) -> List[Request]:
        """The requests waiting for ``unique_id``'s answer (none once handled)."""
        return list(self._seen.get(unique_id) or [])


class Backoff:
    """Jittered exponential backoff for reconnecting."""

    def __init__(self, lo: float = BACKOFF_MIN, hi: float = BACKOFF_MAX):
        self.lo, self.hi, self.step = lo, hi, lo

    def next(self) -> float:
        d = random.uniform(self.step / 2, self.step)
        self.step = min(self.step * 2, self.hi)
        return d

    def reset(self) -> None:
        self.step = self.lo


def register_msg(name: str, topics: Tuple[str, ...], ack: bool) -> Dict[str, Any]:
    return {"op": "register", "name": name, "topics": list(topics), "ack": ack}


def notify_msg(event_type: str, payload: Any, priority: str, topic: str,
               ctx: Optional[Dict[str, Any]], publisher_id: Optional[str]) -> Dict[str, Any]:
    """A ``notify`` line, with oslo's notification fields."""
    import datetime
    import uuid

    message = {
        "message_id": str(uuid.uuid4()),
        "event_type": event_type,
        "priority": priority.upper(),
        "payload": payload,
        "timestamp": str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)),
    }
    if publisher_id is not None:
        message["publisher_id"] = publisher_id
    return {"op": "notify", "target": {"topic": f"{topic}.{priority.lower()}"}, "message": message,
            "ctx": ctx or {}}
