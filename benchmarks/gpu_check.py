"""GPU check: one script for a session lent a GPU (one call, a few minutes).

    python benchmarks/gpu_check.py [--out DIR] [--runs 3] [--duration 10] [--device cuda]

1. records NVML telemetry fixtures (idle, and under the scan's load) with ``record_fixture`` into
   ``probes/fixtures/recorded_<model>_{idle,load}.json`` and ``DIR/nvml/``;
2. measures the ceilings on every device: a large bf16 GEMM (16384^3) and a large device copy
   (4 GiB, bytes read + written), each the best window of a sustained run;
3. runs the full scan ``--runs`` times (raw probe timings kept in ``DIR/raw/`` for the parser tests);
4. reports each probe's median against its ceiling and the run-to-run coefficient of variation,
   checks the H100 targets (matmul >= 95% of the GEMM ceiling, membw >= 90% of the copy ceiling,
   CV <= 0.5%), runs the GPU-only tests (``pytest -m gpu``), and writes ``DIR/gpu_check.json``
   plus the printed table (``DIR/gpu_check.txt``).

``DIR`` is ``--out``, else ``$OUT``, else ``./gpu_check_out``. Every step is guarded: a failing
step is recorded in the JSON and the others still run. ``--device cpu`` runs the same steps on
the CPU cores (fp32, smaller sizes): that is how the script is tested on a machine without a GPU.
Exit code: 0 all targets met, 1 a target missed, 2 a step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TARGETS = {"matmul": ("gemm", 0.95), "membw": ("copy", 0.90)}  # probe -> (ceiling, minimum ratio)
CV_TARGET = 0.005
CEILING_SIZES = {"cuda": {"gemm_n": 16384, "copy_bytes": 4096 * MiB}, "cpu": {"gemm_n": 2048, "copy_bytes": 256 * MiB}}


# ---- pure parts (tested without a GPU) -------------------------------------------------------


def medians_by_device(samples: list[dict]) -> dict[tuple[str, str], float]:
    """(gpu, probe) -> median value of one run's samples."""
    groups: dict[tuple[str, str], list[float]] = {}
    for s in samples:
        v = s.get("value")
        if isinstance(v, (int, float)) and math.isfinite(v):
            groups.setdefault((str(s["gpu"]), s["probe"]), []).append(float(v))
    return {k: statistics.median(v) for k, v in groups.items()}


def run_to_run(runs: list[list[dict]]) -> dict[tuple[str, str], dict]:
    """Per (gpu, probe): the medians of each run, their mean and coefficient of variation
    (sample standard deviation / mean; None with fewer than 2 runs)."""
    per_run = [medians_by_device(r) for r in runs]
    keys = sorted({k for m in per_run for k in m})
    out = {}
    for k in keys:
        meds = [m[k] for m in per_run if k in m]
        mean = statistics.fmean(meds)
        cv = statistics.stdev(meds) / mean if len(meds) >= 2 and mean > 0 else None
        out[k] = {"medians": meds, "mean": mean, "cv": cv}
    return out


def compare(stats: dict[tuple[str, str], dict], ceilings: dict[str, dict]) -> list[dict]:
    """One row per (gpu, probe): rate, ceiling, ratio, CV and whether each target is met."""
    rows = []
    for (gpu, probe), st in sorted(stats.items()):
        row = {
            "gpu": gpu,
            "probe": probe,
            "median": st["mean"],
            "runs": len(st["medians"]),
            "cv": st["cv"],
            "ceiling": None,
            "ceiling_name": None,
            "ratio": None,
            "ratio_target": None,
        }
        if probe in TARGETS and gpu in ceilings:
            name, target = TARGETS[probe]
            ceil = ceilings[gpu].get(name, {}).get("value")
            if ceil:
                row.update(ceiling=ceil, ceiling_name=name, ratio=st["mean"] / ceil, ratio_target=target)
        row["ratio_ok"] = None if row["ratio"] is None else row["ratio"] >= row["ratio_target"]
        row["cv_ok"] = None if st["cv"] is None else st["cv"] <= CV_TARGET
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    def ok(v):
        return "-" if v is None else "ok" if v else "MISSED"

    head = (
        f"{'device':<44} {'probe':<10} {'median':>10} {'ceiling':>10} {'ratio':>7} {'target':>7} "
        f"{'':>6} {'cv':>7} {'':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['gpu']:<44} {r['probe']:<10} {f(r['median'], '{:.4g}'):>10} "
            f"{f(r['ceiling'], '{:.4g}'):>10} {f(r['ratio'], '{:.3f}'):>7} "
            f"{f(r['ratio_target'], '>={:.2f}'):>7} {ok(r['ratio_ok']):>6} "
            f"{f(r['cv'], '{:.2%}'):>7} {ok(r['cv_ok']):>6}"
        )
    return "\n".join(lines)


def exit_code(rows: list[dict], errors: list[dict]) -> int:
    if errors or not rows:
        return 2
    missed = [r for r in rows if r["ratio_ok"] is False or r["cv_ok"] is False]
    return 1 if missed else 0


def slug(model: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (model or "unknown").lower()).strip("_")[:40]


# ---- steps that touch the hardware ----------------------------------------------------------


def measure_ceilings(kind: str, indices: list[int], seconds: float) -> dict[str, dict]:
    """Best window rate of a large GEMM and a large copy on each device (in this process)."""
    from straggler.probes import matmul, membw, torchdev
    from straggler.probes.windows import no_telemetry

    sizes = CEILING_SIZES[kind]
    affinity = os.sched_getaffinity(0)
    threads = torchdev.torch().get_num_threads()
    out = {}
    try:
        for i in indices:
            dev = torchdev.Device(kind, i)
            gpu = dev.describe()["gpu"]
            res = {}
            for name, module, kw in (
                ("gemm", matmul, {"n": sizes["gemm_n"]}),
                ("copy", membw, {"nbytes": sizes["copy_bytes"]}),
            ):
                run = module.prepare(dev, **kw)
                rows = [r for raw in run(seconds, 4, no_telemetry) for r in module.parse(raw)]
                best = max(rows, key=lambda r: r["value"])
                res[name] = {"value": best["value"], "unit": best["unit"], "settings": best["settings"]}
                del run
                dev.free()
            out[gpu] = res
    finally:
        os.sched_setaffinity(0, affinity)  # the scan's workers take every core again
        torchdev.torch().set_num_threads(threads)
    return out


def record(backend_spec: str, path: Path, seconds: float, copies: list[Path]) -> dict:
    from straggler.probes.backends import open_backend
    from straggler.probes.fixture_recorder import record_fixture

    backend = open_backend(backend_spec)
    try:
        record_fixture(backend, path, seconds, 0.1)
    finally:
        backend.close()
    for c in copies:
        c.parent.mkdir(parents=True, exist_ok=True)
        c.write_text(path.read_text())
    return {"path": str(path), "backend": backend.name, "copies": [str(c) for c in copies]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per probe per run")
    ap.add_argument("--ceiling-seconds", type=float, default=4.0)
    ap.add_argument("--record-seconds", type=float, default=5.0)
    ap.add_argument("--fixtures-dir", type=Path, default=ROOT / "probes" / "fixtures")
    ap.add_argument("--no-pytest", action="store_true", help="skip running the GPU-only tests")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["STRAGGLER_RAW_DIR"] = str(out / "raw")
    doc: dict = {
        "started": time.time(),
        "device": args.device,
        "args": {k: str(v) for k, v in vars(args).items()},
        "errors": [],
        "ceilings": {},
        "runs": [],
        "fixtures": [],
        "pytest": None,
    }

    def step(name, fn):
        t0 = time.time()
        try:
            return fn()
        except BaseException as e:  # recorded; the other steps still run
            if isinstance(e, KeyboardInterrupt):
                raise
            doc["errors"].append(
                {"step": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            )
            print(f"[gpu_check] {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            print(f"[gpu_check] {name}: {time.time() - t0:.1f} s", file=sys.stderr)

    from straggler.probes import torchdev
    from straggler.probes.cputelemetry import cpu_model
    from straggler.probes.devices import resolve_devices
    from straggler.probes.plan import ScanSettings
    from straggler.probes.runner import run_scan

    plan = step(
        "devices",
        lambda: resolve_devices(
            args.device, torchdev.cuda_device_count(), os.sched_getaffinity(0), torchdev.torch_version()
        ),
    )
    if plan is None:
        return _finish(doc, out, [])
    doc["torch"] = torchdev.torch_version()
    model = (
        step("model", lambda: torchdev.Device(plan.kind, plan.indices[0]).describe()["model"])
        if plan.kind == "cuda"
        else (cpu_model() or "cpu")
    )
    name = f"recorded_{slug(model)}"
    tel = "auto"
    fx = args.fixtures_dir
    rec = step(
        "record idle",
        lambda: record(tel, out / "nvml" / f"{name}_idle.json", args.record_seconds, [fx / f"{name}_idle.json"]),
    )
    doc["fixtures"].append(rec)
    doc["ceilings"] = (
        step("ceilings", lambda: measure_ceilings(plan.kind, list(plan.indices), args.ceiling_seconds)) or {}
    )
    samples_per_run = []
    for i in range(args.runs):
        recorder = None
        if i == 0:  # record telemetry under the first scan's load, in the background
            load_s = min(60.0, args.duration * 3)
            recorder = threading.Thread(
                target=lambda: doc["fixtures"].append(
                    step(
                        "record load",
                        lambda: record(tel, out / "nvml" / f"{name}_load.json", load_s, [fx / f"{name}_load.json"]),
                    )
                ),
                daemon=True,
            )
            recorder.start()
        res = step(
            f"scan run {i + 1}",
            lambda: run_scan(ScanSettings(duration_s=args.duration, device=plan.kind, scan_id=f"gpu-check-{i + 1}")),
        )
        if recorder is not None:
            recorder.join(timeout=120)
        if res is not None:
            doc["runs"].append(
                {"scan_id": res.scan_id, "notice": res.notice, "failures": res.failures, "samples": res.samples}
            )
            samples_per_run.append(res.samples)
            if res.failures:
                doc["errors"].append({"step": f"scan run {i + 1}", "error": json.dumps(res.failures)[:2000]})
    stats = run_to_run(samples_per_run)
    rows = compare(stats, doc["ceilings"])
    if not args.no_pytest:
        doc["pytest"] = step("pytest -m gpu", lambda: _pytest(out))
    return _finish(doc, out, rows)


def _pytest(out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    (out / "pytest_gpu.txt").write_text(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "tail": proc.stdout[-1500:]}


def _finish(doc: dict, out: Path, rows: list[dict]) -> int:
    doc["rows"] = rows
    doc["targets"] = {"matmul_vs_gemm": TARGETS["matmul"][1], "membw_vs_copy": TARGETS["membw"][1], "cv": CV_TARGET}
    doc["exit_code"] = code = exit_code(rows, doc["errors"])
    table = render(rows)
    from straggler.jsonsafe import json_safe

    (out / "gpu_check.json").write_text(json.dumps(json_safe(doc), indent=1, default=str, allow_nan=False))
    (out / "gpu_check.txt").write_text(table + "\n")
    print(table)
    for e in doc["errors"]:
        print(f"error in {e['step']}: {e['error'][:300]}")
    print(f"gpu_check: exit {code}; everything in {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
