"""Record live telemetry as a fixture that :class:`probes.fakenvml.FakeBackend` replays.

``record_fixture(backend, path, duration_s, interval_s)`` reads a snapshot every ``interval_s`` for
``duration_s`` and writes every device's readings as frames (errors and statuses included, so a
NOT_SUPPORTED field or a lost GPU replays as such). ``benchmarks/gpu_check.py`` uses it on a GPU.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from .telemetry import TelemetryBackend, reading_to_dict


def record_fixture(
    backend: TelemetryBackend,
    path: str | Path,
    duration_s: float,
    interval_s: float = 0.1,
    scenario: str | None = None,
    host: str = "recording",
) -> Path:
    """Write ``path`` (JSON); returns it. At least one snapshot is taken."""
    if duration_s < 0 or interval_s <= 0:
        raise ValueError("duration_s must be >= 0 and interval_s > 0")
    path = Path(path)
    snapshots = []
    start = time.monotonic()
    next_t = start
    while True:
        snapshots.append(backend.snapshot(host))
        next_t += interval_s
        if next_t - start > duration_s:
            break
        time.sleep(max(0.0, next_t - time.monotonic()))
    first = next((d for s in snapshots for d in s.devices if d.model), None)
    model = first.model if first else "unknown device"
    driver = first.driver if first else "unknown driver"
    devices = []
    for i in range(max((len(s.devices) for s in snapshots), default=0)):
        frames = []
        for s in snapshots:
            if i < len(s.devices):
                frame = reading_to_dict(s.devices[i])
                del frame["ts"], frame["index"]
                frames.append(frame)
        devices.append({"base": {}, "frames": frames})
    data = {
        "source": f"recorded on {model} {driver} {dt.date.today().isoformat()}",
        "scenario": scenario or path.stem,
        "backend": backend.name,
        "interval_s": interval_s,
        "devices": devices,
        "faults": [],
    }
    errors = sorted({s.error for s in snapshots if s.error})
    if errors:
        data["backend_errors"] = errors
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
