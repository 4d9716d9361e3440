"""The side-by-side core check the healthy show-tests lean on (tests/cpueven.py): a core slowed for
real measures slow, flags on a core that measured slow are tried again and then accepted with a
warning, one flag on a core that measured even is tried again, and the third fails the test."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from cpueven import core_rates, slow_cores, until_even
from cpushield import cpu_shield
from test_scan_slowdown import BUSY, CORES

pytestmark = [pytest.mark.slow, pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores")]


def _busy_on_last_core(shield) -> list[subprocess.Popen]:
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY, str(CORES[-1])], preexec_fn=shield.enter if shield else None)
        for _ in range(2)
    ]
    time.sleep(0.3)
    return busy


def test_a_busy_core_measures_slow_and_a_flag_on_it_is_tried_again_then_accepted():
    slow = f"cpu{CORES[-1]}"
    calls = []
    with cpu_shield() as (shield, _):
        busy = _busy_on_last_core(shield)
        try:
            rates = core_rates(CORES, shield, seconds=1.0)
            assert set(rates) == {f"cpu{c}" for c in CORES} and slow_cores(rates) == {slow}, rates
            with pytest.warns(UserWarning, match="slow side by side too"):
                result = until_even(lambda: calls.append(1) or "scan", lambda r: {slow}, CORES, shield, attempts=2)
        finally:
            for p in busy:
                p.kill()
                p.wait(timeout=10)
    assert result == "scan" and len(calls) == 2


def test_a_flag_on_a_core_that_measured_even_is_tried_again_and_the_third_fails():
    calls = []
    with cpu_shield() as (shield, _):
        # cpu99 is no core of this machine: the side-by-side check cannot have found it slow
        with pytest.raises(AssertionError, match=r"3 attempts flagged a device although side by side its core"):
            until_even(lambda: calls.append(1), lambda r: {"cpu99"}, CORES, shield, describe=lambda r: "ratios")
        assert len(calls) == 3
        # a slowdown shorter than the scan: flagged once, then clean
        flags = iter([{"cpu99"}, set()])
        assert until_even(lambda: calls.append(1) or "ok", lambda r: next(flags), CORES, shield) == "ok"
        assert len(calls) == 5
        assert until_even(lambda: calls.append(1) or "ok", lambda r: set(), CORES, shield) == "ok" and len(calls) == 6
