"""core.jsonsteps: the stepwise encoder writes exactly what json.dumps writes (the state
file's bytes do not depend on which of the two encoded it)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from meshdns.jsonsteps import DUMP_STEP, dumps_in_steps, load_json_in_steps


def compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


@pytest.mark.parametrize("doc", [
    {}, [], {"a": []}, {"a": [1] * DUMP_STEP}, {"a": [1] * (DUMP_STEP + 1)},
    {"services": [{"name": f"s{i}", "vip": None, "ok": True, "w": 1.5, "é": "ü\n"}
                  for i in range(3 * DUMP_STEP + 7)],
     "held": {"ipv4": [["240.0.0.1", 5.0, ["a", "b", 80]]] * (2 * DUMP_STEP), "ipv6": []},
     "revision": 7},
    {1: "int key", "x": [{}] * (DUMP_STEP + 2)}, "text", 3, None,
])
def test_dumps_in_steps_is_json_dumps(doc: Any) -> None:
    assert dumps_in_steps(doc) == compact(doc)


def test_random_documents_round_trip() -> None:
    rng = random.Random(22)

    def value(depth: int) -> Any:
        kind = rng.randrange(6 if depth < 3 else 3)
        if kind == 0:
            return rng.randrange(-5, 5)
        if kind == 1:
            return rng.choice(["", "a", "ß", "\u2028", '"'])
        if kind == 2:
            return rng.choice([None, True, 0.25])
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.choice([0, 1, DUMP_STEP + 3] if depth == 0 else [0, 1, 2]))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(4))}

    for _ in range(20):
        doc = {"services": value(0), "other": value(1)}
        text = dumps_in_steps(doc)
        assert text == compact(doc)
        assert load_json_in_steps(text.encode()) == doc
