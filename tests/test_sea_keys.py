# Copyright (c) UPSNetRobust authors.
"""Every ROBUSTNESS.SEA.* key at a non-default value, with the plain keys it stands for set the
other way, reaches what the members run with: the config each APGD is built from, the attack
that runs (its settings and objective) and the cells of a sweep on the tiny semantic FPN. A
member reading a plain key (ROBUSTNESS.RANDOM_START instead of ROBUSTNESS.SEA.RANDOM_START, ...)
fails here."""
import os

import pytest
import torch
from conftest import REPO_ROOT

from upsnet_robust.attacks import APGD

# plain keys: one way (a plain "apgd" pass runs with them) ...
PLAIN = [
    "ROBUSTNESS.OBJECTIVE", "masked_ce",
    "ROBUSTNESS.NUM_STEPS", "2",
    "ROBUSTNESS.RANDOM_START", "True",
    "ROBUSTNESS.APGD_RADIUS_SCHEDULE", "True",
    "ROBUSTNESS.EARLY_STOP", "True",
    "ROBUSTNESS.APGD_KEEP", "accuracy",
]  # fmt: skip
# ... every SEA key the other way, and off its default
SEA = [
    "ROBUSTNESS.SEA.MEMBERS", "['apgd:js_divergence', 'apgd:masked_spherical']",
    "ROBUSTNESS.SEA.NUM_STEPS", "3",
    "ROBUSTNESS.SEA.RANDOM_START", "False",
    "ROBUSTNESS.SEA.RADIUS_SCHEDULE", "False",
    "ROBUSTNESS.SEA.EARLY_STOP", "False",
    "ROBUSTNESS.SEA.KEEP", "loss",
    "ROBUSTNESS.SEA.FAST_MEMBERS", "['apgd:masked_ce']",
    "ROBUSTNESS.SEA.FAST_NUM_STEPS", "1",
]  # fmt: skip
# (objective, num_steps, random_start, radius_schedule, early_stop, keep) of each APGD run
MEMBER_RUNS = {
    ("js_divergence", 3, False, False, False, "loss"),
    ("masked_spherical", 3, False, False, False, "loss"),
    ("masked_ce", 1, False, False, False, "loss"),  # sea_fast's member
}
PLAIN_RUN = ("masked_ce", 2, True, True, True, "accuracy")


def test_every_sea_key_reaches_the_members(synthetic_cityscapes_root, tmp_path, monkeypatch):
    from detectron2.modeling import build_model

    from upsnet_robust.data import register_synthetic_cityscapes_semantic
    from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints
    from upsnet_robust.evaluation import RobustnessSweep

    defaults = get_upsnet_cfg().ROBUSTNESS.SEA
    changed = {SEA[i].split(".")[-1] for i in range(0, len(SEA), 2)}
    assert changed == set(defaults.keys())  # every SEA key is covered (a new one must be too)
    for i in range(0, len(SEA), 2):
        key = SEA[i].split(".")[-1]
        assert str(defaults[key]) != SEA[i + 1], key  # off its default

    built, ran = [], []
    original = APGD.from_config.__func__

    def from_config(cls, cfg, eps):
        built.append(cfg.clone())
        return original(cls, cfg, eps)

    def perturb(self, images, objective):
        ran.append((objective.name, self.num_steps, self.random_start, self.radius_schedule,
                    self.early_stop, self.keep))  # fmt: skip
        return perturb.original(self, images, objective)

    perturb.original = APGD.perturb
    monkeypatch.setattr(APGD, "from_config", classmethod(from_config))
    monkeypatch.setattr(APGD, "perturb", perturb)

    name = register_synthetic_cityscapes_semantic(
        synthetic_cityscapes_root, name_prefix="pytest_sea_keys"
    )[1]
    cfg = get_upsnet_cfg()
    merge_with_hints(
        cfg, os.path.join(REPO_ROOT, "configs", "Synthetic", "semantic_fpn_tiny.yaml"),
        ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path),
         "ROBUSTNESS.ATTACKS", "['sea', 'sea_fast', 'apgd']", "ROBUSTNESS.EPSILONS", "[8.0]",
         "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.INCLUDE_CLEAN", "False",
         "ROBUSTNESS.NUM_EXAMPLES", "0", "ROBUSTNESS.BATCH_SIZE", "2",
         "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
         *PLAIN, *SEA],
    )  # fmt: skip
    torch.manual_seed(0)
    cells = RobustnessSweep(cfg, build_model(cfg).eval(), "", str(tmp_path)).run()

    # the attacks that ran, and the configs they were built from
    assert set(ran) == MEMBER_RUNS | {PLAIN_RUN} and len(ran) == 4, ran
    read = {
        (r.OBJECTIVE, r.NUM_STEPS, r.RANDOM_START, r.APGD_RADIUS_SCHEDULE, r.EARLY_STOP,
         r.APGD_KEEP)
        for r in (c.ROBUSTNESS for c in built)
    }  # fmt: skip
    assert read == MEMBER_RUNS | {PLAIN_RUN}, read
    # the cells say the same
    member_cells = {c["objective"] + str(c["num_steps"]): c for c in cells if c.get("member_of")}
    assert set(member_cells) == {"js_divergence3", "masked_spherical3", "masked_ce1"}
    assert member_cells["masked_ce1"]["member_of"] == ["sea_fast"]
    assert member_cells["js_divergence3"]["member_of"] == ["sea"]
    for c in member_cells.values():
        assert c["attack"] == "apgd" and c["random_start"] is False, c
    (plain,) = [c for c in cells if c["attack"] == "apgd" and not c.get("member_of")]
    assert (plain["objective"], plain["num_steps"], plain["random_start"]) == ("masked_ce", 2, True)
    sea = {c["attack"]: c for c in cells if c["attack"] in ("sea", "sea_fast")}
    assert sea["sea"]["num_steps"] == 6 and sea["sea_fast"]["num_steps"] == 1
    assert sorted(m["objective"] for m in sea["sea"]["members"]) == [
        "js_divergence", "masked_spherical"
    ]  # fmt: skip
