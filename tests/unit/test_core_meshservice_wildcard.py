"""Wildcard host names (docs/meshservice.md section 5): validation, RFC 4592 matching
after an exact miss, the closest encloser, 409 on two owners, the wire path left to
dnslib. Pure: snapshots in, decisions out."""

from __future__ import annotations

from typing import Any

import pytest
from dnslib import DNSRecord

from meshdns.core.answer import FastPath, Zone, ZoneSettings
from meshdns.core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    apply_patch,
    apply_put,
    parse_entries,
)

POLICY = RegistryPolicy()
SETTINGS = ZoneSettings(domains=POLICY.domains, forwarding=True)
WILD: dict[str, Any] = {"name": "ext", "namespace": "shop", "ports": [{"port": 443, "name": "https"}],
                        "vip": "240.0.0.10", "hostnames": ["*.example.com"]}
API: dict[str, Any] = {"name": "api", "namespace": "shop", "port": 80, "vip": "240.0.0.11",
                       "hostnames": ["api.example.com"]}


def put(items: list[dict[str, Any]], reg: Registry | None = None) -> Registry:
    return apply_put(reg or Registry.empty(), parse_entries(items), POLICY, 0.0)


def labels(name: str) -> tuple[bytes, ...]:
    return tuple(part.encode() for part in name.split("."))


def decide(reg: Registry, name: str, qtype: int = 1) -> tuple[int, str, list[str]]:
    decision = Zone(reg, SETTINGS).decide(labels(name), qtype, 1)
    return decision.rcode, decision.rule, [" ".join(str(r).split()[3:])
                                           for r in decision.answer]


@pytest.mark.parametrize("host", ["*.mesh", "*.com", "*.in-addr.arpa", "*.0.240.in-addr.arpa",
                                  "a.*.example.com", "*.*.example.com", "**.example.com",
                                  "*"])
def test_a_bad_wildcard_is_400(host: str) -> None:
    with pytest.raises(RegistryError) as exc:
        put([dict(WILD, hostnames=[host])])
    assert exc.value.status == 400


@pytest.mark.parametrize("domains", [("mesh",), ("shop.mesh", "mesh"), ("a.example.com",)])
def test_a_wildcard_over_a_served_domain_is_400(domains: tuple[str, ...]) -> None:
    policy = RegistryPolicy(domains=domains)
    host = "*.example.com" if domains == ("a.example.com",) else "*.shop.mesh"
    for write in (lambda: apply_put(Registry.empty(), parse_entries(
            [dict(WILD, hostnames=[host])]), policy, 0.0),
                  lambda: apply_patch(apply_put(Registry.empty(), (), policy, 0.0),
                                      parse_entries([dict(WILD, hostnames=[host])]), (),
                                      policy, 0.0)):
        if host == "*.shop.mesh" and domains == ("mesh",):
            write()  # below the served domain: fine
            continue
        with pytest.raises(RegistryError) as exc:
            write()
        assert exc.value.status == 400, domains


def test_two_owners_of_one_wildcard_is_409() -> None:
    with pytest.raises(RegistryError) as exc:
        put([WILD, dict(API, hostnames=["*.example.com"])])
    assert exc.value.status == 409
    reg = put([WILD])
    with pytest.raises(RegistryError) as exc:
        apply_patch(reg, parse_entries([dict(API, hostnames=["*.example.com"])]), (),
                    POLICY, 0.0)
    assert exc.value.status == 409


def test_rfc_4592_outside_the_served_domains() -> None:
    reg = put([WILD, API])
    assert decide(reg, "a.example.com") == (0, "wildcard", ["A 240.0.0.10"])
    assert decide(reg, "b.a.example.com") == (0, "wildcard", ["A 240.0.0.10"])
    assert decide(reg, "A.Example.COM")[1] == "wildcard"
    assert decide(reg, "*.example.com") == (0, "hostname", ["A 240.0.0.10"])
    assert decide(reg, "example.com")[1] == "forward"  # not the parent itself
    assert decide(reg, "api.example.com") == (0, "hostname", ["A 240.0.0.11"])
    assert decide(reg, "x.api.example.com")[1] == "forward"  # below an existing node
    assert decide(reg, "example.org")[1] == "forward"
    _, rule, answer = decide(reg, "a.example.com", 33)
    assert rule == "wildcard" and answer == ["SRV 0 100 443 ext.shop.svc.443.mesh."]
    decision = Zone(reg, SETTINGS).decide(labels("a.example.com"), 16, 1)  # TXT: NODATA
    assert decision.rule == "wildcard" and decision.rcode == 0 and not decision.answer
    assert str(decision.authority[0].rname) == "a.example.com."


def test_an_empty_non_terminal_is_a_closest_encloser() -> None:
    reg = put([WILD, dict(API, hostnames=["x.deep.example.com"])])
    assert decide(reg, "deep.example.com")[1] == "forward"  # the ENT: not synthesized
    assert decide(reg, "y.deep.example.com")[1] == "forward"  # its closest encloser: deep
    assert decide(reg, "other.example.com")[1] == "wildcard"


def test_rfc_4592_inside_a_served_domain() -> None:
    reg = put([dict(WILD, hostnames=["*.shop.mesh"]), API])
    assert decide(reg, "a.shop.mesh") == (0, "wildcard", ["A 240.0.0.10"])
    assert decide(reg, "shop.mesh") == (0, "empty-non-terminal", [])
    assert decide(reg, "a.other.mesh")[:2] == (3, "nxdomain")
    # A built-in name below the parent is an existing node: never the wildcard's.
    reg = put([dict(WILD, hostnames=["*.svc.80.mesh"]), API])
    assert decide(reg, "nope.svc.80.mesh")[1] == "wildcard"
    assert decide(reg, "api.shop.svc.80.mesh") == (0, "canonical", ["A 240.0.0.11"])
    assert decide(reg, "x.shop.svc.80.mesh")[0] == 3  # shop.svc.80.mesh exists (ENT)


def test_a_patch_adds_and_removes_wildcards_and_nodes() -> None:
    reg = put([API])
    zone = Zone(reg, SETTINGS)
    assert zone.decide(labels("a.example.com"), 1, 1).rule == "forward"
    for step in (
        ([WILD], (), "wildcard"),
        ([dict(API, hostnames=["api.example.com", "a.example.com"])], (), "hostname"),
        ([], [("MeshService", "", "", "shop", "ext")], "hostname"),
        ([API], (), "forward"),
    ):
        new = apply_patch(reg, parse_entries(step[0]), step[1], POLICY, 0.0)
        nzone = Zone(new, SETTINGS)
        nzone.inherit(zone)
        assert nzone.decide(labels("a.example.com"), 1, 1).rule == step[2], step
        assert nzone.wildcards() == Zone(new, SETTINGS).wildcards()
        reg, zone = new, nzone


def test_the_wire_path_leaves_a_wildcard_to_dnslib() -> None:
    reg = put([WILD, API])
    fast = FastPath(Zone(reg, SETTINGS))
    query = DNSRecord.question("a.example.com", "A").pack()
    assert fast.answer(query, True) is None
    known = DNSRecord.question("api.example.com", "A").pack()
    assert fast.answer(known, True) is not None
