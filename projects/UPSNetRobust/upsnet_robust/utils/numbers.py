# Copyright (c) UPSNetRobust authors.
"""Numbers as the report and the per-image statistics read them."""
import math
from typing import Optional

__all__ = ["finite"]


def finite(value) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / boolean / NaN / inf values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
