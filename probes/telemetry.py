"""Telemetry records and the backend protocol every hardware source implements.

One telemetry pass produces frozen snapshots; the sampler, the exporter, the uploader and the CLI
all read those. Backends (``nvml.py`` — the only module that imports pynvml —, ``cputelemetry.py``
through psutil, and ``fakenvml.py`` replaying recorded fixtures in tests) implement
:class:`TelemetryBackend`. A device that cannot be read is a reading with a status, never an
exception; a value that cannot be read is ``None``, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Protocol, runtime_checkable

# NVML clock-event (throttle) reasons, by our names (defined once, with their bits, in straggler.records).
# SW power cap at full load is normal; the others during a probe are evidence of a cause.
from straggler.records import THROTTLE_REASONS

# Reading statuses. "ok": every field read (some may be None: NOT_SUPPORTED on this device);
# "lost": the device fell off the bus / GPU is lost; "error": the device could not be read.
STATUS_OK = "ok"
STATUS_LOST = "lost"
STATUS_ERROR = "error"


@dataclass(frozen=True)
class DeviceReading:
    """One device at one instant. Units are in the names; unknown is None."""

    ts: float
    index: int
    uuid: str | None = None  # GPU-... ; "cpu<N>" for a CPU core
    model: str | None = None
    serial: str | None = None
    pci_bus_id: str | None = None
    driver: str | None = None
    sm_clock_mhz: float | None = None  # core clock on a CPU
    sm_clock_max_mhz: float | None = None
    mem_clock_mhz: float | None = None
    mem_clock_max_mhz: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temp_c: float | None = None
    throttle_reasons: frozenset[str] | None = None  # active reasons, names from THROTTLE_REASONS
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    ecc_corrected_total: int | None = None  # volatile + aggregate as NVML reports, aggregate preferred
    ecc_uncorrected_total: int | None = None
    retired_pages: int | None = None
    remapped_rows: int | None = None
    remapped_rows_pending: bool | None = None  # a row remap waits for the next GPU reset
    remapped_rows_failed: bool | None = None  # a remap failed: the GPU needs service
    persistence_mode: bool | None = None
    # XID events seen since the backend started, by XID code (counts; NVML's critical-error events)
    xid_errors: Mapping[int, int] | None = None
    util_pct: float | None = None
    mem_util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    processes: int | None = None  # running compute processes (a count: PIDs are never exported)
    status: str = STATUS_OK
    # field name -> why it is None (e.g. "not_supported", "no_permission", "gpu_lost", "unknown")
    errors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeSnapshot:
    """Every device of a host, read in one pass."""

    ts: float
    host: str
    backend: str  # "nvml", "cpu", "fake:<scenario>"
    devices: tuple[DeviceReading, ...]
    # whole-backend failure (e.g. NVML failed to initialise); devices is then empty
    error: str | None = None


@runtime_checkable
class TelemetryBackend(Protocol):
    """A hardware source. Implementations initialise lazily (on first use, never at import)."""

    name: str
    notice: str  # one line: which backend this is and, after a fallback, why

    def device_count(self) -> int: ...

    def read(self, index: int) -> DeviceReading:
        """Read one device. Never raises for a device problem: returns a reading with a status."""
        ...

    def snapshot(self, host: str) -> NodeSnapshot:
        """Read every device. Never raises: a backend failure is ``NodeSnapshot.error``."""
        ...

    def close(self) -> None: ...


READING_FIELDS = tuple(f.name for f in fields(DeviceReading))
# Fields that describe the device rather than its state: kept on a reading of a lost device.
IDENTITY_FIELDS = ("index", "uuid", "model", "serial", "pci_bus_id", "driver")


def reading_to_dict(reading: DeviceReading) -> dict[str, Any]:
    """A JSON-ready dict (throttle reasons as a sorted list, errors as a plain dict)."""
    out: dict[str, Any] = {}
    for name in READING_FIELDS:
        value = getattr(reading, name)
        if name == "throttle_reasons" and value is not None:
            value = sorted(value)
        elif name == "errors":
            value = dict(value)
        elif name == "xid_errors" and value is not None:
            value = {str(k): v for k, v in sorted(value.items())}
        out[name] = value
    return out


def reading_from_dict(data: Mapping[str, Any], **overrides: Any) -> DeviceReading:
    """Inverse of :func:`reading_to_dict`; unknown keys raise ValueError naming them."""
    merged = {**data, **overrides}
    unknown = sorted(set(merged) - set(READING_FIELDS))
    if unknown:
        raise ValueError(f"unknown reading field(s): {', '.join(unknown)}")
    reasons = merged.get("throttle_reasons")
    if reasons is not None:
        bad = sorted(set(reasons) - set(THROTTLE_REASONS))
        if bad:
            raise ValueError(f"unknown throttle reason(s): {', '.join(bad)}")
        merged["throttle_reasons"] = frozenset(reasons)
    merged["errors"] = dict(merged.get("errors") or {})
    if merged.get("xid_errors") is not None:
        merged["xid_errors"] = {int(k): int(v) for k, v in merged["xid_errors"].items()}
    return DeviceReading(**merged)


__all__ = [
    "THROTTLE_REASONS",
    "STATUS_OK",
    "STATUS_LOST",
    "STATUS_ERROR",
    "DeviceReading",
    "NodeSnapshot",
    "TelemetryBackend",
    "READING_FIELDS",
    "IDENTITY_FIELDS",
    "reading_to_dict",
    "reading_from_dict",
]
