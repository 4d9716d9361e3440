"""`straggler analyze FILE...`: files in every format, the rich table, --json, exit codes, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from straggler.analysis import analyze as run_analysis
from straggler.cli import main
from straggler.commands.analyze import render
from straggler.records import write_table


def table(slow=None, n=16, samples=5, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rate = (slow or {}).get(i, 1.0)
        for s in range(samples):
            rows.append(
                {
                    "host": f"node{i // 4}",
                    "gpu": f"GPU-{i:02d}",
                    "model": "H100",
                    "probe": "matmul",
                    "sample": s,
                    "value": 700 * rate * (1 + rng.normal(0, 0.01)),
                }
            )
    return pd.DataFrame(rows)


def cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_json_output_and_exit_code_for_every_format(tmp_path, capsys, suffix):
    path = tmp_path / f"scan{suffix}"
    write_table(table(slow={6: 0.9}), path)
    code, out, err = cli(["analyze", str(path), "--json"], capsys)
    assert code == 1, err
    doc = json.loads(out)
    assert len(doc["gpus"]) == 16
    first = doc["gpus"][0]
    # slower than the fleet and than its node-mates
    assert (first["gpu"], first["straggler"], first["basis"]) == ("GPU-06", True, "fleet_peers+node_mates")
    assert first["deficit"] == pytest.approx(0.1, abs=0.015)
    assert first["cost"] == pytest.approx(1 / 0.9 - 1, abs=0.02)
    assert doc["summary"]["stragglers"] == 1


def test_minimal_csv_healthy_exits_zero(tmp_path, capsys):
    path = tmp_path / "min.csv"
    table()[["host", "gpu", "model", "probe", "value"]].to_csv(path, index=False)
    code, out, err = cli(["analyze", str(path)], capsys)
    assert code == 0, err
    assert "0 straggler(s) among 16" in out


def test_rich_table_ranked_by_cost():
    res = run_analysis(table(slow={3: 0.93, 9: 0.8}))
    buf = io.StringIO()
    render(res, Console(file=buf, width=200, color_system=None), top=2)
    text = buf.getvalue()
    lines = text.splitlines()
    row9 = next(i for i, line in enumerate(lines) if "GPU-09" in line)
    row3 = next(i for i, line in enumerate(lines) if "GPU-03" in line)
    assert row9 < row3  # 20% slow costs more than 7% slow
    cost9 = res.devices.set_index("gpu").loc["GPU-09", "cost"]
    assert 0.2 < cost9 < 0.3  # 1 / 0.8 - 1 = 25%, measured through 1% noise
    assert "STRAGGLER" in lines[row9] and f"{cost9:.1%}" in lines[row9] and "unexplained" in lines[row9]
    assert "(not shown: 12 other entries; --all shows them)" in text
    assert sum(" healthy " in line for line in lines if "GPU-" in line) == 2
    assert "verdicts at the 4.0% threshold: straggler 2, undecided 0, slow 0, healthy 14" in lines
    assert "8-device synchronous job runs" in text


def test_dropped_rows_are_reported(tmp_path, capsys):
    df = table()
    df.loc[[0, 1, 2], "value"] = np.nan
    path = tmp_path / "holes.csv"
    df.to_csv(path, index=False)
    code, out, _ = cli(["analyze", str(path)], capsys)
    assert code == 0 and "dropped rows: 3 value missing" in out
    code, out, _ = cli(["analyze", str(path), "--json"], capsys)
    assert json.loads(out)["summary"]["dropped"] == {"value missing": 3}


def test_history_files_and_options(tmp_path, capsys):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    base = table(seed=1).assign(scan_id="a", ts=1.0)
    base.loc[base["gpu"] == "GPU-05", "value"] *= 1.05  # GPU-05 was 5% faster before
    write_table(base, old)
    write_table(table(seed=2).assign(scan_id="b", ts=2.0), new)
    code, out, err = cli(["analyze", str(new), "--json"], capsys)
    assert code == 0, err
    code, out, err = cli(["analyze", str(new), "--history", str(old), "--json", "--job-sizes", "4,8"], capsys)
    assert code == 0, err  # GPU-05 lost 5% against its own past but is in line with its peers now
    doc = json.loads(out)
    [g05] = [g for g in doc["gpus"] if g["gpu"] == "GPU-05"]
    assert g05["degraded"] is True and g05["straggler"] is False and g05["change_scan"] == "b"
    assert doc["summary"]["degraded"] == 1
    code, out, err = cli(["analyze", str(new), "--history", str(old), "--json", "--min-effect", "0.05"], capsys)
    assert code == 0, err
    assert json.loads(out)["summary"]["min_effect"] == 0.05


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: table().drop(columns="probe").to_csv(p / "t.csv", index=False) or p / "t.csv",
            "missing required column probe",
        ),
        (lambda p: (p / "t.txt").write_text("x") and p / "t.txt", "unknown file type '.txt'"),
        (lambda p: p / "absent.csv", "absent.csv: no such file"),
        (
            lambda p: (
                table().assign(value=lambda d: d["value"].where(d.index != 4, -1.0)).to_csv(p / "t.csv", index=False)
                or p / "t.csv"
            ),
            "t.csv: row 5: column 'value' is negative",
        ),
        (lambda p: table(n=1).to_csv(p / "t.csv", index=False) or p / "t.csv", "only one device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    code, out, err = cli(["analyze", str(make(tmp_path))], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("straggler: error: ") and message in err


def test_bad_option_lists_every_problem(tmp_path, capsys):
    path = tmp_path / "t.csv"
    table().to_csv(path, index=False)
    code, _, err = cli(["analyze", str(path), "--fdr", "1.5", "--min-effect", "-0.1"], capsys)
    assert code == 2 and "fdr" in err and "min_effect" in err


def test_subprocess_exit_codes(tmp_path):
    """The installed entry point, as a user runs it."""
    path = tmp_path / "scan.csv"
    write_table(table(slow={2: 0.85}), path)
    out = subprocess.run(
        [sys.executable, "-m", "straggler", "analyze", str(path), "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["gpus"][0]["gpu"] == "GPU-02"


def test_config_file_and_environment(tmp_path, capsys, monkeypatch):
    path = tmp_path / "scan.csv"
    write_table(table(slow={6: 0.94}), path)
    code, out, _ = cli(["analyze", str(path), "--json"], capsys)
    assert code == 1  # 6% slow: clearly above the default threshold (4%)
    conf = tmp_path / "analysis.toml"
    conf.write_text("min_effect = 0.05\nfdr = 0.05\n")
    code, out, err = cli(["analyze", str(path), "--json", "--config", str(conf)], capsys)
    assert code == 2, err  # 6% slow, T = 5%: undecided, and undecided is "could not decide", not healthy
    assert err == (
        "straggler: error: could not decide: 1 entries undecided at the 5.0% threshold and no "
        "straggler found: node1/GPU-06 matmul; re-measure them (up to 3 more samples)\n"
    )
    assert json.loads(out)["summary"]["fdr"] == 0.05  # the document is printed first
    monkeypatch.setenv("STRAGGLER_ANALYSIS_MIN_EFFECT", "0.03")
    code, out, _ = cli(["analyze", str(path), "--json"], capsys)
    assert code == 1 and json.loads(out)["summary"]["min_effect"] == 0.03
    conf.write_text("min_efect = 0.05\n")
    code, _, err = cli(["analyze", str(path), "--config", str(conf)], capsys)
    assert code == 2 and "unknown key 'min_efect'" in err


def test_a_peer_group_flagged_entirely_renders_and_exports():
    """Every device of a group flagged: no job without them, so no speed-up (not NaN, not a crash),
    only the step time with them.
    Verdicts decided against the group's own centre never flag a whole group, so the result's job
    cost is given that state directly."""
    import dataclasses

    res = run_analysis(table(slow={1: 0.7}, n=2))
    job = {
        "model": "H100",
        "probe": "matmul",
        "settings": "",
        "job_devices": 2,
        "step_time_all": 1.2,
        "step_time_without_stragglers": None,
        "speedup": None,
    }
    res = dataclasses.replace(res, summary={**res.summary, "job_cost": [job]})
    buf = io.StringIO()
    render(res, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    assert "straggler(s)" in out and "faster without" not in out
    assert "a 2-device synchronous job takes 1.20x the healthy step time; too few devices are left" in out
    assert json.loads(res.to_json_text())["summary"]["job_cost"][0]["speedup"] is None


def test_several_devices_with_nothing_to_compare_is_exit_2(tmp_path, capsys):
    path = tmp_path / "t.csv"
    df = table(n=3).assign(model=lambda d: d["gpu"].map({"GPU-00": "A100", "GPU-01": "H100", "GPU-02": "L4"}))
    df.to_csv(path, index=False)
    code, out, err = cli(["analyze", str(path), "--json"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "3 devices but none has a peer" in err
    code, out, err = cli(["analyze", str(path), "--reference", "L4|matmul=700"], capsys)
    # one entry has a basis; the others are reported as `none`, undecided: could not decide them
    assert code == 2 and "could not decide: 2 entries undecided" in err and "GPU-00 matmul" in err, err
    assert "undecided" in out and "straggler analyze: 0 straggler(s)" in out


def test_blank_sample_numbers_and_a_bad_throttle_cell(tmp_path, capsys):
    """Two files, one without a sample column; an unreadable throttle_reasons cell: no error."""
    full, minimal = tmp_path / "full.csv", tmp_path / "minimal.csv"
    write_table(table().assign(throttle_reasons=lambda d: np.where(d.index == 3, "sw_power_cap=x", "")), full)
    table(seed=3).assign(gpu=lambda d: d["gpu"] + "b")[["host", "gpu", "model", "probe", "value"]].to_csv(
        minimal, index=False
    )
    code, out, err = cli(["analyze", str(full), str(minimal), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["summary"]["samples"] == 2 * 16 * 5
    assert doc["summary"]["dropped"] == {"throttle_reasons unreadable (cell ignored)": 1}


def fleet(n_hosts=4, per_host=8, slow=None, noisy=None, samples=5, seed=0) -> pd.DataFrame:
    """Hosts with real-length names and GPUs with real UUIDs (40 characters)."""
    rng = np.random.default_rng(seed)
    rows = []
    for h in range(n_hosts):
        for g in range(per_host):
            i = h * per_host + g
            rate = (slow or {}).get(i, 1.0)
            for s in range(samples):
                noise = (noisy or 0.0) * (1 if (s + i) % 2 else -1) if noisy else rng.normal(0, 0.01)
                rows.append(
                    {
                        "host": f"gpu-node-{h:03d}",
                        "gpu": f"GPU-{uuid.UUID(int=i + 1)}",
                        "model": "H100",
                        "probe": "matmul",
                        "sample": s,
                        "value": 700 * rate * (1 + noise),
                    }
                )
    return pd.DataFrame(rows)


def render80(res, **kw) -> list[str]:
    buf = io.StringIO()
    render(res, Console(file=buf, width=80, color_system=None), **kw)
    return buf.getvalue().splitlines()


def test_table_at_80_columns_never_cuts_host_or_gpu():
    df = fleet(slow={3: 0.8, 17: 0.9})
    lines = render80(run_analysis(df))
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if "GPU-" in line and "matmul" in line and ":" not in line]
    assert len(rows) == 22  # 2 stragglers + the top 20 others
    for line in rows:
        host, gpu = line.split()[:2]
        assert host in set(df["host"]) and gpu in set(df["gpu"]), line
    assert "STRAGGLER" in next(line for line in rows if str(uuid.UUID(int=4)) in line)


def test_slower_on_noisy_samples_is_undecided_with_the_samples_needed():
    """19% slower than its peers on 2 noisy samples: not flagged, and not called healthy either."""
    res = run_analysis(fleet(n_hosts=1, slow={1: 0.81}, noisy=0.1, samples=2))
    row = res.devices.set_index("gpu").loc[f"GPU-{uuid.UUID(int=2)}"]
    assert not row["straggler"] and row["deficit"] == pytest.approx(0.19) and row["verdict"] == "undecided"
    lines = render80(res)
    assert max(len(line) for line in lines) <= 80
    (line,) = [line for line in lines if str(uuid.UUID(int=2)) in line]
    assert line.split()[3:5] == ["undecided", f"+{int(row['samples_needed'])}"]
    assert not any("healthy" in line.split()[3:4] for line in lines if "GPU-" in line)
    assert "verdicts at the 4.0% threshold: straggler 0, undecided 8, slow 0, healthy 0" in lines


def test_every_tier_and_the_class_in_the_table_and_json(tmp_path, capsys):
    """A straggler, a slow device (in the slow tail, under T), an undecided one and healthy ones."""
    rng = np.random.default_rng(1)
    rows = [
        {
            "host": f"node{i // 8}",
            "gpu": f"GPU-{i:02d}",
            "model": "H100",
            "probe": "matmul",
            "sample": s,
            "value": 700 * {3: 0.975, 6: 0.9, 9: 0.96}.get(i, 1.0) * (1 + rng.normal(0, 0.002)),
        }
        for i in range(32)
        for s in range(5)
    ]
    path = tmp_path / "fleet.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    code, out, err = cli(["analyze", str(path), "--json"], capsys)
    assert code == 1, err
    gpus = {g["gpu"]: g for g in json.loads(out)["gpus"]}
    assert [gpus[g]["verdict"] for g in ("GPU-06", "GPU-09", "GPU-03", "GPU-00")] == [
        "straggler",
        "undecided",
        "slow",
        "healthy",
    ]
    for key in (
        "samples_needed",
        "undecided_reason",
        "peer_spread",
        "degraded",
        "perf_class",
        "ratio_low",
        "ratio_high",
        "change_loss",
        "change_scan",
        "change_ts",
    ):
        assert key in gpus["GPU-00"], key
    assert (
        gpus["GPU-06"]["perf_class"] == "D"
        and gpus["GPU-06"]["ratio_low"] < gpus["GPU-06"]["ratio"] < gpus["GPU-06"]["ratio_high"] < 0.95
    )
    code, out, err = cli(["analyze", str(path), "--all"], capsys)
    assert code == 1, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80

    def verdict(gpu):
        (line,) = [line for line in lines if line.split()[1:3] == [gpu, "matmul"]]
        return line.split()[3]

    assert [verdict(g) for g in ("GPU-06", "GPU-09", "GPU-03", "GPU-00")] == [
        "STRAGGLER",
        "undecided",
        "slow",
        "healthy",
    ]
    assert "verdicts at the 4.0% threshold: straggler 1, undecided 1, slow 1, healthy 29" in lines


def test_spread_warnings_are_one_line_each(tmp_path, capsys):
    """T inside a group's normal spread: one warning line, on stderr under --json, in the footer else."""
    rng = np.random.default_rng(2)
    rows = [
        {
            "host": f"node{i // 8}",
            "gpu": f"GPU-{i:02d}",
            "model": "V100",
            "probe": "matmul",
            "sample": s,
            "value": 100 * spread * (1 + rng.normal(0, 0.002)),
        }
        for i, spread in enumerate(1 + rng.standard_t(5, 64) * 0.03)
        for s in range(5)
    ]
    path = tmp_path / "wide.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    res = run_analysis(pd.DataFrame(rows))
    (warning,) = res.summary["warnings"]
    code, out, err = cli(["analyze", str(path), "--json"], capsys)
    assert err == f"warning: {warning}\n" and json.loads(out)["summary"]["warnings"] == [warning]
    code, out, err = cli(["analyze", str(path)], capsys)
    assert f"warning: {warning}" in out.replace("\n", " ") or f"warning: {warning}" in " ".join(out.split())


def test_min_effect_help_names_the_engine_default(capsys):
    from straggler.analysis import AnalysisConfig

    code, out, _ = cli(["analyze", "--help"], capsys)
    assert code == 0
    assert f"[default: {AnalysisConfig().min_effect:g}]" in " ".join(out.split())


def test_a_host_whose_every_device_is_flagged_gets_one_line():
    res = run_analysis(fleet(slow={i: 0.85 for i in range(8, 16)}))
    lines = render80(res)
    assert [line for line in lines if "all 8 devices flagged" in line] == [
        "gpu-node-001: all 8 devices flagged (the node, not its devices?)"
    ]


def test_thousands_of_stragglers_show_a_summary_and_the_top_entries(tmp_path, capsys):
    slow = {i: 0.7 for i in range(0, 4000, 4)}  # 1000 stragglers
    res = run_analysis(fleet(n_hosts=500, slow=slow, samples=3))
    assert res.summary["stragglers"] == 1000
    lines = render80(res)
    flagged = [line for line in lines if "STRAGGLER" in line]
    costliest = res.devices[res.devices["straggler"]].nlargest(20, "cost")["gpu"].tolist()
    assert [line.split()[1] for line in flagged] == costliest  # the costliest first
    assert "(not shown: 980 stragglers, 2980 other entries; --all shows them)" in lines
    assert "stragglers by cause: unexplained 1000; by probe: matmul 1000" in lines
    assert sum("STRAGGLER" in line for line in render80(res, show_all=True)) == 1000


def test_piped_cli_keeps_host_and_gpu_whole(tmp_path):
    """The real command with stdout in a pipe (rich's default width there: 80)."""
    path = tmp_path / "fleet.csv"
    df = fleet(slow={5: 0.8})
    write_table(df, path)
    out = subprocess.run(
        [sys.executable, "-m", "straggler", "analyze", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
    )
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    (row,) = [line for line in lines if "STRAGGLER" in line]
    assert row.split()[:3] == ["gpu-node-000", f"GPU-{uuid.UUID(int=6)}", "matmul"]
    assert max(len(line) for line in lines) <= 80


def test_a_scan_json_document_is_read_as_its_samples(tmp_path, capsys):
    doc = {
        "scan_id": "s",
        "host": "gpu-node-000",
        "devices": [],
        "failures": [],
        "samples": table(slow={6: 0.9}).to_dict("records"),
    }
    path = tmp_path / "scan.json"
    path.write_text(json.dumps(doc) + "\n")
    code, out, err = cli(["analyze", str(path), "--json"], capsys)
    assert code == 1, err
    assert json.loads(out)["gpus"][0]["gpu"] == "GPU-06"


def test_missing_columns_name_the_file_and_what_it_has(tmp_path, capsys):
    path = tmp_path / "odd.csv"
    pd.DataFrame({"hostname": ["a"], "uuid": ["g"], "tflops": [1.0]}).to_csv(path, index=False)
    code, _, err = cli(["analyze", str(path)], capsys)
    assert code == 2
    assert err == (
        f"straggler: error: {path}: missing required columns host, gpu, model, probe, value "
        "(found: hostname, uuid, tflops)\n"
    )


def test_usage_errors_are_one_line_exit_2(tmp_path):
    for args in (["analyze"], ["analyze", "--bogus", "x.csv"], ["scan", "--samples", "x"]):
        out = subprocess.run(
            [sys.executable, "-m", "straggler", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert out.returncode == 2 and out.stdout == ""
        (line,) = out.stderr.splitlines()
        assert line.startswith("straggler: error: ") and f"(see 'straggler {args[0]} --help')" in line


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_history_file_of_per_scan_summaries_finds_the_degraded_device(tmp_path, capsys, suffix):
    """`straggler analyze now.csv --history summaries.csv`: one row per device and past scan (its
    value and median) decides as the past samples do."""
    from test_analysis import drifting, summaries

    frames = drifting(start=1.03, end=0.98)
    write_table(frames[-1], tmp_path / "now.csv")
    past = summaries(frames[:-1])
    if suffix == ".csv":
        past.to_csv(tmp_path / "past.csv", index=False)
    else:
        past.to_parquet(tmp_path / "past.parquet")
    write_table(pd.concat(frames[:-1]), tmp_path / "past_samples.csv")
    docs = {}
    for past in (f"past{suffix}", "past_samples.csv"):
        code, out, err = cli(
            ["analyze", str(tmp_path / "now.csv"), "--history", str(tmp_path / past), "--json"], capsys
        )
        docs[past] = json.loads(out)
        assert code in (0, 2), err
    got, want = ({g["gpu"]: g for g in d["gpus"]} for d in docs.values())
    assert [g for g, e in got.items() if e["degraded"]] == ["GPU-0009"]
    for gpu, e in want.items():
        assert (got[gpu]["verdict"], got[gpu]["degraded"], got[gpu]["change_scan"]) == (
            e["verdict"],
            e["degraded"],
            e["change_scan"],
        )
