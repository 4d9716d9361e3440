"""How long a scan may take: the one source of its phase deadlines and of the time it needs.

The runner kills a worker that overstays a phase (:func:`phase_deadlines`) and the whole scan at
:func:`scan_needed_s`; the agent's ``probe_deadline_s``, the collector's ``scan_run_limit_s`` and
the cluster-scan client's timeout are checked against the same number (:func:`budget_problem`),
so a scan that is accepted can finish. Pure and light: no torch, no I/O.
"""

from __future__ import annotations

SETUP_S = 120.0  # torch import, process group, allocation and warm-up of every probe
GRACE_S = 10.0


def phase_deadlines(duration_s: float, grace_s: float = GRACE_S, wait_s: float = 0.0) -> dict[str, float]:
    """Seconds a worker may spend in each phase; ``wait_s``: time left until the scan's start_at."""
    probe_s = 2 * duration_s + grace_s
    return {
        "init": SETUP_S,
        "warmup": SETUP_S,
        "start": probe_s,
        "done": probe_s + 2 * grace_s,
        "wait": max(0.0, wait_s) + SETUP_S,
    }


def scan_needed_s(n_probes: int, duration_s: float, grace_s: float = GRACE_S, wait_s: float = 0.0) -> float:
    """The longest a scan of ``n_probes`` probes of ``duration_s`` each may run before it is killed."""
    d = phase_deadlines(duration_s, grace_s, wait_s)
    return SETUP_S + d["wait"] + n_probes * (d["done"] + grace_s)


def round_needed_s(n_probes: int, duration_s: float, overhead_s: float) -> float:
    """About how long one more round of a scan (re-measurement) takes: its probing and the start-up
    and report a round took so far (``overhead_s``, measured). Not a kill bound: whether to start it."""
    return overhead_s + n_probes * duration_s


def budget_problem(n_probes: int, duration_s: float, limit_s: float, limit_name: str) -> str | None:
    """One line when a scan cannot finish within ``limit_s`` (named ``limit_name``), else None."""
    needed = scan_needed_s(n_probes, duration_s)
    if needed <= limit_s:
        return None
    return f"{n_probes} probe(s) at {duration_s:g} s need {needed:g} s, more than {limit_name} = {limit_s:g} s"
