"""AnalysisResult: the per-device table, the summary, the dropped-row counts, and the JSON document
of ``straggler analyze --json``: ``{"gpus": [...], "summary": {...}}`` (one entry per device and
probe; unknown numbers are null)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

# Columns of res.devices, in order; the JSON "gpus" entries carry the same keys.
DEVICE_COLUMNS = (
    "host", "gpu", "index", "model", "probe", "settings", "straggler", "verdict", "degraded", "basis",
    "deficit", "cost", "causes", "evidence", "n_samples", "n_kept", "value", "median", "peer_median", "ratio",
    "ratio_low", "ratio_high", "perf_class", "peer_spread", "peer_group_size", "p_value", "q_value",
    "samples_needed", "undecided_reason", "history_scans", "history_baseline", "history_deficit",
    "change_loss", "change_scan", "change_ts",
)


@dataclass(frozen=True)
class AnalysisResult:
    devices: pd.DataFrame  # one row per (host, gpu, probe, settings), stragglers first, by cost
    summary: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # reason -> rows dropped

    @property
    def stragglers(self) -> pd.DataFrame:
        return self.devices[self.devices["straggler"]]

    def to_json_text(self) -> str:
        """The JSON document as text (fast: pandas writes the device list)."""
        gpus = self.devices.to_json(orient="records", double_precision=6)
        return '{"gpus": ' + gpus + ', "summary": ' + json.dumps(self.summary, allow_nan=False) + "}"

    def to_json(self) -> dict:
        """The JSON document as plain Python objects (NaN as None)."""
        return json.loads(self.to_json_text())
