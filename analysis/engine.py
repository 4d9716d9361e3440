"""analyze(): the pipeline from a result table to verdicts. Each step lives in its own module;
this one only wires them together on integer codes (one row per sample -> one row per device)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from straggler.errors import ConfigError, InputError

from . import bases, cost, groups, peers, tiers, validate
from . import causes as causes_mod
from . import history as own
from .codes import Codes, PastScans
from .detect import Test, decide
from .estimate import estimate
from .result import DEVICE_COLUMNS, AnalysisResult
from .settings import AnalysisConfig

DEVICE_KEY = ("host", "gpu", "probe", "settings")
PEER_TEST, MATES_TEST = 0, 1  # positions in the tests given to decide()


def _device_column(frame: pd.DataFrame, first: np.ndarray, col: str) -> pd.Series:
    """The column's value on each device's first row (a Series with a 0..n-1 index)."""
    if col not in frame.columns:
        return pd.Series(np.full(len(first), np.nan))
    return frame[col].iloc[first].reset_index(drop=True)


def analyze(
    samples: pd.DataFrame, history: pd.DataFrame | None = None, config: AnalysisConfig | None = None
) -> AnalysisResult:
    """Find stragglers among the devices in ``samples`` (the canonical result table).

    ``history``: earlier samples of the same devices (the collector's store); earlier scans in
    ``samples`` itself (several ``scan_id``) are history too. Raises InputError / ConfigError with
    a one-line message for input that cannot be analysed."""
    config = config or AnalysisConfig()
    problems = config.problems()
    if problems:
        raise ConfigError(problems, "analysis config")
    # messages name the file read_table read the samples from, where it set one
    frame, dropped = validate.clean(samples, getattr(samples, "attrs", {}).get("source", "input"))
    rows = _split(frame, history, dropped)
    cur, n_dev = rows.cur, rows.n_dev

    first = groups.first_index(rows.dev, n_dev)
    code = {c: k[first] for c, k in rows.key_codes.items()}  # per device
    peer_cols = [code["model"], code["probe"], code["settings"]]
    for c in config.peer_columns:
        if c in cur.columns:
            col = _device_column(cur, first, c)
            peer_cols.append(pd.to_numeric(col, errors="coerce").round() if c.endswith("_w") else col)
    group, n_group = groups.factorize(*peer_cols)
    host, n_host = groups.factorize(code["host"])
    _, n_units = groups.factorize(code["host"], code["gpu"])
    # From here on every code array is read from `codes`, by its name.
    codes = Codes(
        row_dev=rows.dev, n_dev=n_dev, group=group, n_group=n_group, host=host, n_host=n_host, cur_rank=rows.cur_rank
    )
    value = cur["value"].to_numpy(dtype=float)
    est = estimate(
        value,
        dev=codes.row_dev,
        n_dev=n_dev,
        group_of_dev=codes.group,
        n_group=codes.n_group,
        dip_sigmas=config.dip_sigmas,
        prior_df=config.prior_df,
    )
    sample = (
        pd.to_numeric(cur["sample"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        if "sample" in cur.columns
        else np.full(len(cur), np.nan)
    )
    pv = peers.compare(
        est, codes, config.min_group, config.min_effect, config.min_effect_few, row_sample=sample, row_value=value
    )
    node_centre, node_deficit, node_se, node_df, node_fixed = peers.node_compare(est, codes, pv, config.min_group)
    past = _past_scans(rows, codes, config)
    hv = own.compare(codes, past, value=est.value, se_rel=est.se_rel, past_value=past.value, prior_df=config.prior_df)
    if len(past.dev):
        # The change point is found on per-scan sample medians: two upward spikes of heavy-tailed
        # noise among 5 samples move the transient-robust value (anchored on the upper quartile),
        # not the median; in the benchmark that halved the stable devices marked.
        by_median = own.compare(
            codes, past, value=est.median, se_rel=est.se_rel, past_value=past.median, prior_df=config.prior_df
        )
        hv = replace(hv, change=by_median.change, change_rank=by_median.change_rank)
    has_peers = pv.basis != ""
    ref_value, ref_test = _reference(config, cur, first, est, ~has_peers)
    threshold = np.full(n_dev, config.min_effect)
    with np.errstate(invalid="ignore"):
        hist_fixed = np.sqrt(np.clip(hv.se**2 - est.se_rel**2, 0, None))
    verdict = decide(
        [
            Test(pv.basis, pv.deficit, pv.se, pv.df, pv.min_effect, pv.se_fixed),  # PEER_TEST, MATES_TEST
            Test(
                np.where(np.isfinite(node_se), bases.NODE_MATES, ""),
                node_deficit,
                node_se,
                node_df,
                threshold,
                node_fixed,
            ),
            # Own history decides only for a device without peers; with peers it is the `degraded` flag.
            Test(
                np.where((hv.n_scans > 0) & ~has_peers, bases.HISTORY, ""),
                hv.deficit,
                hv.se,
                np.full(n_dev, np.inf),
                threshold,
                hist_fixed,
            ),
            ref_test,
        ],
        config.fdr,
        config.clear_level,
        est.n_kept,
    )
    tier = tiers.assign(verdict, pv, hv, has_peers, codes, config)
    straggler = tier.straggler

    basis_value = np.where(
        np.isfinite(pv.peer_value), pv.peer_value, np.where(np.isfinite(hv.baseline), hv.baseline, ref_value)
    )
    # Flagged by its node-mates and not by its peer group (a slow device in a fast node): it costs
    # the jobs it shares with them, so it is counted against their median.
    by_mates = verdict.fired[MATES_TEST] & ~verdict.fired[PEER_TEST]
    basis_value = np.where(by_mates, node_centre, basis_value)
    cost_dev = cost.device_cost(est.value, basis_value)
    # Stragglers first, by cost; the device table is built in that order (no reordering afterwards).
    order = np.lexsort((-np.nan_to_num(cost_dev, nan=-1.0), ~straggler))
    columns = {c: pd.Series(rows.key_values[c].take(code[c][order])) for c in (*DEVICE_KEY, "model")}
    cause, evidence = _explain(rows, codes, order, columns, pv, hv, verdict, tier, node_deficit)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = est.value / pv.peer_value
    change_scan, change_ts = _scan_labels(rows, tier.change_rank, tier.degraded)
    columns["index"] = pd.to_numeric(_device_column(cur, first[order], "index"), errors="coerce")
    columns.update(
        {
            "straggler": straggler,
            "verdict": tier.verdict,
            "degraded": tier.degraded,
            "basis": tier.basis.astype(object),
            "deficit": verdict.deficit,
            "cost": cost_dev,
            "causes": _objects(cause),
            "evidence": _objects(evidence),
            "n_samples": est.n_samples,
            "n_kept": est.n_kept,
            "value": est.value,
            "median": est.median,
            "peer_median": pv.peer_value,
            "ratio": ratio,
            "ratio_low": ratio - 1.96 * pv.se,
            "ratio_high": ratio + 1.96 * pv.se,
            "perf_class": tier.perf_class,
            "peer_spread": pv.spread_net,
            "peer_group_size": pv.group_size,
            "p_value": verdict.p_value,
            "q_value": verdict.q_value,
            "samples_needed": verdict.samples_needed,
            "undecided_reason": tier.reason,
            "history_scans": hv.n_scans,
            "history_baseline": hv.baseline,
            "history_deficit": hv.deficit,
            "change_loss": tier.change_loss,
            "change_scan": change_scan,
            "change_ts": change_ts,
        }
    )
    table = pd.DataFrame(
        {
            c: columns[c]
            if isinstance(columns[c], pd.Series)
            else pd.Series(columns[c][order], dtype=object)
            if columns[c].dtype == object
            else columns[c][order]
            for c in DEVICE_COLUMNS
        }
    )

    at = groups.first_index(codes.group, codes.n_group)  # a device of each peer group
    labels = [
        {"model": m, "probe": p, "settings": s}
        for m, p, s in zip(*(rows.key_values[c].take(code[c][at]).tolist() for c in ("model", "probe", "settings")))
    ]
    with np.errstate(invalid="ignore", divide="ignore"):
        step = np.where(np.isfinite(pv.peer_value), 1 / ratio, np.nan)
    spread = tiers.group_spread(pv, codes, labels, config)
    jobs = cost.job_gain(
        step, flagged=straggler, group=codes.group, n_group=codes.n_group, labels=labels, sizes=config.job_sizes
    )
    summary = _summary(
        table, config, dropped, rows.n_scans, len(rows.past_dev), len(cur), n_units, jobs, spread, tier.counts
    )
    return AnalysisResult(devices=table, summary=summary, dropped=dropped)


def _explain(rows: "_Rows", codes: Codes, order, columns, pv, hv, verdict, tier, node_deficit):
    """(causes, evidence) per device; only stragglers get any (the telemetry is read only then)."""
    n_dev = codes.n_dev
    straggler = tier.straggler
    if not straggler.any():
        return [()] * n_dev, [""] * n_dev
    membw = np.empty(n_dev, dtype=bool)
    membw[order] = columns["probe"].astype("string").str.contains("membw").fillna(False).to_numpy(dtype=bool)
    k = int(straggler.sum())  # the stragglers come first in `order`
    names = dict(zip(order[:k].tolist(), columns["host"].iloc[:k].tolist()))
    tel = causes_mod.device_telemetry(rows.cur, codes.row_dev, n_dev)
    cause, evidence = causes_mod.explain(
        tel,
        straggler,
        group_of_dev=codes.group,
        n_group=codes.n_group,
        host_of_dev=codes.host,
        host_names=names,
        membw=membw,
    )
    for i in np.flatnonzero(straggler):
        evidence[i] = _verdict_text(int(i), pv, hv, verdict, tier, node_deficit) + (
            "; " + evidence[i] if evidence[i] else ""
        )
    return cause, evidence


def _objects(values: list) -> np.ndarray:
    """A list as an object array (kept as Python objects: no string inference, cheap to reorder)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _past_scans(rows: "_Rows", codes: Codes, config) -> PastScans:
    """One value per (device, past scan), estimated like the current scan's (transients removed),
    and its plain sample median; a per-scan summary row gives both as they are (its ``value`` and
    ``median``: what the analysis of that scan reported)."""
    dev, rank, value = rows.past_dev, rows.past_rank, rows.past_value
    if len(dev) == 0:
        return PastScans(dev, rank, value, value)
    ds, n_ds = groups.factorize(dev, rank)
    first = groups.first_index(ds, n_ds)
    summary = np.isfinite(rows.past_median)
    if summary.any():
        mixed = summary & (groups.count(ds, n_ds)[ds] > 1)
        if mixed.any():
            raise InputError(
                f"history: {int(mixed.sum())} per-scan summary rows (with a median) share their device "
                "and scan with other rows; give a scan's samples or its summary, not both"
            )
    est = estimate(
        value,
        dev=ds,
        n_dev=n_ds,
        group_of_dev=codes.group[dev[first]],
        n_group=codes.n_group,
        dip_sigmas=config.dip_sigmas,
        prior_df=config.prior_df,
    )
    if not summary.any():
        return PastScans(dev[first], rank[first], est.value, est.median)
    given = summary[first]  # the entries that are one summary row each
    return PastScans(
        dev[first],
        rank[first],
        np.where(given, value[first], est.value),
        np.where(given, rows.past_median[first], est.median),
    )


def _scan_labels(rows: "_Rows", rank: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scan_id and time (latest ts) of scan ``rank`` where ``hit`` (None / NaN elsewhere)."""
    n = len(rank)
    ids, ts = np.full(n, None, dtype=object), np.full(n, np.nan)
    if not hit.any() or any("scan_id" not in t.columns for t in rows.tables):
        return ids, ts
    scan_ids = pd.concat([t["scan_id"] for t in rows.tables], ignore_index=True)
    scan_ts = (
        pd.to_numeric(pd.concat([t["ts"] for t in rows.tables], ignore_index=True), errors="coerce").to_numpy(
            dtype=float, na_value=np.nan
        )
        if all("ts" in t.columns for t in rows.tables)
        else None
    )
    all_rank = rows.all_rank
    assert all_rank is not None  # the rows are read with every row's scan rank
    code = all_rank - all_rank.min()
    n_code = int(code.max()) + 1
    at = groups.first_index(code, n_code)
    want = rank[hit] - all_rank.min()
    ids[hit] = scan_ids.iloc[np.minimum(at[want], len(code) - 1)].astype(object).to_numpy()
    if scan_ts is not None:
        sel = np.isin(code, want)
        when = groups.extreme(code[sel], scan_ts[sel], n_code, "max")
        ts[hit] = when[want]
    return ids, ts


@dataclass(frozen=True)
class _Rows:
    cur: pd.DataFrame  # the rows of each device's current (latest) scan
    dev: np.ndarray  # their device codes 0..n_dev-1
    n_dev: int
    n_scans: int  # scans in the input
    cur_rank: np.ndarray  # each device's current scan (rank)
    past_dev: np.ndarray  # history rows of the current devices: device code, scan rank, value
    past_rank: np.ndarray
    past_value: np.ndarray
    past_median: np.ndarray  # a per-scan summary's median (validate.summary_medians); NaN for a sample
    key_codes: dict  # {"host"|"gpu"|"probe"|"settings"|"model": code per current row}
    key_values: dict  # {same keys: the values the codes stand for}
    all_rank: np.ndarray | None = None  # scan rank of every row (history first), for the labels
    tables: tuple = ()  # (history rows, input rows): read for the labels only when needed


def _split(frame: pd.DataFrame, history: pd.DataFrame | None, dropped: dict) -> _Rows:
    """Current rows and history rows (earlier scans of the input, then ``history``) by device."""
    rank = own.scan_rank(frame)
    n_scans = int(rank.max()) + 1 if len(rank) else 0  # ranks are 0..n-1
    keys = {c: frame[c] for c in DEVICE_KEY}
    value_all = frame["value"].to_numpy(dtype=float)
    median_all = np.full(len(frame), np.nan)  # per-scan summaries' medians (history only): NaN for a sample
    offset = 0
    tables: tuple[pd.DataFrame, ...] = (frame,)
    if history is not None and len(history):
        past, hdrop = validate.clean(history, "history")
        if "scan_id" in past.columns and "scan_id" in frame.columns:  # the input's own samples again
            again = _in_input(past, frame)
            if again.any():
                hdrop["scan also in the input"] = int(again.sum())
                past = past[~again].reset_index(drop=True)
        dropped.update({f"history: {k}": v for k, v in hdrop.items()})
        if len(past):
            prank = own.scan_rank(past)
            rank = np.concatenate([prank - (prank.max() + 1), rank])  # the given history comes first
            keys = {c: validate.concat_text([past[c], frame[c]]) for c in DEVICE_KEY}
            value_all = np.concatenate([past["value"].to_numpy(dtype=float), value_all])
            median_all = np.concatenate([validate.summary_medians(past, "history"), median_all])
            offset = len(past)
            tables = (past, frame)
    factors = {c: pd.factorize(keys[c], use_na_sentinel=False) for c in DEVICE_KEY}
    factors["model"] = pd.factorize(frame["model"], use_na_sentinel=False)  # current rows only need it
    key_codes = {c: codes.astype(np.int64, copy=False) for c, (codes, _) in factors.items() if c != "model"}
    dev_all, n_all = _device_codes(key_codes)
    repeat = validate.duplicates(frame, dev_all[offset:], rank[offset:], "input")
    if repeat.any():
        dropped["duplicate row"] = int(repeat.sum())
    usable = np.ones(len(dev_all), dtype=bool)
    usable[offset:] = ~repeat
    cur_all = own.current_rows(dev_all, n_all, rank) & usable
    cur_all[:offset] = False
    in_frame = cur_all[offset:]
    cur = frame if in_frame.all() else frame[in_frame].reset_index(drop=True)

    dev, n_dev = groups.factorize(dev_all[cur_all])
    to_cur = np.full(n_all, -1, dtype=np.int64)
    to_cur[dev_all[cur_all]] = dev
    was = ~cur_all & usable
    past_dev = to_cur[dev_all[was]]
    has = past_dev >= 0
    cur_rank = rank[cur_all][groups.first_index(dev, n_dev)]
    return _Rows(
        cur,
        dev,
        n_dev,
        n_scans,
        cur_rank,
        past_dev[has],
        rank[was][has],
        value_all[was][has],
        median_all[was][has],
        {
            **{c: k[cur_all] for c, k in key_codes.items()},
            "model": factors["model"][0].astype(np.int64, copy=False)[in_frame],
        },
        # text as "string" whatever the rows were (categories of Parquet's text, or a concatenation)
        {c: u.astype("string") for c, (_, u) in factors.items()},
        rank,
        tables,
    )


def _in_input(past: pd.DataFrame, frame: pd.DataFrame) -> np.ndarray:
    """True for the history rows whose device (host, gpu, probe, settings) and scan_id occur in the
    input: the same scan of the same device, given twice. Other devices of that scan stay history."""
    cols = (*DEVICE_KEY, "scan_id")
    code, n = groups.factorize(*(validate.concat_text([past[c], frame[c]]) for c in cols))
    seen = np.zeros(n, dtype=bool)
    seen[code[len(past) :]] = True
    return seen[code[: len(past)]] & past["scan_id"].notna().to_numpy(dtype=bool)


def _device_codes(key_codes: dict) -> tuple[np.ndarray, int]:
    """Codes of (host, gpu, probe, settings). A GPU's UUID names one host, so where every gpu value
    sits on one host, the host adds nothing to the key and is left out (a smaller, hash-free code)."""
    gpu, host = key_codes["gpu"], key_codes["host"]
    n_gpu = int(gpu.max()) + 1 if len(gpu) else 0
    host_of_gpu = host[groups.first_index(gpu, n_gpu)]
    if len(gpu) and (host_of_gpu[gpu] == host).all():
        return groups.factorize(gpu, key_codes["probe"], key_codes["settings"])
    return groups.factorize(*(key_codes[c] for c in DEVICE_KEY))


def _reference(
    config: AnalysisConfig, cur: pd.DataFrame, first: np.ndarray, est, alone: np.ndarray
) -> tuple[np.ndarray, Test]:
    """Reference values for devices without peers, looked up by model|probe|settings, then model|probe."""
    n = len(alone)
    ref = np.full(n, np.nan)
    refs = config.reference_map()
    if refs and alone.any():
        d = {c: _device_column(cur, first, c).astype("string") for c in ("model", "probe", "settings")}
        short = d["model"] + "|" + d["probe"]
        long = short + "|" + d["settings"]
        ref = long.map(refs).astype(float).fillna(short.map(refs).astype(float)).to_numpy(dtype=float)
        ref = np.where(alone, ref, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        deficit = 1 - est.value / ref
        se = est.se_rel * est.value / ref
    basis = np.where(np.isfinite(ref), bases.REFERENCE, "").astype(object)
    return ref, Test(basis, deficit, se, est.df, np.full(n, config.min_effect), np.zeros(n))


def _verdict_text(i: int, pv, hv, verdict, tier, node_deficit) -> str:
    parts = []
    if np.isfinite(pv.peer_value[i]):
        others = pv.group_size[i] - 1
        one_host = str(pv.basis[i]).startswith(bases.HOST)
        if str(pv.basis[i]).endswith(bases.LOO):
            devices = f"device{'s' if others > 1 else ''}"
            parts.append(
                f"{1 - pv.deficit[i]:.3f}x the mean of the {others} other "
                + (f"{devices} on its host" if one_host else f"fleet {devices}")
                + " (leave-one-out)"
                + (", sample by sample" if pv.paired[i] else "")
            )
        else:
            parts.append(
                f"{1 - pv.deficit[i]:.3f}x the median of {others} "
                + ("peers on its host" if one_host else "fleet peers")
            )
    if np.isfinite(node_deficit[i]):
        parts.append(f"{1 - node_deficit[i]:.3f}x the median of its node-mates")
    if hv.n_scans[i] > 0:
        parts.append(
            f"{1 - hv.deficit[i]:.3f}x its own baseline over {hv.n_scans[i]} past scans"
            + (" (relative to its peers)" if hv.relative[i] else "")
        )
    if tier.degraded[i]:
        parts.append(f"degraded: lost {tier.change_loss[i]:.1%} against its own past since a change point")
    parts.append(f"q={verdict.q_value[i]:.2g}")
    return ", ".join(parts)


def _counts(values) -> dict:
    return {str(k): int(v) for k, v in pd.Series(values, dtype=object).value_counts().items()}


def _summary(
    table: pd.DataFrame,
    config: AnalysisConfig,
    dropped: dict,
    n_scans: int,
    history_rows: int,
    samples: int,
    n_units: int,
    jobs: list[dict],
    spread: dict,
    tier_counts: np.ndarray,
) -> dict:
    flagged = table[table["straggler"]]
    probes = pd.DataFrame({"probe": table["probe"].astype(str), "straggler": table["straggler"]})
    counts = probes.groupby("probe", sort=True)["straggler"].agg(["size", "sum"])
    per_probe = {str(p): {"devices": int(r["size"]), "stragglers": int(r["sum"])} for p, r in counts.iterrows()}
    return {
        "devices": int(n_units),
        "entries": int(len(table)),
        "stragglers": int(len(flagged)),
        "verdicts": {v: int(k) for v, k in zip(tiers.TIERS, tier_counts)},
        "degraded": int(table["degraded"].sum()),
        "straggler_devices": int(flagged[["host", "gpu"]].drop_duplicates().shape[0]),
        "samples": int(samples),
        "scans": int(n_scans),
        "history_rows": int(history_rows),
        "probes": per_probe,
        "bases": _counts(flagged["basis"]),
        "causes": _counts([c for cs in flagged["causes"] for c in cs]),
        "dropped": {str(k): int(v) for k, v in dropped.items()},
        "fdr": config.fdr,
        "min_effect": config.min_effect,
        "min_effect_few": config.min_effect_few,
        "clear_level": config.clear_level,
        "slow_sigmas": config.slow_sigmas,
        "min_change": config.min_change,
        "groups": spread["groups"],
        "warnings": spread["warnings"],
        "job_cost": jobs,
    }
