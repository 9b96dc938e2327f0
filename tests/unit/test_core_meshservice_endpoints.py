"""Address sets in the registry core (docs/meshservice.md section 4): parsing, no VIP,
the JSON record, rotation, per-endpoint names and PTR, the wire path's truncation.
Pure: snapshots in, decisions out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dnslib import DNSRecord

from meshdns.core.answer import FastPath, Zone, ZoneSettings
from meshdns.core.registry import Registry, RegistryError, RegistryPolicy, apply_put, parse_entries
from meshdns.store.statefile import read_state, write_state

POLICY = RegistryPolicy()
DB: dict[str, Any] = {
    "name": "db", "namespace": "shop", "ports": [{"port": 5432, "name": "pg"}],
    "hostnames": ["db.shop.mesh"],
    "endpoints": [{"address": f"10.1.0.{i}", "name": f"db-{i}"} for i in range(1, 6)]
    + [{"address": "fd00::7"}]}


def put(items: list[dict[str, Any]]) -> Registry:
    return apply_put(Registry.empty(), parse_entries(items), POLICY, 0.0)


def labels(name: str) -> tuple[bytes, ...]:
    return tuple(part.encode() for part in name.split("."))


@pytest.mark.parametrize(("change", "field"), [
    ({"vip": "240.0.0.9"}, "services[0].endpoints"),
    ({"endpoints": [{"address": "10.0.0.1"}, {"address": "10.0.0.1"}]},
     "services[0].endpoints[1].address"),
    ({"endpoints": [{"address": "10.0.0.1", "name": "a"}, {"address": "10.0.0.2", "name": "a"}]},
     "services[0].endpoints[1].name"),
    ({"endpoints": [{"address": "nope"}]}, "services[0].endpoints[0].address"),
    ({"endpoints": [{"address": "10.0.0.1", "port": 1}]}, "services[0].endpoints[0].port"),
    ({"endpoints": [{"address": "10.0.0.1", "name": "A_b"}]}, "services[0].endpoints[0].name"),
    ({"endpoints": {}}, "services[0].endpoints"),
])
def test_a_bad_address_set_is_400_at_its_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistryError) as exc:
        parse_entries([dict(DB, **change)])
    assert exc.value.status == 400 and exc.value.field == field


def test_an_address_set_has_no_vip_and_its_record_carries_it() -> None:
    reg = put([DB, dict(DB, name="db2", hostnames=["db2.shop.mesh"])])  # addresses repeat
    svc = reg.entries()[0]
    assert svc.vip is None and svc.vip6 is None and not reg.by_vip4 and not reg.by_vip6
    record = svc.to_json()
    assert record["endpoints"] == DB["endpoints"] and record["vip"] is None
    again = put([{k: v for k, v in record.items() if k not in ("vip", "vip6")}])
    assert again.entries()[0] == svc


def test_rotation_per_names_and_families() -> None:
    zone = Zone(put([DB]), ZoneSettings(domains=POLICY.domains))
    orders = [[str(r.rdata) for r in zone.decide(labels("db.shop.mesh"), 1, 1).answer]
              for _ in range(6)]
    assert orders[0][1:] + orders[0][:1] == orders[1]
    assert orders[5] == orders[0][5 % 5:] + orders[0][:5 % 5]
    assert [str(r.rdata) for r in zone.decide(labels("db.shop.mesh"), 28, 1).answer] == \
        ["fd00::7"]
    empty = Zone(put([dict(DB, endpoints=[])]), ZoneSettings(domains=POLICY.domains))
    decision = empty.decide(labels("db.shop.mesh"), 1, 1)
    assert decision.rcode == 0 and not decision.answer  # NODATA, never NXDOMAIN


def test_endpoint_names_and_ptr() -> None:
    zone = Zone(put([DB, dict(DB, name="db2", hostnames=["db2.shop.mesh"])]),
                ZoneSettings(domains=POLICY.domains))
    decision = zone.decide(labels("db-3.db.shop.mesh"), 1, 1)
    assert decision.rule == "endpoint" and [str(r.rdata) for r in decision.answer] == \
        ["10.1.0.3"]
    decision = zone.decide(labels("3.0.1.10.in-addr.arpa"), 12, 1)
    assert [str(r.rdata) for r in decision.answer] == ["db-3.db.shop.mesh.",
                                                       "db-3.db2.shop.mesh."]
    assert zone.decide(labels("7.0.1.10.in-addr.arpa"), 12, 1).rule != "endpoint"


def test_the_wire_path_truncates_to_what_fits() -> None:
    big = dict(DB, endpoints=[{"address": f"10.2.0.{i}"} for i in range(1, 101)])
    fast = FastPath(Zone(put([big]), ZoneSettings(domains=POLICY.domains)))
    query = DNSRecord.question("db.shop.mesh", "A").pack()
    out = fast.answer(query, True)
    assert out is not None
    reply = DNSRecord.parse(out[0])
    assert reply.header.tc == 1 and len(reply.rr) == (512 - len(query)) // 16
    assert len(out[0]) <= 512
    out = fast.answer(query, False)
    assert out is not None
    reply = DNSRecord.parse(out[0])
    assert reply.header.tc == 0 and len(reply.rr) == 100


def test_the_state_file_keeps_an_address_set(tmp_path: Path) -> None:
    reg = put([DB])
    path = tmp_path / "state.json"
    write_state(path, reg)
    again = read_state(path, POLICY, 0.0)
    assert [s.to_json() for s in again.entries()] == [s.to_json() for s in reg.entries()]
