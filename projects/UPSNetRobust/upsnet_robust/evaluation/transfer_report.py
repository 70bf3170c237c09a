# Copyright (c) UPSNetRobust authors.
"""Writers of a transfer study: ``transfer.json``, ``transfer.md`` and the ``transfer.png``
heatmap (source rows x target columns of each target's headline metric), with the check that
flags transfer attacks stronger than the target's own white-box attack."""
import io
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ..utils.io import atomic_write

__all__ = ["transfer_checks", "write_transfer_report", "TRANSFER_TOLERANCE"]

# Points of the headline metric a transfer attack may beat the white-box one by before it is
# flagged (evaluation noise on small image sets, as in the sweep's sanity checks).
TRANSFER_TOLERANCE = 0.5


def _reference(entry: Dict) -> bool:
    """A clean (reference) entry: its ``attack`` is served by the reference kind."""
    from ..threats import name_properties

    return name_properties(str(entry["attack"])).reference


def _value(e: Dict) -> Optional[float]:
    v = e.get(e.get("metric", "PQ"))
    return None if v is None else float(v)


def transfer_checks(entries: Sequence[Dict], tol: float = TRANSFER_TOLERANCE) -> List[Dict]:
    """One check per (target, attack, eps, defense) with off-diagonal entries: no source's
    images may score lower on the target than the target's own white-box images (by more than
    ``tol``). Failing means the target's gradients mislead its own attack: gradient masking."""
    checks = []
    white = {(e["target"], e["attack"], e["eps"], e["defense"]): e for e in entries
             if e["source"] == e["target"]}  # fmt: skip
    for (target, attack, eps, defense), own in sorted(white.items(), key=str):
        others = [e for e in entries if e["target"] == target and e["attack"] == attack
                  and e["eps"] == eps and e["defense"] == defense and e["source"] != target]  # fmt: skip
        others = [e for e in others if _value(e) is not None]
        if not others or _value(own) is None:
            continue
        worst = min(others, key=_value)
        passed = _value(worst) >= _value(own) - tol
        checks.append({
            "name": f"transfer not stronger than white-box: {attack} eps {eps:g} -> {target} ({defense})",
            "passed": bool(passed),
            "detail": f"white-box {own['metric']} {_value(own):.1f}; best transfer from "
                      f"{worst['source']} {_value(worst):.1f}"
                      + ("" if passed else " (a sign of gradient masking in the target)"),
        })  # fmt: skip
    return checks


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _markdown(entries: Sequence[Dict], checks: Sequence[Dict], metadata: Dict) -> str:
    sources = list(OrderedDict.fromkeys(e["source"] for e in entries))
    targets = list(OrderedDict.fromkeys(e["target"] for e in entries))
    lines = ["# Transfer attacks", ""]
    lines += [f"- {k}: {v}" for k, v in metadata.items()]
    lines += ["", "Rows: the model the images were crafted on (white-box); columns: the model scored "
              "(its headline metric: " + ", ".join(
                  f"{t} {next(e['metric'] for e in entries if e['target'] == t)}" for t in targets)
              + "). The diagonal is each model's own white-box result; `clean` is the clean score.", ""]  # fmt: skip
    groups = OrderedDict()
    for e in entries:
        if not _reference(e):
            groups.setdefault((e["attack"], e["eps"], e["defense"]), []).append(e)
    clean = {(e["target"], e["defense"]): e for e in entries if _reference(e)}
    for (attack, eps, defense), group in groups.items():
        lines += [f"## {attack}, eps {eps:g}, defense {defense}", ""]
        lines += ["| source \\ target | " + " | ".join(targets) + " |",
                  "|---|" + "---:|" * len(targets)]  # fmt: skip
        row = [_fmt(_value(clean[(t, defense)])) if (t, defense) in clean else "-" for t in targets]
        lines.append("| clean | " + " | ".join(row) + " |")
        for s in sources:
            if all(_reference(e) for e in entries if e["source"] == s):
                continue
            cells = {e["target"]: e for e in group if e["source"] == s}
            if not cells:
                continue
            row = [(f"**{_fmt(_value(cells[t]))}**" if t == s else _fmt(_value(cells[t])))
                   if t in cells else "-" for t in targets]  # fmt: skip
            lines.append(f"| {s} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Sanity checks", ""]
    lines += [f"- {'PASS' if c['passed'] else '**FLAG**'} {c['name']}: {c['detail']}" for c in checks]
    if not checks:
        lines.append("- (no off-diagonal entries)")
    return "\n".join(lines) + "\n"


def _heatmap(entries: Sequence[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacked = [e for e in entries if not _reference(e) and e["defense"] == "none"]
    if not attacked:
        attacked = [e for e in entries if not _reference(e)]
    groups = OrderedDict()
    for e in attacked:
        groups.setdefault((e["attack"], e["eps"]), []).append(e)
    sources = list(OrderedDict.fromkeys(e["source"] for e in attacked))
    targets = list(OrderedDict.fromkeys(e["target"] for e in entries))
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(1.6 + 1.4 * len(targets) * n, 1.4 + 0.6 * len(sources)),
                             squeeze=False)  # fmt: skip
    for k, (ax, ((attack, eps), group)) in enumerate(zip(axes[0], groups.items())):
        grid = np.full((len(sources), len(targets)), np.nan)
        for e in group:
            v = _value(e)
            grid[sources.index(e["source"]), targets.index(e["target"])] = np.nan if v is None else v
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for i in range(len(sources)):
            for j in range(len(targets)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center",
                            color="white" if grid[i, j] < 60 else "black", fontsize=9)  # fmt: skip
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
        # source names label the first panel's rows only: they would overlap the next panel
        ax.set_yticks(range(len(sources)), sources if k == 0 else [""] * len(sources))
        ax.set_title(f"{attack} eps {eps:g}")
        ax.set_xlabel("target (scored)")
        if k == 0:
            ax.set_ylabel("source (crafted on)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="target's headline metric")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue(), mode="wb")


def write_transfer_report(entries: Sequence[Dict], output_dir: str, metadata: Optional[Dict] = None) -> Dict[str, str]:
    """Write ``transfer.json`` ({metadata, entries, checks}), ``transfer.md``, ``transfer.png``."""
    os.makedirs(output_dir, exist_ok=True)
    entries = list(entries)
    metadata = dict(metadata or {})
    checks = transfer_checks(entries)
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("json", "transfer.json"), ("md", "transfer.md"), ("png", "transfer.png"))}  # fmt: skip
    for key, text in (("json", json.dumps({"metadata": metadata, "entries": entries, "checks": checks}, indent=2)),
                      ("md", _markdown(entries, checks, metadata))):  # fmt: skip
        atomic_write(paths[key], text)
    _heatmap(entries, paths["png"])
    return paths
