"""A failed probe run is a failure (issue 10, item 5): a child that produced no results, exited 2
(without measuring everything) or by a signal, or exited 1 without its document (a Python crash),
is a failed run, with its reason in the metrics, the collector's scan state and the log. Exit 1
with results and the scan's document (stragglers found) is a successful run."""

from __future__ import annotations

import sys
import time

import pytest

from straggler.agent.child import ProbeRun, scan_command
from straggler.agent.settings import AgentSettings
from test_agent_support import AgentProcess, IngestServer, wait_until, write_fake_scan


def _run(tmp_path, mode, rows=None) -> ProbeRun:
    settings = AgentSettings(
        probe_command=(sys.executable, str(write_fake_scan(tmp_path))),
        probe_device="cpu",
        probes=("matmul",),
        probe_duration_s=2,
    )
    out = tmp_path / f"{mode}.jsonl"
    run = ProbeRun(
        scan_id=f"scan-{mode}",
        cluster=False,
        output=out,
        deadline_s=30.0,
        kill_grace_s=0.5,
        command=scan_command(settings, f"scan-{mode}", out, 30.0),
    )
    env = {"FAKE_SCAN_MODE": mode, "PATH": "/usr/bin:/bin"}
    if rows is not None:
        env["FAKE_SCAN_ROWS"] = str(rows)
    run.start(tmp_path / "work", env=env)
    end = time.monotonic() + 60
    while not run.poll():
        assert time.monotonic() < end, "probe child never finished"
        time.sleep(0.05)
    return run


@pytest.mark.parametrize(
    "mode, rows, rc, failure, says",
    [
        ("ok", 0, 0, "no_results", "probe exited with 0 but produced no results"),
        ("stragglers", 0, 1, "no_results", "probe exited with 1 but produced no results"),
        ("crash", None, 1, "exit_status", "RuntimeError: the scan crashed"),
        ("segv", None, -11, "signal", "probe killed by SIGSEGV"),
    ],
)
def test_a_probe_run_without_results_or_that_crashed_is_a_failed_run(tmp_path, mode, rows, rc, failure, says):
    run = _run(tmp_path, mode, rows)
    assert run.returncode == rc
    assert run.failed and run.failure == failure and says in run.error, (run.error, run.failure)


def test_stragglers_found_with_results_is_a_successful_run(tmp_path):
    run = _run(tmp_path, "stragglers")
    assert run.returncode == 1 and not run.failed and len(run.rows()) == 3


def test_a_crashed_cluster_scan_is_failed_everywhere(tmp_path):
    """Metrics (by reason), the collector's scan state, the log: all say failed, and why."""
    server = IngestServer(token="secret")
    token = tmp_path / "token"
    token.write_text("secret\n")
    agent = AgentProcess(
        tmp_path,
        "node-c",
        collector_url=server.url,
        token_file=token,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        env={"FAKE_SCAN_MODE": "crash"},
    )
    try:
        agent.start()
        server.scans.append(
            {
                "scan_id": "20261201T000000Z-c0ffee00",
                "start_at": time.time(),
                "probes": ["matmul"],
                "duration_s": 1.0,
                "hosts": ["node-c"],
            }
        )
        wait_until(lambda: any(b["state"] != "running" for _, b in server.statuses), what="final state", timeout_s=60)
        final = [b for _, b in server.statuses if b["state"] != "running"]
        assert [b["state"] for b in final] == ["failed"], server.statuses
        assert "probe exited with 1: RuntimeError: the scan crashed" in final[0]["error"]
        assert "failed: probe exited with 1: RuntimeError: the scan crashed (3 results kept)" in agent.log()
        import httpx

        text = httpx.get(agent.url + "/metrics", timeout=10).text
        assert 'straggler_agent_probe_failures_total{reason="exit_status"} 1.0' in text, text
        assert agent.stop() == 0
    finally:
        agent.close()
        server.close()
