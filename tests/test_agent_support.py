"""Helpers shared by the agent tests (no tests here): a stand-in scan script for the probe child, a
real sd_notify socket, an agent started as a real subprocess, and a minimal real HTTP server that
implements the collector's ingest + scan contract (docs/interfaces.md) for upload-fault tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from conftest import ROOT
from conftest import free_port as free_port  # re-exported: the agent tests import it from here

# The probe child's contract: `... --json --output F --scan-id ID --deadline S ... [--start-at T]`.
# FAKE_SCAN_MODE: ok (3 rows, exit 0), hang (2 rows then sleeps), fail (1 row, exit 2), undecided (3 rows,
# an undecided device and no failure in the document, exit 2 as `straggler scan` does), stragglers (3 rows,
# the document, exit 1), crash (3 rows, then a Python traceback: exit 1 without a document), segv (3 rows,
# then killed by SIGSEGV), slow (FAKE_SCAN_ROWS rows, one every FAKE_SCAN_EVERY_S seconds, then exit 0);
# FAKE_SCAN_ROWS overrides the number of rows; FAKE_SCAN_EXTRA (a JSON object) is merged into every row.
FAKE_SCAN = r"""
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for a in ("--output", "--scan-id", "--deadline", "--start-at", "--device", "--probes", "--duration", "--max-rounds"):
    p.add_argument(a)
p.add_argument("--json", action="store_true")
a = p.parse_args()
if a.start_at:
    time.sleep(max(0.0, float(a.start_at) - time.time()))
mode = os.environ.get("FAKE_SCAN_MODE", "ok")
n = int(os.environ.get("FAKE_SCAN_ROWS") or {"hang": 2, "fail": 1}.get(mode, 3))
every_s = float(os.environ.get("FAKE_SCAN_EVERY_S") or 0.0)
extra = json.loads(os.environ.get("FAKE_SCAN_EXTRA") or "{}")
with open(a.output, "w") as f:
    for i in range(n):
        f.write(json.dumps({"ts": time.time(), "scan_id": a.scan_id, "host": "x", "gpu": f"cpu{i % 3}", "index": i % 3,
                            "model": "test cpu", "probe": "matmul", "settings": "n=64", "sample": i // 3,
                            "duration_s": 0.1, "value": 100.0 + i, "unit": "GFLOP/s", "power_w": None, **extra}) + "\n")
        f.flush()
        if mode == "slow":
            time.sleep(every_s)
with open(a.output + ".args", "w") as f:
    json.dump(sys.argv[1:], f)
if mode == "hang":
    time.sleep(3600)
if mode == "crash":
    raise RuntimeError("the scan crashed")
if mode == "segv":
    import signal
    os.kill(os.getpid(), signal.SIGSEGV)
if mode == "stragglers":
    print(json.dumps({"scan_id": a.scan_id, "failures": [], "devices": [{"gpu": "cpu0", "verdict": "straggler"}]}))
    sys.exit(1)
if mode == "fail":
    print("probe matmul failed: worker 0 died", file=sys.stderr)
    sys.exit(2)
if mode == "undecided":
    print(json.dumps({"scan_id": a.scan_id, "failures": [], "devices": [{"gpu": "cpu0", "verdict": "undecided"}]}))
    print("straggler: error: could not decide: 1 device(s) undecided", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"scan_id": a.scan_id, "devices": []}))
"""


def write_fake_scan(directory: Path) -> Path:
    path = directory / "fake_scan.py"
    path.write_text(FAKE_SCAN)
    return path


def fixture_with_faults(directory: Path, scenario: str, faults: list[dict], name: str | None = None) -> Path:
    """A copy of the fixture ``scenario`` (probes/fixtures) with ``faults`` (scenario data) added."""
    from straggler.probes.fakenvml import FIXTURE_DIR

    data = json.loads((FIXTURE_DIR / f"{scenario}.json").read_text())
    data["faults"] = list(data.get("faults", [])) + faults
    data["scenario"] = name or f"{scenario}_with_faults"
    path = directory / f"{data['scenario']}.json"
    path.write_text(json.dumps(data))
    return path


def toml(values: dict) -> str:
    out = []
    for k, v in values.items():
        if isinstance(v, bool):
            out.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            out.append(f"{k} = {v}")
        elif isinstance(v, (list, tuple)):
            out.append(f"{k} = {json.dumps([str(x) for x in v])}")
        else:
            out.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(out) + "\n"


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(
        self, key: str, value: str | None = None, timeout_s: float = 30.0, prefix: str | None = None
    ) -> dict[str, str]:
        """The first message (already received or arriving) with ``key`` (= ``value``, or starting
        with ``prefix``, if given)."""
        end = time.monotonic() + timeout_s
        seen = 0
        while True:
            for msg in self.messages[seen:]:
                if key in msg and (value is None or msg[key] == value) and msg[key].startswith(prefix or ""):
                    return msg
            seen = len(self.messages)
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} notification in {timeout_s} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self.sock.close()


class AgentProcess:
    """`python -m straggler agent --config F` as a real subprocess with a real notify socket."""

    def __init__(
        self, tmp: Path, name: str = "agent", env: dict | None = None, prefix: list[str] | None = None, **settings
    ) -> None:
        """``prefix``: a command the agent runs under (e.g. ``unshare --pid --fork --mount-proc``)."""
        self.prefix = list(prefix or [])
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.notify = NotifySocket(self.dir)
        defaults = {
            "host": name,
            "listen_port": 0,
            "telemetry": "fake:h100_idle",
            "interval_s": 0.5,
            "spool_path": self.dir / "spool.sqlite",
            "idle_grace_s": 0,
            "probe_every_s": 0,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            "poll_wait_s": 1.0,
            "http_timeout_s": 5.0,
        }
        self.settings = {**defaults, **settings}
        self.config = self.dir / "agent.toml"
        self.config.write_text(toml(self.settings))
        self.stderr_path = self.dir / "stderr.log"
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
        self.env.pop("STRAGGLER_TELEMETRY", None)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout_s: float = 60.0) -> "AgentProcess":
        self.notify.messages.clear()
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.prefix + [sys.executable, "-m", "straggler", "agent", "--config", str(self.config)],
                stderr=err,
                stdout=subprocess.DEVNULL,
                env=self.env,
                cwd=self.dir,
            )
        try:
            ready = self.notify.wait_for("READY", "1", timeout_s)
        except AssertionError:
            raise AssertionError(f"agent not ready: {self.log()[-2000:]}") from None
        self.port = int(ready["STATUS"].rsplit(":", 1)[1])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"agent ignored SIGTERM for {timeout_s} s: {self.log()[-2000:]}") from None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
        finally:
            self.notify.close()


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition", step_s: float = 0.1):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class IngestServer:
    """A minimal real HTTP collector: POST /api/v1/results (idempotent by id, bearer token),
    GET /api/v1/scans/next (long poll), POST /api/v1/scans/{id}/status. ``fail_next`` answers 503."""

    def __init__(self, token: str = "secret", port: int = 0, ssl_context=None) -> None:
        """``ssl_context``: serve HTTPS with it (a server-side ``ssl.SSLContext``)."""
        self.token = token
        self.rows: dict[str, dict] = {}
        self.posts = 0  # result POSTs that reached the handler
        self.polls = 0  # GET /api/v1/scans/next requests
        self.poll_waits: list[float] = []  # the wait_s of each of them
        self.fail_next = 0
        self.scans: list[dict] = []
        self.statuses: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a stopped agent's long poll)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self._reply(401, {"detail": "bad token"})
                    return False
                return True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorized():
                    return
                path = urlparse(self.path).path
                with outer.lock:
                    if outer.fail_next > 0:
                        outer.fail_next -= 1
                        return self._reply(503, {"detail": "unavailable"})
                    if path == "/api/v1/results":
                        outer.posts += 1
                        bad = [r["id"] for r in body["results"] if r.get("probe") == "bad"]
                        if bad:  # strict validation: the whole batch is refused, nothing stored
                            return self._reply(422, {"detail": f"results.{bad[0]}.probe: unknown probe 'bad'"})
                        new = [r for r in body["results"] if r["id"] not in outer.rows]
                        for r in new:
                            outer.rows[r["id"]] = r
                        return self._reply(200, {"accepted": len(new), "duplicates": len(body["results"]) - len(new)})
                    if path.startswith("/api/v1/scans/") and path.endswith("/status"):
                        outer.statuses.append((path.split("/")[4], body))
                        return self._reply(200, {"scan_id": path.split("/")[4]})
                self._reply(404, {"detail": "not found"})

            def do_GET(self):
                if not self._authorized():
                    return
                url = urlparse(self.path)
                if url.path == "/api/v1/scans/next":
                    with outer.lock:
                        outer.polls += 1
                        outer.poll_waits.append(float(parse_qs(url.query).get("wait_s", ["0"])[0]))
                    host = parse_qs(url.query)["host"][0]
                    end = time.monotonic() + min(float(parse_qs(url.query).get("wait_s", ["0"])[0]), 2.0)
                    while time.monotonic() < end:
                        with outer.lock:
                            reported = {sid for sid, b in outer.statuses if b["host"] == host}
                            for scan in outer.scans:
                                if scan["scan_id"] not in reported:
                                    return self._reply(200, scan)
                        time.sleep(0.05)
                    return self._reply(204)
                self._reply(404, {"detail": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
