# Copyright (c) UPSNetRobust authors.
"""The embedded-default sweep as a detectron2 LazyConfig (Python config), in the conventions of
detectron2's tools/lazyconfig_train_net.py: ``model``, ``dataloader.test``,
``dataloader.evaluator``, ``train``; the robustness settings in ``robustness`` (lowercase
ROBUSTNESS keys; unset keys take their defaults).

    python tools/attack_net.py --config-file configs/Synthetic/upsnet_tiny_lazy.py \
        robustness.epsilons=[1,4] robustness.max_images=4
"""
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T

from upsnet_robust.data import UPSNetPanopticDatasetMapper
from upsnet_robust.engine.lazy import model_from_yaml
from upsnet_robust.evaluation import PanopticSubsetEvaluator

# The tiny UPSNet of configs/Synthetic/upsnet_tiny.yaml (any LazyCall'd model works here).
model = L(model_from_yaml)(config_file="configs/Synthetic/upsnet_tiny.yaml")

dataloader = OmegaConf.create()
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names="synthetic_cityscapes_fine_panoptic_val", filter_empty=False
    ),
    mapper=L(UPSNetPanopticDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=256)],
        image_format="BGR",
        thing_ids=[11, 12, 13, 14, 15, 16, 17, 18],  # Cityscapes trainIds of the thing classes
    ),
    num_workers=0,
)
dataloader.evaluator = L(PanopticSubsetEvaluator)(dataset_name="${..test.dataset.names}")

train = dict(
    init_checkpoint="./checkpoints/upsnet_tiny_synthetic.pth",
    output_dir="./output/upsnet_tiny_lazy",
    device="cpu",
)

robustness = dict(
    attacks=["fgsm", "ifgsm"],
    epsilons=[1.0, 4.0],
    objective="train_losses",
    defenses=["none", "nlmeans"],
    max_images=4,
    num_examples=1,
)
