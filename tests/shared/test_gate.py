"""`straggler gate` as a user runs it: real processes, the fake NVML backend for the GPU checks
(scenario fixtures), real probes on CPU cores, real HTTP on 127.0.0.1 for the fleet reference.

Faults end with the documented exit code and one line each, within the budget: the test measures
the wall time of every faulty gate and compares it with the budget it was given.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, run_cmd, skip_or_fail
from cpushield import cpu_shield

from straggler.analysis.settings import AnalysisConfig
from straggler.gate import judge_samples
from straggler.reference import CACHE, COLLECTOR, PEERS, fleet_reference, reference_values
from straggler.remeasure import remeasure

CORES = sorted(os.sched_getaffinity(0))
EXIT_SLACK_S = 3.0  # the interpreter's exit after the gate's last line, on a busy machine


def gate(
    straggler_cmd,
    *args,
    budget_s: float = 30.0,
    env: dict | None = None,
    state_dir: Path,
) -> tuple[int, list[str], float]:
    """(exit code, stdout lines, wall seconds) of one gate run."""
    t0 = time.monotonic()
    r = run_cmd(
        [*straggler_cmd, "gate", "--budget", str(budget_s), "--state-dir", str(state_dir), *args],
        budget_s + 30,
        env={**os.environ, **(env or {})},
    )
    wall = time.monotonic() - t0
    assert not r.stderr.strip() or "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout.splitlines(), wall


# --- NVML health, no load ------------------------------------------------------------------------


def test_health_findings_one_line_each(straggler_cmd, tmp_path):
    code, lines, _ = gate(straggler_cmd, "--telemetry", "fake:gate_unhealthy", "--probes", "none", state_dir=tmp_path)
    assert code == 1, lines
    assert lines[:4] == [
        "gpu1 remapped_rows pending: memory (a row remap waits for a GPU reset)",
        "gpu2 persistence off: config (persistence mode is off (nvidia-smi -pm 1, or nvidia-persistenced))",
        "gpu3 idle_throttle 1005MHz: thermal (clocks held down while idle: hw_thermal_slowdown)",
        "gpu5 remapped_rows failed: memory (a row remap failed: the GPU needs service)",
    ]
    assert lines[4].startswith("gate: fail on ") and "(health " in lines[4], lines
    # --gpus narrows the checks to the job's devices
    code, lines, _ = gate(
        straggler_cmd, "--telemetry", "fake:gate_unhealthy", "--probes", "none", "--gpus", "0,4,6-7", state_dir=tmp_path
    )
    assert code == 0 and lines[0].startswith("gate: pass on "), lines
    code, lines, _ = gate(
        straggler_cmd,
        "--telemetry",
        "fake:gate_unhealthy",
        "--probes",
        "none",
        env={"SLURM_JOB_GPUS": "3"},
        state_dir=tmp_path,
    )
    assert code == 1 and lines[0].startswith("gpu3 idle_throttle") and lines[1].startswith("gate: fail"), lines


def _fixture(tmp_path: Path, name: str, **changes) -> str:
    """h100_idle with ``changes`` ({index: {field: value}}, or drop=index) written to tmp_path."""
    from straggler.probes.fakenvml import load_fixture

    _, data = load_fixture("h100_idle")
    for i, fields in changes.get("fields", {}).items():
        data["devices"][i]["base"].update(fields)
    if "drop" in changes:
        del data["devices"][changes["drop"]]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return f"fake:{path}"


def test_ecc_retired_pages_and_missing_gpu_since_the_last_check(straggler_cmd, tmp_path):
    state = tmp_path / "state"
    first = _fixture(tmp_path, "first", fields={4: {"ecc_uncorrected_total": 1, "retired_pages": 2}})
    code, lines, _ = gate(straggler_cmd, "--telemetry", first, "--probes", "none", state_dir=state)
    assert code == 0, lines  # the first check records the counters: errors from before are not new
    later = _fixture(tmp_path, "later", fields={4: {"ecc_uncorrected_total": 3, "retired_pages": 2}})
    code, lines, _ = gate(straggler_cmd, "--telemetry", later, "--probes", "none", state_dir=state)
    assert code == 1 and lines[0] == (
        "gpu4 ecc +2: ecc (2 uncorrectable ECC error(s) since the last check (3 in all))"
    ), lines
    gone = _fixture(tmp_path, "gone", drop=6)
    code, lines, _ = gate(straggler_cmd, "--telemetry", gone, "--probes", "none", "--gpus", "0-7", state_dir=state)
    assert code == 1, lines
    assert lines[0] == "gpu7 missing 7 enumerated: missing (the job asks for GPU 7; NVML enumerates 7)", lines
    assert lines[1].startswith("node missing GPU-") and "seen at the last check, not enumerated now" in lines[1]


def test_critical_xid_since_the_last_check(straggler_cmd, tmp_path):
    log = tmp_path / "kmsg"  # /dev/kmsg's record format: priority,sequence,microseconds,flags;text
    log.write_text(
        "6,100,5000,-;usb 1-1: new device\n"
        "4,101,6000,-;NVRM: Xid (PCI:0000:18:00): 79, pid=0, GPU has fallen off the bus.\n"
    )
    args = ("--telemetry", "fake:h100_idle", "--probes", "none", "--kernel-log", str(log))
    code, lines, _ = gate(straggler_cmd, *args, state_dir=tmp_path)
    assert code == 0, lines  # the first check records where the log is: an XID from before is not new
    with log.open("a") as f:
        f.write(
            "4,102,7000,-;NVRM: Xid (PCI:0000:2a:00): 79, pid=0, GPU has fallen off the bus.\n"
            "4,103,7100,-;NVRM: Xid (PCI:0000:18:00): 13, pid=42, Graphics SM Warp Exception\n"
        )
    code, lines, _ = gate(straggler_cmd, *args, state_dir=tmp_path)
    assert code == 1 and lines[0] == (
        "gpu1 xid 79: bus (fallen off the bus: NVRM: Xid (PCI:0000:2a:00): 79, pid=0, GPU has fallen off the bus.)"
    ), lines  # 13 is not critical
    code, lines, _ = gate(straggler_cmd, *args, state_dir=tmp_path)
    assert code == 0, lines  # seen by the last check: not again
    code, lines, _ = gate(
        straggler_cmd,
        "--telemetry",
        "fake:h100_idle",
        "--probes",
        "none",
        "--json",
        "--kernel-log",
        str(tmp_path / "none"),
        state_dir=tmp_path,
    )
    assert code == 0 and json.loads(lines[0])["notes"] == [
        f"XID events not read: {tmp_path / 'none'}: No such file or directory"
    ]


# --- faults: exit code, one line, within the budget -------------------------------------------


def test_nvml_missing_could_not_decide_and_on_error(straggler_cmd, tmp_path):
    for on_error, expected in ((None, 2), ("pass", 0), ("fail", 1)):
        extra = ("--on-error", on_error) if on_error else ()
        code, lines, wall = gate(
            straggler_cmd, "--device", "cuda", "--telemetry", "nvml", "--probes", "none", *extra, state_dir=tmp_path
        )
        assert code == expected, (on_error, lines)
        assert lines[0].startswith("could not check: node nvml unavailable: nvml (NVML library not found"), lines
        tail = f" (--on-error {on_error})" if on_error else ""
        assert lines[1].startswith(f"gate: could not decide{tail} on "), lines
        assert len(lines) == 2 and wall <= 30 + EXIT_SLACK_S


def test_nvml_call_that_hangs_is_killed_within_the_budget(straggler_cmd, tmp_path):
    budget_s = 8.0
    code, lines, wall = gate(
        straggler_cmd, "--telemetry", "fake:nvml_hang", "--probes", "none", budget_s=budget_s, state_dir=tmp_path
    )
    assert code == 2, lines
    assert lines[0].startswith("could not check: node nvml no answer in ") and lines[0].endswith(
        ": hang (an NVML call hung: the check was killed)"
    ), lines
    assert wall <= budget_s + EXIT_SLACK_S, wall


@pytest.mark.slow
@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 CPU cores")
def test_probe_that_hangs_is_killed_within_the_budget(straggler_cmd, tmp_path):
    budget_s = 25.0
    code, lines, wall = gate(
        straggler_cmd,
        "--device",
        "cpu",
        "--probes",
        "matmul",
        "--duration",
        "1",
        budget_s=budget_s,
        env={"STRAGGLER_FAULT": "hang:rank1:matmul"},
        state_dir=tmp_path,
    )
    assert code == 2, lines
    hung = [x for x in lines if x.startswith(f"could not check: cpu{CORES[1]} probe matmul: hang (")]
    assert hung and "killed" in hung[0], lines
    assert wall <= budget_s + EXIT_SLACK_S, wall


def test_budget_spent_ends_the_gate_at_its_budget(straggler_cmd, tmp_path):
    """A budget shorter than the NVML check's own deadline: the watchdog (or the check's deadline,
    whichever comes first) ends the gate with one line, exit 2, and --on-error says what that means."""
    budget_s = 1.0
    for on_error, expected in ((None, 2), ("pass", 0)):
        extra = ("--on-error", on_error) if on_error else ()
        code, lines, wall = gate(
            straggler_cmd,
            "--telemetry",
            "fake:nvml_hang",
            "--probes",
            "none",
            *extra,
            budget_s=budget_s,
            state_dir=tmp_path,
        )
        assert code == expected, lines
        assert lines[0].startswith("could not check: node "), lines
        assert wall <= budget_s + EXIT_SLACK_S, wall


def test_budget_too_short_to_probe_could_not_decide(straggler_cmd, tmp_path):
    code, lines, wall = gate(
        straggler_cmd,
        "--device",
        "cpu",
        "--probes",
        "matmul",
        "--telemetry",
        "fake:h100_idle",
        budget_s=4.0,
        state_dir=tmp_path,
    )
    assert code == 2 and lines[0].startswith("could not check: node budget ") and "no time left to probe" in lines[0]
    assert wall <= 4.0 + EXIT_SLACK_S


def test_scontrol_missing_or_failing_fails_the_node_with_one_line(straggler_cmd, tmp_path):
    failing = tmp_path / "scontrol"
    failing.write_text("#!/bin/sh\necho 'slurm_update error: Invalid node name specified' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    for scontrol, why in (
        (str(tmp_path / "missing"), f"{tmp_path / 'missing'} not found"),
        (str(failing), "update failed: slurm_update error: Invalid node name specified"),
    ):
        code, lines, _ = gate(
            straggler_cmd,
            "--telemetry",
            "fake:gate_unhealthy",
            "--probes",
            "none",
            "--drain",
            "--node",
            "n7",
            "--scontrol",
            scontrol,
            state_dir=tmp_path,
        )
        assert code == 1, lines  # the node failed; that it could not be drained is said, not hidden
        assert lines[-1].startswith(f"drain: cannot drain n7: {scontrol} ") and why in lines[-1], lines


def test_json_report(straggler_cmd, tmp_path):
    code, lines, _ = gate(
        straggler_cmd,
        "--telemetry",
        "fake:gate_unhealthy",
        "--probes",
        "none",
        "--json",
        "--gpus",
        "3",
        env={"SLURM_JOB_ID": "4711", "SLURMD_NODENAME": "gpu-a17"},
        state_dir=tmp_path,
    )
    doc = json.loads(lines[0])
    assert code == 1 and doc["exit_code"] == 1 and doc["decision"] == "fail" and len(lines) == 1
    assert (doc["slurm_job_id"], doc["slurm_node"]) == ("4711", "gpu-a17")
    assert doc["findings"] == [
        {
            "device": "gpu3",
            "check": "idle_throttle",
            "value": "1005MHz",
            "cause": "thermal",
            "detail": "clocks held down while idle: hw_thermal_slowdown",
            "outcome": "fail",
        }
    ]
    assert [p["phase"] for p in doc["phases"]] == ["health", "reference", "probes"]
    assert all(p["duration_s"] >= 0 for p in doc["phases"]) and doc["elapsed_s"] <= doc["budget_s"]


# --- the fleet reference: collector, its cached copy, peers only --------------------------------

GPUS = {
    "gpus": [
        {
            "host": f"n{i}",
            "gpu": f"GPU-{i}",
            "model": "H100",
            "probes": [
                {"probe": "matmul", "settings": "n=8192", "value": 700.0 + i, "straggler": False, "verdict": "healthy"}
            ],
        }
        for i in range(3)
    ]
    + [
        {
            "host": "n9",
            "gpu": "GPU-9",
            "model": "H100",
            "probes": [
                {"probe": "matmul", "settings": "n=8192", "value": 500.0, "straggler": True, "verdict": "straggler"}
            ],
        }
    ]
}


@pytest.fixture
def collector_url():
    """A real HTTP server on 127.0.0.1 answering GET /api/v1/gpus as the collector does."""
    body = json.dumps(GPUS).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/api/v1/gpus"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if ok else b"{}")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_reference_from_collector_then_cache_then_peers(collector_url, tmp_path):
    cache = tmp_path / "fleet-reference.json"
    assert reference_values(GPUS["gpus"]) == {"H100|matmul|n=8192": 701.0}  # the straggler is left out
    assert reference_values(GPUS["gpus"], leave_out={"n1"}) == {"H100|matmul|n=8192": 701.0}  # and the node judged
    assert reference_values(GPUS["gpus"], leave_out={"n2"}) == {"H100|matmul|n=8192": 700.5}
    ref = fleet_reference(collector_url, cache, 3.0)
    assert ref.source == COLLECTOR and dict(ref.values) == {"H100|matmul|n=8192": 701.0}
    dead = f"http://127.0.0.1:{free_port()}"
    ref = fleet_reference(dead, cache, 3.0)
    assert ref.source == CACHE and dict(ref.values) == {"H100|matmul|n=8192": 701.0}
    assert ref.note.startswith(f"collector {dead} unreachable (") and f"cached copy from {collector_url}" in ref.note
    cache.unlink()
    ref = fleet_reference(dead, cache, 3.0)
    assert ref.source == PEERS and not ref.values and "no cached reference" in ref.note


def test_collector_unreachable_is_said_and_one_core_without_reference_could_not_decide(straggler_cmd, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    code, lines, wall = gate(
        straggler_cmd,
        "--probes",
        "none",
        "--collector",
        dead,
        "--telemetry",
        "fake:h100_idle",
        budget_s=30.0,
        state_dir=tmp_path,
    )
    assert code == 0 and f"reference: collector {dead} unreachable (" in lines[-1], lines
    # a single core: no peer and no reference, so nothing to compare it with
    r = run_cmd(
        [
            "taskset",
            "-c",
            str(CORES[0]),
            *straggler_cmd,
            "gate",
            "--device",
            "cpu",
            "--probes",
            "matmul",
            "--duration",
            "0.5",
            "--collector",
            dead,
            "--telemetry",
            "fake:h100_idle",
            "--state-dir",
            str(tmp_path),
        ],
        60,
    )
    out = r.stdout.splitlines()
    assert r.returncode == 2, out
    assert out[0] == (
        f"could not check: cpu{CORES[0]} matmul -: undecided (nothing to compare with (no peers, history or reference))"
    ), out


# --- judging: a transient dip does not fail the gate, a persistent slowdown at T+1pt does ---------


def _rows(slow: float, dip_samples=(), n: int = 5, seed: int = 1, scan: str = "s1", start: int = 0) -> list[dict]:
    """8 GPUs' matmul samples with 0.3% noise (as on a quiet H100 node); device 3 ``slow`` slower,
    and 30% slower still in ``dip_samples`` (a transient dip)."""
    rnd = random.Random(seed)
    rows = []
    for d in range(8):
        for s in range(start, start + n):
            v = 700.0 * (1 + rnd.gauss(0, 0.003)) * (1 - slow if d == 3 else 1)
            if d == 3 and s in dip_samples:
                v *= 0.7
            rows.append(
                {
                    "host": "n1",
                    "gpu": f"GPU-{d}",
                    "index": d,
                    "model": "NVIDIA H100 80GB HBM3",
                    "probe": "matmul",
                    "settings": "n=8192,dtype=bf16",
                    "sample": s,
                    "value": v,
                    "unit": "TFLOP/s",
                    "scan_id": scan,
                    "ts": 1.0 + s,
                }
            )
    return rows


def test_whole_node_slower_than_the_fleet_reference():
    """Every device alike 6% below the fleet: no peer sees it, the fleet reference does."""
    t = AnalysisConfig().min_effect
    rows = [
        {**r, "value": r["value"] * (1 - t - 0.02) / (1 - t - 0.02 if r["index"] == 3 else 1)} for r in _rows(t + 0.02)
    ]  # device 3 brought back in line: all eight alike
    refs = {"NVIDIA H100 80GB HBM3|matmul|n=8192,dtype=bf16": 700.0}
    assert judge_samples(rows, "cuda") == []
    found = judge_samples(rows, "cuda", refs=refs, source=COLLECTOR)
    assert [(f.device, f.check, f.value, f.outcome) for f in found] == [("node", "matmul", "0.94x", "fail")]


def test_pcie_link_under_load_below_its_maxima():
    """The pcie probe's rows (as measured under load): a GPU whose link trained at gen3 of gen5 fails,
    one that reached its maxima during the probe passes (an idle link may downshift)."""
    rows = []
    for r in _rows(0.0):
        link = (3, 16) if r["index"] == 2 else (5, 16) if r["sample"] else (1, 16)
        rows.append(
            {
                **r,
                "probe": "pcie_h2d",
                "settings": "bytes=1GiB",
                "unit": "GB/s",
                "value": r["value"] / 14,
                "pcie_gen": link[0],
                "pcie_width": link[1],
                "pcie_gen_max": 5,
                "pcie_width_max": 16,
            }
        )
    found = judge_samples(rows, "cuda")
    assert [f.line() for f in found] == ["gpu2 pcie gen3x16: pcie (link under load gen3 x16 of gen5 x16)"]
    assert judge_samples(rows, "cuda", gpus=(0, 1, 6, 7, 8, 9, 10, 11))[0].device == "gpu6"  # job's numbering


def test_transient_dip_passes_persistent_slowdown_at_threshold_plus_one_point_fails():
    t = AnalysisConfig().min_effect
    assert judge_samples(_rows(0.0), "cuda") == []
    assert judge_samples(_rows(0.0, dip_samples=(2,)), "cuda") == []  # one slow sample of five
    failed = judge_samples(_rows(t + 0.01), "cuda")
    assert [(f.device, f.check, f.outcome) for f in failed] == [("gpu3", "matmul", "fail")]
    assert failed[0].value == f"{1 - t - 0.01:.2f}x"
    # and through the gate's re-measurement: a dip that leaves the device undecided after the first
    # round is measured again, and the clean round decides it healthy
    rounds = iter([_rows(0.0, dip_samples=(0, 1), n=3), _rows(0.0, n=12, seed=2)])

    class Res:
        def __init__(self, rows):
            self.samples, self.failures = rows, []

    from straggler.gate import analysis_table

    out = remeasure(
        lambda p, n: Res(next(rounds)), lambda s: analysis_table(s, {}).to_dict("records"), ("matmul",), 3, max_rounds=3
    )
    assert judge_samples(out.samples, "cuda") == [], out.to_json()


# --- the collector: its token for fleet reads, its quarantine loop for drains --------------------


def test_gate_reads_with_the_token_and_drains_through_the_collectors_breaker(straggler_cmd, tmp_path):
    """With --collector and --token-file the gate reads the fleet reference with the token (the fleet
    view needs it by default) and asks the collector to drain, whose circuit breaker decides: the
    first node is drained (recorded, rule gate), the second is refused and stays in service, and
    scontrol is never called. A collector that cannot be asked leaves the drain to the gate itself."""
    import httpx

    from straggler.collector.service import BackgroundCollector
    from straggler.collector.settings import CollectorSettings
    from test_collector_api import AUTH, TOKEN, peer_ratio_analyze

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    missing = str(tmp_path / "no-scontrol")  # any local drain would fail loudly
    settings = CollectorSettings(port=0, db_path=tmp_path / "c.db", quarantine_action="record")
    with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:
        args = (
            "--telemetry",
            "fake:gate_unhealthy",
            "--probes",
            "none",
            "--drain",
            "--scontrol",
            missing,
            "--collector",
            srv.url,
            "--token-file",
            str(token_file),
        )
        code, lines, _ = gate(straggler_cmd, *args, "--node", "na", state_dir=tmp_path / "a")
        assert code == 1 and lines[-1].startswith("drain: na drained by the collector, reason 'straggler: "), lines
        assert f"reference: collector {srv.url}: " in lines[-2], lines  # read with the token, not a 401
        code, lines, _ = gate(straggler_cmd, *args, "--node", "nb", state_dir=tmp_path / "b")
        assert code == 1 and lines[-1].startswith(
            "drain: refused by the collector's circuit breaker, nb stays in service"
        ), lines
        # the shipped prolog, as slurmd runs it: a refused drain lets the job run (exit 0), said in its log
        prolog = _shipped_prolog(
            tmp_path / "slurm",
            f"--telemetry fake:gate_unhealthy --probes none --scontrol "
            f"{missing} --collector {srv.url} --token-file {token_file} --state-dir {tmp_path}/d",
        )
        r = run_cmd([str(prolog)], 60, env={"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "nd", "SLURM_JOB_ID": "42"})
        log = (tmp_path / "slurm" / "gate.log").read_text()
        assert r.returncode == 0, log
        assert (
            "prolog[42] the collector's circuit breaker refused the drain: nd stays in service and runs the job" in log
        ), log
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            q = c.get("/api/v1/quarantine").json()
            events = c.get("/api/v1/quarantine/events").json()["events"]
    assert [(n["host"], n["rule"]) for n in q["nodes"]] == [("na", "gate")] and q["breaker"]["tripped"]
    assert sorted((e["host"], e["action"]) for e in events) == [("na", "drain"), ("nb", "refused"), ("nd", "refused")]
    # the collector gone: the gate drains by itself (here: scontrol missing, said in one line)
    code, lines, _ = gate(straggler_cmd, *args, "--node", "nc", state_dir=tmp_path / "c")
    assert (
        code == 1
        and lines[-1].startswith(f"drain: cannot drain nc: {missing} ")
        and "(collector: cannot reach the collector" in lines[-1]
    ), lines


@pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (peers for each other)")
def test_the_fleet_reference_leaves_out_the_node_being_judged(straggler_cmd, tmp_path):
    """The fleet reference is the OTHER nodes' devices: this node's own results at the collector (its
    agent's retests of it, all a one-node fleet has) are its own past, not its fleet. Here they say it
    was 10x faster: the gate does not fail it for being slower than itself (it did, 'node matmul 0.10x:
    slow', and after a resume the requeued job's gate drained the node again on that noise); the same
    results from another node still fail it (the whole node slower than the fleet)."""
    import httpx

    from straggler.collector.service import BackgroundCollector
    from straggler.collector.settings import CollectorSettings
    from straggler.records import result_id
    from test_agent_support import wait_until
    from test_collector_api import AUTH, TOKEN, peer_ratio_analyze

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    scan = tmp_path / "scan.jsonl"  # this machine's real rows, as its agent uploads them
    probe = ["--device", "cpu", "--probes", "matmul", "--duration", "0.5", "--max-rounds", "1"]
    with cpu_shield() as (shield, how):  # the cores compared with each other: outside load kept off
        if shield is None:
            skip_or_fail(f"no CPU shield ({how}): outside load would slow the probes' cores for real")
        r = run_cmd([*straggler_cmd, "scan", *probe, "--output", str(scan)], 120, preexec_fn=shield.enter)
        assert scan.is_file(), r.stderr
        rows = [json.loads(x) for x in scan.read_text().splitlines()]
        settings = CollectorSettings(
            port=0, db_path=tmp_path / "c.db", quarantine_action="record", analysis_debounce_s=0.1
        )
        with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:

            def judged_against(host: str, n_devices: int) -> tuple[int, list[str]]:
                mine = [{**x, "host": host, "value": x["value"] * 10} for x in rows]
                body = {"host": host, "results": [{**x, "id": result_id(x)} for x in mine]}
                assert httpx.post(srv.url + "/api/v1/results", json=body, headers=AUTH, timeout=30).status_code == 200
                wait_until(
                    lambda: (
                        len(httpx.get(srv.url + "/api/v1/gpus", headers=AUTH, timeout=30).json()["gpus"]) == n_devices
                    ),
                    30,
                    "the fleet view of the uploaded rows",
                )
                g = run_cmd(
                    [
                        *straggler_cmd,
                        "gate",
                        "--budget",
                        "60",
                        "--state-dir",
                        str(tmp_path / host),
                        *probe,
                        "--telemetry",
                        "fake:h100_idle",
                        "--collector",
                        srv.url,
                        "--token-file",
                        str(token_file),
                        "--node",
                        "self",
                    ],
                    90,
                    preexec_fn=shield.enter,
                )
                return g.returncode, g.stdout.splitlines()

            n = len({x["gpu"] for x in rows})
            code, lines = judged_against("self", n)
            assert not [x for x in lines if x.startswith("node matmul")], lines
            assert lines[-1].endswith(
                f"reference: collector {srv.url}: 0 model/probe reference(s) (the {n} "
                "device(s) of self itself left out)"
            ), lines
            code, lines = judged_against("other", 2 * n)  # another node 10x faster: this one is slow
            found = [x for x in lines if x.startswith("node matmul")]
            assert code == 1 and len(found) == 1, lines
            m = re.fullmatch(
                r"node matmul (0\.\d\d)x: slow \(node median against the fleet reference \(collector\)\)", found[0]
            )
            assert m and float(m.group(1)) < 0.5, lines
            assert (
                f"reference: collector {srv.url}: 1 model/probe reference(s) (the {n} device(s) of self itself "
                "left out)" in lines[-1]
            ), lines


def _shipped_prolog(d: Path, gate_args: str) -> Path:
    """slurm/straggler-prolog with its common part, copied as an operator does, with a straggler-gate.env."""
    import shutil
    import sys

    from conftest import ROOT

    d.mkdir()
    for name in ("straggler-prolog", "straggler-gate-common.sh"):
        shutil.copy2(ROOT / "slurm" / name, d / name)
    (d / "straggler-gate.env").write_text(
        f"STRAGGLER={Path(sys.executable).with_name('straggler')}\nSTRAGGLER_GATE_BUDGET=30\n"
        f'STRAGGLER_GATE_ARGS="{gate_args}"\nSTRAGGLER_GATE_LOG={d}/gate.log\n'
    )
    return d / "straggler-prolog"
