"""Show-test, the other half of test_scan_slowdown.py: without a slowdown the scan flags nothing,
also while processes outside the test keep the machine busy (the scan runs inside the CPU shield,
see test_scan_slowdown.py)."""

from __future__ import annotations

import pytest
from cpushield import cpu_shield
from test_scan_slowdown import CORES, flagged, scans

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)"),
]


def test_without_the_slowdown_nothing_is_flagged(straggler_cmd):
    with cpu_shield() as (shield, how):
        code, doc, load = scans(straggler_cmd, shield, 3)
    seen = (how, load, [(d["gpu"], d["verdict"], d["probes"]["matmul"]["ratio"]) for d in doc["devices"]])
    assert flagged(doc) == set() and code == 0, seen
    assert len(doc["devices"]) == len(CORES)
