"""Drain and resume a node: the pluggable action the gate and the quarantine loop act through.

:class:`DrainAction` is the protocol (``drain``, ``resume``, ``state``); :class:`ScontrolAction`
is the Slurm one (``scontrol update nodename=... state=drain reason=...``). Every call runs under a
timeout and fails with one line (:class:`DrainError`, exit 2) when ``scontrol`` is missing, hangs
or refuses; it never reports a state it did not read (``unknown`` is not ``idle``).
:func:`drain_reason` words the reason from the gate's findings, short enough for ``sinfo -R``.

The next action is a Kubernetes one (``kubectl cordon`` plus a ``straggler.io/drained`` label
holding the reason, ``kubectl uncordon`` to resume, the node's ``spec.unschedulable`` as state);
it is documented in docs/gate.md, not built.
"""

from __future__ import annotations

import os
import subprocess
from typing import Protocol, Sequence

from .errors import StragglerError
from .finding import FAIL, Finding

REASON_PREFIX = "straggler: "
REASON_MAX_CHARS = 50  # `sinfo -R` shows 50 characters of a reason by default (%50E)
DEFAULT_TIMEOUT_S = 10.0  # scontrol answers in well under a second; slurmctld down takes its own ~10 s
# states DrainAction.state returns
DRAINED, DRAINING, IDLE, ALLOCATED, MIXED, DOWN, UNKNOWN = (
    "drained",
    "draining",
    "idle",
    "allocated",
    "mixed",
    "down",
    "unknown",
)


class DrainError(StragglerError):
    """The drain action could not run (scontrol missing, hung or refused): one line, exit 2."""


class DrainAction(Protocol):
    """How a node is taken out of and put back into service."""

    name: str

    def drain(self, node: str, reason: str) -> None: ...

    def resume(self, node: str) -> None: ...

    def state(self, node: str) -> str:
        """One of drained, draining, idle, allocated, mixed, down, unknown."""
        ...


def drain_reason(findings: Sequence[Finding], max_chars: int = REASON_MAX_CHARS) -> str:
    """``straggler: gpu3 matmul 0.80x thermal`` (`` +2``: two more failing findings), at most
    ``max_chars`` characters: whole words are dropped from the end (the cause, then the value)
    before a word is cut. The first failing finding is the one named (the gate orders them worst
    first); with no failing finding the first one is."""
    if not findings:
        raise ValueError("drain_reason needs at least one finding")
    failing = [f for f in findings if f.outcome == FAIL] or list(findings)
    worst = failing[0]
    more = f" +{len(failing) - 1}" if len(failing) > 1 else ""
    words = _clean(" ".join(w for w in (worst.device, worst.check, worst.value, worst.cause) if w)).split()
    while len(words) > 2 and len(REASON_PREFIX + " ".join(words) + more) > max_chars:
        words.pop()
    return (REASON_PREFIX + " ".join(words))[: max_chars - len(more)].rstrip() + more


def _clean(text: str) -> str:
    """One line of printable text (scontrol takes the reason as one argument; sinfo shows one line)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class ScontrolAction:
    """Drain, resume and read a Slurm node through ``scontrol`` (from the PATH, or ``scontrol``)."""

    name = "scontrol"

    def __init__(
        self, scontrol: str = "scontrol", timeout_s: float = DEFAULT_TIMEOUT_S, env: dict[str, str] | None = None
    ):
        self.scontrol = scontrol
        self.timeout_s = timeout_s
        self.env = env

    def drain(self, node: str, reason: str) -> None:
        """Drain ``node``, then read its state back: scontrol accepts an update of a node it does
        not know with exit code 0, so a drain is only done when the node reads drained."""
        what = f"drain {node}"
        self._run(["update", f"nodename={node}", "state=drain", f"reason={_clean(reason)}"], what)
        state = self._state(node, what)
        if state not in (DRAINED, DRAINING):
            raise DrainError(f"cannot {what}: scontrol accepted the drain but the node is {state}")

    def resume(self, node: str) -> None:
        what = f"resume {node}"
        self._run(["update", f"nodename={node}", "state=resume"], what)
        state = self._state(node, what)
        if state in (DRAINED, DRAINING):
            raise DrainError(f"cannot {what}: scontrol accepted the resume but the node is still {state}")

    def state(self, node: str) -> str:
        return self._state(node, f"read the state of {node}")

    def _state(self, node: str, what: str) -> str:
        return parse_state(self._run(["show", "node", "-o", node], what))

    def _run(self, args: list[str], what: str) -> str:
        cmd = [self.scontrol, *args]
        try:
            r = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                env=self.env if self.env is not None else os.environ.copy(),
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise DrainError(
                f"cannot {what}: {self.scontrol} not found (install slurm-client, or give its path)"
            ) from None
        except PermissionError:
            raise DrainError(f"cannot {what}: {self.scontrol} is not executable") from None
        except subprocess.TimeoutExpired:
            raise DrainError(
                f"cannot {what}: {self.scontrol} did not answer in {self.timeout_s:g} s (is slurmctld up?)"
            ) from None
        if r.returncode != 0:
            why = _clean(r.stderr or r.stdout)[:200] or f"exit code {r.returncode}"
            raise DrainError(f"cannot {what}: {self.scontrol} {args[0]} failed: {why}")
        return r.stdout


def parse_state(show_node: str) -> str:
    """``scontrol show node -o`` output -> a state of :class:`DrainAction`. ``IDLE+DRAIN`` is
    drained, ``MIXED+DRAIN``/``ALLOCATED+DRAIN`` draining, ``DOWN*`` down; anything not read is
    unknown (never idle)."""
    for field in show_node.split():
        if field.startswith("State="):
            state = field[len("State=") :].upper()
            break
    else:
        return UNKNOWN
    base, *rest = (part.rstrip("*$~#!%@^-") for part in state.split("+"))
    flags = set(rest)
    if base == "DOWN":
        return DOWN
    if "DRAIN" in flags or base in ("DRAINED", "DRAINING", "DRAIN"):
        if base in ("ALLOCATED", "MIXED", "COMPLETING", "DRAINING") or "COMPLETING" in flags:
            return DRAINING
        return DRAINED
    return {"IDLE": IDLE, "ALLOCATED": ALLOCATED, "MIXED": MIXED}.get(base, UNKNOWN)
