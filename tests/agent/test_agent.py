"""Agent parts in-process: settings, the Prometheus collector (checked by the real promtool), idle
detection, sd_notify over a real socket, the SQLite spool, the probe child, uploads over real HTTP."""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import generate_latest

from conftest import require_tool
from straggler.agent.child import FAILURE_REASONS, ProbeRun, scan_command
from straggler.agent.exporter import ERROR_SOURCES, build_registry
from straggler.agent.idle import IdleTracker, busy_reason
from straggler.sdnotify import Notifier
from straggler.agent.settings import AgentSettings, load_settings
from straggler.agent.spool import Spool
from straggler.agent.uploader import UploadError, Uploader
from straggler.errors import ConfigError
from straggler.probes.backends import open_backend
from straggler.probes.fakenvml import FakeBackend
from test_agent_support import IngestServer, NotifySocket, fixture_with_faults, write_fake_scan

H3 = {
    "host": "n1",
    "gpu": "3",
    "uuid": "GPU-5e1f0c2a-7b3d-4c8e-9a10-000000000003",
    "model": "NVIDIA H100 80GB HBM3",
    "pci_bus_id": "00000000:5D:00.0",
}


# --- settings ---------------------------------------------------------------------------------


def test_settings_list_every_problem_at_once(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('interval_s = 0\nlisten_port = 70000\nprobe_device = "tpu"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_settings(cfg, env={})
    cfg.write_text('interval_s = 0\nlisten_port = 70000\nprobe_device = "tpu"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, env={})
    for part in ("interval_s: must be > 0", "listen_port: must be 0..65535", "probe_device: 'tpu'"):
        assert part in str(e.value)


def test_settings_layering_file_env_flags(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('interval_s = 5\nprobes = ["matmul"]\nhost = "from-file"\n')
    s = load_settings(
        cfg,
        overrides={"host": "from-flag", "listen_port": None},
        env={"STRAGGLER_AGENT_INTERVAL_S": "2.5", "STRAGGLER_AGENT_PROBES": "matmul,membw"},
    )
    assert (s.interval_s, s.probes, s.host, s.listen_port) == (2.5, ("matmul", "membw"), "from-flag", 9401)
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml", env={})
    assert AgentSettings().interval_s <= 15 and AgentSettings().listen_address == "127.0.0.1"


# --- Prometheus export -------------------------------------------------------------------------


def _registry_with(scenario: str, reads: int = 1):
    registry, collector, metrics = build_registry()
    backend = open_backend(scenario if scenario == "cpu" else f"fake:{scenario}")
    for _ in range(reads):
        snap = backend.snapshot("n1")
    collector.update(snap)
    return registry, metrics


def test_exporter_publishes_the_snapshot_with_units():
    registry, _ = _registry_with("h100_thermal_throttle")
    get = registry.get_sample_value
    assert get("straggler_gpu_temperature_celsius", H3) == 88.0
    assert get("straggler_gpu_sm_clock_hertz", H3) == 1470.0e6
    assert get("straggler_gpu_power_limit_watts", H3) == 700.0
    assert get("straggler_gpu_clock_event_active", {**H3, "reason": "sw_thermal_slowdown"}) == 1.0
    assert get("straggler_gpu_clock_event_active", {**H3, "reason": "sw_power_cap"}) == 0.0
    assert get("straggler_gpu_utilization_ratio", H3) == 1.0
    assert get("straggler_gpu_ecc_errors_total", {**H3, "type": "uncorrected"}) == 0.0
    assert get("straggler_gpu_up", {**H3, "status": "ok"}) == 1.0
    # NOT_SUPPORTED is missing, not 0
    assert get("straggler_gpu_retired_pages", H3) is None


def test_exporter_lost_gpu_has_no_values_and_up_zero():
    registry, _ = _registry_with("gpu_fallen_off_bus", reads=5)
    lost = {
        "host": "n1",
        "gpu": "7",
        "uuid": "GPU-5e1f0c2a-7b3d-4c8e-9a10-000000000007",
        "model": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:DB:00.0",
    }
    assert registry.get_sample_value("straggler_gpu_up", {**lost, "status": "lost"}) == 0.0
    assert registry.get_sample_value("straggler_gpu_power_watts", lost) is None
    assert (
        registry.get_sample_value(
            "straggler_gpu_power_watts",
            {**lost, "gpu": "6", "uuid": lost["uuid"][:-1] + "6", "pci_bus_id": "00000000:BA:00.0"},
        )
        > 600
    )


def test_exporter_publishes_xid_counts_by_code_and_remap_flags():
    registry, _ = _registry_with("h100_xid_errors", reads=2)
    get = registry.get_sample_value
    gpu2 = {
        "host": "n1",
        "gpu": "2",
        "uuid": "GPU-5e1f0c2a-7b3d-4c8e-9a10-000000000002",
        "model": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:3A:00.0",
    }
    assert get("straggler_gpu_xid_errors_total", {**gpu2, "xid": "48"}) == 1.0
    assert get("straggler_gpu_xid_errors_total", {**gpu2, "xid": "13"}) is None  # no event, no series
    assert get("straggler_gpu_remapped_rows_pending", gpu2) == 0.0
    registry, _ = _registry_with("ecc_remapped_rows")
    gpu4 = {
        "host": "n1",
        "gpu": "4",
        "uuid": "GPU-5e1f0c2a-7b3d-4c8e-9a10-000000000004",
        "model": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:9A:00.0",
    }
    assert registry.get_sample_value("straggler_gpu_remapped_rows_pending", gpu4) == 1.0
    assert registry.get_sample_value("straggler_gpu_remapped_rows_failed", gpu4) == 1.0


def test_self_metrics_start_at_zero():
    registry, _, _ = build_registry()
    for source in ERROR_SOURCES:
        assert registry.get_sample_value("straggler_agent_errors_total", {"source": source}) == 0.0
    for name in (
        "straggler_agent_probe_runs_total",
        "straggler_agent_ticks_total",
        "straggler_agent_uploaded_results_total",
    ):
        assert registry.get_sample_value(name) == 0.0
    for reason in FAILURE_REASONS:
        assert registry.get_sample_value("straggler_agent_probe_failures_total", {"reason": reason}) == 0.0


@pytest.mark.parametrize(
    "scenario", ["h100_healthy", "gpu_fallen_off_bus", "nvml_error_mid_run", "h100_xid_errors", "cpu"]
)
def test_promtool_accepts_the_exposition(scenario, tmp_path):
    promtool = require_tool("promtool")
    registry, _ = _registry_with(scenario, reads=7)
    text = generate_latest(registry)
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == b"" and out.stderr.strip() == b"", out


# --- idle detection ----------------------------------------------------------------------------


def test_idle_needs_no_processes_low_util_and_the_grace_period():
    idle, busy = FakeBackend("h100_idle").snapshot("n"), FakeBackend("h100_healthy").snapshot("n")
    assert busy_reason(idle, 5.0) is None
    assert busy_reason(busy, 5.0) == "device 0 runs 1 compute process(es)"
    t = IdleTracker(grace_s=60, util_pct=5)
    assert not t.update(idle, 100.0)
    assert not t.update(idle, 159.0)
    assert t.update(idle, 160.0)
    assert not t.update(busy, 161.0)  # a job starts: the grace period starts over
    assert not t.update(idle, 162.0) and t.update(idle, 222.0)


def test_idle_ignores_lost_gpus_but_not_a_dead_backend():
    b = FakeBackend("gpu_fallen_off_bus")
    for _ in range(5):
        snap = b.snapshot("n")
    assert snap.devices[7].status == "lost"
    assert busy_reason(snap, 5.0) == "device 0 runs 1 compute process(es)"
    from straggler.probes.telemetry import NodeSnapshot

    dead = NodeSnapshot(ts=0, host="n", backend="nvml", devices=(), error="NVML library not found")
    assert busy_reason(dead, 5.0).startswith("telemetry unavailable")


@pytest.mark.parametrize(
    "fault, reason",
    [
        ({"device": 5, "nvml_error": "unknown", "fields": None}, "device 5 unreadable (unknown)"),
        (
            {"device": 2, "nvml_error": "no_permission", "fields": ["processes"]},
            "device 2: compute processes unknown (no_permission)",
        ),
        ({"device": 6, "nvml_error": "timeout", "fields": ["util_pct"]}, "device 6: utilization unknown (timeout)"),
    ],
)
def test_an_unreadable_gpu_or_process_list_is_busy_not_idle(tmp_path, fault, reason):
    """Every other GPU idle: the one GPU that cannot be read may be running the job."""
    snap = FakeBackend(str(fixture_with_faults(tmp_path, "h100_idle", [fault]))).snapshot("n")
    assert busy_reason(snap, 5.0) == reason
    t = IdleTracker(grace_s=0, util_pct=5)
    assert not t.update(snap, 100.0) and not t.update(snap, 1000.0)


def test_exporter_marks_the_last_devices_stale_when_a_read_fails():
    from straggler.probes.telemetry import NodeSnapshot

    registry, collector, _ = build_registry()
    good = FakeBackend("h100_thermal_throttle").snapshot("n1")
    collector.update(good)
    collector.update(
        NodeSnapshot(
            ts=good.ts + 15,
            host="n1",
            backend=good.backend,
            devices=(),
            error="telemetry read failed: RuntimeError: boom",
        )
    )
    get = registry.get_sample_value
    assert get("straggler_gpu_up", {**H3, "status": "stale"}) == 0.0
    assert get("straggler_gpu_up", {**H3, "status": "ok"}) is None
    assert get("straggler_gpu_temperature_celsius", H3) is None  # the old values are not current
    assert get("straggler_telemetry_backend_up", {"host": "n1", "backend": good.backend}) == 0.0
    assert get("straggler_telemetry_snapshot_timestamp_seconds", {"host": "n1"}) == good.ts  # the data's age


# --- sd_notify ---------------------------------------------------------------------------------


def test_notify_sends_datagrams_to_the_socket(tmp_path):
    sock = NotifySocket(tmp_path)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_s == 4.0
        assert n.ready("serving /metrics on 127.0.0.1:9401")
        assert n.watchdog() and n.stopping("bye")
        assert sock.wait_for("READY") == {"READY": "1", "STATUS": "serving /metrics on 127.0.0.1:9401"}
        assert sock.wait_for("WATCHDOG") == {"WATCHDOG": "1"}
        assert sock.wait_for("STOPPING") == {"STOPPING": "1", "STATUS": "bye"}
    finally:
        sock.close()


def test_notify_abstract_socket_and_absent_socket():
    name = f"straggler-test-{time.monotonic_ns()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    try:
        assert Notifier(env={"NOTIFY_SOCKET": "@" + name}).status("hello")
        srv.settimeout(5)
        assert srv.recv(100) == b"STATUS=hello"
    finally:
        srv.close()
    assert not Notifier(env={}).ready("x")
    assert Notifier(env={"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None  # not ours


# --- spool -------------------------------------------------------------------------------------

ROW = {
    "ts": 1.0,
    "scan_id": "s1",
    "host": "x",
    "gpu": "cpu0",
    "probe": "matmul",
    "settings": "n=64",
    "sample": 0,
    "value": 1.0,
    "power_w": math.nan,
}


def test_spool_is_idempotent_durable_and_wal(tmp_path):
    path = tmp_path / "spool.sqlite"
    spool = Spool(path)
    assert spool.add_results([ROW, {**ROW, "sample": 1}], host="n1") == 2
    assert spool.add_results([ROW], host="n1") == 0  # the same result again: same id, not duplicated
    spool.add_status("s1", "n1", "running")
    spool.close()
    again = Spool(path)
    rows = again.pending_results(10)
    assert len(rows) == 2 and all(r["host"] == "n1" and r["power_w"] is None for r in rows)
    assert len({r["id"] for r in rows}) == 2
    assert again.scans_in_state("running") == ["s1"]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.mark_uploaded([rows[0]["id"]])
    again.reject([rows[1]], "value: not a number")
    assert (again.count(), again.count("rejected")) == (0, 1)


# --- probe child -------------------------------------------------------------------------------


def _run(tmp_path, mode, deadline_s=30.0, start_at=None):
    settings = AgentSettings(
        probe_command=(sys.executable, str(write_fake_scan(tmp_path))),
        probe_device="cpu",
        probes=("matmul",),
        probe_duration_s=2,
    )
    out = tmp_path / f"{mode}.jsonl"
    run = ProbeRun(
        scan_id=f"scan-{mode}",
        cluster=False,
        output=out,
        deadline_s=deadline_s,
        kill_grace_s=0.5,
        command=scan_command(settings, f"scan-{mode}", out, deadline_s, start_at),
    )
    run.start(tmp_path / "work", env={"FAKE_SCAN_MODE": mode, "PATH": "/usr/bin:/bin"})
    t0 = time.monotonic()
    while not run.poll():
        assert time.monotonic() - t0 < 60, "probe child never finished"
        time.sleep(0.05)
    return run, time.monotonic() - t0


def test_probe_child_runs_the_scan_command(tmp_path):
    start_at = time.time() + 1.0
    run, _ = _run(tmp_path, "ok", start_at=start_at)
    assert run.returncode == 0 and not run.failed and len(run.rows()) == 3
    args = json.loads((tmp_path / "ok.jsonl.args").read_text())
    assert args[:5] == ["--json", "--output", str(tmp_path / "ok.jsonl"), "--scan-id", "scan-ok"]
    assert args[args.index("--start-at") + 1] == f"{start_at:.3f}" and "--deadline" in args
    assert args[args.index("--max-rounds") + 1] == "1"  # the agent's scans do not re-measure (yet)
    assert run.rows()[0]["ts"] >= start_at - 0.01  # the child waited for start_at


def test_a_scan_that_measured_everything_but_could_not_decide_is_not_a_failed_run(tmp_path):
    """`straggler scan` exits 2 when no device is a straggler and some are undecided: the node's
    run measured everything (the collector decides across the fleet), so it is done, not failed."""
    run, _ = _run(tmp_path, "undecided")
    assert run.returncode == 2 and not run.failed and run.error is None and len(run.rows()) == 3
    failed, _ = _run(tmp_path, "fail")  # exit 2 with a failure: still a failed run
    assert failed.returncode == 2 and failed.failed and "worker 0 died" in failed.error


def test_probe_child_killed_at_its_deadline_keeps_its_rows(tmp_path):
    run, took = _run(tmp_path, "hang", deadline_s=1.0)
    assert run.failed and "overran its 1 s deadline" in run.error and run.returncode is not None
    assert len(run.rows()) == 2 and 1.4 <= took < 20
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(run.proc.pid, 0)


def test_probe_child_failure_is_reported_with_its_last_line(tmp_path):
    run, _ = _run(tmp_path, "fail")
    assert run.returncode == 2 and run.error == "probe exited with 2: probe matmul failed: worker 0 died"
    assert len(run.rows()) == 1
    run.cleanup()
    assert not run.output.exists() and not run.stderr_path.exists()


# --- uploads over real HTTP ----------------------------------------------------------------------


def _uploader(tmp_path, server, token="secret", batch=500):
    (tmp_path / "token").write_text(token + "\n")
    settings = AgentSettings(
        collector_url=server.url,
        token_file=tmp_path / "token",
        upload_batch=batch,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        http_timeout_s=5,
    )
    spool = Spool(tmp_path / "spool.sqlite")
    return spool, Uploader(settings, spool, "n1")


def test_uploads_in_batches_and_empties_the_spool(tmp_path):
    server = IngestServer()
    try:
        spool, up = _uploader(tmp_path, server, batch=500)
        spool.add_results([{**ROW, "sample": i} for i in range(1200)], host="n1")
        spool.add_status("s1", "n1", "done")
        assert up.flush(30)
        assert len(server.rows) == 1200 and server.posts == 3 and spool.count() == 0
        assert server.statuses == [("s1", {"host": "n1", "state": "done", "error": None})]
        assert all(r["host"] == "n1" and "id" in r for r in server.rows.values())
    finally:
        server.close()


def test_upload_retries_with_backoff_until_the_collector_answers(tmp_path):
    server = IngestServer()
    server.fail_next = 3
    stop = threading.Event()
    try:
        spool, up = _uploader(tmp_path, server)
        spool.add_results([{**ROW, "sample": i} for i in range(10)], host="n1")
        t = threading.Thread(target=up.run, args=(stop,), daemon=True)
        t.start()
        t0 = time.monotonic()
        while spool.count() and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert spool.count() == 0 and len(server.rows) == 10 and server.fail_next == 0
    finally:
        stop.set()
        up.wake.set()
        server.close()


def test_wrong_token_keeps_everything_in_the_spool(tmp_path):
    server = IngestServer()
    try:
        spool, up = _uploader(tmp_path, server, token="wrong")
        spool.add_results([ROW], host="n1")
        with pytest.raises(UploadError, match="refused the token"):
            up.flush_once()
        assert spool.count() == 1 and server.rows == {}
    finally:
        server.close()


def test_collector_down_is_an_upload_error_not_a_crash(tmp_path):
    server = IngestServer()
    server.close()  # nothing listens on that port any more
    spool, up = _uploader(tmp_path, server)
    spool.add_results([ROW], host="n1")
    with pytest.raises(UploadError, match="ConnectError"):
        up.flush_once()
    assert spool.count() == 1


def test_a_row_the_collector_rejects_is_isolated_and_set_aside(tmp_path):
    server = IngestServer()
    try:
        spool, up = _uploader(tmp_path, server, batch=8)
        rows = [{**ROW, "sample": i} for i in range(8)]
        rows[5]["probe"] = "bad"
        spool.add_results(rows, host="n1")
        assert up.flush(30)
        assert len(server.rows) == 7 and all(r["probe"] == "matmul" for r in server.rows.values())
        assert (spool.count(), spool.count("rejected")) == (0, 1)
    finally:
        server.close()


def test_a_scan_with_rows_the_collector_refused_is_reported_failed_with_the_reason(tmp_path):
    server = IngestServer()
    try:
        spool, up = _uploader(tmp_path, server, batch=8)
        rows = [{**ROW, "scan_id": "c1", "sample": i} for i in range(4)]
        rows[2]["probe"] = "bad"
        spool.add_results(rows + [{**ROW, "scan_id": "c2", "sample": 0}], host="n1")
        spool.add_status("c1", "n1", "done")
        spool.add_status("c2", "n1", "done")
        spool.add_status("c1", "n1", "failed", "probe exited with 2")  # a replay with its own error
        assert up.flush(30)
        assert len(server.rows) == 4 and spool.count("rejected") == 1
        (c1, first), (c2, second), (_, third) = server.statuses
        assert (c1, c2) == ("c1", "c2")
        assert first["state"] == "failed" and first["error"].startswith(
            "the collector refused 1 result(s) of this scan: "
        )
        assert "unknown probe 'bad'" in first["error"]
        assert second == {"host": "n1", "state": "done", "error": None}  # nothing of c2 was refused
        assert third["error"].startswith("probe exited with 2; the collector refused 1 result(s)")
    finally:
        server.close()


def test_agent_command_reports_every_config_problem_in_one_line(tmp_path, straggler_cmd):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('interval_s = -1\nprobe_device = "tpu"\ncollector_url = "ftp://x"\n')
    out = subprocess.run(straggler_cmd + ["agent", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"straggler: error: {cfg}: ")
    for part in ("interval_s: must be > 0", "probe_device: 'tpu'", "collector_url: 'ftp://x'"):
        assert part in lines[0]
    ok = subprocess.run(
        straggler_cmd + ["agent", "--check", "--json", "--listen-port", "9999", "--spool", str(tmp_path / "s.sqlite")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "STRAGGLER_AGENT_INTERVAL_S": "7"},
    )
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert (shown["listen_port"], shown["interval_s"], shown["listen_address"]) == (9999, 7.0, "127.0.0.1")


def test_a_rotated_token_is_picked_up_without_a_restart(tmp_path):
    server = IngestServer(token="new")
    try:
        spool, up = _uploader(tmp_path, server, token="old")
        spool.add_results([ROW], host="n1")
        with pytest.raises(UploadError, match="refused the token"):
            up.flush_once()
        (tmp_path / "token").write_text("new\n")
        assert up.flush(10) and len(server.rows) == 1
        (tmp_path / "token").unlink()
        up.close()
        spool.add_results([{**ROW, "sample": 9}], host="n1")
        with pytest.raises(UploadError, match="cannot read the token file"):
            up.flush_once()
    finally:
        server.close()


def test_poller_waits_while_a_queued_scan_is_offered_again(tmp_path):
    import queue

    from straggler.agent.poller import ScanPoller

    server = IngestServer()
    server.scans.append({"scan_id": "s1", "start_at": time.time(), "probes": ["matmul"], "duration_s": 1})
    (tmp_path / "token").write_text("secret")
    settings = AgentSettings(collector_url=server.url, token_file=tmp_path / "token", poll_wait_s=1.0)
    scans: queue.Queue = queue.Queue()
    stop = threading.Event()
    poller = ScanPoller(settings, "n1", scans)
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    try:
        time.sleep(2.5)  # the state of s1 is never reported: the collector offers it on every poll
    finally:
        stop.set()
        thread.join(10)
        server.close()
    assert scans.qsize() == 1  # queued once
    assert server.polls <= 5, server.polls  # about one poll a second, not a tight loop


def test_node_name_option_and_the_old_host_spelling(tmp_path, straggler_cmd):
    """--node-name names the node; the old --host still does, with one warning line, unless its value
    looks like an address (--host 0.0.0.0 once named the node "0.0.0.0" and still listened on loopback)."""
    from conftest import free_port

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            straggler_cmd
            + [
                "agent",
                "--check",
                "--json",
                "--listen-port",
                str(free_port()),
                "--spool",
                str(tmp_path / "s.sqlite"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    named = check("--node-name", "gpu-node-17")
    assert named.returncode == 0 and named.stderr == "", named.stderr
    assert json.loads(named.stdout)["host"] == "gpu-node-17"
    old = check("--host", "gpu-node-17")
    assert old.returncode == 0 and json.loads(old.stdout)["host"] == "gpu-node-17"
    assert old.stderr.splitlines() == [
        "straggler: warning: --host is deprecated: it names this node; use "
        "--node-name gpu-node-17 (--listen-address is the /metrics bind address)"
    ]
    for address in ("0.0.0.0", "10.1.2.3:9401", "::1", "[fe80::1]:9401"):
        refused = check("--host", address)
        assert refused.returncode == 2 and refused.stdout == "", (address, refused.stdout)
        assert refused.stderr.splitlines() == [
            f"straggler: error: --host {address}: looks like an address, and --host names this node; "
            "--listen-address sets the /metrics bind address, --node-name the node's name"
        ]
    both = check("--host", "a", "--node-name", "b")
    assert both.returncode == 2 and both.stderr.splitlines() == [
        "straggler: error: --host is the old spelling of --node-name: give only --node-name"
    ]
    assert (
        "--node-name"
        in subprocess.run(straggler_cmd + ["agent", "--help"], capture_output=True, text=True, timeout=60).stdout
    )
