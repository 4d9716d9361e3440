"""Show-test: a real slowdown on one core is flagged, on exactly that device; none is flagged without it.

The cause is real: busy processes pinned with sched_setaffinity to the core of the last worker,
which then gets about a third of its core. No timer is faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

CORES = sorted(os.sched_getaffinity(0))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)")]
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def run_scan(straggler_cmd) -> tuple[int, dict]:
    proc = subprocess.run([*straggler_cmd, "scan", "--json", "--probes", "matmul,membw", "--duration", "2"],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def flagged(doc: dict) -> set[str]:
    return {d["gpu"] for d in doc["devices"] if d["straggler"]}


def test_busy_core_is_flagged_and_only_it(straggler_cmd):
    slow = CORES[-1]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY, str(slow)]) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert all(p.poll() is None for p in busy)
        code, doc = run_scan(straggler_cmd)
    finally:
        for p in busy:
            p.kill()
            p.wait(timeout=10)
    assert flagged(doc) == {f"cpu{slow}"} and code == 1
    dev = next(d for d in doc["devices"] if d["gpu"] == f"cpu{slow}")
    assert dev["verdict"] == "straggler" and "matmul" in dev["reason"]
    assert dev["probes"]["matmul"]["ratio"] < 0.8  # about a third of a core against a whole one


def test_without_the_slowdown_nothing_is_flagged(straggler_cmd):
    code, doc = run_scan(straggler_cmd)
    assert flagged(doc) == set() and code == 0
    assert len(doc["devices"]) == len(CORES)
