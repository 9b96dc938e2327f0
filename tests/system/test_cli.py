"""The command line: ``meshdns --version | version | check-config FILE | serve [--config
FILE]`` (the API client commands are in tests/system/test_cli_client.py).

Every process is a real subprocess on loopback, with bounded waits, and is
always killed on the way out.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

import meshdns

from ..apiclient import read_ports
from ..support import udp_query

REPO = Path(meshdns.__file__).resolve().parent.parent
SEED = {"services": [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "hostnames": ["frontend.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080},
]}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def meshdns_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshdns", *args]


def run(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshdns_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=clean_env(), check=False)


def write_config(tmp: Path, extra: dict[str, Any] | None = None,
                 seed: Any = SEED) -> tuple[Path, Path]:
    """The config file, and the ``serve --ports-file`` that :func:`serving` passes."""
    resolv = tmp / "resolv.conf"
    resolv.write_text("# written by the test: no nameservers, no search list\n")
    raw: dict[str, Any] = {  # port 0: serve --ports-file says which ports it got
        "dns": {"listen": ["127.0.0.1:0"], "resolv_conf": str(resolv)},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"level": "info"},
    }
    if seed is not None:
        seed_path = tmp / "seed.yaml"
        seed_path.write_text(seed if isinstance(seed, str) else yaml.safe_dump(seed))
        raw["registry"] = {"seed_file": str(seed_path)}
    for section, values in (extra or {}).items():
        raw.setdefault(section, {}).update(values)
    path = tmp / "meshdns.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp / "ports.json"


@contextmanager
def serving(config: Path, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    ports = config.with_name("ports.json")
    proc = subprocess.Popen(meshdns_cmd("serve", "--config", str(config),
                                        "--ports-file", str(ports)), cwd=cwd,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False,
        timeout: float = 2.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=timeout)
    return udp_query(q, "127.0.0.1", port, timeout)


def wait_until_answering(proc: subprocess.Popen[str], ports: Path, deadline: float = 30.0
                         ) -> tuple[int, dns.message.Message | None]:
    """The DNS port (from the ports file) and the first reply from the server there;
    None if it exited or the deadline passed."""
    end = time.monotonic() + deadline
    port = 0
    while time.monotonic() < end:
        if proc.poll() is not None:
            return port, None
        try:
            if not port:
                port = read_ports(ports)[0]
            return port, ask(port, "frontend.kong.svc.80.mesh", timeout=0.3)
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    return port, None


# ---------------------------------------------------------------- --version, check-config


def test_version(tmp_path: Path) -> None:
    proc = run("--version", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"meshdns {meshdns.__version__}"


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "meshdns"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path, env=clean_env(), check=False)
    assert proc.returncode == 0
    assert meshdns.__version__ in proc.stdout


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    proc = run(cwd=tmp_path)
    assert proc.returncode != 0
    assert "usage" in proc.stderr.lower()


def test_check_config_good(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_check_config_accepts_an_empty_file(tmp_path: Path) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("")
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ('dns:\n  ttl: "x"\n', 'dns.ttl: must be an integer 0..86400, got "x"'),
    ("dns:\n  bogus: 1\n", "dns.bogus: unknown key"),
    ("log:\n  level: loud\n", "log.level: must be one of"),
    ("registry:\n  vip_hold_seconds: 5\n", "registry.vip_hold_seconds: must exceed dns.ttl"),
    ("dns: [ttl: 30\n", "YAML"),
])
def test_check_config_bad(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    proc = run("check-config", str(missing), cwd=tmp_path)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- serve


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_and_exits_zero_on_signal(tmp_path: Path, sig: int) -> None:
    config, ports = write_config(tmp_path)
    with serving(config, tmp_path) as proc:
        port, first = wait_until_answering(proc, ports)
        if first is None and proc.poll() is not None:
            pytest.fail(f"meshdns serve exited {proc.returncode}: {proc.communicate(timeout=10)[1]}")
        assert first is not None, "meshdns serve did not answer within 30 s"
        assert first.rcode() == dns.rcode.NOERROR
        assert [r.address for r in first.answer[0]] == ["240.0.0.7"]
        over_tcp = ask(port, "frontend.mesh", tcp=True)
        assert [r.address for r in over_tcp.answer[0]] == ["240.0.0.7"]
        allocated = ask(port, "backend.kong.svc.8080.mesh")
        assert allocated.rcode() == dns.rcode.NOERROR
        assert ipaddress.ip_address(allocated.answer[0][0].address) in \
            ipaddress.ip_network("240.0.0.0/4")
        assert ask(port, "nope.mesh").rcode() == dns.rcode.NXDOMAIN
        assert ask(port, "example.com").rcode() == dns.rcode.REFUSED  # no upstream
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("meshdns serve did not exit within 15 s of the signal")
        assert code == 0, proc.communicate(timeout=5)[1]


def test_serve_with_a_bad_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, extra={"dns": {"ttl": "x"}})
    proc = run("serve", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0
    assert 'dns.ttl: must be an integer 0..86400, got "x"' in proc.stderr
    config.write_text("dns:\n  listen: [\"127.0.0.1:1\"]\n  nope: 1\n")
    proc = run("serve", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0
    assert "dns.nope" in proc.stderr


def test_serve_with_a_missing_config_file_exits_non_zero(tmp_path: Path) -> None:
    proc = run("serve", "--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "missing.yaml" in proc.stderr


@pytest.mark.parametrize(("seed", "expected"), [
    ("services: [ {name: a\n  - : :\n", "seed file"),  # not YAML at all
    (b"\xff\xfe\x00garbage".decode("latin-1"), "seed file"),  # not UTF-8 once written
    ("services: 42\n", "services"),
    ("services:\n  - {name: a, namespace: b, port: 0}\n", "services[0].port"),
    ("services:\n  - {name: a, namespace: b, port: 1, vip: 10.0.0.1}\n"
     "  - {name: c, namespace: b, port: 1, vip: 10.0.0.1}\n", "services[1].vip"),
], ids=["not-yaml", "not-utf8", "services-not-a-list", "bad-port", "duplicate-vip"])
def test_serve_with_a_corrupt_seed_file_exits_non_zero_with_a_clear_error(
        tmp_path: Path, seed: str, expected: str) -> None:
    config, _ = write_config(tmp_path, seed="")
    seed_path = tmp_path / "seed.yaml"
    if seed.startswith("\xff"):
        seed_path.write_bytes(seed.encode("latin-1"))
    else:
        seed_path.write_text(seed)
    proc = run("serve", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert str(seed_path) in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- --help, version


def test_help_is_clean(tmp_path: Path) -> None:
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "SUPPRESS" not in out and "``" not in out, out
    assert "worker" not in out  # internal: started by `serve` with dns.workers > 1
    for command in ("serve", "check-config", "version", "apply", "get", "resolve"):
        assert f"    {command}" in out, (command, out)
        sub = run(command, "--help", cwd=tmp_path)
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: meshdns {command}"), \
            sub.stdout + sub.stderr
        assert "SUPPRESS" not in sub.stdout


def test_version_command(tmp_path: Path) -> None:
    proc = run("version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"meshdns {meshdns.__version__}\n"


def test_worker_is_still_reachable_but_refuses_without_its_parent(tmp_path: Path) -> None:
    proc = run("worker", "1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "started by `meshdns serve`" in proc.stderr


# ---------------------------------------------------------------- check-config: all errors


def test_check_config_reports_every_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text('dns:\n  ttl: "x"\n  listen: ["nowhere"]\n  bogus: 1\n'
                      "log:\n  level: loud\nextra: {}\n")
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    for expected in ('dns.ttl: must be an integer 0..86400, got "x"', "dns.listen[0]:",
                     "dns.bogus: unknown key", "log.level: must be one of",
                     "extra: unknown key"):
        assert sum(expected in line for line in lines) == 1, (expected, proc.stderr)
    assert len(lines) == 5, proc.stderr
    assert all(line.startswith("meshdns: config error: ") for line in lines)


def test_serve_also_reports_every_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text('dns:\n  ttl: "x"\napi:\n  listen: 7\n')
    proc = run("serve", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "dns.ttl:" in proc.stderr and "api.listen:" in proc.stderr


def test_check_config_checks_the_files_it_names(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, extra={"registry": {
        "seed_file": str(tmp_path / "missing-seed.yaml"),
        "state_file": str(tmp_path / "no-such-dir" / "state.json")}}, seed=None)
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert f"registry.seed_file: {tmp_path / 'missing-seed.yaml'}: does not exist" \
        in proc.stderr
    assert (f"registry.state_file: {tmp_path / 'no-such-dir' / 'state.json'}: directory "
            f"{tmp_path / 'no-such-dir'} does not exist") in proc.stderr
    assert "ok" not in proc.stdout
    proc = run("check-config", "--skip-files", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # keys and values alone are fine

    # A seed file that is there; a state file not written yet, in a directory that is.
    (tmp_path / "no-such-dir").mkdir()
    (tmp_path / "missing-seed.yaml").write_text(yaml.safe_dump(SEED))
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{config}: ok"


def test_check_config_checks_what_the_seed_file_holds(tmp_path: Path) -> None:
    twice = {"services": [{"name": "a", "namespace": "b", "port": 80, "vip": "240.0.0.1"},
                          {"name": "c", "namespace": "b", "port": 80, "vip": "240.0.0.1"}]}
    config, _ = write_config(tmp_path, seed=twice)
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "registry.seed_file:" in proc.stderr and "services[1].vip" in proc.stderr
    # Valid services, but more than the configured VIP range holds.
    many = {"services": [{"name": f"s{i}", "namespace": "b", "port": 80} for i in range(8)]}
    config, _ = write_config(tmp_path, extra={"registry": {"cidr": "240.0.0.0/30",
                                                           "cidr6": None}}, seed=many)
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "registry.seed_file:" in proc.stderr and "exhausted" in proc.stderr, proc.stderr
    (tmp_path / "seed.yaml").write_text("services: [ {name: a\n")
    proc = run("check-config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "registry.seed_file: seed file" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- bind errors


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_a_taken_dns_port_is_named_in_the_error(tmp_path: Path, proto: str) -> None:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if proto == "tcp":
            taken.listen(1)
        port = taken.getsockname()[1]
        config, _ = write_config(tmp_path, extra={"dns": {"listen": [f"127.0.0.1:{port}"]}})
        proc = run("serve", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 1
    assert (f"cannot listen on 127.0.0.1:{port}/{proto}: [Errno 98] Address already in use"
            in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
