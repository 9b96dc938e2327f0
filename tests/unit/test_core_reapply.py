"""Writing back what the registry lists changes nothing (issue 22, item 7), in the pure
core: ``GET /v1/services`` as a PUT or PATCH body, parsed as the API parses it (with
the services served as ``known``), keeps the revision and every VIP's origin. A VIP
written that differs from the service's own is given (pinned), as before.
(Over real processes and the CLI: tests/system/test_export_apply.py.)
"""

from __future__ import annotations

from typing import Any

import pytest

from meshdns.core.registry import (
    Registry,
    RegistryPolicy,
    VipRange,
    apply_patch,
    apply_put,
    parse_services,
)

POLICY = RegistryPolicy()
NO_V6 = RegistryPolicy(range6=None)


def registry(policy: RegistryPolicy = POLICY) -> Registry:
    body = [{"name": "a", "namespace": "x", "port": 80},
            {"name": "b", "namespace": "x", "port": 80, "hostnames": ["b.mesh"]},
            {"name": "c", "namespace": "x", "port": 80, "vip": "240.0.9.9"},
            {"name": "d", "namespace": "x", "port": 80, "labels": {"app": "d"}}]
    return apply_put(Registry.empty(), parse_services(body), policy, 0.0)


def exported(reg: Registry) -> list[dict[str, Any]]:
    return [s.to_json() for s in reg.services.values()]


def origins(reg: Registry) -> dict[str, tuple[bool, bool]]:
    return {s.name: (s.vip_given, s.vip6_given) for s in reg.services.values()}


@pytest.mark.parametrize("policy", [POLICY, NO_V6], ids=["v4+v6", "v4 only"])
@pytest.mark.parametrize("write", ["put", "patch"])
def test_the_listed_registry_written_back_is_the_same_registry(
        policy: RegistryPolicy, write: str) -> None:
    reg = registry(policy)
    specs = parse_services(exported(reg), known=reg.services)
    if write == "put":
        again = apply_put(reg, specs, policy, 1.0)
    else:
        again = apply_patch(reg, specs, [], policy, 1.0)
    assert again.revision == reg.revision
    assert again.services == reg.services
    assert origins(again) == origins(reg)
    assert origins(again)["a"] == (False, False) and origins(again)["c"][0] is True


def test_a_change_keeps_the_origin_of_the_vips_written_back() -> None:
    reg = registry()
    body = exported(reg)
    body[1]["hostnames"].append("www.b.mesh")  # b changes; its VIPs are written as they are
    again = apply_patch(reg, parse_services(body, known=reg.services), [], POLICY, 1.0)
    assert again.revision == reg.revision + 1
    assert origins(again) == origins(reg)
    assert again.services[("b", "x", 80)].hostnames == ("b.mesh", "www.b.mesh")


def test_another_vip_written_is_given_and_the_vip_it_has_pinned_stays_pinned() -> None:
    reg = registry()
    a = reg.services[("a", "x", 80)]
    moved = apply_patch(reg, parse_services([{**a.to_json(), "vip": "240.0.7.7"}],
                                            known=reg.services), [], POLICY, 1.0)
    assert origins(moved)["a"] == (True, False)  # the new VIP is the control plane's
    back = apply_patch(moved, parse_services(exported(moved), known=moved.services), [],
                       POLICY, 2.0)
    assert back.revision == moved.revision and origins(back)["a"] == (True, False)


def test_without_a_registry_to_compare_with_the_vips_are_given() -> None:
    """A backup restored into an empty registry: every VIP kept, as given."""
    reg = registry()
    restored = apply_put(Registry.empty(), parse_services(exported(reg)), POLICY, 0.0)
    assert {k: (s.vip, s.vip6) for k, s in restored.services.items()} == \
        {k: (s.vip, s.vip6) for k, s in reg.services.items()}
    assert set(origins(restored).values()) == {(True, True)}


def test_an_allocated_vip_written_back_still_moves_with_the_cidr() -> None:
    reg = registry()
    again = apply_put(reg, parse_services(exported(reg), known=reg.services), POLICY, 1.0)
    moved_policy = RegistryPolicy(range4=VipRange.from_cidr("241.0.0.0/24"))
    # What a restart on a new registry.cidr does: rebuild from the state file's view.
    rebuilt = apply_put(again, [s.to_spec() for s in again.services.values()], moved_policy,
                        2.0)
    a = rebuilt.services[("a", "x", 80)]
    assert a.vip >> 24 == 241
    assert rebuilt.services[("c", "x", 80)].vip == reg.services[("c", "x", 80)].vip
