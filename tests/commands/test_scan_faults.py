"""Faults during a real scan: a worker that dies or fails, an NVML error mid-run (a worker that
hangs and the scan deadline are in test_scan_hang.py). Each: one line on stderr, exit code 2, and every sample already measured is kept (in
--output and in --json). Faults are injected through STRAGGLER_FAULT (probes/faults.py) and the
fake telemetry backend's recorded scenario."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cmd, scan_timeout_s

from straggler.records import read_table

CORES = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CORES) < 2, reason="needs at least 2 CPU cores (one worker each)")


def faulty_scan(straggler_cmd, tmp_path, env, *args):
    out = tmp_path / "kept.csv"
    proc = run_cmd(
        [*straggler_cmd, "scan", "--json", "--duration", "1", "--samples", "2", "--output", str(out), *args],
        scan_timeout_s(("matmul", "membw", "allreduce"), 1.0, 2),
        env={**os.environ, **env},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    doc = json.loads(proc.stdout)
    df = read_table(out)
    assert len(df) == len(doc["samples"])  # --output and --json keep the same samples
    kept = {(g, p) for g, p in zip(df["gpu"], df["probe"])}
    return lines[0], doc, kept


def test_worker_that_dies_is_reported_with_its_exit_code(straggler_cmd, tmp_path):
    line, doc, kept = faulty_scan(straggler_cmd, tmp_path, {"STRAGGLER_FAULT": "die:rank0:allreduce"})
    dead = f"cpu{CORES[0]}"
    assert f"{dead} allreduce: worker died (exit code 70) during allreduce" in line
    assert {(f"cpu{c}", p) for c in CORES for p in ("matmul", "membw")} <= kept
    assert not any(p == "allreduce" for _, p in kept)


def test_probe_error_on_one_worker_keeps_the_rest(straggler_cmd, tmp_path):
    line, doc, kept = faulty_scan(straggler_cmd, tmp_path, {"STRAGGLER_FAULT": "raise:rank1:matmul"})
    assert "matmul: RuntimeError: injected fault in matmul on rank 1" in line
    assert (f"cpu{CORES[1]}", "matmul") not in kept
    # a per-device probe failing does not stop that worker's later probes nor its peers
    assert {(f"cpu{c}", p) for c in CORES for p in ("membw", "allreduce")} <= kept
    assert len(doc["failures"]) == 1


def test_nvml_error_mid_run(straggler_cmd, tmp_path):
    # the recorded scenario: telemetry device 1 cannot be read on reads 6-8
    line, doc, kept = faulty_scan(
        straggler_cmd, tmp_path, {"STRAGGLER_TELEMETRY": "fake:nvml_error_mid_run"}, "--device", "cpu"
    )
    assert "telemetry:" in line and "reading(s) failed during the probe" in line
    assert "fake:nvml_error_mid_run" in doc["notice"]
    (f,) = doc["failures"]
    assert f["rank"] == 1 and f["probe"] == "matmul"
    assert {(f"cpu{c}", p) for c in CORES for p in ("matmul", "membw", "allreduce")} <= kept
    # the replayed NVML values travel with the samples; the failed readings are simply missing
    assert any(s["power_w"] and s["power_w"] > 500 for s in doc["samples"])


def test_a_crash_after_a_reported_error_is_still_reported(straggler_cmd, tmp_path):
    # rank 1 reports a matmul error and carries on, then dies in membw: both must be in the report
    line, doc, kept = faulty_scan(straggler_cmd, tmp_path, {"STRAGGLER_FAULT": "raise:rank1:matmul,die:rank1:membw"})
    errors = {(f["probe"], f["error"].split(" (")[0]) for f in doc["failures"] if f["rank"] == 1}
    assert ("matmul", "RuntimeError: injected fault in matmul on rank 1") in errors
    assert any(p == "membw" and e.startswith("worker died") for p, e in errors), doc["failures"]
    assert (f"cpu{CORES[0]}", "membw") in kept


def test_a_parser_crash_fails_that_probe_only(straggler_cmd, tmp_path):
    # rank 1's matmul timings come back without their batches: its parser raises on them
    line, doc, kept = faulty_scan(
        straggler_cmd, tmp_path, {"STRAGGLER_FAULT": "corrupt:rank1:matmul"}, "--probes", "matmul,membw"
    )
    (f,) = doc["failures"]
    assert (f["rank"], f["probe"], f["device"]) == (1, "matmul", f"cpu{CORES[1]}")
    assert f["error"] == "cannot parse its raw timings: KeyError: 'batches'"
    assert f"cpu{CORES[1]} matmul: cannot parse its raw timings" in line
    # the worker went on with its next probe; its peer lost nothing
    assert kept == {(f"cpu{c}", p) for c in CORES for p in ("matmul", "membw")} - {(f"cpu{CORES[1]}", "matmul")}


def test_a_scan_that_measured_nothing_writes_a_readable_table(straggler_cmd, tmp_path):
    fault = ",".join(f"raise:rank{r}:matmul" for r in range(len(CORES)))
    line, doc, kept = faulty_scan(straggler_cmd, tmp_path, {"STRAGGLER_FAULT": fault}, "--probes", "matmul")
    assert doc["samples"] == [] and kept == set()
    assert "injected fault in matmul" in line and f"kept in {tmp_path / 'kept.csv'}" in line
    df = read_table(tmp_path / "kept.csv")
    assert len(df) == 0 and {"host", "gpu", "probe", "value"} <= set(df.columns)
