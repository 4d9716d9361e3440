"""The README's main command on this machine: every probe on every core, within 60 s a round."""

from __future__ import annotations

import os
import re
import time

import pytest
from conftest import run_cmd, scan_timeout_s

from straggler.records import read_table
from straggler.remeasure import DEFAULT_MAX_ROUNDS, ROUND_SAMPLES_FACTOR

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.slow
def test_readme_main_command_scans_every_core_within_60s(straggler_cmd, tmp_path):
    # The README's main command, default settings (every probe, every core); 60 s is the bound
    # for it on this 2-core machine. A device still undecided after the first round is measured again
    # (docs/scan.md "Re-measurement"): each round is held to the same 60 s, plus its probing beyond the
    # first round's.
    out = tmp_path / "samples.csv"
    t0 = time.monotonic()
    proc = run_cmd(
        [*straggler_cmd, "scan", "--output", str(out)],
        DEFAULT_MAX_ROUNDS * scan_timeout_s(("matmul", "membw", "allreduce"), 4.0 * ROUND_SAMPLES_FACTOR),
    )
    wall_s = time.monotonic() - t0
    # 2 only for "could not decide" (no straggler, a device undecided: a VM's cores vary run to run)
    assert proc.returncode in (0, 1) or proc.stderr.startswith("straggler: error: could not decide: "), proc.stderr
    assert "device cpu" in proc.stdout and "pcie skipped: GPU only" in proc.stdout
    for core in CORES:
        assert f"cpu{core}" in proc.stdout
    rounds = int(re.search(rf"rounds: (\d+) of at most {DEFAULT_MAX_ROUNDS} \(", proc.stdout).group(1))
    df = read_table(out)
    assert set(df["gpu"]) == {f"cpu{c}" for c in CORES}
    counts = df.groupby(["gpu", "probe"]).size()
    assert set(df["probe"]) == {"matmul", "membw", "allreduce"}
    if rounds == 1:
        assert (counts == 5).all()  # five samples per device and probe by default
    else:
        assert (counts >= 5).all() and counts.groupby("probe").nunique().eq(1).all()  # every device each round
    assert (df["value"] > 0).all() and df["scan_id"].nunique() == 1
    assert df["sm_clock_mhz"].notna().any()  # CPU telemetry travelled with the samples
    later = df[df["sample"] >= 5].groupby("probe")["duration_s"].sum() / len(CORES)  # re-measurement probing
    assert wall_s <= 60 * rounds + later.sum(), f"{wall_s:.0f} s for {rounds} round(s)"
