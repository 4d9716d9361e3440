"""The analysis engine on constructed fleets: detection, transients, small groups, history, causes, cost."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from straggler.analysis import AnalysisConfig, analyze
from straggler.errors import ConfigError, InputError

MODEL = "NVIDIA H100 80GB HBM3"


def fleet(
    n_hosts=16,
    per_host=4,
    samples=5,
    noise=0.01,
    spread=0.005,
    slow=None,
    seed=0,
    probe="matmul",
    scan_id=None,
    base=None,
    **columns,
) -> pd.DataFrame:
    """A result table: ``slow`` maps device number -> true ratio to nominal (1000)."""
    rng = np.random.default_rng(seed)
    n = n_hosts * per_host
    rate = 1 + rng.normal(0, spread, n) if base is None else np.asarray(base, dtype=float).copy()
    for i, r in (slow or {}).items():
        rate[i] = r
    rows = []
    for i in range(n):
        for s in range(samples):
            row = {
                "host": f"node{i // per_host:03d}",
                "gpu": f"GPU-{i:04d}",
                "index": i % per_host,
                "model": MODEL,
                "probe": probe,
                "settings": "n=8192,dtype=bf16",
                "sample": s,
                "value": 1000 * rate[i] * (1 + rng.normal(0, noise)),
                "unit": "GFLOP/s",
            }
            if scan_id is not None:
                row["scan_id"] = scan_id
            for col, values in columns.items():
                row[col] = values[i] if isinstance(values, (list, tuple, dict)) and i in range(len(values)) else values
            rows.append(row)
    return pd.DataFrame(rows)


def flagged(res) -> set[str]:
    return set(res.devices.loc[res.devices["straggler"], "gpu"])


def row(res, gpu: str) -> pd.Series:
    return res.devices.set_index("gpu").loc[gpu]


# --- detection ---------------------------------------------------------------------------------


def test_flags_exactly_the_slow_device_with_its_deficit_and_cost():
    res = analyze(fleet(slow={7: 0.92}))
    assert flagged(res) == {"GPU-0007"}
    r = row(res, "GPU-0007")
    assert r["basis"] == "fleet_peers+node_mates"  # slower than the fleet and than its node-mates
    assert r["verdict"] == "straggler"
    assert r["deficit"] == pytest.approx(0.08, abs=0.01)
    assert r["cost"] == pytest.approx(1 / 0.92 - 1, abs=0.012)
    assert r["q_value"] <= 0.01 and r["n_samples"] == 5
    assert res.devices.iloc[0]["gpu"] == "GPU-0007"  # stragglers first, ranked by cost
    assert res.summary["stragglers"] == 1 and res.summary["devices"] == 64


def test_healthy_fleets_flag_nothing():
    for seed in range(5):
        res = analyze(fleet(n_hosts=50, seed=seed))
        assert flagged(res) == set(), seed


def test_seven_percent_slow_is_a_straggler_and_three_percent_is_not():
    """The default threshold T is 4%: 7% is clearly above it, 3% clearly below (with 10 samples)."""
    res = analyze(fleet(n_hosts=50, slow={3: 0.93, 50: 0.93, 90: 0.97, 120: 0.97}, samples=10))
    assert flagged(res) == {"GPU-0003", "GPU-0050"}
    assert set(res.devices.loc[res.devices["gpu"].isin(["GPU-0090", "GPU-0120"]), "verdict"]) == {"slow"}
    # The same fleet decided at a threshold of 2%: 3% is then a straggler too.
    low = analyze(
        fleet(n_hosts=50, slow={3: 0.93, 50: 0.93, 90: 0.97, 120: 0.97}, samples=20),
        config=AnalysisConfig(min_effect=0.02),
    )
    assert flagged(low) == {"GPU-0003", "GPU-0050", "GPU-0090", "GPU-0120"}


def test_transient_dips_in_single_samples_do_not_flag():
    df = fleet()
    dev = df["gpu"] == "GPU-0005"
    idx = df.index[dev][:2]
    df.loc[idx, "value"] *= 0.5  # two of five samples dip to half speed
    res = analyze(df)
    assert flagged(res) == set()
    r = row(res, "GPU-0005")
    assert r["n_kept"] == 3 and abs(r["deficit"]) < 0.02


def test_twenty_percent_slow_devices_do_not_mask_each_other():
    slow = {i: 0.92 for i in range(0, 100, 5)}  # 20 of 100
    res = analyze(fleet(n_hosts=25, slow=slow))
    assert flagged(res) == {f"GPU-{i:04d}" for i in slow}
    healthy = res.devices[~res.devices["straggler"]]
    assert healthy["peer_median"].iloc[0] == pytest.approx(1000, rel=0.004)


def test_two_cpu_cores_decided_leave_one_out():
    slow = fleet(n_hosts=1, per_host=2, samples=8, noise=0.03, base=[1.0, 0.62])
    res = analyze(slow)
    assert flagged(res) == {"GPU-0001"}
    assert row(res, "GPU-0001")["basis"] == "host_peers_loo"
    assert "leave-one-out" in row(res, "GPU-0001")["evidence"]
    # A shared VM's idle cores differed by up to 7.5%: below the 10% asked of a pair.
    assert flagged(analyze(fleet(n_hosts=1, per_host=2, samples=8, noise=0.01, base=[1.0, 0.925]))) == set()
    # Two idle cores a percent or two apart, with noisy samples: nothing.
    for seed in range(5):
        idle = fleet(n_hosts=1, per_host=2, samples=5, noise=0.03, base=[1.0, 0.985], seed=seed)
        assert flagged(analyze(idle)) == set(), seed


def test_three_devices_and_a_single_peer_group_per_settings():
    df = pd.concat(
        [
            fleet(n_hosts=1, per_host=3, base=[1, 1, 0.8]),
            fleet(n_hosts=1, per_host=3, base=[1, 1, 1]).assign(settings="n=4096"),
        ]
    )
    res = analyze(df)
    assert set(res.devices["peer_group_size"]) == {3}
    assert len(res.devices) == 6
    assert flagged(res) == {"GPU-0002"}
    bad = res.devices[res.devices["straggler"]]
    assert list(bad["settings"]) == ["n=8192,dtype=bf16"]


def test_minimal_columns_are_enough():
    df = fleet(slow={2: 0.9})[["host", "gpu", "model", "probe", "value"]]
    res = analyze(df)
    assert flagged(res) == {"GPU-0002"}
    assert res.devices["index"].isna().all()


def test_a_device_slow_within_a_fast_node_is_found_by_its_node_mates():
    base = [1.0] * 64
    base[8:16] = [1.08] * 8  # node002 and node003 run 8% fast (cooling) ...
    base[13] = 1.0  # ... except GPU-0013: as fast as the fleet, 7.4% behind its node-mates
    res = analyze(fleet(base=base, spread=0, samples=10))
    assert flagged(res) == {"GPU-0013"}
    r = row(res, "GPU-0013")
    assert r["basis"] == "node_mates" and r["deficit"] == pytest.approx(1 - 1 / 1.08, abs=0.01)
    assert abs(r["ratio"] - 1) < 0.01  # in line with the fleet


def test_power_limit_separates_peers():
    limit = [700.0] * 60 + [500.0] * 4  # four devices run capped: they are their own peer group
    base = [1.0] * 60 + [0.9] * 4
    res = analyze(fleet(base=base, power_limit_w=limit, spread=0))
    assert flagged(res) == set()
    assert set(res.devices["peer_group_size"]) == {60, 4}


# --- causes ------------------------------------------------------------------------------------


def test_whole_node_slow_is_named():
    res = analyze(fleet(slow={12: 0.92, 13: 0.92, 14: 0.92, 15: 0.92, 40: 0.9}))
    assert flagged(res) == {"GPU-0012", "GPU-0013", "GPU-0014", "GPU-0015", "GPU-0040"}
    assert "whole_node" in row(res, "GPU-0013")["causes"]
    assert "node003" in row(res, "GPU-0013")["evidence"]
    assert list(row(res, "GPU-0040")["causes"]) == ["unexplained"]


def test_causes_come_from_telemetry():
    n = 64
    clock = [1980.0] * n
    throttle = ["sw_power_cap=0.900"] * n
    gen = [5] * n
    ecc = [0] * n
    procs = [1] * n
    throttle[1] = "sw_thermal_slowdown=0.600;sw_power_cap=0.300"
    clock[2], throttle[2] = 1850.0, "sw_power_cap=1.000"  # power-capped at a lower clock
    gen[3] = 3  # PCIe link trained down
    ecc[4] = 2  # uncorrected ECC errors
    procs[5] = 3  # other processes on the GPU
    base = [1.0] * n
    for i in range(1, 7):
        base[i] = 0.93
    res = analyze(
        fleet(
            base=base,
            spread=0,
            sm_clock_mhz=clock,
            throttle_reasons=throttle,
            pcie_gen=gen,
            pcie_gen_max=5,
            pcie_width=16,
            pcie_width_max=16,
            ecc_uncorrected_total=ecc,
            processes=procs,
            temp_c=70.0,
        )
    )
    assert flagged(res) == {f"GPU-{i:04d}" for i in range(1, 7)}
    assert list(row(res, "GPU-0001")["causes"]) == ["thermal"]
    assert "thermal slowdown 60%" in row(res, "GPU-0001")["evidence"]
    assert list(row(res, "GPU-0002")["causes"]) == ["power_capped"]
    assert "1850 MHz (peers 1980)" in row(res, "GPU-0002")["evidence"]
    assert list(row(res, "GPU-0003")["causes"]) == ["pcie_link"]
    assert "gen3 x16" in row(res, "GPU-0003")["evidence"]
    assert list(row(res, "GPU-0004")["causes"]) == ["memory"]
    assert list(row(res, "GPU-0005")["causes"]) == ["contention"]
    assert list(row(res, "GPU-0006")["causes"]) == ["unexplained"]
    assert res.summary["causes"]["thermal"] == 1


def test_slow_membw_probe_is_a_memory_cause():
    res = analyze(fleet(slow={9: 0.9}, probe="membw"))
    assert list(row(res, "GPU-0009")["causes"]) == ["memory"]


# --- history -----------------------------------------------------------------------------------


def drifting(scans=6, start=1.02, end=0.99):
    """A fleet scanned ``scans`` + 1 times; GPU-0009 drifts from ``start`` to ``end``."""
    frames = []
    for k in range(scans + 1):
        base = 1 + np.random.default_rng(42).normal(0, 0.005, 64)
        base[9] = start + (end - start) * k / scans
        frames.append(fleet(base=base, seed=k, scan_id=f"s{k}", ts=1.7e9 + 3600 * k))
    return frames


def degraded(res) -> set[str]:
    return set(res.devices.loc[res.devices["degraded"], "gpu"])


def test_degrading_device_is_degraded_on_its_own_history_inside_the_fleet_spread():
    """GPU-0009 lost 5% against its own past but ends 2% below the median, inside the spread: it is
    `degraded` (with the scan where the change began), not a straggler (its peer deficit is < T)."""
    frames = drifting(start=1.03, end=0.98)
    alone = analyze(frames[-1])
    assert flagged(alone) == set() and degraded(alone) == set()
    res = analyze(frames[-1], history=pd.concat(frames[:-1]))
    assert flagged(res) == set() and degraded(res) == {"GPU-0009"}
    r = row(res, "GPU-0009")
    assert r["history_scans"] == 6 and r["verdict"] in ("healthy", "slow")
    assert r["change_loss"] == pytest.approx(0.04, abs=0.015)
    assert r["change_scan"] in {f"s{k}" for k in range(1, 7)}
    assert r["change_ts"] == 1.7e9 + 3600 * int(r["change_scan"][1:])
    assert res.summary["degraded"] == 1


def test_a_degraded_device_whose_peer_deficit_reaches_the_threshold_is_a_straggler():
    frames = drifting(start=1.0, end=0.93)
    res = analyze(frames[-1], history=pd.concat(frames[:-1]))
    assert degraded(res) == {"GPU-0009"} and flagged(res) == {"GPU-0009"}
    assert "history" in row(res, "GPU-0009")["basis"].split("+")
    assert "degraded: lost" in row(res, "GPU-0009")["evidence"]


def test_earlier_scans_in_the_same_table_are_history():
    res = analyze(pd.concat(drifting(start=1.03, end=0.98)))
    assert degraded(res) == {"GPU-0009"}
    assert res.summary["scans"] == 7 and res.summary["samples"] == 64 * 5
    assert (res.devices["history_scans"] == 6).all()


def test_stable_history_flags_nothing():
    res = analyze(pd.concat(drifting(start=1.0, end=1.0)))
    assert flagged(res) == set() and degraded(res) == set()


def test_single_device_uses_history_or_reference_or_fails():
    one = fleet(n_hosts=1, per_host=1, base=[0.85])
    alone = row(analyze(one), "GPU-0000")  # nothing to compare with: no verdict (the CLI says so)
    assert alone["basis"] == "none" and not alone["straggler"] and np.isnan(alone["deficit"])
    res = analyze(one, config=AnalysisConfig(references=(f"{MODEL}|matmul=1000",)))
    assert flagged(res) == {"GPU-0000"}
    assert row(res, "GPU-0000")["basis"] == "reference"
    past = fleet(n_hosts=1, per_host=1, base=[1.0], scan_id="old", ts=1.0)
    res = analyze(one.assign(scan_id="new", ts=2.0), history=past)
    assert row(res, "GPU-0000")["basis"] == "history" and flagged(res) == {"GPU-0000"}


# --- bad input ---------------------------------------------------------------------------------


def test_missing_required_column_is_named():
    with pytest.raises(InputError, match="missing required column value"):
        analyze(fleet().drop(columns="value"))
    with pytest.raises(InputError, match="host, model"):
        analyze(fleet().drop(columns=["host", "model"]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (float("inf"), r"row 8: column 'value' is infinite"),
        (-3.0, r"row 8: column 'value' is negative"),
        ("fast", r"row 8: column 'value' is not a number: 'fast'"),
    ],
)
def test_impossible_values_name_the_row(bad, message):
    df = fleet().astype({"value": object})
    df.loc[7, "value"] = bad
    with pytest.raises(InputError, match=message):
        analyze(df)


def test_unusable_rows_are_dropped_and_counted():
    df = fleet(slow={3: 0.9})
    df.loc[[1, 2], "value"] = np.nan
    df.loc[4, "host"] = None
    df = pd.concat([df, df.iloc[[10, 11, 12]]], ignore_index=True)  # the same samples again
    res = analyze(df)
    assert res.dropped == {"value missing": 2, "host missing": 1, "duplicate row": 3}
    assert res.summary["dropped"] == res.dropped
    assert res.summary["samples"] == 64 * 5 - 3
    assert flagged(res) == {"GPU-0003"}


def test_the_same_sample_with_two_values_is_an_error():
    df = fleet()
    dup = df.iloc[[20]].assign(value=1.0)
    with pytest.raises(InputError, match=r"rows 21 and 321 record the same sample .*GPU-0004"):
        analyze(pd.concat([df, dup], ignore_index=True))


def test_mixed_units_within_a_probe_are_an_error():
    df = fleet()
    df.loc[df["gpu"] == "GPU-0001", "unit"] = "TFLOP/s"
    with pytest.raises(InputError, match="probe matmul .* mixes units GFLOP/s, TFLOP/s"):
        analyze(df)


def test_nothing_usable_and_bad_config_are_errors():
    with pytest.raises(InputError, match="no usable rows .*value missing"):
        analyze(fleet().assign(value=np.nan))
    with pytest.raises(ConfigError) as e:
        analyze(fleet(), config=AnalysisConfig(fdr=2, min_effect=-1, references=("nonsense",)))
    assert "fdr" in str(e.value) and "min_effect" in str(e.value) and "references" in str(e.value)


# --- output ------------------------------------------------------------------------------------


def test_json_document():
    res = analyze(fleet(slow={5: 0.9}))
    doc = res.to_json()
    json.dumps(doc, allow_nan=False)
    assert set(doc) == {"gpus", "summary"}
    assert len(doc["gpus"]) == 64
    top = doc["gpus"][0]
    for key in ("host", "gpu", "straggler", "probe", "deficit", "basis", "causes", "cost"):
        assert key in top
    assert top["gpu"] == "GPU-0005" and top["straggler"] is True and top["causes"] == ["unexplained"]
    assert doc["gpus"][1]["causes"] == [] and doc["gpus"][1]["history_baseline"] is None
    jobs = doc["summary"]["job_cost"]
    assert [j["job_devices"] for j in jobs] == [8, 64]  # 512 and 4096 exceed the group: left out
    assert jobs[0]["speedup"] > 0


def test_json_keeps_a_stragglers_tiny_p_value_to_six_digits():
    res = analyze(fleet(slow={5: 0.8, 9: 0.93}))
    p = res.devices.set_index("gpu")["p_value"]
    assert 0 < p["GPU-0005"] < 1e-9 < p["GPU-0009"] < 1e-6  # at 6 decimals: 0.0 and 0.000001
    doc = {g["gpu"]: g for g in res.to_json()["gpus"]}
    for gpu, value in p.dropna().items():
        written = doc[gpu]["p_value"]
        if value >= 1e-9:
            assert written == pytest.approx(value, rel=1e-6), gpu
        else:  # 15 decimals, or the exponent form below 1e-16: never 0 for a p-value that is not
            assert written > 0 and abs(written - value) <= 5e-16, gpu


def test_probes_are_analysed_separately():
    df = pd.concat([fleet(slow={1: 0.9}), fleet(probe="membw", seed=3)])
    res = analyze(df)
    assert res.summary["probes"] == {
        "matmul": {"devices": 64, "stragglers": 1},
        "membw": {"devices": 64, "stragglers": 0},
    }
    assert res.summary["entries"] == 128 and res.summary["devices"] == 64


def test_one_sample_per_device_tests_against_the_spread_between_devices():
    res = analyze(fleet(n_hosts=16, samples=1, spread=0.01, slow={3: 0.85, 4: 0.975}))
    assert flagged(res) == {"GPU-0003"}  # 2.5% is within 2.5 spreads of the 1%-spread fleet
    pair = analyze(fleet(n_hosts=1, per_host=2, samples=1, base=[1.0, 0.5]))
    assert flagged(pair) == set() and pair.devices["p_value"].isna().all()  # no noise known: no verdict


def test_history_repeating_the_input_scan_is_not_history_and_input_is_not_modified():
    frames = drifting(start=1.03, end=0.98)
    current = frames[-1]
    before = current.copy()
    res = analyze(current, history=pd.concat(frames))  # the store already holds the current scan
    assert res.dropped == {"history: scan also in the input": 64 * 5}
    assert degraded(res) == {"GPU-0009"} and (res.devices["history_scans"] == 6).all()
    pd.testing.assert_frame_equal(current, before)
    only = analyze(current, history=current)
    assert only.summary["history_rows"] == 0 and flagged(only) == set()


def test_verdicts_do_not_depend_on_row_order_or_units():
    df = pd.concat([fleet(slow={3: 0.93, 17: 0.8, 40: 0.975}), fleet(probe="membw", seed=5, slow={8: 0.9})])
    base = analyze(df).devices.set_index(["gpu", "probe"]).sort_index()
    shuffled = analyze(df.sample(frac=1, random_state=7)).devices.set_index(["gpu", "probe"]).sort_index()
    scaled = analyze(df.assign(value=df["value"] * 1e-3)).devices.set_index(["gpu", "probe"]).sort_index()
    for other in (shuffled, scaled):
        assert (other["straggler"] == base["straggler"]).all() and (other["verdict"] == base["verdict"]).all()
        np.testing.assert_allclose(other["deficit"], base["deficit"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(other["q_value"], base["q_value"], rtol=1e-6)
    assert set(base.index[base["straggler"]]) == {("GPU-0003", "matmul"), ("GPU-0017", "matmul"), ("GPU-0008", "membw")}
    assert base.loc[("GPU-0040", "matmul"), "verdict"] == "slow"  # 2.5%: under T, in the slow tail


def test_small_groups_pair_samples_taken_at_the_same_moment():
    """Load that slows the whole machine for a window hits both cores' samples of that window."""
    load = np.array([1.0, 0.6, 0.95, 0.55, 0.8])  # machine-wide slowdown per sample window
    rng = np.random.default_rng(11)

    def pair(ratio):
        return pd.DataFrame(
            [
                {
                    "host": "vm",
                    "gpu": f"cpu{d}",
                    "model": "cpu",
                    "probe": "matmul",
                    "sample": s,
                    "value": 40 * load[s] * (ratio if d else 1) * (1 + rng.normal(0, 0.01)),
                }
                for d in range(2)
                for s in range(5)
            ]
        )

    slow = pair(0.8)
    res = analyze(slow)
    assert flagged(res) == {"cpu1"}
    assert row(res, "cpu1")["deficit"] == pytest.approx(0.2, abs=0.02)
    unpaired = analyze(slow.drop(columns="sample"))  # the windows unknown: the common load is noise
    assert flagged(unpaired) == set() and row(unpaired, "cpu1")["q_value"] > 0.01
    assert flagged(analyze(pair(0.97))) == set()  # paired and precise, but below the 10% asked of a pair


# --- review regressions ------------------------------------------------------------------------


def test_a_fleet_wide_shift_is_not_a_change_of_each_device():
    """8 GPUs whose second scan is all 5% slower (a driver update, a warm room): nobody degraded."""
    base = 1 + np.random.default_rng(3).normal(0, 0.005, 8)
    before = fleet(n_hosts=2, base=base, seed=1, scan_id="c1", ts=1.0)
    after = fleet(n_hosts=2, base=base * 0.95, seed=2, scan_id="c2", ts=2.0)
    res = analyze(after, history=before)
    assert flagged(res) == set() and degraded(res) == set() and (res.devices["history_scans"] == 1).all()
    assert res.devices["history_deficit"].abs().max() < 0.02
    slow = base * 0.95
    slow[5] *= 0.95  # this one also lost 5% against its own past; its peers did not
    res = analyze(fleet(n_hosts=2, base=slow, seed=2, scan_id="c2", ts=2.0), history=before)
    assert degraded(res) == {"GPU-0005"}
    r = row(res, "GPU-0005")
    assert r["history_deficit"] == pytest.approx(0.05, abs=0.015)
    assert r["change_loss"] == pytest.approx(0.05, abs=0.015) and r["change_scan"] == "c2"
    assert r["verdict"] in ("straggler", "undecided")  # 5% against T = 4% on 5 samples: re-measure
    slower = slow.copy()
    slower[5] = base[5] * 0.95 * 0.9  # lost 10%: degraded and a straggler, the history named
    res = analyze(fleet(n_hosts=2, base=slower, seed=2, scan_id="c2", ts=2.0), history=before)
    assert flagged(res) == {"GPU-0005"} and "history" in row(res, "GPU-0005")["basis"]
    assert "relative to its peers" in row(res, "GPU-0005")["evidence"]


def test_one_past_scan_is_not_taken_for_a_noiseless_baseline():
    """With one past scan the scan-to-scan change is unknown: a prior stands in for it (a 3% change
    of a lone device measured to 0.1% is within what a room or a driver does to it; 15% is not)."""
    one = fleet(n_hosts=1, per_host=1, base=[0.97], noise=0.001, samples=10, scan_id="new", ts=2.0)
    past = fleet(n_hosts=1, per_host=1, base=[1.0], noise=0.001, samples=10, seed=1, scan_id="old", ts=1.0)
    res = analyze(one, history=past)
    assert row(res, "GPU-0000")["basis"] == "history" and flagged(res) == set()
    assert row(res, "GPU-0000")["history_deficit"] == pytest.approx(0.03, abs=0.002)
    assert flagged(analyze(one.assign(value=one["value"] * 0.85 / 0.97), history=past)) == {"GPU-0000"}


def test_history_of_a_device_is_kept_when_only_other_devices_repeat_its_scan():
    """h1 (node000) in scans c1 and c2, the other hosts only in c1; h1 is 10% slower in c2. The
    input holds every device's latest rows, the store every scan: only the repeated rows go."""
    base = 1 + np.random.default_rng(4).normal(0, 0.005, 64)
    c1 = fleet(base=base, seed=1, scan_id="c1", ts=1.0)
    c2 = fleet(base=base * 0.9, seed=2, scan_id="c2", ts=2.0)
    h1 = c2["host"] == "node000"
    current = pd.concat([c2[h1], c1[c1["host"] != "node000"]], ignore_index=True)
    res = analyze(current, history=pd.concat([c1, c2[h1]], ignore_index=True))
    assert res.dropped == {"history: scan also in the input": 64 * 5}
    for gpu in ("GPU-0000", "GPU-0003"):
        r = row(res, gpu)
        assert r["history_scans"] == 1 and "history" in r["basis"]
        assert r["history_deficit"] == pytest.approx(0.1, abs=0.03)
    assert (res.devices.set_index("gpu").drop(index=[f"GPU-{i:04d}" for i in range(4)])["history_scans"] == 0).all()


def test_a_peer_group_flagged_entirely_has_no_job_cost_and_valid_json():
    """Every device of a group flagged (no job can run without them): no speed-up, valid JSON. With
    verdicts decided against the group's own centre a whole group is not flagged by analyze(), so
    the job cost is asked directly."""
    from straggler.analysis import cost

    step = np.array([1 / 0.7, 1.0])
    [job] = cost.job_gain(step, np.array([True, True]), np.array([0, 0]), 1, [{"model": MODEL}], (2,))
    assert job["job_devices"] == 2 and job["step_time_all"] > 1
    assert job["speedup"] is None and job["step_time_without_stragglers"] is None
    json.dumps(job, allow_nan=False)
    # The pair that used to be flagged entirely: GPU-0000 fell 30% behind GPU-0001, which lost
    # against its own past relative to GPU-0000 but is the faster one: only GPU-0000 is a straggler.
    past = fleet(n_hosts=1, per_host=2, base=[1.0, 1.5], seed=1, scan_id="old", ts=1.0)
    now = fleet(n_hosts=1, per_host=2, base=[0.7, 1.0], seed=2, scan_id="new", ts=2.0)
    res = analyze(now, history=past, config=AnalysisConfig(job_sizes=(2,)))
    assert flagged(res) == {"GPU-0000"}
    json.dumps(res.to_json(), allow_nan=False)


def test_blank_sample_numbers_are_not_one_sample():
    """Two files, one with a sample column, one without: the rows without a number are not repeats."""
    full = fleet(n_hosts=2)
    minimal = fleet(n_hosts=2, seed=5).assign(gpu=lambda d: d["gpu"] + "b")[["host", "gpu", "model", "probe", "value"]]
    res = analyze(pd.concat([full, minimal], ignore_index=True))
    assert res.dropped == {} and res.summary["samples"] == 2 * 8 * 5
    with_ts = pd.concat([full, minimal.assign(ts=np.tile(np.arange(5), 8) + 1.0)], ignore_index=True)
    again = pd.concat([with_ts, with_ts.iloc[[45]]], ignore_index=True)  # a blank-sample row repeated
    assert analyze(again).dropped == {"duplicate row": 1}


def test_an_unreadable_throttle_cell_is_ignored_not_fatal():
    df = fleet(slow={9: 0.9}, throttle_reasons="")
    df.loc[df["gpu"] == "GPU-0009", "throttle_reasons"] = "sw_power_cap=x"
    df.loc[df["gpu"] == "GPU-0002", "throttle_reasons"] = "sw_thermal_slowdown=0.5"
    res = analyze(df)
    assert flagged(res) == {"GPU-0009"} and res.summary["samples"] == 64 * 5
    assert res.dropped == {"throttle_reasons unreadable (cell ignored)": 5}
    assert list(row(res, "GPU-0009")["causes"]) == ["unexplained"]


def test_parquet_text_read_as_categories_gives_the_same_document_as_text(tmp_path):
    """records.read_table reads a Parquet file's text columns as categoricals (no string per row);
    the analysis must give exactly what it gives on the same rows as "string" columns, with
    missing and empty cells, two scans in the table, a history file, throttle reasons and a
    dropped row among them."""
    from straggler.records import read_table

    past = pd.concat([fleet(seed=s, scan_id=f"s{s}", ts=float(s)) for s in range(3)], ignore_index=True)
    two = [fleet(seed=7, scan_id="s7", ts=7.0), fleet(seed=8, scan_id="s8", ts=8.0, slow={5: 0.9, 6: 0.95})]
    now = pd.concat(two, ignore_index=True)
    now["throttle_reasons"] = np.where(now["gpu"] == "GPU-0005", "sw_power_cap=0.5", "")
    now.loc[now["gpu"] == "GPU-0011", "settings"] = ""  # no settings: a peer group of its own
    now.loc[now["gpu"] == "GPU-0012", "settings"] = None
    now.loc[3, "host"] = None  # a row without a host: dropped and counted
    now.loc[(now["gpu"] == "GPU-0020") & (now["scan_id"] == "s7"), "scan_id"] = ""  # a blank scan id
    now.to_parquet(tmp_path / "now.parquet", index=False)
    past.to_parquet(tmp_path / "past.parquet", index=False)

    fast, fast_past = read_table(tmp_path / "now.parquet"), read_table(tmp_path / "past.parquet")
    assert isinstance(fast["gpu"].dtype, pd.CategoricalDtype)  # else this test compares one path with itself
    text = {c: "string" for c in ("host", "gpu", "model", "probe", "settings", "unit", "scan_id", "throttle_reasons")}
    plain = pd.read_parquet(tmp_path / "now.parquet").astype(text)
    plain_past = pd.read_parquet(tmp_path / "past.parquet").astype({k: v for k, v in text.items() if k in past})
    for history in (None, "past"):
        a = analyze(fast, fast_past if history else None)
        b = analyze(plain, plain_past if history else None)
        assert a.to_json_text() == b.to_json_text() and a.dropped == b.dropped
        for c in ("host", "gpu", "model", "probe", "settings"):
            assert a.devices[c].dtype == b.devices[c].dtype == "string", c
    # one side categorical, the other text (the collector's summaries beside its latest samples)
    for mixed in (analyze(fast, plain_past), analyze(plain, fast_past)):
        assert mixed.to_json_text() == b.to_json_text() and mixed.dropped == b.dropped
    assert a.dropped == {"host missing": 1} and a.summary["history_rows"] > 0
    assert flagged(a) == {"GPU-0005", "GPU-0006"} and set(
        a.devices.loc[a.devices["gpu"] == "GPU-0011", "settings"]
    ) == {""}


def summaries(frames) -> pd.DataFrame:
    """Per-scan summaries of ``frames`` (one scan each): one row per device, the ``value`` and
    ``median`` the analysis of that scan alone reports."""
    out = []
    for f in frames:
        d = analyze(f).devices
        keys = d[["host", "gpu", "index", "model", "probe", "settings"]]
        out.append(keys.assign(scan_id=f["scan_id"].iloc[0], ts=f["ts"].max(), value=d["value"], median=d["median"]))
    return pd.concat(out, ignore_index=True)


def test_history_given_as_per_scan_summaries_decides_as_the_samples_do():
    """One row per device and past scan (its value and median) instead of its samples: the same
    verdicts, the same degraded device and change scan, nearly the same baseline."""
    for start, end in ((1.03, 0.98), (1.0, 0.93), (1.0, 1.0)):
        frames = drifting(start=start, end=end)
        raw = analyze(frames[-1], history=pd.concat(frames[:-1])).devices.set_index("gpu").sort_index()
        summ = summaries(frames[:-1])
        assert len(summ) == 64 * 6
        got = analyze(frames[-1], history=summ).devices.set_index("gpu").sort_index()
        for c in ("verdict", "straggler", "degraded", "history_scans"):
            assert (got[c] == raw[c]).all(), (start, end, c)
        assert (got["change_scan"].fillna("-") == raw["change_scan"].fillna("-")).all()
        np.testing.assert_allclose(got["history_baseline"], raw["history_baseline"], rtol=0.01)
    assert set(got.index[got["degraded"]]) == set()  # the stable fleet
    # the summary's numbers are the ones read: the change is found on its medians, the baseline is its values
    frames = drifting(start=1.03, end=0.98)
    summ = summaries(frames[:-1])
    nine = summ["gpu"] == "GPU-0009"
    assert degraded(analyze(frames[-1], history=summ)) == {"GPU-0009"}
    flat = summ.copy()
    flat.loc[nine, "median"] = flat.loc[nine, "median"].iloc[-1]  # no drift in the medians
    assert degraded(analyze(frames[-1], history=flat)) == set()
    low = summ.copy()
    low.loc[nine, "value"] *= 0.9
    base = row(analyze(frames[-1], history=summ), "GPU-0009")["history_baseline"]
    assert row(analyze(frames[-1], history=low), "GPU-0009")["history_baseline"] < 0.95 * base


def test_a_summary_row_beside_samples_of_its_scan_or_a_bad_median_is_an_error():
    frames = drifting()
    mixed = pd.concat([frames[0], summaries(frames[:1])], ignore_index=True)
    with pytest.raises(InputError, match="summary rows .* share their device and scan with other rows"):
        analyze(frames[-1], history=mixed)
    bad = summaries(frames[:2]).astype({"median": object})
    bad.loc[70, "median"] = "fast"
    with pytest.raises(InputError, match=r"history: row 71: column 'median' is not a number: 'fast'"):
        analyze(frames[-1], history=bad)
    bad.loc[70, "median"] = -1.0
    with pytest.raises(InputError, match=r"history: row 71: column 'median' is negative"):
        analyze(frames[-1], history=bad)


def test_parquet_text_of_several_probes_and_units_is_checked_without_a_warning(tmp_path):
    """Units differ between probes (the usual scan): the unit check groups the Parquet file's
    categorical probe and settings columns, with no FutureWarning on stderr under the supported
    pandas 2.x either (its groupby on categoricals warned about the default of observed)."""
    import warnings

    from straggler.records import read_table

    two = pd.concat([fleet(seed=1, slow={5: 0.9}), fleet(seed=2, probe="membw").assign(unit="GB/s")], ignore_index=True)
    two.loc[two["probe"] == "membw", "settings"] = ""
    two.to_parquet(tmp_path / "two.parquet", index=False)
    table = read_table(tmp_path / "two.parquet")
    assert isinstance(table["probe"].dtype, pd.CategoricalDtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = analyze(table)
        assert flagged(res) == {"GPU-0005"}
        table["unit"] = table["unit"].cat.add_categories(["TFLOP/s"])
        table.loc[3, "unit"] = "TFLOP/s"
        with pytest.raises(InputError, match=r"probe matmul \(n=8192,dtype=bf16\) mixes units GFLOP/s, TFLOP/s"):
            analyze(table)
