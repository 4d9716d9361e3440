"""A scan launched by torchrun or srun: this process is one rank of the launcher's group.

Every rank runs the probe plan on its local device (GPU ``LOCAL_RANK``, or the ``LOCAL_RANK``-th
core of its CPU set) and collects its own messages; at the end rank 0 gathers every rank's
messages and reports the devices of every node. A cluster scan thus runs on the launcher the
cluster already has.
"""

from __future__ import annotations

import os
from typing import Callable

from straggler.errors import InputError

from .devices import Launch, host_name, plan_probes, resolve_devices
from .worker import WorkerPlan, run_worker


def run_rank(settings, launch: Launch, on_event: Callable[[dict], None] | None):
    from . import torchdev
    from .runner import DEFAULT_DURATION_S, ScanResult, new_scan_id

    if launch.source == "slurm":  # torch's env:// rendezvous reads these names
        from straggler.slurm import rendezvous

        try:  # rank 0's node and a port of the job's own, derived alike by every task of the step
            os.environ.update(rendezvous(os.environ))
        except ValueError as e:
            raise InputError(f"srun scan: {e}; set MASTER_ADDR and MASTER_PORT (rank 0's address and a "
                             "free port)") from None
        os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                          LOCAL_RANK=str(launch.local_rank))
    host = host_name()
    cpus = sorted(os.sched_getaffinity(0))
    dplan = resolve_devices(settings.device, torchdev.cuda_device_count(), cpus, torchdev.torch_version())
    # srun may give each task only its own GPU (CUDA_VISIBLE_DEVICES): then the local index is 0
    index = dplan.indices[launch.local_rank % len(dplan.indices)]
    probes, notes = plan_probes(settings.probes, dplan.kind, launch.world_size)
    duration = settings.duration_s or DEFAULT_DURATION_S[dplan.kind]
    plan = WorkerPlan(scan_id=settings.scan_id or new_scan_id(host), host=host, kind=dplan.kind,
                      probes=probes, duration_s=duration, n_windows=settings.samples,
                      telemetry=settings.telemetry, start_at=settings.start_at,
                      group_timeout_s=2 * duration + 3 * settings.grace_s)
    mine: list[dict] = []
    gathered: dict = {}

    def emit(msg: dict) -> None:
        mine.append(msg)
        if on_event is not None:
            on_event({**msg, "world_size": launch.world_size, "probes": probes})

    def gather(group) -> None:
        try:
            gathered["all"] = group.gather_objects(mine)
        except Exception as e:  # noqa: BLE001 - a broken group: rank 0 reports what it has
            emit({"t": "failure", "rank": launch.rank, "probe": "gather",
                  "error": f"could not gather the other ranks' results: {type(e).__name__}"})

    run_worker(plan, launch.rank, index, emit, lambda dev: torchdev.Group(dev, plan.group_timeout_s),
               on_finish=gather)
    notice = f"device {dplan.kind} under {launch.source} (rank {launch.rank} of {launch.world_size}): " \
             f"{dplan.reason}" + "".join(f"; {n}" for n in notes)
    if launch.rank != 0:
        return ScanResult(plan.scan_id, host, dplan.kind, notice, root=False)
    per_rank = gathered.get("all") or [mine]
    res = ScanResult(plan.scan_id, host, dplan.kind, notice)
    for msgs in per_rank:
        hello = next((m for m in msgs if m["t"] == "hello"), None)
        if hello is None:
            continue
        res.devices.append({k: hello[k] for k in ("host", "gpu", "index", "model", "rank")})
        for m in msgs:
            if m["t"] == "samples":
                res.samples.extend({**r, "scan_id": plan.scan_id} for r in m["rows"])
            elif m["t"] == "failure":
                res.failures.append({"host": hello["host"], "device": hello["gpu"], "rank": m["rank"],
                                     "probe": m["probe"], "error": m["error"]})
    tel = sorted({m.get("telemetry") or "none" for msgs in per_rank for m in msgs if m["t"] == "hello"})
    res.notice = f"{notice}; telemetry {', '.join(tel)}"
    return res
