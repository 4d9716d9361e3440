"""Orphans and reloads (issue 10, item 7): a probe child whose agent was killed is ended at the next
start (pid file + process start time), and no second probe starts beside it; a type error in the
config does not hide the other problems (at --check and at SIGHUP); a token HTTP cannot carry is
refused at the start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import run_cmd
from test_agent_support import AgentProcess, wait_until, write_fake_scan


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_an_orphaned_probe_child_is_ended_at_the_next_start_and_no_second_probe_runs_beside_it(tmp_path):
    a = AgentProcess(
        tmp_path,
        "node-o",
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        env={"FAKE_SCAN_MODE": "hang"},
    )
    child = None
    try:
        a.start()
        a.signal(signal.SIGUSR1)
        work = a.dir / "agent-scans"
        wait_until(lambda: list(work.glob("*.jsonl.args")), what="the probe child running")
        child = int(
            subprocess.run(["pgrep", "-f", "--", f"--output {work}"], capture_output=True, text=True).stdout.split()[0]
        )
        scan_id = next(work.glob("*.jsonl.args")).name.removesuffix(".jsonl.args")
        a.kill()  # kill -9: the child, in its own session, lives on
        assert _alive(child)
        a.settings["probe_every_s"] = 3600  # the restarted agent would probe at once if it could
        a.config.write_text(a.config.read_text().replace("probe_every_s = 0", "probe_every_s = 3600"))
        a.start()
        wait_until(lambda: "ended the orphaned probe child" in a.log(), what="the orphan ended", timeout_s=30)
        assert f"ended the orphaned probe child (pid {child}) of the interrupted run {scan_id}" in a.log()
        assert not _alive(child)
        log = a.log().split("ended the orphaned probe child", 1)
        assert log[0].count("started (killed after") == 1  # the first agent's; none beside the orphan
        assert "recovered 2 results of the interrupted probe run" in a.log()
        assert a.stop() == 0
    finally:
        a.close()
        left = subprocess.run(
            ["pgrep", "-f", "--", f"--output {a.dir / 'agent-scans'}"], capture_output=True, text=True
        )
        for pid in {*map(int, left.stdout.split()), *([child] if child else [])}:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_a_recycled_pid_is_not_taken_for_the_orphan(tmp_path):
    """The pid file names a pid that now belongs to another process (another start time): untouched."""
    from straggler.agent import orphan

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        work = tmp_path / "agent-scans"
        work.mkdir()
        (work / orphan.PID_FILE).write_text(json.dumps({"pid": other.pid, "start_ticks": "1", "scan_id": "s"}))
        assert orphan.end_orphan(work, 1.0) == (None, None)
        assert other.poll() is None and not (work / orphan.PID_FILE).exists()
    finally:
        other.kill()
        other.wait()


def _check(tmp_path, text: str, *extra) -> subprocess.CompletedProcess:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    return run_cmd(
        [sys.executable, "-m", "straggler", "agent", "--config", str(cfg), "--listen-port", "0", "--check", *extra],
        timeout_s=120,
        cwd=tmp_path,
    )


def test_a_type_error_does_not_hide_the_other_problems(tmp_path):
    out = _check(
        tmp_path,
        f'interval_s = "fast"\nidle_util_pct = 500\nprobe_device = "tpu"\nspool_path = "{tmp_path / "s.sqlite"}"\n',
    )
    assert out.returncode == 2
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for part in (
        "interval_s: expected a number, got 'fast'",
        "idle_util_pct: must be 0..100",
        "probe_device: 'tpu' is not auto, cpu or cuda",
    ):
        assert part in err, err
    assert "interval_s: must be > 0" not in err  # the bad type is reported once, not also its range


def test_a_token_http_cannot_carry_is_refused_at_the_start(tmp_path):
    token = tmp_path / "token"
    token.write_text("s\u00e9cret\n", encoding="utf-8")
    out = _check(
        tmp_path,
        f'collector_url = "http://127.0.0.1:9"\ntoken_file = "{token}"\nspool_path = "{tmp_path / "s.sqlite"}"\n',
    )
    assert out.returncode == 2, out
    assert out.stderr.strip().endswith(
        f"token_file: {token} holds characters other than printable ASCII (an HTTP header cannot carry them)"
    ), out.stderr
