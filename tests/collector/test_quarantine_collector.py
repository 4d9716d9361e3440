"""The collector's quarantine loop over real HTTP on 127.0.0.1 with a real SQLite file and the real
analysis engine, with ``quarantine_action = "record"`` (every decision made and audited, no scheduler
touched; tests/slurm/test_quarantine_slurm.py drains a real Slurm node).

- the circuit breaker: a fleet-wide slowdown (every node's gate asks to drain its node at once)
  drains at most the configured share, refuses the rest, raises the alert gauge, records each refusal;
- the fleet analysis drains the host it flags, with the straggler reason and its measured values,
  once; a host resumed by hand is not drained again by the same results;
- retests: N consecutive passes resume, a fail starts the count again; every step is in the audit
  and on /metrics with the names the dashboards use.
"""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from postgres import BACKENDS, database, pg_server  # noqa: F401 (fixtures: the collector runs on SQLite and PostgreSQL)
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings, load_settings
from straggler.errors import ConfigError
from straggler.records import result_id

TOKEN = "quarantine-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "NVIDIA H100 80GB HBM3"


def rows_for(
    host: str,
    scan_id: str,
    slow: dict[int, float] | None = None,
    n_gpus: int = 4,
    samples: int = 10,
    ts: float | None = None,
    model: str = MODEL,
) -> list[dict]:
    """A scan of one host: matmul samples around 790 TFLOP/s (0.3% noise), device i at ``slow[i]`` of it."""
    rng = random.Random(f"{host}{scan_id}")
    ts = time.time() if ts is None else ts
    out = []
    for i in range(n_gpus):
        for k in range(samples):
            value = 790.0 * (slow or {}).get(i, 1.0) * (1 + rng.gauss(0, 0.003))
            row = {
                "ts": ts + k,
                "scan_id": scan_id,
                "host": host,
                "gpu": f"GPU-{host}-{i}",
                "index": i,
                "model": model,
                "probe": "matmul",
                "settings": "n=8192,dtype=bf16",
                "sample": k,
                "value": value,
                "unit": "TFLOP/s",
            }
            row["id"] = result_id(row)
            out.append(row)
    return out


def ingest(client, host, rows):
    r = client.post("/api/v1/results", json={"host": host, "results": rows}, headers=AUTH)
    assert r.status_code == 200, r.text


def metrics(client) -> dict:
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_for(fn, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(params=BACKENDS)
def collector(request, tmp_path):
    db = database(request, tmp_path / "collector.db")

    def start(**kw):
        settings = CollectorSettings(
            port=0, db_path=db, analysis_debounce_s=0.05, analysis_max_delay_s=1.0, quarantine_action="record", **kw
        )
        srv = BackgroundCollector(settings, TOKEN)
        srv.client = httpx.Client(base_url=srv.url, timeout=60)
        started.append(srv)
        return srv

    started: list = []
    yield start
    for srv in started:
        srv.client.close()
        srv.stop()


def test_fleet_wide_slowdown_drains_at_most_the_share_and_trips_the_breaker(collector):
    srv = collector(quarantine_from_analysis=False, quarantine_max_fleet_share=0.2, quarantine_max_model_share=0.5)
    c = srv.client
    hosts = [f"node{i:02d}" for i in range(10)]
    for h in hosts:  # the fleet: 10 hosts of one model
        ingest(c, h, rows_for(h, f"s-{h}", n_gpus=1, samples=2))
    assert metrics(c)[("straggler_circuit_breaker_tripped", ())] == 0.0

    # a driver change slows every node at once: each node's gate asks to drain its own node
    answers: dict[str, dict] = {}

    def gate(h):  # what a gate calls instead of draining by itself
        from straggler.collector.quarantine_client import request_drain

        answers[h] = request_drain(
            srv.url,
            TOKEN,
            h,
            "straggler: gpu0 matmul 0.80x",
            by=f"prolog {h}",
            measured={"gpu": "gpu0", "probe": "matmul", "ratio": 0.80},
        )

    threads = [threading.Thread(target=gate, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drained = sorted(h for h, a in answers.items() if a["action"] == "drain")
    refused = sorted(h for h, a in answers.items() if a["action"] == "refused")
    assert len(drained) == 2 and len(refused) == 8, answers  # 20% of 10 hosts
    assert all(
        "circuit breaker" in answers[h]["detail"] and "20% of the fleet (2)" in answers[h]["detail"] for h in refused
    )

    state = c.get("/api/v1/quarantine").json()
    assert sorted(n["host"] for n in state["nodes"]) == drained
    assert state["breaker"]["tripped"] is True and state["breaker"]["limit"] == 2
    assert state["breaker"]["fleet_hosts"] == 10 and state["breaker"]["drained_in_window"] == 2
    m = metrics(c)
    assert m[("straggler_circuit_breaker_tripped", ())] == 1.0
    assert m[("straggler_quarantine_actions_total", (("action", "refused"),))] == 8.0
    assert m[("straggler_quarantine_actions_total", (("action", "drain"),))] == 2.0
    assert {
        h for (name, labels), v in m.items() if name == "straggler_node_quarantined" and v == 1.0 for _, h in labels
    } == set(drained)
    # every refusal is in the audit: when, why, the request's values, which rule, by whom
    events = c.get("/api/v1/quarantine/events").json()["events"]
    refusals = [e for e in events if e["action"] == "refused"]
    assert sorted(e["host"] for e in refusals) == refused
    e = refusals[0]
    assert e["rule"] == "gate" and e["by"] == f"prolog {e['host']}" and e["reason"] == "straggler: gpu0 matmul 0.80x"
    assert e["measured"]["request"]["ratio"] == 0.80 and "circuit breaker" in e["measured"]["refused"]
    assert e["outcome"] == "ok" and e["ts"] > 0

    # an operator can still drain by hand (never refused), recorded with who and why
    r = c.post(
        "/api/v1/quarantine/drain",
        headers=AUTH,
        json={"host": refused[0], "reason": "bad fan, by hand", "by": "alice", "manual": True},
    )
    assert r.json()["action"] == "drain"
    hist = c.get(f"/api/v1/quarantine/{refused[0]}").json()
    assert hist["node"]["state"] == "drained" and hist["node"]["rule"] == "manual" and hist["node"]["by"] == "alice"
    assert [e["action"] for e in hist["events"]] == ["drain", "refused"]
    # the state and the counters survive a restart of the collector (the same database)
    srv.client.close()
    srv.stop()
    srv2 = collector(quarantine_from_analysis=False, quarantine_max_fleet_share=0.2)
    m = metrics(srv2.client)
    assert m[("straggler_quarantine_actions_total", (("action", "refused"),))] == 8.0
    assert m[("straggler_circuit_breaker_tripped", ())] == 1.0
    assert len(srv2.client.get("/api/v1/quarantine").json()["nodes"]) == 3


def test_per_model_share(collector):
    srv = collector(quarantine_from_analysis=False, quarantine_max_fleet_share=1.0, quarantine_max_model_share=0.25)
    c = srv.client
    for i in range(8):  # 4 hosts of each model
        h = f"h{i}"
        ingest(c, h, rows_for(h, f"s-{h}", n_gpus=1, samples=2, model=MODEL if i < 4 else "NVIDIA A100-SXM4-80GB"))
    acts = [
        c.post("/api/v1/quarantine/drain", headers=AUTH, json={"host": h, "reason": "straggler: x"}).json()
        for h in ("h0", "h1", "h4")
    ]
    assert [a["action"] for a in acts] == ["drain", "refused", "drain"]
    assert "hosts with NVIDIA H100 80GB HBM3" in acts[1]["detail"]


def test_analysis_drains_the_flagged_host_and_retests_resume_it(collector):
    srv = collector(quarantine_resume_passes=2, quarantine_max_fleet_share=0.5)
    c = srv.client
    hosts = ["n1", "n2", "n3", "n4"]
    for h in hosts:
        ingest(c, h, rows_for(h, "scan1", slow={2: 0.85} if h == "n3" else None))
    state = wait_for(lambda: (s := c.get("/api/v1/quarantine").json())["nodes"] and s, 60, "the drain of n3")
    assert [n["host"] for n in state["nodes"]] == ["n3"]
    node = state["nodes"][0]
    assert node["rule"] == "fleet_analysis" and node["reason"].startswith("straggler: gpu2 matmul 0.8")
    drain = c.get("/api/v1/quarantine/n3").json()["events"][0]
    assert drain["action"] == "drain" and drain["by"] == "collector"
    assert drain["measured"]["gpu"] == "GPU-n3-2" and 0.80 < drain["measured"]["ratio"] < 0.90
    assert drain["measured"]["scan_id"] == "scan1"

    def retest(passed, reason):
        r = c.post(
            "/api/v1/quarantine/n3/retest",
            headers=AUTH,
            json={"passed": passed, "reason": reason, "scan_id": "r", "measured": {"devices": []}},
        )
        assert r.status_code == 200, r.text
        return r.json()

    assert retest(True, "clean")["passes"] == 1
    assert retest(False, "straggler: GPU-n3-2 matmul 0.85x")["action"] == "retest_fail"
    assert retest(True, "clean")["passes"] == 1  # the count started again
    last = retest(True, "clean")
    assert last["action"] == "resume" and last["state"] == "resumed" and last["passes"] == 2
    assert c.get("/api/v1/quarantine").json()["nodes"] == []
    r = c.post("/api/v1/quarantine/n3/retest", headers=AUTH, json={"passed": True, "reason": "late"})
    assert r.status_code == 409 and "not drained" in r.json()["detail"]
    hist = [e["action"] for e in c.get("/api/v1/quarantine/n3").json()["events"]][::-1]
    assert hist == ["drain", "retest_pass", "retest_fail", "retest_pass", "retest_pass", "resume"]
    resume = c.get("/api/v1/quarantine/n3").json()["events"][0]
    assert resume["rule"] == "hysteresis" and resume["reason"] == "straggler: 2 clean retests"

    # the same (old) results analysed again do not drain the resumed host; a new slow scan does
    ingest(c, "n1", rows_for("n1", "scan2"))
    srv.collector.fleet.refresh()
    assert c.get("/api/v1/quarantine").json()["nodes"] == []
    ingest(c, "n3", rows_for("n3", "scan3", slow={2: 0.85}))
    wait_for(lambda: c.get("/api/v1/quarantine").json()["nodes"], 60, "the second drain of n3")
    m = metrics(c)
    assert {
        a: m[("straggler_quarantine_actions_total", (("action", a),))]
        for a in ("drain", "retest_pass", "retest_fail", "resume", "refused")
    } == {"drain": 2.0, "retest_pass": 3.0, "retest_fail": 1.0, "resume": 1.0, "refused": 0.0}
    assert m[("straggler_node_quarantined", (("host", "n3"),))] == 1.0


def test_writes_need_the_token_and_an_enabled_loop(collector, tmp_path):
    srv = collector()
    c = srv.client
    r = c.post("/api/v1/quarantine/drain", json={"host": "x", "reason": "r"})
    assert r.status_code == 401
    r = c.post(
        "/api/v1/quarantine/x/resume", headers={"Authorization": "Bearer wrong-token-000000"}, json={"reason": "r"}
    )
    assert r.status_code == 401
    assert c.get("/api/v1/quarantine/x").json() == {"host": "x", "node": None, "events": []}
    srv.client.close()
    srv.stop()
    off = BackgroundCollector(CollectorSettings(port=0, db_path=tmp_path / "off.db"), TOKEN)
    try:
        r = httpx.post(off.url + "/api/v1/quarantine/drain", headers=AUTH, json={"host": "x", "reason": "r"})
        assert r.status_code == 409 and "quarantine_action" in r.json()["detail"]
        assert httpx.get(off.url + "/api/v1/quarantine").json()["enabled"] is False
    finally:
        off.stop()
    with pytest.raises(ConfigError) as e:
        load_settings(
            None,
            env={},
            overrides={
                "quarantine_action": "kubectl",
                "quarantine_max_fleet_share": 0.0,
                "quarantine_resume_passes": 0,
            },
        )
    msg = str(e.value)
    assert "quarantine_action" in msg and "quarantine_max_fleet_share" in msg and "quarantine_resume_passes" in msg


def test_a_version_6_database_migrates_to_the_quarantine_tables(tmp_path):
    import sqlite3

    from straggler.collector import schema
    from straggler.collector.quarantine import Quarantine
    from straggler.collector.store import Store, row_tuples

    path = tmp_path / "v6.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=6)
    conn.close()
    store = Store(path)
    try:
        assert store.migrated_from == 6 and schema.version(store._reader) == schema.LATEST == 12
        store.ingest(row_tuples(rows_for("m1", "s1", n_gpus=1, samples=1)), 1.0)
        q = Quarantine(store, CollectorSettings(quarantine_action="record"))
        assert q.drain("m1", "straggler: x", "gate").action == "drain"
        assert [e["action"] for e in q.events("m1")] == ["drain"] and q.store._reader.execute(
            "SELECT scans FROM quarantine"
        ).fetchone()[0] == '["s1"]'
    finally:
        store.close()


def test_analysis_flagging_every_host_drains_the_share_and_refuses_each_host_once(collector):
    srv = collector(quarantine_max_fleet_share=0.34, quarantine_max_model_share=1.0)
    c = srv.client
    hosts = [f"w{i}" for i in range(6)]
    for h in hosts:  # one slow device on every host at once
        ingest(c, h, rows_for(h, "scan1", slow={0: 0.85}))
    wait_for(lambda: len(c.get("/api/v1/quarantine/events").json()["events"]) == 6, 60, "six decisions")
    events = c.get("/api/v1/quarantine/events").json()["events"]
    assert sorted(e["action"] for e in events) == ["drain"] * 2 + ["refused"] * 4  # floor(0.34 * 6) = 2
    assert all(e["rule"] == "fleet_analysis" and e["reason"].startswith("straggler: gpu0 matmul 0.8") for e in events)
    srv.collector.fleet.refresh()  # the same results analysed again: no new refusal
    assert len(c.get("/api/v1/quarantine/events").json()["events"]) == 6
    m = metrics(c)
    assert m[("straggler_circuit_breaker_tripped", ())] == 1.0
    assert m[("straggler_quarantine_actions_total", (("action", "refused"),))] == 4.0


def test_the_command_lists_and_gives_hints_from_the_collector(collector, tmp_path):
    import os
    import subprocess
    import sys

    srv = collector(quarantine_from_analysis=False)
    c = srv.client
    for h, base in (("fast", 1.02), ("slow", 1.0)):
        ingest(c, h, rows_for(h, "s1", slow={i: base * (1 + 0.002 * i) for i in range(4)}))
    wait_for(lambda: c.get("/api/v1/gpus", headers=AUTH).json()["verdicts_ts"], 60, "the fleet analysis")
    c.post(
        "/api/v1/quarantine/drain",
        headers=AUTH,
        json={"host": "slow", "reason": "straggler: by hand", "by": "carol", "manual": True},
    )
    token = tmp_path / "token"  # hints read the fleet view: it needs the token (the collector's open_reads is off)
    token.write_text(AUTH["Authorization"].split(" ", 1)[1])

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "straggler", "quarantine", *args, "--collector", srv.url],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "STRAGGLER_TOKEN_FILE": str(token)},
        )

    r = cli("hints", "--json")
    assert r.returncode == 0, r.stderr
    assert [(h["node"], h["perf_class"], h["weight"], h["feature"]) for h in json.loads(r.stdout)["hints"]] == [
        ("fast", "B", 2, "perf_b"),
        ("slow", "D", 4, "perf_d"),
    ]
    r = cli("list")
    assert r.returncode == 0, r.stderr
    assert "slow" in r.stdout and "carol" in r.stdout and "circuit breaker: ok" in r.stdout
    r = cli("show", "nowhere")
    assert r.returncode == 0 and "never drained by straggler" in r.stdout
    r = cli("hints", "some.csv")
    assert r.returncode == 2 and r.stderr.strip() == "straggler: error: give result FILES or --collector (one of them)"


def test_an_analysis_that_read_the_store_before_a_resume_does_not_drain_again(tmp_path):
    """The fleet analysis reads the store, computes for a while; meanwhile the node's Nth clean
    retest resumes it. That analysis' (older) straggler verdict must not drain it again."""
    from straggler.collector.fleet import FleetSnapshot
    from straggler.collector.quarantine import Quarantine
    from straggler.collector.store import Store, row_tuples

    now = [1000.0]
    store = Store(tmp_path / "c.db")
    try:
        store.ingest(row_tuples(rows_for("r1", "fail-scan", n_gpus=1, samples=1)), 1.0)
        q = Quarantine(
            store,
            CollectorSettings(quarantine_action="record", quarantine_resume_passes=1, quarantine_max_fleet_share=1.0),
            clock=lambda: now[0],
        )
        q.drain("r1", "straggler: cpu1 matmul 0.50x", "fleet_analysis")
        gpu = {
            "host": "r1",
            "gpu": "cpu1",
            "index": 1,
            "model": "m",
            "last_ts": 5.0,
            "last_scan_id": "fail-scan",
            "verdict": "straggler",
            "probes": [
                {"probe": "matmul", "verdict": "straggler", "ratio": 0.5, "cost": 1.0, "causes": ["contention"]}
            ],
        }
        stale = FleetSnapshot(computed_ts=now[0] + 1, gpus=(gpu,))  # read before the resume below
        # meanwhile the passing retest (another scan id) is stored as the host's latest, and resumes it
        store.ingest(row_tuples(rows_for("r1", "pass-scan", n_gpus=1, samples=1)), 2.0)
        now[0] += 2
        assert q.retest("r1", True, "clean").action == "resume"
        assert q.from_analysis(stale) == [] and q.nodes() == []
        # a straggler verdict of an analysis started after the resume, on a new scan, drains it
        now[0] += 1
        fresh = FleetSnapshot(computed_ts=now[0], gpus=({**gpu, "last_scan_id": "new-scan"},))
        assert [d.action for d in q.from_analysis(fresh)] == ["drain"]
    finally:
        store.close()


def test_retest_results_that_arrive_after_the_resume_do_not_drain_again(collector):
    """An agent sends its retest reports and uploads their rows on two paths (the quarantine thread,
    the uploader with its own backoff): the rows of a failed retest may reach the collector after the
    clean retests have resumed the node. Those results were measured while it was drained, before the
    passes that resumed it: they never drain it again (by scan id, not by time); a new slow scan does."""
    srv = collector(quarantine_resume_passes=2, quarantine_max_fleet_share=0.5)
    c = srv.client
    for h in ("n1", "n2", "n3", "n4"):
        ingest(c, h, rows_for(h, "scan1", slow={2: 0.85} if h == "n3" else None))
    wait_for(lambda: c.get("/api/v1/quarantine").json()["nodes"], 60, "the drain of n3")
    late = rows_for("n3", "n3-retest-1", slow={2: 0.85})  # measured while drained, still slow
    for scan_id, passed in (("n3-retest-1", False), ("n3-retest-2", True), ("n3-retest-3", True)):
        r = c.post(
            "/api/v1/quarantine/n3/retest",
            headers=AUTH,
            json={
                "passed": passed,
                "reason": "clean" if passed else "not clean: GPU-n3-2 straggler",
                "scan_id": scan_id,
                "measured": {"devices": []},
            },
        )
        assert r.status_code == 200, r.text
    assert r.json()["action"] == "resume"
    ingest(c, "n3", late)  # the failed retest's rows, after the resume (the passes' rows later still)
    srv.collector.fleet.refresh()
    flagged = [g for g in c.get("/api/v1/gpus", headers=AUTH).json()["gpus"] if g["verdict"] == "straggler"]
    assert [(g["gpu"], g["last_scan_id"]) for g in flagged] == [("GPU-n3-2", "n3-retest-1")]  # analysed: slow
    assert c.get("/api/v1/quarantine").json()["nodes"] == []
    hist = [(e["action"], e["rule"]) for e in c.get("/api/v1/quarantine/n3").json()["events"]][::-1]
    assert hist == [
        ("drain", "fleet_analysis"),
        ("retest_fail", "agent_retest"),
        ("retest_pass", "agent_retest"),
        ("retest_pass", "agent_retest"),
        ("resume", "hysteresis"),
    ], hist
    ingest(c, "n3", rows_for("n3", "scan3", slow={2: 0.85}))  # measured after the resume: drains again
    wait_for(lambda: c.get("/api/v1/quarantine").json()["nodes"], 60, "the drain of n3 by a new scan")
