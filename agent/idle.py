"""Idle detection from telemetry snapshots: no compute process and low utilization, known, for a grace period."""

from __future__ import annotations

from straggler.probes.telemetry import STATUS_LOST, STATUS_OK, NodeSnapshot


def busy_reason(snapshot: NodeSnapshot, util_pct: float) -> str | None:
    """Why this snapshot is not idle, or None when every device is known to be idle.

    Unknown is never idle: a device that cannot be read, a process list or a utilization that
    could not be read make the node busy. A lost GPU (fallen off the bus) runs nothing and is
    skipped. A backend with no process count at all (the CPU backend) is judged by utilization."""
    if snapshot.error:
        return f"telemetry unavailable: {snapshot.error}"
    present = [d for d in snapshot.devices if d.status != STATUS_LOST]
    if not present:
        return "no readable device"
    for d in present:
        if d.status != STATUS_OK:
            return f"device {d.index} unreadable ({d.errors.get('device', d.status)})"
        if d.processes is None and "processes" in d.errors:
            return f"device {d.index}: compute processes unknown ({d.errors['processes']})"
        if d.processes:
            return f"device {d.index} runs {d.processes} compute process(es)"
        if d.util_pct is None:
            return f"device {d.index}: utilization unknown ({d.errors.get('util_pct', 'not read yet')})"
        if d.util_pct > util_pct:
            return f"device {d.index} is {d.util_pct:.0f}% busy"
    return None


class IdleTracker:
    """Feed it one snapshot per tick (monotonic time); ``idle`` once quiet for ``grace_s``."""

    def __init__(self, grace_s: float, util_pct: float) -> None:
        self.grace_s = grace_s
        self.util_pct = util_pct
        self.quiet_since: float | None = None
        self.reason: str | None = "no snapshot yet"

    def update(self, snapshot: NodeSnapshot, now_mono: float) -> bool:
        self.reason = busy_reason(snapshot, self.util_pct)
        if self.reason is not None:
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = now_mono
        return self.idle(now_mono)

    def idle(self, now_mono: float) -> bool:
        return self.quiet_since is not None and now_mono - self.quiet_since >= self.grace_s

    def reset(self) -> None:
        """Forget the quiet period (after our own probes ran, their load is not a job's)."""
        self.quiet_since = None
        self.reason = "probes just ran"
