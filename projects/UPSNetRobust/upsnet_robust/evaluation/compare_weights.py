# Copyright (c) UPSNetRobust authors.
"""Several checkpoints of one architecture in one sweep (``ROBUSTNESS.COMPARE_WEIGHTS``).

A robustly trained checkpoint is a defense like an input transform, only one that an attacker
always sees through: every attack on it is white-box by construction. Each compared checkpoint
is loaded into the sweep's model, swept with the same settings (its own cache, keyed by its
bytes) and its cells are relabelled as defense rows ``name`` (undefended) and ``name+<defense>``
(the checkpoint behind an input transform, e.g. "adversarial training + NL-means"), so the
report's tables, ranking, worst-case curves and trade-off plot put them beside the transforms.
"""
import copy
import os
from typing import Dict, List, Sequence, Tuple

from .report.cells import UNDEFENDED

__all__ = ["compare_weights_entries", "relabel_cells", "sweep_compared_weights"]

KEY = "ROBUSTNESS.COMPARE_WEIGHTS"


def compare_weights_entries(cfg) -> List[Tuple[str, str]]:
    """``(name, path)`` of each ``ROBUSTNESS.COMPARE_WEIGHTS`` entry, checked at set-up.

    Raises:
        ValueError: an entry not ``name=path``, a repeated or reserved name, or a path that
            does not exist, naming the key and the entry.
    """
    out, names = [], set()
    for entry in cfg.ROBUSTNESS.COMPARE_WEIGHTS:
        name, sep, path = str(entry).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path or "+" in name:
            raise ValueError(
                f"{KEY} entry {entry!r} is not of the form 'name=path' (a name without '+', e.g. "
                "'adv_train=checkpoints/upsnet_tiny_synthetic_adv.pth')"
            )
        if name in names or name == UNDEFENDED or name in cfg.ROBUSTNESS.DEFENSES:
            raise ValueError(f"{KEY} entry {entry!r}: the name {name!r} is already a defense row")
        if not os.path.exists(path):
            raise ValueError(f"{KEY} entry {entry!r}: no checkpoint at {path}")
        names.add(name)
        out.append((name, path))
    return out


def relabel_cells(cells: Sequence[Dict], name: str, path: str) -> List[Dict]:
    """The cells of checkpoint ``name`` as defense rows ``name`` / ``name+<defense>``."""
    out = []
    for cell in cells:
        cell = dict(cell)
        defense = cell.get("defense", UNDEFENDED)
        cell["defense"] = name if defense == UNDEFENDED else f"{name}+{defense}"
        cell["weights"] = path
        out.append(cell)
    return out


def sweep_compared_weights(cfg, model, run_sweep) -> List[Dict]:
    """Sweep every compared checkpoint in ``model`` and return their relabelled cells; the
    model's own weights are restored afterwards.

    Args:
        run_sweep: ``(weights path, output subfolder name) -> cells`` running the configured
            sweep on ``model`` as it is loaded.
    """
    from ..modeling import UPSNetCheckpointer

    entries = compare_weights_entries(cfg)
    if not entries:
        return []
    original = copy.deepcopy(model.state_dict())
    cells = []
    try:
        for name, path in entries:
            checkpointer = UPSNetCheckpointer(model, allow_unsafe=cfg.MODEL.UNSAFE_LOAD_CHECKPOINT)
            checkpointer.load(path)
            cells += relabel_cells(run_sweep(path, name) or [], name, path)
    finally:
        model.load_state_dict(original)
    return cells
