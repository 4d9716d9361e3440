"""NVML health without load: the gate's first and cheapest phase.

Reading and judging are separate. :func:`read_health` reads every device once through a telemetry
backend (``nvml``, or ``fake:<scenario>`` in tests: both go through :mod:`probes.nvml`'s funnel);
the gate runs it in a child (``python -m straggler.probes.health SPEC``, one JSON line on stdout)
that it kills at its deadline, so an NVML call stuck in the driver never holds the gate past its
budget. :func:`judge` is pure: the readings, the devices the job will use and the state the last
check left -> findings and the state to keep.

Checks (each a :class:`straggler.finding.Finding`, ``fail`` unless said otherwise):

- ``missing``: a device the job asks for that NVML does not enumerate, or a GPU (by UUID) that the
  last check saw and this one does not; a device NVML cannot read (``lost`` or ``error``);
- ``ecc``: uncorrectable ECC errors since the last check (the first check records the count);
- ``remapped_rows``: a row remap pending (needs a GPU reset) or failed (needs service);
- ``retired_pages``: more retired pages than at the last check;
- ``persistence``: persistence mode off (each job then pays the driver's init, and clocks and
  ECC state reset between jobs);
- ``idle_throttle``: clocks held down by a thermal, power-brake or hardware slowdown while the
  GPU is idle.

A field NVML cannot read is not judged (could not check is never unhealthy); it is listed as an
``error`` finding only when NVML itself is unavailable.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping, Sequence

from straggler.finding import ERROR, FAIL, Finding

from .telemetry import STATUS_OK, reading_to_dict

# Clock-event reasons that are normal on an idle GPU; any other one at idle is a finding.
IDLE_NORMAL = frozenset({"gpu_idle", "applications_clocks_setting", "display_clocks_setting", "sync_boost"})
IDLE_CAUSE = {"hw_thermal_slowdown": "thermal", "sw_thermal_slowdown": "thermal", "hw_slowdown": "hw-slowdown",
              "hw_power_brake_slowdown": "power-brake", "sw_power_cap": "power"}
IDLE_UTIL_PCT = 5.0  # above this the GPU is not idle and its clocks are not judged


def read_health(spec: str) -> dict[str, Any]:
    """Every device of the backend ``spec``, read once: ``{"backend", "count", "error", "readings"}``."""
    from .backends import open_backend

    backend = open_backend(spec, "cuda")
    try:
        count = backend.device_count()
        error = getattr(backend, "init_error", None) if count == 0 else None
        readings = [reading_to_dict(backend.read(i)) for i in range(count)]
    finally:
        backend.close()
    return {"backend": backend.name, "count": count, "error": error, "readings": readings, "ts": time.time()}


def judge(doc: Mapping[str, Any], wanted: Sequence[int] | None, state: Mapping[str, Any] | None
          ) -> tuple[list[Finding], dict[str, Any]]:
    """(findings, new state) from a :func:`read_health` document. ``wanted``: the GPU indices the
    job will use (None: all); ``state``: what the last check returned (None: first check)."""
    state = dict(state or {})
    findings: list[Finding] = []
    if doc.get("error"):
        return [Finding("node", "nvml", "unavailable", "nvml", doc["error"], ERROR)], state
    readings = {r["index"]: r for r in doc.get("readings", ())}
    count = int(doc.get("count") or 0)
    for i in sorted(set(wanted or ()) - set(range(count))):
        findings.append(Finding(f"gpu{i}", "missing", f"{count} enumerated", "missing",
                                f"the job asks for GPU {i}; NVML enumerates {count}"))
    seen = {r.get("uuid"): r["index"] for r in readings.values() if r.get("uuid")}
    for uuid in sorted(set(state.get("uuids", ())) - set(seen)):
        findings.append(Finding("node", "missing", uuid, "missing", "seen at the last check, not enumerated now"))
    ecc_before = dict(state.get("ecc_uncorrected", {}))
    pages_before = dict(state.get("retired_pages", {}))
    for i, r in sorted(readings.items()):
        if wanted is not None and i not in wanted:
            continue
        findings += _device(f"gpu{i}", r, ecc_before.get(r.get("uuid")), pages_before.get(r.get("uuid")))
    new_state = {
        "uuids": sorted(set(state.get("uuids", ())) | set(seen)) if findings else sorted(seen),
        "ecc_uncorrected": {**ecc_before, **{r["uuid"]: r["ecc_uncorrected_total"] for r in readings.values()
                                              if r.get("uuid") and r.get("ecc_uncorrected_total") is not None}},
        "retired_pages": {**pages_before, **{r["uuid"]: r["retired_pages"] for r in readings.values()
                                             if r.get("uuid") and r.get("retired_pages") is not None}},
    }
    return findings, new_state


def _device(dev: str, r: Mapping[str, Any], ecc_before: int | None, pages_before: int | None) -> list[Finding]:
    if r.get("status", STATUS_OK) != STATUS_OK:
        why = (r.get("errors") or {}).get("device", r.get("status"))
        return [Finding(dev, "missing", str(r.get("status")), "missing", f"NVML cannot read the device ({why})")]
    out = []
    ecc = r.get("ecc_uncorrected_total")
    if ecc is not None and ecc_before is not None and ecc > ecc_before:
        out.append(Finding(dev, "ecc", f"+{ecc - ecc_before}", "ecc",
                           f"{ecc - ecc_before} uncorrectable ECC error(s) since the last check ({ecc} in all)"))
    if r.get("remapped_rows_failed"):
        out.append(Finding(dev, "remapped_rows", "failed", "memory", "a row remap failed: the GPU needs service"))
    elif r.get("remapped_rows_pending"):
        out.append(Finding(dev, "remapped_rows", "pending", "memory", "a row remap waits for a GPU reset"))
    pages = r.get("retired_pages")
    if pages is not None and pages_before is not None and pages > pages_before:
        out.append(Finding(dev, "retired_pages", f"+{pages - pages_before}", "memory",
                           f"{pages - pages_before} page(s) retired since the last check ({pages} in all)"))
    if r.get("persistence_mode") is False:
        out.append(Finding(dev, "persistence", "off", "config",
                           "persistence mode is off (nvidia-smi -pm 1, or nvidia-persistenced)"))
    util = r.get("util_pct")
    reasons = set(r.get("throttle_reasons") or ()) - IDLE_NORMAL
    if reasons and (util is None or util <= IDLE_UTIL_PCT):
        worst = sorted(reasons, key=lambda x: (x not in IDLE_CAUSE, x))[0]
        clock = r.get("sm_clock_mhz")
        value = f"{clock:.0f}MHz" if isinstance(clock, (int, float)) else "throttled"
        out.append(Finding(dev, "idle_throttle", value, IDLE_CAUSE.get(worst, "clocks"),
                           f"clocks held down while idle: {', '.join(sorted(reasons))}"))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m straggler.probes.health SPEC``: one JSON line (:func:`read_health`) on stdout."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        doc = read_health(argv[0] if argv else "auto")
    except Exception as e:  # noqa: BLE001 - the parent gets one line, whatever broke
        doc = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
