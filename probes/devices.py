"""Which probes run on which devices, and how this process was launched. Pure functions of their
inputs (no torch here), so every decision is testable without hardware.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Iterable, Mapping

from straggler.errors import InputError, ProbeError
from straggler.records import PROBES

GPU_ONLY = frozenset({"pcie"})
COLLECTIVE = frozenset({"allreduce"})
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def host_name(env: Mapping[str, str] | None = None) -> str:
    """This node's name: ``$STRAGGLER_HOST`` when set (tests run two "nodes" on one machine)."""
    env = os.environ if env is None else env
    return env.get("STRAGGLER_HOST") or socket.gethostname()


def parse_probes(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"matmul,membw"`` -> ``("matmul", "membw")`` in canonical order; unknown names are an
    InputError naming them. None or ``"all"`` means every probe."""
    if spec is None:
        return PROBES
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return PROBES
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise InputError(f"unknown probe {', '.join(map(repr, unknown))}; choose from {', '.join(PROBES)}")
    if not names:
        raise InputError(f"no probe given; choose from {', '.join(PROBES)}")
    return tuple(p for p in PROBES if p in names)


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # "cpu" or "cuda"
    indices: tuple[int, ...]  # CPU cores or CUDA device indices, one worker each
    reason: str  # why this backend ran, for the one-line notice


def visible_gpus(nvml_count: int, env: Mapping[str, str] | None = None) -> int:
    """How many GPUs CUDA will show the workers: NVML's count narrowed by ``CUDA_VISIBLE_DEVICES``
    as CUDA reads it (pure). An empty value hides every GPU; a list counts its entries up to the
    first index NVML does not have (CUDA ignores the rest); UUIDs and MIG names count as given."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return nvml_count
    n = 0
    for part in (p.strip() for p in visible.split(",")):
        if not part or (part.lstrip("-").isdigit() and not 0 <= int(part) < nvml_count):
            break
        n += 1
    return min(n, nvml_count)


def resolve_devices(requested: str, cuda_count: int, cpus: Iterable[int], counted_by: str) -> DevicePlan:
    """Pick the devices for ``--device`` given the GPUs ``counted_by`` sees (pure; ``counted_by``
    names the counter in messages: ``NVML``, ``torch 2.13.0``)."""
    if requested not in DEVICE_CHOICES:
        raise InputError(f"unknown device {requested!r}; choose from {', '.join(DEVICE_CHOICES)}")
    cpus = tuple(sorted(cpus))
    if requested == "cuda" or (requested == "auto" and cuda_count > 0):
        if cuda_count == 0:
            raise ProbeError(
                f"--device cuda: no CUDA GPU visible to {counted_by} "
                "(check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu)"
            )
        why = "requested" if requested == "cuda" else f"auto: {counted_by} sees CUDA GPUs"
        return DevicePlan("cuda", tuple(range(cuda_count)), f"{cuda_count} CUDA GPU(s), {why}")
    if not cpus:
        raise ProbeError("no CPU core is available to this process (sched_getaffinity is empty)")
    why = "requested" if requested == "cpu" else f"auto: no CUDA GPU visible to {counted_by}"
    return DevicePlan("cpu", cpus, f"{len(cpus)} CPU core(s), one worker pinned to each, {why}")


def plan_probes(probes: tuple[str, ...], kind: str, world_size: int) -> tuple[tuple[str, ...], list[str]]:
    """Drop the probes that cannot run here; returns (probes to run, notes saying why)."""
    run, notes = [], []
    for p in probes:
        if p in GPU_ONLY and kind != "cuda":
            notes.append(f"{p} skipped: GPU only")
        elif p in COLLECTIVE and world_size < 2:
            notes.append(f"{p} skipped: needs at least 2 workers")
        else:
            run.append(p)
    if not run:
        raise InputError(f"nothing to run: {'; '.join(notes)}")
    return tuple(run), notes


@dataclass(frozen=True)
class Launch:
    """How an external launcher (torchrun, srun) placed this process."""

    source: str  # "torchrun" or "slurm"
    rank: int
    world_size: int
    local_rank: int
    node_rank: int


def launcher(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launcher's placement from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun with several
    tasks (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), else None (a local scan)."""
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
            return Launch(
                "torchrun",
                int(env["RANK"]),
                int(env["WORLD_SIZE"]),
                int(env["LOCAL_RANK"]),
                int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
            )
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            return Launch(
                "slurm",
                int(env["SLURM_PROCID"]),
                int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", "0")),
                int(env.get("SLURM_NODEID", "0")),
            )
    except ValueError as e:
        raise InputError(f"launcher environment: {e}") from None
    return None
