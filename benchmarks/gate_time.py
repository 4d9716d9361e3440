"""How long `straggler gate` takes here, split by phase.

    python benchmarks/gate_time.py [--runs 3] [-- extra gate options]

Runs the gate ``--runs`` times (``--json``, a fresh state directory each run) and prints, per run,
the wall time seen from outside (interpreter start-up and exit included), the gate's own elapsed
time, each phase's time (health, reference, probes, judge), the rounds it measured and its exit
code; then the medians. Also, once, the time ``import torch`` takes here: the part of a scan's
start-up the launcher no longer pays (its workers still do). The issue's target: <= 30 s on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

PHASES = ("health", "reference", "probes", "judge")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="extra `straggler gate` options")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    print(f"import torch: {time.monotonic() - t0:.1f} s (paid by each worker, no longer by the launcher)")
    print(
        f"{'run':>3} {'wall_s':>7} {'gate_s':>7} "
        + " ".join(f"{p + '_s':>11}" for p in PHASES)
        + f" {'rounds':>6} {'exit':>4}"
    )
    walls, per_phase = [], {p: [] for p in PHASES}
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as state:
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "straggler", "gate", "--json", "--state-dir", state, *args.extra],
                capture_output=True,
                text=True,
                timeout=900,
            )
            wall = time.monotonic() - t0
        try:
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"{i + 1:>3} gate printed no JSON (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        phases = {p["phase"]: p["duration_s"] for p in doc.get("phases", ())}
        walls.append(wall)
        for p in PHASES:
            if p in phases:
                per_phase[p].append(phases[p])
        rounds = (doc.get("rounds") or {}).get("rounds", "-")
        print(
            f"{i + 1:>3} {wall:>7.1f} {doc.get('elapsed_s', float('nan')):>7.1f} "
            + " ".join(f"{phases[p]:>11.2f}" if p in phases else f"{'-':>11}" for p in PHASES)
            + f" {rounds:>6} {proc.returncode:>4}"
        )
        for f in doc.get("findings", ()):
            print(f"      {f['outcome']}: {f['device']} {f['check']} {f['value']}: {f['cause']}")
    if walls:
        print(
            f"median wall {statistics.median(walls):.1f} s; "
            + ", ".join(f"{p} {statistics.median(v):.2f} s" for p, v in per_phase.items() if v)
            + " (target: <= 30 s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
