"""matmul: sustained dense matrix products, the compute ceiling a straggler falls short of.

bf16 8192x8192 on a GPU (fp32 1024x1024 on a CPU core), random inputs (zeros run faster on some
GPUs), warmed up, then timed in windows. Rate = 2 n^3 flop per product.
"""

from __future__ import annotations

from .windows import calibrate, parse_windows, run_windows

NAME = "matmul"


def defaults(kind: str) -> dict:
    return {"n": 8192, "dtype": "bf16"} if kind == "cuda" else {"n": 1024, "dtype": "fp32"}


def prepare(dev, group=None, n: int | None = None, dtype: str | None = None):
    """Allocate and warm up on ``dev``; returns ``run(duration_s, n_windows, telemetry) -> [raw]``."""
    opts = defaults(dev.kind)
    n = n or opts["n"]
    dtype = dtype or opts["dtype"]
    a, b, c = dev.randn(n, n, dtype=dtype), dev.randn(n, n, dtype=dtype), dev.randn(n, n, dtype=dtype)

    def step():
        dev.matmul_into(a, b, c)

    batch = calibrate(dev, step)
    gpu = dev.kind == "cuda"

    def run(duration_s: float, n_windows: int, telemetry) -> list[dict]:
        windows = run_windows(
            dev, step, batch_iters=batch, duration_s=duration_s, n_windows=n_windows, telemetry=telemetry
        )
        return [
            {
                "probe": NAME,
                "settings": f"n={n},dtype={dtype}",
                "unit": "TFLOP/s" if gpu else "GFLOP/s",
                "work_per_iter": 2.0 * n**3,
                "scale": 1e12 if gpu else 1e9,
                "windows": windows,
            }
        ]

    return run


parse = parse_windows
