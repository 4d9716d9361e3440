"""benchmarks/gpu_check.py: its pure parts, and the whole script run on the CPU cores (the GPU path
is the same code with CUDA devices; it runs where a GPU is lent)."""

from __future__ import annotations

import importlib.util
import json
import queue
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, kill_group, scan_timeout_s
from cpushield import cpu_shield

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _rows(gpu, probe, values):
    return [{"gpu": gpu, "probe": probe, "value": v} for v in values]


def test_run_to_run_cv_and_ratios():
    runs = [
        _rows("g0", "matmul", [700, 710, 705]) + _rows("g0", "membw", [2900, 2950]),
        _rows("g0", "matmul", [702, 706, 704]) + _rows("g0", "membw", [2700, 2700]),
        _rows("g0", "matmul", [706, 708, float("nan")]) + _rows("g0", "membw", [2800]),
    ]
    stats = gpu_check.run_to_run(runs)
    assert stats[("g0", "matmul")]["medians"] == [705, 704, 707.0]
    assert stats[("g0", "matmul")]["cv"] == pytest.approx(1.5275252 / 705.333333, rel=1e-6)
    rows = gpu_check.compare(stats, {"g0": {"gemm": {"value": 740.0}, "copy": {"value": 3000.0}}})
    mm = next(r for r in rows if r["probe"] == "matmul")
    assert mm["ratio"] == pytest.approx(705.333333 / 740) and mm["ratio_ok"] is True and mm["cv_ok"] is True
    bw = next(r for r in rows if r["probe"] == "membw")
    assert bw["ratio"] == pytest.approx(2808.333333 / 3000) and bw["ratio_ok"] is True
    assert bw["cv_ok"] is False  # 3.6% run to run
    assert gpu_check.exit_code(rows, []) == 1 and gpu_check.exit_code(rows, [{"step": "x"}]) == 2
    table = gpu_check.render(rows)
    assert "MISSED" in table and "0.953" in table
    single = gpu_check.run_to_run(runs[:1])
    assert single[("g0", "matmul")]["cv"] is None  # one run: no CV, not 0
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def run_by_steps(cmd: list[str], step_limit_s: float, **kw) -> subprocess.CompletedProcess:
    """Run gpu_check, waiting as long as its steps take: it prints ``[gpu_check] <step>: N s`` after
    each step, and the test fails only when no step has ended for ``step_limit_s`` (then the process
    group is killed)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    lines: queue.Queue = queue.Queue()
    stdout: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put(None)], daemon=True).start()
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    err, last = [], time.monotonic()
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, last + step_limit_s - time.monotonic()))
            except queue.Empty:
                pytest.fail(
                    f"gpu_check: no step ended for {step_limit_s:.0f} s (the longest a step may take: "
                    f"a scan by its own deadline); stderr so far: {''.join(err)[-2000:]}"
                )
            if line is None:
                break
            err.append(line)
            if line.startswith("[gpu_check] "):
                last = time.monotonic()
        proc.wait()
        reader.join()
    finally:
        kill_group(proc)
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(stdout), "".join(err))


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out, fixtures = tmp_path / "out", tmp_path / "fixtures"
    # the longest step is one full scan (matmul, membw, allreduce for 1 s each, 5 samples); inside
    # the CPU shield outside load cannot make a core's ceiling and its scan differ (tests/cpushield.py)
    with cpu_shield() as (shield, _):
        proc = run_by_steps(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "gpu_check.py"),
                "--device",
                "cpu",
                "--runs",
                "2",
                "--duration",
                "1",
                "--ceiling-seconds",
                "1",
                "--record-seconds",
                "1",
                "--out",
                str(out),
                "--fixtures-dir",
                str(fixtures),
                "--no-pytest",
            ],
            scan_timeout_s(("matmul", "membw", "allreduce"), 1.0),
            preexec_fn=shield.enter if shield else None,
        )
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["errors"] == [] and len(doc["runs"]) == 2
    probes = {(r["gpu"], r["probe"]) for r in doc["rows"]}
    assert {p for _, p in probes} == {"matmul", "membw", "allreduce"}
    for r in doc["rows"]:
        assert r["runs"] == 2 and r["cv"] is not None
        if r["probe"] in ("matmul", "membw"):
            assert 0.3 < r["ratio"] < 3  # the ceiling was measured, on the same core, the same way
    # telemetry fixtures recorded, replayable by the fake backend
    from straggler.probes.fakenvml import FakeBackend

    for f in fixtures.iterdir():
        fake = FakeBackend(str(f))
        assert fake.device_count() >= 1 and fake.read(0).uuid == "cpu0"
    assert len(list((out / "raw").glob("*-matmul.json"))) >= 2  # raw timings kept for the parser tests
    assert "ceiling" in (out / "gpu_check.txt").read_text()
