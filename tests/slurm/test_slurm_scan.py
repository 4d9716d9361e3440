"""`srun -n 2 straggler scan` on a real single-node Slurm (tests/slurm.py): the tasks derive
MASTER_ADDR/MASTER_PORT from the Slurm environment (nothing set by hand), rank 0 reports both, and
the result carries the Slurm job id and node name. Also the pure parts of straggler.slurm."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import scan_timeout_s
from slurm import slurm_fixture

from straggler.slurm import PORT_BASE, PORT_SPAN, first_host, job_gpus, parse_indices, rendezvous

slurm = slurm_fixture()
CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.slow
@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 CPU cores (one task each)")
def test_srun_scan_derives_the_rendezvous_from_slurm(slurm, tmp_path):
    env = {k: v for k, v in slurm.env.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    # no --kill-on-bad-exit: rank 0 exits 1 or 2 for its verdicts (stragglers, undecided), not for a failure
    r = slurm.run(
        [
            "srun",
            "-n",
            "2",
            sys.executable,
            "-m",
            "straggler",
            "scan",
            "--json",
            "--device",
            "cpu",
            "--probes",
            "matmul,allreduce",
            "--duration",
            "1",
            "--samples",
            "2",
            "--max-rounds",
            "1",
        ],  # the launch is checked here; re-measurement in test_torchrun.py
        timeout_s=scan_timeout_s(("matmul", "allreduce"), 1.0, 2) + 30,
        env=env,
    )
    docs = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert r.returncode in (0, 1, 2) and len(docs) == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    doc = docs[0]
    assert "under slurm (rank 0 of 2)" in doc["notice"], doc["notice"]
    assert doc["failures"] == [], doc["failures"]
    assert doc["slurm_job_id"].isdigit() and doc["slurm_node"] == slurm.node
    assert {p for p in ("matmul", "allreduce")} <= {s["probe"] for s in doc["samples"]}


def test_rendezvous_from_slurm_environment():
    env = {"SLURM_STEP_NODELIST": "gpu[03-05,07],cpu1", "SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "2"}
    assert rendezvous(env) == {"MASTER_ADDR": "gpu03", "MASTER_PORT": str(PORT_BASE + (4711 * 7 + 2) % PORT_SPAN)}
    assert rendezvous({**env, "MASTER_ADDR": "a", "MASTER_PORT": "1"}) == {}
    assert first_host("n1,n2") == "n1" and first_host("node") == "node" and first_host("a[7]") == "a7"
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        rendezvous({"SLURM_JOB_NODELIST": "n1"})
    assert job_gpus({"SLURM_JOB_GPUS": "0,2-3"}) == (0, 2, 3)
    assert job_gpus({"SLURM_STEP_GPUS": "1", "SLURM_JOB_GPUS": "0-7"}) == (1,) and job_gpus({}) is None
    with pytest.raises(ValueError, match="--gpus: 'x' is not a list of GPU indices"):
        parse_indices("x", "--gpus")
