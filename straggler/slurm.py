"""What straggler reads from a Slurm environment (pure functions of the environment).

- :func:`context`: the job id and the Slurm node name (``SLURMD_NODENAME``: it may differ from
  the host name) that results carry.
- :func:`rendezvous`: ``MASTER_ADDR``/``MASTER_PORT`` for ``srun -n N straggler scan``: the first
  node of the step (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``) and a port derived from
  the job and step ids, so that every task of the step derives the same pair with no exchange.
- :func:`job_gpus`: the GPU indices a job or step was given (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``).
"""

from __future__ import annotations

import re
from typing import Mapping

PORT_BASE = 29500  # torch's default rendezvous port, then one port per job+step in a window of 2000
PORT_SPAN = 2000


def context(env: Mapping[str, str]) -> dict[str, str]:
    """``{"slurm_job_id", "slurm_node"}`` from the environment; empty outside Slurm."""
    out = {}
    if env.get("SLURM_JOB_ID"):
        out["slurm_job_id"] = env["SLURM_JOB_ID"]
    node = env.get("SLURMD_NODENAME") or env.get("SLURM_NODENAME")
    if node:
        out["slurm_node"] = node
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[03-05,07],cpu1`` -> ``gpu03``; ``a,b`` -> ``a``."""
    m = re.match(r"\s*([^,\[\s]+)(\[([^\]]*)\])?", nodelist)
    if m is None or not m.group(1):
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not first:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    return prefix + first


def rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """The ``MASTER_ADDR``/``MASTER_PORT`` an srun task lacks, derived from the Slurm environment;
    the ones already set are kept. Raises ValueError naming what is missing."""
    out = {}
    if not env.get("MASTER_ADDR"):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise ValueError("no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find rank 0's node in")
        out["MASTER_ADDR"] = first_host(nodes)
    if not env.get("MASTER_PORT"):
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job or not job.isdigit():
            raise ValueError("no numeric SLURM_JOB_ID to derive MASTER_PORT from")
        step = env.get("SLURM_STEP_ID", "0")
        step_n = int(step) if step.isdigit() else 0
        out["MASTER_PORT"] = str(PORT_BASE + (int(job) * 7 + step_n) % PORT_SPAN)
    return out


def job_gpus(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """GPU indices from ``SLURM_STEP_GPUS`` or ``SLURM_JOB_GPUS`` (``0,2-3``), or None."""
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name):
            return parse_indices(env[name], name)
    return None


def parse_indices(text: str, what: str) -> tuple[int, ...]:
    """``0,2-3`` -> ``(0, 2, 3)``; ValueError naming ``what`` on anything else."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{what}: {text!r} is not a list of GPU indices such as 0,2-3")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(out)))
