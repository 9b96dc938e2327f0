"""VIP allocation for a rebuilt snapshot, per address family.

1. explicit (given, must be unique); 2. kept (an identity keeps its address while
it is in range); 3. re-used from hold (a deleted identity coming back); 4. new,
the first free address after the highest one in use, skipping taken and held
ones. Addresses no longer used are held for ``hold_seconds``: a held entry is
kept while its release time is after the write's ``now``, and never made when
it would not be (hold 0).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

from ._service import (
    EntryKey,
    EntrySpec,
    MeshServiceSpec,
    RegistryError,
    describe,
)
from ._snapshot import FamilyIndex, Registry
from ._vip import VipRange, count_in, format_ip

# A bulk C-level call (dict.update, Counter over a map) holds the GIL until it
# returns: ~50-150 ms for 100k items on a busy host. Writes are built in a worker
# thread while the event loop answers DNS; in steps of this many items the
# interpreter can hand the GIL to the DNS thread in between.
BULK_STEP = 4096


def _field(path: str, index: int, name: str) -> str | None:
    return f"{path}[{index}].{name}" if index >= 0 else None


_AssignResult = tuple[dict[EntryKey, int], dict[int, EntryKey],
                      dict[int, tuple[float, EntryKey]], FamilyIndex]


def assign_vips(family: int, reg: Registry, specs: Mapping[EntryKey, EntrySpec],
            stored_first: Iterable[tuple[EntryKey, EntrySpec]],
            where: Mapping[EntryKey, int], rng: VipRange | None, hold_seconds: float,
            now: float, path: str, mesh: bool = False) -> _AssignResult:
    """VIPs of one family: the ones chosen here (a given VIP is not repeated: it is its
    spec's own), the VIP -> service index, and what is held afterwards."""
    v4 = family == 4
    attr = "vip" if v4 else "vip6"
    old_by_vip = reg.by_vip4 if v4 else reg.by_vip6
    old_held = reg.held4 if v4 else reg.held6
    first, last = (rng.first, rng.last) if rng is not None else (1, 0)

    # 1. Explicit VIPs: the control plane is authoritative, but they must be unique.
    # (Two parallel lists rather than pairs: 100k fewer objects for the collector.)
    if v4:
        given_keys = [key for key, spec in stored_first if spec.vip is not None]
        given = [vip for _, spec in stored_first if (vip := spec.vip) is not None]
    else:
        given_keys = [key for key, spec in stored_first if spec.vip6 is not None]
        given = [vip for _, spec in stored_first if (vip := spec.vip6) is not None]
    by_vip: dict[int, EntryKey] = dict(zip(given, given_keys, strict=True))
    if len(by_vip) < len(given):  # an address given twice: name the second claimant
        by_vip = {}
        for key, vip in zip(given_keys, given, strict=True):
            other = by_vip.setdefault(vip, key)
            if other is not key:
                raise RegistryError(409, f"{attr} {format_ip(vip, family)} is given to both "
                                    f"{describe(other)} and {describe(key)}",
                                    _field(path, where.get(key, -1), attr))
    # The VIPs chosen here (kept, held back, new): a given one is its spec's own.
    assigned: dict[EntryKey, int] = {}
    in_range = count_in(by_vip, first, last)
    # 2. Kept VIPs: an identity keeps its address while it exists and it is in range.
    pending: list[EntryKey] = []
    if rng is not None and len(given) < len(specs):
        if not given:
            unassigned = list(specs)
        elif v4:
            unassigned = [key for key, spec in specs.items() if spec.vip is None]
        else:
            unassigned = [key for key, spec in specs.items() if spec.vip6 is None]
        if mesh:  # a mesh service with a VIP of the other family given gets none of this one
            unassigned = [key for key in unassigned if not (
                (spec := specs[key]).__class__ is MeshServiceSpec
                and not spec.allocates)]
        if not old_by_vip:  # a first load: nothing to keep
            pending = unassigned
        else:
            old_vip: dict[EntryKey, int] = {key: vip for vip, key in old_by_vip.items()}
            for key in unassigned:
                kept = old_vip.get(key)
                if kept is not None and first <= kept <= last:
                    other = by_vip.setdefault(kept, key)
                    if other is not key:
                        raise RegistryError(409, f"{attr} {format_ip(kept, family)} belongs "
                                            f"to {describe(key)}",
                                            _field(path, where.get(other, -1), attr)
                                            or _field(path, where.get(key, -1), attr))
                    assigned[key] = kept
                    in_range += 1
                else:
                    pending.append(key)
    held: dict[int, tuple[float, EntryKey]] = {
        v: h for v, h in old_held.items() if h[0] > now and v not in by_vip}
    if pending:
        assert rng is not None
        # 3. A recently deleted identity coming back gets its held address again.
        held_by_key: dict[EntryKey, int] = {owner: v for v, (_, owner) in held.items()}
        fresh: list[EntryKey] = [] if held_by_key else pending
        for key in pending if held_by_key else ():
            back = held_by_key.get(key)
            if back is not None and first <= back <= last:
                by_vip[back] = key
                assigned[key] = back
                del held[back]
                in_range += 1
            else:
                fresh.append(key)
        # 4. New addresses, skipping taken and held ones, continuing after the last allocated.
        # An address this write frees is held from newcomers already, in this very write
        # (SPEC §3), so it counts as unavailable too.
        if fresh:
            freed = {v: (0.0, k) for v, k in old_by_vip.items() if v not in by_vip}
            blocked = {**held, **freed} if freed else held
            busy = in_range + count_in(blocked, first, last)
            if rng.size - busy < len(fresh):
                raise _exhausted(family, rng, len(fresh), busy)
            cursor = top_of(old_by_vip, first, last) + 1
            start = cursor if first <= cursor <= last else first
            end = start + len(fresh) - 1
            vips: Sequence[int] | None
            if end <= last and not any(start <= v <= end for v in by_vip) \
                    and not any(start <= v <= end for v in blocked):
                vips = range(start, end + 1)  # a free run after the last one: the usual case
            else:
                vips = rng.allocate_many(cursor, len(fresh), by_vip, blocked)
            if vips is None:  # pragma: no cover - guarded by the count above
                raise RegistryError(507, f"IPv{family} VIP range {rng.network} is exhausted")
            for lo in range(0, len(fresh), BULK_STEP):  # see BULK_STEP
                keys, addrs = fresh[lo:lo + BULK_STEP], vips[lo:lo + BULK_STEP]
                by_vip.update(zip(addrs, keys, strict=True))
                assigned.update(zip(keys, addrs, strict=True))
            in_range += len(fresh)
    # Addresses no longer in use are held from newcomers, unless that hold is over
    # already (hold_seconds 0, as on a follower): an entry per deleted service kept
    # until the next write would keep its key alive too (300k: ~100 MiB).
    release = now + hold_seconds
    if release > now:
        for vip, key in old_by_vip.items():
            if vip not in by_vip:
                held[vip] = (release, key)
    held_in_range = count_in(held, first, last)
    return assigned, by_vip, held, FamilyIndex(in_range, held_in_range, in_release_order(held))


def _exhausted(family: int, rng: VipRange, wanted: int, busy: int) -> RegistryError:
    return RegistryError(
        507, f"IPv{family} VIP range {rng.network} is exhausted: {wanted} new "
        f"services need an address, {max(rng.size - busy, 0)} free", None)


def top_of(by_vip: Collection[int], first: int, last: int) -> int:
    """The highest address in use inside ``first..last``; ``first - 1`` if none."""
    top = max(by_vip, default=None)
    if top is None:
        return first - 1
    if first <= top <= last:
        return top
    return max((v for v in by_vip if first <= v <= last), default=first - 1)


def in_release_order(held: Mapping[int, tuple[float, object]]) -> bool:
    prev = -math.inf
    for release, _ in held.values():
        if release < prev:
            return False
        prev = release
    return True
