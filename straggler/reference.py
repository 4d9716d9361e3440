"""The fleet reference the gate judges a node against: per ``model|probe|settings``, the median
value of the healthy devices of the OTHER nodes of the fleet. The node's own results at the
collector (its agent's scans and retests) are its own past, not its fleet: kept in, a one-node
fleet (or a node just resumed after its retests) was judged against itself a minute earlier, with
the fleet test's fixed threshold and no noise model, and drained again on that noise.

From the collector when it answers (``GET /api/v1/gpus``, the fleet's latest verdicts), written to
a cache file each time; else the last cached copy; else none (the gate then compares the node's
devices only with each other). :class:`FleetReference` says which, in one line.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

COLLECTOR, CACHE, PEERS = "collector", "cache", "peers only"


@dataclass(frozen=True)
class FleetReference:
    source: str  # collector | cache | peers only
    note: str  # one line: where it came from, how old, or why there is none
    values: Mapping[str, float] = field(default_factory=dict)  # "model|probe|settings" -> value

    def to_json(self) -> dict:
        return {"source": self.source, "note": self.note, "entries": len(self.values)}


def reference_values(gpus: Iterable[Mapping[str, Any]], leave_out: Collection[str] = ()) -> dict[str, float]:
    """``/api/v1/gpus`` entries -> the median value of the devices not flagged, per model, probe
    and settings, without the devices of the hosts in ``leave_out`` (the node judged) (pure)."""
    groups: dict[str, list[float]] = {}
    for g in gpus:
        if g.get("host") in leave_out:
            continue
        for p in g.get("probes") or ():
            v = p.get("value")
            if (
                p.get("straggler")
                or p.get("verdict") in ("straggler", "undecided")
                or not isinstance(v, (int, float))
                or not v > 0
            ):
                continue
            groups.setdefault(f"{g.get('model')}|{p.get('probe')}|{p.get('settings') or ''}", []).append(float(v))
    return {k: statistics.median(vs) for k, vs in groups.items()}


def fleet_reference(
    url: str | None, cache: Path | None, timeout_s: float, token: str | None = None, node: Collection[str] = ()
) -> FleetReference:
    """The reference from ``url`` (within ``timeout_s``; ``token``: the collector's bearer token, which
    its fleet reads need unless it sets ``open_reads``), else from ``cache``, else none. ``node``: the
    names the judged node may have at the collector (its Slurm name, its host name); its own
    devices are left out (said in the note)."""
    why = "no --collector given"
    if url:
        try:
            gpus = _get_gpus(url, timeout_s, token)
            values = reference_values(gpus, node)
        except (OSError, ValueError, urllib.error.URLError) as e:
            why = f"collector {url} unreachable ({_reason(e)})"
        else:
            if cache is not None:
                _write_cache(cache, url, values)
            own = [g for g in gpus if g.get("host") in node]
            names = ", ".join(sorted({str(g["host"]) for g in own}))
            note = f" (the {len(own)} device(s) of {names} itself left out)" if own else ""
            return FleetReference(COLLECTOR, f"collector {url}: {len(values)} model/probe reference(s){note}", values)
    if cache is not None:
        try:
            doc = json.loads(cache.read_text())
            values = {str(k): float(v) for k, v in doc["references"].items()}
            age_s = time.time() - float(doc["ts"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why += f"; cache {cache} unreadable ({type(e).__name__})"
        else:
            return FleetReference(CACHE, f"{why}; cached copy from {doc.get('url')}, {age_s:.0f} s old", values)
    return FleetReference(PEERS, f"{why}; no cached reference: the node's devices are compared with each other")


def _get_gpus(url: str, timeout_s: float, token: str | None = None) -> list:
    req = urllib.request.Request(
        url.rstrip("/") + "/api/v1/gpus", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    with urllib.request.urlopen(req, timeout=max(timeout_s, 0.1)) as r:
        doc = json.loads(r.read())
    gpus = doc.get("gpus") if isinstance(doc, dict) else None
    if not isinstance(gpus, list):
        raise ValueError("no 'gpus' list in the answer")
    return gpus


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):  # it answered, and refused (401: no or a wrong token)
        return f"HTTP {e.code} {e.reason}"
    inner = getattr(e, "reason", None)
    return str(inner if inner is not None else e) or type(e).__name__


def _write_cache(cache: Path, url: str, values: Mapping[str, float]) -> None:
    write_json(cache, {"url": url, "ts": time.time(), "references": dict(values)})


def write_json(path: Path, doc: Mapping) -> None:
    """Best effort, atomic: a state or cache file that cannot be written costs the next gate its
    comparison or its fallback (it can only miss a change, never invent one), not this gate its result."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dict(doc)))
        tmp.replace(path)
    except OSError:
        pass
