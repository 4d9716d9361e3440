"""Vectorised group arithmetic on integer codes (numpy only, no per-group Python loop).

Every table in the engine is keyed by dense integer codes (0..n-1) made once by :func:`factorize`;
the helpers here reduce a value array by those codes with sorting and ``np.bincount``, which is
several times faster than a pandas groupby over string keys on millions of rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def factorize(*columns) -> tuple[np.ndarray, int]:
    """Dense codes for the combinations of ``columns`` (missing values are a value of their own)."""
    code = np.zeros(len(columns[0]), dtype=np.int64)
    for col in columns:
        c, uniques = pd.factorize(col, use_na_sentinel=False)
        code = code * max(len(uniques), 1) + c
        code, uniq = pd.factorize(code)
    n = int(code.max()) + 1 if len(code) else 0
    return code.astype(np.int64, copy=False), n


def first_index(codes: np.ndarray, n: int) -> np.ndarray:
    """Index of the first row of each code."""
    first = np.full(n, len(codes), dtype=np.int64)
    # numpy assigns repeated indices in order, so writing the rows backwards leaves the first one.
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)
    return first


def count(codes: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(codes if mask is None else codes[mask], minlength=n).astype(np.int64)


def total(codes: np.ndarray, values: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is not None:
        codes, values = codes[mask], values[mask]
    return np.bincount(codes, weights=values, minlength=n)


def mean(codes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Mean per code, ignoring NaN; NaN where a code has no finite value."""
    ok = np.isfinite(values)
    cnt = count(codes, n, ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, total(codes, values, n, ok) / cnt, np.nan)


def median(codes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Median per code, ignoring NaN; NaN where a code has no finite value."""
    ok = np.isfinite(values)
    c, v = (codes, values) if ok.all() else (codes[ok], values[ok])
    order = np.lexsort((v, c))
    v = v[order]
    cnt = np.bincount(c, minlength=n)
    start = np.cumsum(cnt) - cnt
    out = np.full(n, np.nan)
    has = cnt > 0
    lo = start[has] + (cnt[has] - 1) // 2
    hi = start[has] + cnt[has] // 2
    out[has] = (v[lo] + v[hi]) / 2
    return out


def extreme(codes: np.ndarray, values: np.ndarray, n: int, how: str) -> np.ndarray:
    """``"min"`` or ``"max"`` per code, ignoring NaN."""
    s = pd.Series(values).groupby(codes).agg(how)
    out = np.full(n, np.nan)
    out[s.index.to_numpy()] = s.to_numpy(dtype=float)
    return out
