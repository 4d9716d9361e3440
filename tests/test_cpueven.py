"""The side-by-side core check the healthy show-tests lean on (tests/cpueven.py): a core slowed for
real measures slow, and flags on it are tried again and then accepted with a warning; flags on a
core that measured even are tried again, and the third fails the test. The counting is checked with
given side-by-side rates (the measurement itself is the first test's)."""

from __future__ import annotations

import subprocess
import sys
import time

import cpueven
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
            # unexplained=1: a flag on a core that measured even would fail here, so the warning says
            # that the busy core measured slow side by side in both attempts
            with pytest.warns(UserWarning, match="slow side by side too") as warned:
                result = until_even(
                    lambda: calls.append(1) or "scan", lambda r: {slow}, CORES, shield, attempts=2, unexplained=1
                )
        finally:
            for p in busy:
                p.kill()
                p.wait(timeout=10)
    assert result == "scan" and len(calls) == 2
    assert str(warned[0].message).count("'on even cores': []") == 2, warned[0].message


def _given_rates(monkeypatch, *measurements: dict) -> None:
    """Side-by-side rates, one per measurement (two an attempt that flags: before and after)."""
    it = iter(measurements)
    monkeypatch.setattr(cpueven, "core_rates", lambda cores, shield=None: next(it))


EVEN_RATES, CPU1_SLOW = {"cpu0": 100.0, "cpu1": 99.0}, {"cpu0": 100.0, "cpu1": 50.0}


def test_a_flag_on_a_core_that_measured_even_is_tried_again_and_the_third_fails(monkeypatch):
    calls = []
    _given_rates(monkeypatch, *[EVEN_RATES] * 6)
    with pytest.raises(AssertionError, match=r"3 attempts flagged a device although side by side its core"):
        until_even(lambda: calls.append(1), lambda r: {"cpu1"}, [0, 1], describe=lambda r: "ratios")
    assert len(calls) == 3
    # a slowdown shorter than the scan: flagged once, then clean
    _given_rates(monkeypatch, *[EVEN_RATES] * 3)
    flags = iter([{"cpu1"}, set()])
    assert until_even(lambda: calls.append(1) or "ok", lambda r: next(flags), [0, 1]) == "ok" and len(calls) == 5


def test_confirmed_flags_do_not_count_towards_the_unexplained_ones(monkeypatch):
    # attempt 1: cpu1 slow side by side (confirmed); attempts 2 and 3: even (unexplained); 4: clean
    _given_rates(monkeypatch, CPU1_SLOW, CPU1_SLOW, *[EVEN_RATES] * 5)
    flags = iter([{"cpu1"}, {"cpu1"}, {"cpu1"}, set()])
    assert until_even(lambda: "scan", lambda r: next(flags), [0, 1]) == "scan"
    # slow before or after is enough; then three unexplained ones fail, at the fourth attempt
    _given_rates(monkeypatch, EVEN_RATES, CPU1_SLOW, *[EVEN_RATES] * 6)
    flags = iter([{"cpu1"}] * 4)
    with pytest.raises(AssertionError, match="'on even cores': \\[\\]"):
        until_even(lambda: "scan", lambda r: next(flags), [0, 1])
    with pytest.raises(ValueError, match="need 1 <= unexplained <= attempts"):
        until_even(lambda: "scan", lambda r: set(), [0, 1], attempts=2, unexplained=3)
