"""A real etcd cluster on loopback for tests and benches: N members, free ports, data
dirs under a given directory; members can be killed and restarted one by one."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .support import PortTaken, address_in_use, free_port, on_free_ports

# A 1000-service PUT is one transaction of a few thousand operations and about 1 MB:
# etcd's defaults (128 operations, 1.5 MiB) would refuse it. Deployments set the same.
MAX_TXN_OPS = 50000
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
    return path


@dataclass(frozen=True)
class Tls:
    """Client TLS for the members: a CA, the server's pair, a client's pair (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> Tls:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate. The
    server one is a client certificate too: etcd's JSON gateway dials its own gRPC port
    with it."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                       timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=meshdns-test-ca")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN=meshdns-test-{name}")
        (directory / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                f"{name}.ext")
    return Tls(directory / "ca.crt", directory / "server.crt", directory / "server.key",
               directory / "client.crt", directory / "client.key")


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    root: Path
    size: int = 3
    tls: Tls | None = None  # clients must use TLS and present a certificate of its CA
    max_txn_ops: int = MAX_TXN_OPS
    members: list[Member] = field(default_factory=list)
    # etcd's own defaults for --max-txn-ops (128) and --max-request-bytes (1.5 MiB), as
    # an operator's stock etcd has them; and further flags (e.g. --quota-backend-bytes).
    stock: bool = False
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            name = f"m{i}"
            self.members.append(Member(name, free_port(), free_port(), self.root / name,
                                       self.root / f"{name}.log",
                                       scheme="https" if self.tls else "http"))
        self._ssl: ssl.SSLContext | None = None
        if self.tls is not None:
            self._ssl = ssl.create_default_context(cafile=str(self.tls.ca))
            self._ssl.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def _initial(self) -> str:
        return ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    def start_member(self, m: Member) -> None:
        args = [etcd_binary(), "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", self._initial(), "--initial-cluster-state", "new",
                "--initial-cluster-token", f"meshdns-test-{self.members[0].peer_port}",
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--snapshot-count", "100000", "--logger", "zap", "--log-level", "warn"]
        if not self.stock:
            args += ["--max-txn-ops", str(self.max_txn_ops),
                     "--max-request-bytes", str(MAX_REQUEST_BYTES)]
        args += self.extra_args
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.server_cert),
                     "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member and wait for a leader. etcd members must know each other's
        ports up front (no port 0): if another process took one first, the cluster starts
        again on new ports (``endpoints`` read before ``start`` are then stale). On any
        other failure every member is stopped before the error goes on."""
        picked = [p for m in self.members for p in (m.client_port, m.peer_port)]
        return on_free_ports(len(picked), lambda ports: self._start_on(ports, timeout),
                             first=picked)

    def _start_on(self, ports: list[int], timeout: float) -> EtcdCluster:
        for m, client, peer in zip(self.members, ports[::2], ports[1::2], strict=True):
            m.client_port, m.peer_port = client, peer
            shutil.rmtree(m.data_dir, ignore_errors=True)  # joined a cluster on other ports
        try:
            for m in self.members:
                self.start_member(m)
            self.wait_healthy(timeout)
            if dead := [m.name for m in self.members if not m.alive]:
                raise AssertionError(f"etcd members {dead} exited: see {self.root}")
        except BaseException:
            self.stop()
            if any(not m.alive and m.log_path.exists()
                   and address_in_use(m.log_path.read_text(errors="replace"))
                   for m in self.members):
                raise PortTaken(f"an etcd port of {ports} was taken") from None
            raise
        return self

    def restart(self, timeout: float = 30.0) -> None:
        for m in self.members:
            if not m.alive:
                self.start_member(m)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until a member answers a linearizable read (the cluster has a leader)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if all(not m.alive for m in self.members):
                break
            for m in self.members:
                if not m.alive:
                    continue
                try:
                    self.request(m, "/v3/kv/range", {"key": base64.b64encode(b"x").decode()})
                    return
                except (OSError, ValueError) as exc:
                    last = exc
            time.sleep(0.1)
        raise AssertionError(f"etcd cluster not healthy after {timeout} s: {last!r}\n"
                             + "\n".join(m.log_path.read_text(errors="replace")[-2000:]
                                         for m in self.members if m.log_path.exists()))

    def request(self, m: Member, path: str, body: dict[str, Any],
                timeout: float = 5.0) -> dict[str, Any]:
        req = urllib.request.Request(m.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        # Direct, never through an HTTP_PROXY of the environment: etcd is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self._ssl))
        with opener.open(req, timeout=timeout) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc

    def any_request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for m in self.members:
            if m.alive:
                try:
                    return self.request(m, path, body)
                except (OSError, ValueError) as exc:
                    last = exc
        raise AssertionError(f"no etcd member answered {path}: {last!r}")

    def leader(self) -> Member:
        for m in self.members:
            if not m.alive:
                continue
            with_status = self.request(m, "/v3/maintenance/status", {})
            leader_id = with_status.get("leader")
            for other in self.members:
                if other.alive and self.request(other, "/v3/maintenance/status", {}).get(
                        "header", {}).get("member_id") == leader_id:
                    return other
        raise AssertionError("no etcd leader")

    def kill(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def stop(self) -> None:
        for m in self.members:
            self.kill(m)

    def revision(self) -> int:
        doc = self.any_request("/v3/kv/range", {"key": base64.b64encode(b"x").decode()})
        return int(doc["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.any_request("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def defragment(self) -> None:
        """Defragment every running member (each one frees its own file)."""
        for m in self.members:
            if m.alive:
                self.request(m, "/v3/maintenance/defragment", {}, timeout=60)

    def alarms(self) -> list[dict[str, Any]]:
        doc = self.any_request("/v3/maintenance/alarm", {"action": "GET"})
        return list(doc.get("alarms", []))

    def disarm(self) -> None:
        """Clear every alarm (NOSPACE), member by member, as etcdctl alarm disarm does."""
        for alarm in self.alarms():
            self.any_request("/v3/maintenance/alarm", {"action": "DEACTIVATE",
                                                        "memberID": alarm.get("memberID"),
                                                        "alarm": alarm.get("alarm")})

    def leases(self) -> dict[int, tuple[int, int]]:
        """Every lease etcd holds: its ID -> (TTL left, TTL granted), in seconds. A lease
        that ran out is listed (TTL -1) until the leader revokes it, which deletes its
        keys in the same step: a lease not listed has no key left."""
        out: dict[int, tuple[int, int]] = {}
        for lease in self.any_request("/v3/lease/leases", {}).get("leases", []):
            try:
                doc = self.any_request("/v3/lease/timetolive", {"ID": lease["ID"]})
            except AssertionError:  # revoked since the list
                continue
            out[int(lease["ID"])] = (int(doc.get("TTL", -1)), int(doc.get("grantedTTL", 0)))
        return out

    def count(self, prefix: str) -> int:
        """How many keys start with ``prefix`` (a count-only read)."""
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        doc = self.any_request("/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                "range_end": base64.b64encode(end).decode(),
                                                "count_only": True})
        return int(doc.get("count", 0))

    def keys(self, prefix: str) -> dict[str, bytes]:
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        doc = self.any_request("/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                "range_end": base64.b64encode(end).decode()})
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                for kv in doc.get("kvs", [])}


class CuttableProxy:
    """A TCP forwarder to one etcd member that the test can cut and restore: a watch
    through it breaks and cannot reconnect until restored."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.listener.settimeout(0.2)
        self.open = True
        self.running = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.conns = []

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.running = False
        self.cut()
        self.listener.close()
