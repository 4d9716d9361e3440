"""Fuzz the collector's API over real HTTP with hypothesis: never a 5xx, nothing stored from a
rejected request, and nothing accepted that the real analysis engine refuses."""

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from straggler.analysis import analyze
from straggler.collector.fleet import FleetView
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from straggler.records import COLUMNS, result_id
from test_collector_api import AUTH, TOKEN, make_rows, peer_ratio_analyze

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

edges = st.sampled_from(
    [
        0,
        -1,
        2**31,
        2**63 - 1,
        2**63,
        -(2**63) - 1,
        10**400 // 10**300,
        1e308,
        -0.0,
        5e-324,
        "",
        " ",
        "\x00",
        "NaN",
        "1e999",
        "\ud800",
    ]
)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30) | edges
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12
)
keys = st.sampled_from(("id",) + COLUMNS) | st.text(max_size=12)


@st.composite
def near_valid_rows(draw):
    """A valid row with some fields replaced, removed or added."""
    row = dict(draw(st.sampled_from(make_rows("fz", n_gpus=2, samples=2))))
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["set", "set", "del", "add"]))
        key = draw(keys)
        if action == "del":
            row.pop(key, None)
        else:
            row[key] = draw(edges | json_values)
    return row


bodies = (
    json_values
    | st.fixed_dictionaries({"host": json_values, "results": json_values})
    | st.fixed_dictionaries(
        {"host": st.text(max_size=20) | json_values, "results": st.lists(near_valid_rows(), min_size=1, max_size=5)}
    )
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "c.db"
    cfg = CollectorSettings(port=0, db_path=db, analysis_debounce_s=5.0, max_wait_s=0.05)
    with BackgroundCollector(cfg, TOKEN, analyze=peer_ratio_analyze) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:  # no default token: each test sets it
            srv.client = client
            yield srv


def stored(server) -> int:
    return server.collector.store.count_results()


def engine_accepts_the_store(server):
    """The real engine over what the fleet view would give it (latest scans plus history)."""
    snap = FleetView(server.collector.store, analyze, history_scans=20).refresh()
    assert snap.error is None, snap.error


def check_ingest(server, content: bytes, headers=AUTH):
    before = stored(server)
    r = server.client.post("/api/v1/results", content=content, headers={**headers, "content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        assert stored(server) == before + r.json()["accepted"]
        if r.json()["accepted"]:
            engine_accepts_the_store(server)
    else:
        assert 400 <= r.status_code < 500 and r.json()["detail"]
        assert stored(server) == before, r.text
    return r


@FUZZ
@given(body=bodies)
def test_ingest_never_5xx_and_rejected_stores_nothing(server, body):
    check_ingest(server, json.dumps(body).encode())


@settings(FUZZ, max_examples=300)
@given(column=st.sampled_from(("id",) + COLUMNS), value=edges | json_values)
def test_any_value_in_any_column_of_a_valid_row(server, column, value):
    row = dict(make_rows("col", n_gpus=1, samples=1)[0], **{column: value})
    check_ingest(server, json.dumps({"host": "col", "results": [row]}).encode())


@st.composite
def new_rows(draw):
    """Rows of new samples (each id recomputed: not a replay) with some columns replaced."""
    host = draw(st.sampled_from(["e1", "e2", "e3"]))
    rows = draw(
        st.lists(
            st.sampled_from(make_rows(host, n_gpus=3, samples=3, scan_id=draw(st.sampled_from(["s1", "s2"])))),
            min_size=1,
            max_size=6,
        )
    )
    out = []
    for row in rows:
        row = dict(row)
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from(COLUMNS))
            if draw(st.booleans()):
                row.pop(key, None)
            else:
                row[key] = draw(edges | json_values)
        row["id"] = result_id({k: ascii(v) for k, v in row.items()})  # ascii: lone surrogates too
        out.append(row)
    return out


@settings(FUZZ, max_examples=300)
@given(rows=new_rows())
def test_accepted_new_rows_never_break_the_analysis(server, rows):
    check_ingest(server, json.dumps({"host": "e", "results": rows}).encode())


@FUZZ
@given(data=st.binary(max_size=300))
def test_ingest_raw_bytes(server, data):
    check_ingest(server, data)


@FUZZ
@given(
    body=bodies,
    auth=st.sampled_from(
        [
            None,
            "Bearer",
            "Bearer wrong-token-0123456789",
            f"Bearer {TOKEN}x",
            f"Bearer {TOKEN[:-1]}",
            TOKEN,
            f"Basic {TOKEN}",
            f"Bearer  {TOKEN[1:]}",
        ]
    ),
)
def test_bad_token_stores_nothing_whatever_the_body(server, body, auth):
    headers = {} if auth is None else {"Authorization": auth}
    r = check_ingest(server, json.dumps(body).encode(), headers=headers)
    assert r.status_code == 401


@settings(FUZZ, max_examples=60)
@given(
    body=json_values
    | st.fixed_dictionaries(
        {"probes": json_values, "duration_s": json_values, "hosts": json_values, "start_delay_s": json_values}
    ),
    status=json_values | st.fixed_dictionaries({"host": json_values, "state": json_values, "error": json_values}),
    host=st.text(max_size=20),
    wait=st.sampled_from(["0", "0.01", "-1", "x", "nan", "inf", "1e309", ""]),
)
def test_scan_endpoints_never_5xx(server, body, status, host, wait):
    c = server.client
    hdrs = {**AUTH, "content-type": "application/json"}
    r = c.post("/api/v1/scans", content=json.dumps(body), headers=hdrs)
    assert r.status_code < 500, r.text
    sid = r.json()["scan_id"] if r.status_code == 201 else "unknown"
    r = c.post(f"/api/v1/scans/{sid}/status", content=json.dumps(status), headers=hdrs)
    assert r.status_code < 500, r.text
    assert c.get("/api/v1/scans/next", params={"host": host, "wait_s": wait}, headers=AUTH).status_code < 500
    r = c.get(f"/api/v1/gpus/{quote(host, safe='') or 'x'}/history", params={"host": host}, headers=AUTH)
    assert r.status_code < 500, r.text
    assert c.get("/api/v1/gpus", headers=AUTH).status_code == 200
