# Copyright (c) UPSNetRobust authors.
"""Threat kinds: the pass expansion shared by sweep, Trainer and transfer; a cache key that
covers every argument an attack is built with (so a resume never reuses stale images); cells
that record the attack's real steps; checks that read declared properties, not names; and the
docs/EXTENDING.md attack example loaded as a plug-in, run as written."""
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from upsnet_robust.attacks import ATTACK_REGISTRY, Attack, build_attack, register_attack
from upsnet_robust.config import _CONFIG_FUNCTIONS
from upsnet_robust.engine import get_upsnet_cfg, load_plugins
from upsnet_robust.evaluation.report import sanity_checks
from upsnet_robust.threats import expand_threats
from upsnet_robust.threats.attack import AttackKind

DOCS = os.path.join(REPO_ROOT, "docs", "EXTENDING.md")


def _changed(value):
    """A different value of the same kind (a generator: another seed)."""
    if isinstance(value, torch.Generator):
        return torch.Generator().manual_seed(value.initial_seed() + 1)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_other"
    if value is None:
        return 1.5
    raise AssertionError(f"no changed value for {value!r}")


def test_every_attack_key_covers_every_argument_it_is_built_with(monkeypatch):
    cfg = get_upsnet_cfg()
    names = sorted(n for n, _ in ATTACK_REGISTRY)
    assert {"fgsm", "pgd", "apgd", "illc", "mifgsm", "segpgd", "cospgd"} <= set(names)
    for name in names:
        cls = ATTACK_REGISTRY.get(name)
        build_attack(cfg, name, 4.0)  # every registered attack builds from the defaults
        spec = AttackKind.spec(cfg, name, 4.0)
        base = AttackKind.cache_key(cfg, spec)
        args = cls.from_config(cfg, 4.0)
        assert "eps" in args
        for arg, value in args.items():
            changed = dict(args, **{arg: _changed(value)})
            monkeypatch.setattr(cls, "from_config", classmethod(lambda c, cfg, eps: changed))
            assert AttackKind.cache_key(cfg, spec) != base, (name, arg)
            monkeypatch.undo()
        assert AttackKind.cache_key(cfg, spec) == base  # restored: deterministic
        other = spec.replace(objective="masked_ce" if spec.objective != "masked_ce" else "js")
        assert AttackKind.cache_key(cfg, other) != base, name  # the objective is in the key


def test_every_config_setting_an_attack_reads_moves_its_key():
    """Each ROBUSTNESS setting changed in turn: whenever it changes what from_config builds an
    attack with, the attack's key changes (nothing is hand-listed)."""
    cfg = get_upsnet_cfg()
    moved = set()
    for key, value in cfg.ROBUSTNESS.items():
        if isinstance(value, (list, tuple)) or not isinstance(value, (bool, int, float)):
            continue
        other = cfg.clone()
        other.ROBUSTNESS[key] = _changed(value)
        for name, cls in ATTACK_REGISTRY:
            a = AttackKind.cache_key(cfg, AttackKind.spec(cfg, name, 4.0))
            b = AttackKind.cache_key(other, AttackKind.spec(other, name, 4.0))
            from_cfg = repr(cls.from_config(cfg, 4.0)) != repr(cls.from_config(other, 4.0))
            seeds = key == "SEED" and "generator" in cls.from_config(cfg, 4.0)
            if from_cfg or seeds:
                assert a != b, (name, key)
                moved.add(key)
    assert {"NUM_STEPS", "STEP_SIZE", "APGD_RHO", "APGD_MOMENTUM", "MOMENTUM", "SEED",
            "EARLY_STOP", "RESTARTS", "RANDOM_START", "APGD_RADIUS_SCHEDULE"} <= moved  # fmt: skip


def test_one_expansion_for_sweep_trainer_and_transfer():
    cfg = get_upsnet_cfg()
    cfg.merge_from_list(["ROBUSTNESS.ATTACKS", "['fgsm', 'illc', 'sea']", "ROBUSTNESS.EPSILONS",
                         "[2.0]", "ROBUSTNESS.DEFENSES", "['none', 'median']",
                         "ROBUSTNESS.ADAPTIVE", "True"])  # fmt: skip
    specs = expand_threats(cfg)
    kinds = [s.kind for s in specs]
    assert kinds[0] == "clean" and kinds[-1] == "sea"
    plain = [(s.name, s.objective, s.adaptive) for s in specs if s.kind == "attack"]
    assert ("illc", "least_likely", None) in plain  # the required objective, resolved once
    assert ("fgsm", "train_losses", "median") in plain
    sea = specs[-1]
    assert [m.objective for m in sea.members] == [
        "masked_ce", "balanced_masked_ce", "js_divergence", "masked_spherical"]  # fmt: skip
    assert all(dict(m.overrides)["NUM_STEPS"] == 100 for m in sea.members)
    with pytest.raises(ValueError, match="'sea' in ROBUSTNESS.ATTACKS is an ensemble"):
        expand_threats(cfg, include_clean=False, include_adaptive=False, combining=False)
    cfg.ROBUSTNESS.ATTACKS = ["fgsm", "nope"]
    with pytest.raises(ValueError, match="Unknown attack 'nope'.*sea_fast"):
        expand_threats(cfg)


def _cell(attack, score, threat=None, **kw):
    cell = {"attack": attack, "objective": "semantic_ce", "eps": 4.0, "defense": "none",
            "task": "sem_seg", "mIoU": score, "num_steps": 1}  # fmt: skip
    if threat is not None:
        cell["threat"] = threat
    return dict(cell, **kw)


def test_a_single_step_attack_registered_under_a_new_name_gets_the_check():
    @register_attack("pytest_one_shot")
    class OneShot(Attack):
        single_step = True

    try:
        cells = [_cell("clean", 60.0, eps=0.0), _cell("pytest_one_shot", 30.0),
                 _cell("pgd", 40.0, num_steps=10)]  # fmt: skip
        checks = [c for c in sanity_checks(cells) if c["check"].startswith("iterative_vs")]
        assert len(checks) == 1 and not checks[0]["passed"], checks
        assert "pgd" in checks[0]["detail"] and "pytest_one_shot" in checks[0]["detail"]
        # a cell that is neither single-step nor iterative (a corruption) is held against none
        corrupted = _cell("pytest_blur", 10.0, threat={"kind": "pytest", "eps_bounded": False})
        cells = [_cell("clean", 60.0, eps=0.0), _cell("pytest_one_shot", 30.0), corrupted]
        assert not [c for c in sanity_checks(cells) if c["check"].startswith("iterative_vs")]
        assert all(c["passed"] for c in sanity_checks(cells))
    finally:
        ATTACK_REGISTRY._obj_map.pop("pytest_one_shot")


def test_an_attack_declares_its_own_config_keys():
    from detectron2.config import CfgNode

    @register_attack("pytest_own_key")
    class OwnKey(Attack):
        @staticmethod
        def add_config(cfg):
            cfg.ROBUSTNESS.PYTEST_OWN_KEY = CfgNode({"SCALE": 0.5})

        def __init__(self, eps, scale=1.0):
            super().__init__(eps)
            self.scale = scale

        @classmethod
        def from_config(cls, cfg, eps):
            return {"eps": eps, "scale": cfg.ROBUSTNESS.PYTEST_OWN_KEY.SCALE}

    before = list(_CONFIG_FUNCTIONS)
    try:
        cfg = get_upsnet_cfg()
        cfg.merge_from_list(["ROBUSTNESS.PYTEST_OWN_KEY.SCALE", "0.25"])
        assert build_attack(cfg, "pytest_own_key", 2.0).scale == 0.25
    finally:
        ATTACK_REGISTRY._obj_map.pop("pytest_own_key")
        _CONFIG_FUNCTIONS[:] = [f for f in before if f is not OwnKey.add_config]


def test_apgd_baseline_check_reads_the_declared_baseline():
    cells = [_cell("pgd", 30.0, num_steps=10), _cell("apgd", 35.0, num_steps=10)]
    (check,) = [c for c in sanity_checks(cells) if c["check"].startswith("apgd_vs_pgd")]
    assert not check["passed"] and "apgd WEAKER than pgd" in check["detail"]


# ------------------------------------------------------------------------------ the docs example
def _docs_block(title: str) -> str:
    text = open(DOCS).read()
    section = text[text.index(f"## {title}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def docs_attack(tmp_path):
    """docs/EXTENDING.md's attack example, written to a file and loaded as a plug-in."""
    path = tmp_path / "my_attacks.py"
    path.write_text(_docs_block("An attack"))
    before = list(_CONFIG_FUNCTIONS)
    (module,) = load_plugins([str(path)])
    try:
        yield module
    finally:
        ATTACK_REGISTRY._obj_map.pop("split_fgsm", None)
        _CONFIG_FUNCTIONS[:] = before


def _semantic_sweep(root, out, *opts):
    from detectron2.modeling import build_model

    from upsnet_robust.data import register_synthetic_cityscapes_semantic
    from upsnet_robust.engine import merge_with_hints
    from upsnet_robust.evaluation import RobustnessSweep

    name = register_synthetic_cityscapes_semantic(root, name_prefix="pytest_threats")[1]
    cfg = get_upsnet_cfg()  # the plug-in's add_config ran: ROBUSTNESS.SPLIT_FGSM exists
    merge_with_hints(
        cfg, os.path.join(REPO_ROOT, "configs", "Synthetic", "semantic_fpn_tiny.yaml"),
        ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(out), "ROBUSTNESS.MAX_IMAGES", "2",
         "ROBUSTNESS.ATTACKS", "['split_fgsm']", "ROBUSTNESS.OBJECTIVE", "semantic_ce",
         "ROBUSTNESS.EPSILONS", "[8.0]", "ROBUSTNESS.DEFENSES", "['none']",
         "ROBUSTNESS.INCLUDE_CLEAN", "False", "INPUT.MIN_SIZE_TEST", "32",
         "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0", *opts],
    )  # fmt: skip
    torch.manual_seed(0)
    return RobustnessSweep(cfg, build_model(cfg).eval(), "", str(out))


def test_docs_attack_runs_as_written_and_a_changed_setting_is_recomputed(
    docs_attack, synthetic_cityscapes_root, tmp_path, monkeypatch
):
    calls = []
    perturb = docs_attack.SplitFGSM.perturb

    def counted(self, images, objective):
        calls.append(self.num_steps)
        return perturb(self, images, objective)

    monkeypatch.setattr(docs_attack.SplitFGSM, "perturb", counted)
    sweep = _semantic_sweep(synthetic_cityscapes_root, tmp_path)
    (cell,) = sweep.run()
    # the cell states the attack's real steps: 2 steps of eps / 2, not "1 step of size eps"
    assert (cell["attack"], cell["num_steps"], cell["step_size"]) == ("split_fgsm", 2, 4.0)
    assert cell["attack_passes_per_image"] == 0.0 and calls == [2, 2]  # 2 images, batch 1
    # resumed with the same settings: loaded, nothing recomputed
    calls.clear()
    assert _semantic_sweep(synthetic_cityscapes_root, tmp_path).run() == [cell]
    assert calls == []
    # one setting of the plug-in changed: another key, the pass is recomputed with it
    other = _semantic_sweep(synthetic_cityscapes_root, tmp_path, "ROBUSTNESS.SPLIT_FGSM.STEPS", "4")
    (changed,) = other.run()
    assert calls == [4, 4] and (changed["num_steps"], changed["step_size"]) == (4, 2.0)
    spec = other.passes[0]
    assert other._pass_key(spec) != sweep._pass_key(spec)
    assert len(os.listdir(sweep.cache_root)) == 2


def test_a_setting_left_out_of_describe_still_moves_the_key(
    docs_attack, synthetic_cityscapes_root, tmp_path, monkeypatch
):
    """The stale-cache defect: an attack whose describe() omits a setting it reads in
    from_config. The key follows from_config, and the cells its real arguments."""
    monkeypatch.setattr(docs_attack.SplitFGSM, "describe", lambda self: {"name": self.name})
    first = _semantic_sweep(synthetic_cityscapes_root, tmp_path)
    (a,) = first.run()
    second = _semantic_sweep(synthetic_cityscapes_root, tmp_path, "ROBUSTNESS.SPLIT_FGSM.STEPS", "3")
    (b,) = second.run()
    assert first._pass_key(first.passes[0]) != second._pass_key(second.passes[0])
    assert (a["num_steps"], b["num_steps"]) == (2, 3)
    assert b["step_size"] == pytest.approx(8.0 / 3)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_plugin_is_imported_before_the_yaml_is_merged(tmp_path, how):
    """tools/attack_net.py --plugin FILE (or UPSNET_PLUGINS): the plug-in's config key merges
    from a YAML file and its attack builds with it."""
    (tmp_path / "my_attacks.py").write_text(_docs_block("An attack"))
    (tmp_path / "cfg.yaml").write_text(
        f"OUTPUT_DIR: {tmp_path / 'out'}\nROBUSTNESS:\n  ATTACKS: ['split_fgsm']\n"
        "  SPLIT_FGSM:\n    STEPS: 3\n"
    )
    code = (
        "import sys; sys.path.insert(0, 'tools'); import attack_net\n"
        "from detectron2.engine import default_argument_parser\n"
        "from upsnet_robust.engine import add_plugin_argument, setup_cfg\n"
        "args = add_plugin_argument(default_argument_parser()).parse_args(sys.argv[1:])\n"
        "cfg = setup_cfg(args)\n"
        "from upsnet_robust.attacks import build_attack\n"
        "print('STEPS', cfg.ROBUSTNESS.SPLIT_FGSM.STEPS, build_attack(cfg, 'split_fgsm', 6.0))\n"
    )
    plugin = str(tmp_path / "my_attacks.py")
    flag = ["--plugin", plugin] if how == "flag" else []
    env = dict(os.environ, **({"UPSNET_PLUGINS": plugin} if how == "env" else {}))
    proc = subprocess.run(
        [sys.executable, "-c", code, *flag, "--config-file", str(tmp_path / "cfg.yaml")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS 3 SplitFGSM(eps=6.0, num_steps=3, step_size=2.0" in proc.stdout


def test_every_tool_takes_the_plugin_flag():
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import transfer_net
        from detectron2.engine import default_argument_parser

        from upsnet_robust.engine import add_plugin_argument
    finally:
        sys.path.pop(0)
    args = transfer_net.argument_parser().parse_args(
        ["--config-file", "a.yaml", "--output-dir", "o", "--plugin", "p.py", "--plugin", "q"]
    )
    assert args.plugin == ["p.py", "q"] and args.opts == []
    args = add_plugin_argument(default_argument_parser()).parse_args(["--plugin", "m"])
    assert args.plugin == ["m"]  # attack_net and train_net's parser
    for tool in ("attack_net.py", "train_net.py", "transfer_net.py"):
        assert "add_plugin_argument" in open(os.path.join(REPO_ROOT, "tools", tool)).read()
    with pytest.raises(ImportError, match="Plug-in 'no_such_plugin_module'"):
        load_plugins(["no_such_plugin_module"])
    with pytest.raises(ImportError, match="no such file"):
        load_plugins(["missing_plugin.py"])


def test_docs_threat_kind_is_the_extension_toy():
    toys = open(os.path.join(REPO_ROOT, "tests", "extension_toys.py")).read()
    block = _docs_block("A threat kind")
    body = block[block.index("@register_config"):]
    assert body.strip() in toys


class PytestModel(torch.nn.Module):
    """Returns its input's first channel as 'sem_seg' (scaled by a weight, so it has one)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, inputs):
        return [{"sem_seg": x["image"].float()[:1] * self.w} for x in inputs]


def test_the_hook_builds_no_objective_for_a_step_that_needs_none():
    from upsnet_robust.adapters import ModelAdapter, register_adapter
    from upsnet_robust.adapters.base import ADAPTER_REGISTRY
    from upsnet_robust.evaluation import AdversarialInference
    from upsnet_robust.threats import ImageStep, StepResult

    class Brighten(ImageStep):
        def __call__(self, inputs, images):
            return StepResult([(im + 10).clamp(0, 255) for im in images])

    register_adapter("PytestModel")(type("PytestAdapter", (ModelAdapter,), {"task": "sem_seg"}))
    try:
        seen = []
        hook = AdversarialInference(
            PytestModel(), Brighten(), on_image=lambda x, c, a, d, o: seen.append(a)
        )
        image = torch.full((3, 4, 5), 250, dtype=torch.uint8)
        # no ground truth at all: building any objective would fail
        out = hook([{"image": image, "image_id": 1}])
    finally:
        ADAPTER_REGISTRY._obj_map.pop("PytestModel")
    assert torch.equal(seen[0], torch.full((3, 4, 5), 255.0))
    assert torch.equal(out[0]["none"]["sem_seg"], torch.full((1, 4, 5), 255.0))
    assert hook.records[0]["failure"] is None


def test_a_kind_with_a_prepare_phase_fits_once_and_resumes(synthetic_cityscapes_root, tmp_path):
    """The phase universal perturbations and patches use: ``prepare`` stores its result in the
    pass's cache directory before the pass, the image step reads it; a resumed sweep neither
    prepares nor recomputes a finished pass."""
    from upsnet_robust.threats import ImageStep, StepResult, ThreatKind, ThreatSpec
    from upsnet_robust.threats import register_threat
    from upsnet_robust.threats.registry import _ORDER, THREAT_REGISTRY

    fitted = []

    class AddStored(ImageStep):
        def __init__(self, delta):
            self.delta = delta

        def __call__(self, inputs, images):
            return StepResult([(im + self.delta.to(im.device)).clamp(0, 255) for im in images])

    @register_threat("pytest_universal")
    class Universal(ThreatKind):
        threat_model = "one stored perturbation for every image"

        @classmethod
        def expand(cls, cfg, include_adaptive=True):
            return [ThreatSpec(cls.name, "pytest_universal")]

        @classmethod
        def prepare(cls, cfg, spec, context, cache_dir):
            path = os.path.join(cache_dir, "delta.pt")
            if not os.path.isfile(path):
                fitted.append(cache_dir)
                os.makedirs(cache_dir, exist_ok=True)
                torch.save(torch.full((3, 1, 1), 20.0), path)

        @classmethod
        def image_step(cls, spec, context):
            return AddStored(torch.load(os.path.join(context.cache_dir, "delta.pt")))

    try:
        # the image step finds the pass's directory through its context
        sweep = _semantic_sweep(synthetic_cityscapes_root, tmp_path, "ROBUSTNESS.ATTACKS", "[]")
        (cell,) = sweep.run()
        assert cell["attack"] == "pytest_universal" and cell["threat"]["kind"] == "pytest_universal"
        assert len(fitted) == 1 and os.path.basename(fitted[0]).startswith("pytest_universal_")
        again = _semantic_sweep(synthetic_cityscapes_root, tmp_path, "ROBUSTNESS.ATTACKS", "[]")
        assert again.run() == [cell] and len(fitted) == 1
    finally:
        THREAT_REGISTRY._obj_map.pop("pytest_universal")
        _ORDER.remove("pytest_universal")


def test_a_kind_declares_its_own_config_keys():
    from upsnet_robust.threats import ThreatKind, ThreatSpec, register_threat
    from upsnet_robust.threats.registry import _ORDER, THREAT_REGISTRY

    @register_threat("pytest_levels")
    class Levels(ThreatKind):
        @staticmethod
        def add_config(cfg):
            cfg.ROBUSTNESS.PYTEST_LEVELS = [1]

        @classmethod
        def expand(cls, cfg, include_adaptive=True):
            return [ThreatSpec.make(cls.name, "pytest_levels", params={"level": v})
                    for v in cfg.ROBUSTNESS.PYTEST_LEVELS]  # fmt: skip

    before = [f for f in _CONFIG_FUNCTIONS if f is not Levels.add_config]
    try:
        cfg = get_upsnet_cfg()
        cfg.merge_from_list(["ROBUSTNESS.PYTEST_LEVELS", "[2, 3]", "ROBUSTNESS.ATTACKS", "[]"])
        specs = expand_threats(cfg)
        assert [s.param("level") for s in specs if s.kind == "pytest_levels"] == [2, 3]
    finally:
        THREAT_REGISTRY._obj_map.pop("pytest_levels")
        _ORDER.remove("pytest_levels")
        _CONFIG_FUNCTIONS[:] = before
