"""Faults that need a deadline: a worker that hangs, and the scan's --deadline (the other faults are
in test_scan_faults.py). Each: one line on stderr, exit code 2, every sample already measured kept."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import run_cmd, scan_timeout_s
from test_scan_faults import faulty_scan

from straggler.probes.budget import GRACE_S

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


def matmul_done_s(doc: dict, t0: float) -> float | None:
    """Seconds from ``t0`` (Unix) until every core had measured matmul, from the samples' window ends;
    None when some core did not."""
    ends = {}
    for r in doc["samples"]:
        if r["probe"] == "matmul":
            ends[r["gpu"]] = max(ends.get(r["gpu"], 0.0), r["ts"])
    return max(ends.values()) - t0 if len(ends) == len(CORES) else None


def test_scan_deadline_keeps_what_was_measured(straggler_cmd, tmp_path):
    # Both workers hang in membw, after matmul. The deadline must come after matmul is measured on
    # every core and before the hang detector kills the hung workers (2 x duration + grace after
    # membw starts): a window of 12 s whose start depends on how fast this machine is right now. So
    # it is measured: a matmul-only scan first, and each attempt's own samples when one misses.
    window_s = 2 * 1.0 + GRACE_S
    t0 = time.time()
    ref = run_cmd(
        [*straggler_cmd, "scan", "--json", "--duration", "1", "--samples", "2", "--probes", "matmul"],
        scan_timeout_s(("matmul",), 1.0, 2),
    )
    assert ref.returncode in (0, 1) or ref.stderr.startswith("straggler: error: could not decide: "), ref.stderr
    done = matmul_done_s(json.loads(ref.stdout), t0)
    for _ in range(3):
        deadline = round(done + window_s / 4)  # the scan's clock starts after its own start-up
        t0 = time.time()
        line, doc, kept = faulty_scan(
            straggler_cmd,
            tmp_path,
            {"STRAGGLER_FAULT": "hang:rank0:membw,hang:rank1:membw"},
            "--deadline",
            str(deadline),
        )
        measured = matmul_done_s(doc, t0)
        if measured is not None and "scan deadline" in line:
            break
        # too early (matmul not measured everywhere) or too late (the hang detector came first):
        # aim at this attempt's own matmul end, or further out when it did not get that far
        done = measured if measured is not None else 2 * done
    assert f"scan deadline of {deadline} s reached, killed" in line, (deadline, line)
    assert {(f"cpu{c}", "matmul") for c in CORES} <= kept
    assert len(doc["failures"]) == len(CORES)
    assert {f["probe"] for f in doc["failures"]} == {"membw"}
