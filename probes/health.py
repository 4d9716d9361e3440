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
  GPU is idle;
- ``xid``: a critical XID event (:data:`CRITICAL_XIDS`) in the kernel log since the last check
  (``NVRM: Xid (PCI:0000:18:00): 79, ...``; NVML reports XIDs only to a listener registered before
  they happen, the kernel log keeps them). The log is ``/dev/kmsg`` (sequence-numbered records) or
  a file of such lines; the first check of a boot records where the log is.

A field NVML cannot read is not judged (could not check is never unhealthy); it is listed as an
``error`` finding only when NVML itself is unavailable.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Mapping, Sequence

from straggler.finding import ERROR, Finding

from .telemetry import STATUS_OK, reading_to_dict

# Clock-event reasons that are normal on an idle GPU; any other one at idle is a finding.
IDLE_NORMAL = frozenset({"gpu_idle", "applications_clocks_setting", "display_clocks_setting", "sync_boost"})
IDLE_CAUSE = {
    "hw_thermal_slowdown": "thermal",
    "sw_thermal_slowdown": "thermal",
    "hw_slowdown": "hw-slowdown",
    "hw_power_brake_slowdown": "power-brake",
    "sw_power_cap": "power",
}
IDLE_UTIL_PCT = 5.0  # above this the GPU is not idle and its clocks are not judged
# XIDs that mean the GPU must not take a job (NVIDIA's XID catalogue): memory errors, a GPU that
# fell off the bus or whose firmware stopped, NVLink errors.
CRITICAL_XIDS = {  # xid -> (cause, meaning)
    48: ("ecc", "double-bit ECC error"),
    63: ("memory", "row remap recorded"),
    64: ("memory", "row remap failed"),
    74: ("nvlink", "NVLink error"),
    79: ("bus", "fallen off the bus"),
    92: ("ecc", "high single-bit ECC rate"),
    94: ("ecc", "contained ECC error"),
    95: ("ecc", "uncontained ECC error"),
    119: ("gsp", "GSP timeout"),
    120: ("gsp", "GSP error"),
    140: ("ecc", "unrecovered ECC error"),
}
XID_RE = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F:.]+)\): (\d+)")
KMSG = "/dev/kmsg"


def read_health(spec: str, kernel_log: str | None = KMSG) -> dict[str, Any]:
    """Every device of the backend ``spec``, read once, and the kernel log's XID lines:
    ``{"backend", "count", "error", "readings", "boot", "xids", "xid_error"}``."""
    from .backends import open_backend

    backend = open_backend(spec, "cuda")
    try:
        count = backend.device_count()
        error = getattr(backend, "init_error", None) if count == 0 else None
        readings = [reading_to_dict(backend.read(i)) for i in range(count)]
    finally:
        backend.close()
    xids, xid_error = read_xids(kernel_log) if kernel_log else ([], None)
    return {
        "backend": backend.name,
        "count": count,
        "error": error,
        "readings": readings,
        "ts": time.time(),
        "boot": _boot_id(),
        "xids": xids,
        "xid_error": xid_error,
    }


def read_xids(path: str) -> tuple[list[list], str | None]:
    """``[[seq, pci, xid, text], ...]`` from a kernel log in /dev/kmsg's format (``6,SEQ,US,-;TEXT``,
    read without blocking until its end), or (``[]``, why it could not be read)."""
    out = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return [], f"{path}: {e.strerror}"
    try:
        if path == KMSG:
            os.lseek(fd, 0, os.SEEK_SET)  # from the oldest record the kernel still holds
        buf, records = b"", []
        while True:
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                break  # /dev/kmsg: no newer record
            except OSError as e:
                if e.errno == 32:  # EPIPE: a record was overwritten while we read; go on
                    continue
                raise
            if not chunk:
                break
            if path == KMSG:
                records.append(chunk)  # one record per read
            else:
                buf += chunk
        lines = [r.decode(errors="replace") for r in records] or buf.decode(errors="replace").splitlines()
    except OSError as e:
        return [], f"{path}: {e.strerror}"
    finally:
        os.close(fd)
    for n, line in enumerate(lines):
        head, sep, text = line.partition(";")
        fields = head.split(",")
        seq = int(fields[1]) if sep and len(fields) > 1 and fields[1].isdigit() else n
        m = XID_RE.search(text if sep else line)
        if m:
            out.append([seq, m.group(1).lower(), int(m.group(2)), (text if sep else line).strip()[:200]])
    return out, None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _bus(pci: str | None) -> str:
    """``00000000:18:00.0`` and ``0000:18:00`` -> ``18:00`` (bus:device, as the kernel log names a GPU)."""
    parts = (pci or "").lower().split(".")[0].split(":")
    return ":".join(parts[-2:]) if len(parts) >= 2 else ""


def judge(
    doc: Mapping[str, Any], wanted: Sequence[int] | None, state: Mapping[str, Any] | None
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
        findings.append(
            Finding(
                f"gpu{i}",
                "missing",
                f"{count} enumerated",
                "missing",
                f"the job asks for GPU {i}; NVML enumerates {count}",
            )
        )
    seen = {r.get("uuid"): r["index"] for r in readings.values() if r.get("uuid")}
    for uuid in sorted(set(state.get("uuids", ())) - set(seen)):
        findings.append(Finding("node", "missing", uuid, "missing", "seen at the last check, not enumerated now"))
    findings += _xids(doc, readings, wanted, state)
    ecc_before = dict(state.get("ecc_uncorrected", {}))
    pages_before = dict(state.get("retired_pages", {}))
    for i, r in sorted(readings.items()):
        if wanted is not None and i not in wanted:
            continue
        findings += _device(f"gpu{i}", r, ecc_before.get(r.get("uuid")), pages_before.get(r.get("uuid")))
    new_state = {
        "uuids": sorted(set(state.get("uuids", ())) | set(seen)) if findings else sorted(seen),
        "ecc_uncorrected": {
            **ecc_before,
            **{
                r["uuid"]: r["ecc_uncorrected_total"]
                for r in readings.values()
                if r.get("uuid") and r.get("ecc_uncorrected_total") is not None
            },
        },
        "retired_pages": {
            **pages_before,
            **{
                r["uuid"]: r["retired_pages"]
                for r in readings.values()
                if r.get("uuid") and r.get("retired_pages") is not None
            },
        },
        "boot": doc.get("boot"),
        "xid_seq": max([x[0] for x in doc.get("xids") or ()] + [_last_seq(state, doc)]),
    }
    return findings, new_state


def _last_seq(state: Mapping[str, Any], doc: Mapping[str, Any]) -> int:
    """The last kernel-log record the last check saw, in this boot (-1: none, or another boot)."""
    return int(state.get("xid_seq", -1)) if state.get("boot") == doc.get("boot") else -1


def _xids(doc, readings, wanted, state) -> list[Finding]:
    """Critical XIDs since the last check (none on the first check: it records where the log is)."""
    if "xid_seq" not in state:
        return []
    since = _last_seq(state, doc)
    index_of = {_bus(r.get("pci_bus_id")): i for i, r in readings.items() if r.get("pci_bus_id")}
    out = []
    for seq, pci, xid, text in doc.get("xids") or ():
        if seq <= since or xid not in CRITICAL_XIDS:
            continue
        i = index_of.get(_bus(pci))
        if wanted is not None and i is not None and i not in wanted:
            continue
        cause, meaning = CRITICAL_XIDS[xid]
        out.append(Finding(f"gpu{i}" if i is not None else "node", "xid", str(xid), cause, f"{meaning}: {text}"))
    return out


def _device(dev: str, r: Mapping[str, Any], ecc_before: int | None, pages_before: int | None) -> list[Finding]:
    if r.get("status", STATUS_OK) != STATUS_OK:
        why = (r.get("errors") or {}).get("device", r.get("status"))
        return [Finding(dev, "missing", str(r.get("status")), "missing", f"NVML cannot read the device ({why})")]
    out = []
    ecc = r.get("ecc_uncorrected_total")
    if ecc is not None and ecc_before is not None and ecc > ecc_before:
        out.append(
            Finding(
                dev,
                "ecc",
                f"+{ecc - ecc_before}",
                "ecc",
                f"{ecc - ecc_before} uncorrectable ECC error(s) since the last check ({ecc} in all)",
            )
        )
    if r.get("remapped_rows_failed"):
        out.append(Finding(dev, "remapped_rows", "failed", "memory", "a row remap failed: the GPU needs service"))
    elif r.get("remapped_rows_pending"):
        out.append(Finding(dev, "remapped_rows", "pending", "memory", "a row remap waits for a GPU reset"))
    pages = r.get("retired_pages")
    if pages is not None and pages_before is not None and pages > pages_before:
        out.append(
            Finding(
                dev,
                "retired_pages",
                f"+{pages - pages_before}",
                "memory",
                f"{pages - pages_before} page(s) retired since the last check ({pages} in all)",
            )
        )
    if r.get("persistence_mode") is False:
        out.append(
            Finding(
                dev,
                "persistence",
                "off",
                "config",
                "persistence mode is off (nvidia-smi -pm 1, or nvidia-persistenced)",
            )
        )
    util = r.get("util_pct")
    reasons = set(r.get("throttle_reasons") or ()) - IDLE_NORMAL
    if reasons and (util is None or util <= IDLE_UTIL_PCT):
        worst = sorted(reasons, key=lambda x: (x not in IDLE_CAUSE, x))[0]
        clock = r.get("sm_clock_mhz")
        value = f"{clock:.0f}MHz" if isinstance(clock, (int, float)) else "throttled"
        out.append(
            Finding(
                dev,
                "idle_throttle",
                value,
                IDLE_CAUSE.get(worst, "clocks"),
                f"clocks held down while idle: {', '.join(sorted(reasons))}",
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m straggler.probes.health SPEC [KERNEL_LOG|-]``: one JSON line (:func:`read_health`)
    on stdout; ``-``: no kernel log."""
    argv = sys.argv[1:] if argv is None else argv
    log = argv[1] if len(argv) > 1 else KMSG
    try:
        doc = read_health(argv[0] if argv else "auto", None if log == "-" else log)
    except Exception as e:  # noqa: BLE001 - the parent gets one line, whatever broke
        doc = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
