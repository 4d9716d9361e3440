"""The report as one self-contained HTML page: inline CSS and SVG, no script, no external resource.

A Content-Security-Policy in the page forbids every fetch (``default-src 'none'``), so a page that
would reach the network shows a console error instead of loading it: the tests open the page in
Chromium and fail on any console message.
"""

from __future__ import annotations

import math
import time
from html import escape
from typing import Callable

from straggler import __version__

from . import svg
from .model import MAX_LABELS, Report

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'"
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:90px}.card b{font-size:20px;display:block}
.straggler{color:#c62828}.undecided{color:#b36b00}.slow{color:#8a7000}.healthy{color:#2e5d9a}
.muted{color:#666}tr.cause td{font-weight:600;background:#fdecec}.warn{background:#fff4e0;border-left:4px solid #ef8f00;padding:4px 8px;margin:4px 0}
.dev{border:1px solid #ddd;border-radius:6px;padding:4px 12px 10px;margin:12px 0}.charts{display:flex;flex-wrap:wrap;gap:12px}
code,pre{background:#f6f6f6;padding:1px 4px;border-radius:3px}pre{padding:8px;white-space:pre-wrap;word-break:break-all}
"""


def _pct(x, signed: bool = False) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if not math.isfinite(v) else (f"{v:+.1%}" if signed else f"{v:.1%}")


def _num(x, fmt: str = ".3f") -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if not math.isfinite(v) else format(v, fmt)


def _when(ts) -> str:
    try:
        v = float(ts)
    except (TypeError, ValueError):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(v)) if math.isfinite(v) else "-"


def _e(x) -> str:
    return escape("" if x is None else str(x))


def document(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>"
    )


def render(rep: Report, link: Callable[[str, str], str] | None = None) -> str:
    """The page. ``link(host, gpu)``: the URL of a device's history view (the collector), or None."""
    s, m = rep.summary, rep.meta
    tiers = s.get("verdicts") or {}
    parts = [
        f"<h1>straggler fleet report</h1><p class=muted>{_e(m.get('source', ''))}; generated "
        f"{_when(m.get('generated_ts', time.time()))}; straggler {__version__}</p>"
    ]
    cards = [
        ("devices", s.get("devices"), ""),
        ("entries (device x probe)", s.get("entries"), ""),
        ("stragglers", tiers.get("straggler", s.get("stragglers")), "straggler"),
        ("straggler devices", s.get("straggler_devices"), "straggler"),
        ("undecided", tiers.get("undecided"), "undecided"),
        ("slow", tiers.get("slow"), "slow"),
        ("healthy", tiers.get("healthy"), "healthy"),
        ("degraded", s.get("degraded"), ""),
        ("scans", s.get("scans"), ""),
    ]
    parts.append(
        "<h2>Summary</h2><div class=cards>"
        + "".join(f'<div class="card {c}"><b>{_e(v if v is not None else "-")}</b>{_e(k)}</div>' for k, v, c in cards)
        + "</div>"
    )
    parts.append(
        f"<p>Threshold T = {_pct(s.get('min_effect'))} (groups of 2-3 devices: "
        f"{_pct(s.get('min_effect_few'))}), false-discovery rate {_e(s.get('fdr'))}; entries per tier "
        "are device x probe; a straggler slows every synchronous job it joins by at least T.</p>"
    )
    for w in s.get("warnings") or ():
        parts.append(f"<div class=warn>warning: {_e(w)}</div>")
    if s.get("dropped"):
        parts.append(
            "<p class=muted>dropped rows: " + ", ".join(f"{_e(n)} {_e(k)}" for k, n in s["dropped"].items()) + "</p>"
        )
    parts.append(_spread(s))
    parts.append(_jobs(rep))
    parts.append(_distributions(rep))
    parts.append(_heatmap(rep, link))
    parts.append(_flagged(rep, link))
    parts.append(_details(rep, link))
    parts.append(_classes(rep))
    parts.append(_command(rep))
    return document("straggler fleet report", "".join(parts))


def _spread(s: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(g.get('model'))}</td><td>{_e(g.get('probe'))}</td><td>{_e(g.get('settings'))}</td>"
        f"<td class=n>{_e(g.get('devices'))}</td><td class=n>{_pct(g.get('spread_net'))}</td>"
        f"<td class=n>{_pct(g.get('spread'))}</td><td class=n>{_pct(g.get('noise'))}</td></tr>"
        for g in s.get("groups") or ()
    )
    if not rows:
        return "<h2>Fleet spread per model</h2><p class=muted>no peer group of 4 or more devices</p>"
    return (
        "<h2>Fleet spread per model</h2><table><tr><th>model</th><th>probe</th><th>settings</th><th>devices</th>"
        "<th>healthy spread (net of noise)</th><th>spread (robust)</th><th>noise</th></tr>" + rows + "</table>"
    )


def _jobs(rep: Report) -> str:
    out = [
        "<h2>Job cost</h2><p>Expected step time of an N-device synchronous job drawn from the peer group, "
        "relative to the healthy step time, with every device and without the flagged ones "
        "(<code>straggler.analysis.cost</code>).</p>"
    ]
    rows = "".join(
        f"<tr><td>{_e(j['model'])}</td><td>{_e(j['probe'])}</td><td class=n>{_e(j['job_devices'])}</td>"
        f"<td class=n>{_num(j.get('step_time_all'))}</td><td class=n>{_num(j.get('step_time_without_stragglers'))}</td>"
        f"<td class=n>{_pct(j.get('speedup'))}</td></tr>"
        for j in rep.summary.get("job_cost") or ()
    )
    if rows:
        out.append(
            "<table><tr><th>model</th><th>probe</th><th>job devices</th><th>step time, all</th>"
            "<th>without flagged</th><th>faster without</th></tr>" + rows + "</table>"
        )
    if not rep.jobs:
        out.append("<p class=muted>no straggler: every job runs at the healthy step time</p>")
    charts = []
    for j in rep.jobs[:6]:
        charts.append(
            svg.lines(
                [
                    ("with every device", svg.TIER_COLOURS["straggler"], j["n"], j["all"], False),
                    ("without the flagged", svg.TIER_COLOURS["healthy"], j["n"], j["without"], False),
                ],
                f"job cost {j['model']} {j['probe']}",
                f"job devices N ({j['model']} {j['probe']}, {j['flagged']} of {j['devices']} flagged)",
                "step time",
                xlog=True,
                xticks=[n for n in j["n"] if n & (n - 1) == 0][:: max(1, len(j["n"]) // 8)],
                xfmt=lambda v: f"{v:.0f}",
            )
        )
    if charts:
        out.append("<div class=charts>" + "".join(charts) + "</div>")
    if len(rep.jobs) > 6:
        out.append(f"<p class=muted>{len(rep.jobs) - 6} more peer groups with flagged devices (table above)</p>")
    return "".join(out)


def _distributions(rep: Report) -> str:
    out = [
        "<h2>Performance ratios per model and probe</h2><p>Each device's ratio to its peers' median, "
        "stacked by tier; T and the slow line drawn; every straggler marked under the axis (hover for its "
        "name). Values beyond the axis are in the end bins.</p>"
    ]
    for d in rep.distributions:
        head = f"{d['model']} {d['probe']}" + (f" ({d['settings']})" if d["settings"] else "")
        if "edges" not in d:
            out.append(f"<h3>{_e(head)}</h3><p class=muted>{d['entries']} entries, none with peers</p>")
            continue
        cols = {"straggler": svg.TIER_COLOURS["straggler"], "slow": "#b08d00"}
        marks = [(x, lab, i < MAX_LABELS) for i, (x, lab, _) in enumerate(d["marks"])]
        chart = svg.histogram(
            d["edges"],
            [(t, svg.TIER_COLOURS[t], c) for t, c in d["stacks"]],
            [(x, lab, cols.get("straggler" if lab.startswith("T") else lab, "#333")) for x, lab in d["vlines"]],
            marks,
            f"ratios {head}",
            "ratio to peer median",
        )
        tiers = ", ".join(f'<span class="{t}">{t} {n}</span>' for t, n in d["tiers"].items())
        notes = [f"{d['no_ratio']} without peers"] if d["no_ratio"] else []
        notes += [f"{d['clipped']} beyond the axis"] if d["clipped"] else []
        notes += [f"{d['unmarked']} more stragglers not marked"] if d["unmarked"] else []
        out.append(
            f"<h3>{_e(head)}</h3><p>{d['entries']} entries: {tiers}"
            + (f" <span class=muted>({_e('; '.join(notes))})</span>" if notes else "")
            + f"</p>{chart}"
        )
    return "".join(out)


def _heatmap(rep: Report, link) -> str:
    h = rep.heatmap
    if not h["rows"]:
        return ""
    rows = [
        (
            r["label"],
            None,
            r["values"],
            r["hover"],
            [link(r["host"], g) if link and g is not None else None for g in r["gpus"]],
        )
        for r in h["rows"]
    ]
    note = (
        (
            f"the {min(h['hosts'], 40)} worst nodes one per row, then the other {h['hosts'] - 40} in bands of "
            f"{h['per_band']} (mean per device index)"
        )
        if h["hosts"] > 40
        else f"all {h['hosts']} nodes"
    )
    return (
        "<h2>Nodes x devices</h2><p>Each device's worst ratio over its probes, nodes sorted worst first "
        f"(lowest mean ratio): {note}. A whole slow node is a red row.</p>"
        + svg.heatmap(rows, h["columns"], h["threshold"], "node x device ratios")
    )


def _flagged(rep: Report, link) -> str:
    if not rep.flagged:
        return "<h2>Flagged devices</h2><p>none: no straggler and no degraded device</p>"
    detailed = {(e["host"], e["gpu"], e["probe"], e["settings"]) for e in rep.details}
    rows = []
    for n, e in enumerate(rep.flagged):
        name = _e(e["label"])
        if (e["host"], e["gpu"], e["probe"], e["settings"]) in detailed:
            name = f'<a href="#d{n}">{name}</a>'
        gpu = f'<a href="{_e(link(e["host"], e["gpu"]))}">{_e(e["gpu"])}</a>' if link else _e(e["gpu"])
        rows.append(
            f"<tr><td>{name}</td><td>{gpu}</td><td>{_e(e['model'])}</td><td>{_e(e['probe'])}</td>"
            f'<td class="{_e(e["verdict"])}">{_e(e["verdict"])}{", degraded" if e["degraded"] else ""}</td>'
            f"<td class=n>{_num(e['ratio'])}</td><td class=n>{_pct(e['deficit'])}</td>"
            f"<td class=n>{_pct(e['cost'])}</td><td>{_e(', '.join(e['causes']))}</td><td>{_e(e['basis'])}</td></tr>"
        )
    more = rep.n_flagged - len(rep.flagged)
    return (
        f"<h2>Flagged devices ({rep.n_flagged})</h2><p>Stragglers first, costliest first; then degraded "
        "devices.</p><table><tr><th>device</th><th>gpu</th><th>model</th><th>probe</th><th>verdict</th>"
        "<th>ratio</th><th>deficit</th><th>cost</th><th>causes</th><th>basis</th></tr>"
        + "".join(rows)
        + "</table>"
        + (f"<p class=muted>{more} more (the --json document has every entry)</p>" if more else "")
    )


def _details(rep: Report, link) -> str:
    if not rep.details:
        return ""
    t = float(rep.summary.get("min_effect") or 0.04)
    out = [f"<h2>Flagged devices in detail</h2><p>The {len(rep.details)} costliest flagged entries.</p>"]
    for e in rep.details:
        head = f"{e['label']} {e['gpu']} {e['probe']}"
        facts = [
            ("model", e["model"]),
            ("verdict", e["verdict"] + (", degraded" if e["degraded"] else "")),
            ("ratio", f"{_num(e['ratio'])} (95% {_num(e['ratio_low'])}-{_num(e['ratio_high'])})"),
            ("deficit", _pct(e["deficit"])),
            ("cost to every job it joins", _pct(e["cost"])),
            ("basis", e["basis"]),
            ("value / peers' median", f"{_num(e['value'], '.4g')} / {_num(e['peer_median'], '.4g')}"),
            ("samples (kept)", f"{e['n_samples']} ({e['n_kept']})"),
            ("class", e["perf_class"] or "-"),
            ("q-value", _num(e["q_value"], ".2g")),
        ]
        if e["degraded"]:
            facts.append(("lost since its change point", f"{_pct(e['change_loss'])} (from scan {e['change_scan']})"))
        table = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts) + "</table>"
        charts = []
        if e["samples"]:
            xs, ys = [p[0] for p in e["samples"]], [p[1] for p in e["samples"]]
            peer = e.get("peer_median")
            hl = []
            if peer is not None and math.isfinite(float(peer)):
                hl = [
                    (float(peer), "peers' median", "#333"),
                    (float(peer) * (1 - t), f"T {t:.0%}", svg.TIER_COLOURS["straggler"]),
                ]
            charts.append(
                svg.lines(
                    [("sample", svg.TIER_COLOURS["straggler"], xs, ys, True)],
                    f"samples {head}",
                    "sample",
                    "value",
                    hlines=hl,
                )
            )
        if e["series"]:
            sr = e["series"]
            xs = list(range(len(sr["scans"])))
            vl = [(sr["change"], "change", svg.TIER_COLOURS["undecided"])] if sr["change"] is not None else []
            charts.append(
                svg.lines(
                    [("ratio to peers per scan", "#2e5d9a", xs, sr["ratio"], False)],
                    f"history {head}",
                    "scan (oldest first)",
                    "ratio to peers",
                    vlines=vl,
                    hlines=[(1.0, "peers", "#333")],
                    xticks=xs[:: max(1, len(xs) // 8)],
                    xfmt=lambda v: f"{v:.0f}",
                )
            )
        hist = "" if e["series"] else "<p class=muted>no past scans of this device in the input: no history</p>"
        tel = ""
        if e["telemetry"]:
            tel = (
                "<table><tr><th>telemetry (current scan)</th><th>device</th><th>peers' median</th>"
                "<th>names the cause</th></tr>"
                + "".join(
                    f"<tr{' class=cause' if why else ''}><td>{_e(c)}</td><td class=n>{_num(v, '.4g')}</td>"
                    f"<td class=n>{_num(p, '.4g')}</td><td>{_e(', '.join(why))}</td></tr>"
                    for c, v, p, why in e["telemetry"]
                )
                + "</table>"
            )
        acts = "".join(f"<li><b>{_e(c)}</b>: {_e(a)}</li>" for c, a in e["actions"])
        more = f' <a href="{_e(link(e["host"], e["gpu"]))}">history view</a>' if link else ""
        out.append(
            f'<div class=dev id="d{_index(rep, e)}"><h3>{_e(head)}{more}</h3>{table}'
            f"<p><b>evidence</b>: {_e(e['evidence'] or '-')}</p><div class=charts>{''.join(charts)}</div>{hist}"
            f"{tel}<p><b>what to do</b></p><ul>{acts or '<li>-</li>'}</ul></div>"
        )
    return "".join(out)


def _index(rep: Report, e: dict) -> int:
    key = (e["host"], e["gpu"], e["probe"], e["settings"])
    for n, f in enumerate(rep.flagged):
        if (f["host"], f["gpu"], f["probe"], f["settings"]) == key:
            return n
    return -1


def _classes(rep: Report) -> str:
    if not rep.classes:
        return "<h2>Performance classes</h2><p class=muted>no peer group of 4 or more devices</p>"
    rows = "".join(
        f"<tr><td>{_e(c['model'])}</td><td>{_e(c['probe'])}</td>"
        + "".join(
            f"<td class=n>{v['devices']} ({_num(v['low'])}-{_num(v['high'])})</td>" for v in c["classes"].values()
        )
        + "</tr>"
        for c in rep.classes
    )
    return (
        "<h2>Performance classes</h2><p>Placement classes per peer group by ratio: A the fastest quarter .. "
        "D the slowest; a scheduler keeps the devices of one job in one class. Devices (ratio range).</p>"
        "<table><tr><th>model</th><th>probe</th><th>A</th><th>B</th><th>C</th><th>D</th></tr>" + rows + "</table>"
    )


def _command(rep: Report) -> str:
    s = rep.summary
    keys = ("fdr", "min_effect", "min_effect_few", "clear_level", "slow_sigmas", "min_change")
    opts = ", ".join(f"{k}={s[k]}" for k in keys if k in s)
    return (
        f"<h2>How this report was made</h2><pre>{_e(rep.meta.get('command', ''))}</pre>"
        f"<p>analysis settings: {_e(opts)}; samples {_e(s.get('samples'))}, history rows "
        f"{_e(s.get('history_rows'))}</p>"
    )
