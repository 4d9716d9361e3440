"""Whether this machine's cores are even right now, measured side by side without straggler's code.

The CPU shield (cpushield.py) keeps other processes' load off a test's cores, but a shielded core can
still be slow: on a cloud VM a vCPU can share its physical core with another tenant's hyperthread, or
run at a lower clock, and neither shows inside the guest as load or steal time. Seen in CI: with the
outside load at 0.02 cores, a scan with no slowdown measured cpu1 at 0.82x and cpu0 at 1.22x of their
median (0.67x of each other), and flagged cpu1. The scan was right about the machine; a show-test
that claims "nothing is flagged without a slowdown" was not about that machine at that moment.

So such a test measures the cores side by side just before and just after its scan: one process
pinned to each core, the matmul probe's kind of work (an fp32 1024x1024 matrix product on one BLAS
thread, numpy's: it starts in a fraction of torch's import time), all started at the same instant.
:func:`until_even` then

- returns the first attempt that flags nothing (the claim shown);
- tries again after an attempt whose every flagged device's core also measured slow side by side
  (a true finding about the machine, not about the program);
- tries again after an attempt that flags a device whose core measured even both before and after
  (unexplained), and fails the test at the ``unexplained``-th such attempt (3 by default). Seen in
  CI: cpu1 flagged, its core at 0.98 and 1.00 of the other's just before and just after the scan: a
  slowdown shorter than the scan, which a measurement at another moment cannot see. What this still
  catches: a program that flags a healthy device in most attempts (a worker pinned to the wrong
  core, a rate computed wrongly). What it mostly misses: one that flags a healthy device now and
  then (in a third of the attempts, the test fails about 1 time in 27); the statistics' own false
  positives are tested in tests/analysis/test_analysis.py (healthy fleets flag nothing, transient
  dips in single samples do not flag), not on a 2-core machine in CI;
- after ``attempts`` attempts that each flagged something, returns the last one with a warning
  listing every attempt: every flag was either checked against an independent measurement that
  found its core slow, or was one of fewer than ``unexplained`` unexplained ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Callable, TypeVar

# A core measured below this share of the fastest core is slow. The scan flags one of two devices when
# it is 10% below their median (analysis min_effect_few), i.e. below 0.82x of the other core; 0.9 leaves
# room for the side-by-side measurement's own noise.
EVEN = 0.9
RATE = """\
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
import numpy as np
rng = np.random.default_rng(0)
a, b = rng.standard_normal((1024, 1024), dtype=np.float32), rng.standard_normal((1024, 1024), dtype=np.float32)
c = np.empty((1024, 1024), dtype=np.float32)
np.matmul(a, b, out=c)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
n = 0
while time.perf_counter() - t0 < float(sys.argv[2]):
    np.matmul(a, b, out=c)
    n += 1
print(n / (time.perf_counter() - t0), flush=True)
"""
ONE_THREAD = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
T = TypeVar("T")


def core_rates(cores: list[int], shield=None, seconds: float = 1.5) -> dict[str, float]:
    """Products per second of each core (as device names ``cpuN``), measured at the same time."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RATE, str(core), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **ONE_THREAD},
            preexec_fn=shield.enter if shield else None,
        )
        for core in cores
    ]
    try:
        for p in procs:  # every process has numpy loaded and its matrices warm
            assert p.stdout.readline().strip() == "ready", "side-by-side core measurement did not start"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = [p.communicate(timeout=60 + 10 * seconds)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {f"cpu{core}": float(o.strip()) for core, o in zip(cores, out)}


def slow_cores(rates: dict[str, float], even: float = EVEN) -> set[str]:
    fastest = max(rates.values())
    return {d for d, r in rates.items() if r < even * fastest}


def until_even(
    attempt: Callable[[], T],
    flagged: Callable[[T], set[str]],
    cores: list[int],
    shield=None,
    attempts: int = 4,
    unexplained: int = 3,
    describe: Callable[[T], object] = lambda result: None,
) -> T:
    """Run ``attempt()`` until it flags nothing (``flagged(result)`` the devices it flagged); see the
    module's docstring for what happens when it does flag. ``describe(result)`` goes into the failure
    message and the warning (the scan's ratios, say)."""
    if attempts < 1 or not 1 <= unexplained <= attempts:
        raise ValueError(
            f"until_even: attempts {attempts}, unexplained {unexplained}: need 1 <= unexplained <= attempts"
        )
    seen = []
    for _ in range(attempts):
        before = core_rates(cores, shield)
        result = attempt()
        found = flagged(result)
        if not found:
            return result
        after = core_rates(cores, shield)
        odd = found - (slow_cores(before) | slow_cores(after))
        seen.append(
            {
                "flagged": sorted(found),
                "on even cores": sorted(odd),
                "before": _share(before),
                "after": _share(after),
                "result": describe(result),
            }
        )
        assert sum(1 for s in seen if s["on even cores"]) < unexplained, (
            f"{unexplained} attempts flagged a device although side by side its core measured even "
            f"just before and just after (share of the fastest core); attempts {seen}"
        )
    warnings.warn(
        f"all {attempts} attempts flagged something; each flag was on a core that measured slow side by side "
        f"too, or one of fewer than {unexplained} unexplained ones: {seen}",
        stacklevel=2,
    )
    return result


def _share(rates: dict[str, float]) -> dict[str, float]:
    fastest = max(rates.values())
    return {d: round(r / fastest, 2) for d, r in rates.items()}
