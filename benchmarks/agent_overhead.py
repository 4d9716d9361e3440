"""Agent overhead: CPU share of one core and RSS of `straggler agent` with 8 simulated H100s.

Runs real agent processes on the fake NVML backend (fixture h100_healthy, 8 GPUs) side by side,
one per telemetry interval (default: the shipped 15 s and a stress case of 1 s), scrapes each agent's
/metrics every 15 s as Prometheus would, and measures the agent's CPU time (utime + stime from
/proc/<pid>/stat) and resident memory (VmRSS, max of the samples) after a warm-up.

    .venv/bin/python benchmarks/agent_overhead.py [--seconds 120] [--intervals 15,1]

Targets (issue 4): <= 1% of one core, <= 100 MB RSS. The fake backend costs less per read than
real NVML calls (a few hundred microseconds per GPU); the tick duration is shown so the two can be
compared on a GPU node.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 100.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="measured window per agent")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--intervals", default="15,1", help="telemetry intervals to compare, seconds")
    ap.add_argument("--scenario", default="h100_healthy")
    args = ap.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="agent-overhead-"))
    env = {k: v for k, v in os.environ.items() if k not in ("STRAGGLER_TELEMETRY", "NOTIFY_SOCKET")}
    agents = []
    for interval in intervals:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "straggler",
            "agent",
            "--telemetry",
            f"fake:{args.scenario}",
            "--interval",
            str(interval),
            "--listen-port",
            str(port),
            "--spool",
            str(tmp / f"{interval}.sqlite"),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{interval}.log", "wb"))
        agents.append({"interval": interval, "port": port, "proc": proc})
    time.sleep(args.warmup)
    for a in agents:
        if a["proc"].poll() is not None:
            log = (tmp / f"{a['interval']}.log").read_text()[-500:]
            sys.exit(f"agent (interval {a['interval']}) exited: {log}")
        a["cpu0"], a["rss"], a["scrapes"] = cpu_seconds(a["proc"].pid), [], 0
        a["ticks0"] = metric(httpx.get(f"http://127.0.0.1:{a['port']}/metrics").text, "straggler_agent_ticks_total")
    t0 = time.monotonic()
    next_scrape = t0
    while (now := time.monotonic()) - t0 < args.seconds:
        if now >= next_scrape:
            for a in agents:
                text = httpx.get(f"http://127.0.0.1:{a['port']}/metrics", timeout=10).text
                a["scrapes"] += 1
                a["last"] = text
            next_scrape += 15.0
        for a in agents:
            a["rss"].append(rss_mb(a["proc"].pid))
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    rows = []
    for a in agents:
        cpu = cpu_seconds(a["proc"].pid) - a["cpu0"]
        text = httpx.get(f"http://127.0.0.1:{a['port']}/metrics").text
        ticks = metric(text, "straggler_agent_ticks_total") - a["ticks0"]
        tick_ms = 1000 * metric(text, "straggler_agent_tick_duration_seconds")
        a["proc"].terminate()
        a["proc"].wait(timeout=60)
        pct = 100 * cpu / elapsed
        rss = max(a["rss"])
        rows.append(
            (
                a["interval"],
                elapsed,
                int(ticks),
                a["scrapes"],
                tick_ms,
                cpu,
                pct,
                pct / CPU_TARGET_PCT,
                rss,
                rss / RSS_TARGET_MB,
            )
        )
    print(
        f"agent overhead, 8 simulated GPUs (fake:{args.scenario}), {os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    head = (
        "interval_s",
        "window_s",
        "ticks",
        "scrapes",
        "last_tick_ms",
        "cpu_s",
        "cpu_%core",
        "cpu/target",
        "max_rss_MB",
        "rss/target",
    )
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(
            f"{r[0]:g} | {r[1]:.0f} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.3f} | {r[7]:.3f} | "
            f"{r[8]:.1f} | {r[9]:.2f}"
        )
    print(f"targets: <= {CPU_TARGET_PCT:g}% of one core, <= {RSS_TARGET_MB:g} MB RSS")
    ok = all(r[6] <= CPU_TARGET_PCT and r[8] <= RSS_TARGET_MB for r in rows if r[0] >= 15)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
