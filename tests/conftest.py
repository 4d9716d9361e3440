"""Shared test helpers.

Tests about an external tool (promtool, systemd-analyze, a GPU) skip with a visible reason when it is
missing here, but fail under CI (CI=true), where .ci/run installs the tools: a green CI cannot hide
a missing install step.
"""

from __future__ import annotations

import os
import shutil
import socket
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


def require_tool(name: str) -> str:
    """Path of an executable the test needs; skip locally, fail in CI, when it is missing."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def straggler_cmd() -> list[str]:
    """The CLI as a subprocess command, using this interpreter."""
    return [sys.executable, "-m", "straggler"]
