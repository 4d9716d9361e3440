"""Shared test helpers.

Tests about an external tool (promtool, systemd-analyze, a GPU) skip with a visible reason when it is
missing here, but fail under CI (CI=true), where .ci/run installs the tools: a green CI cannot hide
a missing install step. Likewise a test that cannot judge on a busy machine skips here and fails
under CI (:func:`skip_or_fail`).

Tests that wait for real processes wait as long as the work may take by the program's own
deadlines (:func:`scan_timeout_s`), never a fixed guess, and kill what they started when it is
over (:func:`run_cmd`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_or_fail(msg: str) -> None:
    """Skip with a visible reason here; under CI (CI=true) fail, so that a green CI cannot hide a
    test that did not run (a missing tool, a machine too busy to judge)."""
    if IN_CI:
        pytest.fail(f"{msg} (under CI=true this is a failure, not a skip)")
    pytest.skip(msg)


def require_tool(name: str) -> str:
    """Path of an executable the test needs; skip locally, fail in CI, when it is missing."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} not installed (.ci/run installs it)")
    return path


def scan_timeout_s(probes: tuple[str, ...], duration_s: float, samples: int = 5) -> float:
    """How long a test waits for a local ``straggler scan`` of ``probes``: the scan's own deadline
    for that plan (``straggler.probes.runner.total_deadline``: start-up, warm-up, every probe and
    its grace), plus the start-up the deadline does not count (the parent's torch import, SETUP_S)
    and one grace for the report after it. A scan that works ends long before; one that hangs is
    stopped by its own deadline, which the test then sees."""
    from straggler.probes.budget import GRACE_S, SETUP_S
    from straggler.probes.runner import total_deadline
    from straggler.probes.plan import WorkerPlan

    plan = WorkerPlan(scan_id="t", host="t", kind="cpu", probes=tuple(probes), duration_s=duration_s, n_windows=samples)
    return SETUP_S + total_deadline(plan, GRACE_S) + GRACE_S


def run_cmd(cmd: list[str], timeout_s: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in its own process group; past
    ``timeout_s`` the whole group is killed (a scan's workers too, not only the scan) and the test
    fails saying so, with the output so far."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(
                f"{' '.join(map(str, cmd[:6]))} ... still running after {timeout_s:.0f} s (the "
                f"program's own deadline for this work); stderr: {err[-2000:]}"
            )
        finally:
            kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def straggler_cmd() -> list[str]:
    """The CLI as a subprocess command, using this interpreter."""
    return [sys.executable, "-m", "straggler"]
