"""A probe child that outlived its agent (the agent was killed, crashed, or started by hand without
systemd's ``KillMode=control-group``) is found and ended at the next start, before any probe runs.

While a child runs, ``agent-scans/probe.pid`` holds its pid, its start time (``/proc/<pid>/stat``
field 22, clock ticks since boot: a recycled pid has another) and its scan id. At the start, a
process that still has that pid and that start time is the orphan: its process group (the child
leads its own session) gets SIGTERM, then SIGKILL after the grace period. One that cannot be ended
keeps the node busy: no second probe starts beside it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

PID_FILE = "probe.pid"


def start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when there is no such process
    (or only its zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]  # field 3: the state; field 22: the start time


def record(workdir: Path, pid: int, scan_id: str) -> None:
    tmp = workdir / (PID_FILE + ".tmp")
    tmp.write_text(json.dumps({"pid": pid, "start_ticks": start_ticks(pid), "scan_id": scan_id}))
    os.replace(tmp, workdir / PID_FILE)


def clear(workdir: Path) -> None:
    (workdir / PID_FILE).unlink(missing_ok=True)


def _alive(pid: int, ticks: str) -> bool:
    return start_ticks(pid) == ticks


def end_orphan(workdir: Path, grace_s: float) -> tuple[str | None, str | None]:
    """(what was done, for the log; why the node stays busy, when the orphan could not be ended)."""
    path = workdir / PID_FILE
    try:
        info = json.loads(path.read_text())
        pid, ticks, scan_id = int(info["pid"]), info["start_ticks"], str(info.get("scan_id"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        path.unlink(missing_ok=True)
        return f"ignored an unreadable {path} ({e})", None
    if ticks is None or not _alive(pid, ticks):
        path.unlink(missing_ok=True)
        return None, None
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        except PermissionError as e:
            return None, f"the orphaned probe child (pid {pid}, scan {scan_id}) cannot be ended: {e}"
        end = time.monotonic() + wait_s
        while _alive(pid, ticks) and time.monotonic() < end:
            time.sleep(0.05)
        if not _alive(pid, ticks):
            break
    if _alive(pid, ticks):
        return None, f"the orphaned probe child (pid {pid}, scan {scan_id}) is still running"
    path.unlink(missing_ok=True)
    return f"ended the orphaned probe child (pid {pid}) of the interrupted run {scan_id}", None
