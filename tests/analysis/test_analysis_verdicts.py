"""Decision-grade verdicts (issue 9): decided relative to the threshold T, tiers, undecided with the
samples that would decide it, the healthy spread and its warning, placement classes, and
throttle_reasons in the forms users have."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from test_analysis import fleet, flagged, row
from straggler import records
from straggler.analysis import analyze
from straggler.analysis.detect import Test as Evidence
from straggler.analysis.detect import decide


def test_a_device_just_above_the_threshold_is_undecided_until_enough_samples_decide_it():
    """5% slow, T = 4%, 5 samples of 1% noise: its interval straddles T -> undecided with the number
    of further samples that would decide it; with that many more it is a straggler."""
    res = analyze(fleet(n_hosts=50, slow={7: 0.95}, spread=0.0, seed=1))
    r = row(res, "GPU-0007")
    assert not r["straggler"] and r["verdict"] == "undecided"
    assert r["undecided_reason"] == "near the threshold"
    need = int(r["samples_needed"])
    assert 1 <= need <= 100
    more = fleet(n_hosts=50, slow={7: 0.95}, spread=0.0, seed=1, samples=5 + need)
    assert row(analyze(more), "GPU-0007")["verdict"] == "straggler"
    assert res.summary["verdicts"]["undecided"] >= 1 and res.summary["verdicts"]["straggler"] == 0


def test_many_samples_of_a_device_slower_than_the_median_but_under_t_never_make_a_straggler():
    """Decided relative to T, not to zero: 3% slow measured to 0.1% is credibly slow, not a straggler."""
    res = analyze(fleet(n_hosts=50, slow={3: 0.97}, samples=60, spread=0.002))
    r = row(res, "GPU-0003")
    assert not r["straggler"] and r["verdict"] == "slow"
    assert r["p_value"] > 0.5  # of "deficit <= T"
    assert flagged(res) == set()


def test_nothing_to_compare_with_is_undecided_with_its_reason():
    res = analyze(fleet(n_hosts=1, per_host=1))
    r = row(res, "GPU-0000")
    assert r["verdict"] == "undecided" and "nothing to compare with" in r["undecided_reason"]


def test_bh_controls_the_decision_across_the_fleet():
    """The same evidence (6% +- 0.5%, T = 4%) decides a device tested alone, not one among 1,000
    tests straddling T (Benjamini-Hochberg); a stronger one (8%) is decided among them too."""

    def tests(d):
        n = len(d)
        return Evidence(
            np.full(n, "fleet_peers", dtype=object),
            np.asarray(d, dtype=float),
            np.full(n, 0.005),
            np.full(n, 12.0),
            np.full(n, 0.04),
        )

    alone = decide([tests([0.06])], fdr=0.01, clear_level=0.05, n_samples=np.array([5]))
    assert alone.straggler[0]
    crowd = decide([tests([0.06, 0.08] + [0.041] * 998)], fdr=0.01, clear_level=0.05, n_samples=np.full(1000, 5))
    assert not crowd.straggler[0] and crowd.undecided[0] and crowd.straggler[1]
    assert not crowd.straggler[2:].any() and crowd.undecided[2:].all()
    assert crowd.samples_needed[0] < crowd.samples_needed[2]  # further from T: fewer samples decide it


def test_healthy_spread_is_reported_net_of_noise_and_warns_when_t_lies_inside_it():
    narrow = analyze(fleet(n_hosts=100, spread=0.005, seed=3))
    [g] = narrow.summary["groups"]
    assert g["devices"] == 400 and g["spread_net"] == pytest.approx(0.005, abs=0.0015)
    assert g["spread"] > g["spread_net"] and g["noise"] == pytest.approx(0.0045, abs=0.0015)
    assert narrow.summary["warnings"] == []
    assert narrow.devices["peer_spread"].iloc[0] == pytest.approx(g["spread_net"], abs=1e-6)
    wide = analyze(fleet(n_hosts=100, spread=0.02, seed=3))
    [w] = wide.summary["warnings"]
    assert "min_effect 4.0% lies inside the normal spread" in w and "\n" not in w
    assert wide.summary["groups"][0]["spread_net"] == pytest.approx(0.02, abs=0.004)


def test_placement_classes_a_fastest_to_d_slowest_with_the_interval():
    res = analyze(fleet(n_hosts=25, spread=0.01, seed=4))
    d = res.devices
    assert d["perf_class"].value_counts().to_dict() == {"A": 25, "B": 25, "C": 25, "D": 25}
    by = d.groupby("perf_class")["ratio"]
    assert by.min()["A"] >= by.max()["B"] and by.min()["B"] >= by.max()["C"] and by.min()["C"] >= by.max()["D"]
    assert (d["ratio_low"] < d["ratio"]).all() and (d["ratio"] < d["ratio_high"]).all()
    doc = res.to_json()
    assert {"perf_class", "ratio_low", "ratio_high", "verdict", "degraded", "samples_needed"} <= set(doc["gpus"][0])
    # Small groups (2-3 devices) get no class.
    assert analyze(fleet(n_hosts=1, per_host=2)).devices["perf_class"].isna().all()


@pytest.mark.parametrize(
    "cell, reasons, unknown",
    [
        ("sw_power_cap=0.500", {"sw_power_cap": 0.5}, []),
        (36, {"sw_power_cap": 1.0, "sw_thermal_slowdown": 1.0}, []),  # NVML/DCGM bit mask
        ("0x24", {"sw_power_cap": 1.0, "sw_thermal_slowdown": 1.0}, []),
        ("36", {"sw_power_cap": 1.0, "sw_thermal_slowdown": 1.0}, []),
        ("sw_power_cap|hw_slowdown", {"sw_power_cap": 1.0, "hw_slowdown": 1.0}, []),
        ("sw_power_cap,hw_slowdown", {"sw_power_cap": 1.0, "hw_slowdown": 1.0}, []),
        ("hw_slowdown", {"hw_slowdown": 1.0}, []),
        ("SwThermalSlowdown", {"sw_thermal_slowdown": 1.0}, []),
        ("DCGM_CLOCKS_THROTTLE_REASON_HW_SLOWDOWN", {"hw_slowdown": 1.0}, []),
        ("sw_power_cap|overheating", {"sw_power_cap": 1.0}, ["overheating"]),
        (0x404, {"sw_power_cap": 1.0}, ["0x400"]),  # a bit that is no NVML clock-event reason
        (None, {}, []),
        ("", {}, []),
    ],
)
def test_throttle_reasons_in_every_form(cell, reasons, unknown):
    assert records.read_throttle(cell) == (reasons, unknown)
    assert records.parse_throttle(cell) == reasons


def test_one_list_of_reason_names():
    from straggler.probes import telemetry

    assert telemetry.THROTTLE_REASONS is records.THROTTLE_REASONS
    assert set(records.THROTTLE_BITS) == set(records.THROTTLE_REASONS)


def test_throttle_bit_masks_name_the_cause_and_unknown_names_are_counted_never_taken():
    df = fleet(slow={9: 0.85, 20: 0.85}, throttle_reasons="4")  # everyone at the power cap (bit 0x4)
    df.loc[df["gpu"] == "GPU-0009", "throttle_reasons"] = "36"  # + SW thermal slowdown (0x20)
    df.loc[df["gpu"] == "GPU-0020", "throttle_reasons"] = "sw_power_cap|too_hot"  # not an NVML reason
    res = analyze(df)
    assert flagged(res) == {"GPU-0009", "GPU-0020"}
    assert "thermal" in row(res, "GPU-0009")["causes"]
    assert list(row(res, "GPU-0020")["causes"]) == ["unexplained"]
    assert res.dropped == {"throttle_reasons not an NVML clock-event reason (name ignored)": 5}
    assert res.summary["samples"] == 64 * 5  # nothing measured is lost


def test_bh_reject_matches_the_q_values():
    from straggler.analysis.detect import bh_qvalues, bh_reject

    rng = np.random.default_rng(0)
    for k in range(50):
        p = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0, 0.001, k), [np.nan] * 3])
        for fdr in (0.01, 0.05):
            assert (bh_reject(p, fdr) == (bh_qvalues(p) <= fdr)).all()


def test_identical_healthy_devices_have_no_spread_and_the_slow_one_is_decided():
    """Three devices measuring exactly 100 and one at 60: no device lies above the centre, so the
    healthy spread is 0 (not unknown) and the 40% deficit is a straggler."""
    rows = [
        {"host": "h", "gpu": f"g{d}", "model": "m", "probe": "matmul", "sample": s, "value": v}
        for d, values in enumerate(([100, 100, 100],) * 3 + ([60, 61, 60],))
        for s, v in enumerate(values)
    ]
    res = analyze(pd.DataFrame(rows))
    assert flagged(res) == {"g3"}
    assert res.summary["groups"][0]["spread"] == 0.0
