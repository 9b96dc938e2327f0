"""Hostile request bodies and files get bounded work and a short, clear 400 (issue 11).

- the YAML alias bomb ("billion laughs" in ``port``) is refused before anything
  expands, while DNS keeps answering (a meshdns subprocess, dnspython probes);
- an offending value of 1 MB is quoted in at most ~80 characters;
- deep nesting, anchors and aliases in config and seed files;
- the JSON body decoder that works element by element equals json.loads;
- smaller defects: a lower-case bearer scheme, a vip6 with a zone id, a PATCH
  that upserts and deletes one service.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshdns.config import ConfigError, load_config
from meshdns.configfile import parse_document
from meshdns.jsonsteps import loads_in_steps
from meshdns.store import StateError, load_seed

from ..apiclient import Reply, ServerProcess, call
from ..support import DEMO_SERVICES, ServerThread, make_config, running_server, udp_query

TOKEN = "hostile-token"
MIB = 1 << 20
PROBE_NAME = "frontend.kong.svc.80.mesh"  # DEMO_SERVICES[0], VIP 240.0.0.7


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` nested anchors, each list ``width`` aliases of the previous one:
    width**levels leaves (9**9 = 387M) once expanded."""
    rows = [f"    - &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        rows.append(f"    - &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(rows)


def bomb_put() -> bytes:
    return ("services:\n- name: web\n  namespace: shop\n  port:\n" + alias_bomb()).encode()


def bomb_patch() -> bytes:
    return ("delete:\n- name: web\n  namespace: shop\n  port:\n" + alias_bomb()).encode()


def assert_error(reply: Reply, status: int, field: str | None, *words: str) -> dict[str, Any]:
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"].startswith("application/json")
    assert len(reply.body) < 1024, len(reply.body)
    doc = reply.json()
    assert doc["field"] == field, doc
    for word in words:
        assert word in doc["error"], doc
    return dict(doc)


# ---------------------------------------------------------------- the alias bomb, live


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("bomb")
    seed = tmp / "seed.json"
    seed.write_text(json.dumps({"services": DEMO_SERVICES}))
    srv = ServerProcess(tmp, {"registry": {"seed_file": str(seed)},
                              "api": {"token": TOKEN, "max_body_bytes": 4 * MIB},
                              "log": {"level": "warning"}})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Prober(threading.Thread):
    """Asks the server for ``PROBE_NAME`` back to back until stopped; records each
    probe's latency (None when it went unanswered for 2 s or got a wrong answer)."""

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.latencies: list[float | None] = []
        self.done = threading.Event()

    def run(self) -> None:
        for _ in range(10_000):  # bounded; stopped long before
            if self.done.is_set():
                return
            query = dns.message.make_query(PROBE_NAME, "A")
            start = time.monotonic()
            try:
                reply = udp_query(query, self.addr[0], self.addr[1], timeout=2.0)
                ok = reply.rcode() == dns.rcode.NOERROR and \
                    [rr.to_text() for rrset in reply.answer for rr in rrset] == ["240.0.0.7"]
            except dns.exception.Timeout:
                ok = False
            self.latencies.append(time.monotonic() - start if ok else None)
            time.sleep(0.005)


@pytest.mark.parametrize("method, body", [("PUT", bomb_put()), ("PATCH", bomb_patch())],
                         ids=["put-port", "patch-delete-port"])
def test_alias_bomb_is_refused_at_once_while_dns_keeps_answering(
        process: ServerProcess, method: str, body: bytes) -> None:
    assert len(body) < 4096 and body.count(b"&l") == 9  # 9 nested anchor levels
    before = call(process.url, "GET", "/v1/services", token=TOKEN).json()
    prober = Prober(process.dns_addr)
    prober.start()
    time.sleep(0.2)
    try:
        start = time.monotonic()
        reply = call(process.url, method, "/v1/services", raw=body,
                     content_type="application/yaml", token=TOKEN, timeout=60)
        took = time.monotonic() - start
        time.sleep(0.2)
    finally:
        prober.done.set()
        prober.join(10)
    doc = assert_error(reply, 400, None, "YAML aliases are not allowed", "&l0", "line 5")
    assert took < 1.0, f"answered after {took:.2f} s: {doc}"
    assert len(prober.latencies) >= 10
    assert None not in prober.latencies, prober.latencies
    assert max(prober.latencies) < 0.1, sorted(prober.latencies)[-5:]
    # Nothing changed, and the server is alive and well.
    assert call(process.url, "GET", "/v1/services", token=TOKEN).json() == before
    assert call(process.url, "GET", "/healthz").status == 200
    assert process.proc is not None and process.proc.poll() is None


def test_a_body_with_only_an_alias_or_only_an_anchor_is_refused(process: ServerProcess) -> None:
    for body in (b"services: *nothing\n", b"services: &s []\n",
                 b"{upsert: [], delete: [&k {name: a, namespace: b, port: 80}]}\n"):
        method = "PATCH" if body.startswith(b"{upsert") else "PUT"
        reply = call(process.url, method, "/v1/services", raw=body,
                     content_type="application/yaml", token=TOKEN)
        assert_error(reply, 400, None, "YAML aliases are not allowed", "line 1")


@pytest.mark.parametrize("body, words", [
    (b"[" * 10_000 + b"]" * 10_000, ("nest",)),
    (b"services:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 200)) + b"  " * 200 + b"1\n",
     ("YAML nested deeper than 64 levels",)),
    (b"services:\n- {name: a, namespace: b, port: " + b"1:" * 50_000 + b"1}\n",
     ("number longer than 64 characters",)),
])
def test_deep_or_huge_yaml_is_refused(process: ServerProcess, body: bytes,
                                      words: tuple[str, ...]) -> None:
    reply = call(process.url, "PUT", "/v1/services", raw=body, content_type="application/yaml",
                 token=TOKEN, timeout=60)
    assert_error(reply, 400, None, "malformed YAML body", *words)
    assert call(process.url, "GET", "/healthz").status == 200


def test_deeply_nested_json_is_refused(process: ServerProcess) -> None:
    body = b'{"services": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    reply = call(process.url, "PUT", "/v1/services", raw=body,
                 content_type="application/json", token=TOKEN, timeout=60)
    assert_error(reply, 400, None, "malformed JSON body")
    assert call(process.url, "GET", "/healthz").status == 200


# ---------------------------------------------------------------- at most ~80 characters


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("quote")
    with running_server(make_config(tmp, {"api": {"token": TOKEN,
                                                  "max_body_bytes": 8 * MIB}})) as srv:
        yield srv


HUGE = "x" * MIB


def _svc(**extra: Any) -> dict[str, Any]:
    return {"name": "web", "namespace": "shop", "port": 80, **extra}


@pytest.mark.parametrize("method, body, field", [
    ("PUT", {"services": [_svc(name=HUGE)]}, "services[0].name"),
    ("PUT", {"services": [_svc(namespace=HUGE)]}, "services[0].namespace"),
    ("PUT", {"services": [_svc(port=HUGE)]}, "services[0].port"),
    ("PUT", {"services": [_svc(port=[HUGE] * 4)]}, "services[0].port"),
    ("PUT", {"services": [_svc(port=int("9" * 4000))]}, "services[0].port"),
    ("PUT", {"services": [_svc(vip=HUGE)]}, "services[0].vip"),
    ("PUT", {"services": [_svc(vip6=HUGE)]}, "services[0].vip6"),
    ("PUT", {"services": [_svc(hostnames=[HUGE])]}, "services[0].hostnames[0]"),
    ("PATCH", {"delete": [{"name": "web", "namespace": "shop", "port": {"a": HUGE}}]},
     "delete[0].port"),
    ("PATCH", {"upsert": [_svc(port=HUGE)]}, "upsert[0].port"),
])
def test_a_megabyte_value_is_quoted_in_at_most_80_characters(
        server: ServerThread, method: str, body: Any, field: str) -> None:
    raw = json.dumps(body).encode()
    assert len(raw) > 4000  # 1 MiB but for the 4000-digit integer
    reply = call(server.api_url, method, "/v1/services", raw=raw,
                 content_type="application/json", token=TOKEN)
    doc = assert_error(reply, 400, field, "got ")
    quoted = doc["error"].split("got ", 1)[1]
    assert len(quoted) <= 80, quoted
    assert "xxxxxxxx" in quoted or "integer of" in quoted or "999" in quoted


def test_a_megabyte_unknown_key_is_quoted_in_at_most_80_characters(server: ServerThread) -> None:
    for method, body in (("PUT", {"services": [_svc(**{HUGE: 1})]}),
                         ("PATCH", {"delete": [{"name": "a", "namespace": "b", "port": 80,
                                                HUGE: 1}]}),
                         ("PUT", {HUGE: 1})):
        reply = call(server.api_url, method, "/v1/services", body, token=TOKEN)
        assert reply.status == 400 and len(reply.body) < 1024, reply.body[:200]
        assert "unknown field 'xxxxx" in reply.json()["error"]


def test_config_errors_quote_at_most_80_characters(tmp_path: Path) -> None:
    path = tmp_path / "meshdns.yaml"
    for doc in ({"dns": {"ttl": HUGE}}, {"dns": {"listen": [HUGE]}}, {"api": {HUGE: 1}},
                {HUGE: {}}, {"dns": {"ttl": list(range(10_000))}}):
        path.write_text(yaml.safe_dump(doc))  # long keys as "? key" (libyaml caps simple keys)
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        message = str(info.value)
        assert len(message) < 300, message[:400]
        assert "xxx" in message or "[0, 1, 2" in message


# ---------------------------------------------------------------- files: config and seed


def test_config_file_with_an_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meshdns.yaml"
    path.write_text("dns:\n  search: &s [a.example]\napi:\n  listen: 127.0.0.1:0\n")
    with pytest.raises(ConfigError, match=r"YAML aliases are not allowed \(anchor &s at line 2"):
        load_config(path, env={})
    path.write_text("dns:\n  ttl: 30\n  search:\n" + "\n".join(
        "  " * i + "  -" for i in range(1, 100)) + "\n")
    with pytest.raises(ConfigError, match="YAML nested deeper than 64 levels"):
        load_config(path, env={})


def test_seed_file_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text("services:\n- name: web\n  namespace: shop\n  port:\n" + alias_bomb())
    start = time.monotonic()
    with pytest.raises(StateError, match="YAML aliases are not allowed") as info:
        load_seed(str(path))
    assert time.monotonic() - start < 1.0
    assert len(str(info.value)) < 500


def test_plain_yaml_and_json_documents_still_load() -> None:
    text = "services:\n- name: web\n  namespace: shop\n  port: 80\n  hostnames: [a.example]\n"
    assert parse_document(text) == yaml.safe_load(text)
    assert parse_document('{"services": []}') == {"services": []}


# ---------------------------------------------------------------- JSON element by element

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=8), _json_values, max_size=4) | _json_values,
       indent=st.sampled_from([None, 0, 2]), pad=st.sampled_from(["", " ", "\n\t ", "\r\n"]))
def test_element_by_element_json_equals_json_loads(doc: Any, indent: int | None,
                                                   pad: str) -> None:
    text = pad + json.dumps(doc, indent=indent) + pad
    assert loads_in_steps(text) == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=4), _json_values, min_size=1, max_size=3),
       cut=st.integers(min_value=0), junk=st.sampled_from(["", "x", ",", "]", "}", "{", " 1"]))
def test_element_by_element_json_rejects_what_json_loads_rejects(doc: Any, cut: int,
                                                                 junk: str) -> None:
    text = json.dumps(doc)
    text = text[:cut % (len(text) + 1)] + junk
    try:
        expected: Any = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            loads_in_steps(text)
    else:
        assert loads_in_steps(text) == expected


# ---------------------------------------------------------------- smaller defects


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR", "Bearer  "])
def test_the_bearer_scheme_is_case_insensitive(server: ServerThread, scheme: str) -> None:
    reply = call(server.api_url, "GET", "/v1/services",
                 headers={"Authorization": f"{scheme} {TOKEN}"})
    assert reply.status == 200, reply.body
    assert reply.json()["revision"] >= 1
    wrong = call(server.api_url, "GET", "/v1/services",
                 headers={"Authorization": f"{scheme} {TOKEN.upper()}"})
    assert wrong.status == 401  # the token itself stays exact


@pytest.mark.parametrize("vip6", ["fd00:fd00::1%eth0", "fd00:fd00::1%1", "fd00:fd00::1%"])
def test_a_vip6_with_a_zone_id_is_refused_naming_the_field(server: ServerThread,
                                                           vip6: str) -> None:
    before = call(server.api_url, "GET", "/v1/services", token=TOKEN).json()
    for method, body, field in (
            ("PUT", {"services": [_svc(vip6=vip6)]}, "services[0].vip6"),
            ("PATCH", {"upsert": [_svc(vip6=vip6, vip="240.0.0.99")]}, "upsert[0].vip6")):
        reply = call(server.api_url, method, "/v1/services", body, token=TOKEN)
        assert_error(reply, 400, field, "zone id", vip6)
    assert call(server.api_url, "GET", "/v1/services", token=TOKEN).json() == before


def test_a_patch_that_upserts_and_deletes_one_service_is_refused(server: ServerThread) -> None:
    before = call(server.api_url, "GET", "/v1/services", token=TOKEN).json()
    body = {"upsert": [_svc(name="new"), {"name": "redis", "namespace": "cache", "port": 6379,
                                          "vip": "240.0.0.50"}],
            "delete": [{"name": "backend", "namespace": "kong", "port": 8080},
                       {"name": "redis", "namespace": "cache", "port": 6379}]}
    reply = call(server.api_url, "PATCH", "/v1/services", body, token=TOKEN)
    assert_error(reply, 400, "delete[1]", "redis.cache:6379", "upsert[1]", "both")
    assert call(server.api_url, "GET", "/v1/services", token=TOKEN).json() == before
    # Each alone is fine.
    reply = call(server.api_url, "PATCH", "/v1/services",
                 {"upsert": [], "delete": [{"name": "redis", "namespace": "cache",
                                            "port": 6379}]}, token=TOKEN)
    assert reply.status == 200, reply.body
