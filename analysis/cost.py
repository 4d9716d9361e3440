"""What a straggler costs. A synchronous step waits for its slowest device, so a device at rate r
among peers at rate R slows every job it joins by R / r - 1. For the fleet: the expected step time
of a job of N devices drawn at random from a peer group is the expected maximum of N relative step
times (order statistics of the group's empirical distribution); leaving the flagged devices out
shortens it by the ratio reported here."""

from __future__ import annotations

import math

import numpy as np


def device_cost(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """reference / value - 1, at least 0; NaN where unknown."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(reference / value - 1, 0, None)


def expected_max(step: np.ndarray, sizes, presorted: bool = False) -> list[float]:
    """E[max of n draws] for each n in ``sizes``, from the empirical distribution of ``step``
    (draws with replacement)."""
    t = step[np.isfinite(step)]
    t = t if presorted else np.sort(t)
    m = len(t)
    if m == 0:
        return [float("nan")] * len(sizes)
    with np.errstate(divide="ignore"):
        log_f = np.log(np.arange(0, m + 1) / m)  # log of the empirical CDF at each sorted value
    out = []
    for n in sizes:  # P(max = t_i) = F_i^n - F_(i-1)^n
        e = n * log_f
        e[e < -700] = -np.inf  # exactly 0 instead of subnormal numbers (slow, and below any t_i weight)
        # einsum, not np.dot: a BLAS dot of 100,000 values took 15-30 ms on a loaded 2-core machine
        # (its threads wait for cores), einsum 0.1 ms.
        out.append(float(np.einsum("i,i->", t, np.diff(np.exp(e)))))
    return out


def job_gain(step: np.ndarray, flagged: np.ndarray, group: np.ndarray, n_group: int,
             labels: list[dict], sizes: tuple[int, ...]) -> list[dict]:
    """Per peer group with at least one straggler, per job size N no larger than the group: the
    expected step time (relative to the group's healthy centre) with every device and without the
    flagged ones, and the speed-up from leaving them out. None where unknown: without a healthy
    device left (every device flagged) or without peers (no step time)."""
    out = []
    hit = np.bincount(group, weights=flagged, minlength=n_group) > 0
    size = np.bincount(group, minlength=n_group)
    for g in np.flatnonzero(hit):
        sel = group == g
        fit = [n for n in sizes if n <= size[g]]
        order = np.argsort(step[sel])  # one sort serves both distributions
        t, bad = step[sel][order], flagged[sel][order]
        for n, with_all, without in zip(fit, expected_max(t, fit, True), expected_max(t[~bad], fit, True)):
            # Every device flagged (or no step time known): nothing to run the job on without them.
            known = math.isfinite(with_all) and math.isfinite(without) and without > 0
            out.append({**labels[g], "job_devices": int(n), "step_time_all": _round(with_all),
                        "step_time_without_stragglers": _round(without),
                        "speedup": round(with_all / without - 1, 5) if known else None})
    return out


def _round(x: float) -> float | None:
    """Rounded for the JSON document; None where unknown (JSON has no NaN)."""
    return round(x, 5) if math.isfinite(x) else None
