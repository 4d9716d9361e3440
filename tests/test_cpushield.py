"""The CPU shield the show-tests run in (tests/cpushield.py) holds: with two busy processes outside it
pinned to one core, a busy process inside it on each core still gets nearly all of its core."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
from conftest import skip_or_fail
from cpushield import cpu_shield
from test_scan_slowdown import BUSY, CORES

pytestmark = pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores")


def test_shield_keeps_outside_load_off_its_processes():
    outside = [subprocess.Popen([sys.executable, "-c", BUSY, str(CORES[-1])]) for _ in range(2)]
    try:
        with cpu_shield() as (shield, how):
            if shield is None:
                skip_or_fail(f"no CPU shield: {how}; the show-tests measure the outside load instead")
            inside = [
                subprocess.Popen([sys.executable, "-c", BUSY, str(c)], preexec_fn=shield.enter)
                for c in CORES[:1] + CORES[-1:]
            ]
            try:
                time.sleep(0.5)  # past the interpreter's start
                assert sorted(shield.pids()) == sorted(p.pid for p in inside)
                procs = [psutil.Process(p.pid) for p in inside]
                t0, w0 = [sum(p.cpu_times()[:2]) for p in procs], time.monotonic()
                time.sleep(2)
                used = [(sum(p.cpu_times()[:2]) - t) / (time.monotonic() - w0) for p, t in zip(procs, t0)]
            finally:
                for p in inside:
                    p.kill()
                    p.wait(timeout=10)
        # at the default weight the one on the outside loops' core would get a third of it
        assert min(used) > 0.9, (how, used)
    finally:
        for p in outside:
            p.kill()
            p.wait(timeout=10)
    assert not shield.path.exists()  # removed afterwards
