"""`straggler scan` end to end on this machine: real workers pinned to real cores, real gloo."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pandas as pd
import pytest

from straggler.records import read_table

CORES = sorted(os.sched_getaffinity(0))


def scan(straggler_cmd, *args, timeout=90, env=None):
    return subprocess.run([*straggler_cmd, "scan", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_json_output_scan_id_and_start_at(straggler_cmd, tmp_path):
    # After the workers' start-up and warm-up, and longer than a probe phase may last (2 x 1 s + 10 s
    # grace): waiting for the start instant is not a hang.
    start_at = time.time() + 18
    out = tmp_path / "s.parquet"
    proc = scan(straggler_cmd, "--json", "--probes", "matmul,allreduce", "--duration", "1", "--samples", "3",
                "--scan-id", "test-scan-1", "--start-at", str(start_at), "--output", str(out))
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["scan_id"] == "test-scan-1" and doc["backend"] == "cpu" and doc["failures"] == []
    assert "no CUDA GPU visible" in doc["notice"]
    assert [d["gpu"] for d in doc["devices"]] == [f"cpu{c}" for c in CORES]
    for d in doc["devices"]:
        assert set(d["probes"]) == {"matmul", "allreduce"}
        assert d["verdict"] in ("healthy", "straggler") and d["reason"]
        assert d["probes"]["matmul"]["n_samples"] == 3 and d["probes"]["matmul"]["unit"] == "GFLOP/s"
        assert d["telemetry"]["arrival_skew_s"] is not None and d["telemetry"]["arrival_skew_s"] >= 0
    assert proc.returncode == (1 if any(d["straggler"] for d in doc["devices"]) else 0)
    df = read_table(out)
    assert len(df) == len(doc["samples"]) == len(CORES) * 2 * 3
    assert (df["scan_id"] == "test-scan-1").all()
    assert (df["ts"] - df["duration_s"] >= start_at - 0.05).all()  # nothing measured before --start-at
    ar = df[df["probe"] == "allreduce"]
    assert ar["value"].to_numpy() == pytest.approx(ar["algbw_gbps"].to_numpy() * 2 * (len(CORES) - 1) / len(CORES))


@pytest.mark.parametrize("args, message", [
    (["--probes", "matmul,gemm"], "unknown probe 'gemm'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda"], "no CUDA GPU visible"),  # zero devices
    (["--output", "x.xlsx"], "unknown file type '.xlsx'"),
    (["--duration", "-1"], "--duration must be > 0"),
    (["--probes", "pcie", "--device", "cpu"], "nothing to run: pcie skipped: GPU only"),
    (["--token-file", "t"], "--token-file needs --collector"),
    (["--samples", "0"], "samples must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(straggler_cmd, tmp_path, args, message):
    proc = subprocess.run([*straggler_cmd, "scan", *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_telemetry_fixture_fails_before_any_worker(straggler_cmd, tmp_path):
    proc = subprocess.run([*straggler_cmd, "scan", "--output", "x.csv"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "STRAGGLER_TELEMETRY": "fake:no_such_scenario"})
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "no_such_scenario" in line
    assert not list(tmp_path.iterdir())


def test_output_rows_are_canonical(straggler_cmd, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = scan(straggler_cmd, "--probes", "membw", "--duration", "1", "--samples", "2", "--output", str(out))
    assert proc.returncode in (0, 1), proc.stderr
    df = pd.read_json(out, lines=True)
    for col in ("ts", "scan_id", "host", "gpu", "index", "model", "probe", "settings", "sample", "duration_s",
                "value", "unit"):
        assert df[col].notna().all(), col
    assert set(df["unit"]) == {"GB/s"} and set(df["sample"]) == {0, 1}
    assert set(df["index"]) == set(CORES)
