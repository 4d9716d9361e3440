"""The agent's half of the quarantine loop, with a real agent process and a real collector on 127.0.0.1
(quarantine_action = "record"), the probe child replaced by the stand-in scan of test_agent_support
(no torch: these are about when a retest runs and what it reports, not about measuring;
tests/slurm/test_quarantine_slurm.py retests with real CPU probes).

- unknown is busy: a drained node whose compute processes cannot be read is never retested; the
  same node with readable telemetry is (the control that shows the first one could fail);
- what a retest reports, from the scan's own --json document and exit code.
"""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest

from straggler.agent.child import ProbeRun
from straggler.agent.quarantine import retest_outcome
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from test_agent_daemon import scrape, value
from test_agent_support import AgentProcess, fixture_with_faults, wait_until, write_fake_scan

TOKEN = "quarantine-agent-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def collector(tmp_path):
    settings = CollectorSettings(
        port=0, db_path=tmp_path / "collector.db", quarantine_action="record", quarantine_max_fleet_share=1.0
    )
    with BackgroundCollector(settings, TOKEN) as srv:
        (tmp_path / "token").write_text(TOKEN)
        srv.token_file = tmp_path / "token"
        yield srv


def drain(srv, host):
    r = httpx.post(
        srv.url + "/api/v1/quarantine/drain",
        headers=AUTH,
        timeout=30,
        json={"host": host, "reason": "straggler: gpu2 matmul 0.80x", "rule": "gate"},
    )
    assert r.json()["action"] == "drain", r.text


def events(srv, host):
    return httpx.get(f"{srv.url}/api/v1/quarantine/{host}", timeout=30).json()["events"][::-1]


@pytest.mark.parametrize("readable", [False, True])
def test_a_drained_node_is_retested_only_while_known_idle(tmp_path, collector, readable):
    host = "busy-node" if not readable else "idle-node"
    faults = [] if readable else [{"device": 2, "nvml_error": "no_permission", "fields": ["processes"]}]
    fixture = fixture_with_faults(tmp_path, "h100_idle", faults, name=f"q_{host}")
    drain(collector, host)
    interval_s = 0.2
    agent = AgentProcess(
        tmp_path,
        name=host,
        collector_url=collector.url,
        token_file=collector.token_file,
        telemetry=f"fake:{fixture}",
        interval_s=interval_s,
        idle_grace_s=0,
        probe_every_s=0,
        quarantine_poll_s=0.2,
        retest_every_s=0.2,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
    )
    try:
        agent.start()
        wait_until(lambda: "straggler drained this node" in agent.log(), 60, "the agent to learn it is drained")
        if readable:
            # the stand-in scan exits 0 with no device verdicts: measured nothing to judge, not clean
            fail = wait_until(
                lambda: [e for e in events(collector, host) if e["action"] == "retest_fail"], 60, "a retest report"
            )[0]
            assert fail["reason"].startswith("not clean: exit 0, no device verdicts") and fail["by"] == f"agent {host}"
            assert re.fullmatch(
                rf"\d{{8}}T\d{{6}}Z-{host}-retest-[0-9a-f]{{8}}", fail["measured"]["scan_id"]
            )  # scanproto
            args = json.loads(next((tmp_path / host).rglob("*retest*.args")).read_text())  # the stand-in keeps them
            assert args[args.index("--max-rounds") + 1] == "3"  # retest_max_rounds: undecided devices re-measured
        else:
            ticks = value(scrape(agent), "straggler_agent_ticks_total")
            # many ticks (and retest_every_s periods) after it knew: still no probe run of any kind
            wait_until(lambda: value(scrape(agent), "straggler_agent_ticks_total") >= ticks + 10, 60, "ten more ticks")
            assert value(scrape(agent), "straggler_agent_probe_runs_total") == 0.0
            assert [e["action"] for e in events(collector, host)] == ["drain"]
            assert value(scrape(agent), "straggler_agent_devices_idle") == 0.0
        assert agent.stop() == 0
    finally:
        agent.close()


def _run(tmp_path, rc: int, doc: dict | None, error: str | None = None) -> ProbeRun:
    out = tmp_path / "r.stdout"
    out.write_text("" if doc is None else json.dumps(doc))
    run = ProbeRun(
        scan_id="n-retest-1", cluster=False, command=[], output=tmp_path / "r.jsonl", deadline_s=60, retest=True
    )
    run.stdout_path, run.returncode, run.error = out, rc, error
    return run


def test_retest_outcome_passes_only_a_clean_decided_scan(tmp_path):
    healthy = {"gpu": "cpu0", "verdict": "healthy", "probes": {"matmul": {"ratio": 1.01}}}
    slow = {"gpu": "cpu1", "verdict": "slow", "probes": {"matmul": {"ratio": 0.98}}}
    straggler = {"gpu": "cpu1", "verdict": "straggler", "probes": {"matmul": {"ratio": 0.52}}}
    undecided = {"gpu": "cpu1", "verdict": "undecided", "probes": {"matmul": {"ratio": 0.95}}}
    ok = retest_outcome(_run(tmp_path, 0, {"devices": [healthy, slow], "failures": []}))
    assert ok["passed"] is True and ok["reason"] == "clean: 2 device(s) healthy" and ok["scan_id"] == "n-retest-1"
    assert ok["measured"]["devices"] == [
        {"gpu": "cpu0", "verdict": "healthy", "ratio": {"matmul": 1.01}},
        {"gpu": "cpu1", "verdict": "slow", "ratio": {"matmul": 0.98}},
    ]
    bad = retest_outcome(_run(tmp_path, 1, {"devices": [healthy, straggler], "failures": []}))
    assert bad["passed"] is False and bad["reason"] == "not clean: cpu1 straggler matmul 0.52x"
    und = retest_outcome(_run(tmp_path, 2, {"devices": [healthy, undecided], "failures": []}))
    assert und["passed"] is False and und["reason"] == "not clean: cpu1 undecided matmul 0.95x"
    hung = retest_outcome(_run(tmp_path, -9, None, error="probe overran its 60 s deadline and was killed"))
    assert (
        hung["passed"] is False
        and hung["reason"] == "retest could not measure: probe overran its 60 s deadline and was killed"
    )
    nothing = retest_outcome(_run(tmp_path, 0, {"devices": [], "failures": []}))
    assert nothing["passed"] is False
