"""The agent as a real process: sd_notify over a real socket, /metrics on loopback (checked by promtool),
SIGHUP reload, SIGUSR1 probes gated by idleness, the probe child killed at its deadline or on SIGTERM,
and a real `straggler scan` child with the daemon staying free of torch and under 100 MB RSS."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, require_tool
from test_agent_support import AgentProcess, IngestServer, fixture_with_faults, toml, wait_until, write_fake_scan


def scrape(agent: AgentProcess) -> dict[tuple, float]:
    text = httpx.get(agent.url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def spooled(agent: AgentProcess) -> int:
    with sqlite3.connect(agent.settings["spool_path"]) as db:
        return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


@pytest.fixture
def agents(tmp_path):
    started: list[AgentProcess] = []

    def make(**kw) -> AgentProcess:
        a = AgentProcess(tmp_path, name=kw.pop("name", f"agent{len(started)}"), **kw)
        started.append(a)
        return a

    yield make
    for a in started:
        a.close()


def test_ready_metrics_watchdog_and_clean_stop(agents):
    promtool = require_tool("promtool")
    a = agents(env={"WATCHDOG_USEC": "1000000"}).start()
    assert a.notify.messages[0]["READY"] == "1"
    assert a.notify.wait_for("WATCHDOG", "1", timeout_s=10)
    wait_until(lambda: (value(scrape(a), "straggler_agent_ticks_total") or 0) >= 2, what="two ticks")
    text = httpx.get(a.url + "/metrics", timeout=10).text
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check
    samples = scrape(a)
    ups = [k for k in samples if k[0] == "straggler_gpu_up"]
    assert len(ups) == 8 and all(dict(k[1])["host"] == "agent0" for k in ups)
    assert value(samples, "straggler_agent_devices_idle") == 1.0
    assert value(samples, "straggler_agent_errors_total", source="telemetry") == 0.0
    assert value(samples, "process_resident_memory_bytes") < 100e6
    assert a.stop() == 0
    assert a.notify.wait_for("STOPPING", "1", timeout_s=5)


def test_metrics_listen_on_loopback_only(agents):
    a = agents().start()
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, timeout=30).stdout
    lines = [ln for ln in out.splitlines() if f":{a.port} " in ln]
    assert lines and all("127.0.0.1:" in ln for ln in lines), out
    assert a.stop() == 0


def test_sighup_reloads_and_a_bad_reload_keeps_the_running_config(agents):
    a = agents().start()
    wait_until(
        lambda: any(
            k[0] == "straggler_telemetry_backend_up" and ("backend", "fake:h100_idle") in k[1] for k in scrape(a)
        ),
        what="first snapshot",
    )
    a.config.write_text(toml({**a.settings, "telemetry": "fake:h100_thermal_throttle"}))
    a.signal(signal.SIGHUP)
    wait_until(
        lambda: any(
            ("backend", "fake:h100_thermal_throttle") in k[1]
            for k in scrape(a)
            if k[0] == "straggler_telemetry_backend_up"
        ),
        what="reloaded backend",
    )
    a.config.write_text(toml({**a.settings, "interval_s": -1}))
    a.signal(signal.SIGHUP)
    msg = a.notify.wait_for("STATUS", prefix="reload refused", timeout_s=15)
    assert "interval_s: must be > 0" in msg["STATUS"]
    assert a.proc.poll() is None  # still running
    assert a.stop() == 0


def test_on_demand_probe_is_refused_while_a_job_runs(agents, tmp_path):
    a = agents(telemetry="fake:h100_healthy", probe_command=[sys.executable, str(write_fake_scan(tmp_path))]).start()
    wait_until(lambda: value(scrape(a), "straggler_agent_ticks_total"), what="a tick")
    a.signal(signal.SIGUSR1)
    wait_until(lambda: "node is busy: device 0 runs 1 compute process(es)" in a.log(), what="busy refusal")
    assert value(scrape(a), "straggler_agent_probe_runs_total") == 0.0
    assert a.stop() == 0


def test_hung_probe_is_killed_at_its_deadline_and_its_rows_spooled(agents, tmp_path):
    a = agents(
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        probe_deadline_s=1.0,
        probe_kill_grace_s=0.5,
        env={"FAKE_SCAN_MODE": "hang"},
    ).start()
    wait_until(lambda: value(scrape(a), "straggler_agent_ticks_total"), what="a tick")
    a.signal(signal.SIGUSR1)
    wait_until(
        lambda: value(scrape(a), "straggler_agent_probe_failures_total", reason="deadline") == 1.0, what="probe failure"
    )
    samples = scrape(a)
    assert value(samples, "straggler_agent_probe_runs_total") == 1.0
    assert value(samples, "straggler_agent_errors_total", source="probe") == 1.0
    assert 1.4 <= value(samples, "straggler_agent_probe_duration_seconds") < 15
    assert "overran its 1 s deadline and was killed (2 results kept)" in a.log()
    assert spooled(a) == 2
    assert a.stop() == 0


def test_sigterm_during_a_probe_kills_the_child_and_keeps_its_rows(agents, tmp_path):
    a = agents(
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        probe_deadline_s=600,
        env={"FAKE_SCAN_MODE": "hang"},
    ).start()
    wait_until(lambda: value(scrape(a), "straggler_agent_ticks_total"), what="a tick")
    a.signal(signal.SIGUSR1)
    wait_until(lambda: "probe run" in a.log() and "started" in a.log(), what="probe start")
    work = a.dir / "agent-scans"
    wait_until(lambda: list(work.glob("*.jsonl.args")), what="child running")
    child_pid = int(subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()[0])
    assert a.stop() == 0
    assert "agent stopped during the probe run (2 results kept)" in a.log()
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
    assert spooled(a) == 2


RUN_AGENT = textwrap.dedent(
    """
    import json, sys, threading
    from straggler.agent.daemon import Agent
    from straggler.agent.settings import load_settings
    agent = Agent(load_settings(sys.argv[1]))
    agent.request_probe()
    def watch():
        import time
        try:
            while agent.metrics.probe_runs._value.get() < 1 or agent.probe_run is not None:
                time.sleep(0.2)
        finally:
            agent.request_stop()
    threading.Timer(1.0, watch).start()
    agent.run()
    rss_kb = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")))
    heavy = [m for m in ("torch", "pandas", "numpy", "scipy", "pynvml") if m in sys.modules]
    print(json.dumps({"rss_mb": rss_kb / 1024, "heavy": heavy,
                      "runs": agent.metrics.probe_runs._value.get(),
                      "failures": sum(s.value for m in agent.metrics.probe_failures.collect() for s in m.samples
                                      if s.name.endswith("_total"))}))
    """
)


@pytest.mark.slow
def test_real_scan_child_and_the_daemon_stays_light(tmp_path):
    if not (ROOT / "straggler" / "commands" / "scan.py").exists():
        pytest.skip("straggler scan is not there yet")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        toml(
            {
                "host": "light",
                "listen_port": 0,
                "telemetry": "fake:h100_idle",
                "interval_s": 0.5,
                "spool_path": tmp_path / "spool.sqlite",
                "probe_device": "cpu",
                "probes": ["matmul"],
                "probe_duration_s": 2,
                "probe_deadline_s": 300,
                "probe_every_s": 0,
                "idle_grace_s": 0,
                "job_cpu_cores": 0,
            }
        )
    )  # a test machine is no quiet node: test_agent_jobwatch.py tests the watch
    env = {k: v for k, v in os.environ.items() if k != "STRAGGLER_TELEMETRY"}
    out = subprocess.run(
        [sys.executable, "-c", RUN_AGENT, str(cfg)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and report["rss_mb"] < 100
    assert (report["runs"], report["failures"]) == (1, 0), out.stderr[-3000:]
    with sqlite3.connect(tmp_path / "spool.sqlite") as db:
        rows = db.execute("SELECT row FROM results").fetchall()
    parsed = [__import__("json").loads(r[0]) for r in rows]
    assert len(parsed) >= os.cpu_count() and {r["probe"] for r in parsed} == {"matmul"}
    assert {r["host"] for r in parsed} == {"light"} and all(r["value"] > 0 for r in parsed)


def _scan(scan_id: str, start_in_s: float) -> dict:
    return {
        "scan_id": scan_id,
        "start_at": time.time() + start_in_s,
        "probes": ["matmul"],
        "duration_s": 1.0,
        "hosts": None,
    }


def test_cluster_scans_by_long_poll_run_refuse_when_busy_or_late(agents, tmp_path):
    server = IngestServer(token="tok")
    (tmp_path / "token").write_text("tok")
    fake = [sys.executable, str(write_fake_scan(tmp_path))]
    try:
        server.scans = [_scan("s-late", -100), _scan("s-ok", 1.0)]
        idle = agents(
            name="idle-node", collector_url=server.url, token_file=tmp_path / "token", probe_command=fake
        ).start()
        busy = agents(
            name="busy-node",
            collector_url=server.url,
            token_file=tmp_path / "token",
            telemetry="fake:h100_healthy",
            probe_command=fake,
        ).start()

        def states(host):
            return [(sid, b["state"], b["error"]) for sid, b in server.statuses if b["host"] == host]

        wait_until(
            lambda: len(states("idle-node")) == 3 and len(states("busy-node")) == 2,
            timeout_s=60,
            what=f"scan states (got {server.statuses})",
        )
        late = re.compile(r"missed the start by 1\d\d s")
        (sid, state, error), *rest = states("idle-node")
        assert (sid, state) == ("s-late", "failed") and late.fullmatch(error)
        assert rest == [("s-ok", "running", None), ("s-ok", "done", None)]
        (sid, state, error), *rest = states("busy-node")
        assert (sid, state) == ("s-late", "failed") and late.fullmatch(error)
        assert rest == [("s-ok", "failed", "node busy: device 0 runs 1 compute process(es)")]
        rows = list(server.rows.values())
        assert (
            len(rows) == 3 and {r["host"] for r in rows} == {"idle-node"} and {r["scan_id"] for r in rows} == {"s-ok"}
        )
        assert min(r["ts"] for r in rows) >= server.scans[1]["start_at"] - 0.01  # the child waited for start_at
        assert idle.stop() == 0 and busy.stop() == 0
    finally:
        server.close()


def test_results_of_a_probe_interrupted_by_an_agent_crash_are_recovered(agents, tmp_path):
    a = agents(probe_command=[sys.executable, str(write_fake_scan(tmp_path))], env={"FAKE_SCAN_MODE": "hang"}).start()
    wait_until(lambda: value(scrape(a), "straggler_agent_ticks_total"), what="a tick")
    a.signal(signal.SIGUSR1)
    work = a.dir / "agent-scans"
    wait_until(lambda: list(work.glob("*.jsonl.args")), what="child running")
    child_pid = int(subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()[0])
    a.kill()  # SIGKILL: no clean stop, the two rows are only in the child's output file
    os.kill(child_pid, signal.SIGKILL)  # what systemd's KillMode=control-group does to the orphan
    assert spooled(a) == 0
    a.start()
    wait_until(lambda: spooled(a) == 2, what="recovered rows", timeout_s=30)
    assert "recovered 2 results of the interrupted probe run" in a.log()
    assert not list(work.glob("*.jsonl"))
    assert a.stop() == 0


@pytest.mark.parametrize("telemetry, runs", [("fake:h100_idle", 1.0), ("fake:h100_healthy", 0.0)])
def test_scheduled_probe_runs_only_after_the_idle_grace_period(agents, tmp_path, telemetry, runs):
    a = agents(
        telemetry=telemetry,
        probe_every_s=3600,
        idle_grace_s=1.5,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
    ).start()
    wait_until(lambda: (value(scrape(a), "straggler_agent_ticks_total") or 0) >= 2, what="two ticks")
    assert value(scrape(a), "straggler_agent_probe_runs_total") == 0.0  # the grace period is not over yet
    wait_until(lambda: (value(scrape(a), "straggler_agent_ticks_total") or 0) >= 8, what="eight ticks")
    samples = scrape(a)
    assert value(samples, "straggler_agent_probe_runs_total") == runs  # once: the next is due in an hour
    if runs:
        wait_until(lambda: spooled(a) == 3, what="spooled rows")
        # our own probe load is not a job, but the grace period starts over after it
        wait_until(lambda: value(scrape(a), "straggler_agent_devices_idle") == 1.0, what="idle again")
    else:
        assert value(samples, "straggler_agent_devices_idle") == 0.0
    assert a.stop() == 0


def test_sigterm_flushes_the_spool_to_the_collector(agents, tmp_path):
    server = IngestServer(token="tok")
    (tmp_path / "token").write_text("tok")
    server.fail_next = 10**6  # the collector answers 503 ...
    try:
        a = agents(
            collector_url=server.url,
            token_file=tmp_path / "token",
            backoff_initial_s=60,
            backoff_max_s=60,
            probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        ).start()
        wait_until(lambda: value(scrape(a), "straggler_agent_ticks_total"), what="a tick")
        a.signal(signal.SIGUSR1)
        wait_until(lambda: "upload failed" in a.log(), what="a failed upload")
        assert spooled(a) == 3 and server.rows == {}
        server.fail_next = 0  # ... and is back, while the agent backs off for a minute: stop it now
        assert a.stop(timeout_s=30) == 0
        assert len(server.rows) == 3 and spooled(a) == 0
        assert "spool flushed; 0 results left" in a.log()
    finally:
        server.close()


def test_a_telemetry_read_that_raises_never_lets_a_probe_start(agents, tmp_path):
    """Three good idle snapshots, then the backend raises on every read (a fault in the fixture).
    The idle grace period would end during the failing reads: no probe may start, the GPUs are
    exported stale (straggler_gpu_up 0) and the failures are counted by reason."""
    fixture = fixture_with_faults(
        tmp_path, "h100_idle", [{"device": None, "from_read": 3, "until_read": None, "python_error": "RuntimeError"}]
    )
    interval_s, grace_s = 0.5, 2.0
    a = agents(
        telemetry=f"fake:{fixture}",
        interval_s=interval_s,
        idle_grace_s=grace_s,
        probe_every_s=3600,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
    ).start()

    def failed():
        return value(scrape(a), "straggler_agent_errors_total", source="telemetry") or 0

    # enough failed ticks that the grace period, counted from the good ones, has long passed
    wait_until(lambda: failed() >= grace_s / interval_s + 3, what="failed telemetry reads")
    assert value(scrape(a), "straggler_agent_probe_runs_total") == 0.0
    a.signal(signal.SIGUSR1)
    wait_until(lambda: "probe requested but the node is busy: telemetry unavailable" in a.log(), what="refusal")
    samples = scrape(a)
    assert value(samples, "straggler_agent_probe_runs_total") == 0.0
    assert not (a.dir / "agent-scans").exists() or not list((a.dir / "agent-scans").iterdir())
    assert (
        value(samples, "straggler_agent_telemetry_failures_total", reason="backend_raised") >= grace_s / interval_s + 3
    )
    assert value(samples, "straggler_agent_devices_idle") == 0.0
    ups = {k: v for k, v in samples.items() if k[0] == "straggler_gpu_up"}
    assert len(ups) == 8 and set(ups.values()) == {0.0} and {dict(k[1])["status"] for k in ups} == {"stale"}
    assert value(samples, "straggler_agent_telemetry_failures_total", reason="backend_error") == 0.0
    assert a.stop() == 0


def test_sighup_reaches_the_scan_poller(agents, tmp_path):
    server = IngestServer(token="tok")
    (tmp_path / "token").write_text("tok")
    try:
        a = agents(collector_url=server.url, token_file=tmp_path / "token", poll_wait_s=1.0).start()
        wait_until(lambda: 1.0 in server.poll_waits, what="a long poll")
        a.config.write_text(
            toml({**a.settings, "collector_url": server.url, "token_file": tmp_path / "token", "poll_wait_s": 0.25})
        )
        a.signal(signal.SIGHUP)
        wait_until(lambda: 0.25 in server.poll_waits, what="a long poll with the reloaded wait")
        assert a.stop() == 0
    finally:
        server.close()


def test_a_cluster_scan_the_probe_deadline_cannot_hold_is_refused(agents, tmp_path):
    """The real scan command (no probe_command): a 300 s probe needs more than probe_deadline_s."""
    server = IngestServer(token="tok")
    (tmp_path / "token").write_text("tok")
    try:
        server.scans = [{**_scan("s-long", 1.0), "duration_s": 300.0}]
        a = agents(collector_url=server.url, token_file=tmp_path / "token", probe_deadline_s=600).start()
        wait_until(lambda: server.statuses, what="the scan's state")
        assert [(sid, b["state"], b["error"]) for sid, b in server.statuses] == [
            ("s-long", "failed", "cannot finish: 1 probe(s) at 300 s need 880 s, more than probe_deadline_s = 600 s")
        ]
        assert value(scrape(a), "straggler_agent_probe_runs_total") == 0.0
        assert a.stop() == 0
    finally:
        server.close()


@pytest.mark.parametrize("key, bad", [("interval_s", "nan"), ("http_timeout_s", "inf"), ("poll_wait_s", "1e300")])
def test_a_reload_with_a_non_finite_or_huge_number_is_refused(agents, key, bad):
    a = agents().start()
    wait_until(lambda: (value(scrape(a), "straggler_agent_ticks_total") or 0) >= 1, what="a tick")
    a.config.write_text(toml(a.settings) + "")
    text = a.config.read_text().replace(f"{key} = {a.settings[key]}\n", "")
    a.config.write_text(text + f"{key} = {bad}\n")
    a.signal(signal.SIGHUP)
    msg = a.notify.wait_for("STATUS", prefix="reload refused", timeout_s=15)
    assert f"{key}: must be" in msg["STATUS"] and ("finite" in msg["STATUS"] or "at most" in msg["STATUS"]), msg
    ticks = value(scrape(a), "straggler_agent_ticks_total")
    wait_until(lambda: value(scrape(a), "straggler_agent_ticks_total") >= ticks + 2, what="ticks after the reload")
    assert a.proc.poll() is None and "config reloaded" not in a.log()
    assert a.stop() == 0


class _WrongShapeCollector:
    """A real HTTP server answering every request 200 with a JSON list (not the object the agent expects)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                outer.requests += 1
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_unexpected_error_in_the_upload_and_poll_threads_is_counted_logged_and_retried(agents, tmp_path):
    from straggler.agent.spool import Spool

    server = _WrongShapeCollector()
    (tmp_path / "token").write_text("tok")
    try:
        a = agents(collector_url=server.url, token_file=tmp_path / "token", poll_wait_s=0.2)
        spool = Spool(a.settings["spool_path"])  # a result waiting for upload when the agent starts
        row = {
            "ts": time.time(),
            "scan_id": "s0",
            "host": "agent0",
            "gpu": "cpu0",
            "index": 0,
            "model": "test cpu",
            "probe": "matmul",
            "settings": "n=64",
            "sample": 0,
            "duration_s": 0.1,
            "value": 100.0,
            "unit": "GFLOP/s",
            "power_w": None,
        }
        assert spool.add_results([row], host="agent0") == 1
        a.start()
        wait_until(
            lambda: (value(scrape(a), "straggler_agent_errors_total", source="poll") or 0) >= 3,
            what="three counted poll errors (the thread keeps polling)",
        )
        # the collector's reply to the upload is a list: the row left the spool, the reply cannot be read
        wait_until(
            lambda: (value(scrape(a), "straggler_agent_errors_total", source="upload") or 0) >= 1,
            what="a counted upload error",
        )
        assert spool.add_results([{**row, "sample": 1}], host="agent0") == 1  # the thread still uploads
        wait_until(
            lambda: (value(scrape(a), "straggler_agent_errors_total", source="upload") or 0) >= 2,
            what="a second counted upload error (the upload thread kept going)",
        )
        spool.close()
        log = a.log()
        # a reply that is no scan is refused by name (agent/scanspec.py), at every offer
        polls = [ln for ln in log.splitlines() if "scan from the collector dropped" in ln]
        uploads = [ln for ln in log.splitlines() if "upload failed" in ln]
        assert len(polls) >= 3 and "the scan is not a JSON object (list)" in polls[0], log[-2000:]
        assert uploads and "AttributeError" in uploads[0], log[-2000:]
        assert "Traceback" not in log, log[-2000:]
        assert a.stop() == 0
    finally:
        server.close()


def test_a_reload_names_the_keys_that_wait_for_a_restart_in_one_warning(agents):
    a = agents().start()
    a.config.write_text(toml({**a.settings, "listen_port": 1, "host": "renamed", "interval_s": 0.25}))
    a.signal(signal.SIGHUP)
    a.notify.wait_for("STATUS", prefix="config reloaded", timeout_s=15)
    warnings = [ln for ln in a.log().splitlines() if ln.startswith("WARNING") and "restart" in ln]
    assert len(warnings) == 1 and "listen_port" in warnings[0] and "host" in warnings[0], a.log()
    assert "interval_s" not in warnings[0]
    assert a.stop() == 0
