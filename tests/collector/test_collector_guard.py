"""Half-open clients against the real collector process (``straggler collector``) on 127.0.0.1.

The attacker connects from 127.0.0.2 and sends the start of a request head, never its end (a
slowloris); the collector runs with a soft ``RLIMIT_NOFILE`` of 1024, what a unit without
``LimitNOFILE`` gets. Without a header timeout and a per-client cap, 1,100 such connections take
every file descriptor and /healthz and ingest stop answering."""

import socket
import subprocess
import sys
import time

import httpx
import pytest

from straggler.collector.settings import CollectorSettings
from half_open import ATTACKERS, closed, nofile_1024, open_half_open
from test_agent_support import free_port
from test_collector_api import AUTH, TOKEN, make_rows

HEAD = b"POST /api/v1/results HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"


@pytest.fixture
def collector(tmp_path):
    port = free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    err = open(tmp_path / "stderr.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "straggler",
            "collector",
            "--port",
            str(port),
            "--db",
            str(tmp_path / "c.db"),
            "--token-file",
            str(token),
        ],
        stdout=subprocess.DEVNULL,
        stderr=err,
        preexec_fn=nofile_1024,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()
        time.sleep(0.1)
    yield port, url
    proc.terminate()
    proc.wait(30)
    err.close()


def test_1100_half_open_connections_do_not_stop_healthz_or_ingest(collector):
    port, url = collector
    defaults = CollectorSettings()
    header_timeout_s = getattr(defaults, "header_timeout_s", 10.0)  # (getattr: runs on the code before the guard)
    cap = getattr(defaults, "max_connections_per_client", 64)
    socks = open_half_open(port, HEAD)
    try:
        t0 = time.monotonic()
        # the legitimate client: answered while the attack holds, well before the held ones time out
        limit_s = header_timeout_s / 2
        health = httpx.get(url + "/healthz", timeout=limit_s)
        healthz_s = time.monotonic() - t0
        assert health.status_code == 200
        rows = make_rows("legit", n_gpus=2, ts=time.time())
        r = httpx.post(url + "/api/v1/results", json={"host": "legit", "results": rows}, headers=AUTH, timeout=limit_s)
        assert r.json() == {"accepted": len(rows), "duplicates": 0}
        # past the cap, the attacker's connections were closed at once; the rest once the head is late
        time.sleep(0.5)
        held = sum(not closed(s) for s in socks)
        assert held <= cap, held
        deadline = t0 + header_timeout_s * 3
        while held and time.monotonic() < deadline:
            time.sleep(0.2)
            held = sum(not closed(s) for s in socks)
        assert held == 0
        print(f"\n/healthz answered in {healthz_s * 1000:.1f} ms with {ATTACKERS} half-open connections")
    finally:
        for s in socks:
            s.close()


def test_a_withheld_body_is_dropped_after_body_timeout(tmp_path):
    """Headers complete, body never sent: 408 once ``body_timeout_s`` has passed (in-process)."""
    from straggler.collector.service import BackgroundCollector

    settings = CollectorSettings(port=0, db_path=tmp_path / "c.db", body_timeout_s=0.5)
    with BackgroundCollector(settings, TOKEN) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=settings.body_timeout_s * 20) as s:
            s.sendall(
                b"POST /api/v1/results HTTP/1.1\r\nHost: c\r\nContent-Length: 100\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n\r\n{"
            )
            reply = b""  # until the collector closes (connection: close): head and body may come apart
            while chunk := s.recv(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b"body_timeout_s=0.5" in reply
