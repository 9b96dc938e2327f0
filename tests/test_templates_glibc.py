"""glibc (getent) resolving Kuma's template names under ``.mesh.local`` through meshdns,
with a selector hiding another mesh; the private namespaces of tests/test_glibc.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .test_glibc import DRIVER, PROBE, lines, unshare_refusal

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
    reason = unshare_refusal()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so the glibc test must run, but {reason}")
        pytest.skip(reason)
    d: Path = tmp_path_factory.mktemp("glibc-templates")
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    (d / "nsswitch.conf").write_text(
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n")
    (d / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    (d / "upstream-resolv.conf").write_text("# no nameservers: meshdns forwards nothing\n")
    (d / "seed.yaml").write_text(yaml.safe_dump({"services": SERVICES}))
    (d / "meshdns.yaml").write_text(yaml.safe_dump({
        "dns": {"listen": ["127.0.0.1:53"], "upstreams": [], "domains": ["mesh", "mesh.local"],
                "hostname_templates": TEMPLATES,
                "select": {"matchLabels": {"mesh": "default"}},
                "resolv_conf": str(d / "upstream-resolv.conf")},
        "api": {"listen": "127.0.0.1:15080"},
        "registry": {"seed_file": str(d / "seed.yaml"), "cidr6": None},
        "log": {"level": "warning"},
    }))
    (d / "driver.sh").write_text(DRIVER)
    (d / "probe.py").write_text(PROBE)
    (d / "lookups.py").write_text(LOOKUPS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    env["PYTHON"] = sys.executable
    proc = subprocess.Popen(["unshare", "-n", "-m", "sh", str(d / "driver.sh"), str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, nothing else
        stdout, stderr = proc.communicate()
        pytest.fail(f"the namespace driver timed out\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"driver exited {proc.returncode}\n{stdout}\n{stderr}"
    out: dict[str, dict[str, object]] = json.loads((d / "results.json").read_text())
    return out


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
