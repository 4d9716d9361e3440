"""``run_scan(settings) -> ScanResult``: start one worker per device, watch them, keep every sample.

Locally the runner is a small launcher: it hosts the rendezvous store on loopback, starts one
``python -m straggler.probes.worker`` per device, reads their JSON-line messages as they come, and
kills a worker that makes no progress past its phase deadline (or the scan's ``deadline_s``).
Samples are kept the moment a probe ends, so a worker that hangs or dies later loses nothing
already measured. Under torchrun/srun the same call is one rank of the launcher's group and rank
0 gathers every rank's messages (:mod:`.distributed`).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

from .budget import phase_deadlines, round_needed_s, scan_needed_s
from .devices import host_name, launcher, plan_probes, resolve_devices, visible_gpus
from .distributed import RankRounds, run_rank
from .plan import ScanResult, ScanSettings, WorkerPlan, check_settings, worker_plan
from .worker import EXIT_ABORTED


def run_scan(
    settings: ScanSettings,
    on_event: Callable[[dict], None] | None = None,
    stopped: Callable[[], str | None] | None = None,
) -> ScanResult:
    """``stopped()``: the name of a signal the caller caught before this scan could install its own
    handlers (between the rounds of :class:`ScanRounds`), which stops this scan too; or None."""
    check_settings(settings)
    launch = launcher()
    if launch is not None:
        return run_rank(settings, launch, on_event)
    host = host_name()
    # the launcher never imports torch (seconds of start-up): NVML counts the GPUs, the workers
    # import torch anyway, and worker 0 hosts the rendezvous store
    count, counted_by = (0, "NVML (not asked: --device cpu)") if settings.device == "cpu" else gpu_count()
    dplan = resolve_devices(settings.device, count, os.sched_getaffinity(0), counted_by)
    probes, notes = plan_probes(settings.probes, dplan.kind, len(dplan.indices))
    plan = worker_plan(settings, host, dplan.kind, probes)
    watch = Watch(plan, dplan.indices, settings, on_event, stopped)
    watch.run()
    res = watch.result(f"device {dplan.kind}: {dplan.reason}", notes)
    res.duration_s = plan.duration_s
    return res


class ScanRounds:
    """The rounds of one local scan, for :func:`straggler.remeasure.remeasure`.

    ``measure(probes, samples)`` runs one round: the first as ``settings`` say, each further one on
    every device again (same scan id, no start instant) with windows as long as the first round's,
    so ``samples`` windows last ``samples x duration / settings.samples``. ``fits(probes, samples)``
    says when such a round would not end before ``settings.deadline_s`` (the whole scan's, all rounds
    together): its probing plus the longest start-up a round took so far. Each round is also given
    only the time left, so the runner kills it at the scan's deadline.

    Under torchrun/srun the rounds run in one process group (:class:`.distributed.RankRounds`): on
    rank 0 ``measure`` runs each round on every rank (rank 0 decides, the others follow); on the
    other ranks the first ``measure`` follows every round rank 0 runs and returns no samples.
    :meth:`close` ends the rounds (rank 0 tells the other ranks; a local scan has nothing to end)."""

    def __init__(self, settings: ScanSettings, on_event: Callable[[dict], None] | None = None):
        self.settings, self.on_event = settings, on_event
        self.started = time.monotonic()
        self.first: ScanResult | None = None
        self.overhead_s = 0.0  # the longest a round took beyond its probing (start-up, warm-up, report)
        self.stopped_by: str | None = None  # a signal that came between two rounds
        self.done_probes: tuple[str, ...] = ()  # the probes of the rounds so far, one entry per round
        self.ranks: RankRounds | None = None  # torchrun/srun: this rank's RankRounds

    def _progress(self, before: tuple[str, ...]) -> Callable[[dict], None] | None:
        """The progress display counts the probes of every round so far, not of this round alone."""
        if self.on_event is None or not before:
            return self.on_event
        return lambda msg: self.on_event({**msg, "probes": (*before, *msg.get("probes", ()))})

    @contextmanager
    def between_rounds(self) -> Iterator[None]:
        """SIGTERM or Ctrl-C between two rounds (during a round the runner stops its workers itself):
        no further round, and the samples so far are reported."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.stopped_by = signal.Signals(signum).name

    def stop_failure(self) -> dict:
        host = self.first.host if self.first else host_name()
        return {
            "host": host,
            "device": "-",
            "rank": None,
            "probe": "scan",
            "error": f"scan stopped by {self.stopped_by} between rounds",
        }

    def window_s(self) -> float:
        return self.first.duration_s / self.settings.samples

    def measure(self, probes: tuple[str, ...], samples: int) -> ScanResult:
        s = self.settings
        if self.first is not None:
            left = None if s.deadline_s is None else s.deadline_s - (time.monotonic() - self.started)
            s = replace(
                s,
                probes=tuple(probes),
                samples=samples,
                duration_s=self.window_s() * samples,
                scan_id=self.first.scan_id,
                start_at=None,
                deadline_s=left,
            )
        t0, wait_s = time.monotonic(), max(0.0, (s.start_at or 0) - time.time())
        res = (
            self._launched(s, probes, samples)
            if launcher() is not None
            else run_scan(s, self._progress(self.done_probes), lambda: self.stopped_by)
        )
        self.done_probes += tuple(p for p in probes if p in {r["probe"] for r in res.samples})
        if res.duration_s is not None:
            probing = len({r["probe"] for r in res.samples} or probes) * res.duration_s
            self.overhead_s = max(self.overhead_s, time.monotonic() - t0 - wait_s - probing)
        self.first = self.first or res
        return res

    def _launched(self, s: ScanSettings, probes: tuple[str, ...], samples: int) -> ScanResult:
        if self.ranks is None:
            check_settings(s)
            self.ranks = RankRounds(s, launcher(), self._progress(self.done_probes))
            return self.ranks.first()
        self.ranks.on_event = self._progress(self.done_probes)
        return self.ranks.again(probes, samples, s.duration_s)

    def close(self) -> None:
        if self.ranks is not None:
            self.ranks.close()

    def fits(self, probes: tuple[str, ...], samples: int) -> str | None:
        if self.stopped_by:
            return f"scan stopped by {self.stopped_by}"
        if self.settings.deadline_s is None or self.first is None or self.first.duration_s is None:
            return None
        left = self.settings.deadline_s - (time.monotonic() - self.started)
        need = round_needed_s(len(probes), self.window_s() * samples, self.overhead_s)
        if need <= left:
            return None
        return f"deadline: a further round needs about {need:.0f} s, {max(left, 0):.0f} s of --deadline left"


def gpu_count() -> tuple[int, str]:
    """(GPUs the workers will see, what counted them) through NVML and CUDA_VISIBLE_DEVICES. Why
    NVML sees none (no driver) the notice's telemetry part says."""
    from .nvml import NvmlBackend

    nvml = NvmlBackend()
    try:
        count = nvml.device_count()
    finally:
        nvml.close()
    return visible_gpus(count), "NVML"


def deadlines(plan: WorkerPlan, grace_s: float) -> dict[str, float]:
    """Seconds a worker may spend in each phase before it counts as hung."""
    return phase_deadlines(plan.duration_s, grace_s, (plan.start_at or 0) - time.time())


def total_deadline(plan: WorkerPlan, grace_s: float) -> float:
    return scan_needed_s(len(plan.probes), plan.duration_s, grace_s, (plan.start_at or 0) - time.time())


@dataclass
class _WorkerState:
    rank: int
    device_index: int
    proc: subprocess.Popen
    stderr: deque
    phase: str = "init"
    probe: str = "setup"
    since: float = field(default_factory=time.monotonic)
    hello: dict | None = None
    reported: bool = False  # the worker itself reported a failure
    finished: bool = False
    eof: bool = False
    killed: str | None = None


class Watch:
    """Starts the local workers, collects their messages and enforces the deadlines."""

    def __init__(
        self,
        plan: WorkerPlan,
        indices: tuple[int, ...],
        settings: ScanSettings,
        on_event: Callable[[dict], None] | None,
        stopped: Callable[[], str | None] | None = None,
    ):
        self.plan, self.indices, self.on_event = plan, indices, on_event
        self.stopped = stopped
        self.limits = deadlines(plan, settings.grace_s)
        self.deadline_s = settings.deadline_s or total_deadline(plan, settings.grace_s)
        self.samples: list[dict] = []
        self._failures: list[tuple[int, int, dict]] = []
        self.telemetry_names: set[str] = set()
        self.notes: set[str] = set()
        self.msgs: queue.Queue = queue.Queue()
        self.stopped_by: str | None = None

    def run(self) -> None:
        # worker 0 hosts the rendezvous store on a port it binds itself and writes to store_file,
        # where the others read it (torch stays out of this process; no port is picked, then lost)
        import tempfile

        where = tempfile.mkdtemp(prefix="straggler-store-")
        store_file = os.path.join(where, "port")
        self.workers = [self._start(r, i, store_file) for r, i in enumerate(self.indices)]
        previous = {}
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (an agent's deadline, systemd) or Ctrl-C: stop the workers and report what
            # was measured, rather than die with it
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop(time.monotonic() + self.deadline_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for w in self.workers:
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait(timeout=10)
            import shutil

            shutil.rmtree(where, ignore_errors=True)

    def _on_signal(self, signum, frame) -> None:
        self.stopped_by = signal.Signals(signum).name

    def _start(self, rank: int, device_index: int, store_file: str) -> _WorkerState:
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the local group never leaves loopback
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")  # (NCCL's bootstrap; its data goes over NVLink/PCIe)
        env["STRAGGLER_WORKER"] = json.dumps(
            {
                "plan": asdict(self.plan),
                "rank": rank,
                "world_size": len(self.indices),
                "device_index": device_index,
                "store_file": store_file,
            }
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "straggler.probes.worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        w = _WorkerState(rank, device_index, proc, deque(maxlen=20))
        threading.Thread(target=self._read, args=(w,), daemon=True).start()
        threading.Thread(target=lambda: w.stderr.extend(proc.stderr), daemon=True).start()
        return w

    def _read(self, w: _WorkerState) -> None:
        for line in w.proc.stdout:
            try:
                self.msgs.put((w, json.loads(line)))
            except json.JSONDecodeError:
                w.stderr.append(line)
        self.msgs.put((w, None))

    def _loop(self, stop_at: float) -> None:
        while not all(w.eof for w in self.workers):
            try:
                w, msg = self.msgs.get(timeout=0.2)
            except queue.Empty:
                w = msg = None
            if w is not None:
                self._handle(w, msg)
            now = time.monotonic()
            if self.stopped is not None and not self.stopped_by:
                self.stopped_by = self.stopped()  # a signal the caller caught before ours were installed
            for x in self.workers:
                if x.proc.poll() is not None or x.killed:
                    continue
                if self.stopped_by:
                    self._kill(x, f"scan stopped by {self.stopped_by}, killed")
                elif now >= stop_at:
                    self._kill(x, f"scan deadline of {self.deadline_s:.0f} s reached, killed")
                elif now - x.since > self.limits[x.phase]:
                    self._kill(x, f"hung: no progress for {now - x.since:.0f} s, killed")
        for w in self.workers:
            code = w.proc.wait(timeout=30)
            if w.killed or (w.reported and code == EXIT_ABORTED):
                continue  # already reported: killed by us, or stopped after saying why
            if code != 0 or not w.finished:
                last = next((s.strip() for s in reversed(w.stderr) if s.strip()), "no output")
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                self._fail(w, w.probe, f"worker died ({how}) during {w.probe}: {last}")

    def _handle(self, w: _WorkerState, msg: dict | None) -> None:
        if msg is None:
            w.eof = True
            return
        kind = msg["t"]
        w.since = time.monotonic()
        if kind == "hello":
            w.hello = msg
            w.phase = "warmup"
            if msg.get("telemetry"):
                self.telemetry_names.add(msg["telemetry"])
            if msg.get("note"):
                self.notes.add(msg["note"])
        elif kind == "phase":
            w.phase, w.probe = msg["state"], msg["probe"]
        elif kind == "samples":
            self.samples.extend(msg["rows"])
        elif kind == "failure":
            w.reported = True
            self._fail(w, msg["probe"], msg["error"], rank=2 if msg.get("consequence") else 1)
        elif kind == "done":
            w.finished = True
        if self.on_event is not None:
            self.on_event({**msg, "world_size": len(self.workers), "probes": self.plan.probes})

    def _kill(self, w: _WorkerState, why: str) -> None:
        w.killed = why
        w.proc.kill()
        self._fail(w, w.probe, why)

    def _fail(self, w: _WorkerState, probe: str, error: str, rank: int = 0) -> None:
        """Record a failure; ``rank`` orders root causes first: 0 seen by the runner (a hang, a
        death, the deadline), 1 a worker's own error, 2 one that may follow from a peer's."""
        dev = w.hello["gpu"] if w.hello else f"{self.plan.kind}{w.device_index}"
        self._failures.append(
            (
                rank,
                len(self._failures),
                {"host": self.plan.host, "device": dev, "rank": w.rank, "probe": probe, "error": error},
            )
        )

    def result(self, device_notice: str, notes: list[str]) -> ScanResult:
        tel = ", ".join(sorted(self.telemetry_names)) or "none"
        notice = "; ".join([device_notice, f"telemetry {tel}", *notes, *sorted(self.notes)])
        devices = [
            {k: w.hello[k] for k in ("host", "gpu", "index", "model")} | {"rank": w.rank}
            for w in self.workers
            if w.hello
        ]
        return ScanResult(
            scan_id=self.plan.scan_id,
            host=self.plan.host,
            backend=self.plan.kind,
            notice=notice,
            samples=self.samples,
            failures=[f for _, _, f in sorted(self._failures, key=lambda x: x[:2])],
            devices=devices,
        )
