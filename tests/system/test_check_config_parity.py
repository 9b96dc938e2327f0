"""``meshdns check-config`` refuses what ``meshdns serve`` would start with and then
degrade (issue 22, item 4). Every check is a real ``python -m meshdns`` subprocess.

- A forwarding loop (``dns.upstreams`` reaching meshdns's own listener): serve logs an
  ERROR and answers REFUSED for every name it does not serve; check-config now says so,
  with the same line (the one rule, ``dns.forwardplan.effective_forward``).
- The placeholder token the deploy/ Secrets shipped with (and any REPLACE-WITH- value
  still under deploy/) is refused by both; a token shorter than 16 characters is a
  warning (check-config) and a logged warning (serve).
- ``--skip-files`` skips the etcd TLS files too, so the shipped etcd ConfigMap with TLS
  turned on (as deploy/README.md says) can be checked where those files are not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml

from ..apiclient import ServerProcess, dns_query
from ..support import on_free_ports
from .test_shipped_configs import SHIPPED, Shipped

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GOOD_TOKEN = "a-test-token-of-32-characters-ok"
# The contract, written out (meshdns.config has the same two constants).
PLACEHOLDER_TOKEN = "REPLACE-WITH-A-RANDOM-TOKEN"  # what the deploy/ Secrets shipped
MIN_TOKEN_CHARS = 16  # shorter: a warning
PORT = 15053  # in configs that check-config reads and nothing binds


def meshdns(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    return subprocess.run([sys.executable, "-m", "meshdns", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**base, **(env or {})},
                          check=False)


def write(tmp: Path, raw: dict[str, Any], resolv: str = "# no nameservers\n") -> Path:
    """``raw`` as a config file, with its own resolv.conf unless it names one."""
    (tmp / "resolv.conf").write_text(resolv)
    raw = json.loads(json.dumps(raw))
    raw.setdefault("dns", {}).setdefault("resolv_conf", str(tmp / "resolv.conf"))
    path = tmp / "meshdns.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def errors(proc: subprocess.CompletedProcess[str], kind: str = "error") -> list[str]:
    prefix = f"meshdns: config {kind}: "
    return [line[len(prefix):] for line in proc.stderr.splitlines() if line.startswith(prefix)]


def served_log(srv: ServerProcess, name: str) -> tuple[dns.rcode.Rcode, str]:
    """The rcode ``srv`` (started) answers ``name`` with, then its log once stopped."""
    try:
        rcode = dns_query(srv.dns_addr, name, timeout=3.0).rcode()
    finally:
        srv.stop()
    return rcode, srv.log()


# ---------------------------------------------------------------- forwarding loops


def test_a_loop_to_its_own_listener_fails_check_config_with_the_line_serve_logs(
        tmp_path: Path) -> None:
    def start(ports: list[int]) -> ServerProcess:  # the port must be known: it is the loop
        own = f"127.0.0.1:{ports[0]}"
        srv = ServerProcess(tmp_path / f"srv-{ports[0]}",
                            {"dns": {"listen": [own], "upstreams": [own]}})
        return srv.start(ready=False)

    srv = on_free_ports(1, start)
    port = srv.dns_port
    # What serve does: an ERROR line, and REFUSED for every name it does not serve.
    rcode, log = served_log(srv, "www.example.test")
    assert rcode == dns.rcode.REFUSED
    check = meshdns("check-config", str(srv.config_path), cwd=tmp_path)
    assert check.returncode == 2, check.stdout + check.stderr
    [line] = errors(check)
    assert line.startswith(f"upstream 127.0.0.1:{port} (dns.upstreams) is meshdns's own "
                           f"listen address 127.0.0.1:{port}"), line
    assert "loop" in line and check.stdout == ""
    assert any("ERROR" in row and line in row for row in log.splitlines()), log
    # The upstreams are values of the file: --skip-files still checks them.
    skip = meshdns("check-config", "--skip-files", str(srv.config_path), cwd=tmp_path)
    assert skip.returncode == 2 and errors(skip) == [line], skip.stderr


@pytest.mark.parametrize(("listen", "upstream"), [
    ("0.0.0.0:{p}", "127.0.0.1:{p}"),  # the wildcard listener receives loopback traffic
    ("127.0.0.1:{p}", "0.0.0.0:{p}"),  # 0.0.0.0 as a destination is this host
    ("[::]:{p}", "[::1]:{p}"),
])
def test_a_loop_through_a_wildcard_fails_check_config(tmp_path: Path, listen: str,
                                                      upstream: str) -> None:
    config = write(tmp_path, {"dns": {"listen": [listen.format(p=PORT)],
                                      "upstreams": [upstream.format(p=PORT), "192.0.2.53"]}})
    check = meshdns("check-config", str(config), cwd=tmp_path)
    assert check.returncode == 2, check.stdout + check.stderr
    [line] = errors(check)
    assert line.startswith(f"upstream {upstream.format(p=PORT)} (dns.upstreams) is "), line
    assert "would loop back to meshdns, refused" in line


def test_a_resolv_conf_pointing_at_meshdns_fails_check_config_unless_skipped(
        tmp_path: Path) -> None:
    """Empty dns.upstreams: the nameservers of dns.resolv_conf, a file of the machine the
    config runs on: checked with the files, not with --skip-files."""
    config = write(tmp_path, {"dns": {"listen": ["127.0.0.1:53"], "upstreams": []}},
                   resolv="nameserver 127.0.0.1\n")
    check = meshdns("check-config", str(config), cwd=tmp_path)
    assert check.returncode == 2, check.stdout + check.stderr
    [line] = errors(check)
    assert line.startswith(f"upstream 127.0.0.1:53 (nameserver in {tmp_path / 'resolv.conf'})")
    skip = meshdns("check-config", "--skip-files", str(config), cwd=tmp_path)
    assert skip.returncode == 0 and skip.stdout.strip().endswith(": ok"), skip.stderr


def test_upstreams_that_do_not_loop_pass(tmp_path: Path) -> None:
    config = write(tmp_path, {"dns": {"listen": [f"127.0.0.1:{PORT}"],
                                      "upstreams": [f"127.0.0.1:{PORT + 1}", f"[::1]:{PORT}",
                                                    "192.0.2.53"]}})
    check = meshdns("check-config", str(config), cwd=tmp_path)
    assert check.returncode == 0 and check.stderr == "", check.stderr


# ---------------------------------------------------------------- tokens


def deploy_placeholders() -> set[str]:
    """Every REPLACE-WITH-... value under deploy/ (Secrets, docs), and meshdns's own."""
    found = {PLACEHOLDER_TOKEN}
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".md"):
            found |= set(re.findall(r"REPLACE-WITH-[A-Z0-9-]*[A-Z0-9]", path.read_text()))
    return found


@pytest.mark.parametrize("placeholder", sorted(deploy_placeholders()))
@pytest.mark.parametrize("where", ["api.token", "MESHDNS_API_TOKEN", "MESHDNS_FOLLOW_TOKEN"])
def test_the_placeholder_token_is_refused(tmp_path: Path, placeholder: str, where: str) -> None:
    raw: dict[str, Any] = {"dns": {"listen": ["127.0.0.1:0"]}, "api": {"listen": "127.0.0.1:0"}}
    env: dict[str, str] = {}
    if where == "api.token":
        raw["api"]["token"] = placeholder
    else:
        env[where] = placeholder
    if where == "MESHDNS_FOLLOW_TOKEN":
        raw["registry"] = {"follow": "http://127.0.0.1:9"}
    key = "registry.follow_token" if "FOLLOW" in where else "api.token"
    config = write(tmp_path, raw)
    for argv in (("check-config", str(config)), ("check-config", "--skip-files", str(config)),
                 ("serve", "--config", str(config))):
        proc = meshdns(*argv, cwd=tmp_path, env=env)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        [line] = errors(proc)
        assert line.startswith(f"{key}: is the placeholder {PLACEHOLDER_TOKEN}"), line
        assert ("from env" if where.startswith("MESHDNS") else "in the config file") in line


@pytest.mark.parametrize("token", ["x", "fifteen-chars-x"])
def test_a_short_token_is_a_warning_in_check_config_and_serve(tmp_path: Path,
                                                              token: str) -> None:
    assert len(token) < MIN_TOKEN_CHARS
    srv = ServerProcess(tmp_path / "srv", {"api": {"token": token}})
    check = meshdns("check-config", str(srv.config_path), cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip().endswith(": ok"), check.stderr
    [warning] = errors(check, "warning")
    assert warning.startswith(f"api.token: is only {len(token)} character"), warning
    assert f"at least {MIN_TOKEN_CHARS}" in warning
    if len(token) > 3:
        assert token not in check.stderr  # the token itself is never shown
    rcode, log = served_log(srv.start(ready=False), "www.example.test")
    assert rcode == dns.rcode.REFUSED  # it serves (no upstream: REFUSED)
    assert any("WARNING" in row and warning in row for row in log.splitlines()), log


def test_a_long_token_gets_no_warning(tmp_path: Path) -> None:
    config = write(tmp_path, {"api": {"listen": "127.0.0.1:0"},
                              "registry": {"follow": "http://127.0.0.1:9"}})
    env = {"MESHDNS_API_TOKEN": GOOD_TOKEN, "MESHDNS_FOLLOW_TOKEN": "x" * MIN_TOKEN_CHARS}
    check = meshdns("check-config", str(config), cwd=tmp_path, env=env)
    assert check.returncode == 0 and check.stderr == "", check.stderr


# ---------------------------------------------------------------- --skip-files and etcd TLS

TLS_DIR = "/etc/meshdns/etcd-tls"  # a mounted Secret on the target machine, absent here


def etcd_configmaps() -> list[Shipped]:
    found = [s for s in SHIPPED if s.in_etcd and s.source.startswith("deploy/kubernetes/etcd/")]
    assert found, "no meshdns ConfigMap with registry.etcd under deploy/kubernetes/etcd/"
    return found


def with_tls(shipped: Shipped) -> str:
    """The ConfigMap's config with TLS on, as deploy/README.md says: https:// endpoints
    and ca_file, cert_file and key_file from a mounted Secret. A ConfigMap shipped with
    TLS already is kept as it is."""
    raw = shipped.raw
    etcd = raw["registry"]["etcd"]
    if etcd.get("ca_file"):
        return shipped.text
    etcd["endpoints"] = [e.replace("http://", "https://", 1) for e in etcd["endpoints"]]
    etcd.update({"ca_file": f"{TLS_DIR}/ca.crt", "cert_file": f"{TLS_DIR}/tls.crt",
                 "key_file": f"{TLS_DIR}/tls.key"})
    return yaml.safe_dump(raw)


@pytest.mark.parametrize("shipped", etcd_configmaps(), ids=lambda s: s.source)
def test_the_etcd_configmap_with_tls_passes_check_config_skip_files(
        tmp_path: Path, shipped: Shipped) -> None:
    text = with_tls(shipped)
    tls = yaml.safe_load(text)["registry"]["etcd"]
    assert all(e.startswith("https://") for e in tls["endpoints"]), tls
    assert not any(Path(tls[k]).exists() for k in ("ca_file", "cert_file", "key_file"))
    config = tmp_path / "config.yaml"
    config.write_text(text)
    skip = meshdns("check-config", "--skip-files", str(config), cwd=tmp_path, env=shipped.env)
    assert skip.returncode == 0, f"{shipped.source} with TLS: {skip.stderr}"
    assert skip.stdout.strip() == f"{config}: ok" and skip.stderr == "", skip.stderr
    # Where the config runs, the files must be there: without --skip-files, each is named.
    full = meshdns("check-config", str(config), cwd=tmp_path, env=shipped.env)
    assert full.returncode == 2
    named = {line.split(":")[0] for line in errors(full)}
    assert {"registry.etcd.ca_file", "registry.etcd.cert_file",
            "registry.etcd.key_file"} <= named, full.stderr


# ---------------------------------------------------------------- every error, at any depth


def test_check_config_names_every_bad_key_of_registry_etcd_and_of_a_forward_entry(
        tmp_path: Path) -> None:
    """One parser for every section and depth (issue 24, step 5): check-config prints
    one line per bad key, registry.etcd's and a dns.forward entry's included."""
    config = write(tmp_path, {
        "dns": {"listen": [f"127.0.0.1:{PORT}"], "upstreams": ["192.0.2.53"],
                "forward": [{"zone": "cluster.local", "upstreams": ["192.0.2.10"],
                             "protocol": "quic", "tls": True}]},
        "registry": {"etcd": {"endpoints": ["127.0.0.1:2379"], "prefix": "meshdns",
                              "dial_timeout": 0}}})
    for argv in (("check-config", str(config)), ("serve", "--config", str(config))):
        proc = meshdns(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert errors(proc) == [
            'dns.forward[0].protocol: must be one of udp, tcp, got "quic"',
            "dns.forward[0].tls: unknown key (known: zone, upstreams, protocol)",
            "registry.etcd.dial_timeout: must be a number 0.05..600, got 0",  # sorted keys
            "registry.etcd.endpoints[0]: must be an http:// or https:// URL of an etcd "
            'member, got "127.0.0.1:2379"',
            'registry.etcd.prefix: must be a key prefix starting and ending with "/", like '
            '"/meshdns/", got "meshdns"',
        ], proc.stderr
