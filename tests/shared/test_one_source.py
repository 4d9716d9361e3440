"""One source per concept (issue 8): each concept written once, every caller using that one.

Each test here fails if a second copy came back (a caller with its own version) or if the one
source stopped behaving as documented."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from straggler.jsonsafe import json_safe


# --- JSON-safe values (straggler/jsonsafe.py) ----------------------------------------------------


def test_json_safe_cleans_nan_inf_numpy_scalars_and_nesting():
    doc = {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": -math.inf,
        "f64": np.float64(1.5),
        "f32nan": np.float32("nan"),
        "i64": np.int64(7),
        "bool": np.bool_(True),
        "na": pd.NA,
        "nat": pd.NaT,
        1: "int key",
        "tuple": (np.float64("nan"), 2),
        "set": {3, 1},
        "nested": [{"x": [np.float64("inf"), {"y": np.int32(3)}]}],
        "s": "text",
        "none": None,
        "n": 4,
    }
    out = json_safe(doc)
    assert out == {
        "nan": None,
        "inf": None,
        "-inf": None,
        "f64": 1.5,
        "f32nan": None,
        "i64": 7,
        "bool": True,
        "na": None,
        "nat": None,
        "1": "int key",
        "tuple": [None, 2],
        "set": [1, 3],
        "nested": [{"x": [None, {"y": 3}]}],
        "s": "text",
        "none": None,
        "n": 4,
    }
    assert type(out["f64"]) is float and type(out["i64"]) is int and type(out["bool"]) is bool
    assert type(out["nested"][0]["x"][1]["y"]) is int
    json.dumps(out, allow_nan=False)  # writes as strict JSON
    assert math.isnan(doc["nan"]) and doc["tuple"][1] == 2  # the input is left as it was


def test_json_safe_cleans_numpy_and_pandas_columns():
    col = np.array([1.0, np.nan, np.inf, 2.5])
    assert json_safe(col) == [1.0, None, None, 2.5]
    assert json_safe(np.array([[1.0, np.nan], [np.inf, 0.5]], dtype=np.float32)) == [[1.0, None], [None, 0.5]]
    assert json_safe(np.arange(3)) == [0, 1, 2] and json_safe(np.array([True, False])) == [True, False]
    assert json_safe(pd.Series([1.0, None])) == [1.0, None]
    assert json_safe(pd.array([1, None], dtype="Int64").to_numpy(dtype=object)) == [1, None]
    nullable = json_safe(pd.Series(pd.array([3, None], dtype="Int64")))  # a nullable column, not floats
    assert nullable == [3, None] and type(nullable[0]) is int
    assert json_safe(pd.Series(pd.array(["a", None], dtype="string"))) == ["a", None]
    assert json_safe(pd.Series(pd.array([True, None], dtype="boolean"))) == [True, None]
    assert json_safe(np.array(["a", None], dtype=object)) == ["a", None]
    assert all(type(x) is float for x in json_safe(np.array([1.0, 2.0], dtype=np.float32)))


def test_every_json_writer_uses_the_one_json_safe():
    """The agent's spool, the scan verdict, the scan command and the collector's fleet view clean
    with the same function (no copy of their own)."""
    import straggler.agent.spool as spool
    import straggler.collector.fleet as fleet
    import straggler.scanverdict as report

    for mod in (spool, fleet, report):
        assert mod.json_safe is json_safe, mod.__name__
        assert not hasattr(mod, "_clean"), mod.__name__


def test_the_agent_spool_keeps_numpy_values_and_nested_nans_as_json(tmp_path):
    from straggler.agent.spool import Spool

    sp = Spool(tmp_path / "spool.sqlite")
    sp.add_results(
        [
            {
                "ts": np.float64(1.0),
                "scan_id": "s",
                "host": "h",
                "gpu": "g",
                "probe": "matmul",
                "settings": "x",
                "sample": np.int64(0),
                "value": np.float32(2.0),
                "power_w": float("nan"),
                "extra": [np.inf, 1],
            }
        ]
    )
    (row,) = sp.pending_results(10)
    assert row["sample"] == 0 and row["value"] == 2.0 and row["power_w"] is None and row["extra"] == [None, 1]


# --- cause names (analysis/causes.py NAMES) -------------------------------------------------------


def test_explain_gives_only_the_named_causes():
    """Every cause explain() can append is in causes.NAMES (so it has an action, a text and a label)."""
    import inspect
    import re

    from straggler.analysis import causes

    given = set(re.findall(r'c\.append\("(\w+)"\)', inspect.getsource(causes.explain))) | {causes.UNEXPLAINED}
    assert given == set(causes.NAMES) == set(causes.ACTIONS) == set(causes.TEXT)


def test_every_cause_is_its_own_metric_label_and_cli_text_never_other():
    from straggler.analysis import causes
    from straggler.collector import metrics

    assert metrics.CAUSES == (*causes.NAMES, "other", "none")  # built from the one list, not kept by hand
    for name in causes.NAMES:
        assert metrics.cause_label([name]) == name
    assert metrics.cause_label([]) == causes.UNEXPLAINED and metrics.cause_label(["brand_new"]) == "other"
    import straggler.commands.analyze as analyze_cmd

    assert not hasattr(analyze_cmd, "CAUSE_TEXT")  # the CLI words causes with causes.TEXT


# --- token files (straggler/token.py) -------------------------------------------------------------


def _token_files(tmp_path):
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "latin").write_bytes(b"s\xe9cret-token-123456\n")
    (tmp_path / "accent").write_text("s\u00e9cret-token-123456\n", encoding="utf-8")
    return {
        "missing": (tmp_path / "missing", "cannot read {p}: No such file or directory"),
        "empty": (tmp_path / "empty", "{p} is empty"),
        "not utf-8": (tmp_path / "latin", "cannot read {p}: not UTF-8 text"),
        "not ascii": (
            tmp_path / "accent",
            "{p} holds characters other than printable ASCII (an HTTP header cannot carry them)",
        ),
    }


def test_every_token_reader_says_the_same_one_line(tmp_path, capsys):
    """The agent, the collector and the CLI commands (scan, quarantine, gate) read a token file with
    straggler.token.read_token: the same checks, the same one-line error, only the name of where the
    path came from differs (the config key token_file, the flag --token-file)."""
    from straggler.agent.uploader import auth_headers, token_problem
    from straggler.cli import main
    from straggler.collector.settings import CollectorSettings, load_token
    from straggler.errors import ConfigError

    for kind, (path, why) in _token_files(tmp_path).items():
        why = why.format(p=path)
        assert token_problem(path) == f"token_file: {why}", kind
        with pytest.raises(OSError, match="^token_file: "):
            auth_headers(path)
        with pytest.raises(ConfigError) as e:
            load_token(CollectorSettings(token_file=path), env={})
        assert e.value.problems == [f"token_file: {why}"], kind
        for argv in (
            ["scan", "--collector", "http://127.0.0.1:9", "--token-file", str(path)],
            [
                "quarantine",
                "drain",
                "n1",
                "--reason",
                "x",
                "--collector",
                "http://127.0.0.1:9",
                "--token-file",
                str(path),
            ],
            ["gate", "--collector", "http://127.0.0.1:9", "--token-file", str(path), "--probes", "none"],
        ):
            with pytest.raises(SystemExit) as ex:
                main(argv)
            assert ex.value.code == 2, (kind, argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"straggler: error: --token-file: {why}"], (kind, argv, err)


def test_a_good_token_reads_the_same_everywhere(tmp_path):
    from straggler.agent.uploader import auth_headers, token_problem
    from straggler.collector.settings import CollectorSettings, load_token
    from straggler.token import read_token

    path = tmp_path / "token"
    path.write_text("  0123456789abcdef-token \n")
    assert read_token(path) == "0123456789abcdef-token" == load_token(CollectorSettings(token_file=path), env={})
    assert token_problem(path) is None and auth_headers(path) == {"Authorization": "Bearer 0123456789abcdef-token"}


# --- scan ids and node states (straggler/scanproto.py) --------------------------------------------

SCAN_ID_FORMAT = r"\d{8}T\d{6}Z(-[A-Za-z0-9._-]+)*-[0-9a-f]{8}"


def _scan_plan_module():
    """Where the local scan's plan (settings, default durations, scan id) lives: probes/plan.py once
    the runners share one (issue 8 item 2), else probes/runner.py."""
    import importlib
    import importlib.util

    name = "straggler.probes.plan" if importlib.util.find_spec("straggler.probes.plan") else "straggler.probes.runner"
    return importlib.import_module(name)


def test_every_scan_id_maker_uses_the_one_format(tmp_path):
    """A local scan (probes/runner), an agent's own scan and a collector's cluster scan get their ids
    from scanproto.new_scan_id: one format, always a valid scan id (odd host names included)."""
    import asyncio
    import re

    import straggler.agent.daemon as daemon
    from straggler.collector.scans import ScanBoard
    from straggler.collector.store import Store
    from straggler.scanproto import SCAN_ID, new_scan_id, scan_id_problem

    runner = _scan_plan_module()
    assert runner.new_scan_id is new_scan_id and daemon.new_scan_id is new_scan_id
    ids = {
        "plain": new_scan_id(now=0),
        "words": new_scan_id("node/7 a", "retest", now=0),
        "long": new_scan_id("h" * 300),
        "runner": runner.new_scan_id("we:ird host"),
    }
    assert ids["plain"].startswith("19700101T000000Z-") and ids["words"].startswith("19700101T000000Z-node_7_a-retest-")
    board = ScanBoard(
        Store(tmp_path / "c.db"), agent_seen_s=60.0, offer_grace_s=5.0, run_limit_s=900.0, retention_s=86400.0
    )
    ids["collector"] = asyncio.run(board.create(["matmul"], 1.0, ["n1"], 10.0))["scan_id"]
    for kind, sid in ids.items():
        assert re.fullmatch(SCAN_ID_FORMAT, sid) and SCAN_ID.fullmatch(sid) and scan_id_problem(sid) is None, (
            kind,
            sid,
        )
    assert "-we_ird_host-" in ids["runner"]


def test_scan_id_problem_is_the_one_check():
    import straggler.agent.scanspec as scanspec
    import straggler.agent.uploader as uploader
    from straggler.scanproto import scan_id_problem

    assert scanspec.scan_id_problem is scan_id_problem and uploader.scan_id_problem is scan_id_problem
    assert not hasattr(scanspec, "SCAN_ID")
    for bad in ("../x", ".hidden", "-x", "a/b", "", "x" * 129, 7):
        assert scan_id_problem(bad), bad


def test_straggler_scan_refuses_a_scan_id_that_is_not_one(capsys):
    from straggler.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["scan", "--device", "cpu", "--scan-id", "../../victim"])
    assert ex.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("straggler: error: --scan-id: scan_id '../../victim' is not 1-128 letters")


def test_final_states_are_one_tuple_in_the_client_the_book_the_store_and_the_models(tmp_path):
    """A node's final state is never left: the store's SQL takes FINAL_STATES as parameters; the
    client, the scan book and the scan command read the same tuple; the API models list NODE_STATES."""
    import typing

    import straggler.collector.client as client
    import straggler.collector.models as models
    import straggler.collector.scans as scans
    from straggler.collector.store import Store
    from straggler.scanproto import FINAL_STATES, NODE_STATES

    assert client.FINAL_STATES is FINAL_STATES and scans.FINAL_STATES is FINAL_STATES
    assert typing.get_args(models.NodeState) == NODE_STATES
    assert typing.get_args(models.ScanView.model_fields["state"].annotation) == NODE_STATES
    assert typing.get_args(models.ScanStatus.model_fields["state"].annotation) == NODE_STATES[1:]
    assert set(FINAL_STATES) < set(NODE_STATES)
    store = Store(tmp_path / "c.db")
    scan = {
        "scan_id": "20261201T000000Z-0000beef",
        "created_ts": 1.0,
        "start_at": 2.0,
        "probes": ["matmul"],
        "duration_s": 1.0,
        "hosts": ["a", "b"],
    }
    store.create_scan(scan)
    for host, final in zip("ab", FINAL_STATES):
        assert store.set_node_state(scan["scan_id"], host, "running", None, 3.0)
        assert store.set_node_state(scan["scan_id"], host, final, None, 4.0)
        assert not store.set_node_state(scan["scan_id"], host, "running", None, 5.0)  # a final state is never left
    assert store.get_scan(scan["scan_id"])["nodes"] == dict(zip("ab", FINAL_STATES))


# --- the throttle-string grammar (straggler/records.py) -------------------------------------------


def test_one_throttle_reader_strict_and_tolerant():
    """records.read_throttle is the grammar (strict: ValueError on a cell it cannot read);
    records.parse_throttle its one tolerant form (None where unreadable, unknown names left out),
    which the analysis' causes use; analysis/validate.py keeps no reader of its own."""
    import straggler.analysis.causes as causes
    import straggler.analysis.validate as validate
    from straggler import records

    assert validate.read_throttle is records.read_throttle and not hasattr(validate, "parse_reasons")
    assert causes.parse_throttle is records.parse_throttle
    for cell, shares in [
        ("sw_power_cap=0.500", {"sw_power_cap": 0.5}),
        (36, {"sw_power_cap": 1.0, "sw_thermal_slowdown": 1.0}),
        ("0x24", {"sw_power_cap": 1.0, "sw_thermal_slowdown": 1.0}),
        ("SwPowerCap|bogus", {"sw_power_cap": 1.0}),
        ("", {}),
        (None, {}),
        (float("nan"), {}),
    ]:
        assert records.parse_throttle(cell) == shares, cell
        assert records.read_throttle(cell)[0] == shares, cell
    for bad in ("sw_power_cap=2", "sw_power_cap=x", -1, True):
        assert records.parse_throttle(bad) is None, bad
        with pytest.raises(ValueError):
            records.read_throttle(bad)
    shares = {"hw_slowdown": 0.25, "sw_thermal_slowdown": 1.0}
    assert records.parse_throttle(records.format_throttle(shares)) == shares


def test_nvml_reason_names_and_bits_are_the_records_ones():
    """The NVML funnel's reason names are records.THROTTLE_REASONS (not a second list), and the bits
    the result table reads masks with (records.THROTTLE_BITS) are NVML's own."""
    import pynvml

    from straggler.probes import nvml
    from straggler.records import THROTTLE_BITS, THROTTLE_REASONS

    assert tuple(name for name, _ in nvml.REASON_CONSTANTS) == THROTTLE_REASONS
    for name, suffix in nvml.REASON_CONSTANTS:
        assert getattr(pynvml, f"nvmlClocksEventReason{suffix}") == THROTTLE_BITS[name], name
        assert nvml.decode_clock_events(THROTTLE_BITS[name]) == {name}


# --- defaults: written once, in the settings; the CLI options read them ---------------------------


def _options_after_reload(module_name, command_name):
    import importlib

    mod = importlib.reload(importlib.import_module(module_name))
    return {p.name: p for p in getattr(mod, command_name).params}


def test_gate_options_take_their_defaults_from_gate_settings(monkeypatch):
    """Change a default in straggler.gate and `straggler gate` follows (no second copy in the CLI)."""
    from straggler import gate

    for field, value in [
        ("budget_s", 41.0),
        ("samples", 7),
        ("max_rounds", 4),
        ("device", "cpu"),
        ("probes", ("membw",)),
        ("telemetry", "nvml"),
        ("kernel_log", "-"),
    ]:
        monkeypatch.setattr(gate.GateSettings, field, value)
    monkeypatch.setitem(gate.GATE_DURATION_S, "cuda", 9.0)
    try:
        opts = _options_after_reload("straggler.commands.gate", "gate")
        assert {
            k: opts[k].default
            for k in ("budget_s", "samples", "max_rounds", "device", "probes", "telemetry", "kernel_log")
        } == {
            "budget_s": 41.0,
            "samples": 7,
            "max_rounds": 4,
            "device": "cpu",
            "probes": "membw",
            "telemetry": "nvml",
            "kernel_log": "-",
        }
        assert "1 on CPU cores, 9 on GPUs" in opts["duration_s"].help
    finally:
        monkeypatch.undo()
        _options_after_reload("straggler.commands.gate", "gate")


def test_scan_options_take_their_defaults_from_the_scan_settings(monkeypatch):
    from straggler import remeasure

    runner = _scan_plan_module()
    monkeypatch.setattr(runner.ScanSettings, "samples", 8)
    monkeypatch.setitem(runner.DEFAULT_DURATION_S, "cpu", 6.0)
    monkeypatch.setattr(remeasure, "DEFAULT_MAX_ROUNDS", 9)
    try:
        opts = _options_after_reload("straggler.commands.scan", "scan")
        assert opts["samples"].default == 8
        assert "6 on CPU cores, 15 on GPUs" in opts["duration_s"].help and "[default: 9;" in opts["max_rounds"].help
    finally:
        monkeypatch.undo()
        _options_after_reload("straggler.commands.scan", "scan")


def test_the_scan_limits_are_the_scan_protocols():
    """The collector's request model, its client and the agent's check of a scan read one set of limits
    (straggler.scanproto); the scan board takes its limits from the settings only (no default copy)."""
    import inspect
    import subprocess
    import sys

    import straggler.agent.scanspec as scanspec
    import straggler.collector.client as client
    from straggler import scanproto
    from straggler.collector.scans import ScanBoard

    assert client.DEFAULT_START_DELAY_S is scanproto.DEFAULT_START_DELAY_S
    assert scanspec.MAX_DURATION_S is scanproto.MAX_DURATION_S
    assert scanspec.MAX_START_AHEAD_S > scanproto.MAX_START_DELAY_S
    params = inspect.signature(ScanBoard).parameters
    assert params["run_limit_s"].default is inspect.Parameter.empty
    assert params["retention_s"].default is inspect.Parameter.empty
    code = (
        "import straggler.scanproto as p; p.DEFAULT_START_DELAY_S = 12.5; p.MAX_DURATION_S = 60.0\n"
        "from straggler.collector.models import ScanRequest\n"
        "r = ScanRequest(probes=['matmul'], duration_s=1)\n"
        "print(r.start_delay_s, ScanRequest.model_json_schema()['properties']['duration_s']['maximum'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["12.5", "60.0"]


def test_collector_help_states_the_settings_defaults(monkeypatch):
    from straggler.collector import settings

    monkeypatch.setattr(settings.CollectorSettings, "port", 9999)
    monkeypatch.setattr(settings.CollectorSettings, "address", "127.0.0.9")
    try:
        opts = _options_after_reload("straggler.commands.collector", "collector")
        assert "[default: 9999]" in opts["port"].help and "[default: 127.0.0.9]" in opts["address"].help
        assert str(settings.CollectorSettings.db_path) in opts["db_path"].help
        assert (
            str(settings.DEFAULT_CONFIG) in opts["config_path"].help and settings.TOKEN_ENV in opts["token_file"].help
        )
    finally:
        monkeypatch.undo()
        _options_after_reload("straggler.commands.collector", "collector")
