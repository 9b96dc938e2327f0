"""Kuma's own documents read by meshdns.kuma (issue 25): every field where it should be.

The documents under tests/data/kuma are written by hand after Kuma's public
documentation. Pure: no sockets, no server (the module is the API's and the CLI's
front end; wiring it into the registry is the next step, docs/meshservice.md).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshdns import kuma
from meshdns.core.registry import RegistryError
from meshdns.kuma import (
    KumaAddress,
    KumaDocumentError,
    KumaPort,
    KumaService,
    load_kuma,
    looks_like_kuma,
    parse_kuma,
    parse_kuma_documents,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "kuma"


def load(name: str) -> list[KumaService]:
    return load_kuma((DATA / name).read_bytes())


def refused(text: str | bytes) -> KumaDocumentError:
    with pytest.raises(KumaDocumentError) as info:
        load_kuma(text)
    return info.value


# ---------------------------------------------------------------- each kind, both forms


def test_meshservice_kubernetes_form() -> None:
    [svc] = load("meshservice-kubernetes.yaml")
    assert svc == KumaService(
        kind="MeshService", name="redis", mesh="default", zone="east", namespace="kuma-demo",
        labels=(("k8s.kuma.io/is-headless-service", "false"),
                ("k8s.kuma.io/service-name", "redis"), ("kuma.io/env", "kubernetes"),
                ("kuma.io/managed-by", "k8s-controller"), ("kuma.io/mesh", "default"),
                ("kuma.io/origin", "zone"), ("kuma.io/zone", "east"),
                ("team", "db-operators")),
        ports=(KumaPort(6739, None, 6739, "tcp"),
               KumaPort(16739, "some-port", "target-port-from-container", "tcp")),
        vips=("10.0.1.1",),
        addresses=(KumaAddress("redis.mesh", "HostnameGenerator", "kmy-hostname-generator"),))
    assert svc.key == ("MeshService", "default", "east", "kuma-demo", "redis")
    assert (svc.vip, svc.vip6, svc.origin) == (0x0A000101, None, "zone")
    assert [p.srv_name for p in svc.ports] == [None, "_some-port._tcp"]
    assert svc.to_json() == {
        "kind": "MeshService", "mesh": "default", "zone": "east", "namespace": "kuma-demo",
        "name": "redis",
        "ports": [{"port": 6739, "appProtocol": "tcp"},
                  {"port": 16739, "name": "some-port", "appProtocol": "tcp"}],
        "vip": "10.0.1.1", "hostnames": ["redis.mesh"], "labels": dict(svc.labels)}


def test_meshservice_universal_form_without_status() -> None:
    [svc] = load("meshservice-universal.yaml")
    assert svc == KumaService(
        kind="MeshService", name="backend", mesh="default", zone=None, namespace=None,
        labels=(("team", "payments"),),
        ports=(KumaPort(80, "http", 8080, "http"), KumaPort(9000, "grpc", 9000, "grpc"),
               KumaPort(9090, "metrics", 9090, "http")),
        vips=(), addresses=())
    assert [p.srv_name for p in svc.ports] == ["_http._tcp", "_grpc._tcp", "_metrics._tcp"]
    # No status: no VIP and no host names in the entry, meshdns allocates and renders.
    assert svc.to_json() == {
        "kind": "MeshService", "mesh": "default", "name": "backend",
        "ports": [{"port": 80, "name": "http", "appProtocol": "http"},
                  {"port": 9000, "name": "grpc", "appProtocol": "grpc"},
                  {"port": 9090, "name": "metrics", "appProtocol": "http"}],
        "labels": {"team": "payments"}}


def test_meshexternalservice_kubernetes_form() -> None:
    [svc] = load("meshexternalservice-kubernetes.yaml")
    assert svc == KumaService(
        kind="MeshExternalService", name="httpbin", mesh="default", zone=None,
        namespace="kuma-system",
        labels=(("kuma.io/mesh", "default"), ("kuma.io/origin", "zone")),
        ports=(KumaPort(80, None, None, "http"),),  # spec.match
        vips=("242.0.0.3",),  # status.vip, one object (not a list) for this kind
        addresses=(KumaAddress("httpbin.extsvc.mesh.local", "HostnameGenerator",
                               "local-mesh-external-service"),))
    assert svc.to_json()["vip"] == "242.0.0.3"


@pytest.mark.parametrize("status", [None, {}, {"vip": None}, {"vip": {}}, {"vip": {"ip": ""}}])
def test_an_external_service_without_a_vip_yet(status: dict[str, Any] | None) -> None:
    [svc] = parse_kuma({"type": "MeshExternalService", "name": "aurora", "mesh": "m",
                        "spec": {"match": {"port": 4244}}, "status": status})
    assert (svc.vips, svc.ports) == ((), (KumaPort(4244, None, None, "tcp"),))
    assert "vip" not in svc.to_json()


def test_meshexternalservice_universal_form_drops_tls_and_endpoints() -> None:
    [svc] = load("meshexternalservice-universal.yaml")
    assert svc == KumaService(
        kind="MeshExternalService", name="httpbin-tls", mesh="default", zone=None,
        namespace=None, labels=(), ports=(KumaPort(80, None, None, "http"),), vips=(),
        addresses=())


def test_meshmultizoneservice_kubernetes_form() -> None:
    [svc] = load("meshmultizoneservice-kubernetes.yaml")
    assert svc == KumaService(
        kind="MeshMultiZoneService", name="webapp", mesh="default", zone=None,
        namespace="kuma-system",
        labels=(("kuma.io/mesh", "default"), ("kuma.io/origin", "global")),
        ports=(KumaPort(8080, "http", None, "http"), KumaPort(9090, "metrics", None, "http")),
        vips=("243.0.0.1",),
        addresses=(KumaAddress("webapp.mzsvc.mesh.local", "HostnameGenerator",
                               "synced-mesh-multi-zone-service"),))


def test_meshmultizoneservice_universal_form() -> None:
    [svc] = load("meshmultizoneservice-universal.yaml")
    assert svc == KumaService(
        kind="MeshMultiZoneService", name="redis", mesh="default", zone=None, namespace=None,
        labels=(), ports=(KumaPort(6379, None, None, "tcp"),), vips=(), addresses=())


# ---------------------------------------------------------------- streams and lists


def test_a_stream_of_documents_in_order_empty_ones_skipped() -> None:
    svcs = load("stream.yaml")
    assert [(s.kind, s.name, s.namespace) for s in svcs] == [
        ("MeshService", "api", "app"), ("MeshService", "postgres-0", None),
        ("MeshExternalService", "aurora", None),
        ("MeshMultiZoneService", "backend", "kuma-system")]
    assert svcs[0].ports == (KumaPort(80, "main", "http-port", "http"),)
    assert svcs[1].ports == (KumaPort(5432, None, 5432, "tcp"),)
    assert svcs[2].ports == (KumaPort(4244, None, None, "tcp"),)
    assert svcs[3].ports == (KumaPort(8080, None, None, "http"),)
    assert all(s.mesh == "default" and not s.vips and not s.addresses for s in svcs)


def test_the_kubectl_list_form() -> None:
    synced, mzsvc = load("list-kubectl.yaml")
    # A synced copy: its own name is hashed and its namespace the system one; the
    # labels carry what names it (as Kuma's HostnameGenerators read it).
    assert synced.key == ("MeshService", "default", "east", "redis-system", "redis")
    assert synced.vips == ("241.0.0.17", "fd00:fd01::11")
    assert (synced.vip, synced.vip6) == (0xF1000011, 0xFD00FD01 << 96 | 0x11)
    assert synced.origin == "global"
    assert synced.addresses == (KumaAddress("redis.redis-system.svc.east.mesh.local",
                                            "HostnameGenerator", "synced-kube-mesh-service"),)
    assert synced.to_json()["vip6"] == "fd00:fd01::11"
    assert synced.ports == (KumaPort(6379, "redis", 6379, "tcp"),)
    assert mzsvc.key == ("MeshMultiZoneService", "default", "", "kuma-system", "redis")


def test_the_kumactl_list_form() -> None:
    redis, web = load("list-kumactl.yaml")
    assert redis == KumaService(
        kind="MeshService", name="redis", mesh="default", zone="west", namespace=None,
        labels=(("kuma.io/display-name", "redis"), ("kuma.io/env", "universal"),
                ("kuma.io/mesh", "default"), ("kuma.io/origin", "zone"),
                ("kuma.io/zone", "west")),
        ports=(KumaPort(6379, None, 6379, "tcp"),), vips=("241.0.0.1",),
        addresses=(KumaAddress("redis.svc.mesh.local", "HostnameGenerator",
                               "local-universal-mesh-service"),))
    assert [(p.port, p.srv_name, p.transport) for p in web.ports] == [
        (8080, "_http._tcp", "tcp"), (5353, "_dns._udp", "udp")]


def test_typed_kubernetes_lists_and_empty_lists() -> None:
    doc = {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshServiceList", "items": [
        {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshService",
         "metadata": {"name": "a", "namespace": "b"}, "spec": {}}]}
    [svc] = parse_kuma(doc)
    assert (svc.name, svc.namespace, svc.mesh, svc.ports) == ("a", "b", "default", ())
    assert parse_kuma({"apiVersion": "v1", "kind": "List", "items": []}) == []
    assert parse_kuma({"items": [], "next": None, "total": 0}) == []
    assert load_kuma("") == []
    assert load_kuma("---\n---\n") == []


def test_json_is_read_too() -> None:
    # `kubectl get meshservices -o json`: one JSON document, read by the JSON reader.
    doc = yaml.safe_load((DATA / "list-kubectl.yaml").read_text())
    assert load_kuma(json.dumps(doc, indent=2)) == load("list-kubectl.yaml")
    assert load_kuma(json.dumps(doc).encode()) == load("list-kubectl.yaml")
    # A YAML flow mapping looks like JSON and is not: read as YAML.
    assert load_kuma("{type: MeshService, name: a, mesh: m}")[0].key == (
        "MeshService", "m", "", "", "a")
    err = refused('{"type": "MeshService", "name": "a", "spec": {"ports": '
                  '[{"port": 1, "port": 2}]}}')
    assert (err.field, err.message) == ("documents[0].spec.ports[0].port", "duplicate key")
    err = refused("[" * 100000 + "]" * 100000)  # too deep for json and for the YAML loader
    assert err.field == "documents[0]" and "nesting depth" in err.message


def test_both_forms_of_one_resource_are_one_value() -> None:
    kube = load_kuma("""
apiVersion: kuma.io/v1alpha1
kind: MeshService
metadata: {name: redis, namespace: kuma-demo, labels: {kuma.io/mesh: prod}}
spec: {ports: [{port: 6379, name: redis}]}
status: {vips: [{ip: 241.0.0.9}]}
""")
    universal = load_kuma("""
type: MeshService
name: redis.kuma-demo
mesh: prod
labels: {kuma.io/mesh: prod, kuma.io/display-name: redis, k8s.kuma.io/namespace: kuma-demo}
spec: {ports: [{port: 6379, name: redis}]}
status: {vips: [{ip: 241.0.0.9}]}
""")
    assert kube[0].key == universal[0].key == ("MeshService", "prod", "", "kuma-demo", "redis")
    assert kube[0].to_json() | {"labels": None} == universal[0].to_json() | {"labels": None}


def test_looks_like_kuma() -> None:
    for doc in (yaml.safe_load((DATA / name).read_text()) for name in (
            "meshservice-kubernetes.yaml", "meshservice-universal.yaml",
            "list-kubectl.yaml", "list-kumactl.yaml")):
        assert looks_like_kuma(doc)
    assert not looks_like_kuma({"services": [{"name": "a", "namespace": "b", "port": 1}]})
    assert not looks_like_kuma([{"name": "a", "namespace": "b", "port": 1}])
    assert not looks_like_kuma({"upsert": [], "delete": []})


# ---------------------------------------------------------------- what is not used


UNKNOWN = {"x-unknown": {"deep": [1, 2, {"and": "deeper"}]}, "annotations": {"a": "b"}}


def test_fields_meshdns_does_not_use_are_dropped_without_error() -> None:
    doc = yaml.safe_load((DATA / "meshservice-kubernetes.yaml").read_text())
    plain = parse_kuma(doc)
    doc.update(UNKNOWN)
    doc["metadata"].update(UNKNOWN, managedFields=[{"manager": "kubectl"}], generation=7)
    doc["spec"].update(UNKNOWN, identities=[{"type": "SpiffeID", "value": "spiffe://x"}])
    doc["spec"]["ports"][0].update(UNKNOWN)
    doc["status"].update(UNKNOWN, hostnameGenerators=[{"conditions": []}])
    doc["status"]["vips"][0].update(UNKNOWN)
    doc["status"]["addresses"][0].update(UNKNOWN)
    assert parse_kuma(doc) == plain


# ---------------------------------------------------------------- refusals


def test_a_document_of_another_kind_is_refused_naming_it_and_its_place() -> None:
    text = (DATA / "stream.yaml").read_text() + "\n---\napiVersion: kuma.io/v1alpha1\n" \
        "kind: MeshTimeout\nmetadata: {name: t}\n"
    err = refused(text)
    assert (err.status, err.field, err.document) == (400, "documents[5].kind", 5)
    assert "'MeshTimeout'" in err.message and "MeshService" in err.message
    assert isinstance(err, RegistryError)  # the API answers it as any registry 400

    err = refused("type: Mesh\nname: default\n")
    assert err.field == "documents[0].type" and "'Mesh'" in err.message
    err = refused("items:\n- {type: MeshService, name: a, mesh: m}\n"
                  "- {type: Dataplane, name: dp, mesh: m}\n")
    assert err.field == "documents[0].items[1].type" and "'Dataplane'" in err.message
    err = refused("apiVersion: v1\nkind: Service\nmetadata: {name: redis}\n")
    assert err.field == "documents[0].kind" and "'Service'" in err.message
    err = refused("apiVersion: kuma.io/v1\nkind: MeshService\nmetadata: {name: redis}\n")
    assert err.field == "documents[0].apiVersion" and "kuma.io/v1alpha1" in err.message
    err = refused("name: redis\nports: [80]\n")
    assert err.field == "documents[0]" and "type (Universal)" in err.message
    err = refused("- a\n- b\n")
    assert err.field == "documents[0]"
    err = refused("kind: List\nitems:\n- kind: List\n  items: []\n")
    assert err.field == "documents[0].items[0]" and "list inside a list" in err.message


@pytest.mark.parametrize(("patch", "field", "words"), [
    ({"spec": {"ports": [{"port": 0}]}}, "spec.ports[0].port", ["1..65535", "got 0"]),
    ({"spec": {"ports": [{"port": "80"}]}}, "spec.ports[0].port", ["got '80'"]),
    ({"spec": {"ports": [{"port": True}]}}, "spec.ports[0].port", ["got True"]),
    ({"spec": {"ports": [{"port": 80, "name": "HTTP"}]}}, "spec.ports[0].name", ["RFC 1123"]),
    ({"spec": {"ports": [{"port": 80, "name": ""}]}}, "spec.ports[0].name", ["RFC 1123"]),
    ({"spec": {"ports": [{"port": 80, "targetPort": 0}]}}, "spec.ports[0].targetPort", []),
    ({"spec": {"ports": [{"port": 80, "appProtocol": "h t t p"}]}},
     "spec.ports[0].appProtocol", ["protocol name"]),
    ({"spec": {"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}},
     "spec.ports[1].name", ["twice", "spec.ports[0]"]),
    ({"spec": {"ports": [{"port": 80}, {"port": 80, "appProtocol": "tcp"}]}},
     "spec.ports[1].port", ["80/tcp", "twice"]),
    ({"spec": {"ports": "80"}}, "spec.ports", ["list"]),
    ({"spec": {"ports": ["80"]}}, "spec.ports[0]", ["object"]),
    ({"status": {"vips": [{"ip": "10.0.0.300"}]}}, "status.vips[0].ip", ["IPv4 or IPv6"]),
    ({"status": {"vips": [{"ip": "fe80::1%eth0"}]}}, "status.vips[0].ip", []),
    ({"status": {"vips": [{}]}}, "status.vips[0].ip", []),
    ({"status": {"addresses": [{"hostname": "bad host"}]}}, "status.addresses[0].hostname",
     ["fully qualified"]),
    ({"status": {"addresses": [{"hostname": "a.b", "hostnameGeneratorRef": {"coreName": 7}}]}},
     "status.addresses[0].hostnameGeneratorRef.coreName", []),
    ({"metadata": {"name": "Redis"}}, "metadata.name", ["RFC 1123"]),
    ({"metadata": {"name": None}}, "metadata.name", ["required"]),
    ({"metadata": {"namespace": "Kuma_Demo"}}, "metadata.namespace", ["RFC 1123"]),
    ({"metadata": {"labels": {"kuma.io/mesh": "Prod"}}}, "metadata.labels.kuma.io/mesh",
     ["RFC 1123"]),
    ({"metadata": {"labels": {"kuma.io/zone": "-east"}}}, "metadata.labels.kuma.io/zone", []),
    ({"metadata": {"labels": {"kuma.io/display-name": "a.b"}}},
     "metadata.labels.kuma.io/display-name", []),
    ({"metadata": {"labels": {"bad key!": "x"}}}, "metadata.labels.bad key!", ["label key"]),
    ({"metadata": {"labels": {"team": "a b"}}}, "metadata.labels.team", ["label value"]),
    ({"metadata": {"labels": {"team": 7}}}, "metadata.labels.team", ["label value"]),
    ({"metadata": "redis"}, "metadata", ["object"]),
])
def test_a_bad_field_is_refused_with_its_path(patch: dict[str, Any], field: str,
                                              words: list[str]) -> None:
    doc: dict[str, Any] = {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshService",
                           "metadata": {"name": "redis", "namespace": "kuma-demo"},
                           "spec": {"ports": [{"port": 6379}]}}
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = doc[key] | value
        else:
            doc[key] = value
    with pytest.raises(KumaDocumentError) as info:
        parse_kuma_documents([None, doc])
    err = info.value
    assert err.field == f"documents[1].{field}", err
    assert err.message.startswith("MeshService "), err.message
    for word in words:
        assert word in err.message, err.message
    assert len(err.message) < 300


def test_universal_mesh_and_its_label_must_agree() -> None:
    err = refused("type: MeshService\nname: a\nmesh: one\nlabels: {kuma.io/mesh: two}\n")
    assert err.field == "documents[0].labels.kuma.io/mesh" and "'two'" in err.message


def test_an_external_service_needs_its_match() -> None:
    err = refused("type: MeshExternalService\nname: a\nmesh: m\nspec: {endpoints: []}\n")
    assert err.field == "documents[0].spec.match" and "required" in err.message
    err = refused("type: MeshExternalService\nname: a\nmesh: m\nspec: {match: {port: 70000}}\n")
    assert err.field == "documents[0].spec.match.port"


def test_the_same_resource_twice_is_refused_naming_both_places() -> None:
    one = (DATA / "meshservice-universal.yaml").read_text()
    err = refused(f"{one}\n---\n{one}")
    assert err.field == "documents[1]"
    assert "MeshService backend (default) is given twice (also at documents[0])" in err.message


def test_duplicate_keys_are_refused_with_their_path() -> None:
    err = refused("type: MeshService\nname: a\nmesh: m\n---\n"
                  "type: MeshService\nname: b\nmesh: m\nspec:\n  ports:\n"
                  "  - port: 80\n    port: 81\n")
    assert err.field == "documents[1].spec.ports[0].port"
    assert err.message == "duplicate key (lines 10 and 11)"
    err = refused("type: MeshService\ntype: MeshService\nname: a\n")
    assert err.field == "documents[0].type"


def test_malformed_yaml_names_the_document() -> None:
    err = refused("type: MeshService\nname: a\n---\ntype: [unclosed\n")
    assert err.field == "documents[1]" and err.message.startswith("malformed YAML")


# ---------------------------------------------------------------- hostile input


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    rows = ["spec:", "  ports:", "  - port: 80", "    x: &l0 [a, a, a, a, a, a, a, a, a]"]
    rows += [f"    x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    err = refused("type: MeshService\nname: a\nmesh: m\n" + "\n".join(rows) + "\n")
    assert err.field == "documents[0]" and "aliases are not allowed" in err.message


def test_deep_nesting_is_refused() -> None:
    err = refused("type: MeshService\nname: a\nspec: " + "[" * 200 + "]" * 200 + "\n")
    assert err.field == "documents[0]" and "deeper than" in err.message


@pytest.mark.parametrize(("where", "count", "field", "limit"), [
    ("ports", kuma.MAX_PORTS_PER_SERVICE + 1, "spec.ports", kuma.MAX_PORTS_PER_SERVICE),
    ("vips", kuma.MAX_VIPS + 1, "status.vips", kuma.MAX_VIPS),
    ("addresses", 257, "status.addresses", 256),
    ("labels", 65, "labels", 64),
])
def test_counts_are_bounded(where: str, count: int, field: str, limit: int) -> None:
    doc: dict[str, Any] = {"type": "MeshService", "name": "a", "mesh": "m", "spec": {},
                           "status": {}}
    if where == "ports":
        doc["spec"]["ports"] = [{"port": 1 + i} for i in range(count)]
    elif where == "vips":
        doc["status"]["vips"] = [{"ip": f"10.0.0.{i}"} for i in range(count)]
    elif where == "addresses":
        doc["status"]["addresses"] = [{"hostname": f"h{i}.mesh"} for i in range(count)]
    else:
        doc["labels"] = {f"k{i}": "v" for i in range(count)}
    with pytest.raises(KumaDocumentError) as info:
        parse_kuma(doc)
    assert info.value.field == f"documents[0].{field}"
    assert f"at most {limit}" in info.value.message


def test_a_huge_value_is_quoted_short() -> None:
    huge = "x" * (1 << 20)
    for doc in ({"type": "MeshService", "name": huge, "mesh": "m"},
                {"type": huge, "name": "a"},
                {"type": "MeshService", "name": "a", "spec": {"ports": [{"port": huge}]}},
                {"type": "MeshService", "name": "a", "labels": {huge: "v"}},
                {"type": "MeshService", "name": "a", "status": {"vips": [{"ip": huge}]}}):
        with pytest.raises(KumaDocumentError) as info:
            parse_kuma(doc)
        assert len(info.value.message) < 300 and len(info.value.field or "") < 200
    with pytest.raises(KumaDocumentError) as info:
        parse_kuma({"type": "MeshService", "name": "a", "spec": {"ports": [{"port": 10**5000}]}})
    assert "bits" in info.value.message


def test_resources_per_stream_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kuma, "MAX_RESOURCES", 10)
    assert len(load_kuma("---\n" * 4 + "type: MeshService\nname: a\nmesh: m\n")) == 1
    err = refused("---\n" * 20)
    assert "at most 10 resources" in err.message and err.field == "documents[10]"
    items = [{"type": "MeshService", "name": f"s{i}", "mesh": "m"} for i in range(20)]
    with pytest.raises(KumaDocumentError) as info:
        parse_kuma_documents([{"items": items}])
    assert info.value.field == "documents[0].items[9]"  # the list counts one


# ---------------------------------------------------------------- round trip

LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
PORT = st.builds(KumaPort, st.integers(1, 65535), st.none() | LABEL,
                 st.none() | st.integers(1, 65535) | LABEL,
                 st.sampled_from(["tcp", "http", "http2", "grpc", "udp"]))
IP = st.ip_addresses().map(str)
HOST = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
EXTRA_LABELS = st.dictionaries(st.from_regex(r"(example\.com/)?[a-z][a-z0-9]{0,8}",
                                             fullmatch=True), LABEL | st.just(""), max_size=4)


@st.composite
def services(draw: st.DrawFn) -> KumaService:
    kind = draw(st.sampled_from(kuma.KINDS))
    if kind == "MeshExternalService":
        ports = (draw(st.builds(KumaPort, st.integers(1, 65535),
                                app_protocol=st.sampled_from(["tcp", "http", "grpc"]))),)
        vips = tuple(draw(st.lists(IP, max_size=1)))
    else:
        raw = draw(st.lists(PORT, max_size=5, unique_by=lambda p: p.port))
        named = [p.name for p in raw if p.name is not None]
        if len(set(named)) < len(named):  # a port name is unique in a service
            raw = [KumaPort(p.port, None, p.target_port, p.app_protocol) for p in raw]
        if kind == "MeshMultiZoneService":
            raw = [KumaPort(p.port, p.name, None, p.app_protocol) for p in raw]
        ports = tuple(raw)
        vips = tuple(draw(st.lists(IP, max_size=3)))
    vips = tuple(dict.fromkeys(str(ipaddress.ip_address(v)) for v in vips))  # normalized
    labels = draw(EXTRA_LABELS)
    mesh = draw(LABEL)
    labels["kuma.io/mesh"] = mesh
    for key in ("kuma.io/zone", "k8s.kuma.io/namespace", "kuma.io/display-name"):
        if draw(st.booleans()):
            labels[key] = draw(LABEL)
    name = labels.get("kuma.io/display-name") or draw(LABEL)
    labels.setdefault("kuma.io/display-name", name)
    addresses = tuple({h: KumaAddress(h, draw(st.none() | st.just("HostnameGenerator")),
                                      draw(st.none() | LABEL))
                       for h in draw(st.lists(HOST, max_size=3))}.values())
    return KumaService(kind, name, mesh, labels.get("kuma.io/zone"),
                       labels.get("k8s.kuma.io/namespace"), tuple(sorted(labels.items())),
                       ports, vips, addresses)


def spec_and_status(svc: KumaService) -> tuple[dict[str, Any], dict[str, Any]]:
    def port(p: KumaPort) -> dict[str, Any]:
        out: dict[str, Any] = {"port": p.port, "appProtocol": p.app_protocol}
        if p.name is not None:
            out["name"] = p.name
        if p.target_port is not None:
            out["targetPort"] = p.target_port
        return out
    status: dict[str, Any] = {"addresses": [
        {"hostname": a.hostname} | ({"origin": a.origin} if a.origin else {})
        | ({"hostnameGeneratorRef": {"coreName": a.generator}} if a.generator else {})
        for a in svc.addresses]}
    if svc.kind == "MeshExternalService":
        [p] = svc.ports
        spec: dict[str, Any] = {"match": {"type": "HostnameGenerator", "port": p.port,
                                          "protocol": p.app_protocol}}
        if svc.vips:
            status["vip"] = {"ip": svc.vips[0]}
    else:
        spec = {"ports": [port(p) for p in svc.ports]}
        status["vips"] = [{"ip": v} for v in svc.vips]
    return spec, status


def kubernetes_doc(svc: KumaService) -> dict[str, Any]:
    spec, status = spec_and_status(svc)
    return {"apiVersion": "kuma.io/v1alpha1", "kind": svc.kind,
            "metadata": {"name": svc.name + "-x1", "namespace": "kuma-system",
                         "labels": dict(svc.labels)}, "spec": spec, "status": status}


def universal_doc(svc: KumaService) -> dict[str, Any]:
    spec, status = spec_and_status(svc)
    return {"type": svc.kind, "name": f"{svc.name}.kuma-system", "mesh": svc.mesh,
            "labels": dict(svc.labels), "spec": spec, "status": status}


@settings(max_examples=60, deadline=None)
@given(st.lists(services(), max_size=4, unique_by=lambda s: s.key),
       st.sampled_from(["stream", "kubectl", "kumactl", "json"]))
def test_round_trip(svcs: list[KumaService], shape: str) -> None:
    # A namespace label wins over metadata.namespace: without one, the Kubernetes form
    # puts the service in metadata.namespace ("kuma-system").
    def expected(s: KumaService) -> KumaService:
        if shape in ("kubectl", "json") and s.namespace is None:
            return KumaService(s.kind, s.name, s.mesh, s.zone, "kuma-system", s.labels,
                               s.ports, s.vips, s.addresses)
        return s
    if shape == "stream":
        text = "---\n".join(yaml.safe_dump(d) for d in map(universal_doc, svcs))
    elif shape == "kumactl":
        text = yaml.safe_dump({"items": [universal_doc(s) for s in svcs], "next": None,
                               "total": len(svcs)})
    else:
        doc = {"apiVersion": "v1", "kind": "List", "items": [kubernetes_doc(s) for s in svcs]}
        text = json.dumps(doc) if shape == "json" else yaml.safe_dump(doc)
    assert load_kuma(text) == [expected(s) for s in svcs]


# ---------------------------------------------------------------- the design page

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "meshservice.md"


def test_the_design_pages_example_record_is_what_the_reader_makes() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    record = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    synced = load("list-kubectl.yaml")[0].to_json()
    assert {k: v for k, v in record.items() if k != "labels"} == {
        k: v for k, v in synced.items() if k != "labels"}
    assert record["labels"].items() <= synced["labels"].items()


def test_the_ready_kuma_config_parses() -> None:
    from meshdns.core.registry import parse_template

    text = DESIGN.read_text(encoding="utf-8")
    block = text.split("### Kuma's default HostnameGenerators", 1)[1].split("```yaml\n", 1)[1]
    config = yaml.safe_load(block.split("```", 1)[0])
    templates = config["dns"]["hostname_templates"]
    assert len(templates) == 9
    for item in templates:
        assert set(item) <= {"template", "kinds", "matchLabels"}
        assert set(item["kinds"]) <= {"Service", *kuma.KINDS}
        assert all(isinstance(v, str) for v in item.get("matchLabels", {}).values())
        # {display_name} is the one placeholder the design adds.
        parse_template(item["template"].replace("{display_name}", "{name}"))
