"""AnalysisResult: the per-device table, the summary, the dropped-row counts, and the JSON document
of ``straggler analyze --json``: ``{"gpus": [...], "summary": {...}}`` (one entry per device and
probe; unknown numbers are null)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, TextIO

import pandas as pd

JSON_ROWS_PER_PART = 20_000  # device entries pandas writes at a time (AnalysisResult.json_parts)
# Decimal places pandas writes a float with (its most). It writes decimals, not significant digits: at
# 6, a straggler's p-value of 4e-7 read as 0.0. At 15 one of 1e-9 keeps 6 digits; below 1e-16 pandas
# writes the exponent form.
JSON_DECIMALS = 15

# Columns of res.devices, in order; the JSON "gpus" entries carry the same keys.
DEVICE_COLUMNS = (
    "host",
    "gpu",
    "index",
    "model",
    "probe",
    "settings",
    "straggler",
    "verdict",
    "degraded",
    "basis",
    "deficit",
    "cost",
    "causes",
    "evidence",
    "n_samples",
    "n_kept",
    "value",
    "median",
    "peer_median",
    "ratio",
    "ratio_low",
    "ratio_high",
    "perf_class",
    "peer_spread",
    "peer_group_size",
    "p_value",
    "q_value",
    "samples_needed",
    "undecided_reason",
    "history_scans",
    "history_baseline",
    "history_deficit",
    "change_loss",
    "change_scan",
    "change_ts",
)


@dataclass(frozen=True)
class AnalysisResult:
    devices: pd.DataFrame  # one row per (host, gpu, probe, settings), stragglers first, by cost
    summary: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # reason -> rows dropped

    @property
    def stragglers(self) -> pd.DataFrame:
        return self.devices[self.devices["straggler"]]

    def json_parts(self, rows_per_part: int = JSON_ROWS_PER_PART) -> Iterator[str]:
        """The JSON document in pieces of ``rows_per_part`` device entries (pandas writes each
        piece; their concatenation is the document): written piece by piece, a large result needs
        no copy of the whole text, and pandas is faster on pieces that fit the CPU caches."""
        yield '{"gpus": ['
        for start in range(0, len(self.devices), rows_per_part):
            part = self.devices.iloc[start : start + rows_per_part].to_json(
                orient="records", double_precision=JSON_DECIMALS
            )
            yield ("," if start else "") + part[1:-1]  # the entries, without the list's brackets
        yield '], "summary": ' + json.dumps(self.summary, allow_nan=False) + "}"

    def write_json(self, out: TextIO) -> None:
        """Write the JSON document to a text stream (``straggler analyze --json``), no newline."""
        for part in self.json_parts():
            out.write(part)

    def to_json_text(self) -> str:
        """The JSON document as text."""
        return "".join(self.json_parts())

    def to_json(self) -> dict:
        """The JSON document as plain Python objects (NaN as None)."""
        return json.loads(self.to_json_text())
