"""From a scan's samples and failures to one verdict per device (the ``--json`` ``devices`` list).

The scan command's verdict (``straggler scan``, local or through the collector): the per-(device,
probe) decisions come from the analysis engine (``straggler.analysis.analyze``); where that engine
refuses the samples or fails, a simple rule stands in and says so in ``engine``: a probe median
below 0.90 x the median of its peers (same probe, settings and model) in this scan.
"""

from __future__ import annotations

import math
from statistics import fmean, median
from typing import Iterable

from straggler.errors import EXIT_FAILED, StragglerError
from straggler.jsonsafe import json_safe
from straggler.records import format_throttle, parse_throttle

SIMPLE_MIN_RATIO = 0.90
PROBE_FIELDS = (
    "settings",
    "unit",
    "n_samples",
    "median",
    "estimate",
    "peer_median",
    "ratio",
    "ratio_low",
    "ratio_high",
    "deficit",
    "straggler",
    "verdict",
    "samples_needed",
    "undecided_reason",
    "degraded",
    "change_loss",
    "change_scan",
    "perf_class",
    "peer_spread",
    "basis",
    "causes",
    "evidence",
    "cost",
    "note",
)


def analyze_samples(samples: list[dict]) -> tuple[list[dict], dict, str]:
    """(one dict per host/gpu/probe with PROBE_FIELDS, the engine's JSON document, engine name)."""
    if not samples:
        return [], {}, "none"
    from straggler.analysis import analyze
    from straggler.records import to_frame

    try:
        res = analyze(to_frame(samples))
    except StragglerError as e:  # the samples stay valid: decide by the simple rule, say why
        return _simple(samples), {"error": str(e)}, f"simple rule (the analysis engine refused: {e})"
    except Exception as e:  # noqa: BLE001 - an engine bug must not cost the scan its report; said in `engine`
        why = f"{type(e).__name__}: {e}"
        return _simple(samples), {"error": why}, f"simple rule (the analysis engine failed: {why})"
    from straggler.verdict import probe_note

    units = {(s["host"], s["gpu"], s["probe"]): s.get("unit") for s in samples}
    rows = []
    for rec in res.devices.to_dict("records"):
        key = (rec["host"], rec["gpu"], rec["probe"])
        est = json_safe(rec.get("value"))  # the engine's robust estimate (transient dips left out)
        rows.append(
            {
                "host": rec["host"],
                "gpu": rec["gpu"],
                "probe": rec["probe"],
                "unit": units.get(key),
                **{k: json_safe(rec.get(k)) for k in PROBE_FIELDS if k not in ("unit", "estimate", "note")},
                "median": json_safe(rec["median"]) if "median" in rec else est,
                "estimate": est,
                "note": probe_note(rec),
            }
        )
    return rows, json_safe(res.to_json()), "straggler.analysis"


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
        rows.append(
            {
                "host": host,
                "gpu": gpu,
                "probe": probe,
                "settings": settings,
                "unit": meta[key].get("unit"),
                "n_samples": len(values),
                "median": medians[key],
                "estimate": medians[key],
                "peer_median": peer,
                "ratio": ratio,
                "deficit": None if ratio is None else 1 - ratio,
                "straggler": flagged,
                "basis": "peers in the node" if peer else "none (no peers)",
                "causes": ["unexplained"] if flagged else [],
                "evidence": "",
                "cost": None,
                "note": None,
            }
        )
    return rows


def _telemetry(rows: list[dict]) -> dict:
    def vals(name):
        return [r[name] for r in rows if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]

    out = {}
    for name, fn in (
        ("sm_clock_mhz", fmean),
        ("power_w", fmean),
        ("temp_c", max),
        ("pcie_gen", min),
        ("pcie_width", min),
        ("util_pct", fmean),
    ):
        v = vals(name)
        out[name] = fn(v) if v else None
    parsed = (parse_throttle(r.get("throttle_reasons")) for r in rows if r.get("throttle_reasons") is not None)
    shares = [s for s in parsed if s is not None]  # a cell that cannot be read says nothing
    names = sorted({n for s in shares for n in s})
    out["throttle_reasons"] = (
        format_throttle({n: fmean(s.get(n, 0.0) for s in shares) for n in names}) if shares else None
    )
    skew = vals("arrival_skew_s")
    out["arrival_skew_s"] = fmean(skew) if skew else None
    return out


def device_report(samples: list[dict], failures: list[dict], devices: Iterable[dict]) -> dict:
    """``{"devices": [...], "analysis": {...}, "engine": str, "stragglers": n, "undecided": n,
    "cannot_decide": StragglerError | None, "exit_code": int}``.

    A device's ``verdict`` is its probes' tier (``straggler.verdict.device_tier``: straggler, else
    undecided, else slow, else healthy), or ``failed`` / ``no data``. ``cannot_decide`` is the
    one-line error of a scan that found no straggler but could not decide every device (exit 2)."""
    from straggler.verdict import NothingToCompare, Undecided, exit_code

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
        tier = _tier(mine, engine)
        flagged = [r for r in mine if r["straggler"]]
        notes = "; ".join(
            f"{r['probe']}"
            + (f" {r['ratio']:.2f}x peer median" if r.get("ratio") is not None else "")
            + f": {r['note']}"
            for r in mine
            if r.get("note")
        )
        verdict = tier["verdict"] or ("no data" if not mine else "undecided")
        if verdict == "straggler":
            reason = "; ".join(_flag_reason(r) for r in flagged) + (f"; {notes}" if notes else "")
        elif verdict == "healthy":
            reason = notes or "in line with peers"
        elif verdict == "no data":
            reason = "no samples"
        else:  # undecided, slow: the note says why
            reason = notes or verdict
        if fails:
            verdict, reason = "failed", f"{fails[0]['probe']}: {fails[0]['error']}" + (f"; {reason}" if flagged else "")
        out.append(
            {
                "host": host,
                "gpu": gpu,
                **ident,
                "straggler": bool(flagged),
                "verdict": verdict,
                "reason": reason,
                "degraded": tier["degraded"],
                "samples_needed": tier["samples_needed"],
                "perf_class": tier["perf_class"],
                "probes": {r["probe"]: {k: r.get(k) for k in PROBE_FIELDS} for r in mine},
                "telemetry": _telemetry([s for s in samples if (s["host"], s["gpu"]) == (host, gpu)]),
                "failures": fails,
            }
        )
    n = sum(d["straggler"] for d in out)
    undecided = [d for d in out if d["verdict"] == "undecided"]
    cannot_decide: StragglerError | None = None
    if out and not n and undecided:
        if all(str(r.get("basis") or "none").startswith("none") for r in probe_rows):  # nothing to compare with
            cannot_decide = NothingToCompare(
                len(out),
                undecided[0]["host"],
                undecided[0]["gpu"],
                "scan more devices of the model at once, or run `straggler analyze` "
                "on this scan's --output with --history or --reference",
            )
        else:
            needed = [d["samples_needed"] for d in undecided if d["samples_needed"] is not None]
            min_effect = (doc.get("summary") or {}).get("min_effect")
            cannot_decide = Undecided(
                [f"{d['host']}/{d['gpu']}" for d in undecided],
                min_effect if min_effect is not None else 1 - SIMPLE_MIN_RATIO,
                max(needed) if needed else None,
            )
    code = EXIT_FAILED if failures or not samples else exit_code(n, len(undecided))
    return {
        "devices": out,
        "analysis": doc,
        "engine": engine,
        "stragglers": n,
        "undecided": len(undecided),
        "cannot_decide": cannot_decide,
        "exit_code": code,
    }


def _tier(rows: list[dict], engine: str) -> dict:
    """The device's tier from its probes (the simple rule has no tiers: straggler or healthy)."""
    if engine == "straggler.analysis":
        from straggler.verdict import device_tier

        return device_tier(rows)
    verdict = (
        "straggler"
        if any(r["straggler"] for r in rows)
        else "healthy"
        if any(r.get("ratio") is not None for r in rows)
        else None
    )
    return {"verdict": verdict, "degraded": False, "samples_needed": None, "perf_class": None}


def _flag_reason(r: dict) -> str:
    ratio = f"{r['ratio']:.2f}x peer median" if r.get("ratio") is not None else "below reference"
    causes = ", ".join(r.get("causes") or []) or "unexplained"
    return f"{r['probe']} {ratio} ({causes}; basis: {r.get('basis')})"
