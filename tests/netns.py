"""Private namespaces for the tests that need a network of their own.

- ``unshare -n -m`` around a whole driver script (the glibc tests): glibc's stub
  resolver only asks port 53 of the nameservers in /etc/resolv.conf, so those tests
  run ``getent`` in a loopback-only network where meshdns may bind 127.0.0.1:53, with
  private bind mounts over /etc/resolv.conf, nsswitch.conf and hosts.
- :class:`NetNamespace`: a network namespace the test process drives from outside
  (``nsenter --net``), linked to another by a veth pair (:func:`veth`), so meshdns
  can listen on a non-loopback address and see clients from several addresses, as a
  node's resolver does (tests/system/test_node_netns.py).

Nothing leaves such a namespace and nothing changes on the host. A test skips,
saying why, only when namespaces are not permitted here; with CI=true it fails
instead, so CI always runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


class NetNamespace:
    """A private network namespace of its own, held by one small process, that the test
    process stays out of: commands run in it with ``nsenter --net``.

    Made with ``unshare -n`` (no ``ip netns add``: nothing under /run/netns to forget).
    A namespace lives as long as a process is in it, so :meth:`close` (also on any
    failure, as a context manager) kills every process :meth:`popen` started in it and
    then the holder, and the namespace, its interfaces and addresses are gone. Should the
    test process itself be killed, the holder sees its stdin close and exits, and each
    process started in it has a parent-death signal (SIGKILL): nothing outlives it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def path(self) -> str:
        assert self.holder is not None, "not entered"
        return f"/proc/{self.holder.pid}/ns/net"

    def __enter__(self) -> NetNamespace:
        mine = os.readlink("/proc/self/ns/net")
        self.holder = subprocess.Popen(
            ["unshare", "-n", sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while True:  # until unshare has made the namespace and exec'd the holder
                with contextlib.suppress(OSError):
                    if os.readlink(self.path) != mine:
                        break
                if self.holder.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"unshare -n did not make namespace {self.name} "
                                       f"(exit {self.holder.poll()})")
                time.sleep(0.01)
            self.sh("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", *args]

    def run(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """``args`` run inside, to completion: its exit status and output."""
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def sh(self, *args: str) -> None:
        """``args`` run inside; a failure raises with what it said."""
        proc = self.run(*args)
        if proc.returncode != 0:
            raise RuntimeError(f"in namespace {self.name}: {' '.join(args)}: exit "
                               f"{proc.returncode}: {proc.stderr.strip()}")

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``args`` started inside (its own session); killed by :meth:`close`."""
        proc = subprocess.Popen(self.argv(*args), start_new_session=True,
                                preexec_fn=_die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()
        holder, self.holder = self.holder, None
        if holder is not None:
            with contextlib.suppress(OSError):
                assert holder.stdin is not None
                holder.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the test process dies (PR_SET_PDEATHSIG,
    kept across exec), so a killed test run leaves no process holding a namespace."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def veth(a: NetNamespace, a_name: str, b: NetNamespace, b_name: str) -> None:
    """A veth pair between two namespaces: ``a_name`` in ``a``, ``b_name`` in ``b``, both up."""
    assert b.holder is not None
    a.sh("ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name,
         "netns", str(b.holder.pid))
    a.sh("ip", "link", "set", a_name, "up")
    b.sh("ip", "link", "set", b_name, "up")
