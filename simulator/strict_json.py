"""Strict JSON for every file the simulator writes: non-finite floats become null, and a row says which.

Python's json writes NaN and Infinity, which are not JSON: other readers (jq, pandas' strict mode, a
browser, another language) reject the whole file. Every writer here converts them to None first and
dumps with allow_nan=False; a results row also lists the keys it nulled in `nonfinite`, so a reader
can tell "not finite" (a diverged metric) from "not measured" (the key is absent).
"""

from __future__ import annotations

import json
import math
from typing import Any

NONFINITE = "nonfinite"  # a row's list of the (dotted) keys whose values were not finite


def finite(obj: Any, where: str = "", found: list[str] | None = None) -> Any:
    """A copy of obj with every non-finite float replaced by None; the dotted paths go to `found`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(where)
        return None
    if isinstance(obj, dict):
        return {k: finite(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of obj with non-finite floats as null; never writes NaN or Infinity."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def strict_row(row: dict[str, Any]) -> dict[str, Any]:
    """A results row with non-finite values as None and their keys added to row['nonfinite'].

    Idempotent: a row already made strict comes back equal.
    """
    found: list[str] = []
    out = finite(row, found=found)
    if found:
        out[NONFINITE] = list(dict.fromkeys([*(row.get(NONFINITE) or []), *found]))
    return out


def number(value: Any) -> float:
    """A results value as a float for tables and curves: None (not finite, or missing) becomes NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)
