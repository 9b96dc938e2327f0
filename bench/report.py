"""Shared result helpers, and the assembler of bench/RESULTS.md and bench/results.png.

Each benchmark part writes one Markdown file into bench/results/ (core.md,
macro.md, scale.md, soak.md; other parts add sync.md, forward.md, fleet.md) and
may write a JSON file with the same stem holding its numbers. ``python
bench/report.py`` stitches the Markdown files, in a fixed order, into
bench/RESULTS.md and draws bench/results.png from macro.json (matplotlib; the
picture is skipped with a note when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ORDER = ("core", "forward", "macro", "profile", "metrics", "mmsg", "scale", "sync", "soak", "fleet", "fleet_100k",
         "etcd_fleet")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    for line in text:
        m = re.search(r"\d+\.\d+(\.\d+)?", line)
        if m:
            return m.group(0)
    return text[0][:80] if text else "?"


def machine_info() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_md(extra: dict[str, str] | None = None) -> str:
    m = machine_info()
    lines = [
        f"- machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}, Linux {m['kernel']}",
        f"- python {m['python']}; load average at start {m['loadavg']} "
        "(the machine is shared: compare ratios measured in one run, not absolutes)",
        f"- run at {m['date']}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def command_line() -> str:
    rel = os.path.relpath(os.path.abspath(sys.argv[0]), BENCH.parent)
    return "python " + " ".join(shlex.quote(a) for a in [rel, *sys.argv[1:]])


# ---------------------------------------------------------------- formatting


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column (l/r), default: first l, rest r."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table for a terminal."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ns(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def fmt_kb(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def write_result(stem: str, markdown: str, data: Any = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.md"
    path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    if data is not None:
        (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


# ---------------------------------------------------------------- RESULTS.md


def demote(markdown: str) -> str:
    """Headings of a part shifted so its top level is ``##``: each part is one section."""
    lines = markdown.splitlines()
    levels, fence = [], False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            levels.append(len(line) - len(line.lstrip("#")))
    shift = 2 - min(levels) if levels else 0
    out, fence = [], False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            line = "#" * max(1, level + shift) + line[level:]
        out.append(line)
    return "\n".join(out)


def plot(png: Path) -> str:
    """Draw qps and latency per server from macro.json; a note on what happened."""
    data_path = RESULTS / "macro.json"
    if not data_path.exists():
        return "results.png not drawn: no bench/results/macro.json (run bench/macro.py)."
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "results.png not drawn: matplotlib is not installed (pip install matplotlib)."
    data = json.loads(data_path.read_text())
    w2 = data.get("workers2") or {}
    sets = [s for s in [*data.get("sets", []), *w2.get("sets", [])] if s.get("servers")]
    if not sets:
        return "results.png not drawn: macro.json has no results."
    metrics = (("qps_median", "queries/s (median)", False),
               ("cpu_us_per_query", "server CPU µs per query (log)", True),
               ("avg_ms_median", "average latency ms, dnsperf (log)", True))
    fig, axes = plt.subplots(len(metrics), len(sets), figsize=(5.5 * len(sets), 10),
                             squeeze=False)
    for col, qset in enumerate(sets):
        names = [s["name"] for s in qset["servers"]]
        colors = ["tab:orange" if n.startswith("meshdns") else "tab:blue" for n in names]
        short = ("A-only" if qset.get("kind") == "a" else "mix") + (
            ", 2 workers/threads" if "2 workers" in qset.get("label", "") else "")
        for row, (key, title, log) in enumerate(metrics):
            values = [s.get(key, 0.0) for s in qset["servers"]]
            ax = axes[row][col]
            ax.bar(names, values, color=colors)
            ax.set_title(f"{short}: {title}", fontsize=10)
            ax.tick_params(axis="x", rotation=30)
            if log:
                ax.set_yscale("log")
            for x, v in enumerate(values):
                text = f"{v / 1000:.0f}k" if key == "qps_median" else f"{v:.1f}"
                ax.text(x, v, text, ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"dnsperf on loopback, {data.get('services', '?')} services, "
                 f"{data.get('rounds', '?')} rounds x {data.get('seconds', '?')} s "
                 f"({data.get('machine', {}).get('nproc', '?')} CPUs, shared)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return "![qps and latency per server](results.png)"


def assemble(out: Path = BENCH / "RESULTS.md", png: Path = BENCH / "results.png") -> Path:
    parts = []
    seen = set()
    for stem in ORDER:
        path = RESULTS / f"{stem}.md"
        if path.exists():
            parts.append((stem, path.read_text(encoding="utf-8")))
            seen.add(stem)
    for path in sorted(RESULTS.glob("*.md")):
        if path.stem not in seen:
            parts.append((path.stem, path.read_text(encoding="utf-8")))
    picture = plot(png)
    head = [
        "# meshdns benchmark results",
        "",
        f"Assembled by `python bench/report.py` at {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
        "from the files in `bench/results/`; each section names the command that "
        "produced it and the machine it ran on. See `bench/README.md` for how to run "
        "each part.",
        "",
        machine_md(),
        "",
        "Contents: " + ", ".join(f"[{stem}](#{stem})" for stem, _ in parts)
        if parts else "No results yet: run `python bench/run_all.py`.",
        "",
        picture,
        "",
    ]
    body = []
    for stem, text in parts:
        body += [f'<a id="{stem}"></a>', "", demote(text).rstrip(), ""]
    out.write_text("\n".join(head + body), encoding="utf-8")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="assemble bench/RESULTS.md and bench/results.png")
    ap.parse_args()
    path = assemble()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
