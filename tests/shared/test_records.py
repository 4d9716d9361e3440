import math

import pandas as pd
import pytest

from straggler import records
from straggler.errors import InputError


def _rows():
    return [
        {
            "ts": 1.0,
            "scan_id": "s1",
            "host": "n1",
            "gpu": "cpu0",
            "index": 0,
            "model": "x",
            "probe": "matmul",
            "sample": i,
            "value": 10.0 + i,
            "unit": "GFLOP/s",
            "throttle_reasons": records.format_throttle({"sw_power_cap": 0.5, "gpu_idle": 0.0}),
        }
        for i in range(3)
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    assert records.write_table(_rows(), path) == 3
    df = records.read_table(path)
    assert list(df["value"]) == [10.0, 11.0, 12.0]
    assert list(df.columns[:3]) == ["ts", "scan_id", "host"]
    assert records.parse_throttle(df["throttle_reasons"].iloc[0]) == {"sw_power_cap": 0.5}


def test_concat_and_unknown_type(tmp_path):
    records.write_table(_rows(), tmp_path / "a.csv")
    records.write_table(_rows(), tmp_path / "b.jsonl")
    assert len(records.read_table([tmp_path / "a.csv", tmp_path / "b.jsonl"])) == 6
    with pytest.raises(InputError, match=r"unknown file type '\.xlsx'"):
        records.read_table(tmp_path / "a.xlsx")
    with pytest.raises(InputError, match="no such file"):
        records.read_table(tmp_path / "missing.csv")


def test_throttle_parse_edge_cases():
    assert records.parse_throttle(None) == {}
    assert records.parse_throttle(math.nan) == {}
    assert records.parse_throttle("hw_slowdown=0.250;sw_thermal_slowdown=1") == {
        "hw_slowdown": 0.25,
        "sw_thermal_slowdown": 1.0,
    }


def test_result_id_is_stable_and_distinct():
    a, b = _rows()[0], _rows()[1]
    assert records.result_id(a) == records.result_id(dict(a))
    assert records.result_id(a) != records.result_id(b)


def test_missing_stays_missing(tmp_path):
    rows = _rows()
    rows[0]["power_w"] = None
    rows[1]["power_w"] = 300.0
    records.write_table(rows, tmp_path / "r.csv")
    df = records.read_table(tmp_path / "r.csv")
    assert pd.isna(df["power_w"].iloc[0]) and df["power_w"].iloc[1] == 300.0


def test_every_probe_row_carries_only_the_contract_columns():
    # The rows the worker emits (its identity columns over each parsed row) are what the agent spools
    # and the collector stores, column for column: a column outside records.COLUMNS is refused there.
    import json

    from conftest import DATA
    from straggler.probes import allreduce, matmul, membw

    ident = {"scan_id": "s", "host": "h", "gpu": "cpu0", "index": 0, "model": "m", "driver": "d"}
    raws = {
        name: json.loads((DATA / "probes" / f"cpu_{name}.json").read_text())
        for name in ("matmul", "membw", "allreduce_rank0")
    }
    rows = matmul.parse(raws["matmul"]) + membw.parse(raws["membw"]) + allreduce.parse(raws["allreduce_rank0"])
    extra = {k for r in rows for k in {**ident, **r}} - set(records.COLUMNS)
    assert extra == set()
    assert {"algbw_gbps", "arrival_skew_s"} <= set(records.PROBE_COLUMNS)
    ar = allreduce.parse(raws["allreduce_rank0"])[0]
    assert ar["algbw_gbps"] > 0 and ar["arrival_skew_s"] >= 0


def test_probe_names_have_one_source():
    from straggler.probes import devices

    assert devices.PROBES is records.PROBES
    assert devices.parse_probes("all") == records.PROBES


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_no_rows_still_make_a_readable_table(tmp_path, suffix):
    """A scan that measured nothing writes a table that reads back: 0 rows, every column."""
    path = tmp_path / f"empty{suffix}"
    assert records.write_table([], path) == 0
    df = records.read_table(path)
    assert len(df) == 0 and list(df.columns) == list(records.COLUMNS)


def test_a_scan_json_document_reads_as_its_samples(tmp_path):
    import json

    doc = {
        "scan_id": "s1",
        "host": "n1",
        "devices": [{"host": "n1", "gpu": "cpu0"}],
        "failures": [],
        "samples": _rows(),
    }
    one_line, pretty = tmp_path / "scan.json", tmp_path / "pretty.json"
    one_line.write_text(json.dumps(doc) + "\n")
    pretty.write_text(json.dumps(doc, indent=2))
    for path in (one_line, pretty):
        df = records.read_table(path)
        assert list(df["value"]) == [10.0, 11.0, 12.0] and set(df["gpu"]) == {"cpu0"}
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_text(json.dumps({"gpus": [{"gpu": "cpu0"}], "summary": {"devices": 1}}))
    with pytest.raises(InputError, match=r"verdicts\.json: a `straggler analyze --json` document"):
        records.read_table(verdicts)


def test_missing_column_names_the_file_and_the_columns_found(tmp_path):
    path = tmp_path / "partial.csv"
    pd.DataFrame({"host": ["a"], "gpu": ["g"], "value": [1.0]}).to_csv(path, index=False)
    with pytest.raises(InputError) as e:
        records.read_table(path)
    assert str(e.value) == f"{path}: missing required columns model, probe (found: host, gpu, value)"


def test_unwritable_output_is_found_before_writing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match=r"afile/out\.csv: cannot write: a parent is a file"):
        records.check_writable(tmp_path / "afile" / "out.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(InputError, match=r"dir\.csv: is a directory"):
        records.check_writable(tmp_path / "dir.csv")
    records.check_writable(tmp_path / "new" / "out.parquet")
    assert list((tmp_path / "new").iterdir()) == []  # checked, nothing left behind


def test_csv_string_columns_read_as_written(tmp_path):
    """read_table's fast CSV path gives the table read_csv(dtype="string") gives: text columns that
    look like numbers keep their digits, empty and NA cells are missing, other columns as inferred."""
    path = tmp_path / "odd.csv"
    path.write_text(
        "host,gpu,model,probe,settings,value,sample,scan_id,unit,throttle_reasons\n"
        "007,0,H100,matmul,,1.5,0,1e3,,\n"
        "8,1,H100,matmul,,2.5,1,NA,GFLOP/s,\n"
        '009,GPU-a,"H100, SXM",matmul,,3,2,s1,GFLOP/s,\n'
    )
    got = records.read_table(path)
    want = pd.read_csv(path, dtype={c: "string" for c in records.STRING_COLUMNS})
    pd.testing.assert_frame_equal(got, want)
    assert got["host"].tolist() == ["007", "8", "009"] and got["scan_id"].tolist()[0] == "1e3"
    assert got["settings"].isna().all() and str(got["settings"].dtype) == "string"
    assert got["sample"].tolist() == [0, 1, 2] and got["value"].dtype == float
