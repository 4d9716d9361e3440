"""pcie (GPU only): host-to-device and device-to-host bandwidth with pinned host memory.

A link trained at a lower generation or width shows as a low rate here. Two sample series:
``pcie_h2d`` and ``pcie_d2h``, each for half of the probe's duration. Bytes counted = bytes moved.
"""

from __future__ import annotations

from .windows import calibrate, parse_windows, run_windows

NAME = "pcie"
MiB = 1 << 20


def prepare(dev, group=None, nbytes: int = 256 * MiB):
    if dev.kind != "cuda":
        raise ValueError("the pcie probe needs a CUDA device")
    host = dev.empty_bytes(nbytes, pinned_host=True)
    device = dev.empty_bytes(nbytes)
    steps = {
        "pcie_h2d": lambda: dev.copy_into(device, host),
        "pcie_d2h": lambda: dev.copy_into(host, device),
    }
    batches = {name: calibrate(dev, step) for name, step in steps.items()}

    def run(duration_s: float, n_windows: int, telemetry) -> list[dict]:
        out = []
        for name, step in steps.items():
            windows = run_windows(
                dev,
                step,
                batch_iters=batches[name],
                duration_s=duration_s / 2,
                n_windows=n_windows,
                telemetry=telemetry,
            )
            out.append(
                {
                    "probe": name,
                    "settings": f"bytes={nbytes},pinned=1",
                    "unit": "GB/s",
                    "work_per_iter": float(nbytes),
                    "scale": 1e9,
                    "windows": windows,
                }
            )
        return out

    return run


parse = parse_windows
