"""Real daemons for the package's tests: tether-proxy with its control socket
and a tether-agent on an emulated port (a UNIX socket in the proxy's channels
directory), as the Rust integration tests run them. Each process is killed
by PID when its test ends, also when it fails; every wait is bounded.

The binaries come from ``$TETHER_BIN_DIR`` (default: the repository's
``target/debug``, built by ``cargo build`` or ``cargo test``). They are
required: a missing binary fails the test, it is never skipped.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
# The tests exercise this tree's code; the installed copy of the package
# (pip install ./python) is what registers the oslo driver's entry point.
sys.path.insert(0, str(REPO / "python" / "src"))
BIN_DIR = Path(os.environ.get("TETHER_BIN_DIR") or REPO / "target" / "debug")

#: Bound for anything that should take well under a second (a loaded CI
#: machine is slow; this is a hang detector, not a latency check).
BOUND = 30.0

#: The proxy's policy for tests that are not about policy (its default
#: refuses everything): every topic, and casts/calls/notifications upstream.
LAB_POLICY = """
[policy.profiles.default]
mode = "call"
topics = ["*"]
context_keys = ["request_id"]
notifications = ["*"]
[[policy.profiles.default.targets]]
topics = ["*"]
servers = ["*"]
methods = ["*"]
"""


def binary(name: str) -> str:
    p = BIN_DIR / name
    if not p.exists():
        pytest.fail(f"{p} is missing: build it first (cargo build), or set TETHER_BIN_DIR")
    return str(p)


def wait_until(cond, what: str, bound: float = BOUND, every: float = 0.02):
    """Poll ``cond`` until it returns something truthy (returned), at most ``bound`` s."""
    end = time.monotonic() + bound
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {bound} s waiting for {what}")
        time.sleep(every)


def random_uuid() -> str:
    r = random.SystemRandom()
    return "%08x-%04x-4%03x-8%03x-%012x" % (
        r.getrandbits(32), r.getrandbits(16), r.getrandbits(12), r.getrandbits(12), r.getrandbits(48))


class Proc:
    """A child process killed (SIGKILL) and reaped when its test ends."""

    def __init__(self, name: str, argv: List[str], cwd: Path, env: Optional[Dict[str, str]] = None):
        self.name = name
        self.log = cwd / f"{name}.log"
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, **(env or {})), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def kill9(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(BOUND)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Ctl:
    """A control-socket client (JSON lines)."""

    def __init__(self, path: Path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(BOUND * 2)
        self.s.connect(str(path))
        self.buf = b""

    def req(self, **msg: Any) -> Dict[str, Any]:
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        return self.line()

    def line(self) -> Dict[str, Any]:
        """The next line from the proxy (a response, or a `watch` event)."""
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise AssertionError("the proxy closed the control connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def link(self, uuid: str) -> Optional[Dict[str, Any]]:
        for link in self.req(op="links")["result"]:
            if link["instance"] == uuid:
                return link
        return None

    def close(self) -> None:
        self.s.close()


class World:
    """A temp dir with a proxy, its channels directory and control socket,
    and agents by instance uuid."""

    def __init__(self, root: Path):
        self.root = root
        self.channels = root / "channels"
        self.channels.mkdir()
        self.ctl_sock = root / "ctl.sock"
        self.procs: List[Proc] = []
        self.proxy_proc: Optional[Proc] = None

    def path(self, name: str) -> Path:
        return self.root / name

    def spawn(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> Proc:
        p = Proc(name, argv, self.root, env)
        self.procs.append(p)
        return p

    def proxy(self, extra: str = "") -> Proc:
        cfg = self.path("proxy.toml")
        policy = "" if "[policy" in extra else LAB_POLICY
        cfg.write_text(f'channels_dir = "{self.channels}"\ncontrol_socket = "{self.ctl_sock}"\n{extra}\n{policy}')
        self.proxy_proc = self.spawn("proxy", [binary("tether-proxy"), "-c", str(cfg)])
        wait_until(self.ctl_sock.exists, "the proxy's control socket")
        return self.proxy_proc

    def agent_socket(self, uuid: str) -> Path:
        return self.path(f"agent-{uuid}.sock")

    def agent(self, uuid: str, extra: str = "") -> Proc:
        """An agent for ``uuid`` with no sub-agents of its own; its sub-agent
        socket is :meth:`agent_socket`. Restarting it (kill, then agent()
        again) keeps its state directory, as a real agent's /run/tether."""
        cfg = self.path(f"agent-{uuid}.toml")
        grace = "" if "unserved_grace_ms" in extra else "unserved_grace_ms = 30000\n"
        cfg.write_text(
            f'port = "unix-listen:{self.channels / (uuid + ".sock")}"\n'
            f'subagent_socket = "{self.agent_socket(uuid)}"\n'
            f'state_dir = "{self.path("state-" + uuid)}"\n{grace}{extra}\n')
        sock = self.agent_socket(uuid)
        if sock.exists():
            sock.unlink()
        p = self.spawn(f"agent-{uuid}", [binary("tether-agent"), "-c", str(cfg)])
        wait_until(sock.exists, "the agent's sub-agent socket")
        return p

    def ctl(self) -> Ctl:
        return Ctl(self.ctl_sock)

    def wait_linked(self, uuid: str, topic: str, bound: float = BOUND) -> None:
        ctl = self.ctl()
        try:
            def linked():
                link = ctl.link(uuid)
                return link and link["established"] and topic in (link.get("topics") or [])
            wait_until(linked, f"instance {uuid} linked with topic {topic}", bound, every=0.05)
        finally:
            ctl.close()

    def close(self, failed: bool) -> None:
        for p in reversed(self.procs):
            try:
                p.kill9()
            except Exception:
                pass
        if failed:
            sys.stderr.write(f"test failed: its files and daemon logs are kept in {self.root}\n")
            for p in self.procs:
                sys.stderr.write(f"--- {p.name} log (tail) ---\n{p.log_text()[-4000:]}\n")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.tether_failed = rep.failed


@pytest.fixture
def world(request, tmp_path_factory):
    # Short paths: a UNIX socket path is at most 107 bytes.
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tether-py-"))
    w = World(root)
    yield w
    failed = getattr(request.node, "tether_failed", True)
    w.close(failed)
    if not failed:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
