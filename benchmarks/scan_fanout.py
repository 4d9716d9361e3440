"""Cluster-scan fan-out: how soon N long-polling agents learn of a new scan, while ingest goes on.

Starts a real collector (``straggler collector``, its own process, on 127.0.0.1), then N simulated
agents in ``--procs`` client processes, each agent one keep-alive HTTP connection from its own
loopback address (50 agents per address in 127.1.0.0/16: real agents each have their own, and the
collector caps connections per address) long-polling ``GET /api/v1/scans/next``. Once every agent is
waiting, one thread ingests batches of ``--batch-rows`` rows back to back and a scan naming every
agent is created; each agent notes when the scan's response has arrived in full. Prints the
delay from the create request to each agent's receipt (p50, p99, max, share within 2 s) and the
ingest rate meanwhile, as one JSON line with ``--json``.

    python benchmarks/scan_fanout.py --agents 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOKEN = "fanout-benchmark-token-0123456789"
PER_ADDRESS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _address(i: int) -> str:
    k = i // PER_ADDRESS
    return f"127.1.{k // 250}.{k % 250 + 1}"


async def _agent(i: int, port: int, ready: list, got: dict, stop: asyncio.Event) -> None:
    host = f"node{i:05d}"
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(_address(i), 0))
    request = (
        f"GET /api/v1/scans/next?host={host}&wait_s=60 HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()
    try:
        while not stop.is_set():
            writer.write(request)
            await writer.drain()
            ready.append(i)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            if status == 200:
                got[i] = (time.time(), body[:200])  # the whole response has arrived (not parsed: client CPU)
                return
    finally:
        writer.close()


def _client(first: int, n: int, port: int, conn, go) -> None:
    _raise_nofile()

    async def main():
        ready: list = []
        got: dict = {}
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_agent(i, port, ready, got, stop)) for i in range(first, first + n)]
        while len(ready) < n:
            await asyncio.sleep(0.05)
        conn.send(("ready", n))
        while not go.is_set():
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        for t in tasks:
            t.cancel()
        conn.send(("got", got))

    asyncio.run(main())


def _ingest(url: str, rows: int, stop: threading.Event, counts: list) -> None:
    import httpx

    from straggler.records import result_id

    k = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        while not stop.is_set():
            batch = []
            for j in range(rows):
                row = {
                    "ts": time.time(),
                    "scan_id": f"ingest-{k}",
                    "host": f"ing{j % 100}",
                    "gpu": f"GPU-{j}",
                    "model": "NVIDIA H100",
                    "probe": "matmul",
                    "settings": "n=1",
                    "sample": 0,
                    "value": 700.0 + j % 7,
                    "unit": "TFLOP/s",
                }
                row["id"] = result_id(row)
                batch.append(row)
            t0 = time.monotonic()
            r = c.post("/api/v1/results", json={"host": "ingest", "results": batch})
            counts.append((time.monotonic() - t0, r.status_code, rows))
            k += 1


def start_collector(tmp: Path, port: int, env: dict | None = None, db: str | Path | None = None) -> subprocess.Popen:
    """``straggler collector`` on 127.0.0.1:port with its token under ``tmp`` and its database at
    ``db`` (an SQLite path or a ``postgresql://`` URL; default ``tmp/c.db``), once /healthz answers
    (benchmarks/collector_memory.py and collector_scale.py use it too)."""
    import httpx

    token = tmp / "token"
    token.write_text(TOKEN)
    env = {**os.environ, "STRAGGLER_COLLECTOR_LOG_LEVEL": "warning", **(env or {})}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "straggler",
            "collector",
            "--port",
            str(port),
            "--db",
            str(tmp / "c.db" if db is None else db),
            "--token-file",
            str(token),
        ],
        env=env,
        preexec_fn=_raise_nofile,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the collector did not start")
        time.sleep(0.1)


def run(agents: int, procs: int, batch_rows: int, start_delay_s: float) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = start_collector(Path(tmp), port, {"STRAGGLER_COLLECTOR_MAX_WAIT_S": "60"})
        try:
            go = mp.Event()
            share = [agents // procs + (1 if p < agents % procs else 0) for p in range(procs)]
            pipes, workers, first = [], [], 0
            for n in share:
                here, there = mp.Pipe()
                w = mp.Process(target=_client, args=(first, n, port, there, go))
                w.start()
                pipes.append(here)
                workers.append(w)
                first += n
            for p in pipes:
                assert p.recv()[0] == "ready"
            # every poll is in the collector and waiting: each host is in the agents table
            import sqlite3

            db = sqlite3.connect(Path(tmp) / "c.db", timeout=30)
            while db.execute("SELECT COUNT(*) FROM agents").fetchone()[0] < agents:
                time.sleep(0.2)
            db.close()
            time.sleep(1.0)
            stop, counts = threading.Event(), []
            ingest = threading.Thread(target=_ingest, args=(url, batch_rows, stop, counts))
            if batch_rows:
                ingest.start()
            time.sleep(1.0)
            hosts = [f"node{i:05d}" for i in range(agents)]
            t_create = time.time()
            r = httpx.post(
                url + "/api/v1/scans",
                json={"probes": ["matmul"], "duration_s": 1, "hosts": hosts, "start_delay_s": start_delay_s},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            r.raise_for_status()
            create_s = time.time() - t_create
            go.set()
            got = {}
            for p in pipes:
                kind, part = p.recv()
                got.update(part)
            stop.set()
            if batch_rows:
                ingest.join()
            text = httpx.get(url + "/metrics", timeout=30).text
            server_create_s = sum(
                float(x.rsplit(" ", 1)[1])
                for x in text.splitlines()
                if x.startswith('straggler_collector_request_duration_seconds_sum{handler="/api/v1/scans"}')
            )
            for w in workers:
                w.join(30)
        finally:
            server.terminate()
            server.wait(30)
    delays = sorted(ts - t_create for ts, _ in got.values())
    during = [c for c in counts if c[1] == 200]
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] if delays else None  # noqa: E731
    return {
        "agents": agents,
        "learnt": len(delays),
        "create_s": create_s,
        "server_create_s": server_create_s,
        "within_2s_ratio": sum(d <= 2.0 for d in delays) / agents,
        "p50_s": pick(0.5),
        "p99_s": pick(0.99),
        "max_s": delays[-1] if delays else None,
        "ingest_batches": len(during),
        "ingest_rows_per_s": (sum(c[2] for c in during) / sum(c[0] for c in during)) if during else None,
        "ingest_errors": len(counts) - len(during),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=3000)
    ap.add_argument("--procs", type=int, default=4, help="client processes the agents are spread over")
    ap.add_argument("--batch-rows", type=int, default=2000, help="rows per ingest batch during the fan-out")
    ap.add_argument("--start-delay-s", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.agents, args.procs, args.batch_rows, args.start_delay_s)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"create request {res['create_s']:.3f} s ({res['server_create_s']:.3f} s in the collector); {res['learnt']}/{res['agents']} agents learnt of the scan; {res['within_2s_ratio']:.1%} within 2 s; "
            f"p50 {res['p50_s']:.3f} s, p99 {res['p99_s']:.3f} s, max {res['max_s']:.3f} s; ingest meanwhile "
            f"{res['ingest_batches']} batches, {res['ingest_rows_per_s'] or 0:.0f} rows/s, {res['ingest_errors']} errors"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
