"""Show-test: a real slowdown on one core is flagged, on exactly that device; none is flagged without it.

The cause is real: busy processes pinned with sched_setaffinity to the core of the last worker,
which then gets about a third of its core. No timer is faked.

Both tests scan with the matmul probe only. A CPU core's copy bandwidth is no property of the core on
this kind of VM: measured side by side (64 MiB copies, both cores at once), one core got 40 GB/s and
the other 20 GB/s, and which core was slower changed from run to run. The compute rate is stable to
a percent or two, so it is what these show-tests judge.

Load from outside the test (CI on a busy machine, another suite) would slow a core for real too, and
the scan would rightly flag it. So the scan and the busy processes run inside a CPU cgroup with the
largest weight (tests/cpushield.py): outside processes then get under 4% of a core the test uses,
while inside it the busy processes take two thirds of their core from the worker as before. Where
no cgroup can be made (not root), the outside load is measured instead and a scan during which
other processes used more than QUIET_CORES is repeated; if every one was, the test skips here and
fails under CI (a skip for load must not keep CI green).
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
from conftest import run_cmd, scan_timeout_s, skip_or_fail
from cpushield import cpu_shield

CORES = sorted(os.sched_getaffinity(0))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)"),
]
# Cores used by other processes during an unshielded scan above which the comparison is not made.
# Below a tenth of a core, even all of it on one core cannot make the 10% deficit that a pair of
# devices needs to be flagged (analysis min_effect_few); with nothing else running it stays well under.
QUIET_CORES = 0.1
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
SCAN = ("scan", "--json", "--probes", "matmul", "--duration", "2")


def run_scan(straggler_cmd, shield=None, ours: list | None = None) -> tuple[int, dict, float]:
    """(exit code, --json document, CPU cores used meanwhile by processes other than this test,
    the scan and ``ours``). With a ``shield`` the scan runs inside it."""
    ours = [psutil.Process(p.pid) for p in ours or []]
    busy0, kids0, wall0 = _machine_busy_s(), _children_s() + _cpu_s(ours), time.monotonic()
    proc = run_cmd(
        [*straggler_cmd, *SCAN], scan_timeout_s(("matmul",), 2.0), preexec_fn=shield.enter if shield else None
    )
    mine = _children_s() + _cpu_s(ours) - kids0
    others = (_machine_busy_s() - busy0 - mine) / (time.monotonic() - wall0)
    assert proc.returncode in (0, 1) or proc.stderr.startswith("straggler: error: could not decide: "), proc.stderr
    return proc.returncode, json.loads(proc.stdout), others


def scans(straggler_cmd, shield, attempts: int, ours: list | None = None) -> tuple[int, dict, str]:
    """The first scan inside the shield; without one, the first of ``attempts`` scans during which
    other processes used at most QUIET_CORES (skipped here, failed under CI, if none was).
    Returns (exit code, document, how the scan was kept from outside load)."""
    for _ in range(1 if shield else attempts):
        code, doc, others = run_scan(straggler_cmd, shield, ours)
        if shield or others <= QUIET_CORES:
            break
    else:
        # the scheduler moves other processes' work onto the test's cores, which then slow down
        # for real: the comparison this test is about cannot be made on a busy machine
        skip_or_fail(
            f"machine busy: other processes used {others:.2f} cores during each of {attempts} "
            f"scans, and no CPU shield could be made"
        )
    return code, doc, f"outside load {others:.2f} cores, {'shielded' if shield else 'unshielded'}"


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
    with cpu_shield() as (shield, how):
        busy = [
            subprocess.Popen([sys.executable, "-c", BUSY, str(CORES[-1])], preexec_fn=shield.enter if shield else None)
            for _ in range(2)
        ]
        try:
            time.sleep(0.3)
            assert all(p.poll() is None for p in busy)
            code, doc, load = scans(straggler_cmd, shield, 2, ours=busy)
        finally:
            for p in busy:
                p.kill()
                p.wait(timeout=10)
    dev = next(d for d in doc["devices"] if d["gpu"] == slow)
    seen = (how, load, [(d["gpu"], d["verdict"], d["probes"]["matmul"]["ratio"]) for d in doc["devices"]])
    assert dev["straggler"] and dev["verdict"] == "straggler" and "matmul" in dev["reason"] and code == 1, seen
    assert dev["probes"]["matmul"]["ratio"] < 0.8, seen  # about a third of a core against a whole one
    assert flagged(doc) == {slow}, seen  # exactly that device
