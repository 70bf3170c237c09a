# Copyright (c) UPSNetRobust authors.
"""The model boundary: adapter lookup and registration, objectives on a toy adapter against a
float64 hand computation, set-up checks that reject before any data is read, and the cached
output forms the evaluators score."""
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from upsnet_robust.adapters import (
    DENSE_LOGITS,
    AdapterInference,
    ModelAdapter,
    UnsupportedModelError,
    adapter_class,
    as_adapter,
    register_adapter,
)
from upsnet_robust.attacks import IFGSM
from upsnet_robust.attacks.objectives import build_objective
from upsnet_robust.evaluation.checks import check_attack_objective
from upsnet_robust.evaluation.evaluators import PanopticSemSegEvaluator
from upsnet_robust.evaluation.outputs import compact_outputs, expand_outputs
from upsnet_robust.modeling import UPSNet, UPSNetAdapter


class ToySegmenter(nn.Module):
    """A 1x1-conv 'segmenter' with 3 classes: logits = W x + b per pixel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, inputs):
        return [{"sem_seg": self.conv(x["image"].float()[None] / 255.0)[0]} for x in inputs]


@register_adapter("ToySegmenter")
class ToySegmenterAdapter(ModelAdapter):
    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    def dense_logits(self, images):
        return [self.model.conv(im[None] / 255.0)[0] for im in images]


def _toy_inputs(n=2, h=5, w=7):
    g = torch.Generator().manual_seed(1)
    return [
        {"image": torch.rand(3, h, w, generator=g) * 255, "image_id": f"t{i}",
         "sem_seg": torch.randint(0, 3, (h, w), generator=g)}
        for i in range(n)
    ]  # fmt: skip


def test_lookup_by_class_then_bases():
    assert adapter_class(build_model(tiny_cfg())) is UPSNetAdapter

    class MyUPSNet(UPSNet):
        pass

    assert adapter_class("UPSNet") is UPSNetAdapter
    assert adapter_class(MyUPSNet.__new__(MyUPSNet)) is UPSNetAdapter  # a subclass: the base's
    with pytest.raises(UnsupportedModelError, match=r"'Conv2d'.*Adapters exist for: .*UPSNet"):
        adapter_class(nn.Conv2d(1, 1, 1))


def test_register_adapter_takes_adapters_only():
    with pytest.raises(TypeError, match="ModelAdapter"):
        register_adapter("Nothing")(object)
    with pytest.raises(ValueError, match="at least one"):
        register_adapter()


def test_dense_objective_on_a_toy_adapter_matches_float64():
    model = ToySegmenter()
    inputs = _toy_inputs()
    objective = build_objective("semantic_ce", model, inputs)
    x = torch.stack([v["image"] for v in inputs])
    value = objective(x)
    w = model.conv.weight.detach().double()[:, :, 0, 0]
    b = model.conv.bias.detach().double()
    for i, v in enumerate(inputs):
        logits = torch.einsum("kc,chw->khw", w, v["image"].double() / 255.0) + b[:, None, None]
        logp = logits - torch.logsumexp(logits, dim=0, keepdim=True)
        expected = -logp.gather(0, v["sem_seg"][None]).mean()
        assert float(value[i]) == pytest.approx(float(expected), rel=1e-5)
    # an attack through the adapter raises the objective and stays in the eps-ball
    adv = IFGSM(2.0).perturb(x, objective)
    assert (adv - x).abs().max() <= 2.0 + 1e-4 and (objective(adv) > value).all()


def test_capabilities_are_checked_at_set_up():
    toy = as_adapter(ToySegmenter())
    with pytest.raises(UnsupportedModelError, match=r"ToySegmenter.*'pgd'.*'train_losses'.*semantic_ce"):
        check_attack_objective(toy, "pgd", "train_losses")
    with pytest.raises(UnsupportedModelError, match="panoptic"):
        build_objective("panoptic", toy, _toy_inputs())
    upsnet = as_adapter(build_model(tiny_cfg()))
    with pytest.raises(UnsupportedModelError, match=r"UPSNet.*'segpgd'.*'train_losses'.*semantic_ce"):
        check_attack_objective(upsnet, "segpgd", "train_losses")
    with pytest.raises(UnsupportedModelError, match="cospgd.*least_likely"):
        check_attack_objective(upsnet, "cospgd", "least_likely")
    assert check_attack_objective(upsnet, "illc", "train_losses") == "least_likely"
    assert check_attack_objective(upsnet, "segpgd", "semantic_ce") == "semantic_ce"


def test_sweep_rejects_before_reading_data(synthetic_cityscapes_names, tmp_path, monkeypatch):
    from upsnet_robust.evaluation import RobustnessSweep

    cfg = tiny_cfg("DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
                   "ROBUSTNESS.ATTACKS", "['segpgd']", "OUTPUT_DIR", str(tmp_path))  # fmt: skip
    read = []
    monkeypatch.setattr(DatasetCatalog, "get", lambda name: read.append(name))
    with pytest.raises(UnsupportedModelError, match="segpgd"):
        RobustnessSweep(cfg, build_model(cfg).eval(), "", str(tmp_path))
    cfg.defrost()
    cfg.DATASETS.TEST = ("no_such_data",)
    with pytest.raises(KeyError, match="no_such_data"):
        RobustnessSweep(cfg, build_model(cfg).eval(), "", str(tmp_path))
    assert read == []


def test_adapter_inference_module_follows_the_model_mode():
    model = ToySegmenter()
    wrapped = AdapterInference(as_adapter(model))
    wrapped.eval()
    assert not model.training
    out = wrapped(_toy_inputs(1))
    assert out[0]["sem_seg"].shape == (3, 5, 7)


def test_cached_instances_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    inst = Instances((9, 11))
    inst.pred_boxes = Boxes(torch.rand(3, 4, generator=g) * 9)
    inst.scores = torch.rand(3, generator=g)
    inst.pred_classes = torch.tensor([0, 4, 2])
    inst.pred_masks = torch.rand(3, 9, 11, generator=g) > 0.5
    back = expand_outputs(compact_outputs({"instances": inst}, ["instances"]))["instances"]
    assert torch.equal(back.pred_masks, inst.pred_masks)
    assert torch.equal(back.pred_boxes.tensor, inst.pred_boxes.tensor)
    assert torch.equal(back.pred_classes, inst.pred_classes) and back.image_size == (9, 11)
    empty = Instances((4, 4), pred_masks=torch.zeros(0, 4, 4, dtype=torch.bool),
                      scores=torch.zeros(0), pred_classes=torch.zeros(0, dtype=torch.long))  # fmt: skip
    assert len(expand_outputs(compact_outputs({"instances": empty}, ["instances"]))["instances"]) == 0


def test_label_maps_score_like_logits(synthetic_cityscapes_names):
    """mIoU of cached label maps equals mIoU of the logits they came from."""
    name = synthetic_cityscapes_names["val"]
    dicts = DatasetCatalog.get(name)
    results = []
    for cached in (False, True):
        ev = PanopticSemSegEvaluator(name, distributed=False)
        ev.reset()
        for k, d in enumerate(dicts):
            h, w = np.asarray(Image.open(d["file_name"])).shape[:2]
            logits = torch.rand(19, h, w, generator=torch.Generator().manual_seed(k))
            out = {"sem_seg": logits}
            if cached:
                out = expand_outputs(compact_outputs(out, ["sem_seg"]))
                assert out["sem_seg"].dim() == 2
            ev.process([d], [out])
        results.append(ev.evaluate()["sem_seg"])
    same = {k: v for k, v in results[0].items() if v == v}  # NaN (absent classes) != NaN
    assert same == {k: v for k, v in results[1].items() if v == v}
    assert 0 < results[0]["mIoU"] < 100
