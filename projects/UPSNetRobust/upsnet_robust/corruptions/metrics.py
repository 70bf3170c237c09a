# Copyright (c) UPSNetRobust authors.
"""mPC and rPC (Michaelis et al., 2019): a task metric averaged over corruptions and severities.

mPC = 1 / (N_c N_s) sum_c sum_s P_{c,s}: the mean of the metric (PQ, mIoU, ...) over every
corruption c and severity s that ran; rPC = mPC / P_clean, the share of clean performance kept.
Per-family and per-corruption means are the same average restricted to a family or a corruption.
"""

import math
from typing import Dict, Mapping, Optional, Tuple

from .catalog import FAMILY_NAMES, family_of

__all__ = ["corruption_summary"]


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def corruption_summary(
    values: Mapping[Tuple[str, int], float], clean: Optional[float]
) -> Dict[str, object]:
    """Summarise one metric of one defense over the corruption cells.

    Args:
        values: (corruption, severity) -> the metric on that cell (every cell that ran).
        clean: the same metric on clean images (same defense); None or 0 leaves rPC None.

    Returns:
        {"mPC", "rPC", "clean", "families": {family: mean}, "corruptions": {name: mean over
        severities}, "severities": {severity: mean over corruptions}, "num_cells"}. A non-finite
        cell value makes every mean it enters non-finite rather than silently dropped.
    """
    if not values:
        raise ValueError("mPC needs at least one corruption cell")
    cells = {(str(c), int(s)): float(v) for (c, s), v in values.items()}
    mpc = _mean(cells.values())
    usable = clean is not None and math.isfinite(float(clean)) and float(clean) != 0.0
    families = {
        f: _mean(v for (c, _), v in cells.items() if family_of(c) == f) for f in FAMILY_NAMES
    }
    corruptions = {}
    for c, _ in cells:
        corruptions.setdefault(c, _mean(v for (c2, _), v in cells.items() if c2 == c))
    severities = {}
    for _, s in sorted(cells, key=lambda k: k[1]):
        severities.setdefault(s, _mean(v for (_, s2), v in cells.items() if s2 == s))
    return {
        "mPC": mpc,
        "rPC": mpc / float(clean) if usable else None,
        "clean": None if clean is None else float(clean),
        "families": {f: m for f, m in families.items() if m is not None},
        "corruptions": corruptions,
        "severities": severities,
        "num_cells": len(cells),
    }
