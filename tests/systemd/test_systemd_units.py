"""Every unit file in systemd/ passes `systemd-analyze verify` without a single warning."""

import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, require_tool

UNITS = sorted(
    p
    for p in (ROOT / "systemd").iterdir()
    if p.suffix in {".service", ".socket", ".timer", ".path", ".target", ".mount"}
)


def verify(unit: Path) -> str:
    tool = require_tool("systemd-analyze")
    out = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120)
    return (out.stdout + out.stderr).strip() + ("" if out.returncode == 0 else f"\n(exit {out.returncode})")


def test_there_are_units():
    assert {p.name for p in UNITS} >= {"straggler-collector.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies_without_warnings(unit):
    assert verify(unit) == ""


def test_verify_does_report_a_broken_unit(tmp_path):
    # the check above can fail: a misspelt directive and a missing binary are reported
    bad = tmp_path / "straggler-broken.service"
    bad.write_text("[Service]\nType=notify\nExecStart=/nonexistent/straggler collector\nWatchdogSecs=30\n")
    out = verify(bad)
    assert "WatchdogSecs" in out and "/nonexistent/straggler" in out


def test_collector_unit_is_notify_watchdog_and_least_privilege():
    text = (ROOT / "systemd" / "straggler-collector.service").read_text()
    lines = {line.strip() for line in text.splitlines()}
    for want in (
        "Type=notify",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=straggler",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ):
        assert want in lines, want
    assert any(line.startswith("WatchdogSec=") for line in lines)
    nofile = [int(line.split("=", 1)[1]) for line in lines if line.startswith("LimitNOFILE=")]
    assert nofile and nofile[0] >= 65536  # a connection per agent: 3,000 long polls and more
