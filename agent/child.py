"""The probe child process: `python -m straggler scan --json --output F --scan-id ID [--start-at T]
--deadline S --max-rounds 1`, run in its own session, killed (the whole process group) when it overruns.

The daemon never imports torch: all measuring happens in the child. Its rows are read back from the
JSON Lines output file without pandas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

KILL_GRACE_S = 10.0  # beyond the child's own --deadline before the agent kills it
# why a run failed (the ``reason`` label of straggler_agent_probe_failures_total; a bounded set)
FAILURE_REASONS = ("deadline", "exit_status", "signal", "no_results", "job_started", "start", "stopped", "spool")


def scan_command(
    settings,
    scan_id: str,
    output: Path,
    deadline_s: float,
    start_at: float | None = None,
    probes=None,
    duration_s: float | None = None,
    max_rounds: int = 1,
) -> list[str]:
    """One round by default, as the deadline and a cluster scan's shared start assume; a retest of
    a drained node re-measures undecided devices (``max_rounds``; the scan's ``--deadline`` still holds)."""
    base = settings.scan_base_command
    cmd = base + [
        "--json",
        "--output",
        str(output),
        "--scan-id",
        scan_id,
        "--deadline",
        f"{deadline_s:g}",
        "--device",
        settings.probe_device,
        "--probes",
        ",".join(probes or settings.probes),
        "--duration",
        f"{duration_s or settings.probe_duration_s:g}",
        "--max-rounds",
        str(max_rounds),
    ]
    if start_at is not None:
        cmd += ["--start-at", f"{start_at:.3f}"]
    return cmd


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON Lines result file; a torn last line (child killed mid-write) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


@dataclass
class ProbeRun:
    scan_id: str
    cluster: bool  # a cluster scan (state reported to the collector) or a local one
    command: list[str]
    output: Path
    deadline_s: float
    proc: subprocess.Popen | None = None
    started_mono: float = 0.0
    ended_mono: float | None = None
    returncode: int | None = None
    error: str | None = None
    failure: str | None = None  # one of FAILURE_REASONS once the run failed
    dropped: int = 0  # rows measured after a job appeared, removed by trim()
    stderr_path: Path | None = None
    stdout_path: Path | None = None
    kill_grace_s: float = KILL_GRACE_S
    retest: bool = False  # a retest of a node straggler drained (agent/quarantine.py)

    def start(self, workdir: Path, env: dict | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / f"{self.scan_id}.stderr"
        self.stdout_path = stdout_path = workdir / f"{self.scan_id}.stdout"
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.started_mono = time.monotonic()
        with open(stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=child_env,
                close_fds=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    def poll(self, now_mono: float | None = None) -> bool:
        """True once the child has ended (by itself or killed at its deadline)."""
        if self.proc is None or self.returncode is not None:
            return True
        now = time.monotonic() if now_mono is None else now_mono
        rc = self.proc.poll()
        if rc is None and now - self.started_mono > self.deadline_s + self.kill_grace_s:
            self.kill(f"probe overran its {self.deadline_s:g} s deadline and was killed", "deadline")
            return True
        if rc is None:
            return False
        self._ended(rc)
        return True

    def _ended(self, rc: int) -> None:
        self.returncode = rc
        self.ended_mono = time.monotonic()
        if self.error is None:
            self.fail(*self._outcome(rc))

    def fail(self, error: str | None, failure: str | None) -> None:
        """Record why the run failed (the first reason stays)."""
        if self.error is None and error is not None:
            self.error, self.failure = error, failure

    def _outcome(self, rc: int) -> tuple[str | None, str | None]:
        """(error, failure reason) of a child that ended by itself with ``rc``; (None, None) for a
        successful run: exit 0 (healthy) or 1 (stragglers found, its ``--json`` document printed)
        with results, or exit 2 after measuring everything with a device undecided. A signal, any
        other exit, a 1 without its document (a Python crash exits 1 too), or no result at all is
        a failed run."""
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"probe killed by {name}: {self.last_stderr_line() or 'no message'}", "signal"
        if rc == 2 and self._measured_but_undecided():
            return None, None
        if rc not in (0, 1) or (rc == 1 and self._document() is None):
            return f"probe exited with {rc}: {self.last_stderr_line() or 'no message'}", "exit_status"
        if not self.rows():
            return (
                f"probe exited with {rc} but produced no results: {self.last_stderr_line() or 'no message'}",
                "no_results",
            )
        return None, None

    def _document(self) -> dict | None:
        """The scan's ``--json`` document on stdout, if it printed one."""
        try:
            doc = json.loads(self.stdout_path.read_text())
        except (OSError, ValueError, AttributeError):
            return None
        return doc if isinstance(doc, dict) else None

    def _measured_but_undecided(self) -> bool:
        """Exit 2 because the scan could not decide a device (no straggler, some undecided), after
        measuring everything: its ``--json`` document lists no failure and an undecided device, and
        its rows are written. The run did its job; the collector decides across the fleet."""
        doc = self._document()
        if doc is None or doc.get("failures") != [] or not isinstance(doc.get("devices"), list):
            return False
        return any(isinstance(d, dict) and d.get("verdict") == "undecided" for d in doc["devices"]) and bool(
            self.rows()
        )

    def kill(self, reason: str, failure: str = "stopped") -> None:
        if self.proc is None or self.returncode is not None:
            return
        self.fail(reason, failure)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:  # after SIGTERM the scan reaps its workers and writes what it measured: give it time
                self.proc.wait(timeout=self.kill_grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._ended(self.proc.wait(timeout=10.0))

    def last_stderr_line(self) -> str | None:
        try:
            lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, AttributeError):
            return None
        return lines[-1].strip()[:300] if lines else None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def rows(self) -> list[dict]:
        return read_rows(self.output)

    def trim(self, until_ts: float) -> None:
        """Keep only the rows whose window ended by ``until_ts`` (a job appeared then), in the output
        file itself: what a later start recovers from it is clean too."""
        rows = self.rows()
        kept = [r for r in rows if isinstance(r.get("ts"), (int, float)) and r["ts"] <= until_ts]
        self.dropped += len(rows) - len(kept)
        tmp = self.output.with_suffix(".trim")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.output)

    def cleanup(self) -> None:
        for p in (self.output, self.stderr_path, self.stdout_path):
            if p is not None:
                p.unlink(missing_ok=True)
