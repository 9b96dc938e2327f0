"""Logs as operators read them: CoreDNS-style query lines, JSON fields, audit lines, zones."""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
from pathlib import Path

import dns.rcode
import pytest

from meshdns.logs import JsonFormatter, TextFormatter

from ..apiclient import ServerProcess, call
from ..fake_upstream import Unbound
from ..support import make_config, query, running_server

QUERY_LINE = re.compile(
    r'(?P<client>127\.0\.0\.1:\d+) - (?P<id>\d+) "(?P<type>\w+) IN (?P<name>\S+) '
    r'(?P<proto>udp|tcp) (?P<size>\d+) (?P<do>true|false) (?P<bufsize>\d+)" '
    r"(?P<rcode>[A-Z]+) (?P<flags>[a-z,]+) (?P<rsize>\d+) (?P<duration>\d+\.\d{6})s")


def query_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "meshdns.query"]


def test_query_log_is_off_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running_server(make_config(tmp_path)) as server, \
            caplog.at_level("INFO", logger="meshdns.query"):
        query(server, "frontend.kong.svc.80.mesh", "A")
        query(server, "frontend.kong.svc.80.mesh", "A", tcp=True)
    assert not query_records(caplog)


def test_query_log_has_coredns_fields_and_the_upstreams_rcode(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Unbound(tmp_path) as unbound:
        raw = make_config(tmp_path, {"log": {"queries": True},
                                     "dns": {"upstreams": [unbound.address]}})
        with running_server(raw) as server, caplog.at_level("INFO", logger="meshdns.query"):
            query(server, "frontend.kong.svc.80.mesh", "A")
            query(server, "nope.mesh", "AAAA", tcp=True)
            assert query(server, "nope.example.test").rcode() == dns.rcode.NXDOMAIN
            assert query(server, "www.example.test", tcp=True).rcode() == dns.rcode.NOERROR
    records = query_records(caplog)
    assert len(records) == 4
    lines = [QUERY_LINE.fullmatch(r.getMessage()) for r in records]
    assert all(lines), [r.getMessage() for r in records]
    local, missing, forwarded_nx, forwarded_tcp = (m.groupdict() for m in lines if m)
    assert (local["type"], local["name"], local["proto"], local["rcode"]) == (
        "A", "frontend.kong.svc.80.mesh.", "udp", "NOERROR")
    assert local["flags"] == "qr,aa,rd,ra" and local["bufsize"] == "1232"
    assert (missing["proto"], missing["rcode"]) == ("tcp", "NXDOMAIN")
    # A forwarded NXDOMAIN is logged as what the client got: the upstream's rcode.
    assert (forwarded_nx["name"], forwarded_nx["rcode"]) == ("nope.example.test.", "NXDOMAIN")
    assert "aa" not in forwarded_nx["flags"].split(",")
    assert (forwarded_tcp["proto"], forwarded_tcp["rcode"]) == ("tcp", "NOERROR")
    fields = vars(records[2])["fields"]
    assert fields["forwarded"] is True and fields["client"].startswith("127.0.0.1:")
    assert fields["rsize"] > 0 and 0 < fields["duration"] < 10
    assert vars(records[0])["fields"]["forwarded"] is False


def record(msg: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("meshdns.api", logging.INFO, __file__, 1, msg, None, None)
    rec.created = 1796137200.5  # 2026-12-01T15:00:00.500Z
    rec.msecs = 500.0
    rec.fields = fields
    return rec


def test_json_lines_carry_fields_and_a_zoned_timestamp() -> None:
    doc = json.loads(JsonFormatter().format(record("registry write", status=200, revision=7)))
    assert doc["msg"] == "registry write" and doc["status"] == 200 and doc["revision"] == 7
    ts = datetime.datetime.fromisoformat(doc["ts"])
    assert ts.tzinfo is not None and ts.timestamp() == 1796137200.5


def test_text_lines_have_a_zoned_iso_timestamp_and_key_values() -> None:
    line = TextFormatter().format(record("registry write", status=409, error="VIP taken"))
    stamp, rest = line.split(" ", 1)
    assert datetime.datetime.fromisoformat(stamp).tzinfo is not None
    assert rest == 'INFO meshdns.api: registry write status=409 error="VIP taken"'


def test_every_registry_write_logs_one_audit_line_as_json(tmp_path: Path) -> None:
    """As deployed: a server process with log.format json, writes good and bad."""
    server = ServerProcess(tmp_path / "s", {"log": {"format": "json"}}).start(ready=False)
    try:
        ok = call(server.url, "PUT", "/v1/services", {"services": [
            {"name": "a", "namespace": "b", "port": 1}, {"name": "c", "namespace": "b",
                                                         "port": 2}]})
        assert ok.status == 200
        ok = call(server.url, "PATCH", "/v1/services",
                  {"upsert": [{"name": "d", "namespace": "b", "port": 3}],
                   "delete": [{"name": "a", "namespace": "b", "port": 1}]})
        assert ok.status == 200
        bad = call(server.url, "PATCH", "/v1/services", {"upsert": [{"name": "x"}]})
        assert bad.status == 400
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.log().count("registry write") < 3:
            time.sleep(0.05)
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    writes = [d for d in lines if d["msg"].startswith("registry write")]
    assert [(d["method"], d["status"]) for d in writes] == [
        ("PUT", 200), ("PATCH", 200), ("PATCH", 400)]
    put, patch, rejected = writes
    assert (put["services"], put["revision"], put["route"]) == (2, 1, "/v1/services")
    assert (patch["upserted"], patch["deleted"], patch["revision"]) == (1, 1, 2)
    assert "revision" not in rejected and "namespace" in rejected["error"]
    assert put["remote"] == "127.0.0.1"
    for d in lines:
        assert datetime.datetime.fromisoformat(d["ts"]).tzinfo is not None
    start = next(d for d in lines if d["msg"].startswith("meshdns "))
    assert start["level"] == "info" and start["logger"] == "meshdns"
