"""Re-measure instead of guessing: alternate "measure" and "analyze" until every device is decided.

One round measures, the analysis decides; while some (device, probe) is ``undecided`` with a number
of ``samples_needed`` that would decide it, the next round measures again the probes that have such
devices, until none is left, a round fails, ``max_rounds`` rounds ran or the next round would not fit
the time left. ``straggler scan`` uses it; the gate and the agent are meant to use it the same way.

- **Every device is in every round.** A round runs its probes on all devices at once (after the same
  barrier), not only on the undecided ones: the devices are compared under the same conditions, and
  the analysis pairs the devices' samples of the same moments (by ``sample`` number). The decided
  devices' samples of that round are kept too: nothing measured is dropped, and ``straggler analyze``
  on the samples of all rounds gives the verdicts of the scan.
- **Sample numbers continue.** A round's samples are numbered after the highest number of that probe
  and settings so far (the same offset for every device, so the moments stay paired): the
  ``sample`` of a device, probe and scan is unique, and the analysis combines the rounds.
- **Samples per round:** the largest ``samples_needed`` among the undecided devices of the round's
  probes, rounded up, at least the first round's ``samples`` and at most ``max_samples``. A device
  whose ``samples_needed`` is null because its comparison value (the peers' centre) is too uncertain
  counts as ``max_samples``: the round measures its peers again too, which shrinks that uncertainty.
  One with nothing to compare with (basis ``none``) is not measured again: more samples cannot
  decide it.

Pure: ``measure`` and ``analyze`` are given, so a test feeds it recorded or synthetic samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from .errors import StragglerError

DEFAULT_MAX_ROUNDS = 5  # the first round and 4 re-measurements: see docs/scan.md "Re-measurement"
ROUND_SAMPLES_FACTOR = 4  # a re-measurement round takes at most 4 x the first round's samples
STOP_DECIDED = "all decided"
STOP_MAX_ROUNDS = "max rounds reached"
NONE = "none"  # the analysis' basis of a device with nothing to compare with (analysis.bases.NONE)


class Measured(Protocol):
    samples: list[dict]  # canonical rows
    failures: list[dict]


@dataclass(frozen=True)
class Round:
    number: int  # 1, 2, ...
    probes: tuple[str, ...]
    samples: int  # per device and probe, in this round
    undecided: int  # devices with an undecided probe after this round


@dataclass
class Remeasured:
    first: Measured  # the first round's result (its devices, notice, scan id)
    samples: list[dict] = field(default_factory=list)  # every round's, renumbered
    failures: list[dict] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    max_rounds: int = DEFAULT_MAX_ROUNDS
    stopped: str = ""  # why no further round ran, one line

    def to_json(self) -> dict:
        return {
            "rounds": len(self.rounds),
            "max_rounds": self.max_rounds,
            "stopped": self.stopped,
            "per_round": [
                {"round": r.number, "probes": list(r.probes), "samples": r.samples, "undecided": r.undecided}
                for r in self.rounds
            ],
        }

    def line(self) -> str:
        """``rounds: 2 of at most 4 (all decided)`` for the table."""
        return f"rounds: {len(self.rounds)} of at most {self.max_rounds} ({self.stopped})"


def remeasure(
    measure: Callable[[tuple[str, ...], int], Measured],
    analyze: Callable[[list[dict]], Iterable[dict]],
    probes: tuple[str, ...],
    samples: int,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    max_samples: int | None = None,
    fits: Callable[[tuple[str, ...], int], str | None] | None = None,
) -> Remeasured:
    """Run ``measure(probes, samples)`` (one round on every device; ``.samples`` and ``.failures``)
    and ``analyze(samples)`` (one dict per device and probe with ``host``, ``gpu``, ``probe``,
    ``verdict``, ``samples_needed`` and ``basis``) in turn, as the module says. ``fits(probes, samples)`` is a
    line saying why a further round does not fit the time left (then no round runs), or None."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    max_samples = max_samples or ROUND_SAMPLES_FACTOR * samples
    first = measure(tuple(probes), samples)
    out = Remeasured(first=first, samples=list(first.samples), failures=list(first.failures), max_rounds=max_rounds)
    ran = {r.get("probe") for r in first.samples}  # a probe the plan skipped (pcie on a CPU) did not run
    round_probes, round_samples = tuple(p for p in probes if p in ran) or tuple(probes), samples
    while True:
        try:
            entries = [e for e in analyze(out.samples) if e.get("verdict") == "undecided"]
        except Exception as e:  # noqa: BLE001 - the samples measured so far are kept and reported;
            # the verdicts fall back elsewhere (and say why); nothing to re-measure by
            out.rounds.append(Round(len(out.rounds) + 1, round_probes, round_samples, 0))
            why = str(e) if isinstance(e, StragglerError) else f"{type(e).__name__}: {e}"
            out.stopped = f"cannot analyse the samples: {why}"
            return out
        undecided = len({(e["host"], e["gpu"]) for e in entries})
        out.rounds.append(Round(len(out.rounds) + 1, round_probes, round_samples, undecided))
        decidable = [e for e in entries if _needed(e) is not None or e.get("basis") not in (None, NONE)]
        if out.failures:  # a failed round is reported as such; no further round on a broken scan
            out.stopped = f"a failure in round {len(out.rounds)}" + (
                f", {undecided} still undecided" if entries else ""
            )
        elif not entries:
            out.stopped = STOP_DECIDED
        elif not decidable:
            out.stopped = (
                f"{undecided} undecided that more samples cannot decide "
                f"({entries[0].get('undecided_reason') or 'no samples_needed'})"
            )
        elif len(out.rounds) >= max_rounds:
            out.stopped = f"{STOP_MAX_ROUNDS}, {undecided} still undecided"
        else:
            want = {e["probe"] for e in decidable}
            round_probes = tuple(p for p in probes if p in want) or tuple(sorted(want))
            need = max(_needed(e) or max_samples for e in decidable)
            round_samples = max(samples, min(max_samples, math.ceil(need)))
            too_long = fits(round_probes, round_samples) if fits is not None else None
            if too_long:
                out.stopped = f"{too_long}, {undecided} still undecided"
            else:
                try:
                    res = measure(round_probes, round_samples)
                except Exception as e:  # noqa: BLE001 - a round that cannot start loses none of the earlier ones
                    why = str(e) if isinstance(e, StragglerError) else f"{type(e).__name__}: {e}"
                    out.failures.append(
                        {
                            "host": getattr(first, "host", "-"),
                            "device": "-",
                            "rank": None,
                            "probe": f"round {len(out.rounds) + 1}",
                            "error": f"could not run: {why}",
                        }
                    )
                    out.stopped = f"a failure in round {len(out.rounds) + 1}, {undecided} still undecided"
                    return out
                out.samples += renumber(out.samples, res.samples)
                out.failures += res.failures
                continue
        return out


def _needed(entry: dict) -> float | None:
    n = entry.get("samples_needed")
    return float(n) if isinstance(n, (int, float)) and math.isfinite(n) and n > 0 else None


def renumber(before: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` (a new round, numbered from 0) numbered after the highest ``sample`` of their probe
    and settings in ``before``: one offset per probe and settings, so every device's sample ``i`` of
    the round stays paired with its peers' ``i``."""
    top: dict[tuple, int] = {}
    for r in before:
        key, s = (r.get("probe"), r.get("settings")), r.get("sample")
        if isinstance(s, (int, float)) and math.isfinite(s):
            top[key] = max(top.get(key, -1), int(s))
    return [
        {**r, "sample": r["sample"] + top.get((r.get("probe"), r.get("settings")), -1) + 1}
        if isinstance(r.get("sample"), (int, float))
        else dict(r)
        for r in rows
    ]


def analysis_verdicts(samples: list[dict]) -> list[dict]:
    """The analysis engine's per (device, probe) verdict and ``samples_needed``."""
    if not samples:
        return []
    from straggler.analysis import analyze

    from .records import to_frame

    devices = analyze(to_frame(samples)).devices
    cols = [
        c
        for c in ("host", "gpu", "probe", "verdict", "samples_needed", "undecided_reason", "basis")
        if c in devices.columns
    ]
    return devices[cols].to_dict("records")
