"""Idle detection from telemetry snapshots: no compute process and low utilization for a grace period."""

from __future__ import annotations

from straggler.probes.telemetry import STATUS_OK, NodeSnapshot


def busy_reason(snapshot: NodeSnapshot, util_pct: float) -> str | None:
    """Why this snapshot is not idle, or None when every readable device is idle."""
    if snapshot.error:
        return f"telemetry unavailable: {snapshot.error}"
    readable = [d for d in snapshot.devices if d.status == STATUS_OK]
    if not readable:
        return "no readable device"
    for d in readable:
        if d.processes:
            return f"device {d.index} runs {d.processes} compute process(es)"
        if d.util_pct is not None and d.util_pct > util_pct:
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
