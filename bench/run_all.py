"""Run the benchmark parts, show their progress, then assemble bench/RESULTS.md.

Each part runs as its own process (so a crash in one does not lose the others)
with its output streamed live, under a time limit; then ``report.py`` stitches
bench/results/*.md into bench/RESULTS.md and draws bench/results.png.

Usage:
  python bench/run_all.py                       # core, forward, macro, scale, sync, soak
                                                # (soak 10 min): ~30 min
  python bench/run_all.py --quick               # every part, short: ~8 min
  python bench/run_all.py --parts core macro    # only these
  python bench/run_all.py --macro-args "--rounds 7 --seconds 10" --soak-args "--minutes 30"
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import peers
import report

BENCH = Path(__file__).resolve().parent
PARTS = ("core", "forward", "macro", "metrics", "policy", "mmsg", "scale", "sync", "soak",
         "fleet", "etcd_fleet", "pod_traffic")
SCRIPTS = {"core": "bench_core.py", "forward": "bench_forward.py", "macro": "macro.py",
           "metrics": "bench_metrics.py", "policy": "bench_policy.py", "mmsg": "bench_mmsg.py", "scale": "scale.py",
           "sync": "bench_sync.py",
           "soak": "soak.py", "fleet": "fleet.py", "etcd_fleet": "etcd_fleet.py",
           "pod_traffic": "pod_traffic.py"}
OPT_IN = {"mmsg"}  # experiments: run only when named in --parts
QUICK = {
    "core": ["--quick"],
    "forward": ["--rounds", "2", "--seconds", "3"],
    "macro": ["--rounds", "3", "--seconds", "5"],
    "metrics": ["--rounds", "4", "--seconds", "3"],
    "policy": ["--rounds", "2", "--seconds", "3"],
    "mmsg": ["--rounds", "2", "--seconds", "3"],
    "scale": ["--rounds", "2", "--seconds", "3", "--patches", "3"],
    "sync": ["--sizes", "10000"],
    "soak": ["--minutes", "1"],
    "fleet": ["--followers", "20", "--changes", "2"],
    "etcd_fleet": ["--quick"],
    "pod_traffic": ["--quick"],
}
LIMITS = {"core": 900, "forward": 900, "macro": 3600, "metrics": 900, "policy": 900,
          "mmsg": 3600, "scale": 3600,
          "sync": 1800, "soak": 7200,
          "fleet": 3900, "etcd_fleet": 1800, "pod_traffic": 1800}  # fleet.py stops itself at its --time-limit (3600) and writes


def run_part(name: str, args: list[str], python: str) -> tuple[int, float]:
    script = BENCH / SCRIPTS[name]
    cmd = [python, str(script), *args]
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=BENCH.parent, start_new_session=True)
    try:
        rc = proc.wait(timeout=LIMITS[name] + extra_time(name, args))
    except subprocess.TimeoutExpired:
        print(f"=== {name}: over its time limit, stopped", flush=True)
        rc = 124
    except KeyboardInterrupt:
        rc = 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - t0
    print(f"=== {name}: {'ok' if rc == 0 else f'exit {rc}'} in {elapsed:.0f} s", flush=True)
    if rc == 130:
        raise KeyboardInterrupt
    return rc, elapsed


def extra_time(name: str, args: list[str]) -> float:
    """A soak asked to run long gets that long plus the usual margin."""
    if name == "soak" and "--minutes" in args:
        try:
            return float(args[args.index("--minutes") + 1]) * 60
        except (IndexError, ValueError):
            return 0.0
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS,
                    help="parts to run (default: every script present except mmsg)")
    ap.add_argument("--quick", action="store_true", help="short settings for every part")
    for part in PARTS:
        ap.add_argument(f"--{part}-args", default="", metavar="ARGS",
                        help=f"extra arguments for {SCRIPTS[part]} (quoted)")
    ap.add_argument("--no-report", action="store_true", help="do not assemble RESULTS.md")
    args = ap.parse_args()
    parts = args.parts or [p for p in PARTS
                           if p not in OPT_IN and (BENCH / SCRIPTS[p]).exists()]
    python = peers.project_python()  # the venv: the parts import meshdns
    print(f"running {', '.join(parts)}{' (quick)' if args.quick else ''} with {python}")
    print(report.machine_md(), flush=True)
    outcome = {}
    try:
        for name in parts:
            if not (BENCH / SCRIPTS[name]).exists():
                outcome[name] = ("missing", 0.0)
                continue
            extra = (QUICK[name] if args.quick else []) + \
                shlex.split(getattr(args, f"{name}_args"))
            rc, elapsed = run_part(name, extra, python)
            outcome[name] = ("ok" if rc == 0 else f"exit {rc}", elapsed)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    print("\nsummary: " + ", ".join(f"{n} {s} ({t:.0f} s)" for n, (s, t) in outcome.items()))
    if not args.no_report:
        print(f"wrote {report.assemble()}")
    return 0 if all(s == "ok" for s, _ in outcome.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
