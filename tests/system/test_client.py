"""meshdns/client.py, the CLI's API client: a token never goes to an HTTP proxy
(loopback, NO_PROXY hosts and a token over plain http are reached directly), and
``--server HOST:PORT`` means http. Real CLI subprocesses, a real server, and a
listening socket as the proxy."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshdns.client import proxies_for

from ..support import make_config, running_server
from .test_cli import clean_env, meshdns_cmd

TOKEN = "s3cret"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class FakeProxy:
    """A listening socket on loopback standing for an HTTP proxy: it records whatever
    any client sends it, then closes the connection (no reply)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    p = FakeProxy()
    try:
        yield p
    finally:
        p.close()


def proxied_env(proxy: FakeProxy, **extra: str) -> dict[str, str]:
    """The environment of a corporate shell: every proxy variable at the fake proxy."""
    env = {k: v for k, v in clean_env().items() if k.lower() not in PROXY_VARIABLES}
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = proxy.url
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshdns_cmd(*args, "--timeout", "10"), capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env, check=False)


def test_the_token_is_never_sent_to_the_proxy_for_a_loopback_server(
        tmp_path: Path, proxy: FakeProxy) -> None:
    with running_server(make_config(tmp_path, {"api": {"token": TOKEN}})) as server:
        env = proxied_env(proxy, MESHDNS_API_TOKEN=TOKEN)
        for host in ("127.0.0.1", "localhost"):
            url = server.api_url.replace("127.0.0.1", host)
            proc = cli("get", "services", "--server", url, env=env, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
            assert "frontend" in proc.stdout.split()  # the request reached the server
    assert proxy.received == []


def test_server_without_a_scheme_is_http(tmp_path: Path, proxy: FakeProxy) -> None:
    with running_server(make_config(tmp_path, {"api": {"token": TOKEN}})) as server:
        host_port = server.api_url.removeprefix("http://")
        proc = cli("get", "services", "-o", "json", "--server", host_port, "--token", TOKEN,
                   env=proxied_env(proxy), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert '"frontend"' in proc.stdout
        proc = cli("resolve", "frontend.mesh", "--server", host_port + "/", "--token",
                   TOKEN, env=proxied_env(proxy), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert proxy.received == []


@pytest.mark.parametrize("bad, message", [
    ("ftp://127.0.0.1:1", "--server must be HOST:PORT or http(s)://HOST:PORT, got "
                          "'ftp://127.0.0.1:1'"),
    ("127.0.0.1:port", "--server '127.0.0.1:port': Port could not be cast to integer"),
    ("http://", "--server must be HOST:PORT or http(s)://HOST:PORT, got 'http://'"),
])
def test_a_bad_server_is_a_clear_error(tmp_path: Path, bad: str, message: str) -> None:
    proc = cli("get", "services", "--server", bad, env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"meshdns get: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_proxy_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which requests may use the environment's proxy: never one that carries a token
    in clear text, never a loopback or NO_PROXY host."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    proxy = "http://proxy.example:3128"
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("https_proxy", proxy)
    monkeypatch.setenv("no_proxy", ".internal.example,10.9.9.9")
    both = {"http": proxy, "https": proxy}
    assert proxies_for("http://meshdns.example:15080", token=False) == both
    assert proxies_for("http://meshdns.example:15080", token=True) == {}  # in clear: direct
    assert proxies_for("https://meshdns.example:15080", token=True) == both  # TLS tunnel
    for direct in ("http://127.0.0.1:15080", "http://127.9.0.1:1", "http://[::1]:15080",
                   "http://localhost:15080", "https://leader.internal.example",
                   "http://10.9.9.9:15080"):
        assert proxies_for(direct, token=False) == {}, direct
