"""`straggler scan --collector URL`: a cluster scan through the real collector and two real agents on
127.0.0.1 (real CPU probes in each agent's scan child), rendered like a local scan."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (ROOT / "collector" / "client.py").exists(),
                                                   reason="collector client not there yet")]


def test_cluster_scan_through_the_collector(tmp_path, straggler_cmd):
    from test_agent_e2e import CollectorProcess
    from test_agent_support import AgentProcess, free_port

    collector = CollectorProcess(tmp_path, free_port()).start()
    agents = [AgentProcess(tmp_path, name=n, collector_url=collector.url, token_file=collector.token_file,
                           probe_device="cpu", probes=["matmul"], probe_duration_s=1, probe_deadline_s=300)
              for n in ("node-a", "node-b")]
    try:
        for a in agents:
            a.start()
        time.sleep(3)  # both agents have long-polled the collector: the scan takes every agent seen
        proc = subprocess.run([*straggler_cmd, "scan", "--collector", collector.url, "--token-file",
                               str(collector.token_file), "--probes", "matmul", "--duration", "1", "--json",
                               "--output", str(tmp_path / "cluster.csv"), "--deadline", "400"],
                              capture_output=True, text=True, timeout=240)
        logs = "\n".join(a.log()[-1500:] for a in agents)
        assert proc.returncode in (0, 1), (proc.stderr, logs)
        doc = json.loads(proc.stdout)
        assert doc["backend"] == "collector" and "2 node(s)" in doc["notice"]
        hosts = {d["host"] for d in doc["devices"]}
        assert hosts == {"node-a", "node-b"}
        assert all(d["probes"]["matmul"]["n_samples"] >= 1 for d in doc["devices"])
        assert doc["failures"] == [] and doc["analysis"]["gpus"]
        assert proc.returncode == (1 if any(d["straggler"] for d in doc["devices"]) else 0)
        table = subprocess.run([*straggler_cmd, "scan", "--collector", collector.url, "--token-file",
                                str(tmp_path / "missing-token")], capture_output=True, text=True, timeout=60)
        assert table.returncode == 2 and "--token-file" in table.stderr and "missing-token" in table.stderr
    finally:
        for a in agents:
            a.close()
        collector.close()
