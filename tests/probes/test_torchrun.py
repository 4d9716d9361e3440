"""Two torchrun "nodes" on 127.0.0.1 over gloo: the same `straggler scan` joins the launcher's group
and rank 0 reports the devices of both nodes.

Each node is one `python -m torch.distributed.run --nnodes 2 --nproc-per-node 1` with a c10d
rendezvous on a free loopback port; the nodes get different host names (STRAGGLER_HOST) and
different cores (their CPU affinity), as two real nodes would. The srun-style tests start the two
tasks directly, as srun does; the re-measurement test is one of them (rank 0 decides the rounds and
the other rank follows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import free_port, kill_group, run_cmd, scan_timeout_s
from straggler.records import read_table
from straggler.remeasure import analysis_verdicts

CORES = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one node each)")


def wait_all(
    procs: list, probes: tuple[str, ...], duration_s: float, samples: int, rounds: tuple[float, ...] = ()
) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr), waiting as long as a scan of that plan may take by its own
    deadlines (and as long again for each further round of ``rounds`` seconds per probe); then every
    process group is killed (a launcher's ranks too) and the test fails."""
    limit_s = scan_timeout_s(probes, duration_s, samples) + sum(scan_timeout_s(probes, d) for d in rounds)
    stop_at = time.monotonic() + limit_s
    try:
        return [p.communicate(timeout=max(0.0, stop_at - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks were still running after {limit_s:.0f} s, the scan's own deadline for this work")
    finally:
        for p in procs:
            kill_group(p)
            p.wait()


def two_nodes(port: int, scan_args: list[str]) -> list[subprocess.Popen]:
    """Two torchrun nodes (nodeA, nodeB) of one process each, on their own cores, running
    ``straggler scan`` with ``scan_args``."""
    procs = []
    for node, core in zip(("nodeA", "nodeB"), CORES[:2]):
        env = {**os.environ, "STRAGGLER_HOST": node, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "straggler-test",
            "-m",
            "straggler",
            "scan",
            *scan_args,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}),
            )
        )
    return procs


def test_two_node_torchrun_scan_reports_both_nodes(tmp_path):
    port, out = free_port(), tmp_path / "cluster.csv"
    # one round: this test is about the launch (re-measurement rounds: the next test)
    procs = two_nodes(
        port,
        ["--json", "--duration", "1", "--samples", "3", "--scan-id", "tr-1", "--max-rounds", "1", "--output", str(out)],
    )
    results = wait_all(procs, ("matmul", "membw", "allreduce"), 1.0, 3)
    reports = [json.loads(o) for o, _ in results if o.strip()]
    assert len(reports) == 1, [e[-2000:] for _, e in results]  # only rank 0 reports
    doc = reports[0]
    assert "under torchrun (rank 0 of 2)" in doc["notice"]
    assert {(d["host"], d["gpu"]) for d in doc["devices"]} == {("nodeA", f"cpu{CORES[0]}"), ("nodeB", f"cpu{CORES[1]}")}
    df = read_table(out)
    assert set(df["host"]) == {"nodeA", "nodeB"} and (df["scan_id"] == "tr-1").all()
    assert df.groupby(["host", "probe"]).size().to_dict() == {
        (h, p): 3 for h in ("nodeA", "nodeB") for p in ("matmul", "membw", "allreduce")
    }
    ar = df[df["probe"] == "allreduce"]
    assert (ar["settings"].str.endswith("ranks=2")).all() and (ar["arrival_skew_s"] >= 0).all()
    assert doc["failures"] == []


def srun_tasks(port: int, straggler_cmd: list[str], scan_args: list[str]) -> list[subprocess.Popen]:
    """Two tasks as srun starts them (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID plus the rendezvous
    address; no launcher process between), on their own cores, running ``straggler scan``."""
    procs = []
    for task, core in enumerate(CORES[:2]):
        env = {
            **os.environ,
            "SLURM_PROCID": str(task),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(task),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "STRAGGLER_HOST": f"slurm-node{task}",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        procs.append(
            subprocess.Popen(
                [*straggler_cmd, "scan", *scan_args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}),
            )
        )
    return procs


def test_srun_style_launch_reports_both_tasks(tmp_path, straggler_cmd):
    port, out = free_port(), tmp_path / "srun.jsonl"
    procs = srun_tasks(
        port,
        straggler_cmd,
        [
            "--json",
            "--probes",
            "matmul,allreduce",
            "--duration",
            "1",
            "--samples",
            "2",
            "--max-rounds",
            "1",
            "--output",
            str(out),
        ],
    )
    results = wait_all(procs, ("matmul", "allreduce"), 1.0, 2)
    assert procs[1].returncode == 0 and results[1][0] == ""  # task 1 reports nothing itself
    doc = json.loads(results[0][0])
    assert "under slurm (rank 0 of 2)" in doc["notice"]
    assert {d["host"] for d in doc["devices"]} == {"slurm-node0", "slurm-node1"}
    assert len(read_table(out)) == 2 * 2 * 2  # 2 tasks x 2 probes x 2 samples


def test_multi_node_scan_re_measures_undecided_devices_on_every_rank(tmp_path, straggler_cmd):
    """One sample per device cannot be compared (no noise estimate): both devices are undecided, so
    rank 0 runs a second round of 4 x 1 samples, and both nodes run it in the same group. Launched
    as srun does (the same code path as torchrun's ranks; torchrun's agents would add their own exit
    barrier of 300 s after a rank that exits 1 or 2)."""
    port, out = free_port(), tmp_path / "rounds.jsonl"
    procs = srun_tasks(
        port,
        straggler_cmd,
        [
            "--json",
            "--probes",
            "matmul",
            "--duration",
            "1",
            "--samples",
            "1",
            "--max-rounds",
            "2",
            "--scan-id",
            "tr-2",
            "--output",
            str(out),
        ],
    )
    results = wait_all(procs, ("matmul",), 1.0, 1, rounds=(4.0,))
    assert procs[1].returncode == 0 and results[1][0] == "", results[1][1][-2000:]  # task 1 follows, reports nothing
    doc = json.loads(results[0][0])
    assert doc["failures"] == [], doc["failures"]
    rounds = doc["rounds"]
    assert rounds["max_rounds"] == 2 and rounds["rounds"] == 2
    assert rounds["per_round"][0] == {"round": 1, "probes": ["matmul"], "samples": 1, "undecided": 2}
    assert rounds["per_round"][1]["samples"] == 4 and rounds["per_round"][1]["probes"] == ["matmul"]
    still = rounds["per_round"][1]["undecided"]
    assert rounds["stopped"] == ("all decided" if still == 0 else f"max rounds reached, {still} still undecided")
    # both nodes in both rounds, their sample numbers continuing (0 in round 1, 1-4 in round 2)
    df = read_table(out)
    assert len(df) == len(doc["samples"]) == 2 * 5 and set(df["scan_id"]) == {"tr-2"}
    assert {h: sorted(g["sample"]) for h, g in df.groupby("host")} == {
        "slurm-node0": [0, 1, 2, 3, 4],
        "slurm-node1": [0, 1, 2, 3, 4],
    }
    # the report's verdicts are those of both rounds' samples together, and so is rank 0's exit code
    again = {e["host"]: e["verdict"] for e in analysis_verdicts(df.to_dict("records"))}
    assert {g["host"]: g["verdict"] for g in doc["analysis"]["gpus"]} == again
    assert still == sum(v == "undecided" for v in again.values())
    assert procs[0].returncode == (1 if "straggler" in again.values() else 2 if still else 0), results[0][1][-2000:]


def test_srun_without_rendezvous_address_is_one_line_error(straggler_cmd):
    # MASTER_ADDR/MASTER_PORT are derived from the step's node list and job id (tests/slurm/test_slurm_scan.py);
    # without either, one line says what is missing
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") and not k.startswith("SLURM_")
    }
    env.update(SLURM_PROCID="0", SLURM_NTASKS="2")
    proc = run_cmd([*straggler_cmd, "scan", "--duration", "1"], scan_timeout_s(("matmul",), 1.0), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "straggler: error: srun scan: no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find rank 0's node in; "
        "set MASTER_ADDR and MASTER_PORT (rank 0's address and a free port)"
    ]


def test_a_rank_refuses_a_bad_telemetry_spec_before_joining_the_group(tmp_path, straggler_cmd):
    """Each rank plans its worker as the local runner does (probes/plan.py worker_plan): a telemetry
    spec that cannot be read is one line and exit 2 on every rank, before any rank waits for the group
    (a single rank of two: it would wait for the other until the group timed out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        STRAGGLER_TELEMETRY="fake:no_such_scenario",
        GLOO_SOCKET_IFNAME="lo",
    )
    proc = run_cmd(
        [*straggler_cmd, "scan", "--probes", "matmul", "--duration", "1", "--output", "x.csv"],
        scan_timeout_s(("matmul",), 1.0),
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("straggler: error: ") and "no_such_scenario" in line
    assert not list(tmp_path.iterdir())  # nothing written
