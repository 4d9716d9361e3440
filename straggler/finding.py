"""A gate finding: one device, one check, what was measured and why it matters.

The one shape every pre-job check reports in (``straggler gate``, the quarantine retests): the gate
prints one line per finding (:meth:`Finding.line`), ``--json`` carries :meth:`Finding.to_json`,
and a drain's reason is built from the worst finding (:func:`straggler.drain.drain_reason`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FAIL = "fail"  # the device is a straggler or unhealthy: exit 1
ERROR = "error"  # the check could not run or could not decide: exit 2 (never "unhealthy")
OK = "ok"  # checked and healthy (listed in --json only)
OUTCOMES = (FAIL, ERROR, OK)


@dataclass(frozen=True)
class Finding:
    """``device``: ``gpu3``, ``cpu1`` or ``node`` (a check of the whole node); ``check``: ``matmul``,
    ``membw``, ``pcie``, ``ecc``, ``remapped_rows``, ``retired_pages``, ``xid``, ``missing``,
    ``persistence``, ``idle_throttle``, ``nvml``, ``probe``, ``budget``, ``reference``;
    ``value``: the measured value as shown (``0.80x``, ``2 errors``, ``gen3 x8 of gen4 x16``);
    ``cause``: one short word for an operator (``thermal``, ``power``, ``slow``, ``ecc``, ``hang``);
    ``detail``: the rest of the reason (the line shows it, the drain reason does not)."""

    device: str
    check: str
    value: str
    cause: str
    detail: str = ""
    outcome: str = FAIL

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    def line(self) -> str:
        """``gpu3 matmul 0.80x: thermal (hw_thermal_slowdown; 20% below the node's peers)``."""
        tail = f" ({self.detail})" if self.detail else ""
        return f"{self.device} {self.check} {self.value}: {self.cause}{tail}"

    def to_json(self) -> dict:
        return asdict(self)
