"""`straggler collector` as a real process: systemd notify protocol, SIGTERM, restart, bad config."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port
from test_collector_api import AUTH, TOKEN, make_rows


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in m for m in self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on NOTIFY_SOCKET; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass


def start(tmp_path, port, notify=None, extra_env=None, args=()):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "STRAGGLER_COLLECTOR_ANALYSIS_DEBOUNCE_S": "0.05", **(extra_env or {})}
    if notify is not None:
        env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    cmd = [
        sys.executable,
        "-m",
        "straggler",
        "collector",
        "--port",
        str(port),
        "--db",
        str(tmp_path / "c.db"),
        "--token-file",
        str(token_file),
        *args,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc, timeout_s=20):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_ready_watchdog_sigterm_and_data_survive_a_restart(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port, notify)
    try:
        notify.wait_for("READY=1")
        assert any(f"STATUS=listening on 127.0.0.1:{port}" in m for m in notify.messages)
        notify.wait_for("WATCHDOG=1")
        rows = make_rows("restart", n_gpus=3)
        r = httpx.post(f"{url}/api/v1/results", json={"host": "restart", "results": rows}, headers=AUTH, timeout=30)
        assert r.json() == {"accepted": 9, "duplicates": 0}
    finally:
        rc = stop(proc)
    assert rc == 0, proc.stderr.read()
    notify.wait_for("STOPPING=1")

    proc = start(tmp_path, port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        r = httpx.post(f"{url}/api/v1/results", json={"host": "restart", "results": rows}, headers=AUTH, timeout=30)
        assert r.json() == {"accepted": 0, "duplicates": 9}  # stored before the restart, exactly once
        history = httpx.get(f"{url}/api/v1/gpus/GPU-restart-2/history", headers=AUTH, timeout=5).json()["results"]
        assert sorted(h["id"] for h in history) == sorted(r["id"] for r in rows if r["gpu"] == "GPU-restart-2")
    finally:
        assert stop(proc) == 0


def run_cli(args, env=None, timeout_s=60):
    return subprocess.run(
        [sys.executable, "-m", "straggler", "collector", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )


def test_check_prints_the_effective_settings(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 9555\nhistory_scans = 3\n")
    out = run_cli(
        ["--config", str(cfg), "--check", "--json", "--address", "127.0.0.2"],
        env={"STRAGGLER_COLLECTOR_TOKEN": TOKEN, "STRAGGLER_COLLECTOR_HISTORY_SCANS": "7"},
    )
    assert out.returncode == 0, out.stderr
    import json

    shown = json.loads(out.stdout)
    assert shown["port"] == 9555 and shown["history_scans"] == 7 and shown["address"] == "127.0.0.2"
    assert TOKEN not in out.stdout


@pytest.mark.parametrize(
    "toml, args, env, message",
    [
        ('port = "x"\nbogus = 1\n', [], {"STRAGGLER_COLLECTOR_TOKEN": TOKEN}, "port: expected an integer"),
        ("", [], {"STRAGGLER_COLLECTOR_TOKEN": ""}, "no token: set token_file"),
        ("", ["--token-file", "/nonexistent/token"], {}, "token_file: cannot read /nonexistent/token"),
        ("", [], {"STRAGGLER_COLLECTOR_TOKEN": "short"}, "shorter than 16 characters"),
        ("max_wait_s = 0\n", [], {"STRAGGLER_COLLECTOR_TOKEN": TOKEN}, "max_wait_s: must be > 0"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, toml, args, env, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    out = run_cli(["--config", str(cfg), "--db", str(tmp_path / "c.db"), "--port", "0", *args], env=env)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    if "bogus" in toml:
        assert "unknown key 'bogus'" in out.stderr  # every problem at once


def test_port_in_use_and_unusable_database_exit_2(tmp_path):
    env = {"STRAGGLER_COLLECTOR_TOKEN": TOKEN}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = run_cli(["--port", str(port), "--db", str(tmp_path / "c.db")], env=env)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    (tmp_path / "notadir").write_text("")
    out = run_cli(["--port", "0", "--db", str(tmp_path / "notadir" / "c.db")], env=env)
    # refused by the start's own checks (the same ones --check runs), naming the path and why
    assert out.returncode == 2 and "db_path: cannot create" in out.stderr and "is not a directory" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_accepted_connections_have_tcp_nodelay():
    # A listening socket made with proto 0 makes asyncio skip TCP_NODELAY, and every small answer
    # then waits for the client's delayed ACK (~40 ms per request).
    import asyncio

    from straggler.collector.service import bind

    async def main():
        sock = bind("127.0.0.1", 0)
        got = asyncio.get_running_loop().create_future()

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                s = transport.get_extra_info("socket")
                got.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Proto, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(got, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(main()) != 0


def test_sighup_rereads_the_token_and_keeps_running(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/results"
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start(tmp_path, port, notify)
    new = "rotated-token-abcdefghijklmnop"
    rows = make_rows("hup", n_gpus=1, samples=1)
    try:
        notify.wait_for("READY=1")
        assert httpx.post(url, json={"host": "hup", "results": rows}, headers=AUTH, timeout=30).status_code == 200
        (tmp_path / "token").write_text("short\n")  # unusable: logged, the current token is kept
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert httpx.post(url, json={"host": "hup", "results": rows}, headers=AUTH, timeout=30).status_code == 200
        (tmp_path / "token").write_text(new + "\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while httpx.post(url, json={"host": "hup", "results": rows}, headers=AUTH, timeout=30).status_code != 401:
            assert time.monotonic() < deadline, "the old token still works"
            time.sleep(0.1)
        r = httpx.post(
            url, json={"host": "hup", "results": rows}, headers={"Authorization": f"Bearer {new}"}, timeout=30
        )
        assert r.json() == {"accepted": 0, "duplicates": 1}
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert "token not reloaded" in proc.stderr.read()


def test_notify_never_blocks_on_a_receiver_that_does_not_read(tmp_path):
    from straggler.sdnotify import Notifier

    receiver = NotifySocket(tmp_path / "full.sock")  # bound, never read
    notifier = Notifier({"NOTIFY_SOCKET": receiver.path})
    results = [notifier.watchdog() for _ in range(5000)]  # a blocking send would hang here
    assert results[0] is True and results[-1] is False  # the queue filled up; later pings are dropped
    assert Notifier({}).ready("x") is False  # outside systemd: nothing sent
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}).ready("x") is False


def test_stopping_the_collector_answers_long_polls_cleanly(tmp_path):
    # agents long-poll for scans all the time: a stop must answer them "no scan" (204), not cancel
    # them into a 500 with a CancelledError traceback in the journal
    import sqlite3
    import threading

    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port, notify, extra_env={"STRAGGLER_COLLECTOR_MAX_WAIT_S": "3600"})
    answers = []

    def poll(host):
        try:
            r = httpx.get(f"{url}/api/v1/scans/next", params={"host": host, "wait_s": 3600}, headers=AUTH, timeout=None)
            answers.append((host, r.status_code, r.text))
        except httpx.HTTPError as e:
            answers.append((host, type(e).__name__, str(e)))

    polls = [threading.Thread(target=poll, args=(f"lp{i}",)) for i in range(3)]
    try:
        notify.wait_for("READY=1")
        for t in polls:
            t.start()

        def polling():  # every long poll has reached the collector (it marks its host alive)
            with sqlite3.connect(tmp_path / "c.db") as db:
                return db.execute("SELECT COUNT(*) FROM agents").fetchone()[0] == len(polls)

        deadline = time.monotonic() + 30
        while not polling():
            assert time.monotonic() < deadline, "the long polls did not reach the collector"
            time.sleep(0.05)
    finally:
        rc = stop(proc)
        for t in polls:
            t.join(30)
    err = proc.stderr.read()
    assert rc == 0, err
    assert sorted(answers) == [(f"lp{i}", 204, "") for i in range(3)], (answers, err)
    assert "Traceback" not in err and "CancelledError" not in err, err


def test_a_cluster_scan_failure_without_a_rank_names_none():
    """A node's failure in a cluster scan has no rank (the collector knows none): say nothing of it."""
    import io

    from rich.console import Console

    from straggler.scanview import render_scan

    report = {"devices": [], "stragglers": 0, "engine": "straggler.analysis"}
    failures = [
        {"host": "node7", "device": "-", "rank": None, "probe": "scan", "error": "node busy"},
        {"host": "node8", "device": "cuda:1", "rank": 3, "probe": "matmul", "error": "worker died"},
    ]
    buf = io.StringIO()
    render_scan(Console(file=buf, width=200, color_system=None), report, "notice", "s1", failures)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("failed")]
    assert lines == ["failed node7/- scan: node busy", "failed node8/cuda:1 (rank 3) matmul: worker died"]
