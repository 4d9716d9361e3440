"""What the report shows, computed from the analysis' output (never a second analysis).

Inputs are the analysis' device table (``res.devices``, the columns of
``straggler.analysis.result.DEVICE_COLUMNS``), its summary, and the result table it read
(current and earlier scans), from which the flagged devices' samples, per-scan history and
telemetry are taken. Everything here aggregates: bin counts, one cell per node or band of nodes,
a few flagged devices in detail, so the report of 100,000 devices stays small and fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from straggler.analysis import causes, cost, groups, history
from straggler.analysis.tiers import TIERS

BINS = 60  # histogram bins per model and probe
MAX_MARKS = 400  # flagged devices marked under one histogram (the rest counted)
MAX_LABELS = 8  # of those, labelled in the chart (every mark has its label as hover text)
TOP_NODES = 40  # nodes shown one per row in the heatmap, worst first; the rest in bands
BANDS = 40  # at most this many bands of the remaining nodes
MAX_COLUMNS = 48  # device indices per heatmap row before indices are banded
MAX_DETAILS = 40  # flagged devices shown in detail (every one is in the table)
PEER_TELEMETRY = 4000  # peers whose telemetry gives the peers' median in the details (every k-th device)
CURVE_POINTS = 10  # job sizes per job-cost curve, about
MAX_TABLE = 500  # rows of the flagged table, costliest first (the rest counted; --json has every entry)
TELEMETRY = (
    "sm_clock_mhz",
    "power_w",
    "power_limit_w",
    "temp_c",
    "pcie_gen",
    "pcie_width",
    "ecc_uncorrected_total",
    "remapped_rows",
    "retired_pages",
    "processes",
    *causes.REASONS,
)


@dataclass(frozen=True)
class Report:
    """Everything the page draws (plain Python values)."""

    summary: dict
    distributions: list[dict]
    heatmap: dict
    jobs: list[dict]
    classes: list[dict]
    flagged: list[dict]  # the table: every flagged entry (up to MAX_TABLE)
    details: list[dict]  # the first MAX_DETAILS of them, with samples, history and telemetry
    n_flagged: int
    meta: dict = field(default_factory=dict)


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _label(host, index, gpu) -> str:
    i = _num(index)
    return f"{host}/{int(i)}" if math.isfinite(i) else f"{host}/{gpu}"


def _group_codes(d: pd.DataFrame) -> tuple[np.ndarray, int]:
    return groups.factorize(d["model"], d["probe"], d["settings"])


def build(
    devices: pd.DataFrame,
    summary: dict,
    samples: pd.DataFrame | None = None,
    past: pd.DataFrame | None = None,
    meta: dict | None = None,
) -> Report:
    """The report of one analysis. ``samples``: the rows it analysed (all scans); ``past``: the
    history rows it was given."""
    d = devices.reset_index(drop=True)
    t = float(summary.get("min_effect") or 0.04)
    code, n = _group_codes(d)
    flagged_mask = d["straggler"].to_numpy(dtype=bool) | d["degraded"].fillna(False).to_numpy(dtype=bool)
    flagged = d[flagged_mask]  # the device table is ranked: stragglers first, by cost
    details = _details(flagged.head(MAX_DETAILS), samples, past, summary)
    return Report(
        summary=dict(summary),
        distributions=_distributions(d, code, n, summary),
        heatmap=_heatmap(d, t),
        jobs=_jobs(d, code, n, summary),
        classes=_classes(d, code, n),
        flagged=[_entry(r) for r in flagged.head(MAX_TABLE).to_dict("records")],
        details=details,
        n_flagged=int(flagged_mask.sum()),
        meta=dict(meta or {}),
    )


def _threshold(summary: dict, group_size: float) -> float:
    few = math.isfinite(group_size) and group_size < 4
    return float(summary.get("min_effect_few" if few else "min_effect") or 0.04)


def _distributions(d: pd.DataFrame, code: np.ndarray, n: int, summary: dict) -> list[dict]:
    """Per model, probe and settings: the ratios' histogram stacked by tier, T, the slow line, and
    a mark per flagged device."""
    ratio = d["ratio"].to_numpy(dtype=float)
    verdict = d["verdict"].astype(str).to_numpy()
    strag = d["straggler"].to_numpy(dtype=bool)
    size = pd.to_numeric(d["peer_group_size"], errors="coerce").to_numpy(dtype=float)
    spread = pd.to_numeric(d["peer_spread"], errors="coerce").to_numpy(dtype=float)
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(n + 1))
    out = []
    for g in range(n):
        idx = order[bounds[g] : bounds[g + 1]]
        r = ratio[idx]
        ok = np.isfinite(r)
        first = idx[0]
        item = {
            "model": str(d["model"].iat[first]),
            "probe": str(d["probe"].iat[first]),
            "settings": _text(d["settings"].iat[first]),
            "entries": int(len(idx)),
            "no_ratio": int((~ok).sum()),
        }
        if not ok.any():
            out.append(item)
            continue
        gsize = float(np.nanmedian(size[idx])) if np.isfinite(size[idx]).any() else float("nan")
        t = _threshold(summary, gsize)
        lo = max(min(float(r[ok].min()), 1 - 1.5 * t), 1 - 6 * t)
        hi = min(max(float(r[ok].max()), 1 + t / 2), 1 + 3 * t)
        edges = np.linspace(lo, hi, BINS + 1)
        clipped = np.clip(r[ok], lo, hi)
        tiers = verdict[idx][ok]
        stacks = [(tier, np.histogram(clipped[tiers == tier], edges)[0].tolist()) for tier in reversed(TIERS)]
        vlines = [(1.0, "peer median"), (1 - t, f"T {t:.1%}")]
        sp = spread[idx]
        if np.isfinite(sp).any():
            s = float(np.nanmedian(sp))
            vlines.append((1 - float(summary.get("slow_sigmas") or 2.5) * s, "slow"))
        fl = idx[strag[idx] & np.isfinite(ratio[idx])]
        fl = fl[np.argsort(ratio[fl], kind="stable")]
        n_flagged = len(fl)
        fl = fl[:MAX_MARKS]
        marks = [
            (float(r_), f"{_label(h, i_, g)} {r_:.3f}x", g)
            for r_, h, i_, g in zip(ratio[fl], d["host"].take(fl), d["index"].take(fl), d["gpu"].take(fl))
        ]
        item.update(
            {
                "edges": edges.tolist(),
                "stacks": stacks,
                "vlines": vlines,
                "marks": marks,
                "unmarked": int(max(n_flagged - MAX_MARKS, 0)),
                "threshold": t,
                "clipped": int(((r[ok] < lo) | (r[ok] > hi)).sum()),
                "tiers": {tier: int((tiers == tier).sum()) for tier in TIERS},
            }
        )
        out.append(item)
    return out


def _text(v) -> str:
    return "" if v is None or v is pd.NA or (isinstance(v, float) and not math.isfinite(v)) else str(v)


def _heatmap(d: pd.DataFrame, t: float) -> dict:
    """Node x device index: each device's worst ratio over its probes. The TOP_NODES worst nodes
    (lowest mean ratio) one per row, then the remaining nodes in bands (mean per index)."""
    ratio = d["ratio"].to_numpy(dtype=float)
    unit, n_unit = groups.factorize(d["host"], d["gpu"])
    worst = groups.extreme(unit, np.where(np.isfinite(ratio), ratio, np.inf), n_unit, "min")
    worst = np.where(np.isfinite(worst), worst, np.nan)
    first = groups.first_index(unit, n_unit)
    host = d["host"].to_numpy(dtype=object)[first]
    gpu = d["gpu"].to_numpy(dtype=object)[first]
    index = pd.to_numeric(d["index"], errors="coerce").to_numpy(dtype=float)[first]
    h_code, hosts = pd.factorize(pd.Series(host, dtype=object))
    n_host = len(hosts)
    if n_host == 0:
        return {"rows": [], "columns": [], "hosts": 0}
    # the column: the device index, else its position among the host's devices
    pos = np.empty(n_unit, dtype=np.int64)
    o = np.lexsort((gpu.astype(str), h_code))
    starts = np.searchsorted(h_code[o], np.arange(n_host))
    pos[o] = np.arange(n_unit) - starts[h_code[o]]
    col = np.where(np.isfinite(index), index, pos).astype(np.int64)
    col_vals = np.unique(col)
    col_code = np.searchsorted(col_vals, col)
    if len(col_vals) > MAX_COLUMNS:  # many devices per node (CPU cores): bands of indices
        per = math.ceil(len(col_vals) / MAX_COLUMNS)
        col_code //= per
        names = [
            f"{col_vals[k * per]}-{col_vals[min(k * per + per, len(col_vals)) - 1]}"
            for k in range(math.ceil(len(col_vals) / per))
        ]
    else:
        names = [str(v) for v in col_vals]
    n_col = len(names)
    with np.errstate(invalid="ignore"):
        h_mean = groups.mean(h_code, worst, n_host)
        h_min = groups.extreme(h_code, np.where(np.isfinite(worst), worst, np.inf), n_host, "min")
    h_order = np.lexsort((h_min, np.where(np.isfinite(h_mean), h_mean, np.inf)))
    rank = np.empty(n_host, dtype=np.int64)
    rank[h_order] = np.arange(n_host)
    rest = max(n_host - TOP_NODES, 0)
    per_band = max(math.ceil(rest / BANDS), 1)
    row = np.where(rank < TOP_NODES, rank, TOP_NODES + (rank - TOP_NODES) // per_band)
    n_row = int(row.max()) + 1
    cell = row[h_code] * n_col + col_code
    with np.errstate(invalid="ignore"):
        mean = groups.mean(cell, worst, n_row * n_col).reshape(n_row, n_col)
        low = groups.extreme(cell, np.where(np.isfinite(worst), worst, np.inf), n_row * n_col, "min")
    low = np.where(np.isfinite(low), low, np.nan).reshape(n_row, n_col)
    cnt = np.bincount(cell, minlength=n_row * n_col).reshape(n_row, n_col)
    who = {}
    one = rank[h_code] < TOP_NODES
    for i in np.flatnonzero(one):
        who[(int(row[h_code[i]]), int(col_code[i]))] = gpu[i]
    rows = []
    for k in range(n_row):
        if k < TOP_NODES:
            label = str(hosts[h_order[k]])
        else:
            a = TOP_NODES + (k - TOP_NODES) * per_band + 1
            label = f"nodes {a}-{min(a + per_band - 1, n_host)} (mean)"
        hover = []
        for j in range(n_col):
            if not cnt[k, j]:
                hover.append(f"{label} #{names[j]}: no device")
            elif k < TOP_NODES and n_col == len(col_vals):
                hover.append(f"{label} #{names[j]} {who.get((k, j), '')}: ratio {_r(mean[k, j])}")
            else:
                hover.append(
                    f"{label} #{names[j]}: {cnt[k, j]} devices, mean ratio {_r(mean[k, j])}, worst {_r(low[k, j])}"
                )
        one_each = k < TOP_NODES and n_col == len(col_vals)  # a cell is one device: its GPU
        rows.append(
            {
                "label": label,
                "host": label if k < TOP_NODES else None,
                "values": [float(v) for v in mean[k]],
                "hover": hover,
                "gpus": [who.get((k, j)) if one_each else None for j in range(n_col)],
            }
        )
    return {"rows": rows, "columns": names, "hosts": int(n_host), "threshold": t, "per_band": per_band}


def _r(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3f}"


def _jobs(d: pd.DataFrame, code: np.ndarray, n: int, summary: dict) -> list[dict]:
    """The job-cost curve per model and probe with flagged devices: the expected step time of an
    N-device job with every device and without the flagged ones (``straggler.analysis.cost``)."""
    ratio = d["ratio"].to_numpy(dtype=float)
    strag = d["straggler"].to_numpy(dtype=bool)
    if not strag.any():
        return []
    with np.errstate(invalid="ignore", divide="ignore"):
        step = np.where(np.isfinite(ratio) & (ratio > 0), 1 / ratio, np.nan)
    size = np.bincount(code, minlength=n)
    top = int(size.max())
    # about CURVE_POINTS powers of 2, each group's own size, and the analysis' job sizes
    powers = range(1, int(math.log2(max(top, 2))) + 1)
    stride = math.ceil(len(powers) / CURVE_POINTS)
    hit = np.bincount(code, weights=strag, minlength=n) > 0
    sizes = sorted(
        {2**k for k in powers[::stride]}
        | {int(s) for s in size[hit] if s > 1}
        | {int(s) for s in (summary.get("job_sizes") or ()) if 0 < s <= top}
    )
    at = groups.first_index(code, n)
    labels = [
        {"model": str(d["model"].iat[i]), "probe": str(d["probe"].iat[i]), "settings": _text(d["settings"].iat[i])}
        for i in at
    ]
    curves: dict[int, dict] = {}
    key = {(lab["model"], lab["probe"], lab["settings"]): g for g, lab in enumerate(labels)}
    for row in cost.job_gain(step, strag, code, n, labels, tuple(sizes)):
        g = key[(row["model"], row["probe"], row["settings"])]
        c = curves.setdefault(
            g,
            {
                **labels[g],
                "devices": int(size[g]),
                "flagged": int(strag[code == g].sum()),
                "n": [],
                "all": [],
                "without": [],
            },
        )
        c["n"].append(row["job_devices"])
        c["all"].append(_nan(row["step_time_all"]))
        c["without"].append(_nan(row["step_time_without_stragglers"]))
    return sorted(curves.values(), key=lambda c: -c["flagged"])


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _classes(d: pd.DataFrame, code: np.ndarray, n: int) -> list[dict]:
    """Per model and probe with placement classes: devices and ratio range of each class."""
    pc = d["perf_class"]
    has = pc.notna().to_numpy()
    if not has.any():
        return []
    ratio = d["ratio"].to_numpy(dtype=float)
    cls = pc.astype(str).to_numpy()
    out = []
    for g in np.unique(code[has]):
        sel = has & (code == g)
        i = int(np.flatnonzero(sel)[0])
        row: dict[str, Any] = {
            "model": str(d["model"].iat[i]),
            "probe": str(d["probe"].iat[i]),
            "settings": _text(d["settings"].iat[i]),
            "classes": {},
        }
        for c in ("A", "B", "C", "D"):
            r = ratio[sel & (cls == c)]
            r = r[np.isfinite(r)]
            row["classes"][c] = {
                "devices": int(len(r)),
                "low": float(r.min()) if len(r) else float("nan"),
                "high": float(r.max()) if len(r) else float("nan"),
            }
        out.append(row)
    return out


def _entry(r: dict) -> dict:
    keep = (
        "host",
        "gpu",
        "index",
        "model",
        "probe",
        "settings",
        "verdict",
        "degraded",
        "straggler",
        "basis",
        "deficit",
        "cost",
        "ratio",
        "ratio_low",
        "ratio_high",
        "perf_class",
        "peer_median",
        "value",
        "n_samples",
        "n_kept",
        "evidence",
        "change_loss",
        "change_scan",
        "history_scans",
        "q_value",
    )
    out = {k: r.get(k) for k in keep}
    out["causes"] = list(r.get("causes") or ())
    out["label"] = _label(r["host"], r.get("index"), r["gpu"])
    return out


def _details(
    flagged: pd.DataFrame, samples: pd.DataFrame | None, past: pd.DataFrame | None, summary: dict
) -> list[dict]:
    """The flagged devices in detail: samples of the current scan, per-scan history relative to
    the peers (with the change point), telemetry against the peers', and the action per cause."""
    out = []
    for r in flagged.to_dict("records"):
        e = _entry(r)
        e["actions"] = [(c, causes.ACTIONS.get(c, "")) for c in e["causes"]] or (
            [
                (
                    "degraded",
                    "Lost performance against its own past: re-measure, and watch it; act on the "
                    "cause once it becomes a straggler.",
                )
            ]
            if e["degraded"]
            else []
        )
        e.update({"samples": [], "series": None, "telemetry": []})
        out.append(e)
    frames = [f for f in (past, samples) if f is not None and len(f)]
    if not out or not frames:
        return out
    need = {"host", "gpu", "probe", "model", "value"}
    frames = [f for f in frames if need <= set(f.columns)]
    if not frames:
        return out
    used = [*need, "median", "settings", "scan_id", "ts", "sample", "throttle_reasons", *causes.TELEMETRY]
    frames = [f[[c for c in dict.fromkeys(used) if c in f.columns]] for f in frames]  # only what is read
    rows = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    if "settings" not in rows.columns:
        rows = rows.assign(settings=None)
    _fill(out, rows)
    return out


def _fill(out: list[dict], rows: pd.DataFrame) -> None:
    """Samples, per-scan series and telemetry of the detailed devices, from the rows of their peer groups."""
    gpus = {e["gpu"] for e in out}
    # rows of the detailed devices' peer groups only: the groups their own rows are in
    g_all, _ = groups.factorize(rows["model"], rows["probe"], rows["settings"])
    own = rows["gpu"].isin(gpus).to_numpy(dtype=bool)
    in_group = np.isin(g_all, np.unique(g_all[own]))
    sub = rows if in_group.all() else rows[in_group].reset_index(drop=True)
    g = groups.factorize(g_all[in_group])[0]
    rank = history.scan_rank(sub)
    several = len(rank) > 0 and rank.min() != rank.max()  # else no history: no series to draw
    dev, n_dev = groups.factorize(sub["host"], sub["gpu"], sub["probe"], sub["settings"])
    value = pd.to_numeric(sub["value"], errors="coerce").to_numpy(dtype=float)
    # per (device, scan): the sample median; per (group, scan): the centre of those (the analysis'
    # history.centre: median of 4+ devices, else the others' mean), and the device's ratio to it
    if several:
        ds, n_ds = groups.factorize(dev, rank)
        # a per-scan summary row (history with a median: docs/analysis.md) gives its scan's median
        given = (
            pd.to_numeric(sub["median"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            if "median" in sub.columns
            else np.full(len(sub), np.nan)
        )
        med = groups.median(ds, np.where(np.isfinite(given), given, value), n_ds)
        at = groups.first_index(ds, n_ds)
        gs, n_gs = groups.factorize(g[at], rank[at])
        centre = history.centre(gs, med, n_gs)
        current = rank == groups.extreme(dev, rank.astype(float), n_dev, "max")[dev]
        ts = pd.to_numeric(sub["ts"], errors="coerce").to_numpy(dtype=float) if "ts" in sub.columns else None
        ds_ts = groups.extreme(ds, ts, n_ds, "max") if ts is not None else np.full(n_ds, np.nan)
        scan_ids = sub["scan_id"].astype("string") if "scan_id" in sub.columns else None
    else:
        current = np.ones(len(sub), dtype=bool)
    first = groups.first_index(dev, n_dev)
    # the detailed devices' codes: from the rows of their GPUs only (a dict of every device is slow)
    mine = np.flatnonzero(own[in_group])
    mine = mine[np.unique(dev[mine], return_index=True)[1]]
    keys = {
        k: int(dev[i])
        for i, k in zip(
            mine,
            zip(
                sub["host"].iloc[mine],
                sub["gpu"].iloc[mine],
                sub["probe"].iloc[mine],
                sub["settings"].astype("string").fillna("").iloc[mine],
            ),
        )
    }
    # telemetry of the current scan: the detailed devices', and their peers' median over at most
    # about PEER_TELEMETRY devices of each group (every k-th device: a median of thousands is exact
    # enough to read, and reading every device's telemetry of a 100,000-device fleet is not needed)
    step = max(1, n_dev // PEER_TELEMETRY)
    use = current & ((dev % step == 0) | own[in_group])
    tel = causes.device_telemetry(sub[use].reset_index(drop=True), dev[use], n_dev)
    dev_group = g[first]
    n_g = int(g.max()) + 1 if len(g) else 0
    peers = np.arange(n_dev) % step == 0
    peer_of = {c: groups.median(dev_group[peers], v[peers], n_g) for c, v in tel.items()}
    for e in out:
        k = keys.get((e["host"], e["gpu"], e["probe"], _text(e["settings"])))
        if k is None:
            continue
        mine = np.flatnonzero(dev == k)
        now = mine[current[mine]]
        smp = (
            pd.to_numeric(sub["sample"].iloc[now], errors="coerce").to_numpy(dtype=float)
            if "sample" in sub.columns
            else np.arange(len(now), dtype=float)
        )
        e["samples"] = sorted(zip(np.where(np.isfinite(smp), smp, np.arange(len(now))).tolist(), value[now].tolist()))
        mine_ds = np.flatnonzero(dev[at] == k) if several else ()
        if len(mine_ds) > 1:
            o = mine_ds[np.argsort(rank[at][mine_ds])]
            labels = [str(scan_ids.iat[at[i]]) if scan_ids is not None else f"scan {rank[at[i]]}" for i in o]
            when = ds_ts[o].tolist()
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = (med[o] / centre[gs[o]]).tolist()
            e["series"] = {
                "scans": labels,
                "ts": when,
                "ratio": rel,
                "value": med[o].tolist(),
                "change": labels.index(str(e["change_scan"])) if e.get("change_scan") in labels else None,
            }
        peer = {c: v[dev_group[k]] for c, v in peer_of.items()}
        named = {c: [why for why in e["causes"] if c in causes.EVIDENCE_COLUMNS.get(why, ())] for c in TELEMETRY}
        e["telemetry"] = [
            (c, float(tel[c][k]), float(peer[c]), named[c])
            for c in TELEMETRY
            if c in tel and (np.isfinite(tel[c][k]) or np.isfinite(peer[c]))
        ]
