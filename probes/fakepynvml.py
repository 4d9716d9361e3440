"""A pynvml-shaped library that serves a telemetry fixture through the pynvml API.

``NvmlBackend(library=FakePynvml("h100_healthy"))`` runs the NVML backend's own code -- its
getters, its funnel, its identity cache -- against recorded values, where the fake backend
(``fakenvml.FakeBackend``) replays readings straight into ``build_reading``. Constants and the
``NVMLError`` classes are the real pynvml's (through ``probes.nvml``, the one module importing it).

The fixture is the fake backend's (see ``fakenvml.py``). Each ``nvmlDeviceGetHandleByIndex(i)``
starts the next read of device ``i``: its frame (``base`` merged with the frame), and the faults
active at that read. A field that is missing, ``None`` or listed in the frame's ``errors`` fails
its getter with that NVML error (``not_supported`` when none is named). A fault's ``fields`` fail
every getter that serves one of them (``nvmlDeviceGetMemoryInfo`` serves both memory sizes):
``nvml_error`` raises that ``NVMLError``; ``python_error: "AttributeError"`` removes the getter, as
an older nvidia-ml-py lacks it; ``python_error: "UnicodeDecodeError"`` makes a text getter answer
bytes that are not valid UTF-8. A fault without ``fields`` makes the handle itself fail.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from .fakenvml import load_fixture, fault_at
from .nvml import REASON_CONSTANTS, _nv
from .telemetry import STATUS_LOST, STATUS_OK


def _mask(reasons) -> int:
    nv = _nv()
    bits = {
        ours: getattr(nv, f"nvmlClocksEventReason{suffix}", None) or getattr(nv, f"nvmlClocksThrottleReason{suffix}")
        for ours, suffix in REASON_CONSTANTS
    }
    mask = 0
    for reason in reasons:
        mask |= bits[reason]
    return mask


def _flag(value: Callable, field: str) -> int:
    """A remap flag: NVML returns it with the counts in one call, so a fixture that records the
    counts but not the flag answers 0 (no remap pending or failed) rather than fail the counts."""
    frame = value.__self__.frame
    return int(bool(frame.get(field))) if field not in value.__self__.errors else value(field)


class _Read:
    """One read of one device: the values and the faults that apply to it."""

    def __init__(self, index: int, frame: dict, faults: list[dict]) -> None:
        self.index = index
        self.frame = frame
        self.errors = dict(frame.get("errors") or {})
        self.faults = faults

    def value(self, field: str) -> Any:
        """The value of ``field``, or raise as NVML would for a field that cannot be read."""
        for fault in self.faults:
            if field in (fault.get("fields") or ()) and fault.get("nvml_error"):
                raise _nvml_error(fault["nvml_error"])
        if field in self.errors:
            raise _nvml_error(self.errors[field])
        if self.frame.get(field) is None:
            raise _nvml_error("not_supported")
        return self.frame[field]

    def fault(self, fields: tuple[str, ...], kind: str) -> bool:
        return any(f.get("python_error") == kind and set(fields) & set(f.get("fields") or ()) for f in self.faults)


def _nvml_error(code: str) -> Exception:
    nv = _nv()
    return nv.NVMLError(getattr(nv, f"NVML_ERROR_{code.upper()}", nv.NVML_ERROR_UNKNOWN))


class FakePynvml:
    """Serves the fixture ``ref`` (a scenario name or a path) through the pynvml functions
    :class:`probes.nvml.NvmlBackend` calls; everything else is the real pynvml's."""

    def __init__(self, ref: str) -> None:
        self.path, data = load_fixture(ref)
        self._devices: list[dict] = data["devices"]
        self._faults: list[dict] = list(data.get("faults", []))
        self._reads = [0] * len(self._devices)
        # XID events: a frame's cumulative ``xid_errors`` become events queued for the device
        self._xid_seen: list[dict[int, int]] = [{} for _ in self._devices]
        self._xid_queue: list[list[int]] = [[] for _ in self._devices]
        self._driver = next(
            (d.get("base", {}).get("driver") for d in self._devices if d.get("base", {}).get("driver")), None
        )
        self.initialised = False
        nv = _nv()
        sm, mem = nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM
        corrected, uncorrected = nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        single = nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        # getter -> (fields it serves, how it answers given value(field) of the current read)
        self._getters: dict[str, tuple[tuple[str, ...], Callable]] = {
            "nvmlDeviceGetUUID": (("uuid",), lambda v: v("uuid")),
            "nvmlDeviceGetName": (("model",), lambda v: v("model")),
            "nvmlDeviceGetSerial": (("serial",), lambda v: v("serial")),
            "nvmlDeviceGetPciInfo": (("pci_bus_id",), lambda v: SimpleNamespace(busId=v("pci_bus_id"))),
            "nvmlDeviceGetMaxClockInfo": (
                ("sm_clock_max_mhz", "mem_clock_max_mhz"),
                lambda v, kind: v({sm: "sm_clock_max_mhz", mem: "mem_clock_max_mhz"}[kind]),
            ),
            "nvmlDeviceGetClockInfo": (
                ("sm_clock_mhz", "mem_clock_mhz"),
                lambda v, kind: v({sm: "sm_clock_mhz", mem: "mem_clock_mhz"}[kind]),
            ),
            "nvmlDeviceGetMaxPcieLinkGeneration": (("pcie_gen_max",), lambda v: v("pcie_gen_max")),
            "nvmlDeviceGetMaxPcieLinkWidth": (("pcie_width_max",), lambda v: v("pcie_width_max")),
            "nvmlDeviceGetCurrPcieLinkGeneration": (("pcie_gen",), lambda v: v("pcie_gen")),
            "nvmlDeviceGetCurrPcieLinkWidth": (("pcie_width",), lambda v: v("pcie_width")),
            "nvmlDeviceGetMemoryInfo": (
                ("mem_total_bytes", "mem_used_bytes"),
                lambda v: SimpleNamespace(total=v("mem_total_bytes"), used=v("mem_used_bytes")),
            ),
            "nvmlDeviceGetPowerUsage": (("power_w",), lambda v: int(v("power_w") * 1000)),
            "nvmlDeviceGetEnforcedPowerLimit": (("power_limit_w",), lambda v: int(v("power_limit_w") * 1000)),
            "nvmlDeviceGetTemperature": (("temp_c",), lambda v, _sensor: v("temp_c")),
            "nvmlDeviceGetCurrentClocksEventReasons": (("throttle_reasons",), lambda v: _mask(v("throttle_reasons"))),
            "nvmlDeviceGetCurrentClocksThrottleReasons": (
                ("throttle_reasons",),
                lambda v: _mask(v("throttle_reasons")),
            ),
            "nvmlDeviceGetTotalEccErrors": (
                ("ecc_corrected_total", "ecc_uncorrected_total"),
                lambda v, kind, _c: v({corrected: "ecc_corrected_total", uncorrected: "ecc_uncorrected_total"}[kind]),
            ),
            "nvmlDeviceGetRetiredPages": (
                ("retired_pages",),
                lambda v, cause: [0] * v("retired_pages") if cause == single else [],
            ),
            "nvmlDeviceGetRemappedRows": (
                ("remapped_rows", "remapped_rows_pending", "remapped_rows_failed"),
                lambda v: (v("remapped_rows"), 0, _flag(v, "remapped_rows_pending"), _flag(v, "remapped_rows_failed")),
            ),
            "nvmlDeviceGetPersistenceMode": (("persistence_mode",), lambda v: int(v("persistence_mode"))),
            "nvmlDeviceGetUtilizationRates": (
                ("util_pct", "mem_util_pct"),
                lambda v: SimpleNamespace(gpu=v("util_pct"), memory=v("mem_util_pct")),
            ),
            "nvmlDeviceGetComputeRunningProcesses": (
                ("processes",),
                lambda v: [SimpleNamespace(pid=0)] * v("processes"),
            ),
        }

    # --- library functions ---
    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self._devices)

    def nvmlSystemGetDriverVersion(self) -> str:
        if self._driver is None:
            raise _nvml_error("not_supported")
        return self._driver

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Read:
        if not 0 <= index < len(self._devices):
            raise _nvml_error("invalid_argument")
        n = self._reads[index]
        self._reads[index] += 1
        dev = self._devices[index]
        frame = {**dev.get("base", {}), **dev["frames"][n % len(dev["frames"])]}
        faults = [f for f in self._faults if fault_at(f, index, n)]
        for f in faults:
            if f.get("fields") is None:
                raise _nvml_error(f["nvml_error"])
        if frame.get("status", STATUS_OK) != STATUS_OK:
            raise _nvml_error(
                "gpu_is_lost"
                if frame["status"] == STATUS_LOST
                else (frame.get("errors") or {}).get("device", "unknown")
            )
        xids = frame.get("xid_errors")
        if isinstance(xids, dict):
            for code, total in sorted((int(k), int(v)) for k, v in xids.items()):
                self._xid_queue[index].extend([code] * max(0, total - self._xid_seen[index].get(code, 0)))
                self._xid_seen[index][code] = total
        return _Read(index, frame, faults)

    # XID events (pynvml's event-set API): one set per device, drained without waiting
    def nvmlEventSetCreate(self) -> SimpleNamespace:
        return SimpleNamespace(device=None)

    def nvmlDeviceRegisterEvents(self, handle: _Read, event_types: int, event_set: SimpleNamespace) -> None:
        if handle.fault(("xid_errors",), "AttributeError"):
            raise AttributeError("module 'pynvml' has no attribute 'nvmlDeviceRegisterEvents'")
        handle.value("xid_errors")  # a device without XID events fails as NVML would
        event_set.device = handle.index

    def nvmlEventSetWait_v2(self, event_set: SimpleNamespace, timeout_ms: int) -> SimpleNamespace:
        queue = self._xid_queue[event_set.device]
        if not queue:
            raise _nvml_error("timeout")
        nv = _nv()
        return SimpleNamespace(eventType=nv.nvmlEventTypeXidCriticalError, eventData=queue.pop(0), device=None)

    def nvmlEventSetFree(self, event_set: SimpleNamespace) -> None:
        event_set.device = None

    def __getattr__(self, name: str) -> Any:
        getter = self.__dict__.get("_getters", {}).get(name)
        if getter is None:
            if name.startswith("nvml") and callable(getattr(_nv(), name, None)) and not name.startswith("nvmlClocks"):
                raise AttributeError(f"FakePynvml serves no {name}")  # a call the backend should not make
            return getattr(_nv(), name)  # constants, NVMLError
        fields, answer = getter

        def call(handle: _Read, *args):
            if handle.fault(fields, "AttributeError"):
                # as pynvml does when the function's symbol is looked up and it is not there
                raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
            value = answer(handle.value, *args)
            if isinstance(value, str) and handle.fault(fields, "UnicodeDecodeError"):
                return value.encode() + b"\xff\xfe"  # an old pynvml hands back raw bytes
            return value

        return call
