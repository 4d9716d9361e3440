"""GPU-only checks of the probes (run by benchmarks/gpu_check.py where a GPU is lent)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False"),
]


def _run(module, seconds=1.0, **kw):
    from straggler.probes.torchdev import Device
    from straggler.probes.windows import no_telemetry

    dev = Device("cuda", 0)
    run = module.prepare(dev, **kw)
    return [r for raw in run(seconds, 3, no_telemetry) for r in module.parse(raw)]


def test_matmul_bf16_on_gpu():
    from straggler.probes import matmul

    rows = _run(matmul)
    assert len(rows) == 3 and rows[0]["settings"] == "n=8192,dtype=bf16" and rows[0]["unit"] == "TFLOP/s"
    assert all(r["value"] > 10 for r in rows)  # any datacenter GPU of the last years


def test_membw_and_pcie_on_gpu():
    from straggler.probes import membw, pcie

    bw = _run(membw)
    assert all(r["value"] > 100 for r in bw)  # GB/s, read + written
    rows = _run(pcie, seconds=2.0)
    assert {r["probe"] for r in rows} == {"pcie_h2d", "pcie_d2h"}
    assert all(r["value"] > 1 for r in rows)


def test_scan_on_gpu_uses_cuda_and_nvml():
    from straggler.probes.plan import ScanSettings
    from straggler.probes.runner import run_scan

    res = run_scan(ScanSettings(probes=("matmul", "membw", "pcie", "allreduce"), duration_s=2, device="cuda"))
    assert res.backend == "cuda" and res.failures == []
    assert "nvml" in res.notice
    gpus = {s["gpu"] for s in res.samples}
    assert len(gpus) == torch.cuda.device_count() and all(g.startswith("GPU-") for g in gpus)
    assert any(s["sm_clock_mhz"] for s in res.samples)
