# Copyright (c) UPSNetRobust authors.
"""No code outside a threat kind's own module (or the attack / objective's own definition)
branches on the name of a kind, an attack or an objective: checks and texts read declared
properties instead (``Attack.single_step``, ``Objective.targeted``, ``ThreatProperties``...).

An AST lint over the package: a comparison (``==``, ``!=``, ``in``, ``not in``) with a string
literal, a tuple/list/set of them, or a module constant bound to one, equal to a registered name
is a violation. A comparison with a ``task`` (a variable or attribute of that name) is not: task
names (``MODEL.TRANSFORMERS.TASK "panoptic"``) are another namespace that happens to share a word
with the ``panoptic`` objective."""
import ast
import os

import upsnet_robust
from upsnet_robust.attacks import ATTACK_REGISTRY, OBJECTIVE_REGISTRY
from upsnet_robust.threats import THREAT_REGISTRY, kinds

PACKAGE = os.path.dirname(upsnet_robust.__file__)
# Where a name may be compared: the module defining the attacks and objectives, and each kind's
# own module (a kind decides what its names mean).
ALLOWED = ("attacks" + os.sep,)


def registered_names():
    names = {n for n, _ in ATTACK_REGISTRY} | {n for n, _ in OBJECTIVE_REGISTRY}
    names |= {n for n, _ in THREAT_REGISTRY}
    for kind in kinds():
        names |= set(kind.names())
    # "attack" (the attack kind) is also the cells' key of a pass's name: comparing a key with it
    # is a lookup, not a branch on the kind
    return names - {"attack"}


def _kind_modules():
    """Each kind's module, and the modules / packages it declares its own (``own_modules``)."""
    out = set()
    for k in kinds():
        for name in (k.__module__, *k.own_modules):
            path = __import__(name, fromlist=["x"]).__file__
            if path.endswith("__init__.py"):  # a package: everything under it
                path = os.path.dirname(path) + os.sep
            out.add(os.path.relpath(path, PACKAGE) + (os.sep if path.endswith(os.sep) else ""))
    return out


def _strings(node, constants):
    """The string values a comparison operand stands for."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and node.id in constants:
        return [constants[node.id]]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for e in node.elts for v in _strings(e, constants)]
    return []


def _is_task(node) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name.lower() == "task"


def violations(source: str, names, where: str):
    tree = ast.parse(source)
    constants = {
        t.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for t in node.targets if isinstance(t, ast.Name)
    }  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if any(_is_task(o) for o in [node.left, *node.comparators]):
            continue
        for operand in [node.left, *node.comparators]:
            for value in _strings(operand, constants):
                if value in names:
                    found.append(f"{where}:{node.lineno}: compares against {value!r}")
    return found


def test_no_code_branches_on_a_threat_attack_or_objective_name():
    names = registered_names()
    assert {"fgsm", "apgd", "pgd", "least_likely", "sea", "sea_fast", "clean"} <= names
    own = _kind_modules()
    found = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), PACKAGE)
            if rel.startswith(ALLOWED) or rel in own or rel.startswith(tuple(own)):
                continue
            with open(os.path.join(root, f)) as fh:
                found += violations(fh.read(), names, rel)
    assert found == [], "\n".join(found)


def test_the_lint_catches_each_form():
    names = {"fgsm", "sea", "least_likely"}
    code = (
        "SINGLE = 'fgsm'\n"
        "a = x == 'sea'\n"
        "b = y in ('fgsm', 'pgd')\n"
        "c = z != SINGLE\n"
        "d = w == 'least_likely'\n"
        "e = v == 'none'\n"  # a defense name: not a threat, attack or objective
    )
    found = violations(code, names, "m.py")
    assert [f.split(": ")[1] for f in found] == [
        "compares against 'sea'", "compares against 'fgsm'", "compares against 'fgsm'",
        "compares against 'least_likely'",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ layering
#: What threats/ may use of evaluation/: the per-image statistics and the hook's settings
#: (below threats); the sweep, hook, checks, transfer and report are above it.
BELOW_THREATS = {
    "upsnet_robust.evaluation.breakdown",
    "upsnet_robust.evaluation.ensemble",
    "upsnet_robust.evaluation.panoptic_stats",
    "upsnet_robust.evaluation.semantic_stats",
    "upsnet_robust.evaluation.hook_settings",
}
LOWER_PACKAGES = ("attacks", "defenses", "adapters", "data", "modeling", "utils")


def _imports(path: str, module: str):
    """Absolute names of every module imported by ``path`` (function-level imports too)."""
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # ``from pkg import module``
    return {n for n in out if n.startswith("upsnet_robust")}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield path, rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_threats_sit_between_the_statistics_and_the_sweep():
    bad = []
    for path, module in _modules():
        imported = _imports(path, module)
        if module.startswith("upsnet_robust.threats"):
            above = {
                n for n in imported
                if n.startswith("upsnet_robust.evaluation") and n != "upsnet_robust.evaluation"
                and not any(n == b or n.startswith(b + ".") for b in BELOW_THREATS)
            }  # fmt: skip
            bad += [f"{module} imports {n} (above threats/)" for n in sorted(above)]
        parts = module.split(".")
        below = module in BELOW_THREATS or (
            len(parts) > 1 and parts[1] in LOWER_PACKAGES + ("tasks", "config"))  # fmt: skip
        if below:
            up = {n for n in imported if n.startswith(("upsnet_robust.threats",
                                                        "upsnet_robust.evaluation.sweep",
                                                        "upsnet_robust.evaluation.report"))}
            bad += [f"{module} imports {n} (below threats/)" for n in sorted(up)]
    assert bad == [], "\n".join(bad)
