"""Never probe on top of a job: watch the node while the probe child runs, from its start (which
covers a cluster scan's shared start instant) to its end, every :data:`WATCH_S` seconds.

- **GPUs**: every compute process on a device that is not the probe's own is a job. NVML lists the
  PIDs (``NvmlBackend.compute_pids``, through the NVML funnel); a process is the probe's own when
  it is in the child's session (the child runs in its own session). A backend that lists no PIDs
  (the fake backend) counts every compute process as a job. A device whose process list cannot be
  read counts as busy: unknown is never idle.
- **CPU** (a probe on the CPU cores): CPU time used by processes outside the probe's session and
  other than the agent itself, summed; above ``job_cpu_cores`` cores over the last
  :data:`WINDOW_S` seconds it is a job. Per process (psutil), so a job is seen on a core the probe
  also uses. CPU times that cannot be read count as busy.

:meth:`JobWatch.check` returns why a job is there, or None; :attr:`JobWatch.appeared_ts` is then
the wall-clock instant from which measurements may be disturbed (the start of the first check
interval that saw the job's load): rows whose window ends after it are not kept.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

from straggler.probes.telemetry import STATUS_LOST

WATCH_S = 0.25  # seconds between two checks while a probe runs
WINDOW_S = 0.5  # CPU load is judged over this much of the recent past
NOISE_CORES = 0.05  # below this, a check interval's foreign CPU use is background noise (sshd, journald)


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone, or in a PID namespace we cannot see: not proven to be the probe's
        return None


@dataclass
class _Interval:
    start_ts: float  # wall clock, the start of the interval
    dt_s: float
    cores: float  # foreign CPU use over the interval, in cores
    top: str  # the process that used the most of it


class JobWatch:
    def __init__(self, backend, child_pid: int, watch_gpus: bool, job_cpu_cores: float) -> None:
        """``job_cpu_cores`` 0: CPU load is not watched (a probe on GPUs, or turned off)."""
        self.backend = backend
        self.child_pid = child_pid
        self.watch_gpus = watch_gpus
        self.job_cpu_cores = job_cpu_cores
        self.own_pid = os.getpid()
        self.appeared_ts: float | None = None
        self._last_clean_ts: float | None = None  # wall clock of the last check that found no job
        self._history: deque[_Interval] = deque(maxlen=int(10 / WATCH_S))
        self._cpu: dict[int, tuple[float, float]] | None = None  # pid -> (create_time, cpu_s)
        self._cpu_at: tuple[float, float] = (0.0, 0.0)  # (monotonic, wall) of the last CPU reading
        if job_cpu_cores > 0:
            self._cpu, self._cpu_at = self._read_cpu(), (time.monotonic(), time.time())

    def _own(self, pid: int) -> bool:
        return pid == self.own_pid or pid == self.child_pid or _session_of(pid) == self.child_pid

    # --- GPUs ---
    def _gpu_job(self) -> str | None:
        count = self.backend.device_count()
        lister = getattr(self.backend, "compute_pids", None)
        for index in range(count):
            if lister is not None:
                pids, code = lister(index)
                if code == "gpu_is_lost":
                    continue
                if pids is None:
                    return f"device {index}: compute processes unknown ({code})"
                foreign = [p for p in pids if not self._own(p)]
                if foreign:
                    return f"device {index} runs {len(foreign)} compute process(es) not the probe's (pid {foreign[0]})"
                continue
            reading = self.backend.read(index)
            if reading.status == STATUS_LOST:
                continue
            if reading.processes is None:
                return f"device {index}: compute processes unknown ({reading.errors.get('processes', reading.status)})"
            if reading.processes:
                return f"device {index} runs {reading.processes} compute process(es)"
        return None

    # --- CPU ---
    def _read_cpu(self) -> dict[int, tuple[float, float]] | None:
        """CPU seconds of every process that is not the probe's or the agent's; None when unreadable."""
        import psutil

        out = {}
        try:
            for p in psutil.process_iter():
                try:
                    if self._own(p.pid):
                        continue
                    t = p.cpu_times()
                    out[p.pid] = (p.create_time(), t.user + t.system)
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue  # ended meanwhile
        except (OSError, psutil.Error):  # AccessDenied too: a process we cannot read may be a job
            return None
        return out

    def _cpu_job(self) -> str | None:
        now_mono, now_wall = time.monotonic(), time.time()
        current = self._read_cpu()
        previous, (then_mono, then_wall) = self._cpu, self._cpu_at
        self._cpu, self._cpu_at = current, (now_mono, now_wall)
        if current is None or previous is None:
            self.appeared_ts = then_wall
            return "CPU times of the node's processes cannot be read"
        dt = max(now_mono - then_mono, 1e-3)
        used, top = 0.0, (0.0, "")
        for pid, (created, cpu_s) in current.items():
            before = previous.get(pid)
            # a process born since the last reading used all its CPU time within the interval
            base = before[1] if before is not None and before[0] == created else 0.0
            if before is None and created < then_wall - 1.0:
                continue  # older than the interval but unseen before (it was ours, or unreadable): no baseline
            delta = max(0.0, cpu_s - base)
            used += delta
            if delta > top[0]:
                top = (delta, f"pid {pid}")
        self._history.append(_Interval(then_wall, dt, used / dt, top[1]))
        recent, span = [], 0.0
        for interval in reversed(self._history):
            recent.append(interval)
            span += interval.dt_s
            if span >= WINDOW_S:
                break
        cores = sum(i.cores * i.dt_s for i in recent) / span
        if cores <= self.job_cpu_cores:
            return None
        # the job appeared at the start of the first of the loaded intervals just before this check
        first = self._history[-1]
        for interval in reversed(self._history):
            if interval.cores <= NOISE_CORES:
                break
            first = interval
        self.appeared_ts = first.start_ts
        worst = max(recent, key=lambda i: i.cores)
        return (
            f"processes outside the probe use {cores:.2f} CPU cores (more than job_cpu_cores = "
            f"{self.job_cpu_cores:g}; most: {worst.top})"
        )

    def check(self) -> str | None:
        """Why a job is on the node now (and :attr:`appeared_ts` set), or None."""
        wall = time.time()
        if self.job_cpu_cores > 0:
            reason = self._cpu_job()
            if reason:
                return reason
        if self.watch_gpus:
            reason = self._gpu_job()
            if reason:
                self.appeared_ts = self._last_clean_ts if self._last_clean_ts is not None else wall
                return reason
        self._last_clean_ts = wall
        return None
