"""The fleet report: one self-contained HTML file (``straggler analyze --report``, ``straggler scan
--report``, the collector's ``/report``). See docs/report.md.

    from straggler.htmlreport import render_report
    html = render_report(res.devices, res.summary, samples, history, command="straggler analyze ...")

Importing this package loads nothing heavy; rendering imports pandas and numpy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable


def render_report(
    devices,
    summary: dict,
    samples=None,
    history=None,
    *,
    command: str = "",
    source: str = "",
    link: Callable[[str, str], str] | None = None,
    generated_ts: float | None = None,
) -> str:
    """The page for one analysis: ``devices``/``summary`` are ``res.devices``/``res.summary`` of
    ``straggler.analysis.analyze``; ``samples``/``history`` the result tables it was given (for the
    flagged devices' samples, history and telemetry); ``link(host, gpu)``: URL of a device's
    history view, or None (a file)."""
    from .model import build
    from .page import render

    meta = {"command": command, "source": source, "generated_ts": time.time() if generated_ts is None else generated_ts}
    return render(build(devices, summary, samples, history, meta), link)


def write_report(path, *args, **kwargs) -> int:
    """Write :func:`render_report` to ``path`` (UTF-8); returns the bytes written."""
    data = render_report(*args, **kwargs).encode()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return len(data)


def command_line() -> str:
    """The command that is running, as a shell would take it (``straggler analyze a.csv --report r.html``)."""
    import shlex
    import sys

    return shlex.join(["straggler", *sys.argv[1:]])


def write_cli_report(path, devices, summary: dict, samples=None, history=None) -> int:
    """:func:`write_report` for a command: the command line is the report's; a file that cannot be
    written is one line (``InputError``)."""
    from straggler.errors import InputError

    try:
        return write_report(
            path,
            devices,
            summary,
            samples,
            history,
            command=command_line(),
            source="written by " + " ".join(command_line().split(" ")[:2]),
        )
    except FileExistsError as e:  # a parent directory to make is a file
        raise InputError(f"--report {path}: cannot write ({e.filename} is not a directory)") from None
    except OSError as e:
        raise InputError(f"--report {path}: cannot write ({e.strerror or e})") from None
