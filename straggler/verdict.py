"""How `straggler scan` and `straggler analyze` word a verdict: one rule for both commands.

- Nothing to compare with (not one entry has peers, history or a reference): the command could
  not decide, so it exits 2 (could not run) with one line saying what to give it.
- An entry neither flagged nor healthy says why (:func:`probe_note`): undecided with the samples
  that would decide it, slow (under the threshold), degraded; never "in line with peers".
- A host whose every device is flagged gets one summary line (the node, not the devices).
- Verdict tiers (the engine's ``verdict``, ``straggler.analysis.tiers.TIERS``): a device takes the
  first tier, in that order, of its probes: one straggler probe makes a straggler, else one
  undecided probe makes it undecided (never healthy), else one slow probe makes it slow.
- Exit codes (:func:`exit_code`): 1 when anything is a straggler; else 2 when anything is
  undecided (could not decide at the threshold: "no straggler found" is not "healthy"); else 0.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .errors import EXIT_FAILED, EXIT_OK, EXIT_STRAGGLERS, InputError

TOP = 20  # entries of each kind (flagged or not healthy, others) a table shows without --all


class NothingToCompare(InputError):
    """Every device was measured, but none has anything to be compared with."""

    def __init__(self, devices: int, host: str, gpu: str, hint: str):
        if devices == 1:
            what = f"only one device (host {host}, gpu {gpu}) and no history or reference: nothing to compare it with"
        else:
            what = (
                f"{devices} devices but none has a peer (same model, probe and settings), history or "
                "reference: nothing to compare them with"
            )
        super().__init__(f"{what}; {hint}")


class Undecided(InputError):
    """Measured and compared, but no straggler found and some entries undecided at the threshold."""

    def __init__(self, undecided: list[str], min_effect: float, needed: float | None, what: str = "device(s)"):
        shown = ", ".join(undecided[:3]) + (f" (+{len(undecided) - 3} more)" if len(undecided) > 3 else "")
        how = (
            f"re-measure them (up to {int(needed)} more samples)"
            if needed
            else "re-measure with more samples, or more devices of the model"
        )
        super().__init__(
            f"could not decide: {len(undecided)} {what} undecided at the {min_effect:.1%} "
            f"threshold and no straggler found: {shown}; {how}"
        )


def exit_code(stragglers: int, undecided: int) -> int:
    """1 stragglers found; 2 none, but some entries undecided (could not decide); 0 healthy."""
    return EXIT_STRAGGLERS if stragglers else EXIT_FAILED if undecided else EXIT_OK


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def device_tier(probes: Iterable[Mapping]) -> dict:
    """A device's ``verdict``, ``degraded``, ``samples_needed`` and ``perf_class`` from its probes' rows.

    ``verdict``: the first tier of ``TIERS`` among the probes (None when no probe has one);
    ``samples_needed``: the most any undecided probe needs (None when unknown); ``perf_class``: the
    slowest class of its probes (None when no probe has one)."""
    from straggler.analysis.tiers import CLASSES, TIERS  # lazy: importing this module stays light

    rows = list(probes)
    tiers = {r.get("verdict") for r in rows}
    verdict = next((t for t in TIERS if t in tiers), None)
    needed = [r["samples_needed"] for r in rows if r.get("verdict") == "undecided" and _finite(r.get("samples_needed"))]
    classes = [str(r["perf_class"]) for r in rows if r.get("perf_class") in CLASSES]
    return {
        "verdict": verdict,
        "degraded": any(bool(r.get("degraded")) for r in rows),
        "samples_needed": int(max(needed)) if needed else None,
        "perf_class": max(classes) if classes else None,
    }


def probe_note(row: Mapping) -> str | None:
    """A few words on a probe's tier when it is neither straggler nor plain healthy: why undecided
    (``n=2, 12 more samples``; ``no peers, history or reference``), ``slow, under the threshold``,
    and ``degraded, -5.0% since scan <id>``; None otherwise."""
    parts = []
    if row.get("verdict") == "undecided":
        n = row.get("n_samples")
        n_text = "n=" + (str(int(n)) if n is not None and _finite(n) else "?")
        if str(row.get("basis") or "none").startswith("none"):
            parts.append("no peers, history or reference")
        elif _finite(row.get("samples_needed")):
            parts.append(f"{n_text}, {int(row['samples_needed'])} more samples")
        else:
            parts.append(f"{n_text}, {row.get('undecided_reason') or 'cannot decide'}")
    elif row.get("verdict") == "slow":
        parts.append("slow, under the threshold")
    if row.get("degraded"):
        loss = row.get("change_loss")
        since = f" since scan {row['change_scan']}" if row.get("change_scan") else ""
        parts.append("degraded" + (f", -{loss:.1%}" if _finite(loss) else "") + since)
    return "; ".join(parts) or None


def _known_true(values):
    """True where a value is true; a missing one (None, NaN, NA: not checked) is not. No fillna on
    an object column: pandas 2.x warns on stderr about its downcast."""
    import numpy as np
    import pandas as pd

    known = pd.notna(values)
    out = np.zeros(len(values), dtype=bool)
    out[known] = values[known].astype(bool)
    return out


def whole_hosts(hosts: Iterable, gpus: Iterable, flagged: Iterable) -> list[str]:
    """One line per host of 2+ devices whose every device is flagged, from the columns of its
    entries, position by position (a device is flagged when any of its entries is). Grouped with
    pandas: a loop over the 106,000 values of the 100,000-device fleet's hosts with a flag was
    half of the analyze table's render."""
    import numpy as np  # only here: the verdict wording is imported by every command
    import pandas as pd

    def column(values) -> np.ndarray:  # by position: a Series' index is not read
        return values.to_numpy(dtype=object) if hasattr(values, "to_numpy") else np.asarray(list(values), dtype=object)

    entries = pd.DataFrame(
        {
            "host": pd.array(column(hosts), dtype="string"),
            "gpu": pd.array(column(gpus), dtype="string"),
            "flagged": _known_true(column(flagged)),
        }
    )
    per_device = entries.groupby(["host", "gpu"], sort=False, dropna=False)["flagged"].any()
    per_host = per_device.groupby(level="host", sort=True, dropna=False).agg(["all", "size"])
    return [
        f"{host}: all {int(n)} devices flagged (the node, not its devices?)"
        for host, every, n in zip(per_host.index, per_host["all"], per_host["size"])
        if n >= 2 and every
    ]
