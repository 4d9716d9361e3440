"""The re-measurement loop (straggler.remeasure) on synthetic samples, with the real analysis engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from straggler.errors import InputError
from straggler.remeasure import DEFAULT_MAX_ROUNDS, ROUND_SAMPLES_FACTOR, analysis_verdicts, remeasure, renumber

N_DEVICES = 8
BASE = 100.0


@dataclass
class Round:
    samples: list[dict]
    failures: list[dict] = field(default_factory=list)


class Fleet:
    """``measure(probes, n)``: n samples of every device and probe, numbered from 0 as a runner's round
    is; device ``slow[gpu]`` lower by that share, noise ``noise`` (relative), one sample moment shared
    by every device (a common factor, as devices measured at once share)."""

    def __init__(self, slow: dict[str, float], noise: float, seed: int = 0, fail_round: int | None = None):
        self.slow, self.noise, self.fail_round = slow, noise, fail_round
        self.rng = np.random.default_rng(seed)
        self.calls: list[tuple[tuple[str, ...], int]] = []
        self.ts = 1.8e9

    def measure(self, probes: tuple[str, ...], n: int) -> Round:
        self.calls.append((tuple(probes), n))
        rows = []
        for p in probes:
            for i in range(n):
                self.ts += 1.0
                moment = self.rng.normal(0, self.noise / 2)
                for d in range(N_DEVICES):
                    gpu = f"g{d}"
                    value = BASE * (1 - self.slow.get(gpu, 0.0)) * (1 + moment + self.rng.normal(0, self.noise))
                    rows.append(
                        {
                            "ts": self.ts,
                            "scan_id": "s1",
                            "host": f"h{d // 4}",
                            "gpu": gpu,
                            "index": d % 4,
                            "model": "X",
                            "probe": p,
                            "settings": "n=1",
                            "sample": i,
                            "duration_s": 1.0,
                            "value": value,
                            "unit": "GFLOP/s",
                        }
                    )
        failures = (
            [{"host": "h0", "device": "g0", "rank": 0, "probe": probes[0], "error": "hung"}]
            if len(self.calls) == self.fail_round
            else []
        )
        return Round(rows, failures)


def verdict_of(samples, gpu, probe="matmul"):
    return next(e["verdict"] for e in analysis_verdicts(samples) if e["gpu"] == gpu and e["probe"] == probe)


def test_a_device_5pct_slow_is_decided_after_rounds():
    fleet = Fleet({"g5": 0.05}, noise=0.01, seed=3)
    first = fleet.measure(("matmul",), 5)
    assert verdict_of(first.samples, "g5") == "undecided"  # one round of 5 samples cannot tell it from T

    fleet = Fleet({"g5": 0.05}, noise=0.01, seed=3)
    out = remeasure(fleet.measure, analysis_verdicts, ("matmul",), 5)
    assert verdict_of(out.samples, "g5") == "straggler"
    assert len(out.rounds) >= 2 and out.stopped == "all decided" and out.rounds[-1].undecided == 0
    assert out.rounds[0].undecided >= 1 and [r.number for r in out.rounds] == list(range(1, len(out.rounds) + 1))
    # every round measures every device; a round takes samples_needed, within [5, 4 x 5]
    assert all(5 <= n <= ROUND_SAMPLES_FACTOR * 5 for _, n in fleet.calls)
    assert [r.samples for r in out.rounds] == [n for _, n in fleet.calls]
    total = sum(n for _, n in fleet.calls)
    for d in range(N_DEVICES):  # sample numbers continue across rounds: 0 .. total-1 for each device
        mine = sorted(r["sample"] for r in out.samples if r["gpu"] == f"g{d}")
        assert mine == list(range(total))
    assert out.to_json()["rounds"] == len(out.rounds) and out.to_json()["max_rounds"] == DEFAULT_MAX_ROUNDS


def test_a_healthy_fleet_stops_after_round_1():
    fleet = Fleet({}, noise=0.002, seed=1)
    out = remeasure(fleet.measure, analysis_verdicts, ("matmul", "membw"), 5)
    assert fleet.calls == [(("matmul", "membw"), 5)]
    assert len(out.rounds) == 1 and out.stopped == "all decided" and out.rounds[0].undecided == 0
    assert {e["verdict"] for e in analysis_verdicts(out.samples)} == {"healthy"}


def test_max_rounds_is_respected_and_said():
    # A device at T (4% slow) stays undecided however often it is measured.
    fleet = Fleet({"g2": 0.04}, noise=0.01, seed=2)
    out = remeasure(fleet.measure, analysis_verdicts, ("matmul",), 5, max_rounds=2)
    assert len(fleet.calls) == 2 and len(out.rounds) == 2
    assert verdict_of(out.samples, "g2") == "undecided"
    assert out.stopped == "max rounds reached, 1 still undecided"
    assert out.line() == "rounds: 2 of at most 2 (max rounds reached, 1 still undecided)"

    once = remeasure(Fleet({"g2": 0.04}, noise=0.01, seed=2).measure, analysis_verdicts, ("matmul",), 5, max_rounds=1)
    assert len(once.rounds) == 1 and once.stopped == "max rounds reached, 1 still undecided"


def test_only_probes_with_undecided_devices_are_measured_again():
    fleet = Fleet({"g5": 0.05}, noise=0.01, seed=3)
    out = remeasure(
        fleet.measure,
        lambda s: (
            [e for e in analysis_verdicts(s) if e["probe"] == "matmul"]
            + [{"host": "h0", "gpu": "g0", "probe": "membw", "verdict": "healthy"}]
        ),
        ("membw", "matmul"),
        5,
        max_rounds=2,
    )
    assert fleet.calls[0] == (("membw", "matmul"), 5) and fleet.calls[1][0] == ("matmul",)
    assert [r.probes for r in out.rounds] == [("membw", "matmul"), ("matmul",)]


def test_no_round_past_the_deadline_nor_after_a_failure():
    fleet = Fleet({"g5": 0.05}, noise=0.01, seed=3)
    asked = []

    def fits(probes, n):
        asked.append((probes, n))
        return "deadline: a further round needs about 9 s, 4 s of --deadline left"

    out = remeasure(fleet.measure, analysis_verdicts, ("matmul",), 5, fits=fits)
    assert len(fleet.calls) == 1 and len(asked) == 1 and asked[0][1] >= 5
    assert out.stopped == "deadline: a further round needs about 9 s, 4 s of --deadline left, 1 still undecided"

    failing = Fleet({"g5": 0.05}, noise=0.01, seed=3, fail_round=1)
    out = remeasure(failing.measure, analysis_verdicts, ("matmul",), 5)
    assert len(failing.calls) == 1 and out.failures and out.stopped == "a failure in round 1, 1 still undecided"
    healthy = remeasure(Fleet({}, noise=0.002, seed=1, fail_round=1).measure, analysis_verdicts, ("matmul",), 5)
    assert healthy.stopped == "a failure in round 1"  # not "all decided": the round failed


def test_undecided_that_samples_cannot_decide_stop_at_once():
    fleet = Fleet({}, noise=0.01)

    def lone(samples):
        return [
            {
                "host": "h0",
                "gpu": "g0",
                "probe": "matmul",
                "verdict": "undecided",
                "samples_needed": None,
                "basis": "none",
                "undecided_reason": "nothing to compare with (no peers, history or reference)",
            }
        ]

    out = remeasure(fleet.measure, lone, ("matmul",), 5)
    assert len(fleet.calls) == 1
    assert (
        out.stopped == "1 undecided that more samples cannot decide (nothing to compare with (no peers, "
        "history or reference))"
    )


def test_an_uncertain_comparison_is_measured_again_at_the_round_maximum():
    # samples_needed is null when the peers' centre is too uncertain; a round measures the peers again too
    fleet = Fleet({}, noise=0.01)
    calls = []

    def uncertain(s):
        calls.append(len(s))
        return [
            {
                "host": "h0",
                "gpu": "g0",
                "probe": "matmul",
                "verdict": "undecided",
                "samples_needed": None,
                "basis": "fleet_peers",
                "undecided_reason": "comparison too uncertain to decide at the threshold",
            }
        ]

    out = remeasure(fleet.measure, uncertain, ("matmul",), 5, max_rounds=3)
    assert fleet.calls == [(("matmul",), 5), (("matmul",), 20), (("matmul",), 20)]
    assert out.stopped == "max rounds reached, 1 still undecided"
    assert calls == [N_DEVICES * 5, N_DEVICES * 25, N_DEVICES * 45]  # each analysis sees every round so far


def test_renumber_continues_per_probe_and_keeps_moments_paired():
    before = [{"gpu": g, "probe": "matmul", "settings": "a", "sample": i} for g in ("x", "y") for i in range(5)] + [
        {"gpu": "x", "probe": "membw", "settings": "b", "sample": i} for i in range(3)
    ]
    new = [
        {"gpu": g, "probe": p, "settings": s, "sample": i}
        for g in ("x", "y")
        for p, s in (("matmul", "a"), ("membw", "b"), ("pcie", "c"))
        for i in range(2)
    ]
    got = {
        (r["gpu"], r["probe"]): [
            x["sample"] for x in renumber(before, new) if (x["gpu"], x["probe"]) == (r["gpu"], r["probe"])
        ]
        for r in new
    }
    assert got[("x", "matmul")] == got[("y", "matmul")] == [5, 6]
    assert got[("x", "membw")] == got[("y", "membw")] == [3, 4]  # one offset per probe: y's moments pair with x's
    assert got[("x", "pcie")] == [0, 1]


def test_max_rounds_below_1_is_refused():
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        remeasure(Fleet({}, 0.01).measure, analysis_verdicts, ("matmul",), 5, max_rounds=0)


def test_the_combined_samples_are_valid_analysis_input():
    # The analysis refuses the same sample number with different values: the renumbering avoids it.
    fleet = Fleet({"g5": 0.05}, noise=0.01, seed=3)
    a, b = fleet.measure(("matmul",), 5), fleet.measure(("matmul",), 5)
    with pytest.raises(InputError):
        analysis_verdicts(a.samples + b.samples)
    assert analysis_verdicts(a.samples + renumber(a.samples, b.samples))


def test_an_analysis_or_round_that_raises_keeps_every_sample_measured():
    """An exception of the engine, or a further round that cannot start (a port, a fork), stops the
    rounds with the samples so far and says why; it never escapes with them."""
    fleet = Fleet({"g5": 0.05}, noise=0.01, seed=3)

    def broken(samples):
        raise ValueError("odd rows")

    out = remeasure(fleet.measure, broken, ("matmul",), 5)
    assert len(out.samples) == 5 * N_DEVICES and out.stopped == "cannot analyse the samples: ValueError: odd rows"

    calls = []

    def measure(probes, n):
        calls.append(n)
        if len(calls) > 1:
            raise OSError(98, "Address already in use")
        return fleet.measure(probes, n)

    out = remeasure(measure, analysis_verdicts, ("matmul",), 5)
    assert len(calls) == 2 and len(out.samples) == 5 * N_DEVICES  # round 1 kept
    assert out.stopped == "a failure in round 2, 1 still undecided"
    assert out.failures[-1]["probe"] == "round 2" and "Address already in use" in out.failures[-1]["error"]
