"""Test-only fault injection for the probe workers, through one environment variable.

``STRAGGLER_FAULT=<action>:rank<N>:<probe>[,...]`` makes worker ``N`` misbehave when it starts
``<probe>`` (after the probe's barrier, so its peers run that probe normally):

- ``hang``: sleep forever (the runner must kill it at its deadline),
- ``die``: exit at once with code 70, as a crashed process would,
- ``raise``: raise a RuntimeError inside the probe (a probe bug or a device error),
- ``corrupt``: run the probe, then drop its windows' timings, so that its parser crashes
  (a parser bug on raw timings it did not expect).

Unset (the normal case) it does nothing. Parsing is pure so tests can check it.
"""

from __future__ import annotations

import os
import time

from straggler.errors import InputError

ENV = "STRAGGLER_FAULT"
ACTIONS = ("hang", "die", "raise", "corrupt")


def parse(text: str | None) -> dict[tuple[int, str], str]:
    """``"hang:rank1:membw"`` -> ``{(1, "membw"): "hang"}``; InputError on a malformed entry."""
    out: dict[tuple[int, str], str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ACTIONS or not parts[1].startswith("rank") or not parts[1][4:].isdigit():
            raise InputError(f"{ENV}: bad entry {item!r}; expected <{'|'.join(ACTIONS)}>:rank<N>:<probe>")
        out[(int(parts[1][4:]), parts[2])] = parts[0]
    return out


def inject(rank: int, probe: str, env: dict | None = None) -> None:
    """Act out the fault planned for ``rank`` at the start of ``probe``, if any."""
    action = parse((os.environ if env is None else env).get(ENV)).get((rank, probe))
    if action == "hang":
        while True:  # killed by the runner at its deadline
            time.sleep(3600)
    elif action == "die":
        os._exit(70)
    elif action == "raise":
        raise RuntimeError(f"injected fault in {probe} on rank {rank}")


def corrupt(rank: int, probe: str, raws: list[dict], env: dict | None = None) -> list[dict]:
    """The probe's raw results, with every window's timings dropped if ``corrupt`` is planned."""
    if parse((os.environ if env is None else env).get(ENV)).get((rank, probe)) != "corrupt":
        return raws
    return [
        {**raw, "windows": [{k: v for k, v in w.items() if k != "batches"} for w in raw.get("windows", ())]}
        for raw in raws
    ]
