"""HTTP helpers for the API tests: a tiny blocking client, bounded polling, and
meshdns server subprocesses (for kill -9 and two-process follower tests)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dns.exception
import dns.message
import dns.query
import yaml

from .support import PortTaken, address_in_use, free_port, stop_process, udp_query

T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")


def call(base: str, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         content_type: str | None = None, headers: dict[str, str] | None = None,
         token: str | None = None, timeout: float = 30.0) -> Reply:
    """One request on a fresh connection. ``body`` is sent as JSON unless ``raw`` is given."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    hdrs = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    finally:
        conn.close()


def as_yaml(doc: Any) -> bytes:
    return yaml.safe_dump(doc).encode()


def wait_for(check: Callable[[], T | None], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, AssertionError, dns.exception.DNSException) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def dns_query(addr: tuple[str, int], name: str, rdtype: str = "A",
              timeout: float = 2.0) -> dns.message.Message:
    msg = dns.message.make_query(name, rdtype, use_edns=0)
    return udp_query(msg, addr[0], addr[1], timeout)


def a_records(addr: tuple[str, int], name: str) -> list[str]:
    reply = dns_query(addr, name)
    return [rr.address for rrset in reply.answer for rr in rrset if rrset.rdtype == 1]


@dataclass
class ServerProcess:
    """``python -m meshdns serve --config FILE`` as a child process.

    Its listeners bind port 0 and ``serve --ports-file`` says which ports they got, so no
    other process can take a port between a pick and the bind. A restart (``start``
    after ``kill``/``stop``) binds the same ports again: followers keep the leader's URL.
    ``start`` stops the process again on any failure (readiness timeout, early exit)."""

    workdir: Path
    config: dict[str, Any]
    name: str = "meshdns"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    dns_port: int = field(init=False, default=0)  # known once started
    api_port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.ports_path = self.workdir / f"{self.name}.ports.json"
        self.config_path = self.workdir / f"{self.name}.yaml"
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("# no nameservers\n")
        self._write_config(0, 0)

    def _write_config(self, dns_port: int, api_port: int) -> None:
        base = {
            # The SIGTERM drain has its own tests (test_lameduck.py); the processes of the
            # other tests stop at once.
            "dns": {"listen": [f"127.0.0.1:{dns_port}"],
                    "resolv_conf": str(self.workdir / "resolv.conf"), "upstreams": [],
                    "lameduck": 0},
            "api": {"listen": f"127.0.0.1:{api_port}"},
            "log": {"level": "info"},
        }
        for section, values in self.config.items():
            base.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(base))

    @property
    def url(self) -> str:
        if not self.api_port:
            self.reserve()
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dns_addr(self) -> tuple[str, int]:
        if not self.dns_port:
            self.reserve()
        return ("127.0.0.1", self.dns_port)

    def reserve(self) -> None:
        """Its address asked before it started (a follower started before its leader):
        pick the ports now, and bind those. The one case left where another process can
        take a port first; ``start`` then fails, saying so."""
        self.dns_port = free_port()
        self.api_port = free_port()
        while self.api_port == self.dns_port:
            self.api_port = free_port()
        self._write_config(self.dns_port, self.api_port)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "meshdns", "serve", "--config", str(self.config_path),
                "--ports-file", str(self.ports_path)]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process (on the ports of its last run, if it ran before)."""
        self.ports_path.unlink(missing_ok=True)
        if self.api_port:  # ports known (a restart, or reserved): bind those
            self._write_config(self.dns_port, self.api_port)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.environment(), cwd=self.workdir)
        return self.proc

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}

    def start(self, ready: bool = True, timeout: float = 30.0) -> ServerProcess:
        """Spawn and wait until the API answers (/readyz 200 when ``ready``)."""
        proc = self.spawn()
        try:
            self._wait_serving(proc, ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_serving(self, proc: subprocess.Popen[bytes], ready: bool, timeout: float) -> None:
        def up() -> bool:
            if proc.poll() is not None:
                text = self.log()
                if address_in_use(text):
                    raise PortTaken(f"{self.name}: a port was taken before it bound it:\n{text}")
                raise RuntimeError(f"{self.name} exited with {proc.returncode}:\n{text}")
            if not self.ports_path.exists():
                return False
            self.dns_port, self.api_port = read_ports(self.ports_path)
            try:
                reply = call(self.url, "GET", "/readyz", timeout=2)
            except OSError:
                return False
            return reply.status == 200 or not ready

        wait_for(up, timeout, f"{self.name} to serve")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash or the OOM killer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def read_ports(path: Path) -> tuple[int, int]:
    """(DNS port, API port) from a ``serve --ports-file`` file (its first DNS listener)."""
    doc = json.loads(path.read_text())
    return (urllib.parse.urlsplit("//" + doc["dns"][0]).port or 0,
            urllib.parse.urlsplit("//" + doc["api"]).port or 0)
