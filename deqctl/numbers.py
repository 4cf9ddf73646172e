"""Numbers read from metrics rows, files someone sent and tensors, one meaning each:

    number(v)       v as a float; None when missing or not a number (a bool, a string)
    finite(v)       ... and None when it is NaN or infinite too
    strict_json(o)  o with NaN and inf as null, so that json.dumps writes strict JSON
"""

from __future__ import annotations

import math
from typing import Any


def number(v: Any) -> float | None:
    """`v` (an int, a float, a 0-d tensor or array) as a float, NaN and inf kept; None for
    anything else, a bool and an integer beyond any float included."""
    if v is None or isinstance(v, (bool, str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError, RuntimeError):   # RuntimeError: a tensor of many
        return None


def finite(v: Any) -> float | None:
    """number(v) when it is finite, else None."""
    x = number(v)
    return x if x is not None and math.isfinite(x) else None


def strict_json(obj: Any) -> Any:
    """`obj` with NaN and inf as null, so that json.dumps writes strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v) for v in obj]
    return obj
