"""What a straggler costs, for every kind of peer group: a group on one host, a group over several
hosts, a device slow only against its node-mates; through the library, `straggler analyze --json`
and the collector (/api/v1/gpus, /metrics). And the basis names: defined once (analysis/bases.py),
the docs name exactly those."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from test_analysis import flagged, fleet, row
from straggler.analysis import analyze, bases
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from straggler.records import result_id, write_table

ONE_HOST_SLOW = {3: 0.80}  # one GPU of eight at 0.80x: it costs every job it joins 1 / 0.8 - 1 = 25%


def one_host(**kw) -> pd.DataFrame:
    return fleet(n_hosts=1, per_host=8, slow=ONE_HOST_SLOW, **kw)


def test_a_group_on_one_host_costs_its_straggler():
    res = analyze(one_host())
    assert flagged(res) == {"GPU-0003"}
    r = row(res, "GPU-0003")
    assert r["basis"] == bases.HOST == "host_peers"
    assert r["cost"] == pytest.approx(0.25, abs=0.02)
    assert "peers on its host" in r["evidence"]
    # Every device of the group has a cost (its healthy peers about 0), and the straggler ranks first.
    assert res.devices["cost"].notna().all() and (res.devices["cost"].iloc[1:] < 0.03).all()
    assert res.devices.iloc[0]["gpu"] == "GPU-0003"


def test_a_small_group_on_one_host_costs_its_straggler():
    res = analyze(fleet(n_hosts=1, per_host=3, samples=8, base=[1.0, 1.0, 0.8]))
    assert flagged(res) == {"GPU-0002"}
    r = row(res, "GPU-0002")
    assert r["basis"] == bases.HOST + bases.LOO == "host_peers_loo"
    assert r["cost"] == pytest.approx(0.25, abs=0.02)
    assert "2 other devices on its host (leave-one-out)" in r["evidence"]


def test_a_group_over_several_hosts_costs_its_straggler():
    res = analyze(fleet(n_hosts=4, per_host=8, slow=ONE_HOST_SLOW))
    assert flagged(res) == {"GPU-0003"}
    r = row(res, "GPU-0003")
    assert r["basis"] == bases.FLEET + bases.JOIN + bases.NODE_MATES == "fleet_peers+node_mates"
    assert r["cost"] == pytest.approx(0.25, abs=0.02)
    assert "the median of 31 fleet peers" in r["evidence"]
    assert res.devices["cost"].notna().all()


def fast_node(slow_now: bool = True) -> list[float]:
    base = [1.0] * 64
    base[8:16] = [1.08] * 8  # node002 and node003 run 8% fast (cooling) ...
    if slow_now:
        base[13] = 1.0  # ... except GPU-0013: as fast as the fleet, 7.4% behind its node-mates
    return base


def mates_lead(res, gpu: str) -> float:
    """The median of the device's node-mates over its value, - 1 (measured: about 0.08)."""
    d = res.devices
    me = d[d["gpu"] == gpu].iloc[0]
    mates = d[(d["host"] == me["host"]) & (d["gpu"] != gpu)]
    return float(mates["value"].median() / me["value"] - 1)


def test_a_device_slow_only_against_its_node_mates_costs_their_lead():
    res = analyze(fleet(base=fast_node(), spread=0, samples=10))
    assert flagged(res) == {"GPU-0013"}
    r = row(res, "GPU-0013")
    assert r["basis"] == bases.NODE_MATES == "node_mates"
    assert abs(r["ratio"] - 1) < 0.01  # in line with the fleet ...
    assert r["cost"] == pytest.approx(mates_lead(res, "GPU-0013"), rel=1e-9)  # ... not its node-mates
    assert r["cost"] > 0.03


def test_node_mates_and_own_history_cost_against_the_node_mates():
    # Last scan GPU-0013 ran with its fast node-mates; now it is 5% behind them (and its own past),
    # in line with the fleet: the cost is the node-mates' lead, not the fleet's (0).
    past = fleet(base=fast_node(slow_now=False), spread=0, samples=10, scan_id="s1", seed=1)
    now = fleet(base=fast_node(), spread=0, samples=10, scan_id="s2", seed=2)
    res = analyze(pd.concat([past, now], ignore_index=True))
    r = row(res, "GPU-0013")
    assert r["straggler"] and set(r["basis"].split(bases.JOIN)) == {bases.NODE_MATES, bases.HISTORY}
    assert r["cost"] == pytest.approx(mates_lead(res, "GPU-0013"), rel=1e-9) and r["cost"] > 0.03


def test_cost_is_missing_only_where_there_is_nothing_to_compare_with():
    df = pd.concat(
        [
            one_host(),  # a group on one host
            fleet(n_hosts=1, per_host=3, samples=8, base=[1.0, 1.0, 0.8], probe="membw"),  # 2-3 on one host
            fleet(n_hosts=4, per_host=2, slow={5: 0.8}, probe="nccl"),  # several hosts, 2 devices each
            fleet(n_hosts=1, per_host=1, model="NVIDIA A100-SXM4-80GB").assign(host="a100", gpu="GPU-a100"),  # alone
        ],
        ignore_index=True,
    )
    res = analyze(df)
    d = res.devices
    assert set(d.loc[d["cost"].isna(), "basis"]) == {bases.NONE}
    assert (d["basis"] == bases.NONE).sum() == 1
    assert set(d.loc[d["straggler"], "basis"]) == {bases.HOST, bases.HOST + bases.LOO, bases.FLEET}
    assert d.loc[d["straggler"], "cost"].tolist() == pytest.approx([0.25] * 3, abs=0.03)


def test_straggler_analyze_json_costs_a_one_host_straggler(tmp_path, straggler_cmd):
    path = tmp_path / "one-host.csv"
    write_table(one_host(), path)
    out = subprocess.run([*straggler_cmd, "analyze", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr  # stragglers found
    doc = json.loads(out.stdout)
    gpus = {g["gpu"]: g for g in doc["gpus"]}
    assert len(gpus) == 8 and all(isinstance(g["cost"], float) for g in gpus.values())
    slow = gpus["GPU-0003"]
    assert slow["straggler"] is True and slow["basis"] == bases.HOST
    assert slow["cost"] == pytest.approx(0.25, abs=0.02)
    assert doc["summary"]["bases"] == {bases.HOST: 1}


# --- the collector, with the real engine ----------------------------------------------------------

TOKEN = "cost-test-token-0123456789abcdef"


def upload_rows(df: pd.DataFrame) -> list[dict]:
    rows = []
    for rec in df.assign(ts=1_700_000_000.0 + df["sample"], scan_id="s1").to_dict("records"):
        rec["id"] = result_id(rec)
        rows.append(rec)
    return rows


def test_collector_costs_a_one_host_straggler(tmp_path):
    settings = CollectorSettings(
        port=0, db_path=tmp_path / "collector.db", analysis_debounce_s=0.05, analysis_max_delay_s=1.0
    )
    with BackgroundCollector(settings, TOKEN) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post(
            "/api/v1/results",
            json={"host": "node000", "results": upload_rows(one_host())},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 200 and r.json()["accepted"] == 40
        # The analysis starts analysis_debounce_s after the ingest (at most analysis_max_delay_s late);
        # the deadline only guards against a hang (the engine's first run imports pandas and scipy).
        deadline = time.monotonic() + settings.analysis_max_delay_s + 60
        while not (
            gpus := client.get("/api/v1/gpus", headers={"Authorization": f"Bearer {TOKEN}"}).json()["gpus"]
        ) or not all(g["probes"] for g in gpus):
            assert time.monotonic() < deadline, "no fleet analysis"
            time.sleep(settings.analysis_debounce_s)
        probe = {g["gpu"]: g["probes"][0] for g in gpus}
        assert probe["GPU-0003"]["straggler"] is True
        assert probe["GPU-0003"]["cost"] == pytest.approx(0.25, abs=0.02)
        assert all(isinstance(p["cost"], float) for p in probe.values())
        text = client.get("/metrics").text
    cost = {
        s.labels["uuid"]: s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "straggler_gpu_cost_ratio"
        for s in fam.samples
    }
    assert set(cost) == set(probe)  # every device exports its cost
    assert cost["GPU-0003"] == pytest.approx(probe["GPU-0003"]["cost"], rel=1e-9)


# --- the names ------------------------------------------------------------------------------------

NAMED = re.compile(r"`([a-z_]+(?:\+[a-z_]+)*)`")


@pytest.mark.parametrize("doc", ["docs/analysis.md", "docs/interfaces.md"])
def test_docs_name_every_basis(doc):
    text = (ROOT / doc).read_text()
    for name in bases.ALL:
        assert f"`{name}`" in text, f"{doc} does not explain basis {name}"


@pytest.mark.parametrize("doc", ["docs/analysis.md", "docs/interfaces.md", "docs/scan.md"])
def test_docs_name_no_basis_the_engine_lacks(doc):
    text = (ROOT / doc).read_text()
    named = {
        p
        for m in NAMED.findall(text) + re.findall(r'"basis": "([^"]+)"', text)
        for p in m.split(bases.JOIN)
        if re.search(r"_(peers|mates)(_loo)?$", p)
    }
    assert named and named <= set(bases.ALL), f"{doc}: unknown basis {sorted(named - set(bases.ALL))}"


def test_the_names_are_distinct_and_joinable():
    assert len(set(bases.ALL)) == len(bases.ALL)
    assert not any(bases.JOIN in name for name in bases.ALL)
