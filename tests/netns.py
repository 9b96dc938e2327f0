"""Private network and mount namespaces (``unshare -n -m``) for the glibc tests.

glibc's stub resolver only asks port 53 of the nameservers in /etc/resolv.conf, so
the tests that run ``getent`` do it in their own namespaces: a loopback-only
network where meshdns may bind 127.0.0.1:53, and private bind mounts over
/etc/resolv.conf, nsswitch.conf and hosts. Nothing leaves such a namespace (it
has no interface but lo) and nothing changes on the host.

A test skips, saying why, only when namespaces are not permitted here; with
CI=true it fails instead, so CI always runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# The files glibc reads, as the tests bind-mount them (a test may pass its own).
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"


def unshare_refusal(*tools: str) -> str | None:
    """Why ``unshare -n -m`` (and ``tools``) cannot run here, or None when they can."""
    for tool in ("unshare", "ip", *tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True,
                               timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n -m true could not run: {exc}"
    if probe.returncode != 0:
        return f"unshare -n -m is not permitted here: {probe.stderr.strip()}"
    return None


def require_namespaces(*tools: str) -> None:
    """Skip (saying why) when namespaces or ``tools`` are not available; fail under CI."""
    reason = unshare_refusal(*tools)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, so this test must run, but {reason}")
    print(f"skipping: {reason}")
    pytest.skip(reason)


def run_in_namespaces(argv: Sequence[str], directory: Path,
                      timeout: float = 90.0) -> dict[str, Any]:
    """Run ``argv`` under ``unshare -n -m`` from the repository (no MESHDNS_ settings
    from the caller's environment); it writes ``directory/results.json``, returned.
    On a timeout its whole session is killed, and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(["unshare", "-n", "-m", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"inside the namespaces: timed out after {timeout:g} s\n{stdout}\n{stderr}")
    finally:
        # Whatever happened (an interrupt too): nothing it started outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(10)
    assert proc.returncode == 0, \
        f"inside the namespaces: exit {proc.returncode}\n{stdout}\n{stderr}"
    results: dict[str, Any] = json.loads((directory / "results.json").read_text())
    return results


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=20)


def enter_private_network(directory: Path, etc: Mapping[str, str]) -> None:
    """Inside the namespaces: bring lo up with an address for AI_ADDRCONFIG, and
    bind-mount each of ``etc`` (file name -> text, written to ``directory``) over /etc.

    getent ahosts* passes AI_ADDRCONFIG: glibc then wants an address other than
    127.0.0.1/::1 configured. A documentation address on lo is local to this
    namespace; nothing is ever sent anywhere.
    """
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", "192.0.2.1/32", "dev", "lo")
    for name, text in etc.items():
        (directory / name).write_text(text)
        sh("mount", "--bind", str(directory / name), f"/etc/{name}")
