"""Start and stop the benchmarked DNS servers, query them, and drive dnsperf.

Every server runs on 127.0.0.1 on a free high port, with its own config files
in a temp dir, in its own process group (``start_new_session``), and is killed
(SIGTERM, then SIGKILL of the whole group) when its ``with`` block ends, on
Ctrl-C, and at interpreter exit. None of them ever forwards anywhere: meshdns
gets ``dns.upstreams: []`` and an empty ``dns.resolv_conf``; unbound serves a
static local zone; knot is authoritative only; dnsmasq has ``no-resolv``. The
forwarding sidecars of bench/pod_traffic.py (``upstreams=`` / ``start_*_forwarding``,
:func:`start_kumadp`) forward only to the cluster DNS that bench starts on loopback
(:func:`start_unbound_zones`).

``python bench/peers.py dnslib --port P --table FILE`` is the dnslib baseline
server (dnslib's threaded ``DNSServer`` answering from a dict).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import (
    Svc,
    dnsmasq_lines,
    knot_zone,
    python_table,
    unbound_local_data,
    write_lines,
    write_meshdns_seed,
)

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def project_python() -> str:
    """The interpreter that has meshdns and dnslib: $MESHDNS_PYTHON, the venv, or ours."""
    env = os.environ.get("MESHDNS_PYTHON")
    if env:
        return env
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    """A port free for both UDP and TCP on loopback (bounded retries), for the peers
    that cannot bind port 0 and say which port they got (unbound, knot, dnsmasq);
    meshdns binds port 0 and reports its ports (:func:`wait_bound`)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOOPBACK, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((LOOPBACK, port))
                except OSError:
                    continue
                return int(port)
    raise OSError("no free UDP+TCP port on loopback")


# ---------------------------------------------------------------- processes

_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    with _LIVE_LOCK:
        tracked = proc.pid in _LIVE
    if not tracked:
        return  # stopped before: its group id may already belong to someone else
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Whatever is left in the group (a worker, a straggler): SIGKILL it too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


def stop_all() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        _kill_group(proc, grace=2.0)


def _on_signal(signum: int, frame: Any) -> None:
    stop_all()
    raise SystemExit(128 + signum)


atexit.register(stop_all)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    with contextlib.suppress(ValueError):  # not the main thread: the caller handles it
        signal.signal(_sig, _on_signal)


def spawn(cmd: Sequence[str], log: Path, cwd: Path | None = None,
          stdout: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new process group, stderr (and stdout) to ``log``."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else fh, stderr=fh,
                                start_new_session=True)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    return proc


def group_pids(pgid: int) -> list[int]:
    """Live processes in a process group (the server and any workers it forked)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def proc_status_kb(pid: int, key: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` size field in KiB (VmRSS, VmHWM), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far."""
    return sum(cpu_times(pid))


# ---------------------------------------------------------------- DNS probe


def dns_query(port: int, name: str, qtype: str = "A", timeout: float = 1.0,
              host: str = LOOPBACK) -> tuple[str, list[str]] | None:
    """(rcode name, answer rdata strings), or None on timeout. One UDP query."""
    from dnslib import QTYPE, RCODE, DNSRecord

    q = DNSRecord.question(name, qtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.pack(), (host, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                return None
            reply = DNSRecord.parse(data)
            if reply.header.id != q.header.id:
                continue
            answers = [str(rr.rdata) for rr in reply.rr if rr.rtype == getattr(QTYPE, qtype)]
            return RCODE[reply.header.rcode], answers
    return None


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    """A running DNS server: its name, port, process group and log."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    api_port: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return group_pids(self.proc.pid)

    def rss_kb(self) -> int:
        """Resident memory of the whole group (server plus any workers)."""
        return sum(proc_status_kb(p) for p in self.pids())

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the whole group."""
        times = [cpu_times(p) for p in self.pids()]
        return sum(u for u, _ in times), sum(s for _, s in times)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _kill_group(self.proc)


class ServerFailed(RuntimeError):
    pass


def wait_ready(server: Server, probe: Callable[[], bool], timeout: float) -> None:
    """Poll ``probe`` until true; raise with the log tail if the server died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerFailed(f"{server.name} exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise ServerFailed(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


def answers_probe(port: int, svc: Svc) -> Callable[[], bool]:
    def probe() -> bool:
        got = dns_query(port, svc.fqdn, "A", timeout=0.5)
        return got is not None and got[0] == "NOERROR" and svc.vip in got[1]
    return probe


def soa_probe(port: int, apex: str = "mesh") -> Callable[[], bool]:
    def probe() -> bool:
        got = dns_query(port, apex, "SOA", timeout=0.5)
        # A meshdns with no registry yet (started empty, before its first PUT) answers
        # SERVFAIL, not an authoritative answer: it is up, it only has nothing to serve.
        return got is not None and got[0] in ("NOERROR", "SERVFAIL")
    return probe


def meshdns_config(workdir: Path, port: int, api_port: int, seed: Path | None,
                   workers: int = 1, max_body: int = 1 << 31,
                   answer_cache: int | None = None, steering: str | None = None,
                   name: str | None = None, upstreams: Sequence[str] = (),
                   search: Sequence[str] = (), dns_extra: dict[str, Any] | None = None
                   ) -> Path:
    """``upstreams``: loopback servers the bench started (default none: never forwards);
    ``search``: the pod's search list, as a sidecar reads it from resolv.conf;
    ``dns_extra``: more dns keys (bench_policy)."""
    resolv = workdir / "resolv.conf"
    resolv.write_text("# empty: meshdns must never forward during a benchmark\n")
    cfg: dict[str, Any] = {
        "dns": {"listen": [f"{LOOPBACK}:{port}"], "upstreams": list(upstreams),
                "search": list(search),
                "resolv_conf": str(resolv), "workers": workers},
        "api": {"listen": f"{LOOPBACK}:{api_port}", "max_body_bytes": max_body},
        "registry": {"seed_file": str(seed) if seed else None},
        "log": {"level": "warning"},
    }
    if answer_cache is not None:
        cfg["dns"]["answer_cache_size"] = answer_cache
    if steering is not None:
        cfg["dns"]["worker_steering"] = steering
    cfg["dns"].update(dns_extra or {})
    path = workdir / f"{name or f'meshdns-{port}'}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML
    return path


def wait_bound(proc: subprocess.Popen[bytes], ports_file: Path, log: Path,
               timeout: float = 120.0) -> tuple[int, int]:
    """(DNS port, API port) of a ``meshdns serve --ports-file`` once every listener is
    bound (its first DNS listener); ServerFailed with the log if it exits first."""
    deadline = time.monotonic() + timeout
    while not ports_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise ServerFailed(f"meshdns did not report its ports: {tail}")
        time.sleep(0.02)
    doc = json.loads(ports_file.read_text())
    return int(doc["dns"][0].rsplit(":", 1)[1]), int(doc["api"].rsplit(":", 1)[1])


_MESHDNS_SEQ = itertools.count(1)


def start_meshdns(workdir: Path, services: Sequence[Svc] | None, *, workers: int = 1,
                  answer_cache: int | None = None, steering: str | None = None,
                  ready_timeout: float = 300.0,
                  program: Sequence[str] = ("-m", "meshdns"),
                  upstreams: Sequence[str] = (), search: Sequence[str] = (),
                  dns_extra: dict[str, Any] | None = None) -> Server:
    """meshdns serving ``services`` from a seed file, or an empty registry (None);
    ``program``: what the project's Python runs (bench/uncounted.py for bench_metrics);
    ``upstreams``/``search``: see :func:`meshdns_config` (default: never forwards)."""
    tag = next(_MESHDNS_SEQ)  # port 0: the kernel picks, --ports-file says which
    seed = None
    if services is not None:
        seed = write_meshdns_seed(workdir / f"seed-{tag}.json", services)
    conf = meshdns_config(workdir, 0, 0, seed, workers, answer_cache=answer_cache,
                          steering=steering, name=f"meshdns-{tag}", upstreams=upstreams,
                          search=search, dns_extra=dns_extra)
    log = workdir / f"meshdns-{tag}.log"
    ports = workdir / f"meshdns-{tag}.ports.json"
    proc = spawn([project_python(), *program, "serve", "--config", str(conf),
                  "--ports-file", str(ports)], log, cwd=REPO)
    try:
        port, api_port = wait_bound(proc, ports, log, ready_timeout)
    except BaseException:
        _kill_group(proc)
        raise
    srv = Server(f"meshdns{'' if workers == 1 else f'-{workers}w'}", port, proc, log, workdir,
                 api_port=api_port)
    dns_probe = answers_probe(port, services[0]) if services else soa_probe(port)
    # DNS listens before the HTTP API does: ready means both answer.
    wait_ready(srv, lambda: dns_probe() and http_ok(f"http://{LOOPBACK}:{api_port}/healthz"),
               ready_timeout)
    return srv


def unbound_server_lines(port: int, d: Path, services: Sequence[Svc],
                         threads: int = 1) -> list[str]:
    """unbound's ``server:`` clause for the benches: loopback, foreground, the services
    as static local data (the caller adds its ``remote-control:`` clause)."""
    lines = [
        "server:",
        f"  interface: {LOOPBACK}@{port}",
        f"  port: {port}",
        f"  num-threads: {threads}",
        f"  so-reuseport: {'yes' if threads > 1 else 'no'}",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{d}"',
        '  pidfile: ""',
        "  use-syslog: no",
        "  verbosity: 0",
        "  do-ip6: no",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "iterator"',
        "  outgoing-range: 64",
    ]
    return lines + [f"  {line}" for line in unbound_local_data(services)]


def start_unbound(workdir: Path, services: Sequence[Svc], *, threads: int = 1,
                  ready_timeout: float = 120.0) -> Server:
    port = free_port()
    d = workdir / f"unbound-{port}"
    d.mkdir()
    lines = unbound_server_lines(port, d, services, threads)
    lines += ["remote-control:", "  control-enable: no"]
    conf = write_lines(d / "unbound.conf", lines)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                           timeout=120)
    if check.returncode != 0:
        raise ServerFailed(f"unbound-checkconf: {check.stdout}{check.stderr}")
    log = d / "unbound.log"
    proc = spawn(["unbound", "-d", "-c", str(conf)], log, cwd=d)
    srv = Server(f"unbound{'' if threads == 1 else f'-{threads}t'}", port, proc, log, d)
    wait_ready(srv, answers_probe(port, services[0]), ready_timeout)
    return srv


def start_knot(workdir: Path, services: Sequence[Svc], *, workers: int = 1,
               ready_timeout: float = 120.0) -> Server:
    port = free_port()
    d = workdir / f"knot-{port}"
    (d / "run").mkdir(parents=True)
    (d / "db").mkdir()
    (d / "mesh.zone").write_text(knot_zone(services), encoding="ascii")
    conf = d / "knot.conf"
    conf.write_text(f"""server:
    rundir: "{d / 'run'}"
    listen: {LOOPBACK}@{port}
    udp-workers: {workers}
    tcp-workers: 1
    background-workers: 1
database:
    storage: "{d / 'db'}"
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: "{d}"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: mesh.
    file: "{d / 'mesh.zone'}"
""")
    log = d / "knot.log"
    proc = spawn(["knotd", "-c", str(conf)], log, cwd=d)
    srv = Server("knot", port, proc, log, d)
    wait_ready(srv, answers_probe(port, services[0]), ready_timeout)
    return srv


def start_dnsmasq(workdir: Path, services: Sequence[Svc], *,
                  ready_timeout: float = 120.0) -> Server:
    port = free_port()
    d = workdir / f"dnsmasq-{port}"
    d.mkdir()
    lines = [
        f"port={port}",
        f"listen-address={LOOPBACK}",
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "no-negcache",
        "local-ttl=30",
        "user=root",
        "pid-file=",
        f"log-facility={d / 'dnsmasq.log'}",
        *dnsmasq_lines(services),
    ]
    conf = write_lines(d / "dnsmasq.conf", lines)
    log = d / "dnsmasq.out"
    proc = spawn(["dnsmasq", "-k", f"--conf-file={conf}"], log, cwd=d)
    srv = Server("dnsmasq", port, proc, log, d)
    wait_ready(srv, answers_probe(port, services[0]), ready_timeout)
    return srv


def start_dnslib(workdir: Path, services: Sequence[Svc], *,
                 ready_timeout: float = 120.0) -> Server:
    port = free_port()
    table = workdir / f"table-{port}.json"
    table.write_text(json.dumps(python_table(services)))
    log = workdir / f"dnslib-{port}.log"
    proc = spawn([project_python(), str(Path(__file__).resolve()), "dnslib", "--port", str(port),
                  "--table", str(table)], log, cwd=REPO)
    srv = Server("dnslib", port, proc, log, workdir)
    wait_ready(srv, answers_probe(port, services[0]), ready_timeout)
    return srv


# ---------------------------------------------------------------- forwarding sidecars
# (bench/pod_traffic.py): a cluster DNS on loopback, and sidecars that answer the mesh
# names themselves and forward everything else to it.


def _start_unbound_conf(name: str, d: Path, port: int, lines: list[str],
                        probe: Callable[[], bool], ready_timeout: float) -> Server:
    """unbound with ``lines`` (its whole config), checked, started, ready by ``probe``."""
    conf = write_lines(d / "unbound.conf", lines)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                           timeout=120)
    if check.returncode != 0:
        raise ServerFailed(f"unbound-checkconf: {check.stdout}{check.stderr}")
    log = d / "unbound.log"
    proc = spawn(["unbound", "-d", "-c", str(conf)], log, cwd=d)
    srv = Server(name, port, proc, log, d)
    wait_ready(srv, probe, ready_timeout)
    return srv


def start_unbound_zones(workdir: Path, zone_lines: Sequence[str], probe_name: str, *,
                        threads: int = 1, ready_timeout: float = 120.0) -> Server:
    """unbound answering only from ``zone_lines`` (``local-zone:``/``local-data:`` lines of
    its server clause): the cluster DNS of bench/pod_traffic.py. Ready once
    ``probe_name`` A answers NOERROR."""
    port = free_port()
    d = workdir / f"unbound-zones-{port}"
    d.mkdir()
    # unbound_server_lines brings an empty static "mesh." zone; nobody asks it for one.
    lines = unbound_server_lines(port, d, [], threads)
    lines += [f"  {line}" for line in zone_lines]
    lines += ["remote-control:", "  control-enable: no"]

    def probe() -> bool:
        got = dns_query(port, probe_name, "A", timeout=0.5)
        return got is not None and got[0] == "NOERROR" and bool(got[1])

    return _start_unbound_conf("cluster-dns", d, port, lines, probe, ready_timeout)


def start_unbound_forwarding(workdir: Path, services: Sequence[Svc], upstream: int, *,
                             ready_timeout: float = 120.0) -> Server:
    """unbound (1 thread) as a sidecar: the services as static local data, everything
    else to ``forward-zone: "."`` at 127.0.0.1@``upstream``; its own defaults otherwise
    (cache sizes, no prefetch), except ``outgoing-range`` back at unbound's default 4096
    (unbound_server_lines sets 64 for the never-forwarding benches)."""
    port = free_port()
    d = workdir / f"unbound-fwd-{port}"
    d.mkdir()
    lines = [line for line in unbound_server_lines(port, d, services)
             if not line.strip().startswith("outgoing-range:")]
    lines += ["  outgoing-range: 4096", "  do-not-query-localhost: no",
              "remote-control:", "  control-enable: no",
              "forward-zone:", '  name: "."', f"  forward-addr: {LOOPBACK}@{upstream}"]
    return _start_unbound_conf("unbound", d, port, lines, answers_probe(port, services[0]),
                               ready_timeout)


def start_dnsmasq_forwarding(workdir: Path, services: Sequence[Svc], upstream: int, *,
                             cache_size: int = 10_000, forward_max: int = 1000,
                             ready_timeout: float = 120.0) -> Server:
    """dnsmasq as a sidecar: ``host-record`` lines for the services, ``local=/mesh/``,
    every other name to 127.0.0.1#``upstream``, negative answers cached (its default);
    ``cache-size`` and ``dns-forward-max`` raised from dnsmasq's 150 to meshdns's
    defaults (``dns.cache_size``, ``dns.max_inflight``)."""
    port = free_port()
    d = workdir / f"dnsmasq-fwd-{port}"
    d.mkdir()
    lines = [
        f"port={port}",
        f"listen-address={LOOPBACK}",
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        "no-poll",
        f"server={LOOPBACK}#{upstream}",
        f"cache-size={cache_size}",
        f"dns-forward-max={forward_max}",
        "local-ttl=30",
        "user=root",
        "pid-file=",
        f"log-facility={d / 'dnsmasq.log'}",
        *dnsmasq_lines(services),
    ]
    conf = write_lines(d / "dnsmasq.conf", lines)
    log = d / "dnsmasq.out"
    proc = spawn(["dnsmasq", "-k", f"--conf-file={conf}"], log, cwd=d)
    srv = Server("dnsmasq", port, proc, log, d)
    wait_ready(srv, answers_probe(port, services[0]), ready_timeout)
    return srv


KUMADP_SOURCE = Path("/work/shared/peers/kumadp/main.go")
KUMADP_BINARY = Path("/tmp/kumadp")
GO = Path("/usr/lib/go-1.19/bin/go")
GO_PACKAGES = ("golang-1.19-go", "golang-github-miekg-dns-dev")


def build_kumadp(source: Path = KUMADP_SOURCE, binary: Path = KUMADP_BINARY,
                 log: Callable[[str], None] = print) -> tuple[Path | None, str]:
    """Kuma's DNS proxy stand-in (../shared/peers/README.md), built when missing or older
    than its source: (binary, note) or (None, why not). Installs Go and miekg/dns from
    Debian (``apt-get install -y``, as root) when ``go`` is missing and installable."""
    if not source.exists():
        return None, f"kumadp skipped: no source at {source}"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary, f"kumadp: {binary} (built from {source})"
    if not GO.exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return None, (f"kumadp skipped: {GO} missing and not installable here "
                          f"(root + apt-get: `apt-get install -y {' '.join(GO_PACKAGES)}`)")
        log(f"  installing {' '.join(GO_PACKAGES)} (apt-get) to build kumadp ...")
        out = subprocess.run(["apt-get", "install", "-y", "-qq", *GO_PACKAGES],
                             capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if out.returncode != 0 or not GO.exists():
            return None, ("kumadp skipped: apt-get install failed: "
                          + (out.stderr or out.stdout).strip()[-300:])
    log(f"  building {binary} from {source} ...")
    env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off",
               GOCACHE="/tmp/gocache", GOFLAGS="")
    out = subprocess.run([str(GO), "build", "-o", str(binary), str(source)],
                         capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        return None, f"kumadp skipped: go build failed: {(out.stderr or out.stdout)[-300:]}"
    return binary, f"kumadp: built {binary} from {source} with {GO}"


def start_kumadp(workdir: Path, services: Sequence[Svc], upstream: int, *,
                 binary: Path = KUMADP_BINARY, ttl: int = 30,
                 ready_timeout: float = 60.0) -> Server:
    """Kuma's DNS proxy stand-in: the services as its records document (A and AAAA,
    ``ttl``), every other name forwarded to 127.0.0.1:``upstream`` (no cache)."""
    port = free_port()
    d = workdir / f"kumadp-{port}"
    d.mkdir()
    records = d / "records.json"
    records.write_text(json.dumps({
        "records": [{"name": s.fqdn, "ips": [s.vip, s.vip6]} for s in services], "ttl": ttl}))
    log = d / "kumadp.log"
    proc = spawn([str(binary), "-listen", f"{LOOPBACK}:{port}", "-records", str(records),
                  "-upstream", f"{LOOPBACK}:{upstream}"], log, cwd=d)
    srv = Server("kumadp", port, proc, log, d)
    wait_ready(srv, answers_probe(port, services[0]), ready_timeout)
    return srv


STARTERS: dict[str, Callable[..., Server]] = {
    "meshdns": start_meshdns,
    "unbound": start_unbound,
    "knot": start_knot,
    "dnsmasq": start_dnsmasq,
    "dnslib": start_dnslib,
}
BINARIES = {"unbound": "unbound", "knot": "knotd", "dnsmasq": "dnsmasq"}


def available(name: str) -> bool:
    binary = BINARIES.get(name)
    return binary is None or shutil.which(binary) is not None


@contextlib.contextmanager
def running(name: str, workdir: Path, services: Sequence[Svc] | None,
            **opts: Any) -> Iterator[Server]:
    srv = STARTERS[name](workdir, services, **opts)
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------- dnsperf


@dataclass
class PerfResult:
    qps: float = 0.0
    sent: int = 0
    completed: int = 0
    lost: int = 0
    runtime: float = 0.0
    avg_ms: float = 0.0
    min_ms: float = 0.0
    max_ms: float = 0.0
    stddev_ms: float = 0.0
    rcodes: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def lost_pct(self) -> float:
        return 100.0 * self.lost / self.sent if self.sent else 0.0


_NUM = r"([0-9][0-9.]*)"


def parse_dnsperf(text: str) -> PerfResult:
    """The Statistics block of dnsperf 2.x; missing lines leave zeros, never raise."""
    r = PerfResult(raw=text)

    def grab(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, text, re.MULTILINE)

    if m := grab(rf"Queries sent:\s+{_NUM}"):
        r.sent = int(m.group(1))
    if m := grab(rf"Queries completed:\s+{_NUM}"):
        r.completed = int(m.group(1))
    if m := grab(rf"Queries lost:\s+{_NUM}"):
        r.lost = int(m.group(1))
    if m := grab(rf"Run time \(s\):\s+{_NUM}"):
        r.runtime = float(m.group(1))
    if m := grab(rf"Queries per second:\s+{_NUM}"):
        r.qps = float(m.group(1))
    if m := grab(rf"Average Latency \(s\):\s+{_NUM}\s+\(min\s+{_NUM},\s+max\s+{_NUM}\)"):
        r.avg_ms, r.min_ms, r.max_ms = (float(m.group(i)) * 1000 for i in (1, 2, 3))
    if m := grab(rf"Latency StdDev \(s\):\s+{_NUM}"):
        r.stddev_ms = float(m.group(1)) * 1000
    if m := grab(r"Response codes:\s+(.*)$"):
        for code, count in re.findall(r"([A-Z]+)\s+([0-9]+)\s+\(", m.group(1)):
            r.rcodes[code] = int(count)
    return r


def dnsperf_cmd(port: int, datafile: Path, seconds: float, *, outstanding: int = 200,
                clients: int = 1, threads: int = 1, rate: float | None = None,
                timeout: float = 2.0, extra: Sequence[str] = ()) -> list[str]:
    cmd = ["dnsperf", "-s", LOOPBACK, "-p", str(port), "-d", str(datafile),
           "-l", f"{seconds:g}", "-q", str(outstanding), "-c", str(clients),
           "-T", str(threads), "-t", f"{timeout:g}"]
    if rate is not None:
        cmd += ["-Q", str(max(1, int(rate)))]
    return cmd + list(extra)


def run_dnsperf(port: int, datafile: Path, seconds: float, **kw: Any) -> PerfResult:
    """One bounded dnsperf run (killed if it overstays its time limit)."""
    cmd = dnsperf_cmd(port, datafile, seconds, **kw)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                             start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"dnsperf overstayed: {' '.join(cmd)}") from exc
    r = parse_dnsperf(out.stdout)
    if out.returncode != 0 or r.sent == 0:
        raise RuntimeError(f"dnsperf failed ({out.returncode}): {' '.join(cmd)}\n"
                           f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return r


# ---------------------------------------------------------------- dnslib baseline


def serve_dnslib(port: int, table_path: Path) -> None:
    """dnslib's threaded UDP DNSServer with a resolver answering from a dict."""
    from dnslib import AAAA, QTYPE, RCODE, RR, A
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    table: dict[str, list[str]] = json.loads(table_path.read_text())

    class DictResolver(BaseResolver):  # type: ignore[misc]
        def resolve(self, request: Any, handler: Any) -> Any:
            reply = request.reply()
            q = request.q
            name = str(q.qname).rstrip(".").lower()
            rec = table.get(name)
            if rec is None:
                in_mesh = name == "mesh" or name.endswith(".mesh")
                reply.header.rcode = RCODE.NXDOMAIN if in_mesh else RCODE.REFUSED
            elif q.qtype == QTYPE.A:
                reply.add_answer(RR(q.qname, QTYPE.A, ttl=30, rdata=A(rec[0])))
            elif q.qtype == QTYPE.AAAA:
                reply.add_answer(RR(q.qname, QTYPE.AAAA, ttl=30, rdata=AAAA(rec[1])))
            return reply

    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    server = DNSServer(DictResolver(), address=LOOPBACK, port=port, logger=quiet)
    server.start()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="bench peer helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dnslib", help="serve the dnslib baseline")
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--table", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "dnslib":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        serve_dnslib(args.port, args.table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
