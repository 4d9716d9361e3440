"""Side-by-side benchmark: straggler's detector against the rules in use today, on a synthetic fleet.

    .venv/bin/python benchmarks/detection.py                 # the table (about a minute)
    .venv/bin/python benchmarks/detection.py --sweep         # how the default min_effect was chosen
    .venv/bin/python benchmarks/detection.py --devices 20000 --seeds 3

The fleet generator (:func:`make_fleet`) - every knob is an argument, defaults in brackets:

- ``devices`` [20,000] GPUs of one model, ``per_node`` [8] per host.
- silicon lottery: each healthy device's rate is ``1 + N(0, silicon)`` [0.5%] times the nominal rate
  (the robust spread of per-GPU medians measured on Frontera: ResNet 0.57%, BERT 0.41%, PageRank 0.05%;
  see benchmarks/frontera.py). ``--silicon 0.01`` shows a fleet twice as spread.
- node effects: each node multiplies its devices by ``1 + N(0, node)`` [0.3%] (cooling, CPU, firmware).
- per-sample noise with heavy tails: Student t with 4 degrees of freedom scaled to a standard
  deviation of ``noise`` [1%]; ``samples`` [5] samples per device.
- transient dips: a share ``dip_rate`` [3%] of all samples is multiplied by U(0.5, 0.9).
- stragglers: for each slowdown in ``slowdowns`` [2, 3, 5, 10, 20%] a share ``straggler_rate``
  [0.5%] of the devices runs at exactly (1 - slowdown) x nominal.
- whole slow nodes: a share ``slow_nodes`` [0.5%] of the nodes runs all its devices 8% slow.
- drifting devices (``history`` scans > 0): a share ``drift_rate`` [1%] of devices, all with a
  silicon rate 1-2% above nominal, loses ``drift`` [3%] evenly over the past scans and the current
  one, so it ends 1-2% below nominal - inside the fleet spread, visible only against its own past.
  Every scan adds a per-device scan effect ``N(0, scan_noise)`` [0.3%].

Scoring: recall per true slowdown; the false-positive rate among healthy devices whose true rate is
less than 1.5 points below the nominal median (the issue's definition); runtime of each method on
the same table, measured side by side in this process.

Anchor rules, each applied to the per-device median of the samples (the most favourable reading
of each rule; they were written for one number per device):
- superbench: value < 0.9 x fleet baseline (the fleet median)
- gpu-fryer: value < 0.9 x the best device of its node
- megatron: |value - median| > max(MAD, 0.1 x median) over the fleet (slow side)
- dcgm: value < 0.75 x the model reference (the nominal rate)
- mean-3sigma: value < mean - 3 x std over the fleet
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from straggler.analysis import AnalysisConfig, analyze
from straggler.records import read_table, write_table

NOMINAL = 1000.0  # GFLOP/s of a healthy device


@dataclass
class Fleet:
    samples: pd.DataFrame  # the current scan, canonical columns
    history: pd.DataFrame | None  # earlier scans
    truth: pd.DataFrame  # per device: host, gpu, slowdown (0 healthy), true_ratio, kind


def make_fleet(seed: int = 0, devices: int = 20_000, per_node: int = 8, samples: int = 5,
               silicon: float = 0.005, node: float = 0.003, noise: float = 0.01, dip_rate: float = 0.03,
               slowdowns=(0.02, 0.03, 0.05, 0.10, 0.20), straggler_rate: float = 0.005,
               slow_nodes: float = 0.005, history: int = 0, drift_rate: float = 0.01,
               drift: float = 0.03, scan_noise: float = 0.003) -> Fleet:
    rng = np.random.default_rng(seed)
    n_nodes = -(-devices // per_node)
    node_of = np.arange(devices) // per_node
    rate = (1 + rng.normal(0, silicon, devices)) * (1 + rng.normal(0, node, n_nodes))[node_of]
    kind = np.full(devices, "healthy", dtype=object)
    slowdown = np.zeros(devices)
    free = rng.permutation(devices)
    take = int(round(straggler_rate * devices))
    for i, s in enumerate(slowdowns):
        idx = free[i * take:(i + 1) * take]
        rate[idx], slowdown[idx], kind[idx] = 1 - s, s, f"straggler {s:.0%}"
    used = len(slowdowns) * take
    whole = rng.choice(n_nodes, int(round(slow_nodes * n_nodes)), replace=False)
    in_whole = np.isin(node_of, whole) & (kind == "healthy")
    rate[in_whole], slowdown[in_whole], kind[in_whole] = 0.92, 0.08, "whole node 8%"
    drifting = np.zeros(devices, dtype=bool)
    if history:
        cand = free[used:][kind[free[used:]] == "healthy"]
        idx = cand[: int(round(drift_rate * devices))]
        rate[idx] = 1 + rng.uniform(0.01, 0.02, len(idx))
        drifting[idx], kind[idx] = True, "drifting"

    host = np.array([f"node{i:05d}" for i in range(n_nodes)], dtype=object)[node_of]
    gpu = np.array([f"GPU-{i:08x}" for i in range(devices)], dtype=object)

    def scan(scan_rate: np.ndarray, scan_id: str, ts: float) -> pd.DataFrame:
        r = np.repeat(scan_rate * (1 + rng.normal(0, scan_noise if history else 0, devices)), samples)
        e = rng.standard_t(4, devices * samples) * noise / np.sqrt(2.0)  # t(4) has variance 2
        dip = rng.random(devices * samples) < dip_rate
        v = NOMINAL * r * (1 + e) * np.where(dip, rng.uniform(0.5, 0.9, devices * samples), 1.0)
        return pd.DataFrame({
            "ts": ts, "scan_id": scan_id, "host": np.repeat(host, samples), "gpu": np.repeat(gpu, samples),
            "index": np.repeat(np.arange(devices) % per_node, samples), "model": "H100 80GB HBM3",
            "probe": "matmul", "settings": "n=8192,dtype=bf16", "sample": np.tile(np.arange(samples), devices),
            "value": v, "unit": "GFLOP/s",
        })

    past = []
    for k in range(history):  # drifting devices lose drift/(history+1) per scan, from their start
        lost = drift * k / (history + 1)
        past.append(scan(np.where(drifting, rate - lost, rate), f"scan{k:02d}", 1e9 + k * 3600))
    current = scan(np.where(drifting, rate - drift, rate), f"scan{history:02d}", 1e9 + history * 3600)
    true_ratio = np.where(drifting, rate - drift, rate)
    truth = pd.DataFrame({"host": host, "gpu": gpu, "node": node_of, "kind": kind, "slowdown": slowdown,
                          "true_ratio": true_ratio})
    return Fleet(current, pd.concat(past, ignore_index=True) if past else None, truth)


# --- the rules in use today, on per-device medians -------------------------------------------------

def _device_medians(samples: pd.DataFrame) -> pd.DataFrame:
    return samples.groupby(["host", "gpu"], sort=False)["value"].median().reset_index()


def rule_superbench(d: pd.DataFrame) -> np.ndarray:
    return (d["value"] < 0.9 * d["value"].median()).to_numpy()


def rule_gpu_fryer(d: pd.DataFrame) -> np.ndarray:
    return (d["value"] < 0.9 * d.groupby("host")["value"].transform("max")).to_numpy()


def rule_megatron(d: pd.DataFrame) -> np.ndarray:
    med = d["value"].median()
    mad = (d["value"] - med).abs().median()
    return ((med - d["value"]) > max(mad, 0.1 * med)).to_numpy()


def rule_dcgm(d: pd.DataFrame) -> np.ndarray:
    return (d["value"] < 0.75 * NOMINAL).to_numpy()


def rule_mean_3sigma(d: pd.DataFrame) -> np.ndarray:
    return (d["value"] < d["value"].mean() - 3 * d["value"].std()).to_numpy()


RULES = {"superbench 10%": rule_superbench, "gpu-fryer 90% of best": rule_gpu_fryer,
         "megatron max(MAD,10%)": rule_megatron, "dcgm 0.75x ref": rule_dcgm,
         "mean - 3 sigma": rule_mean_3sigma}


# A conservative setting of the detector, shown beside the default: it matches the anchors' FPR.
CONSERVATIVE = AnalysisConfig(min_effect=0.03)


def run_detector(fleet: Fleet, config: AnalysisConfig, use_history: bool = False) -> tuple:
    t0 = time.perf_counter()
    res = analyze(fleet.samples, fleet.history if use_history else None, config)
    dt = time.perf_counter() - t0
    flagged = res.devices.set_index("gpu")["straggler"].reindex(fleet.truth["gpu"]).to_numpy(dtype=bool)
    return flagged, dt


def run_methods(fleet: Fleet, config: AnalysisConfig, use_history: bool = False) -> dict[str, tuple]:
    """{method: (flagged per truth row, seconds)}"""
    out = {"straggler": run_detector(fleet, config, use_history),
           f"straggler min_effect={CONSERVATIVE.min_effect}": run_detector(fleet, CONSERVATIVE, use_history)}
    for name, rule in RULES.items():
        t0 = time.perf_counter()
        d = _device_medians(fleet.samples)
        f = rule(d)
        dt = time.perf_counter() - t0
        out[name] = (pd.Series(f, index=d["gpu"]).reindex(fleet.truth["gpu"]).to_numpy(dtype=bool), dt)
    return out


def score(truth: pd.DataFrame, flagged: np.ndarray) -> dict[str, float]:
    row = {}
    def order(kind: str) -> tuple:
        digits = "".join(ch for ch in kind if ch.isdigit())
        return (kind.startswith("whole"), kind == "drifting", int(digits) if digits else 0)

    for kind in sorted(truth["kind"].unique(), key=order):
        if kind == "healthy":
            continue
        sel = (truth["kind"] == kind).to_numpy()
        row[f"recall {kind}"] = (flagged[sel].sum(), sel.sum())
    near = ((truth["kind"] == "healthy") & (truth["true_ratio"] > 0.985)).to_numpy()
    row["FPR healthy <1.5pt"] = (flagged[near].sum(), near.sum())
    return row


def table(rows: dict[str, dict], runtimes: dict[str, float]) -> str:
    cols = list(next(iter(rows.values())).keys())
    head = ["method"] + [c.replace("recall ", "") for c in cols] + ["runtime s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = []
        for c in cols:
            k, n = r[c]
            cells.append("-" if not n else f"{k / n:.4f} ({k}/{n})" if c.startswith("FPR") else f"{k / n:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {runtimes[name]:.3f} |")
    return "\n".join(lines)


def accumulate(total: dict, name: str, sc: dict) -> None:
    acc = total.setdefault(name, {})
    for c, (k, n) in sc.items():
        a = acc.get(c, (0, 0))
        acc[c] = (a[0] + int(k), a[1] + int(n))


def bench(seeds: int, devices: int, config: AnalysisConfig, history: int = 0, **fleet_args) -> str:
    rows: dict[str, dict] = {}
    times: dict[str, list] = {}
    for seed in range(seeds):
        fleet = make_fleet(seed=seed, devices=devices, history=history, **fleet_args)
        for name, (flagged, dt) in run_methods(fleet, config, use_history=bool(history)).items():
            accumulate(rows, name, score(fleet.truth, flagged))
            times.setdefault(name, []).append(dt)
        if history:  # the same detector without the history, on the same fleet
            flagged, dt = run_detector(fleet, config, use_history=False)
            accumulate(rows, "straggler, no history", score(fleet.truth, flagged))
            times.setdefault("straggler, no history", []).append(dt)
    return table(rows, {k: float(np.median(v)) for k, v in times.items()})


def scale_runtime(devices: int = 100_000, probes: int = 3, samples: int = 10, repeats: int = 3) -> str:
    """Runtime of analyze() on devices x probes x samples rows (excluding file reading)."""
    frames = []
    for p, name in enumerate(("matmul", "membw", "allreduce")[:probes]):
        f = make_fleet(seed=100 + p, devices=devices, samples=samples).samples
        frames.append(f.assign(probe=name))
    df = pd.concat(frames, ignore_index=True)
    for c in ("host", "gpu", "probe", "model", "settings", "unit", "scan_id"):
        df[c] = df[c].astype("string")
    analyze(df.head(1000), None, AnalysisConfig())  # warm imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = analyze(df)
        times.append(time.perf_counter() - t0)
    ref = []  # side by side: the least any per-device analysis does, a pandas groupby median
    for _ in range(repeats):
        t0 = time.perf_counter()
        df.groupby(["host", "gpu", "probe"], sort=False)["value"].median()
        ref.append(time.perf_counter() - t0)
    lines = [f"analyze(): {len(df):,} rows ({devices:,} devices x {probes} probes x {samples} samples): "
             f"median {np.median(times):.2f} s, min {min(times):.2f} s over {repeats} runs; "
             f"{res.summary['stragglers']} flagged. Side by side, pandas "
             f"groupby(host, gpu, probe).value.median(): median {np.median(ref):.2f} s, min {min(ref):.2f} s "
             f"(analyze / groupby = {np.median(times) / np.median(ref):.1f}x)", "",
             "| file | pandas reads it (read_table) | `straggler analyze FILE --json` (whole process) | ratio |",
             "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".parquet", ".csv"):
            path = Path(tmp) / f"fleet{suffix}"
            write_table(df, path)
            t0 = time.perf_counter()
            read_table(path)
            t_read = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "straggler", "analyze", str(path), "--json"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
            t_cli = time.perf_counter() - t0
            assert out.returncode in (0, 1), out.stderr
            lines.append(f"| {suffix[1:]} ({path.stat().st_size / 1e6:.0f} MB) | {t_read:.2f} s | "
                         f"{t_cli:.2f} s | {t_cli / t_read:.1f}x |")
    return "\n".join(lines)


def sweep(devices: int, seeds: int, **fleet_args) -> str:
    lines = ["| min_effect | recall 2% | recall 3% | recall 5% | FPR healthy <1.5pt |", "|---|---|---|---|---|"]
    fleets = [make_fleet(seed=s, devices=devices, **fleet_args) for s in range(seeds)]
    for m in (0.015, 0.0175, 0.02, 0.0225, 0.025, 0.03):
        acc: dict = {}
        for fleet in fleets:
            flagged, _ = run_detector(fleet, AnalysisConfig(min_effect=m))
            accumulate(acc, "x", score(fleet.truth, flagged))
        r = acc["x"]
        cells = [r[c][0] / r[c][1] for c in ("recall straggler 2%", "recall straggler 3%",
                                              "recall straggler 5%", "FPR healthy <1.5pt")]
        lines.append(f"| {m} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--history", type=int, default=6, help="past scans for the history table (0: skip)")
    ap.add_argument("--silicon", type=float, default=0.005, help="device-to-device spread (std)")
    ap.add_argument("--sweep", action="store_true", help="print the min_effect sweep instead")
    ap.add_argument("--no-scale", action="store_true", help="skip the 100,000-device runtime run")
    ap.add_argument("--scale-only", action="store_true", help="only the 100,000-device runtime run")
    a = ap.parse_args(argv)
    print(f"# detection benchmark ({a.devices:,} devices x {a.seeds} seeds, 5 samples, 1% t(4) noise, "
          f"3% dips, {a.silicon:.1%} silicon spread; {os.cpu_count()} CPUs)")
    if a.sweep:
        print(sweep(a.devices, a.seeds, silicon=a.silicon))
        return 0
    if a.scale_only:
        print(scale_runtime(repeats=5))
        return 0
    cfg = AnalysisConfig()
    print(f"\n## one scan, no history (detector: fdr={cfg.fdr}, min_effect={cfg.min_effect})\n")
    print(bench(a.seeds, a.devices, cfg, silicon=a.silicon))
    if a.history:
        print(f"\n## with {a.history} past scans (drifting devices; 0.3% scan-to-scan noise)\n")
        print(bench(a.seeds, a.devices, cfg, history=a.history, silicon=a.silicon))
    if not a.no_scale:
        print("\n## scale\n")
        print(scale_runtime())
    return 0


if __name__ == "__main__":
    sys.exit(main())
