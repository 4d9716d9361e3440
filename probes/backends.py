"""Choose a telemetry backend: ``open_backend("auto" | "nvml" | "cpu" | "fake:<scenario-or-path>")``.

``"auto"`` uses NVML when it initialises and sees at least one GPU, else the CPU backend, whose
``notice`` then says why. The environment variable ``STRAGGLER_TELEMETRY`` replaces the spec
``"auto"`` (so scans and agents can run on a fake backend in tests). Nothing is initialised here
beyond what the chosen spec needs.
"""

from __future__ import annotations

import os

from straggler.errors import InputError

from .telemetry import TelemetryBackend

ENV_VAR = "STRAGGLER_TELEMETRY"
SPECS = ("auto", "nvml", "cpu", "fake:<scenario-or-path>")


def open_backend(spec: str = "auto", kind: str | None = None) -> TelemetryBackend:
    """A backend for ``spec``; an unknown spec or a bad fixture raises InputError.

    ``kind`` is the kind of device being probed (``"cpu"`` or ``"cuda"``), when there is one: then
    ``"auto"`` means the backend of that kind, so a CPU scan on a GPU host never reads GPU telemetry
    for its cores, and a GPU whose NVML cannot be read is never described as a CPU core."""
    spec = _resolve(spec, kind)
    problem = spec_problem(spec)
    if problem:
        raise InputError(problem)
    if spec == "auto":
        return _auto()
    if spec == "nvml":
        from .nvml import NvmlBackend

        return NvmlBackend()
    if spec == "cpu":
        from .cputelemetry import CpuBackend

        return CpuBackend()
    from .fakenvml import FakeBackend

    return FakeBackend(spec[5:])


def _resolve(spec: str | None, kind: str | None = None) -> str:
    spec = (spec or "auto").strip()
    if spec == "auto" and os.environ.get(ENV_VAR, "").strip():
        spec = os.environ[ENV_VAR].strip()
    if spec == "auto" and kind is not None:
        spec = "cpu" if kind == "cpu" else "nvml"
    return spec


def spec_problem(spec: str | None) -> str | None:
    """Why :func:`open_backend` would refuse ``spec`` (an unknown name, a bad fixture), else None.
    Opens nothing: NVML and psutil backends fail later as data, never at the start."""
    spec = _resolve(spec)
    if spec in ("auto", "nvml", "cpu"):
        return None
    if spec.startswith("fake:") and spec[5:]:
        from .fakenvml import load_fixture

        try:
            load_fixture(spec[5:])
        except InputError as e:
            return str(e)
        return None
    return f"unknown telemetry backend {spec!r}; use one of {', '.join(SPECS)}"


def _auto() -> TelemetryBackend:
    from .cputelemetry import CpuBackend
    from .nvml import NvmlBackend

    nvml = NvmlBackend()
    count = nvml.device_count()
    if count > 0:
        nvml.notice = f"nvml: {count} NVIDIA GPU(s) found through NVML"
        return nvml
    why = nvml.init_error or "NVML sees no GPU"
    nvml.close()
    return CpuBackend(notice=f"cpu: no GPU telemetry ({why}); one device per CPU core (psutil)")
