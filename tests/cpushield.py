"""Keep other processes' load off the processes a test starts: a CPU cgroup with the largest weight.

A show-test compares CPU cores with each other. A process outside the test that keeps one core busy
(CI on a shared machine, another test suite) takes half of that core from the worker pinned there, and
the scan then rightly flags it: the test would measure the machine's load, not the program. Inside
a cgroup whose CPU weight is the maximum (cgroup v1 ``cpu.shares`` 262144, v2 ``cpu.weight``
10000), against the default weight (1024 / 100) of the processes outside, the test's processes get
more than 96% of each core they run on however busy the rest of the machine is; inside the cgroup
they share the cores as usual, so a slowdown the test makes on purpose (busy processes started in
the same cgroup) stays what it is. Measured on the 2-core VM, a pinned busy loop on each core while
two outside busy loops were pinned to core 1: 0.31 and 0.19 of a core at the default weight, 0.98
and 0.97 inside the shield.

Needs root (or a delegated cgroup); :func:`cpu_shield` yields ``None`` and the reason otherwise,
and the tests fall back to measuring the outside load (skipped locally, failed under CI).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import Iterator

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
V1_SHARES, V2_WEIGHT = 262144, 10000  # the kernel's maxima
_names = itertools.count()


class CpuShield:
    def __init__(self, path: Path) -> None:
        self.path = path

    def enter(self) -> None:
        """Move the calling process into the shield (a ``preexec_fn``: the child moves itself,
        before it execs, so every process it starts is inside too)."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]


def _make() -> tuple[CpuShield | None, str]:
    name = f"straggler-test-{os.getpid()}-{next(_names)}"
    try:
        if (V1 / "cpu.shares").is_file():
            path, knob, value = V1 / name, "cpu.shares", V1_SHARES
        elif "cpu" in (V2 / "cgroup.controllers").read_text().split():
            if "cpu" not in (V2 / "cgroup.subtree_control").read_text().split():
                (V2 / "cgroup.subtree_control").write_text("+cpu\n")
            path, knob, value = V2 / name, "cpu.weight", V2_WEIGHT
        else:
            return None, "no cgroup CPU controller at /sys/fs/cgroup"
        path.mkdir()
    except OSError as e:
        return None, f"cannot make a CPU cgroup: {e}"
    try:
        (path / knob).write_text(f"{value}\n")
    except OSError as e:
        path.rmdir()
        return None, f"cannot set {path / knob}: {e}"
    return CpuShield(path), f"inside {path} ({knob} {value})"


@contextlib.contextmanager
def cpu_shield() -> Iterator[tuple[CpuShield | None, str]]:
    """``(shield, how)``, or ``(None, why not)``. The cgroup is removed afterwards; every process the
    test started in it must have exited by then (it waits up to 10 s for the last ones)."""
    shield, how = _make()
    try:
        yield shield, how
    finally:
        if shield is not None:
            for _ in range(100):
                try:
                    shield.path.rmdir()
                    break
                except OSError:  # EBUSY: a process in it is still exiting
                    time.sleep(0.1)
