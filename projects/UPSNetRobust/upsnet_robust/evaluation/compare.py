# Copyright (c) UPSNetRobust authors.
"""Several models' sweeps side by side: one table and one plot of each model's headline metric
(PQ, mIoU or AP) against eps, from the ``robustness.json`` files of finished sweeps."""
import json
import os
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

__all__ = ["load_run", "comparison_markdown", "plot_comparison", "write_comparison"]


def _reference(attack: str) -> bool:
    """Whether cells named ``attack`` are the reference (clean) ones (their kind says so)."""
    from ..threats import name_properties

    return name_properties(str(attack)).reference


def load_run(folder: str) -> Tuple[str, List[Dict]]:
    """(name, cells) of a finished sweep in ``folder``; the name is the config file's stem."""
    path = os.path.join(folder, "robustness.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run tools/attack_net.py for it first")
    with open(path) as f:
        data = json.load(f)
    config = data.get("metadata", {}).get("config_file") or folder
    name = os.path.splitext(os.path.basename(config.rstrip("/")))[0]
    return name.replace("_robustness", ""), [c for c in data["cells"] if not c.get("adaptive")]


def _key(cell: Dict):
    return (cell["attack"], float(cell["eps"]), cell["defense"])


def _value(cell: Dict):
    return cell.get(cell.get("metric", "PQ"))


def comparison_markdown(runs: Sequence[Tuple[str, List[Dict]]]) -> str:
    """A Markdown table: rows (attack, eps, defense), a column per model (its headline metric)."""
    rows = OrderedDict()
    for _, cells in runs:
        for c in cells:
            rows.setdefault(_key(c), None)
    metric = {name: (cells[0].get("metric", "PQ") if cells else "PQ") for name, cells in runs}
    head = ["attack", "eps", "defense"] + [f"{n} ({metric[n]})" for n, _ in runs]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * len(runs)]
    lookup = [{_key(c): c for c in cells} for _, cells in runs]
    for key in sorted(rows, key=lambda k: (not _reference(k[0]), k[0], k[1], k[2] != "none", k[2])):
        values = []
        for table in lookup:
            v = _value(table[key]) if key in table else None
            values.append("-" if v is None else f"{v:.1f}")
        eps = "clean" if _reference(key[0]) else f"{key[1]:g}"
        lines.append(f"| {key[0]} | {eps} | {key[2]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: Sequence[Tuple[str, List[Dict]]], path: str, attack: str = "") -> str:
    """Headline metric vs eps per model (solid: undefended; dashed: each defense), for
    ``attack`` (default: the last attack of the first run). Clean values sit at eps 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [c["attack"] for c in runs[0][1] if not _reference(c["attack"])] if runs else []
    attack = attack or (attacks[-1] if attacks else "")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, cells) in enumerate(runs):
        color = f"C{i}"
        for j, defense in enumerate(OrderedDict.fromkeys(c["defense"] for c in cells)):
            pts = sorted(
                (0.0 if _reference(c["attack"]) else float(c["eps"]), _value(c))
                for c in cells
                if c["defense"] == defense and (_reference(c["attack"]) or c["attack"] == attack)
                and _value(c) is not None
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=color, linestyle="-" if defense == "none" else "--",
                        label=f"{name} ({defense})")  # fmt: skip
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_xlabel("eps (0-255 scale; 0 = clean)")
    ax.set_ylabel("headline metric (PQ / mIoU / AP)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{attack}: models side by side")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def write_comparison(folders: Sequence[str], output_dir: str) -> Dict[str, str]:
    """``comparison.md`` and ``comparison.png`` for the sweeps in ``folders``."""
    runs = [load_run(f) for f in folders]
    os.makedirs(output_dir, exist_ok=True)
    md = os.path.join(output_dir, "comparison.md")
    with open(md + ".tmp", "w") as f:
        f.write("# Models side by side\n\n" + comparison_markdown(runs))
    os.replace(md + ".tmp", md)
    return {"md": md, "png": plot_comparison(runs, os.path.join(output_dir, "comparison.png"))}
