"""Never probe on top of a job (issue 10, item 1): a job that starts while the agent's probe runs
aborts the probe, the node's scan says ``aborted: job started``, and nothing measured after the
job appeared is kept. Real agent processes, a real competing process on a probed CPU core; the GPU
path on the fake NVML backend (a fixture in which a compute process appears)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import skip_or_fail
from straggler.probes.fakenvml import FIXTURE_DIR
from test_agent_support import AgentProcess, IngestServer, wait_until, write_fake_scan

ROWS, EVERY_S = 400, 0.1  # the stand-in probe writes a row every 0.1 s for 40 s unless aborted


def _rows(agent, server) -> list[dict]:
    """Every row the agent kept: uploaded (the scan's state goes after its rows) or still spooled."""
    with sqlite3.connect(agent.settings["spool_path"]) as db:
        spooled = [json.loads(r[0]) for r in db.execute("SELECT row FROM results")]
    with server.lock:
        return list(server.rows.values()) + spooled


def _metric(agent, text: str) -> bool:
    return text in httpx.get(agent.url + "/metrics", timeout=10).text


def _agent(tmp_path, server, **settings) -> AgentProcess:
    token = tmp_path / "token"
    token.write_text("secret\n")
    env = {
        "FAKE_SCAN_MODE": "slow",
        "FAKE_SCAN_ROWS": str(ROWS),
        "FAKE_SCAN_EVERY_S": str(EVERY_S),
        **settings.pop("env", {}),
    }
    return AgentProcess(
        tmp_path,
        "node-j",
        collector_url=server.url,
        token_file=token,
        env=env,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        **settings,
    )


def _scan(server, scan_id):
    server.scans.append(
        {"scan_id": scan_id, "start_at": time.time(), "probes": ["matmul"], "duration_s": 1.0, "hosts": ["node-j"]}
    )


def _final(server) -> dict | None:
    return next((b for _, b in server.statuses if b["state"] != "running"), None)


@pytest.fixture
def server():
    srv = IngestServer(token="secret")
    yield srv
    srv.close()


BUSY = "import os, sys, time\nos.sched_setaffinity(0, {int(sys.argv[1])})\nprint(os.getpid(), time.time(), flush=True)\nwhile True:\n    pass\n"
NS = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"]


def _namespaces() -> bool:
    """Whether this machine lets the test give the agent a PID namespace of its own (root, or a
    delegated user namespace): then the agent sees only the processes of its "node", not the
    other load of a shared test machine."""
    try:
        return subprocess.run(NS + ["true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class NodeAgent(AgentProcess):
    """An agent in a PID namespace of its own (a "node"): signals go to the agent, not to unshare."""

    def agent_pid(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()[0])

    def signal(self, sig: int) -> None:
        os.kill(self.agent_pid(), sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return super().stop(timeout_s)

    def run_on_node(self, cmd: list[str]) -> subprocess.Popen:
        if not self.prefix:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        return subprocess.Popen(
            ["nsenter", "-t", str(self.agent_pid()), "-p", "-m"] + cmd, stdout=subprocess.PIPE, text=True
        )


def _measuring(agent, server, scan_id: str, rows: int) -> bool:
    """True once the probe wrote ``rows`` rows; False when the scan ended (or was aborted) first."""

    def ready():
        if _final(server) or "aborting the probes" in agent.log():
            return "ended"
        path = agent.dir / "agent-scans" / f"{scan_id}.jsonl"
        return path.exists() and sum(1 for _ in open(path)) >= rows and "measuring"

    return wait_until(ready, what="the probe measuring", timeout_s=60, step_s=0.05) == "measuring"


def test_a_cpu_job_on_a_probed_core_aborts_the_probe_and_nothing_after_it_is_kept(tmp_path, server):
    node = _namespaces()
    token = tmp_path / "token"
    token.write_text("secret\n")
    agent = NodeAgent(
        tmp_path,
        "node-j",
        collector_url=server.url,
        token_file=token,
        probe_device="cpu",
        prefix=NS if node else None,
        env={"FAKE_SCAN_MODE": "slow", "FAKE_SCAN_ROWS": str(ROWS), "FAKE_SCAN_EVERY_S": str(EVERY_S)},
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
    )
    busy = None
    try:
        agent.start()
        _scan(server, "20261201T000000Z-cafe0001")
        if not _measuring(agent, server, "20261201T000000Z-cafe0001", 10):
            skip_or_fail(f"the machine is too busy to tell a job from its background load: {agent.log()[-500:]}")
        core = min(os.sched_getaffinity(0))  # every core is probed by a CPU probe
        busy = agent.run_on_node([sys.executable, "-c", BUSY, str(core)])
        pid, t_job = busy.stdout.readline().split()  # the job's pid as the agent sees it; when it runs
        t_job = float(t_job)
        wait_until(lambda: "aborting the probes" in agent.log(), what="the abort", timeout_s=30, step_s=0.02)
        t_abort = time.time()
        final = wait_until(lambda: _final(server), what="the scan's final state", timeout_s=60)
        assert final["state"] == "failed", final
        assert final["error"].startswith("aborted: job started: processes outside the probe use "), final
        assert f"pid {pid})" in final["error"], (pid, final)  # the job, named
        assert busy.poll() is None  # the job itself is never touched
        rows = _rows(agent, server)
        assert 0 < len(rows) < ROWS
        assert max(r["ts"] for r in rows) <= t_job, max(r["ts"] for r in rows) - t_job  # nothing after the job
        assert "measured after the job appeared dropped" in agent.log()
        assert _metric(agent, 'straggler_agent_probe_failures_total{reason="job_started"} 1.0')
        print(
            f"CPU job on core {core}: probe aborted {t_abort - t_job:.2f} s after the job started "
            f"(seen in the log, polled every 0.02 s; the agent {'in a PID namespace' if node else 'on the host'}); "
            f"{len(rows)} rows measured before it kept"
        )
        assert agent.stop() == 0
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        agent.close()


def _fixture_with_a_job(tmp_path, idle_reads: int) -> str:
    """h100_idle, where device 0 runs a compute process from its ``idle_reads``-th read on."""
    data = json.loads((FIXTURE_DIR / "h100_idle.json").read_text())
    dev = data["devices"][0]
    idle = dev["frames"]
    busy = [{**f, "processes": 1, "util_pct": 97.0} for f in idle]
    dev["frames"] = [idle[i % len(idle)] for i in range(idle_reads)] + busy * 400
    data["scenario"] = "h100_job_starts"
    path = tmp_path / "h100_job_starts.json"
    path.write_text(json.dumps(data))
    return f"fake:{path}"


@pytest.mark.parametrize("case", ["job", "unreadable"])
def test_a_gpu_job_or_an_unreadable_process_list_aborts_the_probe(tmp_path, server, case):
    if case == "job":
        telemetry, says = _fixture_with_a_job(tmp_path, idle_reads=24), "device 0 runs 1 compute process(es)"
    else:
        from test_agent_support import fixture_with_faults

        telemetry = "fake:" + str(
            fixture_with_faults(
                tmp_path,
                "h100_idle",
                [{"device": 3, "from_read": 24, "nvml_error": "no_permission", "fields": ["processes"]}],
            )
        )
        says = "device 3: compute processes unknown (no_permission)"
    agent = _agent(tmp_path, server, telemetry=telemetry, probe_device="cuda")
    try:
        agent.start()
        _scan(server, "20261201T000000Z-cafe0002")
        final = wait_until(lambda: _final(server), what="the scan's final state", timeout_s=ROWS * EVERY_S + 30)
        assert final["state"] == "failed" and final["error"] == f"aborted: job started: {says}", final
        rows = _rows(agent, server)
        assert len(rows) < ROWS
        assert _metric(agent, 'straggler_agent_probe_failures_total{reason="job_started"} 1.0')
        assert agent.stop() == 0
    finally:
        agent.close()


def test_the_probes_own_processes_are_not_a_job(tmp_path, server):
    """The probe child and its workers burn CPU on every core: that is the probe, not a job."""
    spin = tmp_path / "spin_scan.py"
    spin.write_text(r"""
import argparse, json, multiprocessing, os, sys, time
p = argparse.ArgumentParser()
for a in ("--output", "--scan-id", "--deadline", "--start-at", "--device", "--probes", "--duration", "--max-rounds"):
    p.add_argument(a)
p.add_argument("--json", action="store_true")
a = p.parse_args()
def burn(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass
if __name__ == "__main__":
    workers = [multiprocessing.Process(target=burn, args=(3.0,)) for _ in range(os.cpu_count())]
    for w in workers:
        w.start()
    with open(a.output + ".pids", "w") as f:
        json.dump([os.getpid()] + [w.pid for w in workers], f)
    with open(a.output, "w") as f:
        for i in range(30):
            f.write(json.dumps({"ts": time.time(), "scan_id": a.scan_id, "host": "x", "gpu": f"cpu{i % 2}",
                                "index": i % 2, "model": "m", "probe": "matmul", "settings": "n=64", "sample": i // 2,
                                "duration_s": 0.1, "value": 1.0, "unit": "GFLOP/s"}) + "\n")
            f.flush()
            time.sleep(0.1)
    for w in workers:
        w.join()
    print(json.dumps({"scan_id": a.scan_id, "devices": []}))
""")
    token = tmp_path / "token"
    token.write_text("secret\n")
    agent = NodeAgent(
        tmp_path,
        "node-j",
        collector_url=server.url,
        token_file=token,
        probe_device="cpu",
        prefix=NS if _namespaces() else None,
        probe_command=[sys.executable, str(spin)],
    )
    try:
        agent.start()
        _scan(server, "20261201T000000Z-cafe0003")
        final = wait_until(lambda: _final(server), what="the scan's final state", timeout_s=60)
        if final["state"] == "failed" and "processes outside the probe" in (final["error"] or ""):
            pid = int(final["error"].rsplit("pid ", 1)[1].rstrip(")"))
            own = json.loads(next((agent.dir / "agent-scans").glob("*.pids")).read_text())
            if pid not in own:
                skip_or_fail(f"another process on this machine looked like a job: {final['error']}")
        assert final == {"host": "node-j", "state": "done", "error": None}, (final, agent.log()[-2000:])
        assert len(_rows(agent, server)) == 30
        assert agent.stop() == 0
    finally:
        agent.close()


def test_the_first_cpu_reading_is_busy_not_idle():
    """No utilization yet on the first read of the CPU backend: unknown, so busy (this held already;
    kept as a guard)."""
    from straggler.agent.idle import busy_reason
    from straggler.probes.cputelemetry import CpuBackend

    first = CpuBackend().snapshot("n")
    assert all(d.util_pct is None for d in first.devices)
    assert busy_reason(first, 5.0) == "device 0: utilization unknown (not read yet)"


def test_nvml_lists_compute_pids_through_the_funnel_and_the_watch_tells_ours_from_a_job(tmp_path):
    """The NVML backend's own code (FakePynvml serves the fixture through the pynvml API): PIDs of
    compute processes; a failure is a code, never an exception; a pid outside the probe's session
    is a job, an unreadable list is busy."""
    from straggler.agent.jobwatch import JobWatch
    from straggler.probes.fakepynvml import FakePynvml
    from straggler.probes.nvml import NvmlBackend
    from test_agent_support import fixture_with_faults

    busy = NvmlBackend(library=FakePynvml("h100_healthy"))  # a job: one compute process per GPU
    assert busy.compute_pids(0) == ((0,), None)
    idle = NvmlBackend(library=FakePynvml("h100_idle"))
    assert idle.compute_pids(0) == ((), None)
    broken = NvmlBackend(
        library=FakePynvml(
            str(
                fixture_with_faults(
                    tmp_path, "h100_idle", [{"device": 2, "nvml_error": "no_permission", "fields": ["processes"]}]
                )
            )
        )
    )
    assert broken.compute_pids(2) == (None, "no_permission")
    me = os.getpid()
    assert JobWatch(idle, me, watch_gpus=True, job_cpu_cores=0).check() is None
    assert (
        JobWatch(busy, me, watch_gpus=True, job_cpu_cores=0).check()
        == "device 0 runs 1 compute process(es) not the probe's (pid 0)"
    )
    assert (
        JobWatch(broken, me, watch_gpus=True, job_cpu_cores=0).check()
        == "device 2: compute processes unknown (no_permission)"
    )


def test_a_gpu_process_in_the_probes_session_is_the_probes_own():
    """NVML lists the probe's own workers too: a pid in the child's session is not a job."""
    from straggler.agent.jobwatch import JobWatch

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:

        class Lister:  # the backend protocol the watch uses: NVML's compute_pids
            name = "nvml"

            def __init__(self, pids):
                self.pids = pids

            def device_count(self):
                return 1

            def compute_pids(self, index):
                return self.pids, None

        # the "probe child" is the session leader `worker`; its own pid and its session are the probe's
        assert JobWatch(Lister((worker.pid,)), worker.pid, watch_gpus=True, job_cpu_cores=0).check() is None
        assert (
            JobWatch(Lister((worker.pid, stranger.pid)), worker.pid, watch_gpus=True, job_cpu_cores=0).check()
            == f"device 0 runs 1 compute process(es) not the probe's (pid {stranger.pid})"
        )
    finally:
        for p in (worker, stranger):
            p.kill()
            p.wait()
