"""The shipped HealthCheckProgram wrapper (slurm/straggler-healthcheck) on a real single-node Slurm:
slurmd runs it on the idle node every second; while NVML reads healthy the node stays in service,
and when a GPU shows a pending row remap (fake NVML scenario gate_unhealthy) the wrapper's gate
drains the node with the finding as the reason. NVML checks only (``--probes none``): about a
second per check."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from slurm import start_slurm

SHIPPED = ("straggler-healthcheck", "straggler-gate-common.sh")
INTERVAL_S = 1


def _env(d: Path, scenario: str, conf: Path | None = None) -> None:
    straggler = Path(sys.executable).with_name("straggler")
    conf = conf or Path(
        next(x for x in (d / "straggler-gate.env").read_text().splitlines() if x.startswith("SLURM_CONF="))[
            len("SLURM_CONF=") :
        ]
    )
    tmp = d / "straggler-gate.env.tmp"  # replaced at once: a check that runs meanwhile reads one or the other
    tmp.write_text(
        f"STRAGGLER={straggler}\nSTRAGGLER_GATE_BUDGET=20\nSTRAGGLER_GATE_LOG={d}/gate.log\nSLURM_CONF={conf}\n"
        f'STRAGGLER_GATE_ARGS="--probes none --telemetry fake:{scenario} --state-dir {d}/state"\n'
    )
    tmp.replace(d / "straggler-gate.env")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    d = tmp_path_factory.mktemp("hc")
    os.chmod(d, 0o755)
    for name in SHIPPED:
        shutil.copy2(ROOT / "slurm" / name, d / name)
    (d / "straggler-gate.env").write_text("")  # no checks until the Slurm is up and its conf known
    with start_slurm(
        [
            f"HealthCheckProgram={d}/straggler-healthcheck",
            f"HealthCheckInterval={INTERVAL_S}",
            "HealthCheckNodeState=IDLE",
        ]
    ) as s:
        _env(d, "h100_idle", s.conf)  # slurmd gives a health check no SLURM_CONF: the settings name it
        yield s, d


def _checks(d: Path) -> list[str]:
    p = d / "gate.log"
    return [x for x in p.read_text().splitlines() if " gate: " in x] if p.exists() else []


def test_healthcheck_keeps_a_healthy_node_and_drains_a_broken_one(checked):
    slurm, d = checked
    # slurmd's health check runs every INTERVAL_S; the gate's own bound per check is its budget (20 s)
    deadline = time.monotonic() + 20 + 30
    while len(_checks(d)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    checks = _checks(d)
    assert len(checks) >= 2 and all(re.search(r"healthcheck\[-\] gate: pass on ", x) for x in checks), checks
    assert slurm.node_state() == "idle"
    _env(d, "gate_unhealthy")
    state = slurm.wait_state(("drained", "draining"), timeout_s=20 + 30)
    assert state == "drained"
    assert slurm.drain_reason() == "straggler: gpu1 remapped_rows pending memory +3"
    drained = f"drain: {slurm.node} drained"
    deadline = time.monotonic() + 20 + 10  # the wrapper logs the gate's lines when the gate has ended
    while drained not in (d / "gate.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = (d / "gate.log").read_text()
    assert f"drain: {slurm.node} drained, reason 'straggler: gpu1 remapped_rows pending memory +3'" in log
    # a drained node is not idle: the wrapper no longer runs the gate on it (after the check in
    # flight when the node was drained, if any, has ended: one gate takes about a second here)
    time.sleep(3 * INTERVAL_S)
    n = len(_checks(d))
    time.sleep(3 * INTERVAL_S + 1)
    assert len(_checks(d)) == n and "not idle: not checked" in (d / "gate.log").read_text()
