"""One probe worker: owns one device, joins the process group, runs every probe after a barrier.

A worker sends messages through ``emit(dict)``: ``hello`` (its device), ``phase`` (a probe starts or
ends, for progress and the runner's watchdog), ``samples`` (canonical rows, sent as soon as a probe
ends so nothing measured is lost if a later probe hangs or dies), ``failure`` and ``done``.
Under the local runner the messages are JSON lines on the worker's stdout
(``python -m straggler.probes.worker``); under torchrun/srun they are gathered to rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable

from . import allreduce, faults, matmul, membw, pcie, windows
from .devices import COLLECTIVE
from .plan import WorkerPlan

MODULES = {"matmul": matmul, "membw": membw, "pcie": pcie, "allreduce": allreduce}
EXIT_ABORTED = 3  # the worker stopped after reporting a failure


def one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class WindowTelemetry:
    """Per-window telemetry through the telemetry engineer's Sampler, or none (with a note)."""

    def __init__(self, spec: str, kind: str, index_for: Callable[[object], int], interval_s: float):
        self.backend = self.sampler = None
        self.note = None
        self.first = None
        from .backends import open_backend
        from .sampler import Sampler

        self.backend = open_backend(spec, kind)
        if self.backend.name == "nvml" and self.backend.device_count() == 0:
            why = getattr(self.backend, "init_error", None) or "NVML sees no GPU"
            self.backend.close()
            self.backend, self.note = None, f"no GPU telemetry ({why})"
            return
        index = index_for(self.backend)
        self.first = self.backend.read(index)
        self.sampler = Sampler(self.backend, index, interval_s)

    def window(self):
        return self.sampler.window() if self.sampler else windows.no_telemetry()

    def close(self):
        if self.backend is not None:
            self.backend.close()


def _nvml_index(dev_uuid: str | None, local: int) -> Callable[[object], int]:
    """CUDA and NVML may number GPUs differently: match by UUID, else use the CUDA index."""

    def find(backend) -> int:
        if dev_uuid:
            for i in range(backend.device_count()):
                if backend.read(i).uuid == dev_uuid:
                    return i
        return local

    return find


class DeviceWorker:
    """One device's worker: its device, telemetry and identity (the ``hello`` message is sent on
    creation), the process group (:meth:`join`), then one or more rounds of the probe plan in that
    group (:meth:`run`; torchrun/srun re-measurement runs several), then :meth:`close`."""

    def __init__(self, plan: WorkerPlan, rank: int, device_index: int, emit: Callable[[dict], None]):
        from .torchdev import Device

        self.rank, self.emit = rank, emit
        self.dev = Device(plan.kind, device_index)
        info = self.dev.describe()
        self.tel = tel = WindowTelemetry(
            plan.telemetry,
            plan.kind,
            (lambda b: device_index) if plan.kind == "cpu" else _nvml_index(info["uuid"], device_index),
            plan.interval_s,
        )
        # a GPU's identity comes from NVML when it is read; never from a CPU core's reading
        first = tel.first if tel.backend is not None and tel.backend.name != "cpu" else None
        gpu = info["gpu"] if plan.kind == "cpu" or not (first and first.uuid) else first.uuid
        model = info["model"] if plan.kind == "cpu" or not (first and first.model) else first.model
        self.ident = {
            "scan_id": plan.scan_id,
            "host": plan.host,
            "gpu": gpu,
            "index": device_index,
            "model": model,
            "driver": tel.first.driver if tel.first else None,
        }
        self.hello = {
            "t": "hello",
            "rank": rank,
            **self.ident,
            "telemetry": tel.backend.name if tel.backend else None,
            "note": tel.note or getattr(tel.backend, "notice", None),
        }
        self.group = None
        emit(self.hello)

    def fail(self, probe: str, error: str, consequence: bool = False) -> None:
        # consequence: the failure may follow from a peer's (a collective or a broken group)
        self.emit({"t": "failure", "rank": self.rank, "probe": probe, "error": error, "consequence": consequence})

    def join(self, group_factory: Callable) -> bool:
        """Join the process group; False (and a failure sent) when it cannot."""
        try:
            self.group = group_factory(self.dev)
        except Exception as e:  # noqa: BLE001 - reported as this worker's failure
            self.fail("setup", f"cannot join the process group: {one_line(e)}")
            return False
        return True

    def run(self, plan: WorkerPlan) -> int:
        """One round of ``plan`` (its probes, windows and duration) in the group; the exit code."""
        return _probe_loop(plan, self.rank, self.dev, self.group, self.tel, self.ident, self.emit, self.fail)

    def close(self) -> None:
        self.tel.close()
        if self.group is not None:
            self.group.close()


def run_worker(
    plan: WorkerPlan, rank: int, device_index: int, emit: Callable[[dict], None], group_factory: Callable
) -> int:
    """Run the whole probe plan on one device (one round); returns the worker's exit code."""
    worker = DeviceWorker(plan, rank, device_index, emit)
    try:
        return worker.run(plan) if worker.join(group_factory) else EXIT_ABORTED
    finally:
        worker.close()


def _probe_loop(plan, rank, dev, group, tel, ident, emit, fail) -> int:
    runs = {}
    for name in plan.probes:  # allocate and warm up everything before the start instant
        emit({"t": "phase", "rank": rank, "probe": name, "state": "warmup"})
        try:
            runs[name] = MODULES[name].prepare(dev, group)
        except Exception as e:  # noqa: BLE001
            fail(name, f"warm-up failed: {one_line(e)}", consequence=name in COLLECTIVE)
            if name in COLLECTIVE:
                return EXIT_ABORTED  # peers are inside the collective: stop so they see it
    if plan.start_at is not None:
        emit({"t": "phase", "rank": rank, "probe": "wait", "state": "wait"})  # the runner's "wait" deadline
        while (left := plan.start_at - time.time()) > 0:
            time.sleep(min(left, 0.5))
    for name in plan.probes:
        try:
            group.barrier()
        except Exception as e:  # noqa: BLE001 - a peer died or hung; what we measured is kept
            why = one_line(e).split(". ")[0][:160]  # gloo's messages run on for lines
            for rest in plan.probes[plan.probes.index(name) :]:
                fail(rest, f"not run: the process group broke after a peer failed ({why})", True)
            return EXIT_ABORTED
        if name not in runs:
            continue
        emit({"t": "phase", "rank": rank, "probe": name, "state": "start"})
        try:
            faults.inject(rank, name)
            raws = runs[name](plan.duration_s, plan.n_windows, tel.window)
        except Exception as e:  # noqa: BLE001
            fail(name, one_line(e), consequence=name in COLLECTIVE)
            if name in COLLECTIVE:
                return EXIT_ABORTED
            continue
        raws = faults.corrupt(rank, name, raws)
        _keep_raw(raws, ident)
        rows, bad = [], []
        try:
            for raw in raws:
                rows += [{**ident, **r, **ident} for r in MODULES[name].parse(raw)]  # identity first, and it wins
                bad += [b for w in raw["windows"] for b in w.get("readings", ())]
        except Exception as e:  # noqa: BLE001 - a parser bug fails this probe only; the next one runs
            fail(name, f"cannot parse its raw timings: {one_line(e)}")
            emit({"t": "phase", "rank": rank, "probe": name, "state": "done"})
            continue
        emit({"t": "samples", "rank": rank, "probe": name, "rows": rows})
        if bad:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(bad[0]["errors"].items())) or "no detail"
            fail(
                name,
                f"telemetry: {len(bad)} reading(s) failed during the probe "
                f"(status {bad[0]['status']}: {detail}); its samples are kept",
            )
        emit({"t": "phase", "rank": rank, "probe": name, "state": "done"})
    emit({"t": "done", "rank": rank})
    return 0


RAW_DIR_ENV = "STRAGGLER_RAW_DIR"


def _keep_raw(raws: list[dict], ident: dict) -> None:
    """With ``$STRAGGLER_RAW_DIR`` set, keep each probe's raw timings as JSON (the parser tests
    replay such files; benchmarks/gpu_check.py keeps a GPU's)."""
    where = os.environ.get(RAW_DIR_ENV)
    if not where:
        return
    os.makedirs(where, exist_ok=True)
    for raw in raws:
        path = os.path.join(where, f"{ident['host']}-{ident['gpu']}-{raw['probe']}.json")
        with open(path, "w") as f:
            json.dump({**raw, "model": ident["model"]}, f, indent=1)


def main() -> None:
    """Entry point under the local runner: plan and placement in ``$STRAGGLER_WORKER``."""
    spec = json.loads(os.environ["STRAGGLER_WORKER"])
    plan = WorkerPlan(**{**spec["plan"], "probes": tuple(spec["plan"]["probes"])})
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr; stdout carries only messages

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")

    def group_factory(dev):
        from .torchdev import Group

        return Group(
            dev, plan.group_timeout_s, store_file=spec["store_file"], rank=spec["rank"], world_size=spec["world_size"]
        )

    try:
        code = run_worker(plan, spec["rank"], spec["device_index"], emit, group_factory)
    except Exception as e:  # noqa: BLE001 - last resort: one line to the runner, traceback to stderr
        traceback.print_exc()
        emit({"t": "failure", "rank": spec["rank"], "probe": "setup", "error": one_line(e)})
        code = EXIT_ABORTED
    out.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is reported and torn down: skip torch's slow interpreter exit


if __name__ == "__main__":
    main()
