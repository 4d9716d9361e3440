"""How long `straggler analyze` takes to print its table for a large result (10,000 entries).

    python benchmarks/render_rows.py [--entries 10000] [--flagged 3000] [--render FILE]

Builds a result of ``--entries`` device x probe entries, ``--flagged`` of them stragglers, runs
the analysis once, then prints the wall time of rendering it to an 80-column console: the default
table (a summary and the top entries by cost) and ``--all`` (every entry). ``--render FILE``
times the ``render`` function of another copy of ``straggler/commands/analyze.py`` instead (to
compare with an earlier version).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import time

import numpy as np
import pandas as pd
from rich.console import Console

from straggler.analysis import analyze


def fleet(entries: int, flagged: int, samples: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    step = max(entries // max(flagged, 1), 1)
    rate = np.where(np.arange(entries) % step == 0, 0.7, 1.0)[:entries]
    dev = np.repeat(np.arange(entries), samples)
    return pd.DataFrame(
        {
            "host": [f"gpu-node-{i // 8:04d}" for i in dev],
            "gpu": [f"GPU-{i:08x}-0000-4000-8000-{i:012x}" for i in dev],
            "model": "NVIDIA H100 80GB HBM3",
            "probe": "matmul",
            "sample": np.tile(np.arange(samples), entries),
            "value": 700 * rate[dev] * (1 + rng.normal(0, 0.01, len(dev))),
        }
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--flagged", type=int, default=3_000)
    ap.add_argument("--render", default=None, help="another analyze.py whose render() to time")
    args = ap.parse_args(argv)
    if args.render:
        spec = importlib.util.spec_from_file_location("analyze_under_test", args.render)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        render = module.render
    else:
        from straggler.commands.analyze import render
    res = analyze(fleet(args.entries, args.flagged))
    print(
        f"{res.summary['entries']} entries, {res.summary['stragglers']} stragglers; "
        f"render: {args.render or 'this checkout'}"
    )
    print(f"{'output':>8} {'lines':>7} {'wall_s':>8}")
    for label, kw in (("default", {}), ("--all", {"show_all": True})):
        buf = io.StringIO()
        t0 = time.perf_counter()
        render(res, Console(file=buf, width=80, color_system=None), **kw)
        print(f"{label:>8} {buf.getvalue().count(chr(10)):>7} {time.perf_counter() - t0:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
