"""From a scan's samples and failures to one verdict per device (the ``--json`` ``devices`` list).

The per-(device, probe) decisions come from the analysis engine (``straggler.analysis.analyze``);
where that engine is not installed, a simple rule stands in and says so in ``engine``: a probe
median below 0.90 x the median of its peers (same probe, settings and model) in this scan.
"""

from __future__ import annotations

import math
from statistics import fmean, median
from typing import Any, Iterable

from straggler.errors import EXIT_FAILED, EXIT_OK, EXIT_STRAGGLERS
from straggler.records import format_throttle, parse_throttle

SIMPLE_MIN_RATIO = 0.90
PROBE_FIELDS = ("settings", "unit", "n_samples", "median", "estimate", "peer_median", "ratio", "deficit",
                "straggler", "basis", "causes", "evidence", "cost", "note")


def _clean(v: Any) -> Any:
    """JSON-friendly: NaN -> None, numpy scalars -> Python."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def analyze_samples(samples: list[dict]) -> tuple[list[dict], dict, str]:
    """(one dict per host/gpu/probe with PROBE_FIELDS, the engine's JSON document, engine name)."""
    if not samples:
        return [], {}, "none"
    try:
        from straggler.analysis import analyze
    except ImportError:
        return _simple(samples), {}, f"simple rule (< {SIMPLE_MIN_RATIO:.2f} x peer median)"
    from straggler.errors import StragglerError
    from straggler.records import to_frame

    try:
        res = analyze(to_frame(samples))
    except StragglerError as e:  # the samples stay valid: decide by the simple rule, say why
        return _simple(samples), {"error": str(e)}, f"simple rule (the analysis engine refused: {e})"
    from straggler.verdict import not_significant

    units = {(s["host"], s["gpu"], s["probe"]): s.get("unit") for s in samples}
    effect = (res.summary["min_effect"], res.summary["min_effect_few"])
    rows = []
    for rec in res.devices.to_dict("records"):
        key = (rec["host"], rec["gpu"], rec["probe"])
        est = _clean(rec.get("value"))  # the engine's robust estimate (transient dips left out)
        rows.append({"host": rec["host"], "gpu": rec["gpu"], "probe": rec["probe"], "unit": units.get(key),
                     **{k: _clean(rec.get(k)) for k in PROBE_FIELDS if k not in ("unit", "estimate", "note")},
                     "median": _clean(rec["median"]) if "median" in rec else est, "estimate": est,
                     "note": not_significant(rec, *effect)})
    return rows, json_safe(res.to_json()), "straggler.analysis"


def json_safe(doc):
    """A JSON document with NaN/inf as None and numpy scalars as Python numbers."""
    if isinstance(doc, dict):
        return {k: json_safe(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [json_safe(v) for v in doc]
    return _clean(doc)


def _simple(samples: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    meta: dict[tuple, dict] = {}
    for s in samples:
        if s.get("value") is None or not math.isfinite(s["value"]):
            continue
        key = (s["host"], s["gpu"], s["probe"], s.get("settings"), s.get("model"))
        groups.setdefault(key, []).append(s["value"])
        meta[key] = s
    medians = {k: median(v) for k, v in groups.items()}
    rows = []
    for key, values in groups.items():
        host, gpu, probe, settings, model = key
        peers = [m for k, m in medians.items() if k[2:] == key[2:]]
        peer = median(peers) if len(peers) >= 2 else None
        ratio = medians[key] / peer if peer else None
        flagged = ratio is not None and ratio < SIMPLE_MIN_RATIO
        rows.append({"host": host, "gpu": gpu, "probe": probe, "settings": settings,
                     "unit": meta[key].get("unit"), "n_samples": len(values), "median": medians[key],
                     "estimate": medians[key],
                     "peer_median": peer, "ratio": ratio,
                     "deficit": None if ratio is None else 1 - ratio, "straggler": flagged,
                     "basis": "peers in the node" if peer else "none (no peers)",
                     "causes": ["unexplained"] if flagged else [], "evidence": "", "cost": None, "note": None})
    return rows


def _telemetry(rows: list[dict]) -> dict:
    def vals(name):
        return [r[name] for r in rows if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]

    out = {}
    for name, fn in (("sm_clock_mhz", fmean), ("power_w", fmean), ("temp_c", max), ("pcie_gen", min),
                     ("pcie_width", min), ("util_pct", fmean)):
        v = vals(name)
        out[name] = fn(v) if v else None
    shares = [parse_throttle(r.get("throttle_reasons")) for r in rows if r.get("throttle_reasons") is not None]
    names = sorted({n for s in shares for n in s})
    out["throttle_reasons"] = format_throttle({n: fmean(s.get(n, 0.0) for s in shares) for n in names}) \
        if shares else None
    skew = vals("arrival_skew_s")
    out["arrival_skew_s"] = fmean(skew) if skew else None
    return out


def device_report(samples: list[dict], failures: list[dict], devices: Iterable[dict]) -> dict:
    """``{"devices": [...], "analysis": {...}, "engine": str, "stragglers": n, "exit_code": int}``."""
    probe_rows, doc, engine = analyze_samples(samples)
    known: dict[tuple, dict] = {}
    for d in devices:
        known[(d["host"], d["gpu"])] = {"index": d.get("index"), "model": d.get("model")}
    for s in samples:
        known.setdefault((s["host"], s["gpu"]), {"index": s.get("index"), "model": s.get("model")})
    out = []
    for (host, gpu), ident in sorted(known.items(), key=lambda kv: (kv[0][0], kv[1]["index"] or 0, kv[0][1])):
        mine = [r for r in probe_rows if (r["host"], r["gpu"]) == (host, gpu)]
        fails = [f for f in failures if (f["host"], f["device"]) == (host, gpu)]
        flagged = [r for r in mine if r["straggler"]]
        notes = [f"{r['probe']} {r['ratio']:.2f}x peer median: {r['note']}" for r in mine if r.get("note")]
        if flagged:
            verdict, reason = "straggler", "; ".join(_flag_reason(r) for r in flagged)
        elif any(r.get("ratio") is not None for r in mine):
            verdict, reason = "healthy", "; ".join(notes) or "in line with peers"
        elif mine:
            verdict, reason = "undecided", "no peers, history or reference to compare with"
        else:
            verdict, reason = "no data", "no samples"
        if fails:
            verdict, reason = "failed", f"{fails[0]['probe']}: {fails[0]['error']}" + (f"; {reason}" if flagged else "")
        out.append({"host": host, "gpu": gpu, **ident, "straggler": bool(flagged), "verdict": verdict,
                    "reason": reason,
                    "probes": {r["probe"]: {k: r.get(k) for k in PROBE_FIELDS} for r in mine},
                    "telemetry": _telemetry([s for s in samples if (s["host"], s["gpu"]) == (host, gpu)]),
                    "failures": fails})
    n = sum(d["straggler"] for d in out)
    # One rule with `straggler analyze`: nothing to compare with is "could not decide", exit 2.
    undecided = bool(out) and all(d["verdict"] == "undecided" for d in out)
    code = EXIT_FAILED if failures or not samples or undecided else EXIT_STRAGGLERS if n else EXIT_OK
    return {"devices": out, "analysis": doc, "engine": engine, "stragglers": n, "undecided": undecided,
            "exit_code": code}


def _flag_reason(r: dict) -> str:
    ratio = f"{r['ratio']:.2f}x peer median" if r.get("ratio") is not None else "below reference"
    causes = ", ".join(r.get("causes") or []) or "unexplained"
    return f"{r['probe']} {ratio} ({causes}; basis: {r.get('basis')})"
