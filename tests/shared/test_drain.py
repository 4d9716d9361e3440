"""straggler.drain against a real single-node Slurm (tests/slurm.py): drain, state, resume, and the
one-line errors when scontrol is missing, refuses or hangs."""

from __future__ import annotations

import stat
import time

import pytest
from slurm import slurm_fixture

from straggler.drain import (
    DRAINED,
    IDLE,
    REASON_MAX_CHARS,
    UNKNOWN,
    DrainError,
    ScontrolAction,
    drain_reason,
    parse_state,
)
from straggler.finding import ERROR, Finding

slurm = slurm_fixture()


def test_drain_state_resume_through_real_scontrol(slurm):
    action = ScontrolAction(env=slurm.env)
    assert action.state(slurm.node) == IDLE
    reason = drain_reason([Finding("gpu3", "matmul", "0.80x", "thermal")])
    action.drain(slurm.node, reason)
    try:
        assert action.state(slurm.node) == DRAINED
        assert slurm.drain_reason() == "straggler: gpu3 matmul 0.80x thermal"
        assert slurm.node_state() == "drained"
    finally:
        action.resume(slurm.node)
    assert action.state(slurm.node) == IDLE
    assert slurm.drain_reason() == ""


def test_scontrol_refusing_is_one_line(slurm):
    with pytest.raises(DrainError) as e:
        try:
            ScontrolAction(env=slurm.env).drain("no-such-node", "straggler: x")
        finally:
            # Slurm maps any name to a cluster's only node when that node is named localhost (an
            # update of no-such-node drained localhost here): put it back for the next test
            slurm.resume()
    msg = str(e.value)
    # scontrol exits 0 on an update of a node it does not know: the drain reads the state back
    assert msg == "cannot drain no-such-node: scontrol show failed: Node no-such-node not found"
    with pytest.raises(DrainError) as e:
        ScontrolAction(env=slurm.env)._run(["update", f"nodename={slurm.node}", "state=bogus"], "x")
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot x: scontrol update failed: Invalid input")


def test_scontrol_missing_is_one_line(tmp_path):
    with pytest.raises(DrainError) as e:
        ScontrolAction(scontrol=str(tmp_path / "scontrol")).state("n1")
    assert str(e.value) == (
        f"cannot read the state of n1: {tmp_path / 'scontrol'} not found (install slurm-client, or give its path)"
    )


def test_scontrol_hanging_is_stopped_at_its_timeout(tmp_path):
    hang = tmp_path / "scontrol"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(hang.stat().st_mode | stat.S_IEXEC)
    timeout_s = 0.5
    t0 = time.monotonic()
    with pytest.raises(DrainError) as e:
        ScontrolAction(scontrol=str(hang), timeout_s=timeout_s).resume("n1")
    elapsed = time.monotonic() - t0
    assert f"did not answer in {timeout_s:g} s" in str(e.value)
    assert elapsed < 60  # the sleep was cut off, not waited for


def test_drain_reason_short_enough_for_sinfo():
    many = [Finding(f"gpu{i}", "matmul", f"0.{70 + i}x", "thermal", detail="x" * 100) for i in range(5)]
    r = drain_reason(many)
    assert r == "straggler: gpu0 matmul 0.70x thermal +4" and len(r) <= REASON_MAX_CHARS
    # too long: whole words go from the end (the cause, then the value) before a word is cut
    assert (
        drain_reason([Finding("gpu1", "remapped_rows", "pending", "memory")] * 4)
        == "straggler: gpu1 remapped_rows pending memory +3"
    )
    long = drain_reason([Finding("gpu7", "remapped_rows", "pending 3 failed 1 " * 5, "memory")])
    assert long == "straggler: gpu7 remapped_rows pending 3 failed 1" and len(long) <= REASON_MAX_CHARS
    assert len(drain_reason([Finding("gpu7", "x" * 80, "v", "c")] * 2)) == REASON_MAX_CHARS
    # a failing finding is named before a could-not-check one
    mixed = [Finding("gpu0", "xid", "timeout", "nvml", outcome=ERROR), Finding("gpu1", "ecc", "2", "ecc")]
    assert drain_reason(mixed) == "straggler: gpu1 ecc 2 ecc"
    assert drain_reason([Finding("gpu1", "ecc", "2\nnew", "ecc")]) == "straggler: gpu1 ecc 2 new ecc"


@pytest.mark.parametrize(
    "line, state",
    [
        ("NodeName=a State=IDLE+DRAIN ThreadsPerCore=1", DRAINED),
        ("NodeName=a State=MIXED+DRAIN", "draining"),
        ("NodeName=a State=ALLOCATED+DRAIN", "draining"),
        ("NodeName=a State=IDLE ", IDLE),
        ("NodeName=a State=DOWN*+DRAIN", "down"),
        ("NodeName=a State=IDLE*", IDLE),
        ("NodeName=a State=FUTURE", UNKNOWN),
        ("garbage", UNKNOWN),
    ],
)
def test_parse_state(line, state):
    assert parse_state(line) == state


def test_gate_on_error_drain_drains_a_node_it_could_not_check(slurm, tmp_path):
    """`--on-error drain`: NVML missing on a GPU node (could not decide) drains the node with that
    reason and exits 1; the default leaves it in service."""
    import sys

    from conftest import run_cmd

    cmd = [
        sys.executable,
        "-m",
        "straggler",
        "gate",
        "--device",
        "cuda",
        "--telemetry",
        "nvml",
        "--probes",
        "none",
        "--state-dir",
        str(tmp_path),
        "--node",
        slurm.node,
        "--budget",
        "20",
    ]
    r = run_cmd(cmd, 60, env=slurm.env)
    assert r.returncode == 2 and slurm.node_state() == "idle", r.stdout
    r = run_cmd([*cmd, "--on-error", "drain"], 60, env=slurm.env)
    try:
        assert r.returncode == 1, r.stdout
        assert slurm.drain_reason() == "straggler: node nvml unavailable nvml"
        assert (
            r.stdout.splitlines()[-1] == f"drain: {slurm.node} drained, reason 'straggler: node nvml unavailable nvml'"
        )
    finally:
        slurm.resume()
