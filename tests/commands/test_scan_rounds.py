"""`straggler scan` re-measures the undecided devices: real workers on this machine's cores, real gloo."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import run_cmd, scan_timeout_s

from straggler.records import read_table
from straggler.remeasure import analysis_verdicts, remeasure

CORES = sorted(os.sched_getaffinity(0))


def per_device_samples(samples):
    out = {}
    for s in samples:
        out.setdefault((s["gpu"], s["probe"]), []).append(s["sample"])
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 CPU cores: one device has no peer to be compared with")
def test_scan_reports_its_rounds_and_numbers_samples_across_them(straggler_cmd, tmp_path):
    out = tmp_path / "s.jsonl"
    # at most 2 rounds: the first, and one of at most 4 x 5 samples
    proc = run_cmd(
        [
            *straggler_cmd,
            "scan",
            "--probes",
            "matmul",
            "--duration",
            "1",
            "--max-rounds",
            "2",
            "--json",
            "--output",
            str(out),
        ],
        SCAN_S * 2,
    )
    # exit 2 only as "could not decide": a device still undecided when the 2 rounds were spent (checked below)
    assert proc.returncode in (0, 1) or proc.stderr.startswith("straggler: error: could not decide: "), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["devices"] and all(d["verdict"] in ("healthy", "straggler", "slow", "undecided") for d in doc["devices"])
    rounds = doc["rounds"]
    assert rounds["max_rounds"] == 2 and rounds["rounds"] == len(rounds["per_round"]) in (1, 2)
    assert [r["round"] for r in rounds["per_round"]] == list(range(1, rounds["rounds"] + 1))
    assert rounds["per_round"][0] == {
        "round": 1,
        "probes": ["matmul"],
        "samples": 5,
        "undecided": rounds["per_round"][0]["undecided"],
    }
    undecided_after = rounds["per_round"][-1]["undecided"]
    if rounds["rounds"] == 1:
        assert rounds["stopped"] == "all decided" and undecided_after == 0
    else:  # a second round ran because a device was undecided after the first
        assert rounds["per_round"][0]["undecided"] >= 1 and 5 <= rounds["per_round"][1]["samples"] <= 20
        assert rounds["stopped"] == (
            "all decided" if undecided_after == 0 else f"max rounds reached, {undecided_after} still undecided"
        )
    total = sum(r["samples"] for r in rounds["per_round"])
    df = read_table(out)
    assert len(df) == len(doc["samples"]) == len(CORES) * total and set(df["scan_id"]) == {doc["scan_id"]}
    # every device in every round, its sample numbers continuing: 0 .. total-1
    assert per_device_samples(doc["samples"]) == {(f"cpu{c}", "matmul"): list(range(total)) for c in CORES}
    # the scan's verdicts are those of all rounds' samples together (what `straggler analyze` sees)
    again = {e["gpu"]: e["verdict"] for e in analysis_verdicts(df.to_dict("records"))}
    assert {g["gpu"]: g["verdict"] for g in doc["analysis"]["gpus"]} == again
    assert undecided_after == sum(v == "undecided" for v in again.values())
    # the exit code follows the verdicts: 2 exactly when no straggler was found and a device stayed undecided
    if proc.returncode == 2:
        assert undecided_after >= 1 and "straggler" not in again.values()


SCAN_S = scan_timeout_s(("matmul",), 1.0)


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 CPU cores")
def test_a_second_round_runs_every_device_with_windows_of_the_first_and_keeps_the_scan_id():
    """The runner's rounds in-process, the analysis told that every device is undecided after round 1."""
    from straggler.probes.plan import ScanSettings
    from straggler.probes.runner import ScanRounds

    local = ScanRounds(
        ScanSettings(probes=("matmul",), duration_s=1.0, device="cpu", samples=2, scan_id="rounds-test-1")
    )
    seen = []

    def undecided_once(samples):  # undecided after round 1, 3 samples needed; decided after round 2
        seen.append(len(samples))
        first = len(seen) == 1
        return [
            {**e, "verdict": "undecided" if first else "healthy", "samples_needed": 3 if first else None}
            for e in analysis_verdicts(samples)
        ]

    got = remeasure(local.measure, undecided_once, ("matmul",), 2, max_rounds=3, fits=local.fits)
    assert got.failures == [] and got.stopped == "all decided"
    assert [(r.number, r.samples, r.undecided) for r in got.rounds] == [(1, 2, len(CORES)), (2, 3, 0)]
    assert seen == [2 * len(CORES), 5 * len(CORES)]
    assert {s["scan_id"] for s in got.samples} == {"rounds-test-1"} and got.first.scan_id == "rounds-test-1"
    assert per_device_samples(got.samples) == {(f"cpu{c}", "matmul"): [0, 1, 2, 3, 4] for c in CORES}
    assert local.window_s() == pytest.approx(0.5)  # round 2: 3 windows of 1 s / 2, not 3 windows of 1 s / 3
    assert local.overhead_s > 0


def test_a_round_that_does_not_fit_the_deadline_is_not_started():
    from straggler.probes.plan import ScanResult, ScanSettings
    from straggler.probes.runner import ScanRounds

    local = ScanRounds(ScanSettings(probes=("matmul",), duration_s=4.0, samples=5, deadline_s=30.0))
    local.first = ScanResult(scan_id="x", host="h", backend="cpu", notice="", duration_s=4.0)
    local.overhead_s = 6.0
    assert local.fits(("matmul",), 20) is None  # 6 s + 20 x 0.8 s = 22 s of the 30
    line = local.fits(("matmul", "membw"), 20)  # 6 s + 2 x 16 s = 38 s
    assert line is not None and line.startswith("deadline: a further round needs about 38 s, ")
    assert ScanRounds(ScanSettings(deadline_s=None)).fits(("matmul",), 100) is None  # no --deadline: no limit


def test_a_signal_between_rounds_stops_the_rounds():
    from straggler.probes.plan import ScanResult, ScanSettings
    from straggler.probes.runner import ScanRounds

    local = ScanRounds(ScanSettings(probes=("matmul",)))
    local.first = ScanResult(scan_id="x", host="h", backend="cpu", notice="", duration_s=4.0)
    with local.between_rounds():
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process goes on
        assert local.fits(("matmul",), 5) == "scan stopped by SIGTERM"
    assert local.stop_failure() == {
        "host": "h",
        "device": "-",
        "rank": None,
        "probe": "scan",
        "error": "scan stopped by SIGTERM between rounds",
    }
    assert signal.getsignal(signal.SIGTERM) is not local._on_signal  # the handler before is back


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 CPU cores: one device has no peer to be compared with")
def test_a_signal_caught_before_the_round_installed_its_own_handlers_stops_that_round():
    """SIGTERM between ScanRounds taking the signal and the round's runner installing its own handlers
    (device planning, the rendezvous store: seconds) used to be swallowed: the round ran to its end."""
    from straggler.probes.plan import ScanSettings
    from straggler.probes.runner import ScanRounds

    local = ScanRounds(ScanSettings(probes=("matmul",), duration_s=30.0, samples=5))
    with local.between_rounds():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before measure() starts its round
        res = local.measure(("matmul",), 5)
    assert res.samples == []  # stopped at once, not after 30 s of probing
    assert res.failures and all(f["error"] == "scan stopped by SIGTERM, killed" for f in res.failures)
