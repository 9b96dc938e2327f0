"""Test helpers: a real meshdns server on loopback, port 0, in a background thread.

Tests stay synchronous (dig, kdig and dnspython are blocking clients); the
server runs its own event loop in a thread and is always stopped on exit.
Every config built here points ``dns.resolv_conf`` at a file the test wrote,
so no test ever reads or queries the machine's own resolver.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query
import dns.rdatatype

from meshdns.config import Config, parse_config
from meshdns.server import MeshServer

T = TypeVar("T")

DEMO_SERVICES: list[dict[str, Any]] = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8"},
    {"name": "redis", "namespace": "cache", "port": 6379},
]


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """SIGTERM ``proc`` if it still runs, and SIGKILL it if it outlives ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


class PortTaken(Exception):
    """A server that was handed a port could not bind it: another process took it
    between the pick and the bind."""


def free_port() -> int:
    """A 127.0.0.1 port free for both UDP and TCP right now. Only where a port must be
    known before it is bound (unbound, which cannot bind port 0; etcd members, which must
    know each other's; a config forwarding to its own listener), and only through
    :func:`on_free_ports`, which picks again when another process took the port first
    (and ``ServerProcess.reserve``, for a leader whose URL a follower started first must
    know). Every other server binds port 0 and reports the port it got."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise OSError("no loopback port free for both UDP and TCP")


def on_free_ports(count: int, start: Callable[[list[int]], T], attempts: int = 5,
                  first: list[int] | None = None) -> T:
    """``start(ports)`` with ``count`` loopback ports free right now (or ``first``, picked
    earlier by the caller); when it raises :class:`PortTaken` (the pick raced another
    process), again with new ports."""
    for attempt in range(attempts):
        ports: list[int] = list(first or []) if attempt == 0 else []
        while len(ports) < count:
            port = free_port()
            if port not in ports:
                ports.append(port)
        try:
            return start(ports)
        except PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def address_in_use(text: str) -> bool:
    """A server's log saying it could not bind: the one sign of a :class:`PortTaken`."""
    return "address already in use" in text.lower()


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback TCP port that refuses connections (RST) for as long as the block runs:
    bound by us without listening, so no other process can start listening there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def udp_query(msg: dns.message.Message, host: str, port: int, timeout: float = 3.0,
              **kw: Any) -> dns.message.Message:
    """dnspython's UDP query, ignoring datagrams from any other address (other processes
    on the host can send to our ephemeral port on loopback)."""
    return dns.query.udp(msg, host, port=port, timeout=timeout, ignore_unexpected=True, **kw)


def connected_udp(host: str, port: int) -> socket.socket:
    """A UDP socket connected to ``host:port``: the kernel then drops datagrams from any
    other sender, so raw reads (``recv``) see the server's replies only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a stream socket (ConnectionError if it closes first)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Via:
    """One way to reach a server: a transport and an address family."""

    transport: str  # "udp" | "tcp"
    family: int  # 4 | 6

    @property
    def tcp(self) -> bool:
        return self.transport == "tcp"

    def __str__(self) -> str:
        return f"{self.transport}-v{self.family}"


VIAS = [Via("udp", 4), Via("tcp", 4), Via("udp", 6), Via("tcp", 6)]


def require_family(family: int) -> None:
    if family == 6 and not have_ipv6_loopback():
        import pytest

        pytest.skip("IPv6 loopback ::1 is not available on this host: the ::1 cases cannot run")


@contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the calling thread on ``cpu`` only, then restore its affinity. On loopback a
    datagram is received on the CPU that sent it, which is what dns.workers steer by."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_config(tmp: Path, extra: Mapping[str, Any] | None = None,
                services: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Raw config: loopback port 0 everywhere, no upstreams, an empty resolv.conf.

    ``services`` (default: DEMO_SERVICES) is written as the seed file.
    """
    resolv = tmp / "resolv.conf"
    if not resolv.exists():
        resolv.write_text("# written by the test: no nameservers\n")
    listen = ["127.0.0.1:0"] + (["[::1]:0"] if have_ipv6_loopback() else [])
    raw: dict[str, Any] = {
        "dns": {"listen": listen, "resolv_conf": str(resolv), "upstreams": []},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"level": "warning"},
    }
    if services is None:
        services = DEMO_SERVICES
    if services:
        seed = tmp / "seed.yaml"
        import yaml

        seed.write_text(yaml.safe_dump({"services": services}))
        raw["registry"] = {"seed_file": str(seed)}
    return merge(raw, extra or {})


class ServerThread:
    """A MeshServer on its own event loop in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: MeshServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = MeshServer(self.config)
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._ready.set()

        try:
            self.loop.run_until_complete(main())
            self.loop.run_forever()
        except BaseException:
            pass
        finally:
            self._ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop (a coroutine function or a plain one)."""
        async def wrapper() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            self.call(self.server.stop)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    # ------------------------------------------------------------ conveniences

    @property
    def mesh(self) -> MeshServer:
        assert self.server is not None
        return self.server

    def dns_addr(self, family: int = 4) -> tuple[str, int]:
        for hp in self.mesh.dns_addresses:
            if (":" in hp.host) == (family == 6):
                return hp.host, hp.port
        raise LookupError(f"no IPv{family} DNS listener")

    @property
    def api_url(self) -> str:
        hp = self.mesh.api_address
        assert hp is not None
        return f"http://{hp.host}:{hp.port}"


@contextmanager
def running_server(raw: Mapping[str, Any], env: Mapping[str, str] | None = None
                   ) -> Iterator[ServerThread]:
    thread = ServerThread(parse_config(dict(raw), env or {})).start()
    try:
        yield thread
    finally:
        thread.stop()


@contextmanager
def running_on_free_ports(count: int, configs: Callable[[list[int]], list[Mapping[str, Any]]]
                          ) -> Iterator[list[ServerThread]]:
    """Servers whose configs must name a port before it is bound (a forwarding loop to
    their own listener, two servers forwarding to each other): ``configs(ports)`` with
    ``count`` free ports, started in order; all again on new ports if one was taken."""
    def start(ports: list[int]) -> list[ServerThread]:
        started: list[ServerThread] = []
        try:
            for raw in configs(ports):
                started.append(ServerThread(parse_config(dict(raw), {})).start())
        except BaseException as exc:
            for server in started:
                server.stop()
            if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                raise PortTaken(str(exc)) from exc
            raise
        return started

    servers = on_free_ports(count, start)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def query(server: ServerThread, name: str, rdtype: str = "A", *, tcp: bool = False,
          family: int = 4, edns: int | bool = 0, payload: int = 1232,
          timeout: float = 3.0) -> dns.message.Message:
    """One dnspython query to the server (EDNS on by default, like dig)."""
    host, port = server.dns_addr(family)
    use_edns: int | bool = edns if edns is not False else -1
    msg = dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload)
    if tcp:
        return dns.query.tcp(msg, host, port=port, timeout=timeout)
    return udp_query(msg, host, port, timeout, ignore_trailing=False)


def run_tool(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False)


def tool(name: str) -> str | None:
    return shutil.which(name)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="meshdns-test-"))


def env_without_tokens() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
