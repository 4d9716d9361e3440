"""Grafana dashboards and Prometheus rules: valid (the real promtool; tsc against Grafana's published
dashboard schema), they only reference metrics the agent and the collector export, every panel has
its variables, units and thresholds, and dashboards/README.md answers for every panel. The real
Prometheus runs them in tests/dashboards/test_prometheus_server.py (helpers for it are here)."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT, require_tool, skip_or_fail

GRAFANA = ROOT / "dashboards" / "grafana"
DASHBOARDS = (GRAFANA / "straggler-fleet.json", GRAFANA / "straggler-node.json")
RULES = ROOT / "dashboards" / "prometheus-rules.yml"
README = ROOT / "dashboards" / "README.md"
SCHEMA = ROOT / "dashboards" / "schema"
METRIC = re.compile(r"\bstraggler[_:][a-z_0-9]+(?::[a-z_0-9]+)*")  # exported names and recorded ones (with a colon)
# panel type -> its options type in dashboards/schema/types.ts
PANEL_TYPES = {
    "stat": "StatPanel",
    "timeseries": "TimeSeriesPanel",
    "table": "TablePanel",
    "piechart": "PieChartPanel",
    "bargauge": "BarGaugePanel",
    "state-timeline": "StateTimelinePanel",
}


def load(path):
    return json.loads(path.read_text())


def dashboard_queries(path):
    """(kind, title, expr) of every panel target, template variable and annotation of a dashboard."""
    dash = load(path)
    out = [("panel", p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    out += [
        ("variable", f"${v['name']}", v["query"]["query"]) for v in dash["templating"]["list"] if v["type"] == "query"
    ]
    out += [("annotation", f"annotation: {a['name']}", a["expr"]) for a in dash["annotations"]["list"]]
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for these dashboards: $name and ${name}."""
    return re.sub(r"\$\{?(__\w+|\w+)\}?", lambda m: values[m.group(1)], expr)


def readme_panels() -> dict[tuple[str, str], dict]:
    """dashboards/README.md's table rows per dashboard: (dashboard file stem, title) -> question, data."""
    out, stem = {}, None
    for line in README.read_text().splitlines():
        m = re.match(r"### .*`grafana/([\w-]+)\.json`", line)
        if m:
            stem = m.group(1)
        elif stem and line.startswith("| ") and not line.startswith("| Panel") and not line.startswith("|--"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[(stem, cells[0].strip("`"))] = {"question": cells[1], "data": cells[-1].strip("`")}
    return out


def _exported_names() -> set[str]:
    names = set()
    for src in ("agent/exporter.py", "collector/metrics.py", "collector/quarantine.py"):
        names |= set(re.findall(r'"(straggler_[a-z_]+)"', (ROOT / src).read_text()))
    return names


def _referenced(text: str) -> set[str]:
    # Counters are exposed with a `_total` suffix; histograms add _bucket/_sum/_count. Recorded
    # names (with a colon) are checked against the rules' `record:` names.
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    names = set(METRIC.findall(text))
    assert {m for m in names if ":" in m} <= recorded, sorted({m for m in names if ":" in m} - recorded)
    return {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in names if ":" not in m}


def test_rules_check_and_unit_tests_pass():
    promtool = require_tool("promtool")
    for args in (["check", "rules", str(RULES)], ["test", "rules", "dashboards/tests/rules_test.yml"]):
        out = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_rule_unit_tests_can_fail(tmp_path):
    promtool = require_tool("promtool")
    broken = tmp_path / "rules.yml"
    held = "(straggler_gpu_flagged_scans >= 2)"
    assert held in RULES.read_text()
    broken.write_text(RULES.read_text().replace(held, "(straggler_gpu_flagged_scans >= 1)"))  # from one scan
    test = tmp_path / "t.yml"
    test.write_text(
        (ROOT / "dashboards/tests/rules_test.yml").read_text().replace("../prometheus-rules.yml", str(broken))
    )
    out = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "GPUStraggler" in out.stdout + out.stderr


def test_every_alert_has_a_summary_naming_what_and_what_to_do():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert len(rules) >= 15
    for r in rules:
        summary = r["annotations"]["summary"]
        if "straggler_gpu" in r["expr"] or "xid" in r["expr"]:
            assert "{{ $labels.host }} GPU {{ $labels.gpu }}" in summary, r["alert"]
        else:
            assert "{{ $labels.instance }}" in summary, r["alert"]
        assert ": " in summary and r["labels"]["severity"] in ("info", "warning", "critical"), r["alert"]


def test_everything_referenced_is_exported():
    exported = _exported_names()
    for path in (*DASHBOARDS, RULES):
        missing = _referenced(path.read_text()) - exported
        assert not missing, f"{path.name} uses metrics nobody exports: {sorted(missing)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_has_datasource_variables_units_and_thresholds(path):
    dash = load(path)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    wanted = ("cluster", "host") + (("model", "probe") if "fleet" in path.stem else ("gpu", "uuid", "probe"))
    assert set(wanted) <= set(variables)
    for panel in dash["panels"]:
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel["description"].endswith("?") or "?" in panel["description"], title  # the question it answers
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] and defaults["thresholds"]["steps"], title
        assert panel["targets"], title
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            expr = t["expr"]
            assert METRIC.search(expr) or "up{" in expr, expr
            # every selector of a straggler series takes the cluster, and a device series the host;
            # in a join, one side's filters select the result (agent self metrics carry no host:
            # they are joined to it through straggler_telemetry_backend_up)
            join = re.search(r"\b(on|group_left|group_right) ?\(", expr) is not None
            for name, labels in re.findall(
                r"\b(straggler[_:](?:gpu|node|agent|fleet|telemetry)[\w:]*)(\{[^}]*\})?", expr
            ):
                if name.startswith("straggler_agent") or (join and not labels):
                    continue
                assert "$cluster" in labels, (title, name)
                if re.match(r"straggler_(gpu|node|telemetry)", name):  # (recorded names may aggregate hosts away)
                    assert "$host" in labels, (title, name)
            assert "$cluster" in expr and ("$host" in expr or not re.search(r"straggler[_:](gpu|node|agent)", expr)), (
                expr
            )
    for v in variables.values():
        if v["type"] == "query" and v["name"] != "cluster":
            assert "$cluster" in v["query"]["query"], v["name"]


def test_flagged_devices_link_to_the_node_view_by_uid():
    fleet, node = (load(p) for p in DASHBOARDS)
    table = next(p for p in fleet["panels"] if p["title"].startswith("Flagged devices"))
    links = [
        link["url"]
        for o in table["fieldConfig"]["overrides"]
        for prop in o["properties"]
        if prop["id"] == "links"
        for link in prop["value"]
    ]
    assert links and all(u.startswith(f"/d/{node['uid']}/") for u in links)
    assert "var-host=${__data.fields.host}" in links[0] and "var-uuid=${__data.fields.uuid}" in links[0]
    node_vars = {v["name"] for v in node["templating"]["list"]}
    for url in links:
        assert {m for m in re.findall(r"var-(\w+)=", url)} <= node_vars
    # the link's fields are columns of the merged frame: every query of the table groups by them
    for t in table["targets"]:
        assert t["expr"].startswith("max by (host, uuid, gpu, model, probe, settings, cause, basis)"), t["expr"]


def test_the_pie_counts_devices_not_device_probe_pairs():
    pie = next(p for p in load(DASHBOARDS[0])["panels"] if p["type"] == "piechart")
    (target,) = pie["targets"]
    assert target["expr"].startswith("count by (cause) (straggler_gpu_straggler_any{")


def test_the_rule_tests_cause_labels_are_ones_the_collector_exports():
    """The `cause` labels of dashboards/tests/rules_test.yml are values of the collector's label (the
    analysis' cause names, analysis/causes.py NAMES, plus "other" and "none"), so the pie and the
    alerts are tested on names a real fleet shows."""
    from straggler.analysis.causes import NAMES
    from straggler.collector.metrics import CAUSES

    text = (ROOT / "dashboards/tests/rules_test.yml").read_text()
    used = set(re.findall(r'cause="(\w+)"', text)) | set(re.findall(r"cause: (\w+)", text))
    assert used and used <= set(CAUSES) == {*NAMES, "other", "none"}, used - set(CAUSES)


def test_provisioning_file_serves_both_dashboards():
    prov = yaml.safe_load((ROOT / "dashboards/provisioning/straggler-dashboards.yml").read_text())
    (provider,) = prov["providers"]
    assert prov["apiVersion"] == 1 and provider["type"] == "file" and provider["options"]["path"]
    assert {load(p)["uid"] for p in DASHBOARDS} == {"straggler-fleet", "straggler-node"}


def test_readme_answers_for_every_panel_variable_and_annotation():
    claims = readme_panels()
    for path in DASHBOARDS:
        dash = load(path)
        titles = {title for _, title, _ in dashboard_queries(path)}
        mine = {t for (stem, t) in claims if stem == path.stem}
        assert mine == titles, (path.stem, sorted(titles ^ mine))
        for p in dash["panels"]:  # the README's question is the panel's description, word for word
            assert claims[(path.stem, p["title"])]["question"] == p["description"], p["title"]


def _ts_module(path) -> str:
    """The dashboard as a TypeScript object literal (unknown keys are errors), each panel checked
    against its own plugin's options and field config."""
    dash = load(path)
    panels = dash.pop("panels")
    kinds = sorted({PANEL_TYPES[p["type"]] for p in panels})
    body = ",\n".join(f"({json.dumps(p)} satisfies {PANEL_TYPES[p['type']]})" for p in panels)
    return (
        f"import type {{ StragglerDashboard, {', '.join(kinds)} }} from '../types';\n"
        f'export const dashboard: StragglerDashboard = {json.dumps(dash)[:-1]}, "panels": [\n{body}\n]}};\n'
    )


def _tsc() -> str:
    tsc = SCHEMA / "node_modules" / ".bin" / "tsc"
    require_tool("node")
    if not tsc.exists():
        skip_or_fail("dashboards/schema has no node_modules: run `npm ci --prefix dashboards/schema` (.ci/run does)")
    return str(tsc)


def _typecheck(modules: dict[str, str]):
    gen = SCHEMA / "gen"
    shutil.rmtree(gen, ignore_errors=True)
    gen.mkdir()
    for name, text in modules.items():
        (gen / f"{name}.ts").write_text(text)
    return subprocess.run([_tsc(), "-p", str(SCHEMA)], capture_output=True, text=True, timeout=300)


def test_dashboards_type_check_against_grafanas_published_schema():
    assert set(PANEL_TYPES) >= {p["type"] for d in DASHBOARDS for p in load(d)["panels"]}
    out = _typecheck({p.stem.replace("-", "_"): _ts_module(p) for p in DASHBOARDS})
    assert out.returncode == 0, out.stdout + out.stderr
    # the check can fail: an unknown key, a wrong enum value, a wrong type
    fleet = load(DASHBOARDS[0])
    bad = json.loads(json.dumps(fleet))
    bad["panels"][0]["options"]["colorMode"] = "blinking"
    bad["panels"][1]["fieldConfig"]["defaults"]["thresholds"]["mode"] = "absolut"
    bad["panels"][2]["gridPos"]["w"] = "6"
    bad["templating"]["list"][1]["refresh"] = 7
    path = SCHEMA / "gen" / "bad.json"
    path.write_text(json.dumps(bad))
    out = _typecheck({"bad": _ts_module(path)})
    errors = out.stdout + out.stderr
    assert out.returncode != 0 and errors.count("error TS") == 4, errors
    assert '"blinking"' in errors and '"absolut"' in errors, errors
