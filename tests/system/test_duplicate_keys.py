"""A key named twice in one mapping is refused, with its path (issue 22, item 3).

YAML and JSON parsers keep the last value without a word: ``dns: {ttl: 30, ttl: 40}``
meant 40, a second ``registry:`` block dropped the first one's ``state_file``, and
``{"name": "a", "name": "zz"}`` became service ``zz``. One rule (meshdns.yamlload)
refuses them wherever a document comes in:

- config files: ``meshdns check-config`` and ``meshdns serve`` (subprocesses) stop
  with ``dns.ttl: duplicate key (lines 3 and 4)``;
- seed files (YAML and JSON): serve does not start, check-config names the key;
- API bodies (JSON and YAML), on a running server: 400 with ``field`` the key path,
  and the registry is untouched (same revision, same answers over DNS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from meshdns.api.body import decode
from meshdns.api.state import ApiError
from meshdns.configfile import parse_document
from meshdns.yamlload import load_yaml

from ..apiclient import call
from ..support import ServerThread, make_config, query, running_server

SERVICE = {"name": "a", "namespace": "b", "port": 80, "vip": "240.0.0.9"}


def meshdns(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    return subprocess.run([sys.executable, "-m", "meshdns", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env, check=False)


def config_file(tmp: Path, text: str) -> Path:
    """``text`` after a loopback DNS listener and an empty resolv.conf (so a serve that
    wrongly starts answers on loopback and forwards nowhere)."""
    resolv = tmp / "resolv.conf"
    resolv.write_text("# no nameservers\n")
    path = tmp / "meshdns.yaml"
    path.write_text(text.replace("RESOLV", str(resolv)))
    return path


# ---------------------------------------------------------------- one rule, every reader

# (document, the path each reader names). JSON is YAML, so the YAML loader reads these
# too, and must name the same key.
DOCUMENTS = [
    ('{"dns": {"ttl": 30, "ttl": 40}}', "dns.ttl"),
    ('{"services": [{"name": "a"}, {"name": "a", "port": 1, "name": "zz"}]}',
     "services[1].name"),
    ('{"services": [], "services": [{"name": "a"}]}', "services"),
    ('{"upsert": [{"labels": {"app": "x", "app": "y"}}]}', "upsert[0].labels.app"),
    ('[{"x": {"y": 1, "y": 2}}]', "[0].x.y"),
]


@pytest.mark.parametrize(("text", "path"), DOCUMENTS)
def test_every_reader_refuses_the_same_key(text: str, path: str) -> None:
    from meshdns.yamlload import DuplicateKey, load_json

    readers = {
        "load_json": lambda: load_json(text),
        "load_yaml": lambda: load_yaml(text),
        "parse_document (config, seed files, apply -f)": lambda: parse_document(text),
    }
    for what, read in readers.items():
        with pytest.raises(DuplicateKey) as info:
            read()
        assert info.value.path == path, what
    for kind in ("json", "yaml"):  # API bodies: JSON decoded element by element
        with pytest.raises(ApiError) as api:
            decode(text.encode(), kind)
        assert (api.value.status, api.value.field) == (400, path), kind
        assert api.value.message.startswith("duplicate key"), api.value.message


def test_equal_keys_in_different_mappings_are_not_duplicates() -> None:
    text = json.dumps({"services": [dict(SERVICE, labels={"name": "x"}), dict(SERVICE)]})
    assert decode(text.encode(), "json") == json.loads(text)
    assert load_yaml(text) == json.loads(text)
    # A YAML merge key overrides by design: not a duplicate.
    assert load_yaml("a: {<<: {x: 1}, x: 2}") == {"a": {"x": 2}}


def test_yaml_names_the_two_places() -> None:
    from meshdns.yamlload import DuplicateKey

    with pytest.raises(DuplicateKey) as info:
        load_yaml("dns:\n  listen: []\n  ttl: 30\n  ttl: 40\n")
    assert str(info.value) == "dns.ttl: duplicate key (lines 3 and 4)"
    with pytest.raises(DuplicateKey) as info:
        load_yaml("dns: {ttl: 30, ttl: 40}\n")
    assert str(info.value) == "dns.ttl: duplicate key (line 1, columns 7 and 16)"


# ---------------------------------------------------------------- config files


CONFIGS = [
    ("dns:\n  listen: [\"127.0.0.1:0\"]\n  resolv_conf: RESOLV\n  ttl: 30\n  ttl: 40\n",
     "dns.ttl: duplicate key (lines 4 and 5)"),
    ("dns: {ttl: 30, ttl: 40, listen: [\"127.0.0.1:0\"], resolv_conf: RESOLV}\n",
     "dns.ttl: duplicate key (line 1, columns 7 and 16)"),
    # The second block would have dropped the first one's state_file.
    ("dns: {listen: [\"127.0.0.1:0\"], resolv_conf: RESOLV}\n"
     "registry:\n  state_file: STATE\nlog:\n  level: info\nregistry:\n  cidr: 240.0.0.0/8\n",
     "registry: duplicate key (lines 2 and 6)"),
]


@pytest.mark.parametrize(("text", "message"), CONFIGS, ids=["block", "flow", "section"])
def test_check_config_and_serve_refuse_a_duplicate_key(tmp_path: Path, text: str,
                                                       message: str) -> None:
    state = tmp_path / "state.json"
    config = config_file(tmp_path, text.replace("STATE", str(state)))
    for argv in (("check-config", str(config)), ("check-config", "--skip-files", str(config)),
                 ("serve", "--config", str(config))):
        proc = meshdns(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert f"meshdns: config error: {message}" in proc.stderr.splitlines(), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not state.exists()


# ---------------------------------------------------------------- seed files


SEEDS = [
    ("seed.yaml", "services:\n  - name: a\n    namespace: b\n    port: 80\n    name: zz\n",
     "services[0].name: duplicate key (lines 2 and 5)"),
    ("seed.json", '{"services": [{"name": "a", "namespace": "b", "port": 80},\n'
                  ' {"name": "c", "namespace": "b", "port": 80, "port": 81}]}',
     "services[1].port: duplicate key"),
]


@pytest.mark.parametrize(("name", "seed", "message"), SEEDS, ids=["yaml", "json"])
def test_a_seed_file_with_a_duplicate_key_is_refused(tmp_path: Path, name: str, seed: str,
                                                     message: str) -> None:
    seed_path = tmp_path / name
    seed_path.write_text(seed)
    config = config_file(tmp_path, "dns: {listen: [\"127.0.0.1:0\"], resolv_conf: RESOLV}\n"
                                   f"registry: {{seed_file: {json.dumps(str(seed_path))}}}\n")
    expected = f"seed file {seed_path}: {message}"
    check = meshdns("check-config", str(config), cwd=tmp_path)
    assert check.returncode == 2, check.stdout + check.stderr
    assert check.stderr.splitlines() == [f"meshdns: config error: registry.seed_file: "
                                         f"{expected}"], check.stderr
    serve = meshdns("serve", "--config", str(config), cwd=tmp_path)
    assert serve.returncode != 0, serve.stderr
    assert expected in serve.stderr and "Traceback" not in serve.stderr, serve.stderr


# ---------------------------------------------------------------- API bodies, live


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, services=[SERVICE])) as srv:
        yield srv


def registry(server: ServerThread) -> dict[str, Any]:
    reply = call(server.api_url, "GET", "/v1/services")
    assert reply.status == 200
    doc: dict[str, Any] = reply.json()
    return doc


BODIES = [
    ("PUT", "application/json",
     '{"services": [{"name": "a", "namespace": "b", "port": 80, "name": "zz"}]}',
     "services[0].name", "duplicate key"),
    ("PUT", "application/yaml",
     "services:\n- name: a\n  namespace: b\n  port: 80\n  name: zz\n",
     "services[0].name", "duplicate key (lines 2 and 5)"),
    ("PATCH", "application/json",
     '{"upsert": [{"name": "zz", "namespace": "b", "port": 80,'
     ' "labels": {"app": "x", "app": "y"}}]}', "upsert[0].labels.app", "duplicate key"),
    ("PATCH", "application/yaml",
     "upsert:\n- {name: zz, namespace: b, port: 80}\n"
     "delete:\n- {name: a, namespace: b, port: 80}\n"
     "upsert:\n- {name: zz, namespace: b, port: 81}\n",
     "upsert", "duplicate key (lines 1 and 5)"),
]


@pytest.mark.parametrize(("method", "ctype", "body", "field", "error"), BODIES,
                         ids=["put-json", "put-yaml", "patch-json-labels", "patch-yaml-top"])
def test_an_api_body_with_a_duplicate_key_is_refused(server: ServerThread, method: str,
                                                     ctype: str, body: str, field: str,
                                                     error: str) -> None:
    before = registry(server)
    reply = call(server.api_url, method, "/v1/services", raw=body.encode(), content_type=ctype)
    assert reply.status == 400, reply.body
    assert reply.json() == {"error": error, "field": field}
    assert registry(server) == before  # nothing changed: same revision, same services
    assert query(server, "zz.b.svc.80.mesh").rcode() == dns.rcode.NXDOMAIN
    assert query(server, "a.b.svc.80.mesh").answer[0][0].address == "240.0.0.9"
    # The same body without the repeat is accepted: the refusal was the duplicate only.
    fixed = json.dumps({"services": [dict(SERVICE, name="zz")]}).encode()
    assert call(server.api_url, "PUT", "/v1/services", raw=fixed,
                content_type="application/json").status == 200
    assert query(server, "zz.b.svc.80.mesh").answer[0][0].address == "240.0.0.9"


def test_a_duplicate_deep_in_a_large_body_names_its_element(server: ServerThread) -> None:
    """The JSON decoder that works element by element (to hand the GIL back to DNS)
    names the element of a repeat thousands of services in."""
    services = [{"name": f"s{i}", "namespace": "bulk", "port": 80} for i in range(5000)]
    text = json.dumps({"services": services})
    at = text.index('"s4321"')
    text = text[:at] + '"s4321", "namespace": "again"' + text[at + len('"s4321"'):]
    reply = call(server.api_url, "PUT", "/v1/services", raw=text.encode(),
                 content_type="application/json")
    assert reply.status == 400
    assert reply.json() == {"error": "duplicate key", "field": "services[4321].namespace"}
    assert registry(server)["services"][0]["name"] == "a"
