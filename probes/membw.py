"""membw: device memory bandwidth from a device-to-device copy of buffers far larger than the cache.

Bytes counted = read + written (2 x buffer size), as the copy-ceiling figures in docs/ANCHORS use.
GPU: 1 GiB buffers (an H100's L2 is 50 MB). CPU core: 64 MiB buffers (well beyond a core's L2 and
its share of L3; one worker per core keeps the total modest).
"""

from __future__ import annotations

from .windows import calibrate, parse_windows, run_windows

NAME = "membw"
MiB = 1 << 20


def defaults(kind: str) -> dict:
    return {"nbytes": 1024 * MiB if kind == "cuda" else 64 * MiB}


def prepare(dev, group=None, nbytes: int | None = None):
    nbytes = nbytes or defaults(dev.kind)["nbytes"]
    l2 = dev.l2_bytes()
    if l2:
        nbytes = max(nbytes, 16 * l2)
    src, dst = dev.empty_bytes(nbytes), dev.empty_bytes(nbytes)

    def step():
        dev.copy_into(dst, src)

    batch = calibrate(dev, step)

    def run(duration_s: float, n_windows: int, telemetry) -> list[dict]:
        windows = run_windows(
            dev, step, batch_iters=batch, duration_s=duration_s, n_windows=n_windows, telemetry=telemetry
        )
        return [
            {
                "probe": NAME,
                "settings": f"bytes={nbytes},op=copy",
                "unit": "GB/s",
                "work_per_iter": 2.0 * nbytes,
                "scale": 1e9,
                "windows": windows,
            }
        ]

    return run


parse = parse_windows
