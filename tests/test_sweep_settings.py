# Copyright (c) UPSNetRobust authors.
"""Behaviour of the sweep's settings that change how, not what, it computes: ROBUSTNESS.AMP
(bfloat16 autocast on the CPU), CHANNELS_LAST and DIFF_AMPLIFICATION, each against a plain
float32 run of the shipped tiny UPSNet under FGSM on 2 synthetic images."""
import glob
import json
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SMALL_TEST_OPTS, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.engine import build_checkpointer
from upsnet_robust.evaluation import RobustnessSweep, run_robustness_sweep
from upsnet_robust.evaluation.examples import LABEL_HEIGHT, TITLE_HEIGHT

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
EPS = 4.0
pytestmark = pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="needs the shipped tiny UPSNet")


def _cfg(names, out, *opts):
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{names['val']}',)", "MODEL.WEIGHTS", SHIPPED, "OUTPUT_DIR", str(out),
        "ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", f"[{EPS}]",
        "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.NUM_EXAMPLES", "2",
        *SMALL_TEST_OPTS, *opts,
    )  # fmt: skip
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(SHIPPED)
    return cfg, model.eval()


def _sweep(names, out, *opts, dtypes=None):
    """Cells and {image_id: adversarial image} of a sweep; ``dtypes`` collects the dtype of the
    first convolution's output at every call, with whether gradients were on (the attack)."""
    cfg, model = _cfg(names, out, *opts)
    if dtypes is not None:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(
            lambda m, i, o: dtypes.append((torch.is_grad_enabled(), o.dtype))
        )
    images = {}

    def keep(spec, x, clean, adv, defended, outputs):
        images[x["image_id"]] = (clean.detach().float(), adv.detach().float())

    cells = RobustnessSweep(cfg, model, SHIPPED, str(out), keep).run()
    return {c["attack"]: c for c in cells}, images


@pytest.fixture(scope="module")
def float32_run(synthetic_cityscapes_names, tmp_path_factory):
    return _sweep(synthetic_cityscapes_names, tmp_path_factory.mktemp("fp32"))


def test_amp_bfloat16_attacks_in_bfloat16_and_scores_in_float32(
    synthetic_cityscapes_names, float32_run, tmp_path
):
    """bfloat16 keeps 8 bits of mantissa, so gradient components near zero change sign: FGSM's
    image (x + eps sign g) differs from float32's on some pixels. Measured on 4 val images: 7-18 %
    of the values differ and PQ moved by 0.4 (64.97 clean, 60.08 float32, 59.70 bfloat16). The
    test asks for at least half the values equal, at least one different, and PQ within 3."""
    cells32, images32 = float32_run
    dtypes = []
    cells, images = _sweep(synthetic_cityscapes_names, tmp_path, "ROBUSTNESS.AMP", "bfloat16",
                           dtypes=dtypes)  # fmt: skip
    attack = {d for grad, d in dtypes if grad}
    inference = {d for grad, d in dtypes if not grad}
    assert attack == {torch.bfloat16} and inference == {torch.float32}
    assert cells["clean"]["PQ"] == cells32["clean"]["PQ"]  # inference and scoring: float32
    assert images.keys() == images32.keys() and len(images) == 2
    same = []
    for key, (clean, adv) in images.items():
        assert torch.equal(clean, images32[key][0])
        assert (adv - clean).abs().max() <= EPS + 1e-4
        same.append(float((adv == images32[key][1]).float().mean()))
    assert 0.5 < min(same) and max(same) < 1.0, same
    assert cells["fgsm"]["PQ"] == pytest.approx(cells32["fgsm"]["PQ"], abs=3.0)


def _panel(grid, row, col, h, w):
    top = TITLE_HEIGHT + row * (LABEL_HEIGHT + h) + LABEL_HEIGHT
    return grid[top : top + h, col * w : (col + 1) * w].astype(np.int64)


def test_channels_last_and_diff_amplification_through_run_robustness_sweep(
    synthetic_cityscapes_names, float32_run, tmp_path
):
    """CHANNELS_LAST: the model's convolutions run channels-last and the cells equal the
    contiguous run's up to float rounding (the same sums in another order: PQ within 0.5).
    DIFF_AMPLIFICATION 37: each example's difference panel is 37 |x_adv - x| of its clean and
    adversarial panels (FGSM at an integer eps on uint8 images: integer values, no rounding)."""
    cells32, _ = float32_run
    cfg, model = _cfg(synthetic_cityscapes_names, tmp_path, "ROBUSTNESS.CHANNELS_LAST", "True",
                      "ROBUSTNESS.DIFF_AMPLIFICATION", "37.0")  # fmt: skip
    formats = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last))
    )
    result = run_robustness_sweep(cfg, model)
    assert formats and all(formats)
    cells = {c["attack"]: c for c in result["cells"]}
    for name in ("clean", "fgsm"):
        assert cells[name]["PQ"] == pytest.approx(cells32[name]["PQ"], abs=0.5), name
    with open(os.path.join(cfg.OUTPUT_DIR, "robustness.json")) as f:
        assert json.load(f)["metadata"]["channels_last"] is True
    grids = sorted(glob.glob(os.path.join(cfg.OUTPUT_DIR, "examples", "fgsm_eps4_*.png")))
    assert len(grids) == 2
    for path in grids:
        grid = cv2.imread(path)
        h, w = (grid.shape[0] - TITLE_HEIGHT) // 2 - LABEL_HEIGHT, grid.shape[1] // 3
        clean, adv = _panel(grid, 0, 0, h, w), _panel(grid, 1, 0, h, w)
        diff = _panel(grid, 1, 2, h, w)
        assert (adv != clean).any()
        np.testing.assert_array_equal(diff, np.clip(37 * np.abs(adv - clean), 0, 255))
