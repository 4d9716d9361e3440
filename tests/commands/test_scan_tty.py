"""On a terminal the scan shows a rich progress display; with --json it stays quiet (a real pty)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

from conftest import scan_timeout_s


def run_on_pty(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
        env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
    )
    os.close(slave)
    out = b""
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_progress_on_a_terminal(straggler_cmd):
    # one round (a scan re-measures undecided devices up to 5 rounds): the wait is that round's deadline
    code, text = run_on_pty(
        [*straggler_cmd, "scan", "--probes", "matmul,membw", "--duration", "1", "--max-rounds", "1"],
        scan_timeout_s(("matmul", "membw"), 1.0),
    )
    # 2 only for "could not decide" (no straggler, a device undecided: a VM's cores vary run to run)
    assert code in (0, 1) or "straggler: error: could not decide: " in text, text[-2000:]
    assert "probing matmul" in text and "probing membw" in text  # the progress display
    assert "device cpu:" in text and "verdict" in text  # then the notice and the table


def test_json_on_a_terminal_is_quiet(straggler_cmd):
    code, text = run_on_pty(
        [*straggler_cmd, "scan", "--json", "--probes", "matmul", "--duration", "1", "--max-rounds", "1"],
        scan_timeout_s(("matmul",), 1.0),
    )
    undecided = "straggler: error: could not decide: " in text
    assert code in (0, 1) or undecided, text[-2000:]
    assert "probing" not in text and "\x1b[" not in text  # no progress, no colour codes
    doc = json.loads(text.splitlines()[0] if undecided else text)  # the error line follows the document
    assert doc["devices"] and all(set(d["probes"]) == {"matmul"} for d in doc["devices"])


def test_progress_names_the_phase_from_the_start():
    """Before any worker reports, and before the total is known: a phase name, never '0/None'."""
    import io

    from rich.console import Console

    from straggler.scanview import progress_display

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, color_system=None)
    with progress_display(console, enabled=True) as on_event:
        first = buf.getvalue()
        on_event({"t": "hello", "rank": 0, "world_size": 2, "probes": ["matmul"]})
        on_event({"t": "phase", "rank": 0, "probe": "matmul", "state": "warmup", "world_size": 2, "probes": ["matmul"]})
        on_event({"t": "phase", "rank": 0, "probe": "matmul", "state": "done", "world_size": 2, "probes": ["matmul"]})
    text = buf.getvalue()
    assert "starting the probe workers" in first and "None" not in text
