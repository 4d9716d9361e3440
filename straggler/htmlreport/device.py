"""One device's history view (the collector's ``/report/gpu``): its verdict per probe and its
results over scans, per-scan medians drawn with every sample, the change point marked."""

from __future__ import annotations

import math
from html import escape
from statistics import median

from . import svg
from .page import _e, _num, _pct, _when, document

MAX_SCANS = 60  # scans drawn per probe (the newest); the table lists as many


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def render(gpu: str, host: str | None, entry: dict | None, rows: list[dict], back: str) -> str:
    """``entry``: the device in the fleet view (host, gpu, model, verdict, probes: [...]) or None;
    ``rows``: its stored results (any order); ``back``: the URL of the fleet report."""
    name = f"{host}/{gpu}" if host else gpu
    parts = [f'<h1>{_e(name)}</h1><p><a href="{escape(back)}">fleet report</a></p>']
    probes = (entry or {}).get("probes") or []
    if entry:
        parts.append(
            f'<p>{_e(entry.get("model"))}; verdict <b class="{_e(entry.get("verdict"))}">'
            f"{_e(entry.get('verdict') or 'not analysed yet')}</b>"
            + (", degraded" if entry.get("degraded") else "")
            + "</p>"
        )
        parts.append(
            "<table><tr><th>probe</th><th>verdict</th><th>ratio</th><th>deficit</th><th>cost</th>"
            "<th>causes</th><th>change point</th><th>evidence</th></tr>"
            + "".join(
                f'<tr><td>{_e(p.get("probe"))}</td><td class="{_e(p.get("verdict"))}">{_e(p.get("verdict"))}'
                f"{', degraded' if p.get('degraded') else ''}</td><td class=n>{_num(p.get('ratio'))}</td>"
                f"<td class=n>{_pct(p.get('deficit'))}</td><td class=n>{_pct(p.get('cost'))}</td>"
                f"<td>{_e(', '.join(p.get('causes') or []))}</td><td>{_e(p.get('change_scan') or '-')}"
                f"</td><td>{_e(p.get('evidence') or '')}</td></tr>"
                for p in probes
            )
            + "</table>"
        )
    by_probe: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by_probe.setdefault((r.get("probe"), r.get("settings")), {}).setdefault(str(r.get("scan_id")), []).append(r)
    change = {(p.get("probe"), p.get("settings")): p.get("change_scan") for p in probes}
    for (probe, settings), scans in sorted(by_probe.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        order = sorted(scans, key=lambda s: max(_f(r.get("ts")) for r in scans[s]))[-MAX_SCANS:]
        xs, meds, px, py = [], [], [], []
        table = []
        for k, sid in enumerate(order):
            vals = [_f(r.get("value")) for r in scans[sid]]
            vals = [v for v in vals if math.isfinite(v)]
            if not vals:
                continue
            xs.append(k)
            meds.append(median(vals))
            px += [k] * len(vals)
            py += vals
            tel = {c: [_f(r.get(c)) for r in scans[sid]] for c in ("sm_clock_mhz", "power_w", "temp_c")}
            tel = {c: [v for v in vs if math.isfinite(v)] for c, vs in tel.items()}
            table.append(
                f"<tr><td>{_e(sid)}</td><td>{_when(max(_f(r.get('ts')) for r in scans[sid]))}</td>"
                f"<td class=n>{len(vals)}</td><td class=n>{_num(median(vals), '.4g')}</td>"
                + "".join(f"<td class=n>{_num(sum(v) / len(v), '.4g') if v else '-'}</td>" for v in tel.values())
                + "</tr>"
            )
        at = change.get((probe, settings))
        vl = [(order.index(at), "change", svg.TIER_COLOURS["undecided"])] if at in order else []
        unit = next((r.get("unit") for s in order for r in scans[s] if r.get("unit")), "")
        chart = svg.lines(
            [("per-scan median", "#2e5d9a", xs, meds, False), ("samples", "#9aa7b5", px, py, True)],
            f"history {name} {probe}",
            "scan (oldest first)",
            f"value {unit or ''}",
            vlines=vl,
            width=720,
            height=240,
            xticks=xs[:: max(1, len(xs) // 10)],
            xfmt=lambda v: f"{v:.0f}",
        )
        parts.append(
            f"<h2>{_e(probe)}" + (f" ({_e(settings)})" if settings else "") + f"</h2>{chart}"
            "<table><tr><th>scan</th><th>time</th><th>samples</th><th>median</th><th>SM clock MHz</th>"
            "<th>power W</th><th>temperature C</th></tr>" + "".join(reversed(table)) + "</table>"
        )
    return document(f"straggler: {name}", "".join(parts))
