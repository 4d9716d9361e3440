"""The one JSON-safe cleaning of values (``json_safe``): what every layer writes as JSON goes through it.

Rules (docs/interfaces.md "JSON values"): missing is ``null`` -- NaN, +-infinity (Python or numpy
floats), ``pandas.NA`` and ``pandas.NaT`` become None; numpy scalars become the Python bool, int or
float they hold; numpy arrays and pandas Series become lists (a float column cleaned in one
vectorised pass); dict keys become strings; lists, tuples, sets and frozensets become lists (sets
sorted, so the output is stable); dicts and sequences are cleaned all the way down. Anything else
is returned as it is (``json.dumps`` then names what it cannot write). Importing it loads nothing.
"""

from __future__ import annotations

import math
import sys
from typing import Any

_PLAIN = (str, int, bool, type(None))  # bool is an int; kept as it is


def json_safe(v: Any) -> Any:
    """``v`` with every value JSON can write as the rules above say (a new object; ``v`` is not changed)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, float):  # numpy.float64 is a float too
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return [json_safe(x) for x in sorted(v, key=repr)]
    np = sys.modules.get("numpy")  # a numpy value exists only where numpy is loaded: never imported here
    if np is not None:
        if isinstance(v, np.generic):
            return json_safe(v.item())
        if isinstance(v, np.ndarray):
            return _array(np, v)
    pd = sys.modules.get("pandas")
    if pd is not None:
        if v is pd.NA or v is pd.NaT:
            return None
        if isinstance(v, (pd.Series, pd.Index)):
            # a nullable column (Int64, boolean, string, ...) as objects, missing as None: its
            # plain to_numpy() would make a nullable integer column floats
            numpy_dtype = np is not None and isinstance(v.dtype, np.dtype)  # pandas loads numpy: always set
            return _array(np, v.to_numpy() if numpy_dtype else v.to_numpy(dtype=object, na_value=None))
    return v


def _array(np, a) -> list:
    """A numpy array as (nested) lists: a float array in one vectorised pass (non-finite -> None)."""
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if not bad.any():
            return a.tolist()
        out = a.astype(object)
        out[bad] = None
        return out.tolist()
    if a.dtype.kind in "biu":
        return a.tolist()
    return json_safe(a.tolist())  # objects, strings, datetimes: element by element
