"""Cluster scans over real HTTP: scheduling, long polls, node states, and the cluster_scan client.

The two "agents" here are small loops speaking the agent side of the API (the real agent's
end-to-end test lives with the agent); their probe results are made-up rows, not measurements.
"""

import threading
import time

import httpx
import pytest

from straggler.collector.client import CollectorError, cluster_scan
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from test_collector_api import AUTH, TOKEN, make_rows, peer_ratio_analyze
from postgres import BACKENDS, database, pg_server  # noqa: F401 (fixtures: server runs on SQLite and PostgreSQL)


@pytest.fixture(params=BACKENDS)
def server(request, tmp_path):
    settings = CollectorSettings(
        port=0,
        db_path=database(request, tmp_path / "c.db"),
        analysis_debounce_s=0.05,
        max_wait_s=5.0,
        agent_seen_s=60.0,
    )
    with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as client:
            srv.client = client
            yield srv


def test_scan_lifecycle(server):
    c = server.client
    r = c.post(
        "/api/v1/scans",
        json={"probes": ["matmul", "membw"], "duration_s": 2.5, "hosts": ["n2", "n1", "n1"], "start_delay_s": 5},
    )
    assert r.status_code == 201
    scan = r.json()
    assert scan["hosts"] == ["n1", "n2"] and scan["probes"] == ["matmul", "membw"]
    assert time.time() + 3 < scan["start_at"] <= time.time() + 5
    view = c.get(f"/api/v1/scans/{scan['scan_id']}").json()
    assert view["state"] == "pending" and view["nodes"] == {"n1": "pending", "n2": "pending"} and view["results"] == 0

    got = c.get("/api/v1/scans/next", params={"host": "n1", "wait_s": 0})
    assert got.status_code == 200 and got.json()["scan_id"] == scan["scan_id"]
    assert c.get("/api/v1/scans/next", params={"host": "other", "wait_s": 0}).status_code == 204

    sid = scan["scan_id"]
    assert c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "running"}).json()["state"] == "running"
    # once a node reported, the scan is no longer offered to it
    assert c.get("/api/v1/scans/next", params={"host": "n1", "wait_s": 0}).status_code == 204
    rows = make_rows("n1", n_gpus=2, scan_id=sid, ts=time.time())
    assert c.post("/api/v1/results", json={"host": "n1", "results": rows}).json()["accepted"] == 6
    c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "done"})
    view = c.post(f"/api/v1/scans/{sid}/status", json={"host": "n2", "state": "failed", "error": "probe hung"}).json()
    assert view["state"] == "failed" and view["nodes"] == {"n1": "done", "n2": "failed"}
    assert view["errors"] == {"n2": "probe hung"} and view["results"] == 6
    samples = c.get(f"/api/v1/scans/{sid}/results").json()["samples"]
    assert sorted(s["id"] for s in samples) == sorted(r["id"] for r in rows)


def test_scan_errors(server):
    c = server.client
    sid = c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1, "hosts": ["n1"]}).json()["scan_id"]
    r = c.post(f"/api/v1/scans/{sid}/status", json={"host": "n9", "state": "done"})
    assert r.status_code == 409 and "n9" in r.json()["detail"]
    assert c.post("/api/v1/scans/nope/status", json={"host": "n1", "state": "done"}).status_code == 404
    assert c.get("/api/v1/scans/nope").status_code == 404
    r = c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "finished"})
    assert r.status_code == 422 and r.json()["detail"].startswith("state:")
    for bad in (
        {"probes": [], "duration_s": 1},
        {"probes": ["matmul"], "duration_s": 0},
        {"probes": ["Mat Mul"], "duration_s": 1},
        {"probes": ["matmul"], "duration_s": 1, "start_delay_s": -1},
        {"probes": ["matmul"], "duration_s": 1, "extra": 1},
        {"probes": ["matmul"], "duration_s": 1, "hosts": []},
    ):  # would never finish
        assert c.post("/api/v1/scans", json=bad).status_code == 422, bad
    assert c.get("/api/v1/scans/next", params={"wait_s": 0}).status_code == 422  # host is required


def test_a_refused_status_report_changes_nothing(server):
    c = server.client
    sid = c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1, "hosts": ["n1"]}).json()["scan_id"]
    assert c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "done"}).status_code == 200
    r = c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "running"})
    assert r.status_code == 409 and "already reported 'done'" in r.json()["detail"]
    r = c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "failed", "error": "late"})
    assert r.status_code == 409
    view = c.get(f"/api/v1/scans/{sid}").json()
    assert view["nodes"] == {"n1": "done"} and view["state"] == "done" and view["errors"] == {}
    # the same final state again (an agent retrying a report whose answer it lost) is no error
    assert c.post(f"/api/v1/scans/{sid}/status", json={"host": "n1", "state": "done"}).status_code == 200
    # a host outside the scan is not marked alive by its refused report
    assert c.post(f"/api/v1/scans/{sid}/status", json={"host": "ghost", "state": "done"}).status_code == 409
    assert server.collector.store.agents_seen_since(0.0) == ["n1"]


def test_scan_without_hosts_goes_to_agents_seen_recently(server):
    c = server.client
    r = c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1})
    assert r.status_code == 409 and "no agent" in r.json()["detail"]
    for host in ("a1", "a2"):
        assert c.get("/api/v1/scans/next", params={"host": host, "wait_s": 0}).status_code == 204
    r = c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1})
    assert r.status_code == 201 and r.json()["hosts"] == ["a1", "a2"]


def test_uploading_results_does_not_make_a_live_agent(server):
    # a batch posted by hand (or replayed from a file) names a host that runs no agent: a scan
    # without hosts must not wait on it
    c = server.client
    assert (
        c.post("/api/v1/results", json={"host": "laptop", "results": make_rows("laptop", n_gpus=1)}).status_code == 200
    )
    r = c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1})
    assert r.status_code == 409 and "no agent" in r.json()["detail"]
    assert c.get("/api/v1/scans/next", params={"host": "a1", "wait_s": 0}).status_code == 204
    r = c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1})
    assert r.status_code == 201 and r.json()["hosts"] == ["a1"]
    assert server.collector.store.agents_seen_since(0.0) == ["a1"]


@pytest.mark.parametrize("probes", [["gemm"], ["matmul", "pcie_h2d"], ["all"]])
def test_a_scan_of_an_unknown_probe_is_refused(server, probes):
    r = server.client.post("/api/v1/scans", json={"probes": probes, "duration_s": 1, "hosts": ["n1"]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("probes") and repr(probes[-1]) in detail
    assert "matmul, membw, pcie, allreduce" in detail  # the choices, from records.PROBES
    assert server.client.get("/api/v1/scans").json()["scans"] == []  # nothing scheduled


def test_scans_are_listed_newest_first(server):
    c = server.client
    sids = [
        c.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1, "hosts": [h], "start_delay_s": 0}).json()[
            "scan_id"
        ]
        for h in ("n1", "n2", "n3")
    ]
    c.post(f"/api/v1/scans/{sids[0]}/status", json={"host": "n1", "state": "running"})
    c.post(
        "/api/v1/results", json={"host": "n1", "results": make_rows("n1", n_gpus=2, scan_id=sids[0], ts=time.time())}
    )
    c.post(f"/api/v1/scans/{sids[0]}/status", json={"host": "n1", "state": "done"})
    c.post(f"/api/v1/scans/{sids[1]}/status", json={"host": "n2", "state": "failed", "error": "busy"})
    body = c.get("/api/v1/scans").json()
    assert [s["scan_id"] for s in body["scans"]] == sids[::-1]
    by_id = {s["scan_id"]: s for s in body["scans"]}
    assert by_id[sids[0]]["state"] == "done" and by_id[sids[0]]["results"] == 6
    assert by_id[sids[1]]["state"] == "failed" and by_id[sids[1]]["errors"] == {"n2": "busy"}
    assert by_id[sids[2]]["nodes"] == {"n3": "pending"} and by_id[sids[2]]["probes"] == ["matmul"]
    assert by_id[sids[0]] == c.get(f"/api/v1/scans/{sids[0]}").json()  # one view of a scan
    assert [s["scan_id"] for s in c.get("/api/v1/scans", params={"limit": 2}).json()["scans"]] == sids[:0:-1]
    assert c.get("/api/v1/scans", params={"limit": 0}).status_code == 422


def test_long_poll_wakes_when_a_scan_is_created(server):
    got = {}

    def poll():
        t0 = time.monotonic()
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
            r = c.get("/api/v1/scans/next", params={"host": "lp", "wait_s": 4})
        got.update(status=r.status_code, body=r.json() if r.status_code == 200 else None, waited=time.monotonic() - t0)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    sid = server.client.post("/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1, "hosts": ["lp"]}).json()[
        "scan_id"
    ]
    t.join(10)
    assert got["status"] == 200 and got["body"]["scan_id"] == sid
    assert got["waited"] < 3.5  # answered when the scan arrived, not at the end of the wait
    t0 = time.monotonic()
    assert server.client.get("/api/v1/scans/next", params={"host": "nobody", "wait_s": 0.3}).status_code == 204
    assert 0.25 < time.monotonic() - t0 < 3


def fake_agent(url, host, stop, slow=()):
    """The agent's side of a cluster scan: long poll, report running, upload rows, report done."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        while not stop.is_set():
            r = c.get("/api/v1/scans/next", params={"host": host, "wait_s": 1})
            if r.status_code != 200:
                continue
            scan = r.json()
            c.post(f"/api/v1/scans/{scan['scan_id']}/status", json={"host": host, "state": "running"})
            rows = make_rows(host, n_gpus=2, scan_id=scan["scan_id"], ts=scan["start_at"], slow=slow)
            c.post("/api/v1/results", json={"host": host, "results": rows})
            c.post(f"/api/v1/scans/{scan['scan_id']}/status", json={"host": host, "state": "done"})


def test_cluster_scan_client_follows_a_scan_to_the_end(server):
    stop = threading.Event()
    agents = [
        threading.Thread(target=fake_agent, args=(server.url, h, stop, s), daemon=True)
        for h, s in (("node-a", ()), ("node-b", (1,)))
    ]
    for a in agents:
        a.start()
    time.sleep(0.3)  # both agents have polled once: "every agent seen recently"
    progress = []
    try:
        out = cluster_scan(
            server.url, TOKEN, ["matmul"], 1.0, timeout_s=30, on_progress=progress.append, start_delay_s=0.2, poll_s=0.1
        )
    finally:
        stop.set()
        for a in agents:
            a.join(10)
    assert out["state"] == "done" and not out["timed_out"]
    assert out["nodes"] == {"node-a": "done", "node-b": "done"}
    assert len(out["samples"]) == 12 and {s["scan_id"] for s in out["samples"]} == {out["scan_id"]}
    assert progress and progress[-1]["state"] == "done"
    flagged = [(g["host"], g["gpu"]) for g in out["analysis"]["gpus"] if g["straggler"]]  # the real engine
    assert flagged == [("node-b", "GPU-node-b-1")]


def test_cluster_scan_times_out_with_what_arrived(server):
    server.client.get("/api/v1/scans/next", params={"host": "silent", "wait_s": 0})
    t0 = time.monotonic()
    out = cluster_scan(server.url, TOKEN, ["matmul"], 1.0, timeout_s=0.5, start_delay_s=0, poll_s=0.1)
    assert time.monotonic() - t0 < 5
    assert out["timed_out"] and out["nodes"] == {"silent": "pending"} and out["samples"] == []
    assert out["analysis"] is None


def test_a_node_that_never_picks_up_the_scan_is_failed_once_it_is_no_longer_offered(tmp_path):
    settings = CollectorSettings(port=0, db_path=tmp_path / "c.db", scan_offer_grace_s=0.3)
    with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            c.get("/api/v1/scans/next", params={"host": "alive", "wait_s": 0})
            t0 = time.monotonic()
            out = cluster_scan(
                srv.url, TOKEN, ["matmul"], 1.0, timeout_s=20, start_delay_s=0, poll_s=0.05, hosts=["alive", "gone"]
            )
            assert time.monotonic() - t0 < 10  # decided, not timed out
            assert out["state"] == "failed" and not out["timed_out"]
            assert out["nodes"] == {"alive": "failed", "gone": "failed"}
            assert "did not pick up the scan within 0.3 s" in out["errors"]["gone"]
            # an agent that comes back later is not offered the stale scan
            assert c.get("/api/v1/scans/next", params={"host": "gone", "wait_s": 0}).status_code == 204


def test_cluster_scan_errors_are_one_line(server, tmp_path):
    with pytest.raises(CollectorError, match="refused the token"):
        cluster_scan(server.url, "wrong-token-0123456789", ["matmul"], 1.0, timeout_s=5)
    with pytest.raises(CollectorError, match="409 no agent polled"):
        cluster_scan(server.url, TOKEN, ["matmul"], 1.0, timeout_s=5)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(CollectorError, match="cannot reach the collector") as e:
        cluster_scan(f"http://127.0.0.1:{port}", TOKEN, ["matmul"], 1.0, timeout_s=5)
    assert "\n" not in str(e.value)


def test_a_node_that_dies_mid_scan_is_failed_after_the_run_limit(tmp_path):
    settings = CollectorSettings(port=0, db_path=tmp_path / "c.db")
    with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            c.get("/api/v1/scans/next", params={"host": "dies", "wait_s": 0})
            scan = c.post(
                "/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1.0, "hosts": ["dies"], "start_delay_s": 0}
            ).json()
            # a limit this short refuses every scan (it could not finish): lower it once the scan is accepted
            srv.collector.board.run_limit_s = 0.5
            assert (
                c.post(
                    f"/api/v1/scans/{scan['scan_id']}/status", json={"host": "dies", "state": "running", "error": None}
                ).status_code
                == 200
            )
            assert c.get(f"/api/v1/scans/{scan['scan_id']}").json()["nodes"] == {"dies": "running"}
            time.sleep(0.7)  # the agent never reports again
            view = c.get(f"/api/v1/scans/{scan['scan_id']}").json()
            assert view["nodes"] == {"dies": "failed"} and view["state"] == "failed"
            assert "still running 0.5 s after the scan's start" in view["errors"]["dies"]
