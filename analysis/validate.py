"""Check a result table before anything is computed from it.

Fatal problems (a missing required column, a value that is not a number, inf or negative, mixed
units within one probe, one sample recorded twice with different values) raise an InputError whose
one-line message names the column or row. Rows that cannot be used but harm nothing else (no value,
no host, an exact duplicate) are dropped and counted by reason, never silently; so is an unreadable
``throttle_reasons`` cell, which is treated as missing (the row's measurement is kept).
Row numbers in messages count data rows from 1, in the order the table was given.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from straggler.errors import InputError
from straggler.records import REQUIRED_COLUMNS
from straggler.records import read_throttle

from . import groups

IDENTITY = ("host", "gpu", "model", "probe")


def as_text(col: pd.Series) -> pd.Series:
    """The column as text: a "string" column, or a categorical one (Parquet's text columns, read by
    records.read_table) with its categories made text, so that no string per row is built and its
    codes serve as group codes."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories
        if isinstance(cats.dtype, pd.StringDtype):
            return col
        text = cats.astype("string")
        if not (text.has_duplicates or text.hasnans):  # else (1 and "1": one text) the plain path
            return col.cat.rename_categories(text)
    return col.astype("string")


def concat_text(cols) -> pd.Series:
    """Text columns one after the other (each as_text). Where one is categorical (Parquet's text,
    the collector's summaries), so is the result, of all their categories: no string per row is
    built, and its codes serve as group codes."""
    texts = [as_text(c) for c in cols]
    if not any(isinstance(t.dtype, pd.CategoricalDtype) for t in texts):
        return pd.concat(texts, ignore_index=True)
    from pandas.api.types import union_categoricals

    cats = [t.array if isinstance(t.dtype, pd.CategoricalDtype) else pd.Categorical(t) for t in texts]
    # one dtype for all categories (union_categoricals refuses "str" beside "string" text)
    cats = [c.rename_categories(c.categories.astype("string")) for c in cats]
    return pd.Series(union_categoricals(cats))


def _text(col: pd.Series) -> pd.Series:
    """A text column (as_text) with empty strings as missing."""
    s = as_text(col)
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.remove_categories([""]) if "" in s.cat.categories else s
    empty = (s == "").fillna(False).to_numpy(dtype=bool)
    return s.mask(empty) if empty.any() else s


def blank_missing(col: pd.Series) -> pd.Series:
    """Missing text (of as_text) as "" (no settings recorded is a value of its own)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        if not col.isna().any():
            return col
        col = col.cat.add_categories([""]) if "" not in col.cat.categories else col
    return col.fillna("")


def clean(df: pd.DataFrame, what: str = "input") -> tuple[pd.DataFrame, dict[str, int]]:
    """Return (a cleaned copy with canonical dtypes, {reason: rows dropped})."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what}: expected a table (DataFrame), got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{what}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (need {', '.join(REQUIRED_COLUMNS)})"
        )
    out = df.reset_index(drop=True).copy(deep=False)
    out["_row"] = np.arange(1, len(out) + 1)  # the row number messages name
    dropped: dict[str, int] = {}

    value, absent = _rates(out, "value", what)
    out["value"] = value
    keep = ~absent
    if absent.any():
        dropped["value missing"] = int(absent.sum())

    for col in IDENTITY:
        out[col] = _text(out[col])
        gone = out[col].isna().to_numpy() & keep
        if gone.any():
            dropped[f"{col} missing"] = int(gone.sum())
            keep &= ~gone
    out["settings"] = blank_missing(_text(out["settings"])) if "settings" in out else ""
    if "throttle_reasons" in out.columns:
        _check_throttle(out, keep, dropped)
    if not keep.all():
        out = out[keep].reset_index(drop=True)

    if "unit" in out.columns:
        _check_units(out, what)
    if out.empty:
        raise InputError(f"{what}: no usable rows" + (f" (dropped: {_fmt(dropped)})" if dropped else ""))
    return out, dropped


def _rates(df: pd.DataFrame, col: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(the column as floats, True where a cell is empty); a cell that is not a number, infinite or
    negative raises InputError naming its row."""
    raw = df[col]
    value = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    absent = raw.isna().to_numpy()
    bad = np.isnan(value) & ~absent
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{what}: row {pos + 1}: column '{col}' is not a number: {raw.iloc[pos]!r} ({int(bad.sum())} such rows)"
        )
    for test, word in ((np.isinf(value), "infinite"), (value < 0, "negative")):
        if test.any():
            pos = int(np.flatnonzero(test)[0])
            raise InputError(
                f"{what}: row {pos + 1}: column '{col}' is {word} ({value[pos]}); values are rates, "
                f"higher is better ({int(test.sum())} such rows)"
            )
    return value, absent


def summary_medians(df: pd.DataFrame, what: str) -> np.ndarray:
    """The ``median`` of each row of a cleaned history table: a row with one is a per-scan summary
    (its device's one row of that scan: ``value`` the scan's transient-robust estimate, ``median``
    its sample median, as the analysis reports them); NaN for a sample row. A ``median`` that is not
    a number, infinite or negative raises InputError naming its row."""
    if "median" not in df.columns:
        return np.full(len(df), np.nan)
    return _rates(df, "median", what)[0]


def _check_throttle(out: pd.DataFrame, keep: np.ndarray, dropped: dict[str, int]) -> None:
    """An unreadable ``throttle_reasons`` cell becomes missing (telemetry is optional: the sample
    stays) and is counted in ``dropped``; so is a cell naming something that is not an NVML
    clock-event reason (its known reasons are kept, the unknown names never taken as reasons)."""
    code, uniques = pd.factorize(out["throttle_reasons"], use_na_sentinel=True)
    bad, odd = [], []
    for u in uniques:
        try:
            unknown = read_throttle(u)[1]
            bad.append(False)
            odd.append(bool(unknown))
        except (ValueError, TypeError):
            bad.append(True)
            odd.append(False)
    at = np.where(code >= 0, code, len(uniques))
    hit = np.array(bad + [False])[at]
    strange = np.array(odd + [False])[at]
    if hit.any():
        out["throttle_reasons"] = out["throttle_reasons"].mask(hit)
        if (hit & keep).any():
            dropped["throttle_reasons unreadable (cell ignored)"] = int((hit & keep).sum())
    if (strange & keep).any():
        dropped["throttle_reasons not an NVML clock-event reason (name ignored)"] = int((strange & keep).sum())


def _fmt(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in dropped.items())


def _check_units(df: pd.DataFrame, what: str) -> None:
    if df.empty:
        return
    units = _text(df["unit"])
    first = units.iloc[0]
    if isinstance(first, str) and bool((units == first).fillna(False).all()):  # one unit throughout
        return
    if units.isna().all():
        return
    per = pd.DataFrame({"probe": df["probe"], "settings": df["settings"], "unit": units}).dropna()
    n = per.groupby(["probe", "settings"], sort=False, observed=True)["unit"].nunique()  # categorical keys
    mixed = n[n > 1]
    if len(mixed):
        probe, settings = mixed.index[0]
        seen = sorted(per.loc[(per["probe"] == probe) & (per["settings"] == settings), "unit"].unique())
        label = f"{probe}" + (f" ({settings})" if settings else "")
        raise InputError(f"{what}: probe {label} mixes units {', '.join(seen)} in column 'unit'")


def duplicates(df: pd.DataFrame, dev: np.ndarray, rank: np.ndarray, what: str) -> np.ndarray:
    """Rows recording a sample already seen (same device, probe, settings, scan and ``sample``, or
    ``ts`` where a row has no ``sample`` number): True for the repeats, which are dropped and counted;
    the same sample with different values raises InputError. A row with neither a ``sample`` number
    nor a ``ts`` (no such column, or a blank cell) cannot be told apart from a repeated sample, and
    is never a duplicate."""

    def number(c: str) -> np.ndarray:
        return pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float, na_value=np.nan)

    if "sample" not in df.columns and "ts" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    part = number("sample" if "sample" in df.columns else "ts")
    by_ts = np.full(len(df), "sample" not in df.columns)
    usable = np.isfinite(part)
    if "sample" in df.columns and "ts" in df.columns and not usable.all():  # no sample number: its ts
        ts = number("ts")
        by_ts = ~usable & np.isfinite(ts)
        part = np.where(by_ts, ts, part)
        usable |= by_ts
    repeat = np.zeros(len(df), dtype=bool)
    if not usable.any():
        return repeat
    every = bool(usable.all())
    idx = np.arange(len(df)) if every else np.flatnonzero(usable)

    def sub(a: np.ndarray) -> np.ndarray:
        return a if every else a[idx]

    part = sub(part)
    if (part >= 0).all() and (part == np.floor(part)).all():
        part = part.astype(np.int64)  # sample numbers as integers: coded without hashing
    kinds = [sub(by_ts).astype(np.int64)] if by_ts.any() and not by_ts.all() else []
    key, n = groups.factorize(sub(dev), sub(rank), *kinds, part)
    if n == len(idx):
        return repeat
    first = groups.first_index(key, n)
    rep = np.ones(len(idx), dtype=bool)
    rep[first] = False
    value = sub(df["value"].to_numpy(dtype=float))
    clash = rep & (value != value[first[key]])
    if clash.any():
        i = int(idx[np.flatnonzero(clash)[0]])
        j = int(idx[first[key[np.flatnonzero(clash)[0]]]])
        rows = df["_row"].to_numpy()
        col = "ts" if by_ts[i] else "sample"
        ident = ", ".join(f"{c}={df[c].iloc[i]}" for c in ("host", "gpu", "probe", col))
        raise InputError(f"{what}: rows {rows[j]} and {rows[i]} record the same sample ({ident}) with different values")
    repeat[idx] = rep
    return repeat
