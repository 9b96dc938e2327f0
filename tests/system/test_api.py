"""The HTTP API over real HTTP: every route, status code and kind of bad input.

After every rejected write the registry (GET body) and its revision must be
exactly what they were before.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml

from meshdns.api.app import openapi_text
from meshdns.config import HostPort

from ..apiclient import Reply, as_yaml, call
from ..support import DEMO_SERVICES, ServerThread, make_config, query, running_server

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    extra = {"registry": {"state_file": str(tmp_path / "state.json")},
             "api": {"max_body_bytes": 64 * 1024}}
    with running_server(make_config(tmp_path, extra)) as srv:
        yield srv


def get(srv: ServerThread, path: str = "/v1/services", **kw: Any) -> Reply:
    return call(srv.api_url, "GET", path, **kw)


def snapshot(srv: ServerThread) -> tuple[int, Any]:
    reply = get(srv)
    assert reply.status == 200
    doc = reply.json()
    assert reply.etag == f'"{doc["revision"]}"'
    return doc["revision"], doc


def assert_unchanged(srv: ServerThread, before: tuple[int, Any]) -> None:
    assert snapshot(srv) == before
    assert srv.mesh.store.revision == before[0]


def svc(name: str, port: int = 80, ns: str = "default", **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": ns, "port": port, **extra}


# ---------------------------------------------------------------- health, readiness


def test_healthz_and_readyz(server: ServerThread) -> None:
    assert get(server, "/healthz").json() == {"status": "ok"}
    ready = get(server, "/readyz")
    assert ready.status == 200
    assert ready.json()["ready"] is True and ready.json()["revision"] == 1


def test_readyz_is_503_until_a_registry_is_loaded(tmp_path: Path) -> None:
    with running_server(make_config(tmp_path, services=[])) as srv:
        assert get(srv, "/readyz").status == 503
        empty = get(srv)
        assert empty.status == 503 and empty.json()["field"] is None
        assert call(srv.api_url, "PUT", "/v1/services", {"services": []}).status == 200
        ready = get(srv, "/readyz")
        assert ready.status == 200 and ready.json()["revision"] == 0
        assert get(srv).json() == {"revision": 0, "services": []}


# ---------------------------------------------------------------- GET, ETag


def test_get_services_lists_every_service_with_its_vips(server: ServerThread) -> None:
    reply = get(server)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.etag == '"1"'
    doc = reply.json()
    assert doc["revision"] == 1
    by_name = {s["name"]: s for s in doc["services"]}
    assert by_name["frontend"] == {**DEMO_SERVICES[0], "hostnames": ["frontend.mesh", "httpbin.org"]}
    assert by_name["backend"]["vip"] == "240.0.0.8"
    assert by_name["redis"]["vip"].startswith("240.") and by_name["redis"]["vip6"].startswith("fd00:fd00::")
    assert doc == server.mesh.store.registry.to_json()  # same shape as the core's own rendering


@pytest.mark.parametrize("header, status", [
    ('"1"', 304), ('W/"1"', 304), ('"0", "1"', 304), ("*", 304), ("1", 304),
    ('"2"', 200), ('"01"', 200), ("garbage", 200),
])
def test_if_none_match(server: ServerThread, header: str, status: int) -> None:
    reply = get(server, headers={"If-None-Match": header})
    assert reply.status == status
    assert reply.etag == '"1"'
    if status == 304:
        assert reply.body == b""


# ---------------------------------------------------------------- writes


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "application/yaml", "application/x-yaml", "text/yaml"])
def test_put_replaces_the_whole_registry(server: ServerThread, ctype: str) -> None:
    doc = {"services": [svc("a", vip="240.0.1.1"), svc("b", 443, hostnames=["b.example.com"])]}
    raw = as_yaml(doc) if "yaml" in ctype else json.dumps(doc).encode()
    reply = call(server.api_url, "PUT", "/v1/services", raw=raw, content_type=ctype)
    assert reply.status == 200, reply.body
    assert reply.json() == {"revision": 2, "services": 2, "changed": True}
    assert reply.etag == '"2"'
    names = {s["name"] for s in get(server).json()["services"]}
    assert names == {"a", "b"}
    assert [r.address for r in query(server, "a.default.svc.80.mesh").answer[0]] == ["240.0.1.1"]
    assert query(server, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NXDOMAIN


def test_patch_upserts_and_deletes_together(server: ServerThread) -> None:
    body = {"upsert": [svc("new", vip="240.0.2.2"), {**DEMO_SERVICES[1], "vip": "240.0.2.3"}],
            "delete": [{"name": "redis", "namespace": "cache", "port": 6379},
                       {"name": "absent", "namespace": "x", "port": 1}]}
    reply = call(server.api_url, "PATCH", "/v1/services", body)
    assert reply.status == 200, reply.body
    assert reply.json() == {"revision": 2, "services": 3, "changed": True}
    by_name = {s["name"]: s for s in get(server).json()["services"]}
    assert set(by_name) == {"frontend", "backend", "new"}
    assert by_name["backend"]["vip"] == "240.0.2.3"
    assert query(server, "redis.cache.svc.6379.mesh").rcode() == dns.rcode.NXDOMAIN


def test_patch_in_yaml_and_empty_patch(server: ServerThread) -> None:
    reply = call(server.api_url, "PATCH", "/v1/services", raw=b"upsert:\n- {name: y, namespace: z, port: 9}\n",
                 content_type="application/yaml")
    assert reply.json() == {"revision": 2, "services": 4, "changed": True}
    empty = call(server.api_url, "PATCH", "/v1/services", {})
    assert empty.json() == {"revision": 2, "services": 4, "changed": False}


def test_a_write_that_changes_nothing_keeps_the_revision(server: ServerThread) -> None:
    reply = call(server.api_url, "PUT", "/v1/services", {"services": DEMO_SERVICES})
    assert reply.json() == {"revision": 1, "services": 3, "changed": False}
    assert reply.etag == '"1"'


def test_if_match_guards_writes(server: ServerThread) -> None:
    url = server.api_url
    ok = call(url, "PATCH", "/v1/services", {"upsert": [svc("a")]}, headers={"If-Match": '"1"'})
    assert ok.status == 200 and ok.json()["revision"] == 2
    before = snapshot(server)
    for stale in ('"1"', 'W/"2"', '"3"', "nonsense"):
        for method, body in (("PATCH", {"upsert": [svc("b")]}), ("PUT", {"services": []})):
            reply = call(url, method, "/v1/services", body, headers={"If-Match": stale})
            assert reply.status == 412, (stale, reply.body)
            assert reply.etag == '"2"'
            assert reply.json()["field"] is None and "revision" in reply.json()["error"]
            assert_unchanged(server, before)
    assert call(url, "PUT", "/v1/services", {"services": []}, headers={"If-Match": '"1", "2"'}).status == 200
    assert call(url, "PUT", "/v1/services", {"services": [svc("c")]}, headers={"If-Match": "*"}).status == 200


BAD_PUTS: list[tuple[Any, int, str | None]] = [
    ([], 400, None),
    ("services", 400, None),
    ({}, 400, "services"),
    ({"services": [], "extra": 1}, 400, "extra"),
    ({"services": {"name": "a"}}, 400, "services"),
    ({"services": [svc("ok"), svc("Upper")]}, 400, "services[1].name"),
    ({"services": [svc("a", ns="-bad")]}, 400, "services[0].namespace"),
    ({"services": [{"name": "a", "namespace": "b"}]}, 400, "services[0].port"),
    ({"services": [svc("a", 0)]}, 400, "services[0].port"),
    ({"services": [svc("a", 65536)]}, 400, "services[0].port"),
    ({"services": [svc("a", True)]}, 400, "services[0].port"),
    ({"services": [svc("a", vip="1.2.3")]}, 400, "services[0].vip"),
    ({"services": [svc("a", vip="fd00::1")]}, 400, "services[0].vip"),
    ({"services": [svc("a", vip6="10.0.0.1")]}, 400, "services[0].vip6"),
    ({"services": [svc("a", vip=17)]}, 400, "services[0].vip"),
    ({"services": [svc("a", color="red")]}, 400, "services[0].color"),
    ({"services": [svc("a", hostnames="a.mesh")]}, 400, "services[0].hostnames"),
    ({"services": [svc("a", hostnames=["ok.mesh", "bad..name"])]}, 400, "services[0].hostnames[1]"),
    ({"services": [svc("a", hostnames=["mesh"])]}, 400, "services[0].hostnames[0]"),
    ({"services": [svc("a"), svc("b"), svc("a")]}, 400, "services[2]"),
    ({"services": [svc("a", vip="240.0.9.9"), svc("b", vip="240.0.9.9")]}, 409, "services[1].vip"),
    ({"services": [svc("a", vip6="fd00::9"), svc("b", vip6="fd00::9")]}, 409, "services[1].vip6"),
    ({"services": [svc("a", hostnames=["x.mesh"]), svc("b", hostnames=["x.mesh"])]}, 409,
     "services[1].hostnames[0]"),
    ({"services": [svc("a"), svc("b", hostnames=["a.default.svc.80.mesh"])]}, 409,
     "services[1].hostnames[0]"),
]


@pytest.mark.parametrize("body, status, field", BAD_PUTS)
def test_bad_put_is_rejected_whole_naming_the_field(server: ServerThread, body: Any, status: int,
                                                     field: str | None) -> None:
    before = snapshot(server)
    for raw, ctype in ((json.dumps(body).encode(), "application/json"),
                       (as_yaml(body), "application/yaml")):
        reply = call(server.api_url, "PUT", "/v1/services", raw=raw, content_type=ctype)
        assert reply.status == status, reply.body
        assert reply.json()["field"] == field, reply.json()
        assert reply.json()["error"]
        assert_unchanged(server, before)


BAD_PATCHES: list[tuple[Any, int, str | None]] = [
    ([], 400, None),
    ({"upsert": [], "remove": []}, 400, "remove"),
    ({"upsert": {}}, 400, "upsert"),
    ({"delete": "redis"}, 400, "delete"),
    ({"upsert": [svc("a", 0)]}, 400, "upsert[0].port"),
    ({"upsert": [svc("a"), svc("a")]}, 400, "upsert[1]"),
    ({"delete": [{"name": "redis", "namespace": "cache"}]}, 400, "delete[0].port"),
    ({"delete": [{"name": "redis", "namespace": "cache", "port": 6379, "vip": "1.1.1.1"}]}, 400,
     "delete[0].vip"),
    ({"delete": ["redis"]}, 400, "delete[0]"),
    # A valid delete does not rescue a bad upsert: nothing at all changes.
    ({"upsert": [svc("ok"), svc("BAD")], "delete": [{"name": "redis", "namespace": "cache",
                                                       "port": 6379}]}, 400, "upsert[1].name"),
    ({"upsert": [svc("a", vip="240.0.0.7")]}, 409, "upsert[0].vip"),  # frontend's VIP
    ({"upsert": [svc("a", hostnames=["frontend.mesh"])]}, 409, "upsert[0].hostnames[0]"),
]


@pytest.mark.parametrize("body, status, field", BAD_PATCHES)
def test_bad_patch_is_rejected_whole_naming_the_field(server: ServerThread, body: Any,
                                                       status: int, field: str | None) -> None:
    before = snapshot(server)
    reply = call(server.api_url, "PATCH", "/v1/services", body)
    assert reply.status == status, reply.body
    assert reply.json()["field"] == field, reply.json()
    assert_unchanged(server, before)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("raw, ctype", [
    (b'{"services": [', "application/json"),
    (b"", "application/json"),
    (b"{'services': []}", "application/json"),
    (b'\xff\xfe{"services": []}', "application/json"),
    (b"[" * 50_000, "application/json"),
    (b"services: [unclosed", "application/yaml"),
    (b"services: *undefined_alias", "application/yaml"),
    (b"[" * 50_000, "application/yaml"),
    (b"\xff: 1", "text/yaml"),
    (b"", "application/yaml"),
    (b"- just\n- a list\n", "application/yaml"),
])
def test_malformed_body_is_400(server: ServerThread, method: str, raw: bytes, ctype: str) -> None:
    before = snapshot(server)
    reply = call(server.api_url, method, "/v1/services", raw=raw, content_type=ctype)
    assert reply.status == 400, reply.body
    assert reply.json()["field"] is None
    assert_unchanged(server, before)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x",
                                   "application/json; charset=latin-1", "application/xml"])
def test_unsupported_content_type_is_415(server: ServerThread, method: str,
                                         ctype: str | None) -> None:
    before = snapshot(server)
    headers = {} if ctype is None else {"Content-Type": ctype}
    reply = call(server.api_url, method, "/v1/services", raw=b'{"services": []}', headers=headers)
    assert reply.status == 415, reply.body
    assert "Content-Type" in reply.json()["error"] or "charset" in reply.json()["error"]
    assert_unchanged(server, before)


# ---------------------------------------------------------------- 413


def test_body_over_the_limit_is_413(server: ServerThread) -> None:
    before = snapshot(server)
    big = {"services": [svc(f"s{i}", hostnames=[f"h{i}.example.com"]) for i in range(2000)]}
    for method in ("PUT", "PATCH"):
        body = big if method == "PUT" else {"upsert": big["services"]}
        reply = call(server.api_url, method, "/v1/services", body)
        assert reply.status == 413
        assert "max_body_bytes" in reply.json()["error"]
        assert_unchanged(server, before)


def _open(srv: ServerThread) -> http.client.HTTPConnection:
    hp = srv.mesh.api_address
    assert hp is not None
    return http.client.HTTPConnection(hp.host, hp.port, timeout=10)


def test_announced_length_over_the_limit_is_413_before_any_byte_is_read(
        server: ServerThread) -> None:
    """Content-Length says 1 GB and not one byte of body is sent: 413 comes anyway."""
    before = snapshot(server)
    conn = _open(server)
    conn.putrequest("PUT", "/v1/services")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["field"] is None
    conn.close()
    assert_unchanged(server, before)


def test_chunked_body_is_cut_off_at_the_limit_while_streaming(server: ServerThread) -> None:
    """No Content-Length: the server counts while reading and answers 413 as soon as the
    limit is passed, while the client has not even finished sending."""
    before = snapshot(server)
    conn = _open(server)
    conn.putrequest("PUT", "/v1/services")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b" " * 16384
    for _ in range(8):  # 128 KiB > 64 KiB limit; the terminating chunk is never sent
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    resp = conn.getresponse()
    assert resp.status == 413
    resp.read()
    conn.close()
    assert_unchanged(server, before)


def test_body_just_under_the_limit_is_accepted(server: ServerThread) -> None:
    limit = server.mesh.config.api.max_body_bytes
    doc = {"services": [svc("a", hostnames=["a.mesh"])]}
    raw = json.dumps(doc).encode()
    raw = raw + b" " * (limit - len(raw))
    assert len(raw) == limit
    reply = call(server.api_url, "PUT", "/v1/services", raw=raw, content_type="application/json")
    assert reply.status == 200, reply.body


# ---------------------------------------------------------------- auth


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, {"api": {"token": TOKEN}})) as srv:
        yield srv


V1_REQUESTS = [
    ("GET", "/v1/services", None),
    ("GET", "/v1/services?wait=5", None),
    ("PUT", "/v1/services", {"services": []}),
    ("PATCH", "/v1/services", {"delete": [{"name": "redis", "namespace": "cache", "port": 6379}]}),
    ("GET", "/v1/resolve?name=frontend.kong.svc.80.mesh", None),
    ("GET", "/v1/openapi.yaml", None),
    ("GET", "/v1/no-such-route", None),
    ("DELETE", "/v1/services", None),
]


@pytest.mark.parametrize("method, path, body", V1_REQUESTS)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Bearer {TOKEN}x", TOKEN,
                                  f"Basic {TOKEN}", "Bearer", f"Bearer{TOKEN}", "Bearer é"])
def test_every_v1_route_needs_the_bearer_token(token_server: ServerThread, method: str, path: str,
                                               body: Any, auth: str | None) -> None:
    before = snapshot_with_token(token_server)
    headers = {} if auth is None else {"Authorization": auth}
    reply = call(token_server.api_url, method, path, body, headers=headers)
    assert reply.status == 401, reply.body
    assert reply.json()["error"] and reply.json()["field"] is None
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert snapshot_with_token(token_server) == before


def snapshot_with_token(srv: ServerThread) -> Any:
    reply = call(srv.api_url, "GET", "/v1/services", token=TOKEN)
    assert reply.status == 200
    return reply.etag, reply.json()


def test_the_right_token_opens_v1_and_health_stays_open(token_server: ServerThread) -> None:
    url = token_server.api_url
    assert call(url, "GET", "/healthz").status == 200
    assert call(url, "GET", "/readyz").status == 200
    assert call(url, "GET", "/v1/resolve?name=frontend.mesh", token=TOKEN).status == 200
    reply = call(url, "PATCH", "/v1/services", {"upsert": [svc("a")]}, token=TOKEN)
    assert reply.status == 200 and reply.json()["revision"] == 2


def test_metrics_stay_open_and_count_sync_requests(token_server: ServerThread) -> None:
    call(token_server.api_url, "GET", "/v1/services")  # 401, counted
    call(token_server.api_url, "GET", "/v1/services", token=TOKEN)
    reply = call(token_server.api_url, "GET", "/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    assert 'meshdns_sync_requests_total{code="401",op="get"} 1.0' in text
    assert 'meshdns_sync_requests_total{code="200",op="get"} 1.0' in text


def test_env_token_applies(tmp_path: Path) -> None:
    with running_server(make_config(tmp_path), env={"MESHDNS_API_TOKEN": "from-env"}) as srv:
        assert call(srv.api_url, "GET", "/v1/services").status == 401
        assert call(srv.api_url, "GET", "/v1/services", token="from-env").status == 200


# ---------------------------------------------------------------- VIPs from the core


def test_exhausted_vip_range_is_507_and_nothing_changes(tmp_path: Path) -> None:
    extra = {"registry": {"cidr": "10.9.0.0/29", "cidr6": None}}  # 6 usable addresses
    with running_server(make_config(tmp_path, extra, services=[svc("a")])) as srv:
        before = snapshot(srv)
        reply = call(srv.api_url, "PUT", "/v1/services",
                     {"services": [svc(f"s{i}") for i in range(7)]})
        assert reply.status == 507
        assert "exhausted" in reply.json()["error"]
        assert reply.json()["field"] is None
        assert_unchanged(srv, before)
        reply = call(srv.api_url, "PATCH", "/v1/services",
                     {"upsert": [svc(f"s{i}") for i in range(6)]})
        assert reply.status == 507
        assert_unchanged(srv, before)
        ok = call(srv.api_url, "PATCH", "/v1/services", {"upsert": [svc(f"s{i}") for i in range(5)]})
        assert ok.json() == {"revision": 2, "services": 6, "changed": True}


def _vips(srv: ServerThread) -> dict[str, tuple[str, str | None]]:
    return {s["name"]: (s["vip"], s["vip6"]) for s in get(srv).json()["services"]}


def test_vips_are_stable_across_re_pushes_and_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    extra = {"registry": {"state_file": str(state)}}
    services = [svc(f"s{i}") for i in range(20)]
    with running_server(make_config(tmp_path, extra, services=[])) as srv:
        assert call(srv.api_url, "PUT", "/v1/services", {"services": services}).status == 200
        first = _vips(srv)
        assert len({v for v, _ in first.values()}) == 20
        # Same set in another order, plus one: the 20 keep their addresses.
        again = [*reversed(services), svc("extra")]
        assert call(srv.api_url, "PUT", "/v1/services", {"services": again}).status == 200
        second = _vips(srv)
        assert {k: second[k] for k in first} == first
        # Delete one and bring it back: its address was held for it, not given away.
        call(srv.api_url, "PATCH", "/v1/services", {"delete": [{"name": "s3", "namespace": "default", "port": 80}]})
        call(srv.api_url, "PATCH", "/v1/services", {"upsert": [svc("newcomer")]})
        assert _vips(srv)["newcomer"][0] not in {v for v, _ in first.values()}
        call(srv.api_url, "PATCH", "/v1/services", {"upsert": [svc("s3")]})
        third = _vips(srv)
        assert third["s3"] == first["s3"]
        revision = srv.mesh.store.revision
    with running_server(make_config(tmp_path, extra, services=[svc("ignored-seed")])) as srv:
        assert _vips(srv) == third
        assert srv.mesh.store.revision == revision
        assert call(srv.api_url, "PUT", "/v1/services", {"services": services}).status == 200
        assert {k: v for k, v in _vips(srv).items()} == {k: third[k] for k in first}


# ---------------------------------------------------------------- read-your-writes


def test_read_your_writes_100_rounds(server: ServerThread) -> None:
    """Every write is answered only once DNS answers from it: a query right after sees it."""
    for i in range(100):
        vip = f"240.1.{i // 250}.{i % 250 + 1}"
        if i % 2:
            reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [svc("rw", vip=vip)]})
        else:
            services = [*DEMO_SERVICES, svc("rw", vip=vip)]
            reply = call(server.api_url, "PUT", "/v1/services", {"services": services})
        assert reply.status == 200, reply.body
        answer = query(server, "rw.default.svc.80.mesh", tcp=bool(i % 3 == 0))
        assert [r.address for r in answer.answer[0]] == [vip], i
        assert answer.authority == [] and answer.rcode() == dns.rcode.NOERROR


def test_concurrent_writes_are_serialised_and_none_is_lost(server: ServerThread) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def writer(w: int) -> list[int]:
        return [call(server.api_url, "PATCH", "/v1/services",
                     {"upsert": [svc(f"w{w}-{i}")]}).json()["revision"] for i in range(15)]

    with ThreadPoolExecutor(4) as pool:
        revisions = [r for rs in pool.map(writer, range(4)) for r in rs]
    assert sorted(revisions) == list(range(2, 62))  # each write got its own revision
    names = {s["name"] for s in get(server).json()["services"]}
    assert {f"w{w}-{i}" for w in range(4) for i in range(15)} <= names
    assert len({s["vip"] for s in get(server).json()["services"]}) == len(names)


def test_two_writers_with_the_same_if_match_one_wins(server: ServerThread) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def writer(name: str) -> int:
        return call(server.api_url, "PATCH", "/v1/services", {"upsert": [svc(name)]},
                    headers={"If-Match": '"1"'}).status

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(writer, ["first", "second"]))
    assert statuses == [200, 412]
    assert server.mesh.store.revision == 2


# ---------------------------------------------------------------- state file


def test_every_acknowledged_write_is_in_the_state_file(server: ServerThread, tmp_path: Path) -> None:
    from meshdns.store import read_state

    state = tmp_path / "state.json"
    for i in range(5):
        reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [svc(f"p{i}")]})
        reg = read_state(state, server.mesh.policy, 0.0)
        assert reg.revision == reply.json()["revision"]
        assert reg.to_json() == get(server).json()
    assert not list(tmp_path.glob(".state.json.*.tmp"))


def test_unwritable_state_file_is_500_and_nothing_changes(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    extra = {"registry": {"state_file": str(state_dir / "state.json")}}
    with running_server(make_config(tmp_path, extra)) as srv:
        before = snapshot(srv)
        # The state directory turns into a plain file: no write can succeed (even as root).
        (state_dir / "state.json").unlink()
        state_dir.rmdir()
        state_dir.write_text("not a directory")
        reply = call(srv.api_url, "PATCH", "/v1/services", {"upsert": [svc("a")]})
        assert reply.status == 500
        assert "state file" in reply.json()["error"]
        assert_unchanged(srv, before)
        assert query(srv, "a.default.svc.80.mesh").rcode() == dns.rcode.NXDOMAIN


# ---------------------------------------------------------------- resolve


@pytest.mark.parametrize("name, qtype, rule, rcode, answer", [
    ("frontend.kong.svc.80.mesh", "A", "canonical", "NOERROR", ["240.0.0.7"]),
    ("FrontEnd.Kong.svc.80.mesh.", "a", "canonical", "NOERROR", ["240.0.0.7"]),
    ("frontend_kong_svc_80.mesh", "AAAA", "kuma", "NOERROR", ["fd00:fd00::7"]),
    ("httpbin.org", "A", "hostname", "NOERROR", ["240.0.0.7"]),
    ("backend.kong.svc.8080.mesh", "SRV", "canonical", "NOERROR",
     ["0 100 8080 backend.kong.svc.8080.mesh."]),
    ("backend.kong.svc.8080.mesh", "TXT", "canonical", "NOERROR", []),
    ("kong.svc.80.mesh", "A", "empty-non-terminal", "NOERROR", []),
    ("nope.kong.svc.80.mesh", "A", "nxdomain", "NXDOMAIN", []),
    ("mesh", "SOA", "apex", "NOERROR", None),
    ("7.0.0.240.in-addr.arpa", "PTR", "ptr", "NOERROR", ["frontend.kong.svc.80.mesh."]),
    ("example.com", "A", "refused", "REFUSED", []),
    ("frontend.kong.svc.80.mesh", "28", "canonical", "NOERROR", ["fd00:fd00::7"]),
    ("frontend.kong.svc.80.mesh", "TYPE28", "canonical", "NOERROR", ["fd00:fd00::7"]),
])
def test_resolve_explains_like_dns_answers(server: ServerThread, name: str, qtype: str, rule: str,
                                           rcode: str, answer: list[str] | None) -> None:
    reply = get(server, f"/v1/resolve?name={name}&type={qtype}")
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["rule"] == rule and doc["rcode"] == rcode and doc["name"] == name
    assert doc["revision"] == 1
    if answer is not None:
        assert [r["data"] for r in doc["answer"]] == answer
    # The DNS answer for the same question agrees.
    dns_reply = query(server, name, doc["type"])
    assert dns.rcode.to_text(dns_reply.rcode()) == rcode
    if answer is not None:
        assert sorted(rr.to_text() for rrset in dns_reply.answer for rr in rrset) == sorted(answer)
    if rule in ("canonical", "kuma", "hostname"):
        assert doc["service"]["name"] in ("frontend", "backend") and doc["authoritative"] is True
    if rcode == "NXDOMAIN" or (rcode == "NOERROR" and answer == []):
        assert [r["type"] for r in doc["authority"]] == ["SOA"]


def test_resolve_defaults_and_service_details(server: ServerThread) -> None:
    doc = get(server, "/v1/resolve?name=frontend.mesh").json()
    assert doc["type"] == "A" and doc["class"] == "IN" and doc["zone"] == "mesh"
    assert doc["service"] == {**DEMO_SERVICES[0]}
    assert doc["answer"] == [{"name": "frontend.mesh.", "type": "A", "ttl": 30, "data": "240.0.0.7"}]
    assert get(server, "/v1/resolve?name=frontend.mesh&class=CH").json()["rule"] == "refused"


@pytest.mark.parametrize("query_string, field", [
    ("", "name"), ("name=", "name"), ("name=a..mesh", "name"), ("name=" + "a" * 64 + ".mesh", "name"),
    ("name=" + ".".join(["a" * 60] * 5), "name"), ("name=caf%C3%A9.mesh", "name"),
    ("name=a.mesh&type=BOGUS", "type"), ("name=a.mesh&type=70000", "type"), ("name=a.mesh&type=", "type"),
    ("name=a.mesh&class=XX", "class"),
])
def test_resolve_bad_input_is_400(server: ServerThread, query_string: str, field: str) -> None:
    reply = get(server, f"/v1/resolve?{query_string}")
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == field


def test_resolve_a_forwarded_name_says_forward(tmp_path: Path) -> None:
    with running_server(make_config(tmp_path, {"dns": {"upstreams": ["127.0.0.1:9"]}})) as srv:
        assert srv.mesh.upstreams == [HostPort("127.0.0.1", 9)]
        doc = get(srv, "/v1/resolve?name=example.com").json()
        assert doc["rule"] == "forward" and doc["upstreams"] == ["127.0.0.1:9"]
        assert doc["rcode"] == "SERVFAIL" and doc["answer"] == []  # no upstream answered


# ---------------------------------------------------------------- misc routes


def test_openapi_is_served_and_docs_copy_is_identical(server: ServerThread) -> None:
    reply = get(server, "/v1/openapi.yaml")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/yaml")
    doc = yaml.safe_load(reply.body)
    assert doc["openapi"].startswith("3.")
    assert {"/v1/services", "/v1/resolve", "/healthz", "/readyz"} <= set(doc["paths"])
    assert reply.body.decode() == openapi_text()
    assert (REPO / "docs" / "openapi.yaml").read_text() == openapi_text(), \
        "docs/openapi.yaml differs from meshdns/api/openapi.yaml: copy it over"


def test_unknown_route_and_method_answer_json_errors(server: ServerThread) -> None:
    missing = get(server, "/v2/nothing")
    assert missing.status == 404 and missing.json() == {"error": "Not Found", "field": None}
    wrong = call(server.api_url, "DELETE", "/v1/services")
    assert wrong.status == 405 and wrong.json()["field"] is None
    assert "PUT" in wrong.headers["allow"]


def test_sync_requests_are_counted(server: ServerThread) -> None:
    get(server)
    get(server, headers={"If-None-Match": '"1"'})
    get(server, "/v1/services?wait=0")
    call(server.api_url, "PATCH", "/v1/services", {"upsert": [svc("a")]})
    call(server.api_url, "PUT", "/v1/services", raw=b"x", content_type="text/plain")
    get(server, "/v1/resolve?name=a.mesh")
    counts = server.mesh.api.state.sync_requests
    assert counts == {("get", "200"): 1, ("get", "304"): 1, ("watch", "200"): 1,
                      ("patch", "200"): 1, ("put", "415"): 1}
