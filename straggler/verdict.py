"""How `straggler scan` and `straggler analyze` word a verdict: one rule for both commands.

- Nothing to compare with (not one entry has peers, history or a reference): the command could
  not decide, so it exits 2 (could not run) with one line saying what to give it.
- An entry slower than its peers by at least the minimum effect but not flagged is
  "not significant, n=<samples>", never "in line with peers".
- A host whose every device is flagged gets one summary line (the node, not the devices).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .errors import InputError

LOO_SUFFIX = "_loo"  # the engine's basis for peer groups of 2-3 (leave-one-out, min_effect_few)


class NothingToCompare(InputError):
    """Every device was measured, but none has anything to be compared with."""

    def __init__(self, devices: int, host: str, gpu: str, hint: str):
        if devices == 1:
            what = f"only one device (host {host}, gpu {gpu}) and no history or reference: nothing to compare it with"
        else:
            what = (f"{devices} devices but none has a peer (same model, probe and settings), history or "
                    "reference: nothing to compare them with")
        super().__init__(f"{what}; {hint}")


def not_significant(row: Mapping, min_effect: float, min_effect_few: float) -> str | None:
    """``"not significant, n=5"`` for an entry slower than the minimum effect that was not flagged."""
    deficit = row.get("deficit")
    if row.get("straggler") or deficit is None or deficit != deficit:
        return None
    basis = str(row.get("basis") or "")
    if deficit < (min_effect_few if basis.endswith(LOO_SUFFIX) else min_effect):
        return None
    n = row.get("n_samples")
    return "not significant, n=" + ("?" if n is None or n != n else str(int(n)))


def whole_hosts(entries: Iterable[tuple[str, str, bool]]) -> list[str]:
    """One line per host of 2+ devices whose every device is flagged, from (host, gpu, flagged)."""
    devices: dict[str, dict[str, bool]] = {}
    for host, gpu, flagged in entries:
        per = devices.setdefault(str(host), {})
        per[str(gpu)] = per.get(str(gpu), False) or bool(flagged)
    return [f"{host}: all {len(per)} devices flagged (the node, not its devices?)" for host, per in sorted(devices.items())
            if len(per) >= 2 and all(per.values())]
