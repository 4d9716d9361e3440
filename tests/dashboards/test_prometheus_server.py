"""The dashboards and the rules against a real Prometheus (Debian `prometheus`) on 127.0.0.1.

One Prometheus for the module scrapes, every second: a CPU agent that runs (stand-in) probes and
uploads them, one fake-GPU agent per scenario (thermal throttle, GPU lost, PCIe Gen3 downgrade, ECC
and remapped rows, XIDs, retired pages), an agent and a collector that are down, the real
collector holding two analyses of scans posted here, and a stand-in dcgm-exporter (a static file of
DCGM_FI_* series in dcgm-exporter's format) through the documented relabelling
(dashboards/dcgm-exporter-scrape.yml). It loads dashboards/prometheus-rules.yml with every `for:`
shortened (the only change). Then every panel query, template-variable query and annotation query
of both dashboards and every rule expression runs through the HTTP API: each parses and each
returns data in the scenario dashboards/README.md names for it; every alert fires in its scenario
(and not where it should not); the README's dcgm-exporter example queries return the stragglers'
DCGM series.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from conftest import ROOT, free_port, require_tool
from test_agent_support import AgentProcess, wait_until, write_fake_scan
from test_agent_e2e import CollectorProcess
from test_dashboards import DASHBOARDS, RULES, dashboard_queries, readme_panels, substitute

pytestmark = pytest.mark.slow

SCRAPE_S = 1.0  # scrape and rule evaluation interval
FOR_S = 2.0  # every alert's `for:` in the test copy of the rules
# Everything below waits for at most this long: the collector's analyses (debounced by
# ANALYSIS_DEBOUNCE_S), a few scrapes and rule evaluations, and each alert's `for:`.
ANALYSIS_DEBOUNCE_S = 0.2
DEADLINE_S = 20 * (SCRAPE_S + FOR_S + ANALYSIS_DEBOUNCE_S)
H100 = "NVIDIA H100 80GB HBM3"
V100 = "Tesla V100-SXM2-32GB"
UUID_PART = "-9a10-0000"  # in every fixture's UUIDs; rewritten per scenario so UUIDs stay unique
# scenario name (a host) -> fixture replayed by its agent
SCENARIOS = {
    "node-thermal": "h100_thermal_throttle",
    "node-lost": "gpu_fallen_off_bus",
    "node-pcie": "pcie_gen3_downgrade",
    "node-ecc": "ecc_remapped_rows",
    "node-xid": "h100_xid_errors",
    "node-v100": "v100_retired_pages",
}
CPU_HOST = "node-cpu"
FLEET = "fleet"  # the fleet dashboard's scenario: every filter at All


def uuid(host: str, index: int) -> str:
    k = list(SCENARIOS).index(host) + 1
    return f"GPU-5e1f0c2a-7b3d-4c8e-9a10-{k:04d}0000000{index}"


def _rewrite_uuids(text: str, host: str) -> str:
    k = list(SCENARIOS).index(host) + 1
    return text.replace(UUID_PART, f"-9a10-{k:04d}")


def _rows(scan_id: str, ts: float, slow: dict[tuple[str, int], float], hosts) -> list[dict]:
    """Probe results as an agent uploads them (5 samples per device; ``slow``: (host, index) -> factor)."""
    from straggler.records import result_id

    rows = []
    for host in hosts:
        model = V100 if host == "node-v100" else H100
        for i in range(8):
            for k in range(5):
                # a fixed, tiny sample-to-sample spread: the same numbers on every run
                value = (300.0 if model == V100 else 700.0) * slow.get((host, i), 1.0) * (1 + 0.001 * ((i + k) % 3 - 1))
                row = {
                    "ts": ts + k,
                    "scan_id": scan_id,
                    "host": host,
                    "gpu": uuid(host, i),
                    "index": i,
                    "model": model,
                    "probe": "matmul",
                    "settings": "n=8192,dtype=bf16",
                    "sample": k,
                    "value": value,
                    "unit": "TFLOP/s",
                }
                row["id"] = result_id(row)
                rows.append(row)
    return rows


class StaticExporter:
    """A stand-in dcgm-exporter: serves one recorded-format text file at /metrics."""

    def __init__(self, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # (http.server's name)
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                if self.path == "/metrics":
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _test_rules(tmp) -> str:
    """The production rules with every `for:` shortened to FOR_S; nothing else changes."""
    text, n = re.subn(r"(?m)^(\s+for: )\S+$", rf"\g<1>{int(FOR_S)}s", RULES.read_text())
    assert n >= 8
    path = tmp / "rules.yml"
    path.write_text(text)
    return str(path)


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str) -> list[dict]:
        r = self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        r = self.client.get(f"/api/v1/label/{label}/values", params={"match[]": match})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{match}: {body.get('error')}"
        return body["data"]

    def alerts(self) -> list[dict]:
        return self.client.get("/api/v1/alerts").json()["data"]["alerts"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prom")
    fixtures = tmp / "fixtures"
    fixtures.mkdir()
    from straggler.probes.fakenvml import FIXTURE_DIR

    for host, scenario in SCENARIOS.items():
        (fixtures / f"{scenario}.json").write_text(_rewrite_uuids((FIXTURE_DIR / f"{scenario}.json").read_text(), host))
    started = []
    collector = CollectorProcess(tmp, free_port())
    # the quarantine loop as a dry run (decide and audit, touch no scheduler) with the default breaker:
    # the first analysis drains node-thermal, the second refuses node-pcie (at most 1 of 6 hosts an hour)
    env_collector = {
        "STRAGGLER_COLLECTOR_ANALYSIS_DEBOUNCE_S": str(ANALYSIS_DEBOUNCE_S),
        "STRAGGLER_COLLECTOR_QUARANTINE_ACTION": "record",
    }
    os.environ.update(env_collector)
    try:
        collector.start()
    finally:
        for k in env_collector:
            del os.environ[k]
    started.append(collector)
    env = {"STRAGGLER_FIXTURES": str(fixtures)}
    agents = {}
    try:
        for host, scenario in SCENARIOS.items():
            # the V100 node's collector is unreachable: its agent counts poll errors
            extra = (
                {"collector_url": f"http://127.0.0.1:{free_port()}", "token_file": collector.token_file}
                if host == "node-v100"
                else {}
            )
            agents[host] = AgentProcess(tmp, name=host, env=env, telemetry=f"fake:{scenario}", **extra)
        # the CPU node runs (stand-in) probes whenever it is idle and uploads them to the collector
        agents[CPU_HOST] = AgentProcess(
            tmp,
            name=CPU_HOST,
            env={"FAKE_SCAN_EXTRA": json.dumps({"host": CPU_HOST})},
            telemetry="cpu",
            collector_url=collector.url,
            token_file=collector.token_file,
            probe_every_s=5.0,
            idle_util_pct=100.0,
            probe_command=[sys.executable, str(write_fake_scan(tmp))],
        )
        for a in agents.values():
            started.append(a.start())
        dcgm_text = _rewrite_uuids((ROOT / "tests/data/dcgm_exporter_h100.prom").read_text(), "node-thermal")
        dcgm = StaticExporter(dcgm_text.encode())
        started.append(dcgm)
        dcgm_job = yaml.safe_load((ROOT / "dashboards/dcgm-exporter-scrape.yml").read_text())["scrape_configs"][0]
        dcgm_job["static_configs"] = [{"targets": [f"127.0.0.1:{dcgm.port}"]}]
        lab = {"cluster": "lab"}
        dead_agent, dead_collector = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = {
            "global": {
                "scrape_interval": f"{int(SCRAPE_S * 1000)}ms",
                "evaluation_interval": f"{int(SCRAPE_S * 1000)}ms",
                "scrape_timeout": f"{int(SCRAPE_S * 1000)}ms",
            },
            "rule_files": [_test_rules(tmp)],
            "scrape_configs": [
                {
                    "job_name": "straggler-agent",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{a.port}" for a in agents.values()] + [dead_agent], "labels": lab}
                    ],
                },
                {
                    "job_name": "straggler-collector",
                    "static_configs": [{"targets": [f"127.0.0.1:{collector.port}", dead_collector], "labels": lab}],
                },
                dcgm_job,
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp / "prometheus.log", "wb")
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        prom = Prom(f"http://127.0.0.1:{port}")

        health = {}

        def targets_up():
            try:
                active = prom.client.get("/api/v1/targets").json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            health.clear()
            health.update({t["scrapeUrl"].split("/")[2]: (t["health"], t["lastError"]) for t in active})
            live = [f"127.0.0.1:{a.port}" for a in agents.values()] + [
                f"127.0.0.1:{collector.port}",
                f"127.0.0.1:{dcgm.port}",
            ]
            return all(health.get(t, ("",))[0] == "up" for t in live) and all(
                health.get(t, ("",))[0] == "down" for t in (dead_agent, dead_collector)
            )

        try:
            try:
                wait_until(targets_up, DEADLINE_S, "every live target up, the dead ones down")
            except AssertionError as e:
                raise AssertionError(f"{e}: {health}; {(tmp / 'prometheus.log').read_text()[-2000:]}") from None
            # Two analyses: four past scans, then a fifth in which node-pcie GPU 2 lost 5% (degraded).
            # node-thermal GPU 3 is slow in both (held: two analyses). node-lost delivered nothing for 3 days.
            now = time.time()
            hosts = [h for h in SCENARIOS if h != "node-lost"]
            thermal = {("node-thermal", 3): 0.85}
            first = [r for s in range(4) for r in _rows(f"s{s}", now - (5 - s) * 3600, thermal, hosts)]
            first += [
                r for s in range(4) for r in _rows(f"old{s}", now - 3 * 86400 - (5 - s) * 3600, {}, ["node-lost"])
            ]
            collector.post("/api/v1/results", {"host": "test", "results": first})
            wait_until(
                lambda: prom.query('straggler_gpu_flagged_scans{host="node-thermal",gpu="3"} == 1'),
                DEADLINE_S,
                "the first analysis flags node-thermal GPU 3, scraped",
            )
            second = _rows("s4", now - 600, {**thermal, ("node-pcie", 2): 0.95}, hosts)
            collector.post("/api/v1/results", {"host": "test", "results": second})
            wait_until(
                lambda: prom.query('straggler_gpu_flagged_scans{host="node-thermal",gpu="3"} == 2'),
                DEADLINE_S,
                "the second analysis flags it again, scraped",
            )
            # the CPU node ran a probe and uploaded it (its probe-run annotation, the upload panels)
            wait_until(
                lambda: (
                    prom.query("increase(straggler_agent_probe_runs_total[2m]) > 0")
                    and prom.query("straggler_agent_uploaded_results_total > 0")
                ),
                DEADLINE_S + 5.0,
                "a probe run of the CPU node uploaded, scraped",
            )  # + its probe_every_s
            yield prom, agents, collector
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    finally:
        for s in reversed(started):
            s.close()


def _expected_alerts():
    """(alert, labels it must carry) that must fire."""
    return [
        ("GPUStraggler", {"host": "node-thermal", "gpu": "3", "uuid": uuid("node-thermal", 3)}),
        ("GPUDegraded", {"host": "node-pcie", "gpu": "2"}),
        ("GPUProbeResultsStale", {"host": "node-lost", "gpu": "0"}),
        ("GPULost", {"host": "node-lost", "gpu": "7", "status": "lost"}),
        ("GPUThermalSlowdown", {"host": "node-thermal", "gpu": "3"}),
        ("GPUPCIeLinkDegraded", {"host": "node-pcie", "gpu": "2"}),
        ("GPUUncorrectableECC", {"host": "node-ecc", "gpu": "4"}),
        ("GPURemappedRowsPending", {"host": "node-ecc", "gpu": "4"}),
        ("GPURemappedRowsFailed", {"host": "node-ecc", "gpu": "4"}),
        ("GPURetiredPages", {"host": "node-v100", "gpu": "1"}),
        ("GPUCriticalXID", {"host": "node-xid", "gpu": "2", "xid": "48"}),
        ("StragglerAgentDown", {"job": "straggler-agent"}),
        ("StragglerAgentErrors", {"source": "poll"}),
        ("StragglerCollectorDown", {"job": "straggler-collector"}),
        ("StragglerCircuitBreakerTripped", {"job": "straggler-collector"}),
    ]


def test_every_alert_fires_in_its_scenario_on_a_real_prometheus(stack):
    prom, agents, _ = stack
    expected = _expected_alerts()

    def firing():
        got = [a for a in prom.alerts() if a["state"] == "firing"]
        return (
            got
            if all(
                any(a["labels"]["alertname"] == name and labels.items() <= a["labels"].items() for a in got)
                for name, labels in expected
            )
            else None
        )

    got = wait_until(firing, DEADLINE_S, "every alert firing")
    rules = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert names == {n for n, _ in expected}
    for a in got:
        labels, summary = a["labels"], a["annotations"]["summary"]
        if "host" in labels:  # names the host and the GPU
            assert labels["host"] in summary and f"GPU {labels['gpu']}" in summary, summary
        if labels["alertname"].startswith("Straggler"):
            assert labels["instance"] in summary, summary
    # what must not fire: one analysis is not a held straggler; an application XID is not critical;
    # the healthy nodes raise nothing about their GPUs
    assert not [a for a in got if a["labels"]["alertname"] == "GPUStraggler" and a["labels"]["host"] == "node-pcie"]
    assert not [a for a in got if a["labels"].get("xid") == "13"]
    assert {a["labels"]["host"] for a in got if "host" in a["labels"]} <= set(SCENARIOS)
    straggler = next(a for a in got if a["labels"]["alertname"] == "GPUStraggler")
    assert "about 17" in straggler["annotations"]["description"]  # its cost, 1 / 0.85 - 1
    agent_errors = next(a for a in got if a["labels"]["alertname"] == "StragglerAgentErrors")
    assert agent_errors["labels"]["instance"] == f"127.0.0.1:{agents['node-v100'].port}"


def _scenario_vars(dash: str, scenario: str) -> dict[str, str]:
    base = {
        "cluster": ".*",
        "model": ".*",
        "host": ".*",
        "probe": ".*",
        "gpu": ".*",
        "uuid": ".*",
        "__rate_interval": "10s",
        "__range": "5m",
    }
    return base if scenario == FLEET else {**base, "host": scenario}


def test_every_dashboard_query_parses_and_returns_data_where_the_readme_says(stack):
    prom, _, _ = stack
    claims = readme_panels()
    seen = {}
    for dash in DASHBOARDS:
        scenarios = [FLEET] if "fleet" in dash.stem else [*SCENARIOS, CPU_HOST]
        for kind, title, expr in dashboard_queries(dash):
            hits = []
            for scenario in scenarios:
                q = substitute(expr, _scenario_vars(dash.stem, scenario))
                if kind == "variable":
                    m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
                    data = prom.label_values(m.group(2), m.group(1))
                else:
                    data = prom.query(q)
                if data:
                    hits.append(scenario)
            seen.setdefault((dash.stem, title), []).append((expr, hits))
    missing = []
    for (stem, title), results in seen.items():
        claim = claims[(stem, title)]["data"]
        for expr, hits in results:
            if claim not in hits:
                missing.append((stem, title, claim, expr, hits))
    assert not missing, "\n".join(map(str, missing))


def test_every_rule_expression_parses_and_returns_data(stack):
    prom, _, _ = stack
    rules = yaml.safe_load(RULES.read_text())
    empty = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            data = prom.query(rule["expr"])
            if not data:
                empty.append(rule.get("record") or rule["alert"])
    assert not empty, f"no data: {empty}"
    by_cause = prom.query("straggler:fleet_stragglers_by_cause:count")
    flagged = prom.query("count(straggler_gpu_straggler_any == 1)")
    # the pie counts devices: its slices add up to the flagged devices, one slice per cause
    assert sum(float(s["value"][1]) for s in by_cause) == float(flagged[0]["value"][1]) == 2.0


def test_readme_dcgm_queries_join_on_uuid_through_the_documented_relabelling(stack):
    prom, _, _ = stack
    text = (ROOT / "dashboards/README.md").read_text()
    block = text.split("<!-- dcgm-queries -->", 1)[1].split("```", 2)[1]
    queries = [line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert len(queries) >= 3
    for q in queries:
        assert prom.query(q), q
    power = prom.query(queries[0])  # dcgm power of every straggler
    assert {(s["metric"]["host"], s["metric"]["uuid"]) for s in power} == {("node-thermal", uuid("node-thermal", 3))}
    assert float(power[0]["value"][1]) == 611.0  # the stand-in exporter's value for that GPU
    # without the relabelling, the join finds nothing: dcgm-exporter's own label is UUID
    assert not prom.query('DCGM_FI_DEV_POWER_USAGE{uuid=""} * on (uuid) group_left (host) straggler_gpu_straggler_any')
