"""SIGTERM (what an agent or systemd sends at a deadline) stops a local scan cleanly: the workers
are killed, the samples already measured are written, one line on stderr, exit code 2."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from straggler.records import read_table

CORES = sorted(os.sched_getaffinity(0))


def test_sigterm_keeps_what_was_measured(straggler_cmd, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "kept.csv"
    env = {**os.environ, "STRAGGLER_RAW_DIR": str(raw), "STRAGGLER_FAULT": "hang:rank0:membw"}
    proc = subprocess.Popen(
        [*straggler_cmd, "scan", "--probes", "matmul,membw", "--duration", "1", "--samples", "2", "--output", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 60
        while len(list(raw.glob("*-matmul.json"))) < len(CORES) and time.monotonic() < end:
            time.sleep(0.1)  # wait until every worker has finished matmul (raw timings kept)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    (line,) = err.strip().splitlines()
    assert "scan stopped by SIGTERM" in line
    df = read_table(out)
    assert set(df["probe"]) == {"matmul"} and len(df) == len(CORES) * 2
