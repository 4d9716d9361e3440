"""`straggler scan` end to end on this machine: real workers pinned to real cores, real gloo."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from straggler.records import read_table

CORES = sorted(os.sched_getaffinity(0))


def scan(straggler_cmd, *args, timeout=90, env=None):
    return subprocess.run(
        [*straggler_cmd, "scan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_json_output_scan_id_and_start_at(straggler_cmd, tmp_path):
    # After the workers' start-up and warm-up, and longer than a probe phase may last (2 x 1 s + 10 s
    # grace): waiting for the start instant is not a hang.
    start_at = time.time() + 18
    out = tmp_path / "s.parquet"
    proc = scan(
        straggler_cmd,
        "--json",
        "--probes",
        "matmul,allreduce",
        "--duration",
        "1",
        "--samples",
        "3",
        "--max-rounds",
        "1",
        "--scan-id",
        "test-scan-1",
        "--start-at",
        str(start_at),
        "--output",
        str(out),
    )
    assert proc.returncode in (0, 1) or "could not decide" in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["scan_id"] == "test-scan-1" and doc["backend"] == "cpu" and doc["failures"] == []
    assert "no CUDA GPU visible" in doc["notice"]
    assert [d["gpu"] for d in doc["devices"]] == [f"cpu{c}" for c in CORES]
    for d in doc["devices"]:
        assert set(d["probes"]) == {"matmul", "allreduce"}
        assert d["verdict"] in ("healthy", "straggler", "undecided", "slow") and d["reason"]
        assert d["probes"]["matmul"]["n_samples"] == 3 and d["probes"]["matmul"]["unit"] == "GFLOP/s"
        assert d["telemetry"]["arrival_skew_s"] is not None and d["telemetry"]["arrival_skew_s"] >= 0
    verdicts = [d["verdict"] for d in doc["devices"]]
    assert proc.returncode == (1 if "straggler" in verdicts else 2 if "undecided" in verdicts else 0), proc.stderr
    df = read_table(out)
    assert len(df) == len(doc["samples"]) == len(CORES) * 2 * 3
    assert (df["scan_id"] == "test-scan-1").all()
    assert (df["ts"] - df["duration_s"] >= start_at - 0.05).all()  # nothing measured before --start-at
    ar = df[df["probe"] == "allreduce"]
    assert ar["value"].to_numpy() == pytest.approx(ar["algbw_gbps"].to_numpy() * 2 * (len(CORES) - 1) / len(CORES))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--probes", "matmul,gemm"], "unknown probe 'gemm'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda"], "no CUDA GPU visible"),  # zero devices
        (["--output", "x.xlsx"], "unknown file type '.xlsx'"),
        (["--duration", "-1"], "--duration must be > 0"),
        (["--probes", "pcie", "--device", "cpu"], "nothing to run: pcie skipped: GPU only"),
        (["--token-file", "t"], "--token-file needs --collector"),
        (["--samples", "0"], "samples must be >= 1"),
        (["--max-rounds", "0"], "--max-rounds must be >= 1, got 0"),
        (["--max-rounds", "2", "--collector", "http://127.0.0.1:1"], "--max-rounds needs a local scan"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(straggler_cmd, tmp_path, args, message):
    proc = subprocess.run([*straggler_cmd, "scan", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_telemetry_fixture_fails_before_any_worker(straggler_cmd, tmp_path):
    proc = subprocess.run(
        [*straggler_cmd, "scan", "--output", "x.csv"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "STRAGGLER_TELEMETRY": "fake:no_such_scenario"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "no_such_scenario" in line
    assert not list(tmp_path.iterdir())


def test_output_rows_are_canonical(straggler_cmd, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = scan(
        straggler_cmd,
        "--probes",
        "membw",
        "--duration",
        "1",
        "--samples",
        "2",
        "--max-rounds",
        "1",
        "--output",
        str(out),
    )
    # a VM's cores copy at rates that vary run to run: the devices may be undecided (exit 2, one line)
    assert proc.returncode in (0, 1) or proc.stderr.startswith("straggler: error: could not decide: "), proc.stderr
    df = pd.read_json(out, lines=True)
    for col in (
        "ts",
        "scan_id",
        "host",
        "gpu",
        "index",
        "model",
        "probe",
        "settings",
        "sample",
        "duration_s",
        "value",
        "unit",
    ):
        assert df[col].notna().all(), col
    assert set(df["unit"]) == {"GB/s"} and set(df["sample"]) == {0, 1}
    assert set(df["index"]) == set(CORES)
    lines = proc.stdout.splitlines()  # the table, piped: rich's 80 columns, no device cut
    assert max(len(line) for line in lines) <= 80
    assert all(any(line.split()[:1] == [f"cpu{c}"] for line in lines) for c in CORES), proc.stdout


def test_unwritable_output_fails_before_probing(straggler_cmd, tmp_path):
    (tmp_path / "afile").write_text("")
    raw = tmp_path / "raw"  # where the workers would keep their raw timings, had any probe run
    proc = scan(
        straggler_cmd,
        "--output",
        str(tmp_path / "afile" / "s.csv"),
        "--probes",
        "matmul",
        "--duration",
        "1",
        env={"STRAGGLER_RAW_DIR": str(raw)},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert (
        line == f"straggler: error: {tmp_path / 'afile' / 's.csv'}: cannot write: a parent is a file, not a directory"
    )
    assert not raw.exists()  # found before probing


def test_output_that_fails_after_the_scan_goes_to_a_fallback(tmp_path, capsys):
    """The place was writable when the scan began and is not when it ends: nothing measured is lost."""
    from straggler.commands.scan import _report
    from straggler.errors import InputError
    from straggler.probes.plan import ScanResult

    rows = [
        {
            "scan_id": "fallback-test-1",
            "host": "n",
            "gpu": f"cpu{g}",
            "index": g,
            "model": "m",
            "probe": "matmul",
            "settings": "n=8",
            "sample": s,
            "value": 10.0 + s,
            "unit": "GFLOP/s",
        }
        for g in range(3)
        for s in range(2)
    ]
    res = ScanResult(scan_id="fallback-test-1", host="n", backend="cpu", notice="", samples=rows, failures=[])
    (tmp_path / "gone").write_text("")  # where the output's directory was
    fallback = Path(tempfile.gettempdir()) / "straggler-fallback-test-1.jsonl"
    fallback.unlink(missing_ok=True)
    with pytest.raises(InputError) as e:
        _report(res, True, str(tmp_path / "gone" / "s.parquet"))
    assert str(e.value).startswith(f"--output {tmp_path / 'gone' / 's.parquet'}: cannot write (")
    assert str(e.value).endswith(f"the 6 samples are in {fallback}")
    back = read_table(fallback)
    assert sorted(back["value"]) == sorted(r["value"] for r in rows)
    assert json.loads(capsys.readouterr().out)["samples"] == rows  # and the report was still printed
    fallback.unlink()


def test_a_single_device_scan_is_undecided_and_exits_2(straggler_cmd, tmp_path):
    """Same rule as `straggler analyze`: nothing to compare with is 'could not decide' (exit 2)."""
    out = tmp_path / "one.csv"
    proc = subprocess.run(
        [*straggler_cmd, "scan", "--probes", "matmul", "--duration", "1", "--samples", "2", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        preexec_fn=lambda: os.sched_setaffinity(0, CORES[:1]),
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("straggler: error: only one device (host ") and f"gpu cpu{CORES[0]})" in line
    assert "undecided: no peers" in proc.stdout and "undecided: undecided" not in proc.stdout
    assert len(read_table(out)) == 2  # measured and kept
    analyzed = subprocess.run([*straggler_cmd, "analyze", str(out)], capture_output=True, text=True, timeout=60)
    assert analyzed.returncode == 2 and "only one device" in analyzed.stderr


def _gpu_samples(slow: dict, noisy: float = 0.0, n: int = 8, samples: int = 3) -> list[dict]:
    import uuid

    probes = {
        "matmul": ("TFLOP/s", 700.0),
        "membw": ("GB/s", 2900.0),
        "pcie_h2d": ("GB/s", 50.0),
        "pcie_d2h": ("GB/s", 50.0),
        "allreduce": ("GB/s", 350.0),
    }
    return [
        {
            "scan_id": "s",
            "host": "gpu-node-017",
            "gpu": f"GPU-{uuid.UUID(int=i + 1)}",
            "index": i,
            "model": "NVIDIA H100 80GB HBM3",
            "probe": p,
            "settings": "x",
            "sample": s,
            "unit": unit,
            "value": base * (slow.get((i, p), 1.0)) * (1 + (noisy if (i + s) % 2 else -noisy) if noisy else 1),
            "sm_clock_mhz": 1980.0,
            "power_w": 690.0,
            "temp_c": 71.0,
            "pcie_gen": 5,
            "pcie_width": 16,
            "throttle_reasons": "sw_power_cap=0.400" if i == 3 else None,
        }
        for i in range(n)
        for p, (unit, base) in probes.items()
        for s in range(samples)
    ]


def _render80(report) -> list[str]:
    import io

    from rich.console import Console

    from straggler.scanview import render_scan

    buf = io.StringIO()
    render_scan(Console(file=buf, width=80, color_system=None), report, "notice", "s", [])
    return buf.getvalue().splitlines()


def test_a_gpu_scan_table_fits_80_columns_and_never_cuts_a_gpu():
    from straggler.scanverdict import device_report

    report = device_report(_gpu_samples({(3, "matmul"): 0.8}), [], [])
    lines = _render80(report)
    assert max(len(line) for line in lines) <= 80
    for d in report["devices"]:
        (row,) = [line for line in lines if d["gpu"] in line]  # whole, on one line
        assert row.split()[0] == d["gpu"]
    from straggler.scanview import short_verdict

    i = next(i for i, line in enumerate(lines) if "GPU-00000000-0000-0000-0000-000000000004" in line)
    block = " ".join(lines[i : i + 5])  # the device's row, its cells wrapped over lines
    assert "straggler:" in block and "0.80x" in block and "basis" not in block  # short; details in --json
    assert short_verdict(report["devices"][3]) == "[bold red]straggler[/bold red]: matmul 0.80x (unexplained)"
    assert "basis: " in report["devices"][3]["reason"]


def test_slower_on_noisy_samples_is_undecided_with_the_samples_needed_never_healthy():
    from straggler.errors import EXIT_FAILED
    from straggler.scanverdict import device_report
    from straggler.verdict import Undecided

    report = device_report(_gpu_samples({(1, "matmul"): 0.81}, noisy=0.1, samples=2), [], [])
    d = report["devices"][1]
    m = d["probes"]["matmul"]
    assert (d["verdict"], m["verdict"], m["samples_needed"]) == ("undecided", "undecided", 12)
    assert m["note"] == "n=2, 12 more samples" and d["samples_needed"] == 33  # its other probes need more
    assert d["reason"].startswith("matmul 0.81x peer median: n=2, 12 more samples; membw")
    from straggler.scanview import short_verdict

    assert short_verdict(d) == (
        "[bold yellow]undecided[/bold yellow]: matmul 0.81x, membw 1.00x, pcie_h2d 1.00x, "
        "pcie_d2h 1.00x, allreduce 1.00x; 33 more samples"
    )
    # no straggler, devices undecided: could not decide (exit 2), one line naming them, never "healthy"
    assert report["exit_code"] == EXIT_FAILED and report["undecided"] == 8
    assert isinstance(report["cannot_decide"], Undecided)
    assert str(report["cannot_decide"]) == (
        "could not decide: 8 device(s) undecided at the 4.0% threshold and no straggler found: "
        "gpu-node-017/GPU-00000000-0000-0000-0000-000000000001, gpu-node-017/GPU-00000000-0000-0000-0000-"
        "000000000002, gpu-node-017/GPU-00000000-0000-0000-0000-000000000003 (+5 more); re-measure them "
        "(up to 33 more samples)"
    )
    lines = _render80(report)
    assert max(len(line) for line in lines) <= 80
    assert not any("healthy" in line for line in lines)
    assert "8 device(s), 0 straggler(s), 8 undecided, 0 failure(s)" in lines


def _matmul_fleet(slow: dict, n: int = 16, samples: int = 5, noise: float = 0.01, spread: float = 0.0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    base = 1 + rng.normal(0, spread, n)
    return [
        {
            "scan_id": "s",
            "host": "gpu-node-017",
            "gpu": f"GPU-{i}",
            "index": i,
            "model": "H100",
            "probe": "matmul",
            "settings": "x",
            "sample": s,
            "unit": "TFLOP/s",
            "value": 700 * base[i] * slow.get(i, 1.0) * (1 + rng.normal(0, noise)),
        }
        for i in range(n)
        for s in range(samples)
    ]


def test_an_undecided_device_beside_healthy_ones_makes_the_scan_undecided():
    from straggler.errors import EXIT_FAILED, EXIT_STRAGGLERS
    from straggler.scanverdict import device_report

    report = device_report(_matmul_fleet({3: 0.955}, n=8), [], [])
    d = report["devices"][3]
    assert d["verdict"] == "undecided" and not d["straggler"]
    assert d["reason"] == "matmul 0.95x peer median: n=5, comparison too uncertain to decide at the threshold"
    assert report["exit_code"] == EXIT_FAILED
    assert str(report["cannot_decide"]).endswith(
        "gpu-node-017/GPU-3; re-measure with more samples, or more devices of the model"
    )
    assert {x["verdict"] for x in report["devices"] if x is not d} == {"healthy"}
    # with a straggler beside it: stragglers found (exit 1); the undecided device stays undecided
    report = device_report(_matmul_fleet({3: 0.955, 5: 0.8}, n=8), [], [])
    assert report["exit_code"] == EXIT_STRAGGLERS and report["cannot_decide"] is None
    assert [x["verdict"] for x in report["devices"]][3:6] == ["undecided", "healthy", "straggler"]


def test_a_slow_device_is_shown_as_slow_and_does_not_change_the_exit_code():
    from straggler.errors import EXIT_OK
    from straggler.scanverdict import device_report
    from straggler.scanview import short_verdict

    report = device_report(_matmul_fleet({3: 0.975}, noise=0.002, spread=0.002), [], [])
    d = report["devices"][3]
    assert (d["verdict"], d["straggler"], d["probes"]["matmul"]["verdict"]) == ("slow", False, "slow")
    assert report["exit_code"] == EXIT_OK and report["stragglers"] == 0 and report["cannot_decide"] is None
    assert short_verdict(d) == "[yellow]slow[/yellow]: matmul 0.98x"
    assert d["reason"] == "matmul 0.98x peer median: slow, under the threshold"
    assert d["perf_class"] == "D" and d["probes"]["matmul"]["peer_spread"] > 0
    lines = _render80(report)
    assert max(len(line) for line in lines) <= 80
    assert "16 device(s), 0 straggler(s), 1 slow, 0 failure(s)" in lines
    (row,) = [line for line in lines if line.split()[:1] == ["GPU-3"]]
    assert "slow" in row


def test_a_degraded_probe_is_shown_whatever_its_tier():
    from straggler.scanview import short_verdict
    from straggler.verdict import probe_note

    probe = {
        "verdict": "healthy",
        "straggler": False,
        "ratio": 0.99,
        "degraded": True,
        "change_loss": 0.05,
        "change_scan": "b",
        "n_samples": 5,
        "basis": "fleet_peers",
    }
    assert probe_note(probe) == "degraded, -5.0% since scan b"
    probe["note"] = probe_note(probe)
    d = {"verdict": "healthy", "degraded": True, "probes": {"matmul": probe}, "failures": []}
    assert short_verdict(d) == "[green]healthy[/green]: degraded matmul 0.99x -5.0%"


def test_a_host_all_of_whose_devices_are_flagged_gets_one_line():
    from straggler.scanverdict import device_report

    rows = [
        {**r, "host": f"gpu-node-0{h}", "value": r["value"] * (0.8 if h == 18 else 1.0)}
        for h in (16, 17, 18)
        for r in _gpu_samples({})
        if r["probe"] == "matmul"
    ]
    lines = _render80(device_report(rows, [], []))
    assert "gpu-node-018: all 8 devices flagged (the node, not its devices?)" in lines
    assert sum(" devices flagged " in line for line in lines) == 1


def test_a_scan_of_thousands_of_devices_shows_the_costliest_and_counts_with_all_for_everything():
    """A cluster scan of 2,000 devices, 300 of them slow: the table shows the 20 costliest of those not
    healthy and 20 others, then what it left out; --all shows every device; failure lines likewise."""
    import io
    import uuid

    from rich.console import Console

    from straggler.scanview import render_scan
    from straggler.scanverdict import device_report

    slow = {i: 0.70 + 0.1 * i / 2000 for i in range(0, 2000, 7)}  # 286 stragglers 20-30% slow, distinct costs
    rows = [
        {
            "scan_id": "s",
            "host": f"node-{i // 8:03d}",
            "gpu": f"GPU-{uuid.UUID(int=i + 1)}",
            "index": i % 8,
            "model": "NVIDIA H100 80GB HBM3",
            "probe": "matmul",
            "settings": "x",
            "sample": s,
            "unit": "TFLOP/s",
            "value": 700.0 * slow.get(i, 1.0) * (1 + 0.001 * ((i * 7 + s * 3) % 5 - 2)),
        }
        for i in range(2000)
        for s in range(5)
    ]
    report = device_report(rows, [], [])
    assert report["stragglers"] == len(slow)
    failures = [
        {"host": f"node-{i:03d}", "device": "-", "rank": None, "probe": "scan", "error": "node busy"} for i in range(30)
    ]

    def render(show_all: bool) -> list[str]:
        buf = io.StringIO()
        render_scan(Console(file=buf, width=80, color_system=None), report, "notice", "s", failures, show_all=show_all)
        return buf.getvalue().splitlines()

    lines = render(False)
    shown = [line.split()[0] for line in lines if line.startswith("node-")]
    costliest = sorted(
        (d for d in report["devices"] if d["verdict"] == "straggler"), key=lambda d: -d["probes"]["matmul"]["cost"]
    )[:20]
    assert shown[:20] == [f"{d['host']}/{d['gpu']}" for d in costliest]  # the costliest first
    assert len(shown) == 40
    hidden = len(slow) - 20
    assert f"(not shown: {hidden} straggler, {2000 - len(slow) - 20} healthy; --all shows them)" in lines
    assert sum(line.startswith("failed ") for line in lines) == 20 and "(rank None)" not in "\n".join(lines)
    assert "(not shown: 10 more failure(s); --all shows them)" in lines
    everything = render(True)
    assert sum(line.startswith("node-") for line in everything) == 2000
    assert sum(line.startswith("failed ") for line in everything) == 30
