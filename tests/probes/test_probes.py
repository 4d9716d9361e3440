"""Probe parsers on recorded raw timings, and the pure decisions around them (no workers started).

The raw files in tests/data/probes/ were recorded by a real CPU scan on the development machine
(`STRAGGLER_RAW_DIR=... straggler scan --duration 2 --samples 4`).
"""

from __future__ import annotations

import io
import json
import math

import pytest
from conftest import DATA
from rich.console import Console

from straggler.errors import EXIT_FAILED, EXIT_OK, EXIT_STRAGGLERS, InputError, ProbeError
from straggler import scanverdict
from straggler.probes import allreduce, devices, faults, matmul, membw, windows
from straggler.scanview import scan_table

RAW = DATA / "probes"


def load(name: str) -> dict:
    return json.loads((RAW / name).read_text())


def test_matmul_parse_recorded_timings():
    raw = load("cpu_matmul.json")
    rows = matmul.parse(raw)
    assert [r["sample"] for r in rows] == list(range(len(raw["windows"])))
    w = raw["windows"][1]
    iters = sum(b[0] for b in w["batches"])
    secs = sum(b[1] for b in w["batches"])
    assert rows[1]["value"] == pytest.approx(iters * 2 * 1024**3 / secs / 1e9)
    assert rows[1]["unit"] == "GFLOP/s" and rows[1]["settings"] == "n=1024,dtype=fp32"
    assert rows[1]["duration_s"] == pytest.approx(w["t_end"] - w["t_start"])
    # the window's telemetry summary travels with its sample; unknown stays None, never 0
    assert rows[1]["sm_clock_mhz"] == w["telemetry"]["sm_clock_mhz"]
    assert rows[1]["power_w"] is None
    assert all(50 < r["value"] < 1000 for r in rows)  # a single AVX-512 core, fp32


def test_membw_parse_counts_read_plus_write():
    raw = load("cpu_membw.json")
    rows = membw.parse(raw)
    nbytes = int(raw["settings"].split(",")[0].split("=")[1])
    assert raw["work_per_iter"] == 2 * nbytes
    w = raw["windows"][0]
    expect = sum(b[0] for b in w["batches"]) * 2 * nbytes / sum(b[1] for b in w["batches"]) / 1e9
    assert rows[0]["value"] == pytest.approx(expect)
    assert rows[0]["unit"] == "GB/s"


def test_windowed_parse_of_synthetic_raw_is_exact():
    raw = {
        "probe": "matmul",
        "settings": "s",
        "unit": "TFLOP/s",
        "work_per_iter": 1e12,
        "scale": 1e12,
        "windows": [
            {"t_start": 10.0, "t_end": 11.0, "batches": [[4, 1.0], [4, 1.0]], "telemetry": {}},
            {"t_start": 11.0, "t_end": 12.0, "batches": [[5, 2.5]], "telemetry": {"temp_c": 70}},
            {"t_start": 12.0, "t_end": 12.0, "batches": [[1, 0.0]]},
        ],
    }
    rows = windows.parse_windows(raw)
    assert [r["value"] for r in rows[:2]] == [4.0, 2.0]
    assert math.isnan(rows[2]["value"])  # a zero-time window is unknown, not infinite or 0
    assert rows[1]["temp_c"] == 70 and rows[0]["ts"] == 11.0


def test_allreduce_parse_busbw_and_skew_from_recorded_ranks():
    r0, r1 = load("cpu_allreduce_rank0.json"), load("cpu_allreduce_rank1.json")
    rows0, rows1 = allreduce.parse(r0), allreduce.parse(r1)
    w = r0["windows"][0]
    algbw = r0["nbytes"] * len(w["secs"]) / sum(w["secs"]) / 1e9
    assert rows0[0]["algbw_gbps"] == pytest.approx(algbw)
    assert rows0[0]["value"] == pytest.approx(algbw * 2 * (2 - 1) / 2)  # nccl-tests busbw, n = 2
    # the gathered barrier waits are identical on both ranks, so the skews are consistent: for
    # each barrier exactly one rank has zero lateness (the last to arrive)
    assert w["waits"] == r1["windows"][0]["waits"]
    for a, b in zip(rows0, rows1):
        assert a["arrival_skew_s"] >= 0 and b["arrival_skew_s"] >= 0
    lateness = [max(c) - c[0] for c in zip(*w["waits"])]
    assert rows0[0]["arrival_skew_s"] == pytest.approx(sum(lateness) / len(lateness))


def test_allreduce_skew_synthetic():
    raw = {
        "probe": "allreduce",
        "settings": "s",
        "unit": "GB/s",
        "nbytes": 1e9,
        "ranks": 4,
        "rank": 2,
        "windows": [
            {"t_start": 0, "t_end": 1, "secs": [0.5, 0.5], "waits": [[0.3, 0.1], [0.2, 0.1], [0.0, 0.0], [0.3, 0.2]]}
        ],
    }
    (row,) = allreduce.parse(raw)
    assert row["algbw_gbps"] == pytest.approx(2.0)
    assert row["value"] == pytest.approx(2.0 * 2 * 3 / 4)
    assert row["arrival_skew_s"] == pytest.approx((0.3 + 0.2) / 2)  # rank 2 arrived last both times
    assert allreduce.bus_factor(8) == pytest.approx(1.75)


def test_parse_probes():
    assert devices.parse_probes("all") == devices.PROBES
    assert devices.parse_probes("allreduce, matmul") == ("matmul", "allreduce")
    with pytest.raises(InputError, match="unknown probe 'gemm'"):
        devices.parse_probes("matmul,gemm")
    with pytest.raises(InputError, match="no probe"):
        devices.parse_probes(",")


def test_resolve_devices():
    auto_cpu = devices.resolve_devices("auto", 0, {3, 1}, "torch 2.13.0+cpu")
    assert auto_cpu.kind == "cpu" and auto_cpu.indices == (1, 3)
    assert "no CUDA GPU visible to torch 2.13.0+cpu" in auto_cpu.reason
    gpu = devices.resolve_devices("auto", 8, {0, 1}, "2.13.0")
    assert gpu.kind == "cuda" and gpu.indices == tuple(range(8))
    assert devices.resolve_devices("cpu", 8, {0}, "x").kind == "cpu"
    with pytest.raises(ProbeError, match="no CUDA GPU"):
        devices.resolve_devices("cuda", 0, {0}, "x")
    with pytest.raises(ProbeError, match="no CPU core"):
        devices.resolve_devices("cpu", 0, set(), "x")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        devices.resolve_devices("tpu", 0, {0}, "x")


def test_plan_probes_drops_what_cannot_run():
    run, notes = devices.plan_probes(devices.PROBES, "cpu", 2)
    assert run == ("matmul", "membw", "allreduce") and notes == ["pcie skipped: GPU only"]
    run, notes = devices.plan_probes(("matmul", "allreduce"), "cuda", 1)
    assert run == ("matmul",) and "needs at least 2 workers" in notes[0]
    with pytest.raises(InputError, match="nothing to run"):
        devices.plan_probes(("pcie",), "cpu", 4)


def test_launcher_detection():
    assert devices.launcher({}) is None
    t = devices.launcher({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1"})
    assert (t.source, t.rank, t.world_size, t.local_rank, t.node_rank) == ("torchrun", 3, 4, 1, 1)
    s = devices.launcher({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2"})
    assert (s.source, s.rank, s.world_size, s.local_rank) == ("slurm", 5, 8, 1)
    assert devices.launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # a prolog, one task
    with pytest.raises(InputError, match="launcher environment"):
        devices.launcher({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_fault_spec_parsing():
    assert faults.parse("hang:rank1:membw, die:rank0:matmul") == {(1, "membw"): "hang", (0, "matmul"): "die"}
    assert faults.parse(None) == {} and faults.parse("") == {}
    for bad in ("hang:1:membw", "explode:rank1:membw", "hang:rank1"):
        with pytest.raises(InputError, match="STRAGGLER_FAULT"):
            faults.parse(bad)
    faults.inject(0, "matmul", env={})  # no fault planned: nothing happens
    with pytest.raises(RuntimeError, match="injected fault in membw on rank 2"):
        faults.inject(2, "membw", env={"STRAGGLER_FAULT": "raise:rank2:membw"})


def _samples(values: dict[str, list[float]], probe="matmul") -> list[dict]:
    return [
        {
            "host": "h",
            "gpu": g,
            "index": i,
            "model": "M",
            "probe": probe,
            "settings": "s",
            "unit": "u",
            "value": v,
            "sample": k,
            "sm_clock_mhz": 1000.0 + i,
            "throttle_reasons": "hw_slowdown=0.500" if g == "g2" else None,
        }
        for i, (g, vs) in enumerate(values.items())
        for k, v in enumerate(vs)
    ]


def test_simple_rule_flags_only_the_slow_device():
    rows = scanverdict._simple(_samples({"g0": [100, 101, 99], "g1": [100, 99, 100], "g2": [80, 81, 79]}))
    flagged = {r["gpu"]: r["straggler"] for r in rows}
    assert flagged == {"g0": False, "g1": False, "g2": True}
    g2 = next(r for r in rows if r["gpu"] == "g2")
    assert g2["median"] == 80 and g2["peer_median"] == 100 and g2["ratio"] == pytest.approx(0.8)


def test_device_report_verdicts_and_exit_codes():
    samples = _samples({f"g{i}": [100 + (i % 3), 101, 99, 100, 100] for i in range(8)})
    samples = [s if s["gpu"] != "g5" else {**s, "value": s["value"] * 0.7} for s in samples]
    rep = scanverdict.device_report(samples, [], [])
    assert [d["gpu"] for d in rep["devices"] if d["straggler"]] == ["g5"]
    assert rep["exit_code"] == EXIT_STRAGGLERS
    g5 = next(d for d in rep["devices"] if d["gpu"] == "g5")
    assert g5["verdict"] == "straggler" and "matmul" in g5["reason"]
    assert g5["probes"]["matmul"]["ratio"] == pytest.approx(0.7, abs=0.02)
    healthy = scanverdict.device_report([s for s in samples if s["gpu"] != "g5"], [], [])
    assert healthy["exit_code"] == EXIT_OK and healthy["stragglers"] == 0
    failed = scanverdict.device_report(
        samples, [{"host": "h", "device": "g1", "rank": 1, "probe": "membw", "error": "hung"}], []
    )
    assert failed["exit_code"] == EXIT_FAILED
    assert next(d for d in failed["devices"] if d["gpu"] == "g1")["verdict"] == "failed"
    assert scanverdict.device_report([], [], [])["exit_code"] == EXIT_FAILED  # nothing measured


def test_device_report_telemetry_summary():
    rep = scanverdict.device_report(_samples({"g0": [1, 1], "g1": [1, 1], "g2": [1, 1]}), [], [])
    t = next(d for d in rep["devices"] if d["gpu"] == "g2")["telemetry"]
    assert t["sm_clock_mhz"] == 1002.0 and t["throttle_reasons"] == "hw_slowdown=0.500"
    assert t["power_w"] is None  # not measured: missing, not 0


def test_render_table_is_deterministic():
    samples = _samples({"g0": [100, 100, 100], "g1": [100, 100, 100], "g2": [100, 100, 100], "g3": [60, 61, 60]})
    rep = scanverdict.device_report(samples, [], [])
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(scan_table(rep, "scan x"))
    text = buf.getvalue()
    assert "matmul" in text and "g3" in text
    g3_line = next(line for line in text.splitlines() if "g3" in line)
    assert "straggler" in g3_line and "(0.6" in g3_line
    g3 = next(d for d in rep["devices"] if d["gpu"] == "g3")["probes"]["matmul"]
    assert f"{g3['estimate']:.4g} ({g3['ratio']:.2f})" in g3_line  # the value the ratio comes from
    g0_line = next(line for line in text.splitlines() if "g0" in line)
    assert "healthy" in g0_line and "1000 MHz" in g0_line


def test_probe_modules_import_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys; import straggler.commands.scan, straggler.probes.runner, straggler.probes.worker, "
        "straggler.probes.distributed, straggler.scanverdict, straggler.probes.torchdev, "
        "straggler.probes.matmul, straggler.probes.membw, straggler.probes.pcie, straggler.probes.allreduce; "
        "print([m for m in ('torch', 'pandas', 'numpy', 'pynvml', 'rich') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_lone_device_is_undecided_not_healthy():
    rep = scanverdict.device_report(_samples({"g0": [100, 101, 99]}), [], [])
    (d,) = rep["devices"]
    # the rule of `straggler analyze` too: nothing to compare with is "could not decide", exit 2
    assert d["verdict"] == "undecided" and "no peers" in d["reason"] and rep["exit_code"] == EXIT_FAILED
    assert rep["undecided"] and not d["reason"].startswith("undecided")


def test_cuda_worker_finds_its_nvml_device_by_uuid():
    # CUDA and NVML may number GPUs differently; the worker matches by UUID (recorded fixture).
    from straggler.probes.fakenvml import FakeBackend
    from straggler.probes.worker import _nvml_index

    backend = FakeBackend("h100_healthy")
    uuids = [backend.read(i).uuid for i in range(backend.device_count())]
    assert _nvml_index(uuids[3], 0)(backend) == 3
    assert _nvml_index("GPU-not-there", 5)(backend) == 5  # unknown: fall back to the CUDA index
    assert _nvml_index(None, 2)(backend) == 2


def test_an_engine_bug_falls_back_to_the_simple_rule_and_says_so(monkeypatch):
    """An exception of the analysis engine that is not a refusal (a bug on odd rows) must not cost the
    scan its report: the simple rule decides, and `engine` names the error."""
    import straggler.analysis

    def broken(frame):
        raise ValueError("odd rows")

    monkeypatch.setattr(straggler.analysis, "analyze", broken)
    rows, doc, engine = scanverdict.analyze_samples(
        _samples({"cpu0": [10.0] * 3, "cpu1": [10.0] * 3, "cpu2": [5.0] * 3})
    )
    assert engine == "simple rule (the analysis engine failed: ValueError: odd rows)"
    assert doc == {"error": "ValueError: odd rows"}
    assert {r["gpu"] for r in rows if r["straggler"]} == {"cpu2"}
