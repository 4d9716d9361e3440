"""Errors of the long-running commands: one line on stderr, exit code 2 (could not run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def test_agent_with_its_port_taken_is_one_line_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "straggler",
                "agent",
                "--listen-port",
                str(port),
                "--telemetry",
                "fake:h100_healthy",
                "--spool",
                str(tmp_path / "spool.db"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "STRAGGLER_AGENT_LOG_LEVEL": "warning"},
        )
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = out.stderr.strip().splitlines()
    assert line == (
        f"straggler: error: cannot serve /metrics on 127.0.0.1:{port}: address already in use "
        "(another agent, or another service, listens there); stop it or choose --listen-port / "
        "listen_port"
    )
