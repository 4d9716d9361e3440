"""Disks fill and files break (issue 10, item 6, the agent): a corrupt spool file or a full spool
disk is one error line and a state (``straggler_agent_spool_errors_total{kind}``, the node busy),
never an agent that cannot start; the spool is capped by rows and bytes, dropping the oldest with
a counter. Real agent processes, real SQLite files, a real full filesystem (a small tmpfs in a mount
namespace, where the machine allows one)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys

import httpx
import pytest

from conftest import skip_or_fail
from test_agent_support import AgentProcess, wait_until, write_fake_scan


def _metrics(agent) -> str:
    return httpx.get(agent.url + "/metrics", timeout=10).text


def _spooled(path) -> list[dict]:
    with sqlite3.connect(path) as db:
        return [
            json.loads(r[0])
            for r in db.execute(
                "SELECT row FROM results ORDER BY json_extract(row, '$.sample'), json_extract(row, '$.index')"
            )
        ]


def test_a_corrupt_spool_is_moved_aside_and_the_agent_starts(tmp_path):
    a = AgentProcess(tmp_path, "node-s")
    spool = a.dir / "spool.sqlite"
    garbage = b"this is not an SQLite database\n" * 200
    spool.write_bytes(garbage)
    try:
        a.start()  # today: exit 2 at every start (a crash loop under systemd's Restart=on-failure)
        assert 'straggler_agent_spool_errors_total{kind="corrupt"} 1.0' in _metrics(a)
        line = next(ln for ln in a.log().splitlines() if "is corrupt" in ln)
        assert line.startswith(
            f"ERROR straggler.agent: the spool {spool} is corrupt (file is not a database); moved to {spool}.corrupt-"
        ), line
        aside = [p for p in a.dir.iterdir() if p.name.startswith("spool.sqlite.corrupt-")]
        assert len(aside) == 1 and aside[0].read_bytes() == garbage  # kept for inspection
        assert _spooled(spool) == []  # a new, working spool
        assert a.stop() == 0
    finally:
        a.close()


def test_check_warns_of_a_corrupt_spool_and_passes_as_the_start_does(tmp_path):
    from conftest import run_cmd

    spool = tmp_path / "spool.sqlite"
    spool.write_bytes(b"this is not an SQLite database\n" * 200)
    out = run_cmd(
        [sys.executable, "-m", "straggler", "agent", "--spool", str(spool), "--listen-port", "0", "--check"],
        timeout_s=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == (
        f"straggler: warning: config: spool_path: {spool} cannot be opened as an SQLite "
        "database (file is not a database); the start will move it aside and start a "
        "new spool"
    ), out.stderr
    assert spool.read_bytes().startswith(b"this is not")  # --check moves nothing


@pytest.mark.parametrize("cap, kept", [({"spool_max_rows": 5}, 5), ({"spool_max_bytes": 1500}, None)])
def test_the_spool_is_capped_and_drops_the_oldest_with_a_counter(tmp_path, cap, kept):
    rows = 12
    a = AgentProcess(
        tmp_path,
        "node-s",
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        env={"FAKE_SCAN_ROWS": str(rows)},
        **cap,
    )
    try:
        a.start()
        a.signal(signal.SIGUSR1)
        wait_until(lambda: "probe run" in a.log() and "done" in a.log(), what="the probe run", timeout_s=60)
        spooled = _spooled(a.dir / "spool.sqlite")
        if kept is None:  # the byte cap: as many of the newest rows as fit
            with sqlite3.connect(a.dir / "spool.sqlite") as db:
                size = db.execute("SELECT SUM(LENGTH(row)) FROM results").fetchone()[0]
            assert size <= cap["spool_max_bytes"] and 0 < len(spooled) < rows
            kept = len(spooled)
        assert len(spooled) == kept
        assert [r["value"] for r in spooled] == [100.0 + i for i in range(rows - kept, rows)]  # the newest
        text = _metrics(a)
        assert f"straggler_agent_spool_dropped_results_total {float(rows - kept)}" in text, text
        assert f"dropped the {rows - kept} oldest results" in a.log()
        print(f"spool cap {cap}: {rows} results spooled, {kept} newest kept, {rows - kept} dropped and counted")
        assert a.stop() == 0
    finally:
        a.close()


def _mount_namespaces() -> bool:
    try:
        return (
            subprocess.run(
                ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_full_spool_disk_is_an_error_line_and_a_busy_node_not_a_crash(tmp_path):
    if not _mount_namespaces():
        skip_or_fail("no mount namespace here (needs root): cannot make a small full filesystem for the spool")
    sp = tmp_path / "node-s" / "sp"
    sp.mkdir(parents=True)
    a = AgentProcess(
        tmp_path,
        "node-s",
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        env={"FAKE_SCAN_ROWS": "3000"},
        spool_path=sp / "spool.sqlite",
    )
    # the spool's directory: a 256 KB tmpfs, filled up once the spool exists; the probe output beside
    # it (agent-scans/) on a larger one, so that the probe runs and the spool is what cannot grow
    a.prefix = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        f"mount -t tmpfs -o size=256k tmpfs {sp} && mkdir {sp}/agent-scans && "
        f"mount -t tmpfs -o size=64m tmpfs {sp}/agent-scans && "
        f"(while [ ! -e {sp}/spool.sqlite-wal ]; do sleep 0.1; done; sleep 1; "
        f"head -c 1000000 /dev/zero > {sp}/filler 2>/dev/null; touch {sp}/agent-scans/full) & "
        'exec "$@"',
        "sh",
    ]
    try:
        a.start()
        # the filler is written inside the agent's mount namespace: its mark is on the big tmpfs,
        # which the test cannot see either; wait for the agent to have been up for the filler's time
        wait_until(lambda: "/metrics on http" in a.log(), what="the agent up")
        import time

        time.sleep(2.0)
        a.signal(signal.SIGUSR1)
        wait_until(lambda: "cannot spool the results" in a.log(), what="the spool error", timeout_s=60)
        line = next(ln for ln in a.log().splitlines() if "cannot spool the results" in ln)
        assert "OperationalError: database or disk is full" in line, line
        assert "Traceback" not in a.log()
        text = _metrics(a)
        assert 'straggler_agent_spool_errors_total{kind="full"} 1.0' in text, text
        a.signal(signal.SIGUSR1)  # the node is busy while the spool cannot take results
        wait_until(
            lambda: "probe requested but the node is busy: spool unusable (full)" in a.log(),
            what="the busy reason",
            timeout_s=30,
        )
        assert a.proc.poll() is None
        assert a.stop() == 0
    finally:
        a.close()
