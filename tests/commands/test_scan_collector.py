"""`straggler scan --collector URL`: a cluster scan through the real collector and two real agents on
127.0.0.1 (real CPU probes in each agent's scan child), rendered like a local scan."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest
from conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "collector" / "client.py").exists(), reason="collector client not there yet"),
]


def _seen(collector) -> list[str]:
    """The hosts the collector knows as agents (they long-polled it)."""
    with sqlite3.connect(collector.db) as db:
        return [r[0] for r in db.execute("SELECT host FROM agents ORDER BY host")]


def test_cluster_scan_through_the_collector(tmp_path, straggler_cmd):
    # the default probe set (every probe), as a user runs it: allreduce adds its own columns
    import os

    from straggler.probes.devices import PROBES, plan_probes
    from straggler.records import read_table
    from test_agent_e2e import CollectorProcess
    from test_agent_support import AgentProcess, free_port, wait_until

    collector = CollectorProcess(tmp_path, free_port()).start()
    # two "nodes" on one machine: each would rightly see the other's probes (and any outside load) as a
    # job (agent/jobwatch.py, tested in test_agent_jobwatch.py), so their CPU job watch is off
    agents = [
        AgentProcess(
            tmp_path,
            name=n,
            collector_url=collector.url,
            token_file=collector.token_file,
            probe_device="cpu",
            probe_duration_s=1,
            probe_deadline_s=600,
            job_cpu_cores=0,
        )
        for n in ("node-a", "node-b")
    ]
    try:
        for a in agents:
            a.start()
        wait_until(lambda: _seen(collector) == ["node-a", "node-b"], what="both agents' first long poll")
        proc = subprocess.run(
            [
                *straggler_cmd,
                "scan",
                "--collector",
                collector.url,
                "--token-file",
                str(collector.token_file),
                "--duration",
                "1",
                "--json",
                "--output",
                str(tmp_path / "cluster.csv"),
                "--deadline",
                "700",
            ],
            capture_output=True,
            text=True,
            timeout=800,
        )
        logs = "\n".join(a.log()[-1500:] for a in agents)
        assert proc.returncode in (0, 1) or proc.stderr.startswith("straggler: error: could not decide: "), (
            proc.stderr,
            logs,
        )
        doc = json.loads(proc.stdout)
        assert doc["backend"] == "collector" and "2 node(s)" in doc["notice"]
        assert doc["failures"] == [] and doc["analysis"]["gpus"], (doc["failures"], logs)
        cores = len(os.sched_getaffinity(0))
        ran, _ = plan_probes(PROBES, "cpu", cores)
        assert "allreduce" in ran or cores < 2
        assert {(d["host"], p) for d in doc["devices"] for p in d["probes"]} == {
            (h, p) for h in ("node-a", "node-b") for p in ran
        }
        assert all(d["probes"][p]["n_samples"] == 5 for d in doc["devices"] for p in ran)
        assert len(doc["samples"]) == 2 * cores * len(ran) * 5  # every sample measured is stored
        for s in doc["samples"]:
            if s["probe"] == "allreduce":
                assert s["algbw_gbps"] > 0 and s["arrival_skew_s"] >= 0 and s["value"] > 0
            else:
                assert s["algbw_gbps"] is None and s["arrival_skew_s"] is None
        table = read_table(tmp_path / "cluster.csv")
        assert len(table) == len(doc["samples"]) and {"algbw_gbps", "arrival_skew_s"} <= set(table.columns)
        verdicts = [d["verdict"] for d in doc["devices"]]
        assert proc.returncode == (1 if "straggler" in verdicts else 2 if "undecided" in verdicts else 0)
        table = subprocess.run(
            [*straggler_cmd, "scan", "--collector", collector.url, "--token-file", str(tmp_path / "missing-token")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 2 and "--token-file" in table.stderr and "missing-token" in table.stderr
    finally:
        for a in agents:
            a.close()
        collector.close()


def test_a_cluster_scan_whose_uploads_were_refused_fails_with_the_collector_reason(tmp_path, straggler_cmd):
    import sys

    from test_agent_e2e import CollectorProcess
    from test_agent_support import AgentProcess, free_port, wait_until, write_fake_scan

    collector = CollectorProcess(tmp_path, free_port()).start()
    agent = AgentProcess(
        tmp_path,
        name="node-r",
        collector_url=collector.url,
        token_file=collector.token_file,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        env={"FAKE_SCAN_MODE": "ok", "FAKE_SCAN_EXTRA": json.dumps({"bogus_gbps": 1.0})},
    )
    try:
        agent.start()
        wait_until(
            lambda: _seen(collector) == ["node-r"], what="the agent's first long poll"
        )  # a scan takes the agents seen
        for as_json in (False, True):
            proc = subprocess.run(
                [
                    *straggler_cmd,
                    "scan",
                    "--collector",
                    collector.url,
                    "--token-file",
                    str(collector.token_file),
                    "--duration",
                    "1",
                    "--deadline",
                    "700",
                    *(["--json"] if as_json else []),
                ],
                capture_output=True,
                text=True,
                timeout=800,
            )
            assert proc.returncode == 2, (proc.stdout, proc.stderr, agent.log()[-1500:])
            last = proc.stderr.strip().splitlines()[-1]
            assert "node-r" in last and "the collector refused 3 result(s) of this scan" in last, proc.stderr
            assert "bogus_gbps: Extra inputs are not permitted" in last
            if as_json:
                doc = json.loads(proc.stdout)
                assert doc["samples"] == [] and doc["failures"][0]["host"] == "node-r"
            else:
                assert "no samples were measured" not in proc.stderr + proc.stdout
    finally:
        agent.close()
        collector.close()
