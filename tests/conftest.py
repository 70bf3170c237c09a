# Copyright (c) UPSNetRobust authors.
"""Shared pytest fixtures. Tests run on the CPU with small images and few threads."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Untrained weights produce denormal activations that make CPU convolutions ~20x slower; tests
# that build untrained models would otherwise dominate the suite's time. (Hypothesis float
# strategies must then say allow_subnormal=False.)
torch.set_flush_denormal(True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny.yaml")
# Inference on the 64x128 test data: its size, few detections, no loader workers.
SMALL_TEST_OPTS = [
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "DATALOADER.NUM_WORKERS", "0",
]
# A few training iterations of a tiny model on the 64x128 test data.
TRAIN_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    *SMALL_TEST_OPTS,
]


def tiny_cfg(*opts):
    """The embedded tiny UPSNet config with extra ``KEY VALUE`` overrides."""
    import upsnet_robust  # noqa: F401
    from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints

    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, TINY_CONFIG, list(opts))
    return cfg


def make_panoptic_input(height=64, width=128, seed=0, float_image=False):
    """A dataset-mapper-style input dict with three instances and a semantic map."""
    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 255
    if not float_image:
        image = image.round().to(torch.uint8)
    masks = torch.zeros(3, height, width, dtype=torch.bool)
    masks[0, height // 6 : height // 2, width // 8 : width // 3] = True
    masks[1, height // 3 : height - 4, width // 2 : width - 20] = True
    masks[2, 2 : height // 4, width - 18 : width - 2] = True
    inst = Instances((height, width))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.tensor([0, 2, 7])
    sem = torch.randint(0, 11, (height, width), generator=g)
    for m, c in zip(masks, (11, 13, 18)):
        sem[m] = c
    sem[:2, :2] = 255
    return {"image": image, "instances": inst, "sem_seg": sem, "height": height, "width": width}


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: intra-op threads only add synchronisation (on a loaded
    machine their spinning makes each call far slower). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model_cfg():
    return tiny_cfg()


# --- data fixtures (upsnet_robust.data) ----------------------------------------------------------
@pytest.fixture(scope="session")
def synthetic_cityscapes_root(tmp_path_factory):
    """Root of a tiny synthetic Cityscapes-format data set: 4 train / 2 val images of 64x128."""
    from upsnet_robust.data import generate_synthetic_cityscapes

    root = tmp_path_factory.mktemp("data") / "synthetic_cityscapes"
    return generate_synthetic_cityscapes(
        str(root), num_train=4, num_val=2, seed=0, height=64, width=128, show_progress=False
    )


@pytest.fixture(scope="session")
def synthetic_cityscapes_names(synthetic_cityscapes_root):
    """``{"train": name, "val": name}`` of the tiny synthetic data set, registered in detectron2."""
    from upsnet_robust.data import register_synthetic_cityscapes_panoptic

    names = register_synthetic_cityscapes_panoptic(
        synthetic_cityscapes_root, name_prefix="pytest_synthetic_cityscapes"
    )
    return dict(zip(("train", "val"), names))
