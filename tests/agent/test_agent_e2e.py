"""End to end on 127.0.0.1: the real collector (`straggler collector`) and real agents.

- two agents run a cluster scan triggered through the collector with real CPU probes (`straggler
  scan` child processes); the results are in the API and in the collector's /metrics;
- faults: the collector is killed during uploads and restarted, an agent is killed mid-spool and
  restarted; every result arrives exactly once (counted)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT
from straggler.agent.child import FAILURE_REASONS
from test_agent_support import AgentProcess, NotifySocket, free_port, wait_until, write_fake_scan

TOKEN = "e2e-token-0123456789"

pytestmark = pytest.mark.skipif(not (ROOT / "collector" / "service.py").exists(), reason="collector not there yet")


class CollectorProcess:
    def __init__(self, tmp, port: int) -> None:
        self.dir = tmp / "collector"
        self.dir.mkdir(exist_ok=True)
        self.port = port
        self.token_file = self.dir / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.db = self.dir / "collector.db"
        self.notify = NotifySocket(self.dir)
        self.proc = None

    def start(self) -> "CollectorProcess":
        self.notify.messages.clear()
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path}
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "straggler",
                    "collector",
                    "--address",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--db",
                    str(self.db),
                    "--token-file",
                    str(self.token_file),
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=self.dir,
            )
        self.notify.wait_for("READY", "1", timeout_s=60)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **params):
        r = httpx.get(self.url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict):
        r = httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.notify.close()


@pytest.fixture
def collector(tmp_path):
    c = CollectorProcess(tmp_path, free_port()).start()
    yield c
    c.close()


def _agent(tmp_path, collector, name, **kw) -> AgentProcess:
    return AgentProcess(tmp_path, name=name, collector_url=collector.url, token_file=collector.token_file, **kw)


def _spooled_per_run(agent) -> dict[str, int]:
    """What each probe run of an agent measured: the rows it spooled, from the agent's log."""
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r"probe run (\S+) done: (\d+) results spooled", agent.log())
    }


@pytest.mark.slow
def test_cluster_scan_through_the_collector_with_two_agents(tmp_path, collector):
    # the default probe set: every probe, allreduce with its own columns; every sample measured is stored
    from straggler.collector.client import cluster_scan
    from straggler.probes.devices import PROBES, plan_probes

    # two "nodes" on one machine: each would rightly see the other's probes as a job (agent/jobwatch.py,
    # tested in test_agent_jobwatch.py), so their CPU job watch is off
    agents = [
        _agent(tmp_path, collector, name, probe_device="cpu", probe_duration_s=2, probe_deadline_s=600, job_cpu_cores=0)
        for name in ("node-a", "node-b")
    ]
    try:
        for a in agents:
            a.start()
        progress = []
        result = cluster_scan(
            collector.url,
            TOKEN,
            PROBES,
            2.0,
            timeout_s=200,
            on_progress=progress.append,
            hosts=["node-a", "node-b"],
            start_delay_s=8.0,
        )
        logs = "\n".join(a.log()[-1500:] for a in agents)
        assert result["nodes"] == {"node-a": "done", "node-b": "done"}, (result, logs)
        samples = result["samples"]
        cores = len(os.sched_getaffinity(0))
        ran, _ = plan_probes(PROBES, "cpu", cores)
        measured = {a.settings["host"]: _spooled_per_run(a).get(result["scan_id"]) for a in agents}
        per_host = {h: [s for s in samples if s["host"] == h] for h in ("node-a", "node-b")}
        # 5 samples per device and probe that runs here; the collector stored every one of them
        assert measured == {h: cores * len(ran) * 5 for h in per_host}, (measured, logs)
        assert {h: len(rows) for h, rows in per_host.items()} == measured
        assert all(_rejected(a) == [] for a in agents)
        assert {s["probe"] for s in samples} == set(ran) and all(s["value"] > 0 for s in samples)
        collective = [s for s in samples if s["probe"] == "allreduce"]
        assert len(collective) == (2 * cores * 5 if "allreduce" in ran else 0)
        assert all(s["algbw_gbps"] > 0 and s["arrival_skew_s"] >= 0 for s in collective)
        assert len({s["id"] for s in samples}) == len(samples)
        # the nodes started together: their first samples end within a few seconds of each other
        first = [min(s["ts"] for s in rows) for rows in per_host.values()]
        assert abs(first[0] - first[1]) < 10
        view = collector.get(f"/api/v1/scans/{result['scan_id']}")
        assert view["results"] == len(samples) and view["state"] == "done"
        assert collector.get("/api/v1/scans")["scans"][0] == view
        assert progress and progress[-1]["state"] == "done"
        gpus = wait_until(
            lambda: [g for g in collector.get("/api/v1/gpus")["gpus"] if g["host"] in ("node-a", "node-b")],
            what="fleet view",
            timeout_s=60,
        )
        assert {g["host"] for g in gpus} == {"node-a", "node-b"}
        metrics = httpx.get(collector.url + "/metrics", timeout=30).text
        assert 'host="node-a"' in metrics and 'host="node-b"' in metrics
        # each agent exported its telemetry and counted one successful probe run
        for a in agents:
            text = httpx.get(a.url + "/metrics", timeout=10).text
            assert "straggler_agent_probe_runs_total 1.0" in text
            assert re.findall(r"^straggler_agent_probe_failures_total\{.*\} (\S+)$", text, re.M) == ["0.0"] * len(
                FAILURE_REASONS
            ), text
            assert a.stop() == 0
        print(
            f"cluster scan {result['scan_id']}: probes {', '.join(ran)} on {cores} CPU core(s) per node; "
            f"measured {sum(measured.values())} samples ({measured}), stored {view['results']}"
        )
    finally:
        for a in agents:
            a.close()


def _scan_count(collector, scan_id) -> int:
    try:
        return collector.get(f"/api/v1/scans/{scan_id}")["results"]
    except httpx.HTTPError:
        return -1


def _spooled(agent) -> int:
    with sqlite3.connect(agent.settings["spool_path"]) as db:
        return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def test_collector_and_agent_killed_mid_upload_every_result_arrives_once(tmp_path, collector):
    rows = 3000
    agent = _agent(
        tmp_path,
        collector,
        "node-f",
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        upload_batch=25,
        env={"FAKE_SCAN_MODE": "ok", "FAKE_SCAN_ROWS": str(rows)},
    )
    try:
        agent.start()
        scan = collector.post(
            "/api/v1/scans", {"probes": ["matmul"], "duration_s": 1.0, "hosts": ["node-f"], "start_delay_s": 0.5}
        )
        sid = scan["scan_id"]
        # uploads are under way: kill the collector in the middle of them
        wait_until(lambda: _scan_count(collector, sid) > 0, what="first uploads", step_s=0.02, timeout_s=60)
        collector.kill()
        # the agent retries against a dead collector; kill the agent too, mid-spool, and restart it
        wait_until(lambda: "upload failed" in agent.log(), what="an upload retry", timeout_s=30)
        left = _spooled(agent)
        assert 0 < left < rows  # some uploaded, some not
        agent.kill()
        assert _spooled(agent) == left  # killed mid-spool: nothing lost, nothing uploaded meanwhile
        agent.start()
        collector.start()
        wait_until(lambda: _scan_count(collector, sid) == rows, what=f"all {rows} results", timeout_s=120)
        view = wait_until(
            lambda: (v := collector.get(f"/api/v1/scans/{sid}"))["state"] == "done" and v,
            what="scan done",
            timeout_s=60,
        )
        samples = collector.get(f"/api/v1/scans/{sid}/results")["samples"]
        assert view["results"] == rows == len(samples)
        assert len({s["id"] for s in samples}) == rows  # exactly once
        assert sorted((s["sample"], s["index"]) for s in samples) == [(i // 3, i % 3) for i in range(rows)]
        assert agent.stop() == 0
        assert _spooled(agent) == 0
    finally:
        agent.close()


def test_the_collector_refuses_a_scan_that_cannot_finish_within_its_run_limit(collector):
    r = httpx.post(
        collector.url + "/api/v1/scans",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
        json={"probes": ["matmul", "membw"], "duration_s": 400, "hosts": ["a"]},
    )
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "duration_s: 2 probe(s) at 400 s need 1920 s, more than the collector's scan_run_limit_s = 900 s"
    )
    ok = httpx.post(
        collector.url + "/api/v1/scans",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
        json={"probes": ["matmul", "membw"], "duration_s": 15, "hosts": ["a"]},
    )
    assert ok.status_code == 201


def _rejected(agent) -> list[tuple[str, str]]:
    with sqlite3.connect(agent.settings["spool_path"]) as db:
        return db.execute("SELECT json_extract(row, '$.scan_id'), reason FROM rejected").fetchall()


def test_a_scan_whose_results_the_collector_refuses_fails_with_its_reason(tmp_path, collector):
    # the agent measured, but the collector refused every row: the scan is failed, saying why, not
    # "done" with 0 results
    from straggler.collector.client import cluster_scan

    agent = _agent(
        tmp_path,
        collector,
        "node-r",
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        env={"FAKE_SCAN_MODE": "ok", "FAKE_SCAN_EXTRA": json.dumps({"bogus_gbps": 1.0})},
    )
    try:
        agent.start()
        result = cluster_scan(collector.url, TOKEN, ["matmul"], 1.0, timeout_s=120, hosts=["node-r"], start_delay_s=0.5)
        assert result["state"] == "failed" and result["nodes"] == {"node-r": "failed"}, (result, agent.log()[-2000:])
        error = result["errors"]["node-r"]
        assert error.startswith("the collector refused 3 result(s) of this scan"), error
        assert "bogus_gbps: Extra inputs are not permitted" in error
        assert result["samples"] == []
        rejected = _rejected(agent)
        assert len(rejected) == 3 and {sid for sid, _ in rejected} == {result["scan_id"]}  # kept, not lost
        assert agent.stop() == 0
    finally:
        agent.close()
