"""tether: Python sub-agents for tether-agent, and an oslo.messaging driver.

- :class:`SubAgent` — the blocking client (threads);
- :class:`tether.aio.AsyncSubAgent` — the asyncio client;
- ``tether.oslo_driver`` — the ``tether://`` transport for oslo.messaging
  (registered as the ``tether`` driver: ``transport_url =
  tether:///run/tether/agent.sock``).

The protocol underneath is in the repository's docs/subagent.md.
"""

from ._protocol import (
    DEFAULT_SOCKET,
    AgentGone,
    CallTimeout,
    CastRefused,
    ProtocolError,
    RemoteError,
    Request,
    Target,
    TetherError,
)
from .client import SubAgent

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "AgentGone",
    "CallTimeout",
    "CastRefused",
    "ProtocolError",
    "RemoteError",
    "Request",
    "SubAgent",
    "Target",
    "TetherError",
]
