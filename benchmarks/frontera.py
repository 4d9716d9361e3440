"""The detector on real measurements: TACC Frontera, Quadro RTX 5000, three workloads.

    .venv/bin/python benchmarks/frontera.py [--data ../shared/data]

Data (read in place, never copied into the repository): ../shared/data/frontera-*-agg.csv, one row per
(GPU, run) from github.com/hal-uw/blox-pal (see that folder's README). ``perf`` is lower-is-better
(seconds per iteration), so a sample's value is 1 / perf; each run of a GPU is one sample; host is
cabinet-node; the GPU's UUID is its key.

There are no ground-truth labels, so the check is consistency: each GPU's runs are split into two
halves (alternating runs), each half is analysed on its own, and the flags are compared - how many
flags of one half hold on the other, Cohen's kappa, and the rank correlation of the deficits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from straggler.analysis import AnalysisConfig, analyze

WORKLOADS = ("resnet", "bert", "pagerank")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(data: Path, workload: str) -> pd.DataFrame:
    """One workload's file as canonical result rows (value = 1 / perf, higher is better)."""
    raw = pd.read_csv(data / f"frontera-{workload}-agg.csv")
    run = raw["reps"] if "reps" in raw.columns else raw["run"]
    out = pd.DataFrame(
        {
            "host": raw["cabinet"].astype(str) + "-" + raw["node"].astype(str),
            "gpu": raw["uuid"].astype(str),
            "index": raw["device"],
            "model": "Quadro RTX 5000",
            "probe": workload,
            "sample": run,
            "value": 1.0 / raw["perf"].astype(float),
        }
    )
    return out.sort_values(["gpu", "sample"], kind="stable").reset_index(drop=True)


def halves(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Alternate each GPU's runs between two halves (runs 1, 3, 5 | 2, 4, 6)."""
    pos = df.groupby("gpu").cumcount()
    return df[pos % 2 == 0], df[pos % 2 == 1]


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    po = np.mean(a == b)
    pe = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    return float((po - pe) / (1 - pe)) if pe < 1 else float("nan")


def report(data: Path, config: AnalysisConfig) -> str:
    lines = [
        "| workload | GPUs | runs/GPU | robust spread | worst GPU | flagged (all runs) | flagged half A | "
        "flagged half B | A flags held in B | B flags held in A | kappa | deficit rank corr. | causes |",
        "|" + "---|" * 13,
    ]
    for w in WORKLOADS:
        df = load(data, w)
        res = analyze(df, None, config)
        dev = res.devices
        ratio = dev["value"] / dev["value"].median()
        spread = 1.4826 * np.median(np.abs(ratio - 1))
        a, b = halves(df)
        ra, rb = analyze(a, None, config).devices, analyze(b, None, config).devices
        m = ra.merge(rb, on="gpu", suffixes=("_a", "_b"))
        fa, fb = m["straggler_a"].to_numpy(), m["straggler_b"].to_numpy()
        held_ab = f"{(fa & fb).sum()}/{fa.sum()}"
        held_ba = f"{(fa & fb).sum()}/{fb.sum()}"
        rho = stats.spearmanr(m["deficit_a"], m["deficit_b"], nan_policy="omit").statistic
        causes = res.summary["causes"]
        lines.append(
            f"| {w} | {len(dev)} | {df.groupby('gpu').size().median():.0f} | {spread:.2%} | "
            f"{1 / ratio.min():.3f}x slower | {res.summary['stragglers']} | {fa.sum()} | {fb.sum()} | "
            f"{held_ab} | {held_ba} | {kappa(fa, fb):.2f} | {rho:.2f} | "
            f"{', '.join(f'{k} {v}' for k, v in causes.items()) or '-'} |"
        )
    return "\n".join(lines)


def tier_report(data: Path, config: AnalysisConfig) -> str:
    """Per verdict tier: GPUs in it on half A, on half B, and on both (the same tier on either half)."""
    tiers = ("straggler", "undecided", "slow", "healthy")
    lines = [
        "| workload | " + " | ".join(f"{t} A / B / both" for t in tiers) + " | same tier on both halves |",
        "|" + "---|" * (len(tiers) + 2),
    ]
    for w in WORKLOADS:
        a, b = halves(load(data, w))
        m = analyze(a, None, config).devices.merge(analyze(b, None, config).devices, on="gpu", suffixes=("_a", "_b"))
        va, vb = m["verdict_a"].to_numpy(), m["verdict_b"].to_numpy()
        cells = [f"{(va == t).sum()} / {(vb == t).sum()} / {((va == t) & (vb == t)).sum()}" for t in tiers]
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {(va == vb).sum()}/{len(m)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    a = ap.parse_args(argv)
    if not (a.data / "frontera-resnet-agg.csv").is_file():
        print(f"frontera data not found in {a.data}", file=sys.stderr)
        return 2
    cfg = AnalysisConfig()
    t0 = time.perf_counter()
    print(f"# Frontera (fdr={cfg.fdr}, min_effect={cfg.min_effect})\n")
    print(report(a.data, cfg))
    print("\n## verdict tiers on the two halves\n")
    print(tier_report(a.data, cfg))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
