# Copyright (c) UPSNetRobust authors.
"""robustness.md: the human-readable report of one sweep (one model, one task).

Sections: a header (run metadata, threat model, units, check summary, figures), the clean
scores per defense, the defenses ranked by their worst case, one table per attack in long
format (a row per eps and defense, so the width does not grow with the number of defenses),
the worst case over attacks per eps, PQ by segment size, things and stuff (panoptic), the
per-class drop at each attack's largest eps, every sanity check and the failed images.
"""

import datetime
import json
from collections import Counter, OrderedDict
from typing import Dict, List, Sequence

from ._format import attack_label, fmt, fmt_eps, jsonable, md_table, unique
from .cells import UNDEFENDED, ReportKind, ResultCell, cell_order, clean_scores, metric_ratios
from .breakdowns import per_class_section, size_section, worst_case_curve
from .checks import CHECKS, ENSEMBLE_TOLERANCE
from .ranking import defense_ranking

__all__ = ["THREAT_MODEL", "markdown_report", "objective_text", "threat_model"]

_HEADER_KEYS = ("date", "hardware", "config_file", "weights")


def _kinds(cells: Sequence[ResultCell]) -> List:
    """The threat kinds of the cells, in registration order."""
    from ...threats import cell_properties, kind_of, kinds, threat_kind

    names = set()
    for c in cells:
        record = c.get("threat")
        kind = threat_kind(record["kind"]) if isinstance(record, dict) and "kind" in record else (
            kind_of(c.attack))  # fmt: skip
        if kind is not None:
            names.add(kind.name)
        elif not cell_properties(c).reference:  # an unregistered attack: the attack kind's text
            names.add(next(k.name for k in kinds() if k.properties.needs_objective))
    return [k for k in kinds() if k.name in names]


def threat_model(cells: Sequence[ResultCell]) -> str:
    """The threat-model sentences of the kinds the cells come from (each kind states its own)."""
    texts = [k.threat_model for k in _kinds(cells) if k.threat_model]
    return "; ".join(texts) if texts else "n/a (no cells)"


def objective_text(name: str, cells: Sequence[ResultCell] = ()) -> str:
    """What objective ``name`` makes the attack maximise: its class's ``description``, else a
    kind's text for a name it puts in its cells (an ensemble's "ensemble")."""
    from ...attacks.objectives import objective_class
    from ...threats import kinds

    try:
        return getattr(objective_class(name), "description", "a registered objective")
    except KeyError:
        pass
    for kind in kinds():
        if name in kind.objective_texts:
            return kind.objective_texts[name]
    return "an objective not registered in this process"


def _quantized_summary(cells: Sequence[ResultCell]) -> str:
    values = {bool(c.quantized) for c in cells if not c.is_clean}
    if not values:
        return "n/a (no attacked cells)"
    if values == {True}:
        return "yes: adversarial images were rounded to uint8 before defense and model"
    if values == {False}:
        return "no: adversarial images stay float (eps < 1 is preserved)"
    return "mixed: see the `quantized` field of each cell in robustness.json"


def _objectives_summary(cells: Sequence[ResultCell]) -> str:
    used = unique(c.objective for c in cells if not c.is_clean and c.objective)
    if not used:
        return "n/a (no attacked cells)"
    return "; ".join(f"`{o}`: {objective_text(o)}" for o in used)


def _header(cells, kind: ReportKind, metadata: Dict, checks: Sequence[Dict]) -> List[str]:
    title = f"# {kind.model} robustness report" if kind.model else "# Robustness report"
    date = metadata.get("date") or datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"
    )
    md = [
        title,
        "",
        f"- **Date:** {date}",
        f"- **Model:** {kind.model or 'not recorded'}; task `{kind.task}`, headline metric "
        f"**{kind.metric}** (checks, ratios, ranking and plots use it)",
        f"- **Hardware:** {metadata.get('hardware', 'not recorded')}",
        f"- **Config file:** {metadata.get('config_file', 'not recorded')}",
        f"- **Weights:** {metadata.get('weights', 'not recorded')}",
        f"- **Threat model:** {threat_model(cells)}.",
        f"- **Objectives:** {_objectives_summary(cells)}",
        f"- **Adversarial images quantized to uint8:** {_quantized_summary(cells)}",
        "- **Units:** eps on the 0-255 pixel scale of the model's input format; "
        f"{', '.join(kind.metrics)} in %; times in seconds per image.",
    ]
    extra = [(k, v) for k, v in metadata.items() if k not in _HEADER_KEYS]
    if extra:
        md += ["", "Other metadata:", ""]
        md += md_table(
            ("key", "value"),
            [(k, v if isinstance(v, str) else json.dumps(jsonable(v))) for k, v in extra],
        )
    n_fail = sum(1 for c in checks if not c["passed"])
    md += [
        "",
        f"Sanity checks: **{len(checks) - n_fail} of {len(checks)} passed**"
        + (f", **{n_fail} FAILED** (see below)." if n_fail else "."),
        "",
        f"![{kind.metric} vs eps](pq_vs_eps.png)",
        "",
        "![time vs eps](time_vs_eps.png)",
    ]
    return md


def _clean_section(cells, kind: ReportKind) -> List[str]:
    md = ["", "## Clean", ""]
    clean_cells = cell_order([c for c in cells if c.is_clean])
    if not clean_cells:
        return md + [f"No clean cells: {kind.metric} ratios to clean are unavailable."]
    ref = clean_scores(cells).get(UNDEFENDED)
    body = []
    for c in clean_cells:
        body.append(
            [c.defense_name]
            + [fmt(c.get(m)) for m in kind.metrics]
            + [fmt(c.score / ref if c.score is not None and ref else None, 3)]
            + [fmt(c.defense_s_per_image, 3), str(c.num_images)]
        )
    header = ["defense", *kind.metrics, f"{kind.metric} / clean undefended", "defense s/img"]
    return md + md_table(header + ["images"], body)


def _ranking_intro(m: str, any_adaptive: bool) -> str:
    if any_adaptive:
        return (
            f"Worst case = lowest {m} over every attack, objective, eps and adaptive setting; "
            f"rank 1 is the most robust (ties: mean of the per-eps worst case, then clean {m}). "
            f"Cost = clean undefended {m} minus clean {m} with the defense. Per eps: {m} under "
            "the defense-unaware (transfer) attack / under the adaptive attack (BPDA surrogate, "
            "EOT samples in the last column). `none` is the baseline; its attacks are white-box."
        )
    return (
        "**No adaptive attack was run (ROBUSTNESS.ADAPTIVE False): defenses are not ranked.** "
        "The numbers below are under defense-unaware attacks only and overstate robustness "
        "against an adversary who knows the defense (Athalye et al., 2018)."
    )


def _ranking_row(r: Dict, m: str, any_adaptive: bool) -> List[str]:
    if any_adaptive and r["rank"] is not None:
        rank = str(r["rank"]) + ("" if r["adaptively_evaluated"] else " †")
    else:
        rank = "-"
    row = [rank, r["defense"], fmt(r[f"clean_{m}"]), fmt(r[f"clean_{m}_cost"])]
    for p in r["per_eps"]:
        u = fmt(p[f"unaware_{m}"]).replace("n/a", "-")
        if r["defense"] == UNDEFENDED:
            row.append(f"{u} (white-box)")
        else:
            row.append(f"{u} / {fmt(p[f'adaptive_{m}']).replace('n/a', '-')}")
    w = r["worst_setting"]
    setting = (
        f"{w['attack']}{' (adaptive)' if w['adaptive'] else ''} eps {fmt_eps(w['eps'])}"
        if w
        else "-"
    )
    row += [f"{fmt(r[f'worst_{m}'])} ({setting})", fmt(r[f"mean_worst_{m}_over_eps"])]
    row += [fmt(r["defense_s_per_image"], 3), fmt(r["adaptive_attack_s_per_image"], 3)]
    sur = r["surrogate"] or "-"
    row.append(f"{sur} ({r['eot_samples']})" if r["eot_samples"] else sur)
    return row


def _ranking_section(cells, kind: ReportKind) -> List[str]:
    ranking = defense_ranking(cells)
    if not any(r["defense"] != UNDEFENDED for r in ranking):
        return []
    m = kind.metric
    any_adaptive = any(c.is_adaptive for c in cells if not c.is_clean)
    md = ["", "## Defenses ranked by worst case", "", _ranking_intro(m, any_adaptive), ""]
    eps_values = [p["eps"] for p in ranking[0]["per_eps"]] if ranking else []
    header = ["rank", "defense", f"clean {m}", "cost"]
    header += [f"eps {fmt_eps(e)} unaware / adaptive" for e in eps_values]
    header += [f"worst {m} (setting)", f"mean worst {m}", "defense s/img", "adaptive attack s/img"]
    header += ["surrogate (EOT)"]
    md += md_table(header, [_ranking_row(r, m, any_adaptive) for r in ranking])
    if any_adaptive and any(not r["adaptively_evaluated"] and r["rank"] for r in ranking):
        md += ["", "† no adaptive attack on this defense: its worst case is an upper bound."]
    return md


def _attack_intro(group: Sequence[ResultCell], objective, adaptive: bool) -> str:
    surrogates = unique(
        f"{c.defense_name}: {c.surrogate or 'n/a'}"
        + (f", EOT {c.eot_samples}" if c.eot_samples else "")
        for c in group
    )
    how = (
        "adaptive (defense-aware) attack against model o defense, one pass per defense "
        "(BPDA surrogate, EOT samples: " + "; ".join(surrogates) + ")"
        if adaptive
        else "white-box on the undefended model"
    )
    return f"Objective: `{objective}`; {how}; random start: {bool(group[0].random_start)}."


def _ensemble_note(group: Sequence[ResultCell]) -> str:
    """Which ensembles a member's cells serve, or how an ensemble's cells were made."""
    serves = unique(e for c in group for e in (c.get("member_of") or []))
    if serves:
        names = ", ".join(f"`{e}`" for e in serves)
        return f"Member of {names}: the ensemble's table shows the worst case over its members."
    if group[0].get("members"):
        return (
            "Per image, the member prediction that lowers the data set's metric most (greedy "
            "selection); steps = iterations per image over all members."
        )
    return ""


def _attack_row(c: ResultCell, kind: ReportKind, ratio, clean: bool) -> List[str]:
    row = ["clean" if clean else fmt_eps(c.eps_value), c.defense_name]
    row += ["0", "-", "-"] if clean else [str(c.steps), fmt(c.step_size, 3), str(c.restart_count)]
    row += [fmt(c.get(m)) for m in kind.metrics] + [fmt(ratio, 3)]
    row += ["-" if clean else fmt(c.attack_s_per_image, 3)]
    row += ["-" if c.defense_name == UNDEFENDED else fmt(c.defense_s_per_image, 3)]
    return row + [str(c.num_images), str(c.num_failed)]


def _attack_sections(cells, kind: ReportKind) -> List[str]:
    """One long-format table per (attack, objective, adaptive): the clean row of each defense in
    the table, then a row per (eps, steps, restarts, defense)."""
    ratios = dict(zip(map(id, cells), metric_ratios(cells)))
    clean_cells = cell_order([c for c in cells if c.is_clean])
    tables = OrderedDict()
    for c in cell_order([c for c in cells if not c.is_clean]):
        tables.setdefault((c.attack, c.objective, c.is_adaptive), []).append(c)
    header = ["eps", "defense", "steps", "step size", "restarts", *kind.metrics]
    header += [f"{kind.metric} / clean", "attack s/img", "defense s/img", "images", "failed"]
    md = []
    # attacks run with several objectives are titled by objective too
    repeated = Counter(attack for attack, _ in {(a, o) for a, o, _ in tables})
    for (attack, objective, adaptive), group in tables.items():
        title = f"## Attack: {attack}" + (f" [{objective}]" if repeated[attack] > 1 else "")
        md += ["", title + (" (adaptive)" if adaptive else ""), ""]
        md += [_attack_intro(group, objective, adaptive), _ensemble_note(group), ""]
        defenses = {c.defense_name for c in group}
        body = [
            _attack_row(c, kind, ratios[id(c)], clean=True)
            for c in clean_cells
            if c.defense_name in defenses
        ]
        body += [_attack_row(c, kind, ratios[id(c)], clean=False) for c in group]
        md += md_table(header, body)
    return md


def _worst_case_section(cells, kind: ReportKind) -> List[str]:
    curves = worst_case_curve(cells)
    if not curves:
        return []
    m = kind.metric
    md = ["", "## Worst case over attacks", ""]
    md += [
        f"Lowest {m} over every attack (an ensemble such as `sea` counts like any attack), "
        "objective, step count and adaptive setting at each eps, per defense: the robustness "
        "curve of the strongest adversary that was run, and which attack reached it.",
        "",
        f"![worst-case {m} vs eps](worst_case_vs_eps.png)",
        "",
    ]
    defenses = list(curves)
    body = []
    for e in sorted({e for points in curves.values() for e, _ in points}):
        row = [fmt_eps(e)]
        for d in defenses:
            worst = next((c for pe, c in curves[d] if pe == e), None)
            row.append("-" if worst is None else f"{fmt(worst.score)} ({attack_label(worst)})")
        body.append(row)
    return md + md_table(["eps"] + [f"{d} worst {m} (attack)" for d in defenses], body)


def _checks_section(checks: Sequence[Dict], tol: float, metric: str) -> List[str]:
    md = ["", "## Sanity checks", ""]
    md.append(
        f"Tolerance: {tol:g} {metric} points (a stronger setting may score at most {tol:g} "
        f"points above a weaker one; an ensemble at most {ENSEMBLE_TOLERANCE:g} above its "
        "strongest member, rounding only). Clean counts as eps 0 of each defense's series. "
        "Violations are listed first and are never dropped."
    )
    md.append("")
    for c in sorted(checks, key=lambda c: c["passed"]):
        mark = "PASS" if c["passed"] else "**FAIL**"
        md.append(f"- {mark} `{c['check']}`: {c['detail']}")
    kinds = {c["check"].split(":")[0] for c in checks}
    absent = [k for k in CHECKS if k not in kinds]
    if absent:
        md += ["", "No applicable cells (check not run): " + ", ".join(f"`{k}`" for k in absent)]
        md[-1] += "."
    return md


def _failures_section(cells) -> List[str]:
    md = ["", "## Failures", ""]
    failed = [c for c in cell_order(cells) if c.failures or int(c.num_failed or 0)]
    if not failed:
        md.append("No image failed.")
    for c in failed:
        n_failed, n_ok = int(c.num_failed or 0), int(c.num_images or 0)
        md.append(
            f"- {attack_label(c)} eps={fmt_eps(c.eps_value)} defense={c.defense_name}: "
            f"{n_failed} failed of {n_ok + n_failed} images"
        )
        for f in c.failures or []:
            md.append(f"  - `{f.get('image_id')}`: {f.get('reason')}")
    return md


def markdown_report(
    cells: Sequence[ResultCell],
    kind: ReportKind,
    metadata: Dict,
    checks: Sequence[Dict],
    tol: float,
) -> str:
    """The Markdown text of the report (see the module docstring).

    Args:
        cells (list[ResultCell]): sweep cells of one model and task.
        kind (ReportKind): their :func:`~.cells.report_kind`.
        metadata (dict): run description; ``date``, ``hardware``, ``config_file`` and
            ``weights`` head the report, other keys are listed below them.
        checks (list[dict]): :func:`~.checks.sanity_checks` of the cells.
        tol (float): the checks' tolerance, in points of the headline metric.
    """
    md = _header(cells, kind, metadata, checks)
    md += _clean_section(cells, kind)
    md += _ranking_section(cells, kind)
    md += _attack_sections(cells, kind)
    md += _worst_case_section(cells, kind)
    md += size_section(cells, kind)
    md += per_class_section(cells, kind)
    md += _checks_section(checks, tol, kind.metric)
    md += _failures_section(cells)
    md.append("")
    return "\n".join(md)


def __getattr__(name):  # THREAT_MODEL: the attack kind's sentence, as before
    if name == "THREAT_MODEL":
        from ...threats.attack import AttackKind

        return AttackKind.threat_model
    raise AttributeError(name)
