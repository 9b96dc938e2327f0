"""The state file's snapshot and the seed file: what a registry is saved as and read from."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.registry import (
    EntryKey,
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceSpec,
    key_of_list,
    key_of_record,
    parse_entries,
    parse_ip,
    parse_services,
    restore,
)
from ..gcpause import gc_paused
from ..jsonsteps import dumps_in_steps
from ..yamlload import DuplicateKey
from .journal import journal_path, replay_journal
from .records import STATE_FORMAT, StateError, fast_ip4, fast_ip6, fsync_dir, service_record

log = logging.getLogger("meshdns.registry")


def load_seed(path: str) -> list[ServiceSpec]:
    from ..configfile import load_document  # the one document reader

    try:
        doc = load_document(path)
    except DuplicateKey as exc:  # "services[0].name: duplicate key (lines 3 and 5)"
        raise StateError(f"seed file {path}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"seed file {path}: cannot be read: {exc}") from None
    if isinstance(doc, dict):
        doc = doc.get("services", [])
    try:
        return parse_services(doc, consume=True)
    except RegistryError as exc:
        raise StateError(f"seed file {path}: {exc.field}: {exc.message}") from None


def state_document(reg: Registry, mirror: bool = False,
                   lineage: str | None = None) -> dict[str, Any]:
    services = [service_record(s) for s in reg.entries()]

    def held(table: Any, fmt: Callable[[int], str]) -> list[list[Any]]:
        return [[fmt(v), t, list(k)] for v, (t, k) in table.items()]

    doc: dict[str, Any] = {"format": STATE_FORMAT, "revision": reg.revision,
                           "services": services,
                           "held": {"ipv4": held(reg.held4, fast_ip4), "ipv6": held(reg.held6, fast_ip6)}}
    if mirror:
        doc["mirror"] = True
    if lineage is not None:
        # The lineage of the process that wrote it (a journal line names its own, and
        # replay keeps the last): a restarted leader continues it.
        doc["lineage"] = lineage
    return doc


class SnapshotNotDurable(OSError):
    """The new snapshot was renamed into place but its directory could not be fsynced."""


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def write_state(path: Path, reg: Registry, mirror: bool = False,
                lineage: str | None = None) -> None:
    """Durably replace ``path``: a crash leaves either the old or the new file, whole.

    Temp file in the same directory, fsync it, rename over the old one (atomic
    on POSIX), then fsync the directory so the rename itself survives a power cut.
    """
    with gc_paused():  # 100k short-lived dicts: nothing for the collector to find
        data = dumps_in_steps(state_document(reg, mirror, lineage)).encode()
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:  # start-up removes it; the write's own error matters more
            log.warning("could not remove %s after a failed state write (%s)", tmp, exc)
        raise
    try:
        fsync_dir(path)
    except OSError as exc:
        raise SnapshotNotDurable(exc.errno, exc.strerror) from exc


def remove_stale_temp_files(path: Path) -> None:
    """Temp files a crash left behind mid-write: never read, so just litter."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        for stale in directory.glob(_temp_prefix(path) + "*.tmp"):
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted state write", stale)
    except OSError:
        pass  # an unreadable directory shows up, clearly, when the state file is read


def _allocated(path: Path, item: dict[str, Any], field: str, version: int) -> int:
    """An address this server allocated and saved: it must read back as one. Were it
    re-allocated instead, the service would silently move to a new VIP."""
    value = item.get(field)
    vip = parse_ip(value, version) if isinstance(value, str) else None
    if vip is None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise StateError(
            f"state file {path} is corrupt: service {item.get('name')!r} namespace "
            f"{item.get('namespace')!r} port {item.get('port')!r}: field {field} must be an "
            f"IPv{version} address, got {shown}; refusing to start with an empty registry: "
            "fix or remove it")
    return vip


def read_state(path: Path, policy: RegistryPolicy, now: float) -> Registry:
    return read_state_file(path, policy, now)[0]


def read_state_file(path: Path, policy: RegistryPolicy, now: float,
                    meta: dict[str, Any] | None = None) -> tuple[Registry, bool]:
    """The saved registry and whether it is a follower's mirror, or StateError.

    Anything unexpected stops start-up: serving an empty (or partial) registry
    after a restart would silently take every mesh name away, and overwriting
    the file would destroy the operator's chance to recover it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StateError(f"state file {path} cannot be read ({exc.strerror}); refusing to "
                         "start with an empty registry: fix or remove it") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        what = "is empty" if not data.strip() else f"is truncated or corrupt ({exc})"
        raise StateError(f"state file {path} {what}; refusing to start with an empty "
                         "registry: fix or remove it") from None
    try:
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown format, expected {{\"format\": {STATE_FORMAT}, ...}}")
        revision = doc["revision"]
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise ValueError("bad revision")
        mirror = doc.get("mirror", False) is True
        if mirror:
            # A follower's copy: every VIP is the leader's, nothing is allocated here.
            policy = replace(policy, range6=None)
        if not isinstance(doc["services"], list):
            raise ValueError("services is not a list")
        revision = replay_journal(doc, journal_path(path))
        if meta is not None and isinstance(doc.get("lineage"), str):
            meta["lineage"] = doc["lineage"]  # who made the last revision (state_document)
        raw = doc["services"]
        allocated: dict[EntryKey, tuple[int | None, int | None]] = {}
        plain = []
        for item in raw:
            mesh = "ports" in item  # a mesh service's record (docs/meshservice.md section 7)
            entry = {k: item.get(k) for k in (
                ("name", "ports", "hostnames") if mesh else ("name", "namespace", "port",
                                                              "hostnames"))}
            for k in ("labels", "mesh", "zone", "kind", "namespace", "endpoints") if mesh else (
                    "labels", "mesh", "zone"):  # only in the records that have them
                if k in item:
                    entry[k] = item[k]
            entry["vip"] = item["vip"] if item.get("vip_given") else None
            entry["vip6"] = item.get("vip6") if item.get("vip6_given") else None
            plain.append(entry)
            v4 = None if item.get("vip_given") or (mesh and item.get("vip") is None) \
                else _allocated(path, item, "vip", 4)
            v6 = None if item.get("vip6_given") or item.get("vip6") is None \
                else _allocated(path, item, "vip6", 6)
            allocated[key_of_record(item)] = (v4, v6)
        raw.clear()  # the decoded rows: the peak of a 1M-service start-up is lower without
        specs = parse_entries(plain, consume=True)

        def held(rows: list[list[Any]], version: int) -> dict[int, tuple[float, Any]]:
            out: dict[int, tuple[float, Any]] = {}
            for ip, t, k in rows:
                vip = parse_ip(ip, version)
                if vip is None:
                    raise ValueError(f"bad held address {ip!r}")
                out[vip] = (float(t), key_of_list(k))
            return out

        held_doc = doc.get("held", {})
        reg = restore(revision, specs, allocated, policy,
                      held(held_doc.get("ipv4", []), 4), held(held_doc.get("ipv6", []), 6), now)
        return reg, mirror
    except RegistryError as exc:
        raise StateError(f"state file {path} does not fit the current config: "
                         f"{exc.field}: {exc.message}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise StateError(f"state file {path} is corrupt ({exc!r}); refusing to start with an "
                         "empty registry: fix or remove it") from None
