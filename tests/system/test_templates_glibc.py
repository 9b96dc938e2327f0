"""glibc (getent) resolving Kuma's template names under ``.mesh.local`` through meshdns,
with a selector hiding another mesh; the private namespaces of tests/system/test_glibc.py."""

from __future__ import annotations

import pytest

from .test_glibc import lines, run_glibc_driver

SERVICES = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "mesh": "default", "zone": "east"},
    {"name": "billing", "namespace": "pay", "port": 443, "vip": "240.0.0.9", "mesh": "other",
     "zone": "east"},
]
TEMPLATES = ["{name}.{namespace}.svc.{port}.{domain}", "{name}_{namespace}_svc_{port}.{domain}",
             "{name}.{namespace}.svc.{zone}.mesh.local", "{name}.svc.mesh.local",
             "{name}.extsvc.mesh.local"]

LOOKUPS = r"""
import json, subprocess
out = {}
for label, name in [
    ("zone-form", "frontend.kong.svc.east.mesh.local"),
    ("svc-form", "frontend.svc.mesh.local"),
    ("extsvc-form", "Frontend.ExtSvc.Mesh.Local"),
    ("canonical-local", "frontend.kong.svc.80.mesh.local"),
    ("hidden", "billing.svc.mesh.local"),
    ("hidden-canonical", "billing.pay.svc.443.mesh"),
]:
    p = subprocess.run(["getent", "ahostsv4", name], capture_output=True, text=True,
                       timeout=20)
    out[label] = {"rc": p.returncode, "out": p.stdout}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return run_glibc_driver(tmp_path_factory.mktemp("glibc-templates"), SERVICES, {
        "domains": ["mesh", "mesh.local"], "hostname_templates": TEMPLATES,
        "select": {"matchLabels": {"mesh": "default"}}}, LOOKUPS)


@pytest.mark.parametrize("label,name", [
    ("zone-form", "frontend.kong.svc.east.mesh.local"),
    ("svc-form", "frontend.svc.mesh.local"),
    ("extsvc-form", "Frontend.ExtSvc.Mesh.Local"),
    ("canonical-local", "frontend.kong.svc.80.mesh.local"),
])
def test_getent_resolves_kuma_template_names(results: dict[str, dict[str, object]],
                                             label: str, name: str) -> None:
    rows = lines(results[label])
    assert {r[0] for r in rows} == {"240.0.0.7"}, rows
    assert rows[0] == ["240.0.0.7", "STREAM", name]


def test_getent_does_not_find_another_meshs_names(
        results: dict[str, dict[str, object]]) -> None:
    for label in ("hidden", "hidden-canonical"):
        assert results[label] == {"rc": 2, "out": ""}, results[label]  # 2: not found
