"""Decision-grade verdicts on synthetic fleets: straggler's detector against the rules in use today.

    .venv/bin/python benchmarks/detection.py                 # every table (a few minutes on 2 cores)
    .venv/bin/python benchmarks/detection.py --no-scale      # without the 100,000-device runtime run
    .venv/bin/python benchmarks/detection.py --spreads 0.01 --devices 5000

For each silicon spread (``--spreads``, default 0.1, 0.5, 1.0, 1.7, 2.5%), one fleet of ``--devices``
(20,000) GPUs is generated (:func:`make_fleet`; every knob an argument, defaults in brackets):

- silicon lottery: each healthy device's rate is ``1 + silicon x t(4)`` times nominal, the Student t
  scaled so that its robust standard deviation (1.4826 x MAD) is the spread: heavy tails, as in real
  fleets (the issue cites 1.7% for V100 SGEMM and 2.0% for A100 ResNet-50; Frontera spreads 0.4-0.6%).
- node effects: each node of ``per_node`` [8] multiplies its devices by ``1 + N(0, node)`` [0.3%].
- per-sample noise: Student t(4) scaled to ``noise`` [1%]; ``samples`` [5] samples per device;
  ``dip_rate`` [3%] of all samples dip to U(0.5, 0.9) x.
- stragglers: for each slowdown in ``slowdowns`` [T-1pt, T, T+1pt, 2T, 10%, 20%] a share
  ``straggler_rate`` [0.5%] of the devices runs at exactly (1 - slowdown); ``slow_nodes`` [0.5%] of
  the nodes run all devices 8% slow. Each straggler gets an injected cause with the telemetry a real
  GPU shows (``CAUSES``: power cap at a lower clock, thermal slowdown at a high temperature, HW
  slowdown, PCIe link trained down, memory row remapping, a second process, or none); healthy devices
  show normal telemetry (power-capped most of the window at full load, as real GPUs are). Throttle
  reasons are written in the forms users have: ``name=share`` lists, NVML bit masks, ``a|b`` names.
- re-measurement (``--rounds``): every device has 5 more samples in reserve per round; after each
  analysis the ``undecided`` devices get their next 5 (the simulation of ``straggler scan`` re-probing
  them), up to ``--rounds`` rounds; in the ``samples_needed`` table each gets that many instead (at
  most ``--round-cap`` per round: ``straggler scan`` takes at most 4 x 5).
- history (``--history`` scans, a separate fleet): ``drift_rate`` [1%] of devices, starting 1-2% above
  nominal, lose U(T, 1.5T) evenly over the past scans and the current one (many end inside the fleet's
  spread); every scan adds a per-device scan effect N(0, 0.3%).

Scoring (the issue's definitions): recall per injected slowdown; FPR among devices whose true deficit
(1 - true rate / the fleet's median true rate) is at most T-1.5pt; false-drain rate = share of flagged
devices whose true deficit is below T; share of a fleet with no stragglers that is flagged; share
undecided; ``degraded`` recall among drifting devices and share of stable devices marked; the named
cause among flagged stragglers whose cause has telemetry evidence. Anchor rules, on per-device medians:
- superbench: value < 0.9 x fleet baseline (the fleet median)
- gpu-fryer: value < 0.9 x the best device of its node
- megatron: |value - median| > max(MAD, 0.1 x median) over the fleet (slow side)
- dcgm: value < 0.75 x the model reference (the nominal rate)
- mean-3sigma: value < mean - 3 x std over the fleet
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from straggler.analysis import AnalysisConfig, analyze
from straggler.records import THROTTLE_BITS, format_throttle, write_table

NOMINAL = 1000.0  # GFLOP/s of a healthy device
T = AnalysisConfig().min_effect
SLOWDOWNS = (T - 0.01, T, T + 0.01, 2 * T, 0.10, 0.20)
T4_MAD = 0.7407  # median absolute deviation of Student t(4)
CLOCK_MHZ, LIMIT_W = 1980.0, 700.0
# Injected causes and the name the analysis should give them ("" = no telemetry evidence).
CAUSES = {
    "power_capped": "power_capped",
    "thermal": "thermal",
    "hw_slowdown": "hw_slowdown",
    "pcie_link": "pcie_link",
    "memory": "memory",
    "contention": "contention",
    "none": "",
}


@dataclass
class Fleet:
    samples: pd.DataFrame  # the current scan (with every reserve sample), canonical columns
    history: pd.DataFrame | None  # earlier scans
    truth: pd.DataFrame  # per device: host, gpu, kind, slowdown, true_deficit, cause
    base_samples: int  # samples of the first round


def make_fleet(
    seed: int = 0,
    devices: int = 20_000,
    per_node: int = 8,
    samples: int = 5,
    rounds: int = 0,
    silicon: float = 0.005,
    node: float = 0.003,
    noise: float = 0.01,
    dip_rate: float = 0.03,
    slowdowns=SLOWDOWNS,
    straggler_rate: float = 0.005,
    slow_nodes: float = 0.005,
    history: int = 0,
    drift_rate: float = 0.01,
    scan_noise: float = 0.003,
    telemetry: bool = True,
) -> Fleet:
    rng = np.random.default_rng(seed)
    n_nodes = -(-devices // per_node)
    node_of = np.arange(devices) // per_node
    rate = (1 + silicon / (1.4826 * T4_MAD) * rng.standard_t(4, devices)) * (1 + rng.normal(0, node, n_nodes))[node_of]
    kind = np.full(devices, "healthy", dtype=object)
    cause = np.full(devices, "", dtype=object)
    slowdown = np.zeros(devices)
    free = rng.permutation(devices)
    take = int(round(straggler_rate * devices))
    names = list(CAUSES)
    for i, s in enumerate(slowdowns):
        idx = free[i * take : (i + 1) * take]
        rate[idx], slowdown[idx], kind[idx] = 1 - s, s, f"straggler {s:.0%}"
        cause[idx] = [names[j % len(names)] for j in range(len(idx))]
    used = len(slowdowns) * take
    whole = rng.choice(n_nodes, int(round(slow_nodes * n_nodes)), replace=False)
    in_whole = np.isin(node_of, whole) & (kind == "healthy")
    rate[in_whole], slowdown[in_whole], kind[in_whole], cause[in_whole] = 0.92, 0.08, "whole node 8%", "whole_node"
    drifting = np.zeros(devices, dtype=bool)
    loss = np.zeros(devices)
    if history:
        cand = free[used:][kind[free[used:]] == "healthy"]
        idx = cand[: int(round(drift_rate * devices))]
        rate[idx] = 1 + rng.uniform(0.01, 0.02, len(idx))
        loss[idx] = rng.uniform(T, 1.5 * T, len(idx))
        drifting[idx], kind[idx] = True, "drifting"

    host = np.array([f"node{i:05d}" for i in range(n_nodes)], dtype=object)[node_of]
    gpu = np.array([f"GPU-{i:08x}" for i in range(devices)], dtype=object)

    def scan(scan_rate: np.ndarray, scan_id: str, ts: float, k: int) -> pd.DataFrame:
        r = np.repeat(scan_rate * (1 + rng.normal(0, scan_noise if history else 0, devices)), k)
        e = rng.standard_t(4, devices * k) * noise / np.sqrt(2.0)  # t(4) has variance 2
        dip = rng.random(devices * k) < dip_rate
        v = NOMINAL * r * (1 + e) * np.where(dip, rng.uniform(0.5, 0.9, devices * k), 1.0)
        df = pd.DataFrame(
            {
                "ts": ts,
                "scan_id": scan_id,
                "host": np.repeat(host, k),
                "gpu": np.repeat(gpu, k),
                "index": np.repeat(np.arange(devices) % per_node, k),
                "model": "H100 80GB HBM3",
                "probe": "matmul",
                "settings": "n=8192,dtype=bf16",
                "sample": np.tile(np.arange(k), devices),
                "value": v,
                "unit": "GFLOP/s",
            }
        )
        return df

    past = []
    for j in range(history):  # drifting devices lose loss/(history+1) per scan, from their start
        lost = loss * j / (history + 1)
        past.append(scan(np.where(drifting, rate - lost, rate), f"scan{j:02d}", 1e9 + j * 3600, samples))
    k = samples * (1 + rounds)
    current = scan(np.where(drifting, rate - loss, rate), f"scan{history:02d}", 1e9 + history * 3600, k)
    if telemetry:
        _add_telemetry(current, cause, slowdown, node_of, k, rng)
    true_rate = np.where(drifting, rate - loss, rate)
    truth = pd.DataFrame(
        {
            "host": host,
            "gpu": gpu,
            "node": node_of,
            "kind": kind,
            "slowdown": slowdown,
            "true_deficit": 1 - true_rate / np.median(true_rate),
            "cause": cause,
            "loss": loss,
            "drifting": drifting,
        }
    )
    return Fleet(current, pd.concat(past, ignore_index=True) if past else None, truth, samples)


def _add_telemetry(df: pd.DataFrame, cause: np.ndarray, slowdown: np.ndarray, node_of: np.ndarray, k: int, rng) -> None:
    """Per-sample telemetry as a real GPU shows it for each injected cause (in place)."""
    n = len(cause)
    c = np.repeat(cause, k)
    s = np.repeat(slowdown, k)
    clock = CLOCK_MHZ * (1 + rng.normal(0, 0.002, n * k))
    low = np.isin(c, ("power_capped", "thermal", "hw_slowdown", "whole_node"))
    clock = np.where(low, CLOCK_MHZ * (1 - s), clock)
    temp = np.where(c == "thermal", rng.uniform(88, 92, n * k), rng.uniform(55, 70, n * k))
    power = np.where(c == "power_capped", LIMIT_W, LIMIT_W * rng.uniform(0.93, 1.0, n * k))
    # Share of the window each reason is active, by cause (healthy GPUs at full load sit at the power cap).
    reasons = {
        "": {"sw_power_cap": 0.8},
        "power_capped": {"sw_power_cap": 1.0},
        "thermal": {"sw_thermal_slowdown": 0.4, "sw_power_cap": 0.5},
        "hw_slowdown": {"hw_slowdown": 0.3, "sw_power_cap": 0.6},
    }
    mask = np.zeros(n * k, dtype=np.int64)
    shares = {key: reasons.get(key, reasons[""]) for key in np.unique(c)}
    for key, rs in shares.items():
        sel = c == key
        for name, share in rs.items():
            on = sel & (rng.random(n * k) < share)
            mask[on] |= THROTTLE_BITS[name]
    # Each node writes one form (different agents and exporters): 0 name=share (the window's share),
    # 1 an NVML bit mask of the sample, 2 the sample's names joined by |.
    form = np.repeat(node_of % 3, k)
    listed = {m: "|".join(r for r, b in THROTTLE_BITS.items() if m & b) for m in np.unique(mask).tolist()}
    cells = pd.Series(mask).map(listed).to_numpy(dtype=object)
    cells = np.where(form == 1, mask.astype(str).astype(object), cells)
    share_cell = {key: format_throttle(rs) for key, rs in shares.items()}
    cells = np.where(form == 0, pd.Series(c).map(share_cell).to_numpy(dtype=object), cells)
    df["sm_clock_mhz"] = clock
    df["power_w"] = power
    df["power_limit_w"] = LIMIT_W
    df["temp_c"] = temp
    df["throttle_reasons"] = cells
    df["pcie_gen"] = np.where(c == "pcie_link", 3, 5)
    df["pcie_gen_max"] = 5
    df["pcie_width"] = 16
    df["pcie_width_max"] = 16
    df["remapped_rows"] = np.where(c == "memory", 4, 0)
    df["ecc_uncorrected_total"] = np.where(c == "memory", 1, 0)
    df["processes"] = np.where(c == "contention", 2, 1)


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


RULES = {
    "superbench 10%": rule_superbench,
    "gpu-fryer 90% of best": rule_gpu_fryer,
    "megatron max(MAD,10%)": rule_megatron,
    "dcgm 0.75x ref": rule_dcgm,
    "mean - 3 sigma": rule_mean_3sigma,
}


def _by_truth(res, truth: pd.DataFrame) -> pd.DataFrame:
    return res.devices.set_index("gpu").reindex(truth["gpu"]).reset_index()


def detect(
    fleet: Fleet,
    config: AnalysisConfig,
    rounds: int = 0,
    use_history: bool = False,
    as_needed: bool = False,
    round_cap: int | None = None,
):
    """Analyse the first round's samples, then give the undecided devices their next reserve
    samples, up to ``rounds`` times: 5 each round, or (``as_needed``) the device's ``samples_needed``
    (at least 5; all 5 where it has none). Returns ([device table per round, aligned with truth],
    seconds of the first analysis, rounds run)."""
    df = fleet.samples
    n = len(fleet.truth)
    per = len(df) // n
    have = np.full(n, fleet.base_samples)
    dev_of_row = np.arange(len(df)) // per
    sample = df["sample"].to_numpy()
    history = fleet.history if use_history else None
    out, dt = [], 0.0
    for r in range(rounds + 1):
        rows = df[sample < have[dev_of_row]]
        t0 = time.perf_counter()
        res = analyze(rows, history, config)
        if r == 0:
            dt = time.perf_counter() - t0
        d = _by_truth(res, fleet.truth)
        out.append(d)
        undecided = (d["verdict"] == "undecided").to_numpy()
        if r == rounds or not undecided.any() or (have[undecided] >= per).all():
            break
        more = np.full(n, fleet.base_samples)
        if as_needed:
            need = d["samples_needed"].to_numpy(dtype=float)
            more = np.where(np.isfinite(need), np.maximum(need, fleet.base_samples), more).astype(int)
            if round_cap:  # straggler scan's cap: at most ROUND_SAMPLES_FACTOR x the first round's
                more = np.minimum(more, round_cap)
        have = np.where(undecided, np.minimum(have + more, per), have)
    return out, dt, len(out) - 1


def detector_row(truth: pd.DataFrame, d: pd.DataFrame, clean: pd.DataFrame | None = None) -> dict:
    flagged = d["straggler"].fillna(False).to_numpy(dtype=bool)
    row = {}
    for s in SLOWDOWNS:
        sel = (truth["kind"] == f"straggler {s:.0%}").to_numpy()
        row[f"recall {s:.0%}"] = (flagged[sel].sum(), sel.sum())
    sel = (truth["kind"] == "whole node 8%").to_numpy()
    row["whole node 8%"] = (flagged[sel].sum(), sel.sum())
    low = (truth["true_deficit"] <= T - 0.015).to_numpy()
    row["FPR <=T-1.5pt"] = (flagged[low].sum(), low.sum())
    row["false drain"] = ((flagged & (truth["true_deficit"] < T).to_numpy()).sum(), flagged.sum())
    row["undecided"] = ((d["verdict"] == "undecided").sum(), len(d))
    row["slow"] = ((d["verdict"] == "slow").sum(), len(d))
    if clean is not None:
        row["no-straggler fleet flagged"] = (clean["straggler"].fillna(False).sum(), len(clean))
    return row


def _cell(k: int, n: int, count: bool = False) -> str:
    return "-" if not n else f"{k / n:.4f} ({k}/{n})" if count else f"{k / n:.4f}"


def md_table(first: str, rows: dict[str, dict], counts=("FPR", "false drain", "no-straggler", "stable")) -> str:
    cols = list(next(iter(rows.values())).keys())
    lines = ["| " + " | ".join([first] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        cells = [r[c] if isinstance(r[c], str) else _cell(*r[c], count=c.startswith(counts)) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anchor_rows(fleet: Fleet) -> dict[str, dict]:
    first = fleet.samples[fleet.samples["sample"] < fleet.base_samples]
    d = _device_medians(first)
    truth = fleet.truth
    out = {}
    low = (truth["true_deficit"] <= T - 0.015).to_numpy()
    for name, rule in RULES.items():
        f = pd.Series(rule(d), index=d["gpu"]).reindex(truth["gpu"]).to_numpy(dtype=bool)
        row = {}
        for s in SLOWDOWNS[2:]:
            sel = (truth["kind"] == f"straggler {s:.0%}").to_numpy()
            row[f"recall {s:.0%}"] = (f[sel].sum(), sel.sum())
        row["FPR <=T-1.5pt"] = (f[low].sum(), low.sum())
        row["false drain"] = ((f & (truth["true_deficit"] < T).to_numpy()).sum(), f.sum())
        out[name] = row
    return out


def cause_row(truth: pd.DataFrame, d: pd.DataFrame) -> dict:
    """Per injected cause with telemetry evidence: share of the flagged stragglers named with it."""
    flagged = d["straggler"].fillna(False).to_numpy(dtype=bool)
    named = d["causes"].to_numpy(dtype=object)
    row, hit, tot = {}, 0, 0
    for cause in (*[c for c, v in CAUSES.items() if v], "whole_node"):
        want = CAUSES.get(cause, cause)
        sel = np.flatnonzero(flagged & (truth["cause"] == cause).to_numpy())
        k = sum(want in (named[i] or ()) for i in sel)
        row[cause] = (k, len(sel))
        hit, tot = hit + k, tot + len(sel)
    sel = np.flatnonzero(flagged & (truth["cause"] == "none").to_numpy())
    row["all with evidence"] = (hit, tot)
    row["none injected: unexplained"] = (sum("unexplained" in (named[i] or ()) for i in sel), len(sel))
    return row


def history_row(fleet: Fleet, config: AnalysisConfig) -> dict:
    d = _by_truth(analyze(fleet.samples, fleet.history, config), fleet.truth)
    truth = fleet.truth
    degraded = d["degraded"].fillna(False).to_numpy(dtype=bool)
    flagged = d["straggler"].fillna(False).to_numpy(dtype=bool)
    drift = truth["drifting"].to_numpy()
    stable = (truth["kind"] != "drifting").to_numpy()
    inside = drift & (truth["true_deficit"] < T).to_numpy()
    reach = drift & (truth["true_deficit"] >= T).to_numpy()
    return {
        "degraded recall": (degraded[drift].sum(), drift.sum()),
        "degraded recall, ending inside T": (degraded[inside].sum(), inside.sum()),
        "stable marked": (degraded[stable].sum(), stable.sum()),
        "straggler among drifting >= T": (flagged[reach].sum(), reach.sum()),
        "straggler among drifting < T": (flagged[inside].sum(), inside.sum()),
    }


def scan_summaries(history: pd.DataFrame, config: AnalysisConfig, form: str = "both") -> pd.DataFrame:
    """Past scans as a collector could keep them (issue 13's per-scan summaries): each scan analysed
    alone when its results arrive, one row per device and scan. ``form`` "both": the row's
    ``value`` and ``median`` are the scan's (the summary the engine reads as such); "median" or
    "value": that one number as the row's one sample (what a summary of one number would give)."""
    parts = []
    for sid, scan in history.groupby("scan_id", sort=False):
        d = analyze(scan, None, config).devices
        part = pd.DataFrame({c: d[c] for c in ("host", "gpu", "index", "model", "probe", "settings")})
        part = part.assign(scan_id=sid, ts=scan["ts"].max(), sample=0)
        part["value"] = d["median" if form == "median" else "value"].to_numpy()
        if form == "both":
            part["median"] = d["median"].to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def summaries_row(fleet: Fleet, config: AnalysisConfig) -> dict:
    """The verdicts with the raw history and with per-scan summaries of it, side by side."""
    raw = analyze(fleet.samples, fleet.history, config).devices.set_index(["gpu", "probe"]).sort_index()
    row: dict = {}
    for form in ("both", "median", "value"):
        summ = scan_summaries(fleet.history, config, form)
        row["history rows (raw / summaries)"] = f"{len(fleet.history):,} / {len(summ):,}"
        got = replace(fleet, history=summ)
        h = history_row(got, config)
        row[f"degraded recall ({form})"] = h["degraded recall"]
        row[f"stable marked ({form})"] = h["stable marked"]
        d = analyze(got.samples, summ, config).devices.set_index(["gpu", "probe"]).sort_index()
        same = (d["verdict"] == raw["verdict"]) & (d["degraded"] == raw["degraded"])
        same &= d["change_scan"].fillna("-") == raw["change_scan"].fillna("-")
        row[f"same verdict, degraded, change scan ({form})"] = (int(same.sum()), len(same))
        gap = (d["history_baseline"] / raw["history_baseline"] - 1).abs()
        row[f"baseline vs raw, median / max ({form})"] = f"{gap.median():.2%} / {gap.max():.2%}"
    return row


def run(spreads, devices: int, rounds: int, history: int, seed: int = 0, round_cap: int | None = None) -> str:
    cfg = AnalysisConfig()
    one, after, as_needed, anchors, causes, hist, summ, spread_rows, times = {}, {}, {}, {}, {}, {}, {}, {}, {}
    for sp in spreads:
        label = f"{sp:.1%}"
        t0 = time.perf_counter()
        fleet = make_fleet(seed=seed, devices=devices, silicon=sp, rounds=rounds)
        clean = make_fleet(seed=seed + 1000, devices=devices, silicon=sp, slowdowns=(), slow_nodes=0, telemetry=False)
        cd, _, _ = detect(clean, cfg)
        tables, dt, ran = detect(fleet, cfg, rounds)
        one[label] = detector_row(fleet.truth, tables[0], cd[0])
        last = tables[-1]
        sel = (fleet.truth["kind"] == f"straggler {T + 0.01:.0%}").to_numpy()

        def by_round(ts):
            return "/".join(f"{t['straggler'].fillna(False).to_numpy(dtype=bool)[sel].mean():.2f}" for t in ts)

        def samples_used(ts):  # mean samples per device over the rounds, the first round's 5 included
            return f"{ts[-1]['n_samples'].mean():.2f}"

        after[label] = {
            "rounds run": str(ran),
            f"recall {T + 0.01:.0%} by round": by_round(tables),
            "samples/device": samples_used(tables),
            **detector_row(fleet.truth, last),
        }
        needed, _, ran_n = detect(fleet, cfg, rounds, as_needed=True, round_cap=round_cap)
        as_needed[label] = {
            "rounds run": str(ran_n),
            f"recall {T + 0.01:.0%} by round": by_round(needed),
            "samples/device": samples_used(needed),
            **detector_row(fleet.truth, needed[-1]),
        }
        anchors.update({f"{label} {k}": v for k, v in anchor_rows(fleet).items()})
        causes[label] = cause_row(fleet.truth, last)
        res = analyze(fleet.samples[fleet.samples["sample"] < fleet.base_samples], None, cfg)
        g = res.summary["groups"][0]
        spread_rows[label] = {
            "estimated spread (robust)": f"{g['spread']:.4f}",
            "net of noise": f"{g['spread_net']:.4f}",
            "noise": f"{g['noise']:.4f}",
            "warning": "yes" if res.summary["warnings"] else "no",
        }
        if history:
            past = make_fleet(seed=seed + 2000, devices=devices, silicon=sp, history=history, telemetry=False)
            hist[label] = history_row(past, cfg)
            summ[label] = summaries_row(past, cfg)
        times[label] = (dt, time.perf_counter() - t0)
        print(f"  spread {label}: analyze {dt:.2f} s, all of it {times[label][1]:.1f} s", file=sys.stderr)
    parts = [
        f"## one round (5 samples), T = min_effect = {T:.0%}, fdr = {cfg.fdr}\n",
        md_table("silicon spread", one),
        f"\n## after re-measurement (undecided devices get 5 more samples per round, at most {rounds} rounds)\n",
        md_table("silicon spread", after),
        "\n## after re-measurement, each undecided device given its samples_needed (at least 5"
        + (f", at most {round_cap}" if round_cap else "")
        + ") per round\n",
        md_table("silicon spread", as_needed),
        "\n## the healthy spread the analysis reports (summary.groups), and its warning\n",
        md_table("silicon spread", spread_rows),
        "\n## named cause among flagged stragglers (after re-measurement)\n",
        md_table("silicon spread", causes),
        "\n## anchor rules (per-device medians of the first 5 samples)\n",
        md_table("spread, rule", anchors),
    ]
    if history:
        parts += [
            f"\n## own history: {history} past scans, 1% of devices lose U(T, 1.5T)\n",
            md_table("silicon spread", hist),
            "\n## own history from per-scan summaries (each past scan analysed alone, one row per device and "
            "scan): both: its value and median; median or value: that one number as its one sample. "
            "Against the raw samples above\n",
            md_table("silicon spread", summ, counts=("stable", "same")),
        ]
    return "\n".join(parts)


# The reference process: a bare pandas read of the file and a groupby of its samples by device.
BARE_READ = (
    "import sys, pandas as pd; p = sys.argv[1]; "
    "df = pd.read_parquet(p) if p.endswith('.parquet') else pd.read_csv(p); "
    "df.groupby(['host', 'gpu', 'probe'], sort=False)['value'].median()"
)


def _timed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one process, its stdout discarded."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) in (0, 1), err[-2000:]
    return wall, usage.ru_utime + usage.ru_stime


def _cpu_timed(out: list, fn, *args):
    """fn(*args), appending (wall seconds, CPU seconds of this process: user + system) to ``out``."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = fn(*args)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    out.append((wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime))
    return result, out[-1]


def scale_frame(devices: int = 100_000, probes: int = 3, samples: int = 10) -> pd.DataFrame:
    frames = []
    for p, name in enumerate(("matmul", "membw", "allreduce")[:probes]):
        f = make_fleet(seed=100 + p, devices=devices, samples=samples, telemetry=False).samples
        frames.append(f.assign(probe=name))
    df = pd.concat(frames, ignore_index=True)
    for c in ("host", "gpu", "probe", "model", "settings", "unit", "scan_id"):
        df[c] = df[c].astype("string")
    return df


def scale_runtime(
    devices: int = 100_000, probes: int = 3, samples: int = 10, repeats: int = 3, compare: str | None = None
) -> str:
    """Runtime of analyze() on devices x probes x samples rows (excluding file reading), then the
    whole `straggler analyze` process (--json, and the table) side by side with a bare pandas read +
    groupby of the same file, each a fresh process, interleaved ``repeats`` times: medians.
    ``compare``: the directory of another build of the package (``straggler/`` with its subpackages,
    put first on PYTHONPATH), timed in the same rounds."""
    df = scale_frame(devices, probes, samples)
    analyze(df.head(1000), None, AnalysisConfig())  # warm imports
    times = {"analyze()": [], "bare pandas groupby": []}
    for _ in range(repeats):  # interleaved: both see the same load
        res, _ = _cpu_timed(times["analyze()"], analyze, df)
        _cpu_timed(
            times["bare pandas groupby"], lambda: df.groupby(["host", "gpu", "probe"], sort=False)["value"].median()
        )
    (wall, cpu), (bare_wall, bare_cpu) = (np.median(np.array(v), axis=0) for v in times.values())
    lines = [
        f"analyze(): {len(df):,} rows ({devices:,} devices x {probes} probes x {samples} samples), "
        f"median of {repeats} runs: {wall:.2f} s wall (min {min(t[0] for t in times['analyze()']):.2f} s), "
        f"{cpu:.2f} s CPU; in the same rounds a bare pandas groupby(host, gpu, probe).value.median() of "
        f"the same frame: {bare_wall:.2f} s wall, {bare_cpu:.2f} s CPU ({wall / bare_wall:.1f}x wall, "
        f"{cpu / bare_cpu:.1f}x CPU); {res.summary['stragglers']} flagged.",
        "",
        f"Whole processes, interleaved, median of {repeats}; the bare read is `pd.read_parquet` or "
        "`pd.read_csv`, then `groupby(host, gpu, probe).value.median()`:",
        "",
        "| file | process | wall | CPU (user + system) | wall / bare | CPU / bare |",
        "|---|---|---|---|---|---|",
    ]
    builds = {"": None}
    if compare:
        builds[f" ({compare})"] = {**os.environ, "PYTHONPATH": compare}
    commands = {"bare pandas read + groupby": ([sys.executable, "-c", BARE_READ], [], None)}
    for label, env in builds.items():
        commands[f"`straggler analyze FILE --json`{label}"] = (
            [sys.executable, "-m", "straggler", "analyze"],
            ["--json"],
            env,
        )
        commands[f"`straggler analyze FILE` (table){label}"] = ([sys.executable, "-m", "straggler", "analyze"], [], env)
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".parquet", ".csv"):
            path = Path(tmp) / f"fleet{suffix}"
            write_table(df, path)
            runs = {k: [] for k in commands}
            for _ in range(repeats):
                for k, (head, tail, env) in commands.items():
                    # from the temporary directory: `-m straggler` would import a checkout in the cwd first
                    runs[k].append(_timed([*head, str(path), *tail], env, cwd=tmp))
            med = {k: np.median(np.array(v), axis=0) for k, v in runs.items()}
            bare = med["bare pandas read + groupby"]
            for k, (wall, cpu) in med.items():
                lines.append(
                    f"| {suffix[1:]} ({path.stat().st_size / 1e6:.0f} MB) | {k} | {wall:.2f} s | "
                    f"{cpu:.2f} s | {wall / bare[0]:.1f}x | {cpu / bare[1]:.1f}x |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--spreads", default="0.001,0.005,0.01,0.017,0.025", help="silicon spreads (robust std)")
    ap.add_argument("--rounds", type=int, default=6, help="re-measurement rounds for undecided devices")
    ap.add_argument("--history", type=int, default=6, help="past scans for the history table (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--round-cap",
        type=int,
        default=None,
        help="at most this many samples per device and round in the samples_needed table "
        "(straggler scan: 4 x the first round's)",
    )
    ap.add_argument("--no-scale", action="store_true", help="skip the 100,000-device runtime run")
    ap.add_argument("--scale-only", action="store_true", help="only the 100,000-device runtime run")
    ap.add_argument(
        "--repeats", type=int, default=None, help="runs of each process in the scale table [3; 5 with --scale-only]"
    )
    ap.add_argument(
        "--compare",
        default=None,
        help="scale table: also time the build of straggler in this directory (put first on PYTHONPATH)",
    )
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(
        f"# detection benchmark ({a.devices:,} devices per fleet, 5 samples, 1% t(4) noise, 3% dips; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})"
    )
    if a.scale_only:
        print(scale_runtime(repeats=a.repeats or 5, compare=a.compare))
        return 0
    spreads = [float(x) for x in a.spreads.split(",") if x.strip()]
    print(run(spreads, a.devices, a.rounds, a.history, a.seed, a.round_cap))
    if not a.no_scale:
        print("\n## scale\n")
        print(scale_runtime(repeats=a.repeats or 3, compare=a.compare))
    print(f"\n(total {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
