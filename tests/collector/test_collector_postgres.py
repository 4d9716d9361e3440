"""The collector on a real PostgreSQL (tests/postgres.py) beyond what the suites on both backends
check: ``--check`` and the start on a ``postgresql://`` URL (one-line refusals, the missing
driver named), and two replicas on one database, as behind a load balancer: agents post to both,
exactly one refreshes the fleet view, both serve the same verdicts, and when the leader stops the
other takes the refresh over."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import httpx
import psycopg

from postgres import pg_server  # noqa: F401 (fixture)
from straggler.collector import replica
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from test_collector_api import AUTH, TOKEN, make_rows, peer_ratio_analyze
from test_collector_service import run_cli

DEBOUNCE_S, MAX_DELAY_S = 0.05, 1.0
# a publication reaches the other replica by notification, or its look every POLL_S; a free lease is
# taken within POLL_S; then the analysis waits its debounce (at most MAX_DELAY_S). Generous for a busy machine:
WAIT_S = 30 * (replica.POLL_S + MAX_DELAY_S)


ENV = {"STRAGGLER_COLLECTOR_TOKEN": TOKEN}


def tables(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            )
        ]


def test_check_on_a_postgresql_url_connects_and_changes_nothing(pg_server):
    url = pg_server.new_schema()
    out = run_cli(["--check", "--json", "--port", "0", "--db", url], env=ENV)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["db_path"] == url
    assert tables(url) == []  # --check never migrates a shared database (an older replica may run on it)


def test_an_unusable_postgresql_url_is_one_line_and_exit_2(pg_server, tmp_path):
    from conftest import free_port

    dead = f"postgresql://straggler@127.0.0.1:{free_port()}/straggler"
    for args in (["--check"], []):  # --check and the start refuse alike
        out = run_cli(["--port", "0", "--db", dead, *args], env=ENV)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert f"db_path: {dead} cannot be opened as a PostgreSQL database (" in out.stderr
    out = run_cli(["--port", "0", "--check", "--db", "postgresql://u:secret@127.0.0.1:1/x"], env=ENV)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "db_path (from --db): a password in the URL" in out.stderr and "secret" not in out.stderr
    out = run_cli(["--port", "0", "--check", "--db", "postgresql://u@127.0.0.1:1/x?password=secret"], env=ENV)
    assert out.returncode == 2 and "a password in the URL" in out.stderr and "secret" not in out.stderr
    # without psycopg: the extra to install, in one line (a psycopg that cannot be imported)
    fake = tmp_path / "nopsycopg" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no psycopg here')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    for args in (["--check"], []):
        out = run_cli(["--port", "0", "--db", pg_server.new_schema(), *args], env=env)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "needs psycopg: pip install 'straggler[postgres]'" in out.stderr


def test_the_collector_process_serves_from_postgresql_and_keeps_the_data(pg_server, tmp_path):
    from test_collector_service import start, stop
    from conftest import free_port

    url = pg_server.new_schema()
    for round in range(2):
        port = free_port()
        proc = start(tmp_path, port, args=("--db", url))  # the later --db wins over start's file
        try:
            base = f"http://127.0.0.1:{port}"
            health = wait_for("the collector to answer", lambda: _get(base + "/healthz"))
            assert health["status"] == "ok" and health["database"]["path"] == url
            if round == 0:
                assert post(SimpleNamespace(url=base), "p", n_gpus=2)["accepted"] == 6
            else:  # a restart finds what was stored
                assert post(SimpleNamespace(url=base), "p", n_gpus=2) == {"accepted": 0, "duplicates": 6}
        finally:
            assert stop(proc) == 0, proc.stderr.read()


def _get(url):
    try:
        r = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return r.json() if r.status_code in (200, 503) else None


class Counting:
    def __init__(self):
        self.runs = 0

    def __call__(self, samples, history=None):
        self.runs += 1
        return peer_ratio_analyze(samples, history)


def wait_for(what, cond, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.05)


def gpus(srv) -> dict:
    return httpx.get(srv.url + "/api/v1/gpus", headers=AUTH, timeout=30).json()


def verdicts(page: dict) -> list:
    return [
        (
            g["host"],
            g["gpu"],
            g["straggler"],
            g["verdict"],
            g["last_scan_id"],
            [(p["probe"], p["ratio"], p["causes"]) for p in g["probes"]],
        )
        for g in page["gpus"]
    ]


def post(srv, host, **kw):
    r = httpx.post(
        srv.url + "/api/v1/results", json={"host": host, "results": make_rows(host, **kw)}, headers=AUTH, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_two_replicas_one_refreshes_both_serve_its_verdicts_and_the_refresh_is_handed_over(pg_server):
    url = pg_server.new_schema()
    settings = CollectorSettings(port=0, db_path=url, analysis_debounce_s=DEBOUNCE_S, analysis_max_delay_s=MAX_DELAY_S)
    analyses = [Counting(), Counting()]
    replicas = [BackgroundCollector(settings, TOKEN, analyze=a) for a in analyses]
    try:
        views = [r.collector.fleet for r in replicas]
        assert all(isinstance(v, replica.ReplicaFleetView) for v in views)
        leader = wait_for("a refresh leader", lambda: [i for i, v in enumerate(views) if v.role == "leader"])
        assert len(leader) == 1  # exactly one
        lead, follow = leader[0], 1 - leader[0]
        # agents post to both replicas (the load balancer's choice); the same batch to both stores it once
        assert post(replicas[follow], "a", n_gpus=4, slow=(2,))["accepted"] == 12
        assert post(replicas[lead], "b", n_gpus=4)["accepted"] == 12
        assert post(replicas[follow], "b", n_gpus=4) == {"accepted": 0, "duplicates": 12}

        def both_see_all():
            pages = [gpus(r) for r in replicas]
            ok = all(len(p["gpus"]) == 8 and all(g["probes"] for g in p["gpus"]) for p in pages)
            return pages if ok and pages[0]["computed_ts"] == pages[1]["computed_ts"] else None

        pages = wait_for("both replicas to serve the analysis of all 8 devices", both_see_all)
        assert verdicts(pages[0]) == verdicts(pages[1])
        assert [g["gpu"] for g in pages[follow]["gpus"] if g["straggler"]] == ["GPU-a-2"]
        assert analyses[follow].runs == 0 and analyses[lead].runs >= 1  # only the leader analyses
        assert views[follow].version == views[lead].version >= 1

        # the leader stops: the other replica takes the lease and refreshes what arrives after
        replicas[lead].stop()
        wait_for("the other replica to take the refresh over", lambda: views[follow].role == "leader")
        before = analyses[follow].runs
        assert post(replicas[follow], "a", n_gpus=4, scan_id="s2", ts=1_700_000_100.0)["accepted"] == 12
        page = wait_for(
            "the new leader's analysis of scan s2",
            lambda: (
                (p := gpus(replicas[follow]))
                and all(g["last_scan_id"] == "s2" and g["probes"] for g in p["gpus"] if g["host"] == "a")
                and p
            ),
        )
        assert analyses[follow].runs > before
        assert [g["gpu"] for g in page["gpus"] if g["straggler"]] == []  # GPU-a-2 is well again in s2
        # and a replica started now serves the new leader's snapshot without analysing
        late = Counting()
        third = BackgroundCollector(settings, TOKEN, analyze=late)
        replicas.append(third)
        got = wait_for(
            "a third replica to serve the published snapshot",
            lambda: (p := gpus(third))["computed_ts"] == gpus(replicas[follow])["computed_ts"] and p,
        )
        assert verdicts(got) == verdicts(gpus(replicas[follow])) and late.runs == 0
        assert third.collector.fleet.role == "follower"
    finally:
        for r in replicas:
            r.stop()


def test_two_replicas_storing_the_same_batches_at_once_store_each_row_once(pg_server):
    import threading

    from straggler.collector.store import Store, row_tuples

    url = pg_server.new_schema()
    stores = [Store(url), Store(url)]
    # 12 hosts' scans; each replica gets all of them, in opposite orders (devices upserted both ways)
    batches = [
        row_tuples(
            make_rows(f"h{i}", n_gpus=4, samples=3) + make_rows(f"h{(i + 1) % 12}", n_gpus=4, samples=3, scan_id="s2")
        )
        for i in range(12)
    ]
    accepted, errors = [0, 0], []
    start = threading.Barrier(2)

    def feed(k):
        start.wait()
        try:
            for b in batches if k == 0 else batches[::-1]:
                accepted[k] += stores[k].ingest(b, 1.0)[0]
        except Exception as e:  # noqa: BLE001 (the test reports it) a deadlock that was not retried, a duplicate key that was not ignored
            errors.append(e)

    threads = [threading.Thread(target=feed, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    distinct = len({r[0] for b in batches for r in b})
    assert sum(accepted) == distinct == stores[0].count_results() == 12 * 2 * 12
    assert len(stores[1].devices()) == 48
    for s in stores:
        s.close()


def test_replicas_draining_at_once_keep_to_the_circuit_breakers_share(pg_server):
    # 20 hosts, at most 10% drained per window: 2 drains in all, whichever replica is asked
    import threading

    from straggler.collector.quarantine import Quarantine
    from straggler.collector.store import Store, row_tuples

    url = pg_server.new_schema()
    stores = [Store(url), Store(url)]
    stores[0].ingest(row_tuples([r for i in range(20) for r in make_rows(f"q{i}", n_gpus=1, samples=1)]), 1.0)
    settings = CollectorSettings(
        quarantine_action="record", quarantine_max_fleet_share=0.1, quarantine_max_model_share=1.0
    )
    loops = [Quarantine(s, settings) for s in stores]
    start, actions = threading.Barrier(2), []

    def ask(k):
        start.wait()
        for i in range(k, 20, 2):  # replica 0 the even hosts, replica 1 the odd ones
            actions.append(loops[k].drain(f"q{i}", "straggler: gpu0 matmul 0.50x", "gate").action)

    threads = [threading.Thread(target=ask, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(actions).count("drain") == 2 and len(actions) == 20
    assert len(loops[1].nodes()) == 2  # what the database holds, seen from either replica
    for s in stores:
        s.close()


def test_a_leader_whose_session_dies_loses_the_lease_and_cannot_publish_over_its_successor(pg_server):
    from straggler.collector.store import Store

    url = pg_server.new_schema()
    stores = [Store(url), Store(url)]
    a, b = replica.Lease(stores[0]), replica.Lease(stores[1])
    boards = [replica.SnapshotBoard(s) for s in stores]
    assert a.try_acquire() and not b.try_acquire()
    assert boards[0].publish(b"one", a) == 1 and boards[1].publish(b"not mine", b) is None
    assert boards[1].latest(0) == (1, b"one") and boards[1].latest(1) is None
    # the leader's connection ends (a crash, a lost network): the server releases its lock
    stores[1]._reader.execute("SELECT pg_terminate_backend(?)", (a.pid,))
    wait_for("the lock to go with the session", lambda: b.try_acquire())
    assert a.held  # the old leader has not noticed yet ...
    assert boards[0].publish(b"stale", a) is None  # ... but cannot overwrite its successor's snapshot
    assert boards[1].publish(b"two", b) == 2 and boards[0].latest(1) == (2, b"two")
    b.release()
    a.lost()
    for s in stores:
        s.close()
