"""Show-test, the other half of test_scan_slowdown.py: without a slowdown the scan flags nothing."""

from __future__ import annotations

import pytest
from test_scan_slowdown import CORES, QUIET_CORES, flagged, run_scan

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)")]


def test_without_the_slowdown_nothing_is_flagged(straggler_cmd):
    # Other work on this shared machine slows cores for real, and the scan rightly flags them; the
    # claim is about a quiet machine, so a scan during which other processes used more than a
    # tenth of a core is repeated (up to 3 times), then the test is skipped saying why.
    for _ in range(3):
        code, doc, others = run_scan(straggler_cmd)
        if others <= QUIET_CORES:
            break
    else:
        pytest.skip(f"machine busy: other processes used {others:.2f} cores during each of 3 scans")
    assert flagged(doc) == set() and code == 0, doc["devices"]
    assert len(doc["devices"]) == len(CORES)
