"""The NVML backend: the only module that imports ``pynvml`` (package nvidia-ml-py).

Nothing happens at import. NVML is initialised on first use; every NVML call goes through
:func:`_query`, which turns any exception into an :class:`NvmlFailure` (:func:`failure_of`): an
``NVMLError`` carries the error's name (``"not_supported"``, ``"gpu_is_lost"``, ...), a function an
older nvidia-ml-py lacks is ``"function_not_found"`` (the code NVML gives a function an older
driver lacks), text that is not valid UTF-8 is ``"invalid_text"``, anything else
``"unexpected_error"``. :func:`build_reading` turns those into a reading:
a field that failed is ``None`` with ``errors[field] = code``; a lost GPU is a reading with status
``"lost"`` that keeps the device's identity. The fake backend (``fakenvml.py``) replays fixtures
through the same :func:`build_reading`, and ``fakepynvml.py`` serves a fixture through the pynvml
API to :class:`NvmlBackend` itself (``NvmlBackend(library=...)``), so tests exercise this code path.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple

from straggler.records import THROTTLE_REASONS

from .telemetry import (
    IDENTITY_FIELDS,
    STATUS_ERROR,
    STATUS_LOST,
    DeviceReading,
    NodeSnapshot,
)

log = logging.getLogger("straggler.probes.nvml")
GPU_IS_LOST = "gpu_is_lost"
FUNCTION_NOT_FOUND = "function_not_found"  # NVML's name; also a function an older nvidia-ml-py lacks
INVALID_TEXT = "invalid_text"  # a name, serial or version that is not valid UTF-8
UNEXPECTED = "unexpected_error"  # any other exception out of pynvml
FINAL_CODES = ("not_supported", FUNCTION_NOT_FOUND, INVALID_TEXT)  # a retry would fail the same way
XID_EVENTS_PER_READ = 64  # events drained per device per read; the rest wait for the next read
INIT_RETRY_S = 60.0  # a failed NVML init is retried this long after (a driver loaded after the agent)
# Init failures a user can act on -> what to do.
INIT_HINTS = {
    "library_not_found": "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this host; "
    "install the driver or use the cpu backend",
    "driver_not_loaded": "NVIDIA driver not loaded: check `nvidia-smi` and the nvidia kernel module",
    "no_permission": "no permission to open /dev/nvidia*: run as a user allowed to use the GPUs",
    "lib_rm_version_mismatch": "NVML library and kernel driver versions differ: reboot or reload "
    "the nvidia kernel module",
    "pynvml_missing": "the nvidia-ml-py package (pynvml) is not installed: pip install nvidia-ml-py",
}
# Our throttle-reason names (the one list: straggler.records.THROTTLE_REASONS) -> the pynvml constant's
# suffix (the clock-event name first, the older throttle name second): the name in CamelCase, but one.
_NVML_SPELLING = {"display_clocks_setting": "DisplayClockSetting"}
REASON_CONSTANTS = tuple(
    (name, _NVML_SPELLING.get(name) or "".join(w.capitalize() for w in name.split("_"))) for name in THROTTLE_REASONS
)


class NvmlFailure(NamedTuple):
    """An NVML call that failed; ``code`` is the NVML error name in lower case."""

    code: str


def _nv():
    import pynvml  # the one import of pynvml in straggler

    return pynvml


@functools.cache
def _error_names() -> dict[int, str]:
    nv = _nv()
    return {getattr(nv, n): n[len("NVML_ERROR_") :].lower() for n in dir(nv) if n.startswith("NVML_ERROR_")}


def error_code(exc: BaseException) -> str:
    """``NVMLError(NVML_ERROR_NOT_SUPPORTED)`` -> ``"not_supported"``."""
    value = getattr(exc, "value", None)
    return _error_names().get(value, f"nvml_error_{value}")


def decode_clock_events(mask: int) -> frozenset[str]:
    """An NVML clock-event (throttle) reason bit mask -> our reason names."""
    nv = _nv()
    active = set()
    for ours, suffix in REASON_CONSTANTS:
        bit = getattr(nv, f"nvmlClocksEventReason{suffix}", None)
        if bit is None:
            bit = getattr(nv, f"nvmlClocksThrottleReason{suffix}")
        if mask & bit:
            active.add(ours)
    return frozenset(active)


def init_hint(code: str) -> str:
    return INIT_HINTS.get(code, f"NVML failed to initialise ({code})")


def build_reading(
    index: int,
    ts: float,
    identity: Mapping[str, Any],
    values: Mapping[str, Any],
    device_error: str | None = None,
) -> DeviceReading:
    """One reading from NVML results; failures become None plus ``errors[field]``, never raise."""
    ident = {k: v for k, v in identity.items() if k in IDENTITY_FIELDS and not isinstance(v, NvmlFailure)}
    ident["index"] = index
    lost = device_error == GPU_IS_LOST or any(
        isinstance(v, NvmlFailure) and v.code == GPU_IS_LOST for v in (*identity.values(), *values.values())
    )
    if lost:
        return DeviceReading(ts=ts, status=STATUS_LOST, errors={"device": GPU_IS_LOST}, **ident)
    if device_error is not None:
        return DeviceReading(ts=ts, status=STATUS_ERROR, errors={"device": device_error}, **ident)
    fields: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, value in {**identity, **values}.items():
        if name == "index":
            continue
        if isinstance(value, NvmlFailure):
            errors[name] = value.code
            value = None
        fields[name] = value
    fields["index"] = index
    return DeviceReading(ts=ts, errors=errors, **fields)


def failure_of(exc: Exception) -> NvmlFailure:
    """Any exception out of an NVML call -> the failure a reading records (never raises)."""
    try:
        if isinstance(exc, _nv().NVMLError):
            return NvmlFailure(error_code(exc))
    except ImportError:
        pass
    if isinstance(exc, AttributeError):
        return NvmlFailure(FUNCTION_NOT_FOUND)
    if isinstance(exc, UnicodeError):
        return NvmlFailure(INVALID_TEXT)
    log.debug("unexpected error from NVML: %r", exc)
    return NvmlFailure(UNEXPECTED)


def _query(fn: Callable[[], Any]) -> Any:
    """The funnel: run one NVML call; whatever it raises becomes an NvmlFailure."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure is a status on the reading, never an escape
        return failure_of(e)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _clock_events(nv, h) -> frozenset[str]:
    getter = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    return decode_clock_events(getter(h))


def _retired_pages(nv, h) -> int:
    causes = (
        nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
        nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    )
    return sum(len(nv.nvmlDeviceGetRetiredPages(h, c)) for c in causes)


def _remapped_rows(nv, h) -> int:
    corrected, uncorrected, _pending, _failed = nv.nvmlDeviceGetRemappedRows(h)
    return int(corrected) + int(uncorrected)


def _remap_flag(position: int) -> Callable[[Any, Any], bool]:
    """(corrected, uncorrected, pending, failed) = nvmlDeviceGetRemappedRows: pending or failed."""
    return lambda nv, h: bool(nv.nvmlDeviceGetRemappedRows(h)[position])


def _ecc(nv, h, kind) -> int:
    return int(nv.nvmlDeviceGetTotalEccErrors(h, kind, nv.NVML_AGGREGATE_ECC))


# field -> how to read it from (pynvml, handle). Static fields are read once per device.
STATIC_FIELDS: dict[str, Callable[[Any, Any], Any]] = {
    "uuid": lambda nv, h: _text(nv.nvmlDeviceGetUUID(h)),
    "model": lambda nv, h: _text(nv.nvmlDeviceGetName(h)),
    "serial": lambda nv, h: _text(nv.nvmlDeviceGetSerial(h)),
    "pci_bus_id": lambda nv, h: _text(nv.nvmlDeviceGetPciInfo(h).busId),
    "sm_clock_max_mhz": lambda nv, h: float(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
    "mem_clock_max_mhz": lambda nv, h: float(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
    "pcie_gen_max": lambda nv, h: int(nv.nvmlDeviceGetMaxPcieLinkGeneration(h)),
    "pcie_width_max": lambda nv, h: int(nv.nvmlDeviceGetMaxPcieLinkWidth(h)),
    "mem_total_bytes": lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).total),
}
DYNAMIC_FIELDS: dict[str, Callable[[Any, Any], Any]] = {
    "sm_clock_mhz": lambda nv, h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
    "mem_clock_mhz": lambda nv, h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
    "power_limit_w": lambda nv, h: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
    "temp_c": lambda nv, h: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
    "throttle_reasons": _clock_events,
    "pcie_gen": lambda nv, h: int(nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
    "pcie_width": lambda nv, h: int(nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
    "ecc_corrected_total": lambda nv, h: _ecc(nv, h, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED),
    "ecc_uncorrected_total": lambda nv, h: _ecc(nv, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
    "retired_pages": _retired_pages,
    "remapped_rows": _remapped_rows,
    "remapped_rows_pending": _remap_flag(2),
    "remapped_rows_failed": _remap_flag(3),
    "persistence_mode": lambda nv, h: nv.nvmlDeviceGetPersistenceMode(h) == nv.NVML_FEATURE_ENABLED,
    "util_pct": lambda nv, h: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
    "mem_util_pct": lambda nv, h: float(nv.nvmlDeviceGetUtilizationRates(h).memory),
    "mem_used_bytes": lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).used),
    "processes": lambda nv, h: len(nv.nvmlDeviceGetComputeRunningProcesses(h)),
}


class NvmlBackend:
    """Telemetry from NVIDIA GPUs. Initialises NVML on first use; never raises for a device problem."""

    name = "nvml"

    def __init__(self, library: Any = None) -> None:
        """``library``: a pynvml-shaped object (tests: ``fakepynvml.FakePynvml``); None = pynvml."""
        self.notice = "nvml: NVIDIA GPUs through NVML"
        self._library = library
        self._lock = threading.Lock()
        self._ready = False
        self.init_error: str | None = None  # a hint, when NVML failed to initialise
        self._failed_at = 0.0
        self._count = 0
        self._driver: str | None = None
        self._static: dict[int, dict[str, Any]] = {}
        self._xid_sets: dict[int, Any] = {}  # device -> its NVML event set (XID events)
        self._xid_counts: dict[int, dict[int, int]] = {}  # device -> XID code -> events since start
        self._xid_refused: dict[int, NvmlFailure] = {}  # device -> final failure to register for events
        self._xid_lock = threading.Lock()  # a sampler thread and the agent's tick may read one device at once

    def _ensure(self) -> bool:
        with self._lock:
            if self._ready:
                return True
            if self.init_error is not None and time.monotonic() - self._failed_at < INIT_RETRY_S:
                return False
            try:
                nv = self._lib()
            except ImportError:
                started = count = NvmlFailure("pynvml_missing")
            else:
                started = _query(lambda: nv.nvmlInit())
                count = started if isinstance(started, NvmlFailure) else _query(lambda: int(nv.nvmlDeviceGetCount()))
            if isinstance(count, NvmlFailure):
                if not isinstance(started, NvmlFailure):
                    _query(lambda: nv.nvmlShutdown())
                self.init_error = init_hint(count.code)
                self._failed_at = time.monotonic()
                return False
            self.init_error = None
            driver = _query(lambda: _text(nv.nvmlSystemGetDriverVersion()))
            self._driver = None if isinstance(driver, NvmlFailure) else driver
            self._count = count
            self._ready = True
            return True

    def _lib(self):
        return self._library if self._library is not None else _nv()

    def device_count(self) -> int:
        return self._count if self._ensure() else 0

    def read(self, index: int) -> DeviceReading:
        ts = time.time()
        if not self._ensure():
            return DeviceReading(ts=ts, index=index, status=STATUS_ERROR, errors={"device": "nvml_unavailable"})
        nv = self._lib()
        handle = _query(lambda: nv.nvmlDeviceGetHandleByIndex(index))
        if isinstance(handle, NvmlFailure):
            return build_reading(index, ts, self._static.get(index, {}), {}, device_error=handle.code)
        identity = self._static.get(index)
        if identity is None:
            identity = {name: _query(lambda fn=fn: fn(nv, handle)) for name, fn in STATIC_FIELDS.items()}
            identity["driver"] = self._driver
            # cache the identity only when it is final: a transient failure (timeout, unknown) must
            # not leave a GPU without its UUID for the rest of a long-running agent's life
            if all(v.code in FINAL_CODES for v in identity.values() if isinstance(v, NvmlFailure)):
                self._static[index] = identity
        values: dict[str, Any] = {}
        for name, fn in DYNAMIC_FIELDS.items():
            values[name] = _query(lambda fn=fn: fn(nv, handle))
            if isinstance(values[name], NvmlFailure) and values[name].code == GPU_IS_LOST:
                break  # every further call would fail the same way
        else:
            values["xid_errors"] = self._xids(nv, handle, index)
        return build_reading(index, ts, identity, values)

    def compute_pids(self, index: int) -> tuple[tuple[int, ...] | None, str | None]:
        """The PIDs of the compute processes on device ``index`` (as NVML sees them: the host's PID
        namespace), or (None, the failure's code) when they cannot be read. PIDs are for the agent's
        job watch only; they are never exported."""
        if not self._ensure():
            return None, "nvml_unavailable"
        nv = self._lib()
        handle = _query(lambda: nv.nvmlDeviceGetHandleByIndex(index))
        if isinstance(handle, NvmlFailure):
            return None, handle.code
        procs = _query(lambda: tuple(int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)))
        if isinstance(procs, NvmlFailure):
            return None, procs.code
        return procs, None

    def _xids(self, nv, handle, index: int) -> dict[int, int] | NvmlFailure:
        """XID events of device ``index`` since the backend started, by XID code: registers an
        event set on the first read, then drains what arrived (without waiting) on every read."""
        with self._xid_lock:
            return self._drain_xids(nv, handle, index)

    def _drain_xids(self, nv, handle, index: int) -> dict[int, int] | NvmlFailure:
        if index in self._xid_refused:
            return self._xid_refused[index]
        if index not in self._xid_sets:
            evset = _query(lambda: nv.nvmlEventSetCreate())
            if isinstance(evset, NvmlFailure):
                return evset
            reg = _query(lambda: nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, evset))
            if isinstance(reg, NvmlFailure):
                _query(lambda: nv.nvmlEventSetFree(evset))
                if reg.code in FINAL_CODES:
                    self._xid_refused[index] = reg
                return reg
            self._xid_sets[index], self._xid_counts[index] = evset, {}
        counts = self._xid_counts[index]
        for _ in range(XID_EVENTS_PER_READ):
            event = _query(lambda: nv.nvmlEventSetWait_v2(self._xid_sets[index], 0))
            if isinstance(event, NvmlFailure):
                if event.code != "timeout":  # timeout: nothing more has arrived
                    return event
                break
            if event.eventType & nv.nvmlEventTypeXidCriticalError:
                code = int(event.eventData)
                counts[code] = counts.get(code, 0) + 1
        return dict(counts)

    def snapshot(self, host: str) -> NodeSnapshot:
        ts = time.time()
        if not self._ensure():
            return NodeSnapshot(ts=ts, host=host, backend=self.name, devices=(), error=self.init_error)
        return NodeSnapshot(
            ts=ts, host=host, backend=self.name, devices=tuple(self.read(i) for i in range(self._count))
        )

    def close(self) -> None:
        with self._lock:
            if self._ready:
                nv = self._lib()
                for evset in self._xid_sets.values():
                    _query(lambda evset=evset: nv.nvmlEventSetFree(evset))
                _query(lambda: nv.nvmlShutdown())
            self._ready = False
            self._static.clear()
            self._xid_sets.clear()
            self._xid_counts.clear()
            self._xid_refused.clear()
