"""Hostname templates (issue 16): Kuma's default names, labels, collisions, PTR/SRV.

Core checks go through ``Zone.decide`` via the resolver; the end-to-end ones
ask a real server with dig, write through the HTTP API and restart from the
state file.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest

from meshdns.config import ConfigError, parse_config
from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import (
    DEFAULT_TEMPLATES,
    Registry,
    RegistryError,
    RegistryPolicy,
    VipRange,
    apply_patch,
    apply_put,
    parse_services,
    parse_templates,
)

from ..apiclient import call
from ..support import ServerThread, make_config, run_tool, running_server

RANGE4 = VipRange.from_cidr("240.0.0.0/4")
DOMAINS = ("mesh", "mesh.local")
# Kuma 2.x's default HostnameGenerators, after today's two forms.
KUMA = [*DEFAULT_TEMPLATES, "{name}.{namespace}.svc.{zone}.mesh.local",
        "{name}.svc.mesh.local", "{name}.extsvc.mesh.local"]
SERVICES: list[dict[str, Any]] = [
    {"name": "web", "namespace": "shop", "port": 80, "vip": "240.0.0.10", "zone": "east",
     "mesh": "default", "labels": {"app": "web", "team": "blue"}},
    {"name": "db", "namespace": "shop", "port": 5432, "vip": "240.0.0.11", "zone": "west",
     "mesh": "default", "labels": {"app": "db"}},
    {"name": "cache", "namespace": "ops", "port": 6379, "vip": "240.0.0.12"},  # no zone
]


def policy(templates: list[str], select: tuple[tuple[str, str], ...] = ()) -> RegistryPolicy:
    return RegistryPolicy(domains=DOMAINS, range4=RANGE4, range6=None,
                          templates=parse_templates(templates), select=select)


def build(items: list[dict[str, Any]], templates: list[str]) -> Registry:
    return apply_put(Registry.empty(), parse_services(items), policy(templates), 0.0)


def resolver(reg: Registry) -> MessageHandler:
    return MessageHandler(Zone(reg, ZoneSettings(domains=DOMAINS, ttl=30, negative_ttl=5,
                                           range4=RANGE4)))


def ask(r: MessageHandler, name: str, rdtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    out = r.handle_udp(q.to_wire())
    assert isinstance(out, bytes)
    return dns.message.from_wire(out)


def addrs(msg: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in msg.answer for rr in rrset]


# ---------------------------------------------------------------- configuration


def test_config_defaults_are_todays_two_forms_and_errors_name_the_key() -> None:
    assert parse_config({}).dns.hostname_templates == DEFAULT_TEMPLATES == (
        "{name}.{namespace}.svc.{port}.{domain}", "{name}_{namespace}_svc_{port}.{domain}")
    assert parse_config({"dns": {"hostname_templates": KUMA}}).dns.hostname_templates == \
        tuple(KUMA)
    cases = {
        "dns.hostname_templates[1]: unknown placeholder {nmae}":
            ["{name}.{domain}", "{nmae}.svc.{domain}"],
        "dns.hostname_templates[0]: literal text '.Svc.'": ["{name}.Svc.{domain}"],
        "dns.hostname_templates[0]: must use {name} or a {label:KEY}": ["svc.{domain}"],
        "dns.hostname_templates: must be a non-empty list": [],
        "dns.hostname_templates[0]: must be a string": [5],
        "dns.hostname_templates: must not repeat": ["{name}.a", "{name}.a"],
    }
    for message, value in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config({"dns": {"hostname_templates": value}})
        assert str(err.value).startswith(message), str(err.value)


# ---------------------------------------------------------------- Kuma's default names


def test_kuma_default_templates_answer_mesh_local_names() -> None:
    r = resolver(build(SERVICES, KUMA))
    for name in ("web.shop.svc.east.mesh.local", "web.svc.mesh.local",
                 "Web.ExtSvc.Mesh.Local", "web.shop.svc.80.mesh", "web.shop.svc.80.mesh.local",
                 "web_shop_svc_80.mesh"):
        msg = ask(r, name)
        assert msg.rcode() == dns.rcode.NOERROR and addrs(msg) == ["240.0.0.10"], name
        assert msg.answer[0].name.to_text() == name + "."  # the question's case
    assert addrs(ask(r, "db.shop.svc.west.mesh.local")) == ["240.0.0.11"]
    assert addrs(ask(r, "cache.svc.mesh.local")) == ["240.0.0.12"]
    # No zone: the zone template gives cache no name at all.
    assert ask(r, "cache.ops.svc.mesh.local").rcode() == dns.rcode.NXDOMAIN
    # Names between the apex and the rendered names exist (RFC 8020): NODATA.
    for ent in ("svc.mesh.local", "shop.svc.east.mesh.local", "svc.east.mesh.local"):
        msg = ask(r, ent)
        assert msg.rcode() == dns.rcode.NOERROR and not msg.answer, ent
    assert ask(r, "nope.svc.mesh.local").rcode() == dns.rcode.NXDOMAIN
    assert ask(r, "web.shop.svc.north.mesh.local").rcode() == dns.rcode.NXDOMAIN
    # PTR and SRV keep the first template: the canonical name.
    ptr = ask(r, "10.0.0.240.in-addr.arpa", "PTR")
    assert addrs(ptr) == ["web.shop.svc.80.mesh."]
    srv = ask(r, "web.svc.mesh.local", "SRV")
    assert addrs(srv) == ["0 100 80 web.shop.svc.80.mesh.local."]


def test_a_patch_re_derives_cached_answers_of_rendered_names() -> None:
    """A cached reply for a template's name must not outlive the change that moves it."""
    reg = build(SERVICES, KUMA)
    r = resolver(reg)
    assert addrs(ask(r, "web.svc.mesh.local")) == ["240.0.0.10"]  # now cached
    assert addrs(ask(r, "web.shop.svc.east.mesh.local")) == ["240.0.0.10"]
    moved = dict(SERVICES[0], vip="240.0.0.20", zone="north")
    new = apply_patch(reg, parse_services([moved]), [], policy(KUMA), 1.0)
    r.set_zone(Zone(new, r.zone.settings))
    assert addrs(ask(r, "web.svc.mesh.local")) == ["240.0.0.20"]
    assert ask(r, "web.shop.svc.east.mesh.local").rcode() == dns.rcode.NXDOMAIN
    assert addrs(ask(r, "web.shop.svc.north.mesh.local")) == ["240.0.0.20"]


def test_first_template_names_ptr_and_srv_targets_and_labels_render() -> None:
    templates = ["{label:app}.{namespace}.{domain}", *DEFAULT_TEMPLATES]
    r = resolver(build(SERVICES, templates))
    assert addrs(ask(r, "web.shop.mesh")) == ["240.0.0.10"]
    assert addrs(ask(r, "db.shop.mesh.local")) == ["240.0.0.11"]
    assert addrs(ask(r, "10.0.0.240.in-addr.arpa", "PTR")) == ["web.shop.mesh."]
    assert addrs(ask(r, "web.shop.svc.80.mesh", "SRV")) == ["0 100 80 web.shop.mesh."]
    # cache has no app label: its PTR falls back to the next template that names it.
    assert addrs(ask(r, "12.0.0.240.in-addr.arpa", "PTR")) == ["cache.ops.svc.6379.mesh."]


def test_templates_without_a_built_in_form_drop_it() -> None:
    r = resolver(build(SERVICES, ["{name}.{namespace}.{domain}"]))
    assert addrs(ask(r, "web.shop.mesh")) == ["240.0.0.10"]
    for gone in ("web.shop.svc.80.mesh", "web_shop_svc_80.mesh"):
        assert ask(r, gone).rcode() == dns.rcode.NXDOMAIN, gone
    # The <ns>.svc.<port> nodes went with the canonical form; "shop.mesh" is a real node.
    assert ask(r, "shop.svc.80.mesh").rcode() == dns.rcode.NXDOMAIN
    assert ask(r, "shop.mesh").rcode() == dns.rcode.NOERROR


# ---------------------------------------------------------------- collisions, invalid names


def test_template_collisions_are_rejected_whole_naming_both_services() -> None:
    clash = [{"name": "web", "namespace": "a", "port": 80},
             {"name": "web", "namespace": "b", "port": 80}]
    with pytest.raises(RegistryError) as err:
        build(clash, [*DEFAULT_TEMPLATES, "{name}.svc.mesh.local"])
    assert err.value.status == 409
    assert "web.a:80" in err.value.message and "web.b:80" in err.value.message
    assert "'web.svc.mesh.local'" in err.value.message
    assert err.value.field == "services[1]"

    # A rendered name that is another service's host name, or canonical name.
    reg = build([{"name": "api", "namespace": "x", "port": 80,
                  "hostnames": ["web.shop.mesh"]}], DEFAULT_TEMPLATES)
    p = policy([*DEFAULT_TEMPLATES, "{name}.{namespace}.{domain}"])
    with pytest.raises(RegistryError) as err:
        apply_put(reg, [*reg.services.values(), *parse_services(SERVICES[:1])], p, 1.0)
    assert err.value.status == 409 and "web.shop:80" in err.value.message \
        and "api.x:80" in err.value.message
    p = policy([*DEFAULT_TEMPLATES, "{label:alias}.{domain}"])
    items = [{"name": "a", "namespace": "n", "port": 80},
             {"name": "b", "namespace": "n", "port": 80, "labels": {"alias": "a.n.svc.80"}}]
    with pytest.raises(RegistryError) as err:
        apply_put(Registry.empty(), parse_services(items), p, 0.0)
    assert err.value.status == 409 and "a.n:80" in err.value.message \
        and "b.n:80" in err.value.message

    # A PATCH that would collide leaves the registry as it was (rejected whole).
    p = policy([*DEFAULT_TEMPLATES, "{name}.svc.mesh.local"])
    base = apply_put(Registry.empty(), parse_services(SERVICES), p, 0.0)
    upserts = parse_services([{"name": "fresh", "namespace": "z", "port": 1},
                              {"name": "web", "namespace": "other", "port": 80}], "upsert")
    with pytest.raises(RegistryError) as err:
        apply_patch(base, upserts, [], p, 1.0)
    assert err.value.status == 409 and err.value.field == "upsert[1]"
    assert "web.shop:80" in err.value.message and "web.other:80" in err.value.message
    # One service generating one name twice (two templates, or two domains) is no clash.
    build(SERVICES, [*DEFAULT_TEMPLATES, "{name}.{namespace}.x.mesh", "{name}.{namespace}.x.{domain}"])


def test_invalid_generated_name_is_409() -> None:
    items = [{"name": "web", "namespace": "shop", "port": 80, "labels": {"team": "a_b"}}]
    with pytest.raises(RegistryError) as err:
        build(items, [*DEFAULT_TEMPLATES, "{label:team}.{domain}"])
    assert err.value.status == 409 and "web.shop:80" in err.value.message
    assert "'a_b.mesh'" in err.value.message and err.value.field == "services[0]"
    long_value = "x" * 63
    items = [{"name": "web", "namespace": "shop", "port": 80, "labels": {"a": long_value}}]
    with pytest.raises(RegistryError):  # 63 + 63 + 63 + 63 + ... > 253
        build(items, [*DEFAULT_TEMPLATES, "{label:a}.{label:a}.{label:a}.{label:a}.{domain}"])


def test_default_templates_answer_exactly_as_before_byte_for_byte() -> None:
    """The default list, spelled out, gives the very bytes of the built-in default."""
    plain = [{k: v for k, v in s.items() if k not in ("labels", "zone", "mesh")}
             for s in SERVICES]
    with_defaults = resolver(build(SERVICES, list(DEFAULT_TEMPLATES)))
    before = MessageHandler(Zone(apply_put(Registry.empty(), parse_services(plain),
                                     RegistryPolicy(domains=DOMAINS, range4=RANGE4,
                                                    range6=None), 0.0),
                           ZoneSettings(domains=DOMAINS, ttl=30, negative_ttl=5,
                                        range4=RANGE4)))
    for name, rdtype in [("web.shop.svc.80.mesh", "A"), ("web_shop_svc_80.mesh.local", "A"),
                         ("web.shop.svc.80.mesh", "SRV"), ("10.0.0.240.in-addr.arpa", "PTR"),
                         ("shop.svc.80.mesh", "A"), ("svc.80.mesh", "A"),
                         ("web.svc.mesh.local", "A"), ("x.shop.svc.80.mesh", "A")]:
        q = dns.message.make_query(name, rdtype)
        q.id = 7
        assert with_defaults.handle_udp(q.to_wire()) == before.handle_udp(q.to_wire()), name


# ---------------------------------------------------------------- end to end: API, state, dig


@pytest.fixture
def kuma_server(tmp_path: Path) -> Any:
    raw = make_config(tmp_path, {"dns": {"domains": list(DOMAINS), "hostname_templates": KUMA},
                                 "registry": {"state_file": str(tmp_path / "state.json")}},
                      services=SERVICES)
    return raw


def dig(server: ServerThread, name: str, rdtype: str = "A") -> tuple[str, list[str]]:
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", name, rdtype)
    assert out.returncode == 0, out.stderr
    status = out.stdout.split("status: ", 1)[1].split(",", 1)[0]
    short = run_tool("dig", f"@{host}", "-p", str(port), "+short", "+tries=1", "+time=5",
                     name, rdtype)
    return status, short.stdout.split()


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
def test_dig_kuma_names_labels_over_api_and_state(tmp_path: Path, kuma_server: Any) -> None:
    with running_server(kuma_server) as server:
        assert dig(server, "web.shop.svc.east.mesh.local") == ("NOERROR", ["240.0.0.10"])
        assert dig(server, "web.svc.mesh.local") == ("NOERROR", ["240.0.0.10"])
        assert dig(server, "db.extsvc.mesh.local") == ("NOERROR", ["240.0.0.11"])
        assert dig(server, "web.shop.svc.80.mesh") == ("NOERROR", ["240.0.0.10"])
        assert dig(server, "missing.svc.mesh.local")[0] == "NXDOMAIN"
        assert dig(server, "10.0.0.240.in-addr.arpa", "PTR") == \
            ("NOERROR", ["web.shop.svc.80.mesh."])
        got = call(server.api_url, "GET", "/v1/services").json()["services"]
        web = next(s for s in got if s["name"] == "web")
        assert web["labels"] == {"app": "web", "team": "blue"}
        assert (web["mesh"], web["zone"]) == ("default", "east")
        cache = next(s for s in got if s["name"] == "cache")
        assert "labels" not in cache and "mesh" not in cache and "zone" not in cache

        # A write that collides is 409, names both, and changes nothing.
        clash = {"upsert": [{"name": "web", "namespace": "other", "port": 81}]}
        reply = call(server.api_url, "PATCH", "/v1/services", clash)
        assert reply.status == 409, reply.body
        err = reply.json()
        assert "web.shop:80" in err["error"] and "web.other:81" in err["error"]
        assert err["field"] == "upsert[0]"
        # Labels and zone change through a PATCH: the zone name follows.
        moved = dict(SERVICES[0], zone="north", labels={"app": "web"})
        reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [moved]})
        assert reply.status == 200, reply.body
        assert dig(server, "web.shop.svc.north.mesh.local") == ("NOERROR", ["240.0.0.10"])
        assert dig(server, "web.shop.svc.east.mesh.local")[0] == "NXDOMAIN"
        bad = dict(SERVICES[0], labels={"bad key!": "x"})
        reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [bad]})
        assert reply.status == 400 and reply.json()["field"] == "upsert[0].labels.bad key!"
        bad = dict(SERVICES[0], mesh="Not_A_Label")
        reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [bad]})
        assert reply.status == 400 and reply.json()["field"] == "upsert[0].mesh"
        explained = call(server.api_url, "GET",
                         "/v1/resolve?name=web.svc.mesh.local&type=A").json()
        assert explained["rule"] == "template"
        assert explained["template"] == {"index": 3, "text": "{name}.svc.mesh.local"}
        canonical = call(server.api_url, "GET",
                         "/v1/resolve?name=web_shop_svc_80.mesh&type=A").json()
        assert canonical["template"] == {"index": 1, "text": DEFAULT_TEMPLATES[1]}

    # Restarted from the state file: labels, mesh and zone came back, and so did the names.
    with running_server(kuma_server) as server:
        web = next(s for s in call(server.api_url, "GET", "/v1/services").json()["services"]
                   if s["name"] == "web")
        assert web["labels"] == {"app": "web"} and web["zone"] == "north"
        assert dig(server, "web.shop.svc.north.mesh.local") == ("NOERROR", ["240.0.0.10"])


def test_a_patch_is_checked_against_the_names_templates_gave_others() -> None:
    """The incremental PATCH (no full rebuild) rejects a new host name or a new
    service's own canonical name that another service's template already gave out."""
    p = policy([*DEFAULT_TEMPLATES, "{name}.svc.mesh.local", "{label:alias}.{domain}"])
    base = apply_put(Registry.empty(), parse_services(
        [*SERVICES, {"name": "a", "namespace": "n", "port": 80,
                     "labels": {"alias": "x.n.svc.80"}}]), p, 0.0)
    assert base.names.generated["x.n.svc.80.mesh"][0] == ("a", "n", 80)
    for item, other in [
        ({"name": "new", "namespace": "n", "port": 1, "hostnames": ["web.svc.mesh.local"]},
         "web.shop:80"),
        ({"name": "x", "namespace": "n", "port": 80}, "a.n:80"),  # its canonical name
    ]:
        with pytest.raises(RegistryError) as err:
            apply_patch(base, parse_services([item], "upsert"), [], p, 1.0)
        assert err.value.status == 409 and other in err.value.message, err.value.message
    # Freed by a delete in the same PATCH: then it may be taken.
    reg = apply_patch(base, parse_services([{"name": "x", "namespace": "n", "port": 80}],
                                           "upsert"), [("a", "n", 80)], p, 1.0)
    assert "x.n.svc.80.mesh" not in reg.names.generated
    r = resolver(reg)
    assert addrs(ask(r, "x.n.svc.80.mesh")) == [
        str(ipaddress.ip_address(reg.services[("x", "n", 80)].vip))]
