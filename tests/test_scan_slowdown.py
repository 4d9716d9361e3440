"""Show-test: a real slowdown on one core is flagged, on exactly that device; none is flagged without it.

The cause is real: busy processes pinned with sched_setaffinity to the core of the last worker,
which then gets about a third of its core. No timer is faked.

Both tests scan with the matmul probe only. A CPU core's copy bandwidth is no property of the core on
this kind of VM: measured side by side (64 MiB copies, both cores at once), one core got 40 GB/s and
the other 20 GB/s, and which core was slower changed from run to run. The compute rate is stable to
a percent or two, so it is what these show-tests judge.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import psutil
import pytest

CORES = sorted(os.sched_getaffinity(0))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)")]
# Cores used by other processes during a scan above which the comparison is not made. Below a
# tenth of a core, even all of it on one core cannot make the 10% deficit that a pair of devices
# needs to be flagged (analysis min_effect_few); with nothing else running it stays well under.
QUIET_CORES = 0.1
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def run_scan(straggler_cmd, ours: list | None = None) -> tuple[int, dict, float]:
    """(exit code, --json document, CPU cores used meanwhile by processes other than this test,
    the scan and ``ours``)."""
    ours = [psutil.Process(p.pid) for p in ours or []]
    busy0, kids0, wall0 = _machine_busy_s(), _children_s() + _cpu_s(ours), time.monotonic()
    proc = subprocess.run([*straggler_cmd, "scan", "--json", "--probes", "matmul", "--duration", "2"],
                          capture_output=True, text=True, timeout=90)
    mine = _children_s() + _cpu_s(ours) - kids0
    others = (_machine_busy_s() - busy0 - mine) / (time.monotonic() - wall0)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout), others


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def _cpu_s(procs: list) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def _children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


def flagged(doc: dict) -> set[str]:
    return {d["gpu"] for d in doc["devices"] if d["straggler"]}


def test_busy_core_is_flagged_and_only_it(straggler_cmd):
    slow = f"cpu{CORES[-1]}"
    busy = [subprocess.Popen([sys.executable, "-c", BUSY, str(CORES[-1])]) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert all(p.poll() is None for p in busy)
        for _ in range(2):  # other processes on this shared machine may slow other cores too
            code, doc, others = run_scan(straggler_cmd, ours=busy)
            if others <= QUIET_CORES:
                break
    finally:
        for p in busy:
            p.kill()
            p.wait(timeout=10)
    if others > QUIET_CORES:
        # the scheduler moves other processes' work off the busy core onto the others, which then
        # slow down as much: the comparison this test is about cannot be made on a busy machine
        pytest.skip(f"machine busy: other processes used {others:.2f} cores during each of 2 scans")
    dev = next(d for d in doc["devices"] if d["gpu"] == slow)
    assert dev["straggler"] and dev["verdict"] == "straggler" and "matmul" in dev["reason"] and code == 1
    assert dev["probes"]["matmul"]["ratio"] < 0.8  # about a third of a core against a whole one
    assert flagged(doc) == {slow}, doc["devices"]  # exactly that device
