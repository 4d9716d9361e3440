"""A telemetry backend that replays a fixture: the same protocol and the same reading builder as NVML.

A fixture (``probes/fixtures/<scenario>.json``, shipped in the package as ``straggler/probes/fixtures/``, or one written by :func:`probes.fixture_recorder.record_fixture`)::

    {"source": "...", "scenario": "h100_healthy", "backend": "nvml", "interval_s": 0.1,
     "devices": [{"base": {<reading fields>}, "frames": [{<reading fields>}, ...]}, ...],
     "faults": [{"device": 7, "from_read": 5, "until_read": null, "nvml_error": "gpu_is_lost",
                 "fields": null}]}

Each ``read(i)`` of device ``i`` replays its next frame (``base`` merged with the frame; frames
loop; ``xid_errors``, the XID events seen so far by code, must not decrease). A frame's ``errors`` (``{"retired_pages": "not_supported"}``) and ``status`` replay as NVML
failures. Faults are scenario data: from the ``from_read``-th read of a device until ``until_read``
(exclusive; null = for ever) the listed ``fields`` fail with ``nvml_error``, or the whole device
does when ``fields`` is null. Instead of ``nvml_error`` a fault may name a ``python_error`` that a
real pynvml raises besides ``NVMLError``: ``"AttributeError"`` (a function an older nvidia-ml-py
lacks) or ``"UnicodeDecodeError"`` (a name that is not valid UTF-8; text fields only); it becomes
the status the NVML funnel gives it (:func:`probes.nvml.failure_of`). A fault ``"hang": true``
(instead of an error name) makes the read of its device never return, as an NVML call stuck in
the driver does (the gate's NVML child is killed at its deadline). A fault with
``"device": null`` hits the whole backend, counted in snapshots: with ``nvml_error`` the snapshot
is a backend error, with ``python_error`` (also ``"OSError"``, ``"RuntimeError"``) ``snapshot()``
raises -- a broken backend, which the agent must survive. Everything goes through
:func:`probes.nvml.build_reading`, so a replayed error becomes exactly the status the NVML backend
gives; ``fakepynvml.py`` serves the same fixtures through the pynvml API to the NVML backend itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from straggler.errors import InputError

from .nvml import GPU_IS_LOST, NvmlFailure, build_reading, failure_of, init_hint
from .telemetry import (
    IDENTITY_FIELDS,
    READING_FIELDS,
    STATUS_LOST,
    STATUS_OK,
    DeviceReading,
    NodeSnapshot,
    reading_from_dict,
)

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"  # package data: replays work from a wheel too
_NOT_REPLAYED = ("ts", "index", "status", "errors")
TEXT_FIELDS = ("uuid", "model", "serial", "pci_bus_id", "driver")
DEVICE_PYTHON_ERRORS = ("AttributeError", "UnicodeDecodeError")
BACKEND_PYTHON_ERRORS = {"AttributeError": AttributeError, "OSError": OSError, "RuntimeError": RuntimeError}


def python_error(name: str) -> Exception:
    """The exception a fault's ``python_error`` names, as pynvml would raise it."""
    if name == "UnicodeDecodeError":
        return UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte")
    return BACKEND_PYTHON_ERRORS[name](f"injected by the fixture: {name}")


def fault_at(fault: Mapping[str, Any], device: int | None, n: int) -> bool:
    """Whether ``fault`` hits read ``n`` of ``device`` (None: the ``n``-th snapshot of the backend)."""
    until = fault.get("until_read")
    return fault.get("device") == device and n >= fault.get("from_read", 0) and (until is None or n < until)


def fixture_path(ref: str) -> Path:
    """A scenario name -> its file ($STRAGGLER_FIXTURES, else the package's fixtures/); a path stays a path."""
    if ref.endswith(".json") or os.sep in ref:
        return Path(ref)
    base = Path(os.environ["STRAGGLER_FIXTURES"]) if os.environ.get("STRAGGLER_FIXTURES") else FIXTURE_DIR
    return base / f"{ref}.json"


def _check(path: Path, data: Any) -> None:
    """Raise InputError naming the first thing wrong in a fixture."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise InputError(f"{path}: not a telemetry fixture (no 'devices' list)")
    for i, dev in enumerate(data["devices"]):
        frames = dev.get("frames") if isinstance(dev, dict) else None
        if not isinstance(frames, list) or not frames:
            raise InputError(f"{path}: device {i} has no 'frames'")
        for j, frame in enumerate(frames):
            try:
                reading_from_dict({**dev.get("base", {}), **frame}, ts=0.0, index=i)
            except (ValueError, TypeError) as e:
                raise InputError(f"{path}: device {i} frame {j}: {e}") from None
    for k, fault in enumerate(data.get("faults", [])):
        device, nvml_error, py_error = (
            fault.get("device", "missing"),
            fault.get("nvml_error"),
            fault.get("python_error"),
        )
        if not (device is None or (isinstance(device, int) and not isinstance(device, bool))):
            raise InputError(f"{path}: fault {k} needs an integer 'device' (or null: the whole backend)")
        if fault.get("hang") is True and nvml_error is None and py_error is None and device is not None:
            continue
        if (nvml_error is None) == (py_error is None) or not isinstance(nvml_error or py_error, str):
            raise InputError(
                f"{path}: fault {k} needs either an 'nvml_error' or a 'python_error' name "
                '(or "hang": true on a device)'
            )
        fields = fault.get("fields")
        bad = sorted(set(fields or ()) - set(READING_FIELDS))
        if bad:
            raise InputError(f"{path}: fault {k}: unknown field(s) {', '.join(bad)}")
        allowed = tuple(BACKEND_PYTHON_ERRORS) if device is None else DEVICE_PYTHON_ERRORS
        if py_error is not None and py_error not in allowed:
            raise InputError(f"{path}: fault {k}: python_error {py_error!r} is not one of {', '.join(allowed)}")
        if py_error is not None and device is not None and not fields:
            raise InputError(f"{path}: fault {k}: a python_error needs 'fields'")
        if py_error == "UnicodeDecodeError" and set(fields) - set(TEXT_FIELDS):
            raise InputError(f"{path}: fault {k}: UnicodeDecodeError hits text fields only ({', '.join(TEXT_FIELDS)})")


def load_fixture(ref: str) -> tuple[Path, dict]:
    path = fixture_path(ref)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such telemetry fixture (scenario {ref!r})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read fixture: {e}") from None
    _check(path, data)
    return path, data


class FakeBackend:
    """Replays a fixture (see the module doc). Thread-safe; each device counts its own reads."""

    def __init__(self, ref: str) -> None:
        self.path, self._data = load_fixture(ref)
        self.scenario = self._data.get("scenario") or self.path.stem
        self.name = f"fake:{self.scenario}"
        self.notice = f"{self.name}: replaying {self.path.name} ({self._data.get('source', 'unknown source')})"
        self._devices: list[dict] = self._data["devices"]
        self._faults: list[dict] = list(self._data.get("faults", []))
        self._reads = [0] * len(self._devices)
        self._snapshots = 0
        self._lock = threading.Lock()

    def device_count(self) -> int:
        return len(self._devices)

    def _active(self, index: int | None, n: int) -> list[Mapping[str, Any]]:
        return [f for f in self._faults if fault_at(f, index, n)]

    def read(self, index: int) -> DeviceReading:
        ts = time.time()
        if not 0 <= index < len(self._devices):
            return build_reading(index, ts, {}, {}, device_error="invalid_argument")
        with self._lock:
            n = self._reads[index]
            self._reads[index] += 1
        dev = self._devices[index]
        frame = {**dev.get("base", {}), **dev["frames"][n % len(dev["frames"])]}
        identity = {k: frame[k] for k in IDENTITY_FIELDS if k in frame and k != "index"}
        values: dict[str, Any] = {k: v for k, v in frame.items() if k not in identity and k not in _NOT_REPLAYED}
        if values.get("throttle_reasons") is not None:
            values["throttle_reasons"] = frozenset(values["throttle_reasons"])
        if values.get("xid_errors") is not None:  # JSON keys are text; XID codes are numbers
            values["xid_errors"] = {int(k): int(v) for k, v in values["xid_errors"].items()}
        errors = dict(frame.get("errors") or {})
        device_error = None
        status = frame.get("status", STATUS_OK)
        if status != STATUS_OK:
            device_error = GPU_IS_LOST if status == STATUS_LOST else errors.get("device", "unknown")
        for name, code in errors.items():
            if name != "device":
                values[name] = NvmlFailure(code)
        for fault in self._active(index, n):
            while fault.get("hang"):  # an NVML call stuck in the driver: whoever called it must kill us
                time.sleep(3600)
            failure = (
                failure_of(python_error(fault["python_error"]))
                if fault.get("python_error")
                else NvmlFailure(fault["nvml_error"])
            )
            if fault.get("fields") is None:
                device_error = failure.code
            else:
                for name in fault["fields"]:
                    (identity if name in identity else values)[name] = failure
        return build_reading(index, ts, identity, values, device_error=device_error)

    def snapshot(self, host: str) -> NodeSnapshot:
        with self._lock:
            n = self._snapshots
            self._snapshots += 1
        for fault in self._active(None, n):
            if fault.get("python_error"):
                raise python_error(fault["python_error"])
            return NodeSnapshot(
                ts=time.time(), host=host, backend=self.name, devices=(), error=init_hint(fault["nvml_error"])
            )
        return NodeSnapshot(
            ts=time.time(),
            host=host,
            backend=self.name,
            devices=tuple(self.read(i) for i in range(len(self._devices))),
        )

    def close(self) -> None:
        pass
