"""How long the fleet report takes to write, and how large it is, at fleet size (docs/report.md).

    .venv/bin/python benchmarks/report.py                       # 100,000 devices x 3 probes
    .venv/bin/python benchmarks/report.py --devices 20000 --history 0
    .venv/bin/python benchmarks/report.py --chromium /usr/bin/chromium   # also time opening it
    .venv/bin/python benchmarks/report.py --plotly-js plotly.min.js      # the size a library would add

Fleets from ``benchmarks/detection.py`` (``make_fleet``: silicon spread 0.5%, stragglers with their
injected causes and telemetry, 0.5% of nodes slow), one per probe (matmul, membw, allreduce), with
``--history`` earlier scans. Prints one table row per fleet: rows analysed, ``analyze()`` time, the
report's time (``render_report``: the model from the analysis output, then the page) and size, its
gzip size, the SVG elements drawn, and with ``--chromium`` the time headless Chromium takes to
load and lay it out (navigation to load event and layout) and to paint its first 1280 x 1500 pixels.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the Chromium driver of the report tests

from detection import make_fleet  # noqa: E402

from straggler.analysis import analyze  # noqa: E402
from straggler.htmlreport import render_report  # noqa: E402


def fleet(devices: int, probes: int, history: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    cur, past = [], []
    for p, name in enumerate(("matmul", "membw", "allreduce")[:probes]):
        f = make_fleet(seed=200 + p, devices=devices, history=history)
        cur.append(f.samples.assign(probe=name))
        if f.history is not None:
            past.append(f.history.assign(probe=name))
    return pd.concat(cur, ignore_index=True), pd.concat(past, ignore_index=True) if past else None


def measure(devices: int, probes: int, history: int, chromium: str | None) -> dict:
    samples, past = fleet(devices, probes, history)
    t0 = time.perf_counter()
    res = analyze(samples, past)
    t_analyze = time.perf_counter() - t0
    t0 = time.perf_counter()
    html = render_report(res.devices, res.summary, samples, past, command="benchmarks/report.py")
    t_report = time.perf_counter() - t0
    data = html.encode()
    row = {
        "devices": devices,
        "probes": probes,
        "past scans": history,
        "rows": len(samples) + (0 if past is None else len(past)),
        "flagged entries": int(res.summary["stragglers"]),
        "analyze() s": t_analyze,
        "report s": t_report,
        "size MB": len(data) / 1e6,
        "gzip MB": len(gzip.compress(data, 6)) / 1e6,
        "SVG elements": len(re.findall(r"<(?:rect|circle|path|line|text)\b", html)),
    }
    if chromium:
        from chromium import Chromium

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.html"
            path.write_bytes(data)
            with Chromium(chromium, Path(tmp) / "profile") as b:
                b.open("about:blank")  # the browser's own start-up is not the page's
                t0 = time.perf_counter()
                page = b.open(path.as_uri(), offline=True)
                page.evaluate("document.documentElement.scrollHeight")  # laid out
                row["Chromium load + layout s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                page.screenshot(Path(tmp) / "shot.png", height=1500)
                row["first screen painted s"] = time.perf_counter() - t0
                assert page.errors == [], page.errors
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="10000,100000", help="fleet sizes, comma-separated")
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--history", type=int, default=2, help="earlier scans per device (also run with 0)")
    ap.add_argument("--chromium", default=None, help="path of chromium: also time opening each report")
    ap.add_argument("--plotly-js", default=None, help="a plotly.min.js: print what inlining it would add")
    a = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in a.devices.split(",")):
        for h in sorted({0, a.history}):
            rows.append(measure(n, a.probes, h, a.chromium))
            print(rows[-1], file=sys.stderr, flush=True)
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    if a.plotly_js:
        js = Path(a.plotly_js).read_bytes()
        print(
            f"\n{a.plotly_js}: {len(js) / 1e6:.2f} MB, gzip {len(gzip.compress(js, 6)) / 1e6:.2f} MB: "
            "what inlining it adds to every self-contained page, before any data"
        )
    return 0


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


if __name__ == "__main__":
    sys.exit(main())
