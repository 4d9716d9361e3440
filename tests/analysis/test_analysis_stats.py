"""The numeric building blocks against plain references: group statistics, BH q-values, job cost."""

from __future__ import annotations

import itertools
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from straggler.analysis import cost, groups
from straggler.analysis.detect import bh_qvalues

finite = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), finite), min_size=1, max_size=80))
def test_group_median_and_quantile_match_pandas(pairs):
    codes = np.array([c for c, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs])
    n = 13
    med, q75 = groups.quantiles(codes, values, n, (0.5, 0.75))
    s = pd.Series(values).groupby(codes)
    ref = s.median().reindex(range(n)).to_numpy()
    np.testing.assert_allclose(med, ref, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(groups.median(codes, values, n), ref, rtol=1e-12, equal_nan=True)
    upper = s.apply(lambda v: np.sort(v.to_numpy())[int(np.ceil(0.75 * (len(v) - 1)))])
    np.testing.assert_allclose(q75, upper.reindex(range(n)).to_numpy(), rtol=1e-12, equal_nan=True)


def test_group_helpers_ignore_nan_and_factorize_combinations():
    codes = np.array([0, 0, 1, 1, 1, 3])
    values = np.array([1.0, np.nan, 2.0, 4.0, np.nan, 5.0])
    np.testing.assert_allclose(groups.mean(codes, values, 4), [1.0, 3.0, np.nan, 5.0])
    np.testing.assert_allclose(groups.extreme(codes, values, 4, "max"), [1.0, 4.0, np.nan, 5.0])
    code, n = groups.factorize(pd.Series(["a", "a", "b", None]), np.array([1, 2, 1, 1]))
    assert n == 4 and len(set(code)) == 4
    code, n = groups.factorize(pd.Series(["x", "y", "x"]), pd.Series([None, None, None]))
    assert n == 2 and code[0] == code[2] != code[1]  # missing values match each other
    assert list(groups.first_index(np.array([2, 0, 2, 1, 0]), 3)) == [1, 3, 0]


def test_bh_qvalues_match_the_textbook_example():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    q = bh_qvalues(p)
    # sorted p: .005 .01 .03 .04 (m = 4) -> .02 .02 .04 .04
    np.testing.assert_allclose(q[:4], [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(q[4])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=50))
def test_bh_qvalues_are_monotone_and_bounded(ps):
    p = np.array(ps)
    q = bh_qvalues(p)
    assert np.all(q >= p - 1e-15) and np.all(q <= 1)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(q[order]) >= -1e-15)


def test_expected_max_matches_brute_force():
    rng = np.random.default_rng(3)
    t = rng.random(6)
    # a job takes distinct devices: every set of 3 of the 6, without replacement
    sets = np.mean([max(c) for c in itertools.combinations(t, 3)])
    assert cost.expected_max(t, [3])[0] == pytest.approx(sets, rel=1e-9)
    assert cost.expected_max(t, [1])[0] == pytest.approx(t.mean(), rel=1e-9)
    assert cost.expected_max(t, [6])[0] == pytest.approx(t.max(), rel=1e-12)  # the whole group: its slowest
    assert np.isnan(cost.expected_max(t, [7])[0])  # no job of 7 distinct devices among 6


def test_a_job_as_large_as_its_host_always_waits_for_the_straggler():
    # 8 devices on one host, one at 0.80x (step 1.25): an 8-device job runs 1.25x the healthy step
    # time, and there is no 8-device job without it (not "16% faster", the with-replacement answer)
    step = np.array([1.0] * 7 + [1.25])
    flagged = np.array([False] * 7 + [True])
    [j8] = cost.job_gain(step, flagged, np.zeros(8, dtype=np.int64), 1, [{"probe": "matmul"}], (8,))
    assert j8["step_time_all"] == pytest.approx(1.25)
    assert j8["step_time_without_stragglers"] is None and j8["speedup"] is None
    [j4] = cost.job_gain(step, flagged, np.zeros(8, dtype=np.int64), 1, [{"probe": "matmul"}], (4,))
    assert j4["step_time_all"] == pytest.approx(1 + 0.25 * 4 / 8) and j4["speedup"] == pytest.approx(0.125)


def test_job_gain_without_stragglers():
    step = np.array([1.0] * 98 + [1.25, 1.1])
    flagged = np.array([False] * 98 + [True, True])
    group = np.zeros(100, dtype=np.int64)
    [j8, j64] = cost.job_gain(step, flagged, group, 1, [{"probe": "matmul"}], (8, 64, 512))
    # P(a job of 8 includes the 1.25 device) = 1 - 0.99^8; expected max follows from the two slow ones
    p_any = 1 - 0.98**8
    assert j8["step_time_without_stragglers"] == 1.0
    assert 1 + 0.1 * p_any < j8["step_time_all"] < 1 + 0.25 * p_any
    assert j64["speedup"] > j8["speedup"] > 0
    assert cost.device_cost(np.array([0.8, 1.2]), np.array([1.0, 1.0])).tolist() == [0.25, 0.0]


def test_job_gain_with_every_device_flagged_is_unknown_not_nan():
    step = np.array([1.0, 1.1, 1.2, 1.3, 1.0])
    flagged = np.array([True, True, True, True, False])
    group = np.array([0, 0, 0, 0, 1])
    labels = [{"probe": "a"}, {"probe": "b"}]
    [job] = cost.job_gain(step, flagged, group, 2, labels, (2, 8))
    assert job == {
        "probe": "a",
        "job_devices": 2,
        "step_time_all": pytest.approx(7.4 / 6, abs=1e-5),
        "step_time_without_stragglers": None,
        "speedup": None,
    }
    [lone] = cost.job_gain(np.array([np.nan, np.nan]), np.array([True, True]), np.array([0, 0]), 1, labels, (2,))
    assert lone["step_time_all"] is None and lone["speedup"] is None


def test_engine_codes_refuse_swapped_or_misshaped_arrays():
    """The engine's code arrays travel in one frozen object: a per-row array where a per-device one
    belongs, or codes beyond their count, are an error when the object is made, not wrong verdicts."""
    import dataclasses

    from straggler.analysis.codes import Codes, PastScans

    row_dev = np.array([0, 0, 1, 1, 2, 2])  # 2 sample rows per device
    group, host, rank = np.array([0, 0, 1]), np.array([0, 1, 2]), np.zeros(3, dtype=np.int64)
    ok = Codes(row_dev=row_dev, n_dev=3, group=group, n_group=2, host=host, n_host=3, cur_rank=rank)
    assert ok.group.tolist() == [0, 0, 1] and ok.host.tolist() == [0, 1, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.group = host  # type: ignore[misc]
    with pytest.raises(ValueError, match="group: 6 entries, 3 devices expected"):
        Codes(row_dev=group, n_dev=3, group=row_dev, n_group=2, host=host, n_host=3, cur_rank=rank)
    with pytest.raises(ValueError, match=r"group: codes outside 0\.\.1"):  # host codes given as groups
        Codes(row_dev=row_dev, n_dev=3, group=host, n_group=2, host=group, n_host=3, cur_rank=rank)
    with pytest.raises(ValueError, match="row_dev: integer codes expected"):
        Codes(row_dev=row_dev.astype(float), n_dev=3, group=group, n_group=2, host=host, n_host=3, cur_rank=rank)
    with pytest.raises(ValueError, match="value: 1 entries, 2 entries expected"):
        PastScans(dev=np.array([0, 1]), rank=np.array([-1, -1]), value=np.array([1.0]), median=np.ones(2))


def test_bh_qvalues_of_tied_p_values_do_not_depend_on_their_order():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(500).round(2), [0.0] * 7, [np.nan] * 5, [1.0] * 9])
    q = bh_qvalues(p)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(len(p))
        np.testing.assert_array_equal(bh_qvalues(p[perm]), q[perm])
    for v in np.unique(p[np.isfinite(p)]):
        assert len(np.unique(q[p == v])) == 1
