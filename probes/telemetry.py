"""Telemetry records and the backend protocol every hardware source implements.

One telemetry pass produces frozen snapshots; the sampler, the exporter, the uploader and the CLI
all read those. Backends (``nvml.py`` — the only module that imports pynvml —, ``cputelemetry.py``
through psutil, and ``fakenvml.py`` replaying recorded fixtures in tests) implement
:class:`TelemetryBackend`. A device that cannot be read is a reading with a status, never an
exception; a value that cannot be read is ``None``, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable

# NVML clock-event (throttle) reasons, by our names. SW power cap at full load is normal; the others
# during a probe are evidence of a cause.
THROTTLE_REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clocks_setting",
)

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

    def device_count(self) -> int: ...

    def read(self, index: int) -> DeviceReading:
        """Read one device. Never raises for a device problem: returns a reading with a status."""
        ...

    def snapshot(self, host: str) -> NodeSnapshot:
        """Read every device. Never raises: a backend failure is ``NodeSnapshot.error``."""
        ...

    def close(self) -> None: ...
