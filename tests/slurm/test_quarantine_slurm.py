"""Show-test of the quarantine loop with a real Slurm (tests/slurm.py), the real collector
(`straggler collector`, quarantine_action = scontrol) and a real agent running real CPU probes.

1. A real slowdown on one core (busy processes pinned there, as tests/commands/test_scan_slowdown.py makes
   it): the agent's scan is uploaded, the fleet analysis flags that core, the collector drains the
   node in Slurm with the straggler reason (`sinfo -R`).
2. The agent retests the drained node while it is slow (a fail), the slowdown is removed, its
   retests pass N times in a row and the collector resumes the node in Slurm.
3. The collector's audit (`straggler quarantine show`) shows each step, /metrics counts them.
Also: `straggler quarantine drain/resume` by hand through the collector reaches Slurm and is
recorded with who and why; placement hints applied with scontrol show on the node.
4. The whole chain with the shipped prolog (a second Slurm, Prolog= slurm/straggler-prolog, its gate
   given --collector and --token-file): the gate of a job fails on the slow core and asks the collector,
   which drains the node in Slurm (rule gate), the job does not run; the slowdown removed, the agent's
   retests pass N times, the collector resumes the node and the requeued job runs, its gate judging
   the node by its own devices (the agent's retests are its own past, not its fleet), and nothing
   drains it again. Every deadline is the work's own: the gate's budget and its wrapper's limit, the
   retests' scan deadlines, Slurm's cred_expire and sched_interval.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import run_cmd, scan_timeout_s
from cpushield import cpu_shield
from slurm import slurm_fixture
from test_agent_e2e import CollectorProcess
from test_agent_support import AgentProcess, free_port, wait_until
from test_gate_slurm import BUDGET_S, _log, _submit, _wait_job, gated_slurm, install_gate

pytestmark = pytest.mark.slow
slurm = slurm_fixture()
CORES = sorted(os.sched_getaffinity(0))
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
PASSES = 2  # quarantine_resume_passes
DURATION_S = 2.0
POLL_S = RETEST_EVERY_S = 0.5  # the agent's quarantine_poll_s and retest_every_s
RETEST_ROUNDS = 2  # retest_max_rounds
# the chain's Slurm: a requeued job may start again this long after its requeue (cred_expire), found
# by the scheduler's next pass (sched_interval; nothing else wakes it when the credential expires)
CRED_EXPIRE_S, SCHED_INTERVAL_S = 30, 2
OUTER_S = 10 + 5  # the shipped wrapper's hard limit on its gate: budget + 10 s, then 5 s to kill it


@contextlib.contextmanager
def slurm_collector(tmp_path, slurm, monkeypatch):
    """The real collector draining and resuming in ``slurm`` (quarantine_action = scontrol)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # the collector's scontrol talks to the test Slurm
    for key, value in {
        "QUARANTINE_ACTION": "scontrol",
        "QUARANTINE_RESUME_PASSES": str(PASSES),
        "QUARANTINE_MAX_FLEET_SHARE": "1.0",
        "QUARANTINE_MAX_MODEL_SHARE": "1.0",
        "ANALYSIS_DEBOUNCE_S": "0.2",
        "ANALYSIS_MAX_DELAY_S": "2",
    }.items():
        monkeypatch.setenv(f"STRAGGLER_COLLECTOR_{key}", value)
    c = CollectorProcess(tmp_path, free_port()).start()
    try:
        yield c
    finally:
        c.close()
        if slurm.node_state() not in ("idle",):
            slurm.resume()


@pytest.fixture
def collector(tmp_path, slurm, monkeypatch):
    with slurm_collector(tmp_path, slurm, monkeypatch) as c:
        yield c


def slow_node_agent(tmp_path, node: str, collector) -> AgentProcess:
    """The node's agent: real CPU matmul scans, no scans of its own (only asked ones and retests),
    polling the collector's quarantine state often; the CPU job watch off (the test's busy processes
    are the slowdown, not a job)."""
    return AgentProcess(
        tmp_path,
        name=node,
        collector_url=collector.url,
        token_file=collector.token_file,
        probe_device="cpu",
        probes=["matmul"],
        probe_duration_s=DURATION_S,
        probe_every_s=0,
        quarantine_poll_s=POLL_S,
        retest_every_s=RETEST_EVERY_S,
        retest_max_rounds=RETEST_ROUNDS,
        job_cpu_cores=0,
    )  # the test's busy processes are the slowdown, not a job


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "straggler", "quarantine", *args], 120, env={**os.environ, **(env or {})})


def test_drain_and_resume_by_hand_reach_slurm_and_are_recorded(slurm, collector):
    common = ["--collector", collector.url, "--token-file", str(collector.token_file)]
    r = cli("drain", slurm.node, "--reason", "bad fan", "--by", "alice", *common)
    assert r.returncode == 0, r.stderr
    assert "drained" in r.stdout and "recorded by the collector" in r.stdout
    assert slurm.node_state() in ("drained", "drain") and slurm.drain_reason() == "straggler: bad fan"
    r = cli("list", "--collector", collector.url, "--json")
    doc = json.loads(r.stdout)
    assert [(n["host"], n["rule"], n["by"]) for n in doc["nodes"]] == [(slurm.node, "manual", "alice")]
    r = cli("resume", slurm.node, "--reason", "fan replaced", "--by", "bob", *common)
    assert r.returncode == 0, r.stderr
    slurm.wait_state(("idle",))
    hist = json.loads(cli("show", slurm.node, "--collector", collector.url, "--json").stdout)["events"]
    assert [(e["action"], e["rule"], e["by"], e["reason"]) for e in hist] == [
        ("resume", "manual", "bob", "fan replaced"),
        ("drain", "manual", "alice", "straggler: bad fan"),
    ]
    # resumed with scontrol behind straggler's back: a resume through straggler then finds it in service
    assert cli("drain", slurm.node, "--reason", "again", *common).returncode == 0
    slurm.run(["scontrol", "update", f"nodename={slurm.node}", "state=resume"])
    slurm.wait_state(("idle",))
    r = cli("resume", slurm.node, "--reason", "tidy up", "--json", *common)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "resumed"
    last = json.loads(cli("show", slurm.node, "--collector", collector.url, "--json").stdout)["events"][0]
    assert last["action"] == "resume" and last["measured"]["note"] == f"{slurm.node} was in service already (idle)"
    # without the token the collector refuses, and Slurm is not touched: one line, exit 2
    r = cli("drain", slurm.node, "--reason", "x", "--collector", collector.url)
    assert r.returncode == 2 and r.stderr.startswith("straggler: error: --collector needs --token-file")
    assert slurm.node_state() == "idle"


@pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)")
def test_a_straggler_node_is_drained_retested_and_resumed_in_slurm(tmp_path, slurm, collector):
    slow_core = CORES[-1]
    with cpu_shield() as (shield, how):
        agent = slow_node_agent(tmp_path, slurm.node, collector)
        busy = []
        try:
            agent.start()
            if shield is not None:  # the agent and every scan child it starts: outside load kept off
                (shield.path / "cgroup.procs").write_text(f"{agent.proc.pid}\n")
            busy = [
                subprocess.Popen(
                    [sys.executable, "-c", BUSY, str(slow_core)], preexec_fn=shield.enter if shield else None
                )
                for _ in range(2)
            ]
            per_scan_s = 2 * scan_timeout_s(("matmul",), DURATION_S)  # up to 2 rounds
            agent.signal(signal.SIGUSR1)  # the node's scan, while the core is slow

            def drained():
                nodes = collector.get("/api/v1/quarantine")["nodes"]
                return nodes[0] if nodes else None

            node = wait_until(drained, per_scan_s + 30, "the collector to drain the slow node")
            assert node["host"] == slurm.node and node["rule"] == "fleet_analysis"
            assert node["reason"].startswith(f"straggler: cpu{slow_core} matmul 0."), node
            assert slurm.node_state() in ("drained", "drain")
            assert slurm.drain_reason() == node["reason"]  # what sinfo -R shows an operator

            def events():
                return collector.get(f"/api/v1/quarantine/{slurm.node}")["events"][::-1]

            fails = wait_until(
                lambda: [e for e in events() if e["action"] == "retest_fail"],
                per_scan_s + 30,
                "a failed retest while the core is slow",
            )
            assert f"cpu{slow_core} straggler" in fails[0]["reason"], fails[0]
            assert slurm.node_state() in ("drained", "drain")
            for p in busy:  # the slowdown is removed
                p.kill()
                p.wait()

            # N clean retests in a row resume it; each retest is a whole scan, some may still see the
            # slowdown's end: wait as long as a few retests take
            wait_until(
                lambda: any(e["action"] == "resume" for e in events()),
                (PASSES + 3) * per_scan_s,
                f"{PASSES} clean retests and the resume ({how})",
            )
            slurm.wait_state(("idle",))
            steps = [e["action"] for e in events()]
            assert steps[0] == "drain" and "retest_fail" in steps
            assert steps[-(PASSES + 1) :] == ["retest_pass"] * PASSES + ["resume"], steps
            resume = events()[-1]
            assert resume["rule"] == "hysteresis" and resume["by"] == f"agent {slurm.node}"
            passes = [e for e in events() if e["action"] == "retest_pass"][-PASSES:]
            assert [e["reason"].endswith(f"(pass {i + 1} of {PASSES})") for i, e in enumerate(passes)] == [
                True
            ] * PASSES
            assert all(d["verdict"] in ("healthy", "slow") for e in passes for d in e["measured"]["devices"])
            drain = events()[0]
            assert drain["measured"]["gpu"] == f"cpu{slow_core}" and drain["measured"]["ratio"] < 0.9
            text = httpx.get(collector.url + "/metrics").text
            assert 'straggler_quarantine_actions_total{action="resume"} 1.0' in text
            assert f'straggler_node_quarantined{{host="{slurm.node}"}}' not in text, [
                (e["action"], e["rule"], e["reason"], e["measured"]) for e in events()
            ]
            assert "straggler_circuit_breaker_tripped 0.0" in text
            # the audit as an operator reads it
            r = cli("show", slurm.node, "--collector", collector.url)
            assert r.returncode == 0 and "hysteresis" in r.stdout and "fleet_analysis" in r.stdout, r.stdout
        finally:
            for p in busy:
                p.kill()
                p.wait()
            agent.stop()
            agent.close()


def write_results(path, hosts: dict[str, float]) -> None:
    """4 devices per host, matmul around ``base`` (+0.2% per device index), 0.1% noise."""
    import csv
    import random

    rng = random.Random(1)
    rows = [
        {
            "ts": 1e9 + k,
            "scan_id": "s1",
            "host": h,
            "gpu": f"GPU-{h}-{i}",
            "index": i,
            "model": "NVIDIA H100 80GB HBM3",
            "probe": "matmul",
            "settings": "n=8192",
            "sample": k,
            "value": base * (1 + 0.002 * i) * (1 + rng.gauss(0, 0.001)),
            "unit": "TFLOP/s",
        }
        for h, base in hosts.items()
        for i in range(4)
        for k in range(8)
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_placement_hints_apply_to_the_slurm_node(tmp_path, slurm):
    results = tmp_path / "fleet.csv"
    write_results(results, {slurm.node: 100.0, "node2": 101.0})  # localhost the slower half: class D
    r = cli("hints", str(results), "--json")
    doc = json.loads(r.stdout)
    assert [(h["node"], h["perf_class"], h["weight"], h["feature"]) for h in doc["hints"]] == [
        (slurm.node, "D", 4, "perf_d"),
        ("node2", "B", 2, "perf_b"),
    ]
    assert f"\nNodeName={slurm.node} Weight=4 Features=perf_d  # class D, 4 device(s)\n" in doc["slurm_conf"]
    # the node has a feature of its own: --features slurm keeps it (scontrol replaces the whole list)
    slurm.run(["scontrol", "update", f"NodeName={slurm.node}", "AvailableFeatures=ib", "ActiveFeatures=ib"])
    try:
        r = cli("hints", str(results), "--features", "slurm", env=slurm.env)
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if f"NodeName={slurm.node} " in ln)
        assert line == (
            f"scontrol update NodeName={slurm.node} Weight=4 AvailableFeatures=ib,perf_d ActiveFeatures=ib,perf_d"
        )
        applied = slurm.run(line.split())
        assert applied.returncode == 0, applied.stderr
        shown = slurm.run(["scontrol", "show", "node", "-o", slurm.node]).stdout
        assert (
            " Weight=4 " in shown and "AvailableFeatures=ib,perf_d " in shown and "ActiveFeatures=ib,perf_d " in shown
        )
        job = slurm.run(["srun", "-N1", "--constraint=perf_d", "hostname"])  # a job asking for class D runs here
        assert job.returncode == 0, job.stderr
    finally:
        slurm.run(["scontrol", "update", f"NodeName={slurm.node}", "Weight=1", "AvailableFeatures=", "ActiveFeatures="])


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A second Slurm, for the chain: Prolog= the shipped prolog (tests/slurm/test_gate_slurm.py installs
    it), slurmd in a CPU shield; a job whose prolog failed is requeued, not held
    (nohold_on_prolog_fail: docs/gate.md), so it runs once the node is back; Slurm starts a requeued
    job again only after the credential lifetime (cred_expire, 120 s by default): 30 s here, and
    at the scheduler's next pass (sched_interval, 60 s by default): 2 s here."""
    d = install_gate(tmp_path_factory.mktemp("gate"))
    with gated_slurm(
        d,
        (
            f"SchedulerParameters=nohold_on_prolog_fail,sched_interval={SCHED_INTERVAL_S}",
            f"AuthInfo=cred_expire={CRED_EXPIRE_S}",
        ),
    ) as (s, shield):
        yield s, shield, d


def test_the_prolog_drains_through_the_collector_and_the_agents_retests_resume_the_node(tmp_path, gated, monkeypatch):
    """The whole chain: a slow core; a job's prolog gate fails and asks the collector, which drains the
    node in Slurm with the straggler reason, and the job does not run; the slowdown is removed, the
    agent's retests pass N times, the collector resumes the node and the requeued job runs there."""
    slurm, shield, gate_dir = gated
    slow = f"cpu{CORES[-1]}"
    marker = tmp_path / "ran"
    with slurm_collector(tmp_path, slurm, monkeypatch) as collector:
        install_gate(gate_dir, f"--collector {collector.url} --token-file {collector.token_file}")
        agent = slow_node_agent(tmp_path, slurm.node, collector)  # the node's name in Slurm ($SLURMD_NODENAME)
        busy, job = [], None
        try:
            agent.start()
            (shield.path / "cgroup.procs").write_text(f"{agent.proc.pid}\n")
            busy = [
                subprocess.Popen([sys.executable, "-c", BUSY, str(CORES[-1])], preexec_fn=shield.enter)
                for _ in range(2)
            ]
            # a prolog: the scheduler's pass that starts the job, then the gate within its wrapper's limit
            prolog_s = SCHED_INTERVAL_S + BUDGET_S + OUTER_S
            job = _submit(slurm, marker)
            state = _wait_job(slurm, job, marker, prolog_s)
            assert state.startswith("drain") and not marker.exists(), (state, _log(gate_dir))
            nodes = collector.get("/api/v1/quarantine")["nodes"]
            assert [(n["host"], n["rule"]) for n in nodes] == [(slurm.node, "gate")], nodes
            assert re.fullmatch(rf"straggler: {slow} matmul 0\.\d\dx \S+", nodes[0]["reason"]), nodes
            log = _log(gate_dir)
            assert f"drain: {slurm.node} drained by the collector, reason " in log, log
            # the drain was asked for before the gate ended: its prolog ends within the same limit
            wait_until(
                lambda: slurm.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip() == "PENDING",
                prolog_s,
                "Slurm to requeue the job whose prolog failed",
            )
            requeued = time.monotonic()
            assert slurm.drain_reason() == nodes[0]["reason"], log  # what sinfo -R shows an operator
            assert not marker.exists(), log  # the job did not run on the drained node
            for p in busy:  # the slowdown is removed
                p.kill()
                p.wait()

            def events():
                return collector.get(f"/api/v1/quarantine/{slurm.node}")["events"][::-1]

            # a retest: the agent's next look and retest, a scan of up to RETEST_ROUNDS rounds within
            # its own deadline; the one running when the slowdown ended may fail, one more may see the
            # machine's load; then PASSES passes
            retest_s = POLL_S + RETEST_EVERY_S + RETEST_ROUNDS * scan_timeout_s(("matmul",), DURATION_S)
            wait_until(
                lambda: any(e["action"] == "resume" for e in events()),
                (PASSES + 2) * retest_s,
                f"{PASSES} clean retests and the resume",
            )
            slurm.wait_state(("idle", "mixed", "allocated", "completing"))
            # the requeued job now runs there, once Slurm lets it start again, its prolog's gate passing
            again_s = max(0.0, CRED_EXPIRE_S - (time.monotonic() - requeued)) + prolog_s
            try:
                wait_until(marker.exists, again_s, "the requeued job to run", step_s=0.5)
            except AssertionError as e:
                q = slurm.run(["scontrol", "show", "job", job]).stdout
                raise AssertionError(
                    f"{e}: node {slurm.node_state()}, job {q}, gate log {_log(gate_dir)}, "
                    f"audit {[(x['action'], x['rule'], x['reason']) for x in events()]}"
                ) from None
            everything = [(e["action"], e["rule"], e["reason"]) for e in events()]
            steps = [(a, r) for a, r, _ in everything]
            steps = steps[: steps.index(("resume", "hysteresis")) + 1]  # up to the resume
            assert len(steps) == len(everything), everything  # nothing after it (a second drain?)
            assert steps[0] == ("drain", "gate"), steps
            # retests between: some still see the slowdown (or load), a fail starts the passes again
            assert {a for a, _ in steps[1 : -(PASSES + 1)]} <= {"retest_fail", "retest_pass"}, steps
            assert [a for a, _ in steps[-(PASSES + 1) :]] == ["retest_pass"] * PASSES + ["resume"], steps
            assert steps[-1] == ("resume", "hysteresis"), steps
            drain = events()[0]
            assert drain["by"].startswith("gate@") and drain["measured"]["slurm_job_id"] == job, drain
            assert f"drain: {slurm.node} drained by the collector" in _log(gate_dir)
            # the requeued job's gate judged the node by its own devices: its agent's retests, the only
            # results this one-node fleet has, are its own past, not a fleet to be slower than
            second = [x for x in _log(gate_dir).splitlines() if " gate: " in x][-1]
            assert re.search(
                rf"gate: (pass|could not decide \(--on-error pass\)) on .* reference: collector "
                rf"{collector.url}: 0 model/probe reference\(s\) \(the \d+ device\(s\) of {slurm.node} "
                r"itself left out\)$",
                second,
            ), second
        finally:
            for p in busy:
                p.kill()
                p.wait()
            if job:
                slurm.run(["scancel", job])
            agent.stop()
            agent.close()
