"""A scan launched by torchrun or srun: this process is one rank of the launcher's group.

Every rank runs the probe plan on its local device (GPU ``LOCAL_RANK``, or the ``LOCAL_RANK``-th
core of its CPU set) and collects its own messages; at the end of a round rank 0 gathers every
rank's messages and reports the devices of every node. A cluster scan thus runs on the launcher the
cluster already has.

Rounds (:class:`RankRounds`): the group stays up from the first round to the last. After each
round's gather rank 0 alone decides whether another round runs (``straggler scan``: the
re-measurement of :mod:`straggler.remeasure`, through ``probes.runner.ScanRounds``) and broadcasts
that round's plan (probes, samples, duration) or "stop"; every rank then runs the round together,
so all devices stay in the barriers. A rank whose gather failed (a broken group) runs no further
round; neither does rank 0 then.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

from straggler.errors import InputError, ProbeError

from .devices import Launch, host_name, plan_probes, resolve_devices
from .plan import ScanResult, ScanSettings, WorkerPlan, worker_plan
from .worker import DeviceWorker, one_line


class RankRounds:
    """This rank's rounds of one torchrun/srun scan (see the module). :meth:`first` runs the first
    round: on rank 0 it returns that round's result of every rank; on the other ranks it runs every
    round rank 0 asks for, leaves the group and returns an empty result (``root`` False). Rank 0
    then calls :meth:`again` per further round and :meth:`close` at the end."""

    def __init__(self, settings: ScanSettings, launch: Launch, on_event: Callable[[dict], None] | None):
        from . import torchdev

        if launch.source == "slurm":  # torch's env:// rendezvous reads these names
            from straggler.slurm import rendezvous

            try:  # rank 0's node and a port of the job's own, derived alike by every task of the step
                os.environ.update(rendezvous(os.environ))
            except ValueError as e:
                raise InputError(
                    f"srun scan: {e}; set MASTER_ADDR and MASTER_PORT (rank 0's address and a free port)"
                ) from None
            os.environ.update(
                RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank)
            )
        self.launch, self.on_event = launch, on_event
        host = host_name()
        cpus = sorted(os.sched_getaffinity(0))
        dplan = resolve_devices(settings.device, torchdev.cuda_device_count(), cpus, torchdev.torch_version())
        # srun may give each task only its own GPU (CUDA_VISIBLE_DEVICES): then the local index is 0
        self.index = dplan.indices[launch.local_rank % len(dplan.indices)]
        probes, notes = plan_probes(settings.probes, dplan.kind, launch.world_size)
        self.plan = worker_plan(settings, host, dplan.kind, probes)
        self.host, self.kind = host, dplan.kind
        self.notice = (
            f"device {dplan.kind} under {launch.source} (rank {launch.rank} of {launch.world_size}): "
            f"{dplan.reason}" + "".join(f"; {n}" for n in notes)
        )
        self.worker: DeviceWorker | None = None
        self.joined = False  # in the group, and the last gather worked: further rounds are possible
        self.closed = False

    def _emit(self, mine: list[dict], plan: WorkerPlan) -> Callable[[dict], None]:
        def emit(msg: dict) -> None:
            mine.append(msg)
            if self.on_event is not None:
                self.on_event({**msg, "world_size": self.launch.world_size, "probes": plan.probes})

        return emit

    def _round(self, plan: WorkerPlan) -> ScanResult | None:
        """Run one round on this rank and gather it; the ScanResult of every rank's messages on rank
        0, None on the others."""
        from . import torchdev

        mine: list[dict] = []
        if self.worker is None:  # the first round: the device, its telemetry, the group
            self.worker = DeviceWorker(plan, self.launch.rank, self.index, self._emit(mine, plan))
            self.joined = self.worker.join(lambda dev: torchdev.Group(dev, plan.group_timeout_s))
        else:
            self.worker.emit = self._emit(mine, plan)
            mine.append(self.worker.hello)  # every round's messages name the device
        gathered = None
        if self.joined:
            self.worker.run(plan)
            try:
                gathered = self.worker.group.gather_objects(mine)
            except Exception as e:  # noqa: BLE001 - a broken group: rank 0 reports what it has
                self.joined = False
                self.worker.emit(
                    {
                        "t": "failure",
                        "rank": self.launch.rank,
                        "probe": "gather",
                        "error": f"could not gather the other ranks' results: {type(e).__name__}",
                    }
                )
        if self.launch.rank != 0:
            return None
        res = ScanResult(plan.scan_id, self.host, self.kind, self.notice, duration_s=plan.duration_s)
        per_rank = gathered or [mine]
        for msgs in per_rank:
            hello = next((m for m in msgs if m["t"] == "hello"), None)
            if hello is None:
                continue
            res.devices.append({k: hello[k] for k in ("host", "gpu", "index", "model", "rank")})
            for m in msgs:
                if m["t"] == "samples":
                    res.samples.extend({**r, "scan_id": plan.scan_id} for r in m["rows"])
                elif m["t"] == "failure":
                    res.failures.append(
                        {
                            "host": hello["host"],
                            "device": hello["gpu"],
                            "rank": m["rank"],
                            "probe": m["probe"],
                            "error": m["error"],
                        }
                    )
        tel = sorted({m.get("telemetry") or "none" for msgs in per_rank for m in msgs if m["t"] == "hello"})
        res.notice = f"{self.notice}; telemetry {', '.join(tel)}"
        return res

    def first(self) -> ScanResult:
        res = self._round(self.plan)
        if res is not None:  # rank 0
            return res
        try:  # follow rank 0: its next round's plan, or None (stop)
            while self.joined:
                try:
                    nxt = self.worker.group.broadcast_object(None)
                except Exception:  # noqa: BLE001 - rank 0 is gone or the group broke: nothing to follow
                    break
                if nxt is None:
                    break
                self._round(
                    replace(
                        self.plan,
                        probes=tuple(nxt["probes"]),
                        n_windows=int(nxt["samples"]),
                        duration_s=float(nxt["duration_s"]),
                        start_at=None,
                    )
                )
        finally:
            self.close()
        return ScanResult(self.plan.scan_id, self.host, self.kind, self.notice, root=False)

    def again(self, probes: tuple[str, ...], samples: int, duration_s: float) -> ScanResult:
        """Rank 0: one further round on every rank (``duration_s`` per probe for ``samples`` windows)."""
        if not self.joined or self.closed:
            raise ProbeError("the process group is gone: no further round")
        plan = replace(self.plan, probes=tuple(probes), n_windows=samples, duration_s=duration_s, start_at=None)
        try:
            self.worker.group.broadcast_object(
                {"probes": list(plan.probes), "samples": samples, "duration_s": duration_s}
            )
        except Exception as e:  # noqa: BLE001 - the others cannot be told: no round
            self.joined = False
            raise ProbeError(f"cannot tell the other ranks the next round: {one_line(e)}") from None
        res = self._round(plan)
        assert res is not None  # rank 0 (the only one that calls this) always has a result
        return res

    def close(self) -> None:
        """Rank 0 tells the other ranks that no round follows; every rank leaves the group."""
        if self.closed:
            return
        self.closed = True
        if self.launch.rank == 0 and self.joined:
            try:
                self.worker.group.broadcast_object(None)
            except Exception:  # noqa: BLE001 - the others have left already: nothing to tell
                pass
        if self.worker is not None:
            self.worker.close()


def run_rank(settings: ScanSettings, launch: Launch, on_event: Callable[[dict], None] | None) -> ScanResult:
    """One round of a torchrun/srun scan on this rank (rank 0's result holds every rank's)."""
    rounds = RankRounds(settings, launch, on_event)
    try:
        return rounds.first()
    finally:
        rounds.close()
