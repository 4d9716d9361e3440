"""The agent's systemd unit verifies cleanly with the real systemd-analyze, and its example config loads."""

from __future__ import annotations

import configparser
import subprocess

from conftest import ROOT, require_tool
from straggler.agent.settings import AgentSettings, load_settings

UNIT = ROOT / "systemd" / "straggler-agent.service"


def test_unit_verifies_without_any_warning(tmp_path):
    tool = require_tool("systemd-analyze")
    out = subprocess.run([tool, "verify", str(UNIT)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out


def test_unit_is_notify_watchdog_restart_and_least_privilege():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure" and svc["WatchdogSec"]
    assert svc["DynamicUser"] == "yes" and svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["DevicePolicy"] == "closed" and svc["CapabilityBoundingSet"] == ""
    text = UNIT.read_text()
    assert "DeviceAllow=char-nvidia-frontend rw" in text and "DeviceAllow=char-nvidia-uvm rw" in text
    assert "PrivateDevices=yes" not in text  # it would hide /dev/nvidia*
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert int(svc["LimitNOFILE"]) >= 4096  # never the default soft limit of 1,024


def test_example_config_is_valid_and_matches_the_defaults(tmp_path):
    s = load_settings(ROOT / "systemd" / "agent.toml", env={})
    assert s == AgentSettings()
