"""How long the README's main command (`straggler scan`, every probe, every core) takes here.

    python benchmarks/scan_time.py [--runs 3] [-- extra scan options]

Runs the command ``--runs`` times and prints, per run, the wall time, the time the probes
themselves ran (sum of the sample windows of one device), the overhead (start-up, warm-up,
barriers, analysis) and the share of the wall time spent probing. The issue's bound: < 60 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="extra `straggler scan` options")
    args = ap.parse_args(argv)
    print(f"{'run':>3} {'wall_s':>8} {'probing_s':>10} {'overhead_s':>11} {'probing/wall':>13} {'exit':>5}")
    walls = []
    for i in range(args.runs):
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "straggler", "scan", "--json", *args.extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        wall = time.monotonic() - t0
        doc = json.loads(proc.stdout)
        first = doc["samples"][0]["gpu"]
        probing = sum(s["duration_s"] for s in doc["samples"] if s["gpu"] == first)
        walls.append(wall)
        print(
            f"{i + 1:>3} {wall:>8.1f} {probing:>10.1f} {wall - probing:>11.1f} {probing / wall:>13.2f} "
            f"{proc.returncode:>5}"
        )
    print(f"median wall {statistics.median(walls):.1f} s (bound: 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
