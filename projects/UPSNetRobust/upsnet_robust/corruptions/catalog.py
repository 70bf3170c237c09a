# Copyright (c) UPSNetRobust authors.
"""The benchmark's corruptions and their families, taken from ``imagecorruptions`` itself.

The 15 corruptions of Hendrycks & Dietterich (ImageNet-C), used for segmentation and detection by
Michaelis et al. (Cityscapes-C / COCO-C), in the package's order; the families are the package's
own subsets, so names and grouping cannot drift from the reference implementation.
"""

import difflib
from typing import Dict, Iterable, List, Sequence, Tuple

from imagecorruptions import get_corruption_names

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "FAMILY_NAMES",
    "SEVERITIES",
    "UnknownCorruptionError",
    "family_of",
    "validate_corruptions",
    "validate_severities",
]

FAMILY_NAMES = ("noise", "blur", "weather", "digital")
# family -> corruption names, e.g. "noise" -> (gaussian_noise, shot_noise, impulse_noise)
FAMILIES: Dict[str, Tuple[str, ...]] = {f: tuple(get_corruption_names(f)) for f in FAMILY_NAMES}
CORRUPTIONS: Tuple[str, ...] = tuple(get_corruption_names("common"))
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)
_FAMILY = {name: family for family, names in FAMILIES.items() for name in names}


class UnknownCorruptionError(KeyError, ValueError):
    """No corruption of that name; a KeyError (lookup) and a ValueError (bad config)."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


def family_of(name: str) -> str:
    """The family (noise, blur, weather, digital) of a benchmark corruption."""
    return _FAMILY[name]


def _by_closeness(name: str) -> List[str]:
    """Every valid name, the closest matches to ``name`` first."""
    close = difflib.get_close_matches(str(name), CORRUPTIONS, n=len(CORRUPTIONS), cutoff=0.0)
    return close + [c for c in CORRUPTIONS if c not in close]


def validate_corruptions(names: Iterable[str], key: str = "ROBUSTNESS.CORRUPTIONS") -> List[str]:
    """The names as a list; an unknown or repeated name is an error that lists the valid names,
    closest match first."""
    names = [str(n) for n in names]
    for name in names:
        if name not in _FAMILY:
            raise UnknownCorruptionError(
                f"{key}: unknown corruption {name!r}; valid names (closest first): "
                + ", ".join(_by_closeness(name))
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{key}: corruptions listed more than once: {', '.join(repeated)}")
    return names


def validate_severities(severities: Sequence, key: str = "ROBUSTNESS.SEVERITIES") -> List[int]:
    """The severities as ints in 1-5, each once; anything else is an error naming the key."""
    out = []
    for s in severities:
        if isinstance(s, bool) or int(s) != s or int(s) not in SEVERITIES:
            raise ValueError(f"{key}: severity {s!r} is not one of {list(SEVERITIES)}")
        out.append(int(s))
    if len(set(out)) != len(out):
        raise ValueError(f"{key}: severities listed more than once: {list(severities)}")
    return out
