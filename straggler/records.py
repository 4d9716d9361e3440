"""The canonical result table: one row per sample, shared by every component.

A row is a plain dict with the columns below; a table is a pandas DataFrame (pandas is imported
only inside the functions that need it, so importing this module stays light).

Columns (see README "Result table"):

- identity: ``ts`` (sample end, Unix seconds), ``scan_id``, ``host``, ``gpu`` (the device UUID, or
  ``cpu<N>`` for a CPU core), ``index`` (device index on its host), ``model``, ``driver``
- measurement: ``probe``, ``settings`` (probe parameters, e.g. ``n=8192,dtype=bf16``; peers are only
  compared within one probe+settings), ``sample`` (0, 1, ... within the probe), ``duration_s``
  (length of the sample's window), ``value`` (higher is better), ``unit``
- telemetry over the sample's window (missing is empty/NaN, never 0): ``sm_clock_mhz`` (SM clock on a
  GPU, core clock on a CPU), ``sm_clock_max_mhz``, ``mem_clock_mhz``, ``power_w``, ``power_limit_w``,
  ``temp_c`` (max), ``throttle_reasons`` (``name=share;...``, share of the window each reason was
  active), ``pcie_gen``, ``pcie_gen_max``, ``pcie_width``, ``pcie_width_max``, ``ecc_corrected_total``,
  ``ecc_uncorrected_total``, ``retired_pages``, ``remapped_rows``, ``util_pct``, ``processes``
- probe-specific measurements (:data:`PROBE_COLUMNS`; empty on the other probes' rows, never
  negative): ``algbw_gbps`` (allreduce: algorithm bandwidth, bytes / time, GB/s; its ``value`` is the
  bus bandwidth), ``arrival_skew_s`` (allreduce: this rank's mean lateness at the barriers)

A row carries these columns and no others: the agent spools them and the collector stores them
column for column (it refuses a row with any other column). A probe that measures something new
declares its column here, and the collector gets a schema migration for it.

:data:`PROBES` names the probes a scan can run (``straggler scan --probes``, the collector's
``POST /api/v1/scans``); the rows' ``probe`` column may be finer (``pcie`` writes ``pcie_h2d`` and
``pcie_d2h``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

PROBES = ("matmul", "membw", "pcie", "allreduce")

REQUIRED_COLUMNS = ("host", "gpu", "model", "probe", "value")

IDENTITY_COLUMNS = ("ts", "scan_id", "host", "gpu", "index", "model", "driver")
MEASUREMENT_COLUMNS = ("probe", "settings", "sample", "duration_s", "value", "unit")
TELEMETRY_COLUMNS = (
    "sm_clock_mhz",
    "sm_clock_max_mhz",
    "mem_clock_mhz",
    "power_w",
    "power_limit_w",
    "temp_c",
    "throttle_reasons",
    "pcie_gen",
    "pcie_gen_max",
    "pcie_width",
    "pcie_width_max",
    "ecc_corrected_total",
    "ecc_uncorrected_total",
    "retired_pages",
    "remapped_rows",
    "util_pct",
    "processes",
)
PROBE_COLUMNS = ("algbw_gbps", "arrival_skew_s")
# The upload's HTTP header with the agent's clock when it sent a batch (seconds since the epoch): the
# collector records its offset per agent (collector/ingest.py); agents send it (agent/uploader.py).
SENT_TS_HEADER = "X-Straggler-Sent-Ts"
COLUMNS = IDENTITY_COLUMNS + MEASUREMENT_COLUMNS + TELEMETRY_COLUMNS + PROBE_COLUMNS

STRING_COLUMNS = frozenset(
    {"scan_id", "host", "gpu", "model", "driver", "probe", "settings", "unit", "throttle_reasons"}
)

# Integer columns: indices, counts, PCIe generation and width. Every other non-string column is real.
INT_COLUMNS = frozenset(
    {
        "index",
        "sample",
        "pcie_gen",
        "pcie_gen_max",
        "pcie_width",
        "pcie_width_max",
        "ecc_corrected_total",
        "ecc_uncorrected_total",
        "retired_pages",
        "remapped_rows",
        "processes",
    }
)

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def file_format(path: str | Path) -> str:
    """The table format of ``path`` from its suffix, or an InputError naming the file."""
    suffix = Path(path).suffix.lower()
    try:
        return SUFFIXES[suffix]
    except KeyError:
        raise InputError(f"{path}: unknown file type {suffix or '(none)'!r}; use .csv, .jsonl or .parquet") from None


def result_id(row: Mapping) -> str:
    """A stable id for one sample, so uploads and replays are idempotent."""
    key = "\x1f".join(str(row.get(c, "")) for c in ("scan_id", "host", "gpu", "probe", "settings", "sample", "ts"))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def format_throttle(shares: Mapping[str, float]) -> str:
    """``{"sw_power_cap": 0.8}`` -> ``"sw_power_cap=0.800"`` (reasons never active are left out)."""
    return ";".join(f"{k}={v:.3f}" for k, v in sorted(shares.items()) if v > 0)


# NVML clock-event (throttle) reasons, by our names, with their NVML bit (the same bits in DCGM's
# DCGM_FI_DEV_CLOCK_THROTTLE_REASONS). The one list of reason names: probes and analysis read it here.
THROTTLE_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clocks_setting": 0x100,
}
THROTTLE_REASONS = tuple(THROTTLE_BITS)
# Prefixes of the NVML / DCGM spellings of a reason ("nvmlClocksThrottleReasonSwPowerCap",
# "DCGM_CLOCKS_THROTTLE_REASON_SW_POWER_CAP", "clocks_event_reason_sw_power_cap"), after snake-casing.
_REASON_PREFIXES = (
    "nvml_clocks_throttle_reason_",
    "nvml_clocks_event_reason_",
    "dcgm_clocks_throttle_reason_",
    "dcgm_clocks_event_reason_",
    "clocks_throttle_reason_",
    "clocks_event_reason_",
)
_REASON_ALIASES = {
    "display_clock_setting": "display_clocks_setting",
    "sw_thermal": "sw_thermal_slowdown",
    "hw_thermal": "hw_thermal_slowdown",
    "hw_power_brake": "hw_power_brake_slowdown",
}


def _reason_name(word: str) -> str:
    """``SwPowerCap`` / ``SW_POWER_CAP`` / ``nvmlClocksEventReasonSwPowerCap`` -> ``sw_power_cap``."""
    out = []
    for i, ch in enumerate(word.strip()):
        if ch.isupper() and i and (word[i - 1].islower() or word[i - 1].isdigit()):
            out.append("_")
        out.append(ch.lower())
    name = "".join(out).replace("-", "_").replace(" ", "_")
    for prefix in _REASON_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return _REASON_ALIASES.get(name, name)


def read_throttle(text: object) -> tuple[dict[str, float], list[str]]:
    """A ``throttle_reasons`` cell in any form users have, as ({reason: share of the window}, [names
    and bits that are not NVML clock-event reasons]). Forms: ``name=share;...`` (format_throttle),
    an NVML/DCGM bit mask (an integer, ``"0x24"``, ``"36"``), names joined by ``|``, ``,``, ``;`` or
    spaces (each active the whole window, share 1.0), in our, NVML's or DCGM's spelling. Empty, None
    or NaN give ``({}, [])``. An unknown name is returned in the second list, never taken as a reason.
    Raises ValueError for a share that is not a number in [0, 1] or a negative mask."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or text == "":
        return {}, []
    if isinstance(text, bool):
        raise ValueError(f"throttle_reasons: {text!r} is neither a bit mask nor reason names")
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    raw = text.strip() if isinstance(text, str) else text
    mask = None
    if isinstance(raw, numbers.Integral):
        mask = int(raw)
    elif isinstance(raw, str) and raw:
        try:
            mask = int(raw, 0)
        except ValueError:
            mask = None
    if mask is not None:
        if mask < 0:
            raise ValueError(f"throttle_reasons: negative bit mask {mask}")
        masked = {name: 1.0 for name, bit in THROTTLE_BITS.items() if mask & bit}
        rest = mask & ~sum(THROTTLE_BITS.values())
        return masked, ([hex(rest)] if rest else [])
    shares: dict[str, float] = {}
    unknown: list[str] = []
    for part in str(raw).replace("|", ";").replace(",", ";").replace(" ", ";").split(";"):
        if not part.strip():
            continue
        word, eq, share_text = part.partition("=")
        share = 1.0
        if eq:
            share = float(share_text)  # ValueError: not a number
            if not 0 <= share <= 1:
                raise ValueError(f"throttle_reasons: share {share_text!r} of {word.strip()!r} is not in [0, 1]")
        name = _reason_name(word)
        if name in THROTTLE_BITS:
            shares[name] = max(shares.get(name, 0.0), share)
        else:
            unknown.append(word.strip())
    return shares, unknown


def parse_throttle(text: object) -> dict[str, float] | None:
    """The reasons of a ``throttle_reasons`` cell (see :func:`read_throttle`; inverse of
    :func:`format_throttle`); unknown names are left out. Empty, None or NaN give ``{}``; a cell
    that cannot be read (a bad share, a negative mask, not text or a number) gives None."""
    try:
        return read_throttle(text)[0]
    except (ValueError, TypeError):
        return None


def empty_frame() -> "pd.DataFrame":
    """A table of no rows with every canonical column (what a scan that measured nothing writes)."""
    import pandas as pd

    return pd.DataFrame(
        {
            c: pd.Series(dtype="string" if c in STRING_COLUMNS else "Int64" if c in INT_COLUMNS else "float64")
            for c in COLUMNS
        }
    )


def to_frame(rows: Iterable[Mapping]) -> "pd.DataFrame":
    """Rows to a DataFrame with the canonical columns first (extra columns kept after them)."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    if df.empty and not len(df.columns):
        return empty_frame()
    ordered = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    return df[ordered]


def _temp_name(path: Path) -> Path:
    """The file a table is written to before it replaces ``path``: one per process, so several
    ranks of one job checking or writing the same path never remove each other's file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def check_writable(path: str | Path) -> None:
    """Raise InputError now if a table cannot be written to ``path`` (before a scan spends minutes
    measuring): a bad suffix, a directory, a parent that is a file, no permission, a read-only disk."""
    file_format(path)
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _temp_name(path).open("xb").close()  # where write_table writes first; unique per process
        _temp_name(path).unlink()
    except FileExistsError:  # mkdir met a file where a directory should be
        raise InputError(f"{path}: cannot write: a parent is a file, not a directory") from None
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from None


def write_table(rows: "Iterable[Mapping] | pd.DataFrame", path: str | Path) -> int:
    """Write samples to ``path`` as CSV, JSON Lines or Parquet (by suffix). Returns rows written.
    No rows still make a readable table (the header; in JSON Lines an empty file)."""
    import pandas as pd

    fmt = file_format(path)
    df = rows if isinstance(rows, pd.DataFrame) else to_frame(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        elif fmt == "jsonl":
            df.to_json(tmp, orient="records", lines=True)
        else:
            df.to_parquet(tmp, index=False)
        tmp.replace(path)  # never leave a half-written table behind
    finally:
        tmp.unlink(missing_ok=True)
    return len(df)


def _json_document(path: Path) -> "list | None":
    """The samples of a ``straggler scan --json`` document, None for a JSON Lines table; InputError
    for a ``straggler analyze --json`` document (verdicts, not samples)."""
    with open(path, "rb") as f:
        first = f.readline().strip()
    if not first.startswith(b"{"):
        return None
    try:
        doc = json.loads(first)
    except ValueError:  # a pretty-printed document spans lines; a JSON Lines row never does
        try:
            doc = json.loads(path.read_bytes())
        except ValueError:
            return None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("samples"), list):
        return doc["samples"]
    if isinstance(doc.get("gpus"), list) and isinstance(doc.get("summary"), dict):
        raise InputError(
            f"{path}: a `straggler analyze --json` document (verdicts, not samples); "
            "give the result table it was made from"
        )
    return None


def _columns_line(df: "pd.DataFrame", limit: int = 12) -> str:
    cols = [str(c) for c in df.columns]
    return ", ".join(cols[:limit]) + (f", ... ({len(cols)} columns)" if len(cols) > limit else "") or "none"


def _read_csv(path) -> "pd.DataFrame":
    """A CSV file with :data:`STRING_COLUMNS` as pandas "string": the same table as
    ``read_csv(dtype="string")`` for them, in under half its time. pandas reads a column it infers
    as text (``str``) cell for cell as written, missing cells as NaN (cast to NA here); only a
    string column it infers otherwise (all digits, all empty, mixed) is read again, alone, as text,
    so that ``007`` stays ``007``. A first read that warns (a column of mixed types across pandas'
    chunks) is done again the plain way, whose warnings are the user's to see."""
    import warnings

    import pandas as pd

    text_dtypes = {c: "string" for c in STRING_COLUMNS}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        df = pd.read_csv(path)
    if seen:
        return pd.read_csv(path, dtype=text_dtypes)
    again = [c for c in STRING_COLUMNS if c in df.columns and not isinstance(df[c].dtype, pd.StringDtype)]
    if again:
        text = pd.read_csv(path, usecols=again, dtype={c: text_dtypes[c] for c in again})
        df = df.assign(**{c: text[c] for c in again})
    return df.astype({c: "string" for c in STRING_COLUMNS if c in df.columns})


def _read_parquet(path) -> "pd.DataFrame":
    """A Parquet file, its text columns of STRING_COLUMNS read as categoricals straight from the
    file's dictionary pages: no string per row is built, and the analysis takes the categories'
    codes as its group codes (several times faster than reading and hashing 3 million strings)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    text = [
        f.name
        for f in schema
        if f.name in STRING_COLUMNS and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
    ]
    return pd.read_parquet(path, read_dictionary=text or None)


def read_table(
    paths: "str | Path | Iterable[str | Path]", required: Iterable[str] = REQUIRED_COLUMNS
) -> "pd.DataFrame":
    """Read and concatenate result tables: CSV, JSON Lines, Parquet, or the document of
    ``straggler scan --json`` (its samples). Unknown types, unreadable files and a file without a
    ``required`` column raise InputError naming the file."""
    import pandas as pd

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    frames = []
    for p in paths:
        fmt = file_format(p)
        if not Path(p).is_file():
            raise InputError(f"{p}: no such file")
        try:
            doc = _json_document(Path(p)) if fmt == "jsonl" else None
            if doc is not None:
                df = to_frame(doc)
                df = df.astype({c: "string" for c in STRING_COLUMNS if c in df.columns})
            elif fmt == "csv":
                df = _read_csv(p)
            elif fmt == "jsonl":
                df = pd.read_json(p, lines=True, dtype={c: "string" for c in STRING_COLUMNS})
                if df.empty and not len(df.columns):  # JSON Lines of no rows: an empty file
                    df = empty_frame()
            else:
                df = _read_parquet(p)
        except (ValueError, OSError, pd.errors.ParserError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{p}: cannot read as {fmt}: {first}") from None
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise InputError(
                f"{p}: missing required column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} (found: {_columns_line(df)})"
            )
        frames.append(df)
    if not frames:
        raise InputError("no result files given")
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    # what the analysis names in a message about a row (its row numbers count from 1 in this table)
    df.attrs["source"] = (
        str(paths[0])
        if len(paths) == 1
        else f"{' + '.join(str(p) for p in paths)} (rows counted across the files in this order)"
    )
    return df
