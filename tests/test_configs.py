# Copyright (c) UPSNetRobust authors.
"""Every YAML under configs/ loads with the project's keys and builds a model."""
import glob
import os

import pytest
from conftest import REPO_ROOT, tiny_cfg
from detectron2.modeling import build_model

import upsnet_robust  # noqa: F401
from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_found():
    assert any(c.endswith("upsnet_tiny.yaml") for c in CONFIGS)
    assert any(c.endswith("upsnet_R_50_FPN.yaml") for c in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_config_loads_and_builds(path):
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, path, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE


def test_r50_config_matches_the_paper_setting():
    cfg = get_upsnet_cfg()
    merge_with_hints(
        cfg, os.path.join(REPO_ROOT, "configs/Cityscapes-PanopticSegmentation/upsnet_R_50_FPN.yaml")
    )
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 8
    assert cfg.INPUT.FORMAT == "BGR" and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    assert list(cfg.MODEL.PIXEL_MEAN) == [102.9801, 115.9465, 122.7717]
    assert cfg.INPUT.MIN_SIZE_TEST == 1024 and cfg.INPUT.MAX_SIZE_TEST == 2048
    assert cfg.SOLVER.MAX_ITER == 12000 and cfg.SOLVER.BASE_LR == 0.02


def test_unknown_key_error_names_source_and_suggests():
    with pytest.raises(KeyError, match=r"command-line opts.*MODEL\.UPSNET\.STUFF_AREA_LIMIT"):
        tiny_cfg("MODEL.UPSNET.STUFF_AREA_LIMT", "1")


@pytest.mark.parametrize("flags", [["--num-gpus", "2"], ["--eval-only"]])
def test_a_flag_after_the_key_value_pairs_is_named_as_such(flags):
    """``tools/attack_net.py --config-file X.yaml ROBUSTNESS.MAX_IMAGES 4 --num-gpus 2``: argparse
    puts the flag among the opts; the error says flags go before the pairs."""
    from detectron2.engine import default_argument_parser

    from upsnet_robust.engine import setup_cfg

    tiny = os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny.yaml")
    args = default_argument_parser().parse_args(
        ["--config-file", tiny, "ROBUSTNESS.MAX_IMAGES", "4", *flags]
    )
    assert args.opts[-len(flags):] == flags  # where argparse leaves it
    with pytest.raises(ValueError, match=f"'{flags[0]}' is a command-line flag written after the "
                                         "KEY VALUE pairs .*flags go before the pairs"):
        setup_cfg(args)
    cfg = get_upsnet_cfg()  # a negative value is a value, not a flag
    merge_with_hints(cfg, tiny, ["ROBUSTNESS.STEP_SIZE", "-1.0"])
    assert cfg.ROBUSTNESS.STEP_SIZE == -1.0
