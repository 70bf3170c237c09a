# Copyright (c) UPSNetRobust authors.
"""LazyConfig (.py) runs: the robustness node's defaults, hydra overrides, clear errors, and a
sweep through tools/attack_net.py's LazyConfig path equal to the same sweep from YAML."""
import os

import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.engine.lazy import (
    build_lazy_model,
    build_lazy_test_mapper,
    is_lazy_config,
    lazy_to_run_cfg,
    load_lazy_config,
    robustness_defaults,
)
from upsnet_robust.evaluation import run_robustness_sweep

LAZY = os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny_lazy.py")


def test_robustness_node_defaults_and_overrides():
    cfg = load_lazy_config(LAZY, ["robustness.epsilons=[1,4]", "robustness.defense.nlmeans.h=5"])
    assert list(cfg.robustness.epsilons) == [1, 4]
    assert cfg.robustness.attacks == ["fgsm", "ifgsm"]  # from the file
    assert cfg.robustness.seed == robustness_defaults()["seed"]  # unset: the default
    run = lazy_to_run_cfg(cfg)
    assert [float(e) for e in run.ROBUSTNESS.EPSILONS] == [1.0, 4.0]
    assert run.DEFENSE.NLMEANS.H == 5.0 and run.ROBUSTNESS.MAX_IMAGES == 4
    assert run.DATASETS.TEST == ("synthetic_cityscapes_fine_panoptic_val",)
    assert run.MODEL.WEIGHTS.endswith("upsnet_tiny_synthetic.pth") and run.INPUT.FORMAT == "BGR"
    assert "model_from_yaml" in run.MODEL.LAZY_CONFIG  # the fingerprint follows the model node
    assert is_lazy_config(LAZY) and not is_lazy_config("x.yaml")


def test_nested_robustness_nodes_sea():
    """ROBUSTNESS.SEA is a node of its own: robustness.sea.* keys and overrides reach it."""
    cfg = load_lazy_config(
        LAZY, ["robustness.attacks=[sea]", "robustness.sea.num_steps=7",
               "robustness.sea.members=[apgd:masked_ce]"]
    )  # fmt: skip
    run = lazy_to_run_cfg(cfg)
    assert list(run.ROBUSTNESS.ATTACKS) == ["sea"] and run.ROBUSTNESS.SEA.NUM_STEPS == 7
    assert list(run.ROBUSTNESS.SEA.MEMBERS) == ["apgd:masked_ce"]
    assert run.ROBUSTNESS.SEA.FAST_NUM_STEPS == robustness_defaults()["sea"]["fast_num_steps"]
    with pytest.raises(KeyError, match="robustness.sea.num_step"):
        load_lazy_config(LAZY, ["robustness.sea.num_step=7"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("robustness.epsilon=[1]", "robustness.epsilons"),
        ("robustness.defense.nlmean.h=3", "robustness.defense.nlmeans"),
    ],
)
def test_unknown_robustness_key_names_the_closest(override, expected):
    with pytest.raises(KeyError, match=expected):
        load_lazy_config(LAZY, [override])


def test_bad_robustness_value_is_rejected_at_load(tmp_path):
    with pytest.raises(Exception, match="MAX_IMAGES|max_images"):
        lazy_to_run_cfg(load_lazy_config(LAZY, ["robustness.max_images=[1,2]"]))


def test_missing_dataloader_test_node(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("model = dict(_target_='torch.nn.Identity')\ntrain = dict()\ndataloader = dict()\n")
    with pytest.raises(KeyError, match="dataloader.test"):
        load_lazy_config(str(path))


def test_lazy_sweep_equals_the_yaml_sweep(synthetic_cityscapes_names, tmp_path):
    """The LazyConfig path (instantiated model, the config's own mapper) scores exactly what the
    YAML path scores with the same weights and settings."""
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": build_model(tiny_cfg()).state_dict()}, weights)
    val = synthetic_cityscapes_names["val"]
    common = {"attacks": "[fgsm]", "epsilons": "[2.0]", "defenses": "[none]", "max_images": "2",
              "num_examples": "0", "seed": "3"}  # fmt: skip
    lazy = load_lazy_config(
        LAZY,
        [f"robustness.{k}={v}" for k, v in common.items()]
        + [
            f"dataloader.test.dataset.names={val}",
            f"train.init_checkpoint={weights}",
            f"train.output_dir={tmp_path / 'lazy'}",
            "dataloader.test.mapper.augmentations.0.short_edge_length=64",
            "dataloader.test.mapper.augmentations.0.max_size=128",
        ],
    )
    model, run = build_lazy_model(lazy)
    assert run.MODEL.META_ARCHITECTURE == "UPSNet"
    cells_lazy = run_robustness_sweep(run, model, mapper=build_lazy_test_mapper(lazy))["cells"]

    opts = []
    for k, v in common.items():
        opts += [f"ROBUSTNESS.{k.upper()}", v.replace("[fgsm]", "['fgsm']").replace("[none]", "['none']")]
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{val}',)", "MODEL.WEIGHTS", weights,
        "OUTPUT_DIR", str(tmp_path / "yaml"), "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0", *opts,
    )  # fmt: skip
    from upsnet_robust.engine import build_checkpointer

    net = build_model(cfg)
    build_checkpointer(cfg, net).load(weights)
    cells_yaml = run_robustness_sweep(cfg, net.eval())["cells"]

    def key(c):
        return (c["attack"], c["eps"], c["defense"])

    assert sorted(map(key, cells_lazy)) == sorted(map(key, cells_yaml)) and len(cells_lazy) == 2
    for a, b in zip(sorted(cells_lazy, key=key), sorted(cells_yaml, key=key)):
        assert a["num_images"] == b["num_images"] == 2
        for m in ("PQ", "SQ", "RQ"):
            assert a[m] == pytest.approx(b[m], abs=1e-6), (key(a), m)
