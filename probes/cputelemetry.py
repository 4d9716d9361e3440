"""The CPU backend (psutil): one device per logical core.

Per core: current and maximum frequency (``sm_clock_mhz`` / ``sm_clock_max_mhz``), temperature
where a sensor names the core (coretemp ``Core N`` matched through the core's topology), and
utilization from the change in the core's CPU times since this backend last read it (the first
read of a core has no interval, so its utilization is None). Fields a CPU has no counterpart for
(power, PCIe, ECC, ...) are None.
"""

from __future__ import annotations

import platform
import re
import threading
import time
from pathlib import Path

from .telemetry import STATUS_ERROR, DeviceReading, NodeSnapshot


def cpu_model() -> str | None:
    """``model name`` from /proc/cpuinfo (None where there is none, e.g. some ARM kernels)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def _core_id(cpu: int) -> int | None:
    try:
        return int(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id").read_text())
    except (OSError, ValueError):
        return None


def _positive(value: float | None) -> float | None:
    return float(value) if value else None  # psutil reports 0.0 for "unknown"


class CpuBackend:
    """Telemetry of the CPU cores through psutil. Lazy: psutil is imported on first read."""

    name = "cpu"

    def __init__(self, notice: str = "cpu: one device per CPU core (psutil)") -> None:
        self.notice = notice
        self._lock = threading.Lock()
        self._last_times: dict[int, tuple[float, float]] = {}  # core -> (busy_s, total_s)
        self._model: str | None = None
        self._count: int | None = None

    def device_count(self) -> int:
        import psutil

        if self._count is None:
            self._count = psutil.cpu_count(logical=True) or 0
            self._model = cpu_model()
        return self._count

    def _util(self, index: int, times) -> float | None:
        total = sum(times)
        busy = total - times.idle - getattr(times, "iowait", 0.0)
        with self._lock:
            last = self._last_times.get(index)
            self._last_times[index] = (busy, total)
        if last is None or total <= last[1]:
            return None
        return max(0.0, min(100.0, 100.0 * (busy - last[0]) / (total - last[1])))

    @staticmethod
    def _temps() -> dict[int, float]:
        """Physical core id -> temperature, from coretemp-like sensors that name their core.

        Core ids repeat on every socket, and psutil lists the sockets' sensors together in no order
        that ties a core to its package: with more than one package in view, per-core temperatures
        cannot be attributed, so none are reported (missing, never another core's value)."""
        import psutil

        out: dict[int, float] = {}
        packages = set()
        sensors = getattr(psutil, "sensors_temperatures", lambda: {})()
        for entries in sensors.values():
            for entry in entries:
                label = (entry.label or "").strip()
                if m := re.fullmatch(r"package id\s*(\d+)", label, re.IGNORECASE):
                    packages.add(int(m.group(1)))
                m = re.fullmatch(r"core\s*(\d+)", label, re.IGNORECASE)
                if m and entry.current is not None:
                    out[int(m.group(1))] = float(entry.current)
        return {} if len(packages) > 1 else out

    def read(self, index: int) -> DeviceReading:
        return self._read(index, None)

    def _read(self, index: int, temps: dict[int, float] | None) -> DeviceReading:
        import psutil

        ts = time.time()
        count = self.device_count()
        if not 0 <= index < count:
            return DeviceReading(ts=ts, index=index, status=STATUS_ERROR, errors={"device": "invalid_argument"})
        freqs = psutil.cpu_freq(percpu=True) or []
        freq = freqs[index] if index < len(freqs) else (freqs[0] if len(freqs) == 1 else None)
        times = psutil.cpu_times(percpu=True)
        temps = self._temps() if temps is None else temps
        core = _core_id(index)
        errors = {}
        temp = temps.get(core) if core is not None else None
        if temp is None:
            errors["temp_c"] = "no_sensor"
        return DeviceReading(
            ts=ts,
            index=index,
            uuid=f"cpu{index}",
            model=self._model,
            driver=f"linux-{platform.release()}",
            sm_clock_mhz=_positive(freq.current) if freq else None,
            sm_clock_max_mhz=_positive(freq.max) if freq else None,
            temp_c=temp,
            util_pct=self._util(index, times[index]) if index < len(times) else None,
            errors=errors,
        )

    def snapshot(self, host: str) -> NodeSnapshot:
        temps = self._temps()
        devices = tuple(self._read(i, temps) for i in range(self.device_count()))
        return NodeSnapshot(ts=time.time(), host=host, backend=self.name, devices=devices)

    def close(self) -> None:
        pass
