"""The collector's HTTP API over real HTTP on 127.0.0.1, with a real SQLite file.

The fleet analysis is isolated here (``peer_ratio_analyze``: a device's median over its peers');
tests/test_collector_fleet.py runs the real engine.
"""

import re
import subprocess
import time
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conftest import require_tool
from straggler.collector.fleet import FleetSnapshot, build_gpus
from straggler.collector.metrics import FleetCollector
from postgres import BACKENDS, database, pg_server  # noqa: F401 (fixtures: the collector runs on SQLite and PostgreSQL)
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from straggler.records import result_id

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def peer_ratio_analyze(samples: pd.DataFrame, history=None):
    """Stand-in for the analysis engine: median ratio to the peer median, flag below 0.9."""
    med = samples.groupby(["host", "gpu", "index", "model", "probe", "settings"], dropna=False)["value"].median()
    df = med.rename("value").reset_index()
    df["peer_median"] = df.groupby(["model", "probe"])["value"].transform("median")
    df["ratio"] = df["value"] / df["peer_median"]
    df["straggler"] = df["ratio"] < 0.9
    df["causes"] = [["thermal"] if s else [] for s in df["straggler"]]
    df["cost"] = [1 / r - 1 if s else 0.0 for r, s in zip(df["ratio"], df["straggler"])]
    df["basis"] = "fleet"
    return SimpleNamespace(devices=df, summary={"devices": len(df), "stragglers": int(df["straggler"].sum())})


def make_rows(host, n_gpus=4, scan_id="s1", ts=1_700_000_000.0, slow=(), probe="matmul", samples=3, **extra):
    rows = []
    for i in range(n_gpus):
        for k in range(samples):
            row = {
                "ts": ts + k,
                "scan_id": scan_id,
                "host": host,
                "gpu": f"GPU-{host}-{i}",
                "index": i,
                "model": "NVIDIA H100 80GB HBM3",
                "probe": probe,
                "settings": "n=8192,dtype=bf16",
                "sample": k,
                "value": (700.0 if i in slow else 790.0) + k,
                "unit": "TFLOP/s",
                "sm_clock_mhz": 1980.0,
                "throttle_reasons": "sw_power_cap=0.800",
                **extra,
            }
            row["id"] = result_id(row)
            rows.append(row)
    return rows


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    db = database(request, tmp_path_factory.mktemp("collector") / "collector.db")
    settings = CollectorSettings(
        port=0,
        db_path=db,
        max_request_bytes=256 * 1024,
        max_batch_rows=500,
        analysis_debounce_s=0.05,
        analysis_max_delay_s=1.0,
    )
    with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            srv.client = client
            yield srv


def count(server, host=None):
    conn = server.collector.store._reader
    if host is None:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    return conn.execute("SELECT COUNT(*) FROM results WHERE host = ?", (host,)).fetchone()[0]


def post(server, body, headers=AUTH, **kw):
    return server.client.post("/api/v1/results", json=body, headers=headers, **kw)


def test_ingest_is_idempotent_by_id(server):
    rows = make_rows("idem")
    r = post(server, {"host": "idem", "results": rows})
    assert r.status_code == 200 and r.json() == {"accepted": 12, "duplicates": 0}
    r = post(server, {"host": "idem", "results": rows[:5] + make_rows("idem", scan_id="s2")[:2]})
    assert r.json() == {"accepted": 2, "duplicates": 5}
    assert count(server, "idem") == 14
    stored = server.client.get("/api/v1/gpus/GPU-idem-0/history", headers=AUTH).json()["results"]
    assert [s["ts"] for s in stored] == sorted((s["ts"] for s in stored), reverse=True)
    assert stored[-1]["value"] == 790.0 and stored[-1]["throttle_reasons"] == "sw_power_cap=0.800"
    assert stored[-1]["power_w"] is None  # missing stays missing


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
)
def test_missing_or_wrong_token_is_401_and_stores_nothing(server, headers):
    before = count(server)
    r = post(server, {"host": "auth", "results": make_rows("auth")}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert count(server) == before
    assert (
        server.client.post(
            "/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1, "hosts": ["a"]}, headers=headers
        ).status_code
        == 401
    )


def test_oversized_body_is_413_whether_announced_or_streamed(server):
    before = count(server)
    rows = make_rows("big", n_gpus=250, samples=2, driver="x" * 300)  # 500 rows, 315 KiB > 256 KiB
    r = post(server, {"host": "big", "results": rows})
    assert r.status_code == 413 and "larger than 262144 bytes" in r.json()["detail"]
    import json

    data = json.dumps({"host": "big", "results": rows}).encode()
    chunks = (data[i : i + 8192] for i in range(0, len(data), 8192))  # no Content-Length: chunked
    r = server.client.post("/api/v1/results", content=chunks, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    assert count(server) == before


def test_too_many_rows_is_413(server):
    rows = [dict(r, id=f"{i:032x}") for i, r in enumerate(make_rows("many", n_gpus=1, samples=1) * 501)]
    small = [{k: r[k] for k in ("id", "host", "gpu", "model", "probe", "value")} for r in rows]
    r = post(server, {"host": "many", "results": small})
    assert r.status_code == 413 and "max_batch_rows=500" in r.json()["detail"]
    assert count(server, "many") == 0


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("value"), "results[1].value: Field required"),
        (lambda r: r.update(value="fast"), "results[1].value"),
        (lambda r: r.update(value=-1.0), "results[1].value"),
        (lambda r: r.update(bogus=1), "results[1].bogus: Extra inputs are not permitted"),
        (lambda r: r.update(host=""), "results[1].host"),
        (lambda r: r.update(id="../../etc"), "results[1].id"),
        (lambda r: r.update(index=-3), "results[1].index"),
        (lambda r: r.update(pcie_gen=4.5), "results[1].pcie_gen"),
        (lambda r: r.update(processes=2**63), "results[1].processes"),  # beyond SQLite's INTEGER
    ],
)
def test_bad_row_is_422_naming_the_field_and_stores_nothing(server, mutate, field):
    rows = make_rows("bad")
    mutate(rows[1])
    r = post(server, {"host": "bad", "results": rows})
    assert r.status_code == 422
    assert r.json()["detail"].startswith(field)
    assert count(server, "bad") == 0


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.update(throttle_reasons="sw_power_cap=high"), "results[1].throttle_reasons"),
        (lambda r: r.update(throttle_reasons="sw_power_cap=1..2"), "results[1].throttle_reasons"),
        (
            lambda r: r.update(throttle_reasons="sw_power_cap=1.5"),
            "results[1].throttle_reasons: Value error, "
            "throttle_reasons: share '1.5' of 'sw_power_cap' is not in [0, 1]",
        ),
        (
            lambda r: r.update(throttle_reasons="-4"),
            "results[1].throttle_reasons: Value error, throttle_reasons: negative bit mask -4",
        ),
        (lambda r: r.update(throttle_reasons="a=2."), "results[1].throttle_reasons"),  # a share beyond 1
        (lambda r: r.update(throttle_reasons=True), "results[1].throttle_reasons"),
        (lambda r: r.update(unit="GB/s"), "results[1].unit"),  # rows 0 and 1 name one probe in two units
        (lambda r: r.update(scan_id=None), "results[1].sample"),  # sample k of every scan-less upload clashes
        (lambda r: r.update(scan_id=""), "results[1].sample"),
        (lambda r: r.update(sample=0), "results[1].value: 791.0, but this sample"),  # row 0's sample, other value
    ],
)
def test_rows_the_analysis_would_refuse_are_422_and_store_nothing(server, mutate, field):
    rows = make_rows("refuse")
    mutate(rows[1])
    r = post(server, {"host": "refuse", "results": rows})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field)
    assert count(server, "refuse") == 0


def test_throttle_reasons_as_the_agent_writes_them_are_accepted(server):
    from straggler.records import format_throttle

    values = ["", format_throttle({"sw_power_cap": 0.8, "hw_thermal_slowdown": 0.125}), "a=1;b=.5", "a=1."]
    rows = [dict(r, throttle_reasons=v) for r, v in zip(make_rows("thr", n_gpus=1, samples=4), values)]
    r = post(server, {"host": "thr", "results": rows})
    assert r.status_code == 200 and r.json()["accepted"] == 4


def test_throttle_reasons_in_every_form_the_result_table_reads_are_accepted(server):
    """One source: what records.read_throttle reads (bit masks, names joined by | , ;, NVML/DCGM
    spellings, bare names), the collector stores, and the stored cell reads back the same."""
    from straggler.records import read_throttle

    values = [
        "sw_power_cap",
        "0x24",
        36,
        "SW_POWER_CAP|HW_SLOWDOWN",
        "clocks_event_reason_sw_power_cap,hw_slowdown",
        "nvmlClocksThrottleReasonHwSlowdown",
        "HW Slowdown=0.5",
        "gpu_idle;sw_thermal_slowdown=0.25",
    ]
    rows = [
        dict(r, throttle_reasons=v) for r, v in zip(make_rows("thrforms", n_gpus=2, samples=4, scan_id="forms"), values)
    ]
    r = post(server, {"host": "thrforms", "results": rows})
    assert r.status_code == 200 and r.json()["accepted"] == len(values), r.text
    by_id = {
        row["id"]: row["throttle_reasons"]
        for gpu in {row["gpu"] for row in rows}
        for row in server.client.get(f"/api/v1/gpus/{gpu}/history", headers=AUTH).json()["results"]
    }
    for row, v in zip(rows, values):
        assert read_throttle(by_id[row["id"]]) == read_throttle(v)
    assert read_throttle(by_id[rows[2]["id"]]) == ({"sw_power_cap": 1.0, "sw_thermal_slowdown": 1.0}, [])


def test_a_unit_other_than_the_stored_one_is_422(server):
    assert post(server, {"host": "u1", "results": make_rows("u1", probe="unitprobe")}).status_code == 200
    r = post(server, {"host": "u2", "results": make_rows("u2", probe="unitprobe", unit="GB/s")})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "results[0].unit: 'GB/s', but probe unitprobe (n=8192,dtype=bf16) is stored in 'TFLOP/s'"
    )
    assert count(server, "u2") == 0
    # other settings of the probe are another measurement, free to have another unit
    other = make_rows("u2", probe="unitprobe", unit="GB/s", settings="size=1GiB")
    assert post(server, {"host": "u2", "results": other}).status_code == 200
    # rows without a unit or without a scan id and sample number are fine
    loose = [dict(r, unit=None, scan_id=None, sample=None) for r in make_rows("u3", probe="unitprobe", samples=1)]
    assert post(server, {"host": "u3", "results": loose}).json()["accepted"] == 4


def test_a_nul_character_in_a_text_field_is_stored_or_refused_by_name(server):
    rows = make_rows("nul", n_gpus=1, samples=1)
    rows[0]["driver"] = "550.54\x00"
    rows[0]["id"] = result_id(rows[0])
    r = post(server, {"host": "nul", "results": rows})
    if server.collector.store.url is None:  # SQLite's text holds it
        assert r.status_code == 200 and count(server, "nul") == 1
    else:  # PostgreSQL's cannot: a 422 naming the field, not a database failure
        assert r.status_code == 422 and count(server, "nul") == 0
        assert r.json()["detail"] == "results[0].driver: contains a NUL character, which PostgreSQL cannot store"
    assert server.client.get("/healthz").json()["status"] == "ok"


def test_nan_value_is_refused_but_nan_telemetry_is_missing(server):
    rows = make_rows("nan", n_gpus=1, samples=2)
    body = '{"host": "nan", "results": [%s]}'
    import json

    bad = [json.dumps(rows[0]), json.dumps(dict(rows[1], value=float("nan")))]
    r = server.client.post(
        "/api/v1/results", content=body % ",".join(bad), headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("results[1].value")
    ok = [json.dumps(dict(rows[0], power_w=float("nan"), driver=float("nan")))]
    r = server.client.post(
        "/api/v1/results", content=body % ",".join(ok), headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    stored = server.client.get("/api/v1/gpus/GPU-nan-0/history", headers=AUTH).json()["results"][0]
    assert stored["power_w"] is None and stored["driver"] is None


def test_malformed_json_and_wrong_shapes_are_4xx(server):
    for content in (b"{", b"\xff\xfe", b"[]", b'{"host": "x"}', b'{"host": "x", "results": {}}', b"null"):
        r = server.client.post("/api/v1/results", content=content, headers={**AUTH, "content-type": "application/json"})
        assert 400 <= r.status_code < 500, content


def test_openapi_describes_the_api(server):
    spec = server.client.get("/openapi.json").json()
    for path in (
        "/api/v1/results",
        "/api/v1/scans",
        "/api/v1/scans/next",
        "/api/v1/scans/{scan_id}",
        "/api/v1/scans/{scan_id}/status",
        "/api/v1/gpus",
        "/api/v1/stragglers",
        "/api/v1/gpus/{uuid}/history",
        "/metrics",
        "/healthz",
    ):
        assert path in spec["paths"], path
    assert {"get", "post"} <= set(spec["paths"]["/api/v1/scans"])
    row = spec["components"]["schemas"]["ResultRow"]
    assert set(row["required"]) == {"id", "host", "gpu", "model", "probe", "value"}
    assert row["additionalProperties"] is False


def test_allreduce_rows_with_their_probe_columns_are_stored(server):
    # what the allreduce probe writes: busbw as value, plus algbw_gbps and arrival_skew_s
    rows = make_rows(
        "ar",
        n_gpus=2,
        probe="allreduce",
        unit="GB/s",
        settings="bytes=16777216,dtype=fp32,ranks=2",
        scan_id="ar1",
        algbw_gbps=5.25,
        arrival_skew_s=0.0125,
    )
    r = post(server, {"host": "ar", "results": rows})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 6, "duplicates": 0}
    got = server.collector.store.scan_results("ar1")
    assert {(g["algbw_gbps"], g["arrival_skew_s"]) for g in got} == {(5.25, 0.0125)}
    # the columns are typed and checked like the others
    bad = make_rows("ar", n_gpus=1, probe="allreduce", unit="GB/s", scan_id="ar2", arrival_skew_s=-1.0)
    r = post(server, {"host": "ar", "results": bad})
    assert r.status_code == 422 and r.json()["detail"].startswith("results[0].arrival_skew_s:")


def test_docs_need_no_network(server):
    # an air-gapped cluster: the page must not load anything from a CDN
    r = server.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "cdn." not in page and "https://" not in page and "http://" not in page
    assert "/openapi.json" in page
    for path in ("/api/v1/results", "/api/v1/scans/{scan_id}/status", "/api/v1/gpus"):
        assert path in page
    assert "ResultRow" in page and "algbw_gbps" in page  # the result columns are documented
    assert server.client.get("/redoc").status_code == 404  # it would load from a CDN too


def wait_for_analysis(server, host, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = server.client.get("/api/v1/gpus", headers=AUTH).json()
        mine = [g for g in body["gpus"] if g["host"] == host]
        if mine and all(g["probes"] for g in mine):
            return body
        time.sleep(0.05)
    raise AssertionError(f"no analysis of {host} within {timeout_s} s")


def test_fleet_view_is_recomputed_after_ingest(server):
    assert post(server, {"host": "fleet", "results": make_rows("fleet", n_gpus=5, slow=(3,))}).status_code == 200
    body = wait_for_analysis(server, "fleet")  # debounced refresh in the background, no explicit call
    gpu3 = next(g for g in body["gpus"] if g["gpu"] == "GPU-fleet-3")
    assert gpu3["straggler"] is True and gpu3["probes"][0]["causes"] == ["thermal"]
    assert gpu3["last_scan_id"] == "s1" and gpu3["last_probe_age_s"] > 0
    flagged = server.client.get("/api/v1/stragglers", headers=AUTH).json()["gpus"]
    assert "GPU-fleet-3" in [g["gpu"] for g in flagged]
    assert all(g["straggler"] for g in flagged)
    assert server.client.get("/api/v1/gpus/GPU-none/history", headers=AUTH).status_code == 404


def test_metrics_expose_fleet_and_self_metrics_and_pass_promtool(server, tmp_path):
    post(server, {"host": "prom", "results": make_rows("prom", n_gpus=4, slow=(0,))})
    gpus = {g["gpu"]: g["probes"][0] for g in wait_for_analysis(server, "prom")["gpus"]}
    text = server.client.get("/metrics").text
    assert (
        'straggler_gpu_straggler{basis="other",cause="thermal",gpu="0",host="prom",model="NVIDIA H100 80GB HBM3"'
        in text
    )
    assert 'straggler_collector_ingest_requests_total{code="200"}' in text
    assert 'straggler_collector_request_duration_seconds_count{handler="/api/v1/results"}' in text
    fc = server.collector.fleet_metrics
    reg = CollectorRegistry()
    reg.register(fc)
    labels = {
        "host": "prom",
        "uuid": "GPU-prom-1",
        "gpu": "1",
        "model": "NVIDIA H100 80GB HBM3",
        "probe": "matmul",
        "settings": "n=8192,dtype=bf16",
    }
    assert reg.get_sample_value("straggler_gpu_performance_ratio", labels) == gpus["GPU-prom-1"]["ratio"]
    assert 0.99 < gpus["GPU-prom-1"]["ratio"] < 1.01
    assert reg.get_sample_value("straggler_gpu_straggler", {**labels, "cause": "none", "basis": "other"}) == 0.0
    slow = {**labels, "uuid": "GPU-prom-0", "gpu": "0"}
    assert reg.get_sample_value("straggler_gpu_cost_ratio", slow) == gpus["GPU-prom-0"]["cost"] > 0.1
    promtool = require_tool("promtool")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_fast_render_equals_prometheus_client_text():
    devices = [
        {
            "host": h,
            "gpu": f"GPU-{h}-{i}",
            "index": i,
            "model": 'we"ird\\model\n',
            "last_ts": 100.0 + i,
            "last_scan_id": "s",
        }
        for h in ("a", "b")
        for i in range(3)
    ] + [{"host": "c", "gpu": "cpu0", "index": None, "model": None, "last_ts": None, "last_scan_id": ""}]
    verdicts = [
        {
            "host": d["host"],
            "gpu": d["gpu"],
            "probe": p,
            "settings": "n=1",
            "ratio": 0.5 + d["index"] / 7,
            "straggler": d["index"] == 0,
            "causes": ["thermal", "pcie_link"] if d["host"] == "a" else ["new_cause"],
            "cost": float("nan") if p == "membw" else 1.25e7,
            "verdict": "straggler" if d["index"] == 0 else ("undecided", "slow")[d["index"] % 2],
            "degraded": d["index"] == 2,
            "perf_class": None if p == "membw" else "ABCD"[d["index"]],
        }
        for d in devices[:-1]
        for p in ("matmul", "membw")
    ]
    snap = FleetSnapshot(computed_ts=123.5, gpus=build_gpus(devices, verdicts))
    fc = FleetCollector(clock=lambda: 1000.0)
    fc.update(snap)
    reg = CollectorRegistry()
    reg.register(fc)
    assert fc.render() == generate_latest(reg)
    assert b'cause="other"' in fc.render() and b'cause="thermal"' in fc.render()
    assert b'straggler_fleet_devices_by_verdict{verdict="undecided"} 2.0' in fc.render()
    assert b'straggler_fleet_devices_by_verdict{verdict="healthy"} 0.0' in fc.render()
    assert b"straggler_fleet_degraded 2.0" in fc.render()
    assert fc.render().count(b"\nstraggler_gpu_degraded{") == 4  # index 2 of hosts a and b, two probes each
    assert b'perf_class="",probe="membw"' in fc.render() and b'perf_class="B",probe="matmul"' in fc.render()
    assert (
        reg.get_sample_value(
            "straggler_gpu_last_probe_age_seconds",
            {"host": "b", "uuid": "GPU-b-2", "gpu": "2", "model": 'we"ird\\model\n'},
        )
        == 898.0
    )


def test_healthz(server):
    body = server.client.get("/healthz").json()
    assert body["status"] == "ok"


def test_fleet_view_serves_tiers_and_metrics_export_them(tmp_path):
    """The real analysis engine behind the collector: each device's tier, degraded flag, class and
    samples needed in /api/v1/gpus and /api/v1/stragglers, and the tier and class in /metrics."""
    import numpy as np

    rng = np.random.default_rng(3)
    slow = {2: 0.8, 5: 0.96, 7: 0.975}  # a straggler, one at the threshold (undecided), one slow
    rows = []
    for i in range(16):
        for k in range(5):
            row = {
                "ts": 1_700_000_000.0 + k,
                "scan_id": "t1",
                "host": f"tier{i // 8}",
                "gpu": f"GPU-tier-{i}",
                "index": i % 8,
                "model": "H100",
                "probe": "matmul",
                "settings": "n=8192",
                "sample": k,
                "value": 700.0 * slow.get(i, 1.0) * (1 + rng.normal(0, 0.002)),
                "unit": "TFLOP/s",
            }
            row["id"] = result_id(row)
            rows.append(row)
    settings = CollectorSettings(port=0, db_path=tmp_path / "c.db", analysis_debounce_s=0.05, analysis_max_delay_s=1.0)
    with BackgroundCollector(settings, TOKEN) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        srv.client = client
        assert post(srv, {"host": "tier0", "results": rows}).status_code == 200
        body = wait_for_analysis(srv, "tier1")
        gpus = {g["gpu"]: g for g in body["gpus"]}
        assert [gpus[f"GPU-tier-{i}"]["verdict"] for i in (2, 5, 7, 0)] == ["straggler", "undecided", "slow", "healthy"]
        for g in gpus.values():
            assert set(g) >= {"verdict", "degraded", "perf_class", "samples_needed", "straggler"}
            assert g["degraded"] is False and g["straggler"] == (g["verdict"] == "straggler")
            (p,) = g["probes"]
            assert g["verdict"] == p["verdict"] and g["perf_class"] == p["perf_class"]
            assert p["peer_spread"] is not None and p["peer_spread"] >= 0 and "samples_needed" in p
        assert gpus["GPU-tier-2"]["perf_class"] == "D"
        assert body["summary"]["verdicts"] == {"straggler": 1, "undecided": 1, "slow": 1, "healthy": 13}
        assert body["summary"]["groups"][0]["devices"] == 16 and "warnings" in body["summary"]
        flagged = client.get("/api/v1/stragglers", headers=AUTH).json()["gpus"]
        assert [(g["gpu"], g["verdict"]) for g in flagged] == [("GPU-tier-2", "straggler")]  # the first tier only
        text = client.get("/metrics").text
        reg = CollectorRegistry()
        reg.register(srv.collector.fleet_metrics)
        labels = {"host": "tier0", "gpu": "5", "model": "H100", "probe": "matmul", "settings": "n=8192"}
        tier5 = {**labels, "uuid": "GPU-tier-5", "perf_class": gpus["GPU-tier-5"]["perf_class"]}
        assert tier5["perf_class"] in ("C", "D")
        assert reg.get_sample_value("straggler_gpu_verdict", {**tier5, "verdict": "undecided"}) == 1.0
        assert reg.get_sample_value("straggler_gpu_verdict", {**tier5, "verdict": "healthy"}) is None
        assert len(re.findall(r"^straggler_gpu_verdict\{", text, re.M)) == 16  # one series per device and probe
        assert set(re.findall(r'perf_class="([^"]*)"', text)) == {"A", "B", "C", "D"}
        assert "straggler_gpu_degraded{" not in text  # present only for a degraded device
        for tier, n in (("straggler", 1), ("undecided", 1), ("slow", 1), ("healthy", 13)):
            assert reg.get_sample_value("straggler_fleet_devices_by_verdict", {"verdict": tier}) == n
        assert reg.get_sample_value("straggler_fleet_degraded") == 0.0
        assert {v for v in re.findall(r'verdict="([^"]*)"', text)} <= {"straggler", "undecided", "slow", "healthy"}
        promtool = require_tool("promtool")
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def _fleet_snapshot(rows, verdicts_ts):
    """A FleetSnapshot of ``rows`` through the real analysis engine, as the fleet view builds it."""
    from straggler.analysis import analyze

    res = analyze(pd.DataFrame(rows))
    devices = (
        pd.DataFrame(rows)[["host", "gpu", "index", "model"]]
        .drop_duplicates()
        .assign(last_ts=1_700_000_000.0, last_scan_id="k1")
        .to_dict("records")
    )
    return FleetSnapshot(
        computed_ts=verdicts_ts,
        gpus=build_gpus(devices, res.devices.to_dict("records")),
        summary=res.summary,
        verdicts_ts=verdicts_ts,
    )


def test_probe_free_flag_held_analyses_and_job_cost_are_exported():
    """One straggler_gpu_straggler_any series per device (two probes, one series), the number of
    consecutive scans of it that were flagged (re-analysing the same scan does not count), and the
    analysis' job cost for the fleet KPI, in the collector's own numbers."""
    rows = make_rows("kpi", n_gpus=16, slow=(3,), samples=5) + make_rows("kpi", n_gpus=16, probe="membw", samples=5)
    fc = FleetCollector()
    reg = CollectorRegistry()
    reg.register(fc)
    snap = _fleet_snapshot(rows, 100.0)
    dev3 = {"host": "kpi", "uuid": "GPU-kpi-3", "gpu": "3", "model": "NVIDIA H100 80GB HBM3"}
    for n, scan in ((1, "k1"), (1, "k1"), (2, "k2")):  # analyses of the same scan count once
        gpus = tuple({**g, "last_scan_id": scan} for g in snap.gpus)
        fc.update(FleetSnapshot(**{**snap.__dict__, "gpus": gpus}))
        assert reg.get_sample_value("straggler_gpu_flagged_scans", dev3) == n
    # a failed analysis keeps the old verdicts beside a newer scan: that is no new flagged scan
    gpus = tuple({**g, "last_scan_id": "k3"} for g in snap.gpus)
    fc.update(FleetSnapshot(**{**snap.__dict__, "gpus": gpus, "error": "input: mixes units"}))
    assert reg.get_sample_value("straggler_gpu_flagged_scans", dev3) == 2
    text = fc.render().decode()
    assert len(re.findall(r"^straggler_gpu_straggler_any\{", text, re.M)) == 16
    assert reg.get_sample_value("straggler_gpu_straggler_any", {**dev3, "cause": "unexplained"}) == 1.0
    assert (
        reg.get_sample_value("straggler_gpu_straggler_any", {**dev3, "uuid": "GPU-kpi-0", "gpu": "0", "cause": "none"})
        == 0.0
    )
    assert reg.get_sample_value("straggler_gpu_flagged_scans", {**dev3, "uuid": "GPU-kpi-0", "gpu": "0"}) == 0.0
    [job8] = [j for j in snap.summary["job_cost"] if j["job_devices"] == 8]
    labels = {"model": job8["model"], "probe": "matmul", "settings": job8["settings"], "job_devices": "8"}
    assert (
        reg.get_sample_value("straggler_fleet_job_slowdown_ratio", {**labels, "devices": "all"})
        == pytest.approx(job8["step_time_all"] - 1)
        and job8["step_time_all"] > 1
    )
    assert reg.get_sample_value("straggler_fleet_job_speedup_ratio", labels) == pytest.approx(job8["speedup"])
    assert reg.get_sample_value("straggler_fleet_job_speedup_ratio", {**labels, "job_devices": "64"}) is None  # > 16
    assert reg.get_sample_value("straggler_fleet_min_effect_ratio") == snap.summary["min_effect"] == 0.04
    healthy = [{**r, "value": 790.0 + r["sample"]} for r in rows]
    fc.update(_fleet_snapshot(healthy, 300.0))
    assert reg.get_sample_value("straggler_gpu_flagged_scans", dev3) == 0.0  # the streak ends
    assert reg.get_sample_value("straggler_gpu_straggler_any", {**dev3, "cause": "none"}) == 0.0


def test_verdict_entries_reads_the_device_table_column_by_column_into_json_safe_entries():
    import json

    import numpy as np
    import pandas as pd

    from straggler.collector.fleet import verdict_entries

    table = pd.DataFrame(
        {
            "host": pd.array(["a", "a", "b"], dtype="string"),
            "gpu": pd.array(["G0", "G0", "G1"], dtype="string"),
            "index": [0, 0, 1],
            "model": ["H100", "H100", "H100"],
            "probe": pd.array(["membw", "matmul", "matmul"], dtype="string"),
            "settings": pd.array([pd.NA, "n=1", "n=1"], dtype="string"),
            "ratio": [0.9, np.nan, np.inf],
            "straggler": np.array([True, False, False]),
            "causes": [["thermal"], None, []],
            "samples_needed": pd.array([3, pd.NA, 1], dtype="Int64"),
            "change_ts": [np.float64(5.5), np.nan, 1.0],
        }
    )
    got = verdict_entries(table)
    assert list(got) == [("a", "G0"), ("b", "G1")]
    a0 = got[("a", "G0")]
    assert [p["probe"] for p in a0] == ["matmul", "membw"]  # sorted by probe, then settings
    assert list(a0[0]) == ["probe", "settings", "ratio", "straggler", "causes", "cost", "samples_needed", "change_ts"]
    assert a0[0] == {
        "probe": "matmul",
        "settings": "n=1",
        "ratio": None,  # NaN
        "straggler": False,
        "causes": [],  # None
        "cost": None,  # a required field the table lacks
        "samples_needed": None,  # pd.NA
        "change_ts": None,
    }
    assert a0[1]["settings"] is None and a0[1]["straggler"] is True and a0[1]["causes"] == ["thermal"]
    assert got[("b", "G1")][0]["ratio"] is None and got[("b", "G1")][0]["samples_needed"] == 1
    assert type(got[("b", "G1")][0]["samples_needed"]) is int and type(a0[1]["change_ts"]) is float
    json.dumps(got[("a", "G0")], allow_nan=False)  # every value JSON can write
    assert verdict_entries(table.iloc[:0]) == {}
