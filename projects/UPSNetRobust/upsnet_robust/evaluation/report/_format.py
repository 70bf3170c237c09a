# Copyright (c) UPSNetRobust authors.
"""Formatting helpers shared by the report's writers (numbers, eps, JSON values, Markdown)."""

import math
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .cells import ResultCell, finite


def unique(values: Iterable) -> List:
    """``values`` without repeats, in order of first appearance."""
    return list(OrderedDict.fromkeys(values))


def fmt(value, digits: int = 2) -> str:
    v = finite(value)
    return "n/a" if v is None else f"{v:.{digits}f}"


def fmt_eps(eps: float) -> str:
    return f"{eps:g}"


def min_score(cells: Iterable[ResultCell]) -> Optional[float]:
    """The lowest headline score of ``cells`` (the strongest setting), None if none is scored."""
    values = [c.score for c in cells if c.score is not None]
    return min(values) if values else None


def attack_label(cell: ResultCell) -> str:
    return str(cell.attack) + (" (adaptive)" if cell.is_adaptive else "")


def series_label(*parts) -> str:
    return "/".join("-" if p is None else str(p) for p in parts)


def jsonable(obj):
    """Plain JSON types: numpy scalars and arrays unwrapped, tuples listed, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def md_escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Markdown table lines (cells escaped)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(md_escape(v) for v in r) + " |" for r in rows]
    return out
