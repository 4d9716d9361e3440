"""Check a result table before anything is computed from it.

Fatal problems (a missing required column, a value that is not a number, inf or negative, mixed
units within one probe, one sample recorded twice with different values) raise an InputError whose
one-line message names the column or row. Rows that cannot be used but harm nothing else (no value,
no host, an exact duplicate) are dropped and counted by reason, never silently.
Row numbers in messages count data rows from 1, in the order the table was given.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from straggler.errors import InputError
from straggler.records import REQUIRED_COLUMNS

from . import groups

IDENTITY = ("host", "gpu", "model", "probe")


def _text(col: pd.Series) -> pd.Series:
    """A string column with empty strings as missing."""
    s = col.astype("string")
    empty = (s == "").fillna(False).to_numpy(dtype=bool)
    return s.mask(empty) if empty.any() else s


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

    raw = out["value"]
    value = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    absent = raw.isna().to_numpy()
    bad = np.isnan(value) & ~absent
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{what}: row {pos + 1}: column 'value' is not a number: {raw.iloc[pos]!r} "
            f"({int(bad.sum())} such rows)"
        )
    for test, word in ((np.isinf(value), "infinite"), (value < 0, "negative")):
        if test.any():
            pos = int(np.flatnonzero(test)[0])
            raise InputError(
                f"{what}: row {pos + 1}: column 'value' is {word} ({value[pos]}); values are rates, "
                f"higher is better ({int(test.sum())} such rows)"
            )
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
    out["settings"] = _text(out["settings"]).fillna("") if "settings" in out else ""
    if not keep.all():
        out = out[keep].reset_index(drop=True)

    if "unit" in out.columns:
        _check_units(out, what)
    if out.empty:
        raise InputError(f"{what}: no usable rows" + (f" (dropped: {_fmt(dropped)})" if dropped else ""))
    return out, dropped


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
    n = per.groupby(["probe", "settings"], sort=False)["unit"].nunique()
    mixed = n[n > 1]
    if len(mixed):
        probe, settings = mixed.index[0]
        seen = sorted(per.loc[(per["probe"] == probe) & (per["settings"] == settings), "unit"].unique())
        label = f"{probe}" + (f" ({settings})" if settings else "")
        raise InputError(f"{what}: probe {label} mixes units {', '.join(seen)} in column 'unit'")


def duplicates(df: pd.DataFrame, dev: np.ndarray, rank: np.ndarray, what: str) -> np.ndarray:
    """Rows recording a sample already seen (same device, probe, settings, scan and ``sample``, or
    ``ts`` when there is no ``sample`` column): True for the repeats, which are dropped and counted;
    the same sample with different values raises InputError. Without a ``sample`` or ``ts`` column
    rows cannot be told apart from repeated samples, and nothing is a duplicate."""
    cols = ["sample"] if "sample" in df.columns else ["ts"] if "ts" in df.columns else []
    if not cols:
        return np.zeros(len(df), dtype=bool)
    parts = [pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float, na_value=np.nan) for c in cols]
    parts = [p.astype(np.int64) if len(p) and np.isfinite(p).all() and (p >= 0).all() and (p == np.floor(p)).all()
             else p for p in parts]  # sample numbers as integers: coded without hashing
    key, n = groups.factorize(dev, rank, *parts)
    if n == len(df):
        return np.zeros(len(df), dtype=bool)
    first = groups.first_index(key, n)
    repeat = np.ones(len(df), dtype=bool)
    repeat[first] = False
    value = df["value"].to_numpy(dtype=float)
    clash = repeat & (value != value[first[key]])
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        j = int(first[key[i]])
        rows = df["_row"].to_numpy()
        ident = ", ".join(f"{c}={df[c].iloc[i]}" for c in ("host", "gpu", "probe", *cols))
        raise InputError(f"{what}: rows {rows[j]} and {rows[i]} record the same sample ({ident}) "
                         "with different values")
    return repeat
