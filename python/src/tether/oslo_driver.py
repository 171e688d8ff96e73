"""The ``tether://`` transport for oslo.messaging.

An oslo.messaging program inside the VM keeps its ``RPCServer``,
``RPCClient`` and ``Notifier``; only its transport URL changes::

    transport_url = tether:///run/tether/agent.sock

(the path is the agent's sub-agent socket; ``tether://`` alone means
``$TETHER_AGENT_SOCKET`` or ``/run/tether/agent.sock``). The driver is
registered under the ``oslo.messaging.drivers`` entry point as ``tether``.

What maps to what:

- ``RPCServer(Target(topic=T, server=S))``: the driver registers topic T with
  the agent; the control plane reaches it as ``Target(topic=T,
  server=<instance uuid>)`` or by fanout on T. S is not used: the host
  decides which instance this is, never the guest.
- Incoming calls and casts are confirmed to the agent (``took``) when the
  server acknowledges them, which oslo's server does as it starts a message,
  as it does over RabbitMQ. Replies carry exceptions as their class, module
  and message; the control plane's oslo re-raises builtins as themselves and
  other classes as ``RemoteError``, as over RabbitMQ.
- ``RPCClient.call``/``cast`` go to the control plane through the host's
  policy (which may refuse them: a call gets ``RemoteError`` with
  ``Denied``; a refused cast is logged here). The call's ``timeout`` holds;
  ``call_monitor_timeout`` is accepted and has no further effect (the call
  waits for its whole timeout). Fanout from the guest is not carried.
- ``Notifier``: notifications go to the control plane's notification topic
  (``<topic>.<priority>`` on the control exchange) through the host, which
  decides whether this instance may notify and stamps its identity.
  Listening for notifications inside the guest is not carried.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Dict, List, Optional

import oslo_messaging
from oslo_messaging._drivers import base, common

from . import _protocol as p
from .client import SubAgent

LOG = logging.getLogger("tether.oslo")

#: How long a send waits for the connection to the agent (the agent being
#: restarted) before it fails.
CONNECT_TIMEOUT = 30.0

#: Requests received for one listener that oslo's server has not polled yet.
#: Past it the driver's reader waits, and the agent holds the rest.
MAX_LISTENER_QUEUE = 1024


def _context(ctxt: Any) -> Dict[str, Any]:
    """A context as a dict, as oslo's AMQP drivers pack one: a dict as it
    is, anything else (oslo.context's RequestContext) by its ``to_dict``."""
    if ctxt is None:
        return {}
    if isinstance(ctxt, dict):
        return dict(ctxt)
    to_dict = getattr(ctxt, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


class TetherIncomingMessage(base.RpcIncomingMessage):
    def __init__(self, agent: "_Agent", req: p.Request):
        message: Dict[str, Any] = {"method": req.method, "args": req.args}
        if req.target.namespace is not None:
            message["namespace"] = req.target.namespace
        if req.target.version is not None:
            message["version"] = req.target.version
        # oslo >= 15 takes a msg_id (for its logs; a fresh uuid when None);
        # 14 (Debian 12's) has no such parameter: set the attribute instead.
        super().__init__(req.ctx, message)
        if req.unique_id:
            self.msg_id = req.unique_id
        self._agent = agent
        self._req = req
        self._acked = False

    def acknowledge(self) -> None:
        # oslo's server acknowledges as it starts a message. A cast is then
        # done as far as delivery goes; a call is done once answered.
        if self._acked:
            return
        self._acked = True
        if self._req.is_call:
            self._agent.took(self._req)
        else:
            for r in self._agent.finish(self._req):
                self._agent.took(r)

    def requeue(self) -> None:
        # Not confirmed: if this process goes away the agent gives it to the
        # next server of its topic. There is no "give it back" while connected.
        LOG.warning("tether: requeue of %s is not supported; it stays with this server", self._req.method)

    def reply(self, reply: Any = None, failure: Any = None) -> None:
        if not self._req.is_call:
            return
        exc = (failure[1] if isinstance(failure, tuple) else failure) if failure is not None else None
        for r in self._agent.finish(self._req):
            self._agent.reply(r, result=reply, error=exc)

    def heartbeat(self) -> None:
        """The host's proxy heartbeats to the caller while a call is here."""


class TetherListener(base.PollStyleListener):
    def __init__(self, driver: "TetherDriver", topic: str):
        super().__init__()
        self.topic = topic
        self._driver = driver
        self._queue: "queue.Queue[p.Request]" = queue.Queue(MAX_LISTENER_QUEUE)
        self._stopped = threading.Event()

    def put(self, req: p.Request) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(req, timeout=1.0)
                return
            except queue.Full:
                continue

    @base.batch_poll_helper
    def poll(self, timeout: Optional[float] = None) -> Optional[TetherIncomingMessage]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.25 if deadline is None else min(max(deadline - time.monotonic(), 0), 0.25)
            try:
                req = self._queue.get(timeout=wait)
                return TetherIncomingMessage(self._driver._agent(), req)
            except queue.Empty:
                pass
            if self._stopped.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return None

    def stop(self) -> None:
        self._stopped.set()

    def cleanup(self) -> None:
        self._driver._unlisten(self)


class _Agent(SubAgent):
    """The driver's connection: requests go to the listener of their topic."""

    def __init__(self, driver: "TetherDriver", path: Optional[str]):
        super().__init__(p.default_name(), (), None, socket_path=path, ack=True)
        self._driver = driver

    def start(self, req: p.Request) -> None:
        listener = self._driver._listener_for(req.target.topic)
        if listener is None:
            # Registered a moment ago and no longer: not confirmed, so the
            # agent gives it to the next server of its topic.
            LOG.warning("tether: %s for topic %s with no listener", req.method, req.target.topic)
            with self._work:
                self._handled.forget(req)
            return
        listener.put(req)


class TetherDriver(base.BaseDriver):
    """oslo.messaging driver over tether-agent's sub-agent socket."""

    prefetch_size = 0

    def __init__(self, conf, url, default_exchange=None, allowed_remote_exmods=None):
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        vhost = url.virtual_host if url is not None else None
        self._path = "/" + vhost.lstrip("/") if vhost else None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._conn: Optional[_Agent] = None
        self._listeners: Dict[str, TetherListener] = {}

    # -- connection --------------------------------------------------------

    def _agent(self) -> _Agent:
        # Under the lock: a second thread gets the connection only once it
        # is registered (a server's listen and a client's send may race).
        with self._connect_lock:
            if self._conn is None:
                conn = _Agent(self, self._path)
                try:
                    conn.connect(CONNECT_TIMEOUT)
                except Exception as e:
                    conn.close()
                    raise base.TransportDriverError(
                        f"tether: cannot register with the agent at {conn.path}: {e}") from None
                with self._lock:
                    self._conn = conn
            return self._conn

    def _listener_for(self, topic: str) -> Optional[TetherListener]:
        with self._lock:
            return self._listeners.get(topic)

    def _unlisten(self, listener: TetherListener) -> None:
        with self._lock:
            if self._listeners.get(listener.topic) is listener:
                del self._listeners[listener.topic]
            topics = sorted(self._listeners)
            conn = self._conn
        if conn is not None:
            conn.set_topics(topics)

    # -- BaseDriver --------------------------------------------------------

    def require_features(self, requeue: bool = False) -> None:
        if requeue:
            raise NotImplementedError("the tether driver does not requeue")

    def send(self, target, ctxt, message, wait_for_reply=None, timeout=None,
             call_monitor_timeout=None, retry=None, transport_options=None):
        if target.fanout:
            raise NotImplementedError("tether: fanout from inside a guest is not carried")
        t = p.Target(target.topic, target.server, target.namespace or message.get("namespace"),
                     target.version or message.get("version"), target.exchange)
        args = message.get("args") or {}
        conn = self._agent()
        if not wait_for_reply:
            conn.cast(t, message["method"], args, _context(ctxt), timeout=CONNECT_TIMEOUT)
            return None
        t_out = float(timeout) if timeout is not None else p.DEFAULT_CALL_TIMEOUT
        try:
            return conn.call(t, message["method"], args, _context(ctxt), timeout=t_out)
        except p.CallTimeout as e:
            raise oslo_messaging.MessagingTimeout(f"No reply on topic {target.topic}: {e.message}") from None
        except p.AgentGone as e:
            raise oslo_messaging.MessageDeliveryFailure(f"tether: {e}") from None
        except p.RemoteError as e:
            if e.exc_module == "tether" and e.exc_class == "NoRoute":
                # Nothing consumes the topic: over RabbitMQ the caller waits
                # for its timeout; here the host says so at once.
                raise oslo_messaging.MessagingTimeout(f"No reply on topic {target.topic}: {e.message}") from None
            failure = json.dumps({"class": e.exc_class, "module": e.exc_module, "message": e.message,
                                  "tb": [], "args": [e.message], "kwargs": {}})
            raise common.deserialize_remote_exception(failure, self._allowed_remote_exmods) from None

    def send_notification(self, target, ctxt, message, version, retry=None):
        # oslo's Notifier hands over the topic <topic>.<priority> and its
        # message (message_id, publisher_id, event_type, priority, payload,
        # timestamp); it goes as it is, and the host checks it.
        conn = self._agent()
        msg = {
            "op": "notify",
            "target": p.Target(target.topic, exchange=target.exchange).to_json(),
            "message": dict(message),
            "ctx": _context(ctxt),
        }
        try:
            conn._send(msg, conn._wait_connected(CONNECT_TIMEOUT))
        except p.AgentGone as e:
            raise oslo_messaging.MessageDeliveryFailure(f"tether: {e}") from None

    def listen(self, target, batch_size, batch_timeout):
        topic = target.topic
        listener = TetherListener(self, topic)
        with self._lock:
            if topic in self._listeners:
                raise oslo_messaging.MessagingException(f"tether: topic {topic} is already served by this transport")
            self._listeners[topic] = listener
            topics = sorted(self._listeners)
        conn = self._agent()
        try:
            conn.set_topics(topics, timeout=CONNECT_TIMEOUT)
        except Exception:
            with self._lock:
                self._listeners.pop(topic, None)
            raise
        return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

    def listen_for_notifications(self, targets_and_priorities, pool, batch_size, batch_timeout):
        raise NotImplementedError("tether: notifications go from the guest to the control plane; "
                                  "listening for them inside a guest is not carried")

    def cleanup(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._listeners.clear()
        if conn is not None:
            conn.close()


__all__: List[str] = ["TetherDriver"]
