"""A persistent mapping for snapshot tables: a shared base dict plus a small layer.

An incremental PATCH changes a handful of entries of tables that hold every
service (100k entries: ~1 ms to copy and ~1 ms to free each). A
:class:`LayeredMap` shares the previous snapshot's big dict, never mutated,
and keeps only what was written since it was built (``top``) and which of its
keys were deleted (``gone``); an evolve copies those layers only, and folds
them into a fresh plain dict once they outgrow a bound, so the amortized cost
of a change stays O(1)-ish and lookups stay cheap.

It iterates exactly as a plain dict would after the same ``copy; del; set``
steps (``services`` order is the registry order: VIP allocation, JSON and the
state file follow it): the base keys in base order, minus the deleted ones,
with overwritten values in place; then the appended keys (new ones, and base
keys deleted and written again) in the order they were appended.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

_ABSENT: Any = object()  # not in ``top``: look in the base
_TOMB: Any = object()  # in ``top``: a base key deleted (and not written again)

# Layers fold into a fresh dict past max(MIN_LAYER, len(base) // LAYER_SHARE) entries:
# a fold costs a base copy (timeit: ~1.7 ms at 100k) once per that many changes (3,125
# at 100k), an evolve copies the layers (~4 ns an entry: 12 us for 3,000), and the old
# base is freed once no snapshot refers to it.
MIN_LAYER = 1024
LAYER_SHARE = 32


class LayeredMap(Mapping[K, V]):
    """``base`` (a dict never mutated) overlaid with ``top`` and ``gone``.

    ``top``: keys written since the base (overwrites in place, appended keys)
    and tombstones (``_TOMB``) of deleted base keys, so a lookup touches
    ``top`` and at most the base. ``gone``: base keys whose base position is
    dead (deleted; if written again they are appended, so in ``top``).
    Build one with :func:`evolve`; never mutate it.
    """

    __slots__ = ("_base", "_gone", "_len", "_top")

    def __init__(self, base: dict[K, V], top: dict[K, V], gone: AbstractSet[K],
                 length: int) -> None:
        self._base, self._top, self._gone, self._len = base, top, gone, length

    # Lookups, timeit on CPython 3.11, ServiceKey-like 3-tuple keys, 100k base (a dict's
    # get/[]/in ~45 ns): get/[]/in of a base key ~110/100/120 ns, of a key in
    # ``top`` ~80 ns, of a missing key ~100 ns.
    def __getitem__(self, key: K) -> V:
        v = self._top.get(key, _ABSENT)
        if v is _ABSENT:
            return self._base[key]
        if v is _TOMB:
            raise KeyError(key)
        return v  # type: ignore[no-any-return]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...

    def get(self, key: K, default: object = None, /) -> object:
        v = self._top.get(key, _ABSENT)
        if v is _ABSENT:
            return self._base.get(key, default)
        return default if v is _TOMB else v

    def __contains__(self, key: object) -> bool:
        v = self._top.get(key, _ABSENT)  # type: ignore[arg-type]
        if v is _ABSENT:
            return key in self._base
        return v is not _TOMB

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        base, top, gone = self._base, self._top, self._gone
        if gone:
            for key in base:
                if key not in gone:
                    yield key
        else:
            yield from base
        for key, value in top.items():
            if value is not _TOMB and (key in gone or key not in base):
                yield key

    def _items(self) -> Iterator[tuple[K, V]]:
        base, top, gone = self._base, self._top, self._gone
        for key, value in base.items():
            if key in top:
                if key in gone:
                    continue  # deleted (maybe appended again below)
                value = top[key]
            yield key, value
        for key, value in top.items():
            if value is not _TOMB and (key in gone or key not in base):
                yield key, value

    def keys(self) -> KeysView[K]:
        return _Keys(self)

    def items(self) -> ItemsView[K, V]:
        return _Items(self)

    def values(self) -> ValuesView[V]:
        return _Values(self)

    def __eq__(self, other: object) -> bool:
        # Mapping's own builds dict(self.items()) key by key; a fold is C-level steps.
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(other) != self._len:
            return False
        if isinstance(other, LayeredMap):
            other = _fold(other._base, other._top, other._gone)
        elif not isinstance(other, dict):
            other = dict(other.items())
        return _fold(self._base, self._top, self._gone) == other

    __hash__ = None  # type: ignore[assignment]  # as dict: equal by contents, mutable kin

    def __repr__(self) -> str:
        return f"LayeredMap({dict(self._items())!r})"


# Views iterating the layers in one pass (the Mapping mixins look every key up again).
class _Keys(KeysView[K]):
    __slots__ = ()
    _mapping: LayeredMap[K, Any]

    def __iter__(self) -> Iterator[K]:
        return iter(self._mapping)


class _Items(ItemsView[K, V]):
    __slots__ = ()
    _mapping: LayeredMap[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return self._mapping._items()


class _Values(ValuesView[V]):
    __slots__ = ()
    _mapping: LayeredMap[Any, V]

    def __iter__(self) -> Iterator[V]:
        for _, value in self._mapping._items():
            yield value


def evolve(table: Mapping[K, V], deleted: Iterable[K], written: Iterable[tuple[K, V]],
           min_layer: int | None = None, share: int | None = None) -> Mapping[K, V]:
    """``table`` after ``del`` of each of ``deleted`` (KeyError if absent), then
    setting each of ``written``, as a new mapping; ``table`` stays as it is.

    Copies only the layers of ``table`` (not its base), unless they outgrow
    ``max(min_layer, len(base) // share)`` (default: MIN_LAYER, LAYER_SHARE, read
    at each call): then the result is a fresh plain dict.
    """
    if isinstance(table, LayeredMap):
        base: dict[K, V] = table._base
        top = table._top.copy()
        gone = set(table._gone)
        length = table._len
    elif isinstance(table, dict):
        base, top, gone, length = table, {}, set(), len(table)
    else:
        base, top, gone, length = dict(table), {}, set(), len(table)
    for key in deleted:
        v = top.get(key, _ABSENT)
        if v is _ABSENT:
            if key not in base:
                raise KeyError(key)
            top[key] = _TOMB
            gone.add(key)
        elif v is _TOMB:
            raise KeyError(key)
        elif key in base:  # overwritten in place, or deleted and written again
            top[key] = _TOMB
            gone.add(key)
        else:
            del top[key]  # an appended key
        length -= 1
    for key, value in written:
        v = top.get(key, _ABSENT)
        if v is _TOMB:
            del top[key]  # written again after a delete: appended, as dict does
            length += 1
        elif v is _ABSENT and key not in base:
            length += 1
        top[key] = value
    if not top:
        return base
    bound = max(MIN_LAYER if min_layer is None else min_layer,
                len(base) // (LAYER_SHARE if share is None else share))
    if len(top) + len(gone) > bound:
        return _fold(base, top, gone)
    return LayeredMap(base, top, gone, length)  # the layers, like the base, stay as they are


def _fold(base: dict[K, V], top: dict[K, V], gone: Iterable[K]) -> dict[K, V]:
    """The layers folded into a fresh dict, in the same order: C-level bulk steps."""
    out = base.copy()
    for key in gone:
        del out[key]
    # Overwrites land in place, appended keys (not in ``out``) at the end in order.
    out.update((k, v) for k, v in top.items() if v is not _TOMB)
    return out
