"""The API client commands: ``meshdns apply -f FILE [--prune]``, ``meshdns get services
[-o table|json|yaml]`` and ``meshdns resolve NAME [TYPE]``, each a real subprocess
against a real meshdns server subprocess on loopback.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..apiclient import ServerProcess, a_records, call
from .test_cli import clean_env, meshdns_cmd

TOKEN = "cli-test-token"
SERVICES = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "hostnames": ["frontend.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080},
]


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A meshdns with a token and no registry yet (not ready until the first apply)."""
    server = ServerProcess(tmp_path / "server", {"api": {"token": TOKEN}})
    server.start(ready=False)
    try:
        yield server
    finally:
        server.stop()


def client(server: ServerProcess | str, *args: str, token: str | None = TOKEN,
           stdin: str | None = None, env: dict[str, str] | None = None,
           cwd: Path) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    flags = ["--server", url] + (["--token", token] if token else [])
    return subprocess.run(meshdns_cmd(*args, *flags), capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**clean_env(), **(env or {})},
                          input=stdin, check=False)


def registry(server: ServerProcess) -> dict[str, Any]:
    reply = call(server.url, "GET", "/v1/services", token=TOKEN)
    assert reply.status == 200, reply.body
    doc: dict[str, Any] = reply.json()
    return doc


def test_apply_upserts_from_yaml_and_json_and_prune_replaces(
        api_server: ServerProcess, tmp_path: Path) -> None:
    listed = tmp_path / "services.yaml"
    listed.write_text(yaml.safe_dump(SERVICES))  # a bare list
    proc = client(api_server, "apply", "-f", str(listed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "applied 2 services: revision 1, 2 in the registry\n"
    assert a_records(api_server.dns_addr, "frontend.mesh") == ["240.0.0.7"]

    wrapped = tmp_path / "more.json"  # {services: [...]} as JSON: upserted, others kept
    wrapped.write_text(json.dumps({"services": [
        {"name": "redis", "namespace": "cache", "port": 6379, "vip": "240.0.0.9"}]}))
    proc = client(api_server, "apply", "-f", str(wrapped), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "applied 1 service: revision 2, 3 in the registry\n"
    assert {s["name"] for s in registry(api_server)["services"]} == \
        {"frontend", "backend", "redis"}

    proc = client(api_server, "apply", "--prune", "-f", str(wrapped), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "replaced the registry with 1 service: revision 3, 1 in the registry\n"
    assert [s["name"] for s in registry(api_server)["services"]] == ["redis"]
    assert a_records(api_server.dns_addr, "frontend.mesh") == []

    proc = client(api_server, "apply", "-f", "-", stdin=yaml.safe_dump(SERVICES[:1]),
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "applied 1 service: revision 4, 2 in the registry\n"


def test_apply_errors_name_the_field_and_change_nothing(
        api_server: ServerProcess, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(SERVICES))
    assert client(api_server, "apply", "-f", str(good), cwd=tmp_path).returncode == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([SERVICES[0], {**SERVICES[1], "port": 0}]))
    proc = client(api_server, "apply", "-f", str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("meshdns apply: HTTP 400: upsert[1].port: "), proc.stderr
    assert "got 0" in proc.stderr and proc.stdout == ""
    proc = client(api_server, "apply", "--prune", "-f", str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("meshdns apply: HTTP 400: services[1].port: "), proc.stderr
    assert registry(api_server)["revision"] == 1

    proc = client(api_server, "apply", "-f", str(good), token="wrong", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("meshdns apply: HTTP 401: missing or wrong bearer token")

    not_a_list = tmp_path / "scalar.yaml"
    not_a_list.write_text("services: 42\n")
    proc = client(api_server, "apply", "-f", str(not_a_list), cwd=tmp_path)
    assert proc.returncode == 1
    assert "must be a list of services or {services: [...]}" in proc.stderr
    proc = client(api_server, "apply", "-f", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert proc.returncode == 1 and "missing.yaml: cannot be read" in proc.stderr
    assert registry(api_server)["revision"] == 1
    assert "Traceback" not in proc.stderr


def test_client_commands_say_when_the_server_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        for args in (("get", "services"), ("resolve", "a.mesh")):
            proc = client(url, *args, cwd=tmp_path)
            assert proc.returncode == 1
            assert proc.stderr.startswith(f"meshdns {args[0]}: cannot reach {url}: "), \
                proc.stderr
            assert "Connection refused" in proc.stderr


def test_get_services_in_each_output_format(api_server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "services.yaml"
    source.write_text(yaml.safe_dump(SERVICES))
    assert client(api_server, "apply", "-f", str(source), cwd=tmp_path).returncode == 0
    served = registry(api_server)

    proc = client(api_server, "get", "services", "-o", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == served

    proc = client(api_server, "get", "services", "-o", "yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == served

    proc = client(api_server, "get", "services", cwd=tmp_path)  # table, sorted
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    backend = next(s for s in served["services"] if s["name"] == "backend")
    assert rows == [["NAMESPACE", "NAME", "PORT", "VIP", "VIP6", "HOSTNAMES"],
                    ["kong", "backend", "8080", backend["vip"], backend["vip6"], "-"],
                    ["kong", "frontend", "80", "240.0.0.7",
                     next(s["vip6"] for s in served["services"] if s["name"] == "frontend"),
                     "frontend.mesh"]]

    # `get -o yaml` is what `apply --prune -f` takes back: the registry is unchanged.
    exported = tmp_path / "exported.yaml"
    exported.write_text(client(api_server, "get", "services", "-o", "yaml",
                               cwd=tmp_path).stdout)
    proc = client(api_server, "apply", "--prune", "-f", str(exported), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert registry(api_server)["services"] == served["services"]


def test_server_and_token_come_from_the_environment(api_server: ServerProcess,
                                                    tmp_path: Path) -> None:
    source = tmp_path / "services.yaml"
    source.write_text(yaml.safe_dump(SERVICES))
    env = {"MESHDNS_SERVER": api_server.url, "MESHDNS_API_TOKEN": TOKEN}
    proc = subprocess.run(meshdns_cmd("apply", "-f", str(source)), capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env={**clean_env(), **env},
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "revision 1" in proc.stdout


def test_resolve_explains_names(api_server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "services.yaml"
    source.write_text(yaml.safe_dump(SERVICES))
    assert client(api_server, "apply", "-f", str(source), cwd=tmp_path).returncode == 0

    proc = client(api_server, "resolve", "frontend.mesh", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (";; frontend.mesh A: NOERROR, authoritative (rule hostname, zone mesh,"
                        " revision 1)")
    assert lines[1] == ";; service kong/frontend port 80"
    assert lines[2].split() == ["frontend.mesh.", "30", "A", "240.0.0.7"]

    proc = client(api_server, "resolve", "frontend.kong.svc.80.mesh", "srv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SRV\t0 100 80 frontend.kong.svc.80.mesh." in proc.stdout

    proc = client(api_server, "resolve", "nope.kong.svc.80.mesh", "-o", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    explained = json.loads(proc.stdout)
    direct = call(api_server.url, "GET", "/v1/resolve?name=nope.kong.svc.80.mesh",
                  token=TOKEN).json()
    assert explained == direct and explained["rcode"] == "NXDOMAIN"

    proc = client(api_server, "resolve", "frontend.mesh", "BOGUS", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("meshdns resolve: HTTP 400: type: "), proc.stderr
