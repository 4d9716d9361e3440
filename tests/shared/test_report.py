"""The fleet report (`straggler analyze --report`, `straggler scan --report`, the collector's /report),
opened in a real headless Chromium with the network off: it renders without a console error, shows
the flagged devices, their causes and what to do, and reaches for nothing outside the file."""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil

import httpx
import numpy as np
import pandas as pd
import pytest

from chromium import Chromium
from conftest import require_tool, run_cmd, scan_timeout_s
from straggler.analysis import analyze
from straggler.analysis.causes import ACTIONS
from straggler.records import result_id

MODEL = "NVIDIA H100 80GB HBM3"
TOKEN = "report-token-0123456789abcdef"
THERMAL = "GPU-0305"  # node03 index 5: 15% slow, thermal throttling in the current scan
SLOW_NODE = "node06"  # every device 10% slow in the current scan
SCANS = 4


def fleet_rows(hosts: int = 8, per_host: int = 8, scans: int = SCANS, samples: int = 5, seed: int = 3) -> list[dict]:
    """Every sample of ``scans`` scans of matmul and membw (the last is the current one)."""
    rng = np.random.default_rng(seed)
    silicon = 1 + rng.normal(0, 0.004, hosts * per_host)
    rows = []
    for s in range(scans):
        now = s == scans - 1
        for i in range(hosts * per_host):
            host, idx = f"node{i // per_host:02d}", i % per_host
            gpu = f"GPU-{i // per_host:02d}{idx:02d}"
            rate = silicon[i] * (0.85 if now and gpu == THERMAL else 0.90 if now and host == SLOW_NODE else 1.0)
            for probe, nominal, unit in (("matmul", 780.0, "TFLOP/s"), ("membw", 3000.0, "GB/s")):
                for k in range(samples):
                    hot = now and gpu == THERMAL
                    row = {
                        "ts": 1_790_000_000.0 + 86400 * s + k,
                        "scan_id": f"scan{s}",
                        "host": host,
                        "gpu": gpu,
                        "index": idx,
                        "model": MODEL,
                        "driver": "560.35.03",
                        "probe": probe,
                        "settings": "default",
                        "sample": k,
                        "duration_s": 1.0,
                        "unit": unit,
                        "value": nominal * rate * (1 + rng.normal(0, 0.004)),
                        "sm_clock_mhz": 1650.0 if hot else 1980.0,
                        "sm_clock_max_mhz": 1980.0,
                        "power_w": 560.0 if hot else 690.0,
                        "power_limit_w": 700.0,
                        "temp_c": 91.0 if hot else 64.0,
                        "throttle_reasons": "sw_thermal_slowdown=0.600" if hot else "0",
                    }  # NVML mask: none
                    row["id"] = result_id(row)
                    rows.append(row)
    return rows


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module (it starts in seconds, but not for free on a busy machine)."""
    exe = require_tool("chromium")
    with Chromium(exe, tmp_path_factory.mktemp("chromium") / "profile") as b:
        yield b


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """`straggler analyze current.csv --history past.parquet --report report.html`, run as a user runs it."""
    import sys

    d = tmp_path_factory.mktemp("analyze")
    df = pd.DataFrame(fleet_rows()).drop(columns=["id"])
    current, past = df[df["scan_id"] == f"scan{SCANS - 1}"], df[df["scan_id"] != f"scan{SCANS - 1}"]
    current.to_csv(d / "current.csv", index=False)
    past.to_parquet(d / "past.parquet", index=False)
    args = ["analyze", "current.csv", "--history", "past.parquet", "--report", "out/report.html"]
    proc = run_cmd([sys.executable, "-m", "straggler", *args], timeout_s=120, cwd=d)
    return proc, d / "out" / "report.html", shlex.join(["straggler", *args])


def test_analyze_report_is_one_self_contained_file_with_flagged_devices_causes_and_actions(analyzed):
    proc, path, command = analyzed
    assert proc.returncode == 1, proc.stderr  # stragglers found; the table is printed as without --report
    assert "STRAGGLER" in proc.stdout
    html = path.read_text()
    # nothing to fetch: no external src/href, no script, every fetch forbidden by the page's CSP
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert "<script" not in html and "default-src 'none'" in html
    assert "node03/5" in html and THERMAL in html and "thermal" in html
    assert all(f"{SLOW_NODE}/{i}" in html for i in range(8)) and "whole_node" in html
    for cause in ("thermal", "whole_node"):  # the docs' action for each cause shown (one source: causes.ACTIONS)
        assert ACTIONS[cause].replace("'", "&#x27;") in html
    assert f"<pre>{command}</pre>" in html  # the exact command that produced it
    # the thermal device in detail: its samples, its history over the 4 scans, its telemetry against its peers
    assert f"samples node03/5 {THERMAL} matmul" in html and f"history node03/5 {THERMAL} matmul" in html
    # the telemetry that names its cause, marked
    assert re.search(r"<tr class=cause><td>temp_c</td><td class=n>91</td><td class=n>64</td><td>thermal</td>", html)
    assert re.search(r"<tr class=cause><td>sw_thermal_slowdown</td><td class=n>0.6</td><td class=n>0</td>", html)
    assert "Nodes x devices" in html and "Performance classes" in html and "Job cost" in html


def test_analyze_report_renders_in_chromium_offline_without_errors(analyzed, browser, tmp_path):
    _, path, _ = analyzed
    page = browser.open(path.as_uri(), offline=True)
    assert page.errors == []
    assert page.requests == [path.as_uri()]  # the page loaded nothing else
    text = page.text
    assert "straggler fleet report" in text and "node03/5" in text and THERMAL in text
    assert page.evaluate("document.querySelectorAll('svg').length") >= 6  # every chart drew
    assert page.evaluate("document.querySelector('#d0 h3').textContent").startswith("node03/5")
    shot = page.screenshot(tmp_path / "report.png", width=1200, height=1500)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("STRAGGLER_REPORT_SCREENSHOT"):  # docs/img/report.png is made this way
        shutil.copy(shot, os.environ["STRAGGLER_REPORT_SCREENSHOT"])


def test_browser_check_sees_a_page_that_reaches_out(browser, tmp_path):
    # the check above can fail: a page that loads from the network, or whose script throws, is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="https://cdn.example.invalid/x.png"><script>no_such()</script></body></html>')
    page = browser.open(bad.as_uri(), offline=True)
    assert any("cdn.example.invalid" in u for u in page.requests)
    assert any("no_such" in e for e in page.errors) and any("load failed" in e for e in page.errors)


def test_report_draws_aggregates_not_one_element_per_device():
    """20,000 devices draw as bins and cells: far fewer SVG elements than devices."""
    from straggler.htmlreport import render_report

    rng = np.random.default_rng(0)
    n, k = 20_000, 3
    rate = 1 + rng.normal(0, 0.004, n)
    rate[rng.choice(n, 60, replace=False)] = 0.85
    df = pd.DataFrame(
        {
            "host": np.repeat([f"n{i // 8:04d}" for i in range(n)], k),
            "gpu": np.repeat([f"GPU-{i:05d}" for i in range(n)], k),
            "index": np.repeat(np.arange(n) % 8, k),
            "model": MODEL,
            "probe": "matmul",
            "settings": "default",
            "sample": np.tile(np.arange(k), n),
            "value": np.repeat(780 * rate, k) * (1 + rng.normal(0, 0.003, n * k)),
        }
    )
    res = analyze(df)
    assert res.summary["stragglers"] >= 50
    html = render_report(res.devices, res.summary, df, None, command="test")
    elements = len(re.findall(r"<(?:rect|circle|path|line|text)\b", html))
    assert elements < n / 4, elements
    assert len(html) < 2_000_000
    assert "the 40 worst nodes one per row, then the other 2460 in bands" in html


def test_scan_report_writes_the_scan_report(straggler_cmd, tmp_path):
    proc = run_cmd(
        [
            *straggler_cmd,
            "scan",
            "--probes",
            "matmul",
            "--duration",
            "1",
            "--samples",
            "3",
            "--max-rounds",
            "1",
            "--report",
            "scan.html",
        ],
        timeout_s=scan_timeout_s(("matmul",), 1, 3),
        cwd=tmp_path,
    )
    assert proc.returncode in (0, 1, 2), proc.stderr
    assert proc.returncode != 2 or "could not decide" in proc.stderr, proc.stderr
    html = (tmp_path / "scan.html").read_text()
    cores = sorted(os.sched_getaffinity(0))
    assert all(f"cpu{c}" in html for c in cores) and "matmul" in html
    assert (
        "<pre>straggler scan --probes matmul --duration 1 --samples 3 --max-rounds 1 --report scan.html</pre>" in html
    )


def test_report_that_cannot_be_written_is_one_line_after_the_table(analyzed, straggler_cmd, tmp_path):
    _, path, _ = analyzed
    (tmp_path / "f").write_text("a file, not a directory")
    proc = run_cmd(
        [*straggler_cmd, "analyze", str(path.parent.parent / "current.csv"), "--report", "f/r.html"],
        timeout_s=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "STRAGGLER" in proc.stdout  # the table was printed first
    (line,) = proc.stderr.strip().splitlines()
    assert line == "straggler: error: --report f/r.html: cannot write (f is not a directory)"


# --- the collector's /report -------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    from straggler.collector.service import BackgroundCollector
    from straggler.collector.settings import CollectorSettings

    db = tmp_path_factory.mktemp("collector") / "collector.db"
    settings = CollectorSettings(port=0, db_path=db, analysis_debounce_s=0.05, analysis_max_delay_s=1.0)
    with BackgroundCollector(settings, TOKEN) as srv:  # the real analysis engine
        with httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            rows = fleet_rows()
            for i in range(0, len(rows), 500):
                r = client.post("/api/v1/results", json={"host": "test", "results": rows[i : i + 500]})
                assert r.status_code == 200, r.text
            srv.collector.fleet.refresh()  # now, rather than after the debounce
            srv.client = client
            yield srv


def test_collector_report_needs_the_token(collector):
    url = collector.url + "/report"
    r = httpx.get(url, timeout=60)
    assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
    basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()  # what a browser sends after asking
    r = httpx.get(url, headers={"Authorization": f"Basic {basic}"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "node03/5" in r.text and "live fleet from the collector" in r.text
    assert httpx.get(collector.url + f"/report/gpu?gpu={THERMAL}", timeout=60).status_code == 401
    assert collector.client.get("/report/gpu", params={"gpu": "GPU-nope"}).status_code == 404


def test_collector_report_renders_in_chromium_with_history_views_linked(collector, browser):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    page = browser.open(collector.url + "/report", headers=auth)
    assert page.errors == []
    assert page.requests and all(u.startswith(collector.url) for u in page.requests)
    assert "node03/5" in page.text and THERMAL in page.text and f"{SLOW_NODE}/0" in page.text
    assert f"history node03/5 {THERMAL} matmul" in page.evaluate("document.documentElement.outerHTML")
    # the heatmap's cells of the worst nodes link to each device's history view too
    assert page.evaluate(f"document.querySelectorAll('svg a[href*=\"gpu={THERMAL}\"]').length") == 1
    link = page.evaluate(f"document.querySelector('table a[href*=\"gpu={THERMAL}\"]').href")
    assert link.startswith(collector.url + "/report/gpu?")
    view = browser.open(link, headers=auth)
    assert view.errors == []
    assert THERMAL in view.text and "straggler" in view.text and "matmul" in view.text and "membw" in view.text
    assert view.text.count("scan") >= SCANS  # a row per stored scan
    back = view.evaluate("document.querySelector('a').href")
    assert back == collector.url + "/report"


def test_docs_list_every_cause_with_its_action():
    """docs/analysis.md "Causes and what to do" is the table of causes.ACTIONS, word for word."""
    from conftest import ROOT

    text = (ROOT / "docs" / "analysis.md").read_text().split("## Causes and what to do", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", text, flags=re.M))
    assert rows == ACTIONS


def test_a_history_of_per_scan_summaries_draws_each_scans_median():
    """History given as per-scan summaries (docs/analysis.md): a flagged device's series shows
    each past scan's summary median, not its robust value (the one sample of its row)."""
    from straggler.htmlreport.model import build

    df = pd.DataFrame(fleet_rows())
    now = df[df["scan_id"] == f"scan{SCANS - 1}"]
    keys = ["host", "gpu", "index", "model", "probe", "settings"]
    summ = []
    for sid, scan in df[df["scan_id"] != f"scan{SCANS - 1}"].groupby("scan_id"):
        d = analyze(scan).devices
        summ.append(d[keys].assign(scan_id=sid, ts=scan["ts"].max(), value=d["value"] * 1.5, median=d["median"]))
    past = pd.concat(summ, ignore_index=True)
    res = analyze(now, past)
    report = build(res.devices, res.summary, now, past)
    entry = next(e for e in report.details if e["gpu"] == THERMAL and e["probe"] == "matmul")
    want = past[(past["gpu"] == THERMAL) & (past["probe"] == "matmul")].sort_values("scan_id")["median"]
    assert entry["series"]["value"][:-1] == pytest.approx(want.tolist())  # the current scan last
