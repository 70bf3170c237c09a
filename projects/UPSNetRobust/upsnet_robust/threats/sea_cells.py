# Copyright (c) UPSNetRobust authors.
"""The cells of an ensemble (the ``sea`` kind): the worst case over its member passes, selected
per defense from their stored per-image statistics (:mod:`upsnet_robust.evaluation.ensemble`).

The cell's metrics are computed from the selected images' summed statistics, so they are what
the task's evaluator gives on the selected predictions; its ``members`` list says how many
images each member supplied and what the member scored alone.
"""
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from ..evaluation.breakdown import panoptic_breakdown
from ..evaluation.ensemble import Selection, select_panoptic, select_semantic
from ..evaluation.panoptic_stats import (
    IMAGE_STATS_FILE,
    PanopticStats,
    load_image_stats,
    save_image_stats,
)
from ..evaluation.semantic_stats import (
    SEM_SEG_STATS_FILE,
    load_confusion_stats,
    save_confusion_stats,
    semantic_metrics,
    sum_confusion,
)
from ..utils.io import atomic_json

__all__ = ["STATS_FILES", "ensemble_cells", "load_pass_stats", "save_selection"]

#: The per-image statistics file of a pass, per task.
STATS_FILES = {"panoptic_seg": IMAGE_STATS_FILE, "sem_seg": SEM_SEG_STATS_FILE}


def load_pass_stats(task: str, pass_dir: str) -> Optional[Dict[str, Dict]]:
    """A pass's per-image statistics per defense (None if it has none stored)."""
    if task == "panoptic_seg":
        return load_image_stats(pass_dir)
    if task == "sem_seg":
        return load_confusion_stats(pass_dir)
    return None


def _member_images(task, pass_dir, stats, cells, defense) -> Dict:
    """One defense's block of a member pass's statistics ``stats`` (read once per member)."""
    if defense in stats:
        return stats[defense]
    if all(c.get("num_images", 0) == 0 for c in cells if c["defense"] == defense):
        return {"images": {}}  # nothing was scored: the member supplies no image
    raise FileNotFoundError(
        f"Member pass {pass_dir} has no per-image statistics of defense {defense!r} "
        f"({STATS_FILES[task]}); delete its cells.json to have the sweep re-score it"
    )


def _select(task: str, blocks: Sequence[Dict]) -> Tuple[Selection, Dict, Dict]:
    """The selection, its metrics (headline names) and the selected images' statistics."""
    images = [b["images"] for b in blocks]
    if task == "panoptic_seg":
        categories = next((b["categories"] for b in blocks if "categories" in b), {})
        sel = select_panoptic(images, categories)
        chosen = {i: images[m][i] for i, m in sel.assignment.items()}
        summary = PanopticStats.total(chosen.values()).summary(categories)
        metrics = {k: summary["PQ"][k] for k in ("PQ", "SQ", "RQ")}
        metrics.update(PQ_th=summary["things"]["PQ"], PQ_st=summary["stuff"]["PQ"])
        return sel, metrics, {"images": chosen, "categories": categories}
    k = next((b["num_classes"] for b in blocks if "num_classes" in b), 0)
    sel = select_semantic(images, k)
    chosen = {i: images[m][i] for i, m in sel.assignment.items()}
    metrics = semantic_metrics(sum_confusion(chosen.values(), k))
    return sel, metrics, {"images": chosen, "num_classes": k}


def _failures(member_cells: Sequence[Dict]) -> List[Dict]:
    """Images no member could score (those failed in every member), with the first reason."""
    failed = [OrderedDict((f["image_id"], f) for f in c.get("failures", [])) for c in member_cells]
    common = set(failed[0]).intersection(*failed[1:]) if failed else set()
    return [f for i, f in failed[0].items() if i in common] if failed else []


def ensemble_cells(
    spec: Dict, members: Sequence[Tuple[Dict, str, List[Dict]]], task: str
) -> Tuple[List[Dict], Dict]:
    """The ensemble's cells, one per defense of its member passes, and per defense the
    selection and selected statistics (for :func:`save_selection`).

    Args:
        spec: the ensemble's :class:`~.base.ThreatSpec`.
        members: per member, ``(member spec, its pass dir, its cells)``.
        task: "panoptic_seg" or "sem_seg".
    """
    first_cells = members[0][2]
    stats = [load_pass_stats(task, d) or {} for _, d, _ in members]
    cells, selections = [], OrderedDict()
    for defense in [c["defense"] for c in first_cells]:
        mcells = [next(c for c in cells_ if c["defense"] == defense) for _, _, cells_ in members]
        blocks = [
            _member_images(task, d, st, cs, defense) for (_, d, cs), st in zip(members, stats)
        ]
        sel, metrics, chosen = _select(task, blocks)
        selections[defense] = (sel, chosen)
        cell = _cell(spec, mcells, sel, metrics, [m[0] for m in members])
        if task == "panoptic_seg":  # size / class / things-stuff of the selected predictions
            cell["breakdown"] = panoptic_breakdown(chosen)
        cells.append(cell)
    return cells, selections


def _cell(spec, mcells, sel: Selection, metrics: Dict, mspecs) -> Dict:
    ref = mcells[0]
    metric = ref["metric"]
    supplied = [0] * len(mcells)
    for m in sel.assignment.values():
        supplied[m] += 1
    failures = _failures(mcells)
    return {
        "model": ref.get("model"),
        "task": ref.get("task"),
        "metric": metric,
        "attack": spec.name,
        "objective": spec.objective,
        "eps": spec.eps,
        # forward-backward budget per image: every member's iterations (and restarts)
        "num_steps": sum(int(c["num_steps"]) * int(c.get("restarts", 1) or 1) for c in mcells),
        "step_size": 0.0,
        "random_start": all(bool(c.get("random_start")) for c in mcells),
        "restarts": 1,
        "defense": ref["defense"],
        "adaptive": False,
        "quantized": bool(ref.get("quantized")),
        **metrics,
        "attack_s_per_image": sum(float(c.get("attack_s_per_image") or 0.0) for c in mcells),
        # forward+backward passes per image, all members together
        "attack_passes_per_image": sum(
            float(c.get("attack_passes_per_image") or 0.0) for c in mcells
        ),
        "defense_s_per_image": sum(float(c.get("defense_s_per_image") or 0.0) for c in mcells),
        "num_images": len(sel.assignment),
        "num_failed": len(failures),
        "failures": failures,
        "members": [
            {
                "attack": s.name,
                "objective": s.objective,
                "num_steps": int(c["num_steps"]),
                metric: c.get(metric),
                "images": n,
            }
            for s, c, n in zip(mspecs, mcells, supplied)
        ],
        "selection": {"start": sel.start, "passes": sel.passes, "switches": sel.switches},
    }


def save_selection(directory: str, task: str, selections: Dict) -> None:
    """Write ``selection.json`` (per defense, image_id -> member index) and the selected
    images' statistics (the pass's usual statistics file) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    assignment = {d: {str(i): m for i, m in sel.assignment.items()} for d, (sel, _) in
                  selections.items()}
    atomic_json(os.path.join(directory, "selection.json"), assignment, indent=None)
    chosen = {d: stats for d, (_, stats) in selections.items()}
    if task == "panoptic_seg":
        save_image_stats(directory, chosen)
    else:
        save_confusion_stats(directory, chosen)
