"""Faults that need a deadline: a worker that hangs, and the scan's --deadline (the other faults are
in test_scan_faults.py). Each: one line on stderr, exit code 2, every sample already measured kept."""

from __future__ import annotations

import os

import pytest
from test_scan_faults import faulty_scan

CORES = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)")


def test_worker_that_hangs_is_killed_and_the_others_reported(straggler_cmd, tmp_path):
    line, doc, kept = faulty_scan(straggler_cmd, tmp_path, {"STRAGGLER_FAULT": "hang:rank1:membw"})
    hung = f"cpu{CORES[1]}"
    assert f"{hung} membw: hung: no progress for" in line and "killed" in line
    first = doc["failures"][0]
    assert (first["device"], first["probe"], first["rank"]) == (hung, "membw", 1)
    # everything measured before the hang is kept, and the healthy worker's membw too
    assert (hung, "matmul") in kept and (f"cpu{CORES[0]}", "membw") in kept
    assert (hung, "membw") not in kept
    verdicts = {d["gpu"]: d["verdict"] for d in doc["devices"]}
    assert verdicts[hung] == "failed"
    # the peer could not run the collective once its partner was killed: said so, not hidden
    assert any(f["rank"] == 0 and f["error"].startswith("not run:") for f in doc["failures"])


def test_scan_deadline_keeps_what_was_measured(straggler_cmd, tmp_path):
    line, doc, kept = faulty_scan(straggler_cmd, tmp_path, {"STRAGGLER_FAULT": "hang:rank0:membw,hang:rank1:membw"},
                                  "--deadline", "8")
    assert "scan deadline of 8 s reached, killed" in line
    assert {(f"cpu{c}", "matmul") for c in CORES} <= kept
    assert len(doc["failures"]) == len(CORES)
