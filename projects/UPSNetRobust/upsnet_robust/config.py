# Copyright (c) UPSNetRobust authors.
"""Config keys of UPSNetRobust. Call ``add_upsnet_config`` then ``add_robustness_config``
on a fresh ``get_cfg()`` before merging YAML files; :func:`add_registered_config` then adds the
keys that model adapters and plug-ins contributed with :func:`register_config` (e.g.
Panoptic-DeepLab's, a plug-in threat kind's), so set-up code names no model's keys."""
from typing import Callable, List

from detectron2.config import CfgNode as CN

from .defenses.config import add_defense_config

__all__ = [
    "add_adv_train_config",
    "add_corruption_config",
    "add_fast_path_config",
    "add_registered_config",
    "add_robustness_config",
    "add_sea_config",
    "add_upsnet_config",
    "register_config",
]

_CONFIG_FUNCTIONS: List[Callable] = []


def register_config(fn: Callable) -> Callable:
    """Register ``fn(cfg)``, which adds config keys (a model's ``add_*_config``, a plug-in's
    ``add_config``); :func:`add_registered_config` calls every registered function, in order,
    after the project's own keys exist. Usable as a decorator; registering twice is a no-op."""
    if not callable(fn):
        raise TypeError(f"register_config takes a function cfg -> None, got {fn!r}")
    if fn not in _CONFIG_FUNCTIONS:
        _CONFIG_FUNCTIONS.append(fn)
    return fn


def add_registered_config(cfg) -> None:
    """Call every function of :func:`register_config` on ``cfg``."""
    for fn in list(_CONFIG_FUNCTIONS):
        fn(cfg)


def add_upsnet_config(cfg):
    """Add the keys of the UPSNet meta-architecture, its heads and its data pipeline."""
    _C = cfg
    _C.MODEL.UPSNET = CN()
    # Semantic head (UPSNet "FCN head"): a subnet of deformable 3x3 convs shared over P2-P5.
    _C.MODEL.UPSNET.SEM_IN_FEATURES = ["p2", "p3", "p4", "p5"]
    _C.MODEL.UPSNET.SEM_CONV_DIM = 128  # channels of each deformable conv layer
    _C.MODEL.UPSNET.SEM_NUM_CONVS = 2  # deformable conv layers in the shared subnet
    _C.MODEL.UPSNET.SEM_DEFORMABLE = True  # False: plain 3x3 convs (ablation / speed)
    _C.MODEL.UPSNET.SEM_LOSS_WEIGHT = 1.0  # weight of the semantic cross-entropy
    # Panoptic head (parameter-free). Stuff classes are the first
    # SEM_SEG_HEAD.NUM_CLASSES - ROI_HEADS.NUM_CLASSES semantic channels, things the rest.
    _C.MODEL.UPSNET.PANOPTIC_LOSS_WEIGHT = 0.5
    _C.MODEL.UPSNET.BOX_KEEP_FRACTION = 0.7  # GT instances kept in the panoptic loss (<1: void on)
    _C.MODEL.UPSNET.PANOPTIC_SCORE_THRESH = 0.6  # (proposal, class) pairs kept as candidates
    _C.MODEL.UPSNET.PANOPTIC_NMS_THRESH = 0.5  # class-agnostic NMS over candidates
    _C.MODEL.UPSNET.PANOPTIC_MAX_INSTANCES = 100
    _C.MODEL.UPSNET.MASK_OVERLAP_THRESH = 0.3  # drop a mask this much covered by same-class masks
    _C.MODEL.UPSNET.STUFF_AREA_LIMIT = 2048  # stuff segments smaller than this (px) become void
    _C.MODEL.UPSNET.STUFF_RELABEL_FRACTION = 0.5  # instance relabelled as stuff above this share
    # Data: the panoptic dataset mapper derives instances and the semantic map from the panoptic
    # PNG; MIN_SIZE_TRAIN etc. keep their detectron2 meaning.
    _C.INPUT.DATASET_MAPPER_NAME = "upsnet_panoptic"
    # Evaluation: mIoU with detectron2's SemSegEvaluator beside PQ.
    _C.TEST.SEM_SEG_EVAL = True
    # Checkpoints: torch.load(weights_only=True) unless the user opts in to full unpickling.
    _C.MODEL.UNSAFE_LOAD_CHECKPOINT = False


def add_robustness_config(cfg):
    """Add the keys of the robustness sweep: attacks, objectives, defenses and report."""
    _C = cfg
    _C.ROBUSTNESS = CN()
    # Attack algorithms to run (names in ATTACK_REGISTRY), each at every eps below.
    _C.ROBUSTNESS.ATTACKS = ["ifgsm"]
    # L-inf budgets on the 0-255 scale of INPUT.FORMAT (the study's grid).
    _C.ROBUSTNESS.EPSILONS = [0.25, 1.0, 4.0, 16.0]
    # Objective to maximise (names in OBJECTIVE_REGISTRY): "train_losses" is the study's choice.
    _C.ROBUSTNESS.OBJECTIVE = "train_losses"
    # Step size alpha (0-255 scale); <= 0 means the algorithm's default (1 for I-FGSM, eps/T else).
    _C.ROBUSTNESS.STEP_SIZE = 1.0
    # Iterations; <= 0 means Kurakin's rule max(1, ceil(min(eps + 4, 1.25 eps))).
    _C.ROBUSTNESS.NUM_STEPS = 0
    _C.ROBUSTNESS.RANDOM_START = False  # PGD: start from a uniform point in the eps-ball
    _C.ROBUSTNESS.RESTARTS = 1  # PGD: random restarts; the per-image worst case is kept
    _C.ROBUSTNESS.MOMENTUM = 1.0  # MI-FGSM decay mu
    # APGD ("apgd"; NUM_STEPS <= 0 means 100 iterations, STEP_SIZE unused: it starts at 2 eps).
    _C.ROBUSTNESS.APGD_RHO = 0.75  # halve the step if < RHO of the steps since the last check rose
    _C.ROBUSTNESS.APGD_MOMENTUM = 0.75  # alpha: weight of the new step vs the previous move
    _C.ROBUSTNESS.APGD_RADIUS_SCHEDULE = False  # 30/30/40 % of the iterations at 2, 1.5, 1 x eps
    # The point each image returns: "loss" (highest objective value) or "accuracy" (fewest
    # labelled pixels still correct, SEA's rule; dense objectives only). Steps follow the value.
    _C.ROBUSTNESS.APGD_KEEP = "loss"
    _C.ROBUSTNESS.SEED = 0  # seeds random starts and proposal sampling, per image
    # Early stopping of iterative attacks (PGD family, SegPGD, CosPGD, MI-FGSM, APGD) with an
    # untargeted dense objective: an image stops once none of its labelled pixels is classified
    # correctly (read from the attack's own forward pass) and keeps that point; a batch stops when
    # all its images have. Saves passes; off keeps the study's protocol (like every setting an
    # attack reads, it is part of each pass's key). Rejected at set-up with other objectives and
    # ADAPTIVE.
    _C.ROBUSTNESS.EARLY_STOP = False
    add_sea_config(_C)
    add_corruption_config(_C)
    # Defenses to score every adversarial batch with ("none" always means undefended).
    _C.ROBUSTNESS.DEFENSES = ["none", "nlmeans"]
    # Round adversarial images to uint8 before defense / model (wipes out eps < 1 if True).
    _C.ROBUSTNESS.QUANTIZE = False
    # Score clean and clean+defense cells too.
    _C.ROBUSTNESS.INCLUDE_CLEAN = True
    # Other checkpoints of the same architecture swept with the same settings and reported as
    # defense rows beside the input transforms, "name=path" each (e.g. an adversarially trained
    # model: "adv_train=checkpoints/upsnet_tiny_synthetic_adv.pth"); MODEL.WEIGHTS is the
    # undefended reference. Their rows are "name" and "name+<defense>".
    _C.ROBUSTNESS.COMPARE_WEIGHTS = []
    # Images (<= 0: all) of the test set; keeps quick sweeps quick.
    _C.ROBUSTNESS.MAX_IMAGES = 0
    # Image grids (adversarial image, panoptic result, amplified difference) for this many images.
    _C.ROBUSTNESS.NUM_EXAMPLES = 2
    _C.ROBUSTNESS.DIFF_AMPLIFICATION = 10.0  # |x_adv - x| is multiplied by this in the grids
    # Training: score attacked PQ (each attack x eps, undefended) every this many iterations.
    _C.ROBUSTNESS.TRAIN_EVAL_PERIOD = 0
    # Adaptive (defense-aware) attacks: for each attack x eps and each defense other than "none",
    # an extra pass attacks model o defense (BPDA through the real defense, EOT over TVM masks)
    # and scores the result with that defense; its cells have "adaptive": true.
    _C.ROBUSTNESS.ADAPTIVE = False
    # BPDA surrogate (upsnet_robust.defenses.surrogates): "auto" = each defense's default
    # (identity for NL-means / adaptive NL-means / TVM, straight_through for bitdepth, jpeg for
    # JPEG, soft_median for median, gaussian (exact) for gaussian); one registered name for every
    # defense (e.g. "identity", the plain BPDA ablation); or "defense:surrogate,..." per defense.
    _C.ROBUSTNESS.BPDA_SURROGATE = "auto"
    # EOT samples (mask draws averaged per attack step) for randomised defenses (TVM); <= 0 means
    # the default 4. Deterministic defenses always use 1.
    _C.ROBUSTNESS.EOT_SAMPLES = 4
    add_fast_path_config(_C)

    # Set by the tools for LazyConfig runs: the model and test-data nodes as text, so the sweep's
    # cache fingerprint follows the model definition (empty for YAML configs).
    _C.MODEL.LAZY_CONFIG = ""

    # Parameters of every registered defense, cfg.DEFENSE.<NAME> (reference settings).
    add_defense_config(_C)


def add_corruption_config(cfg):
    """ROBUSTNESS.CORRUPTIONS / SEVERITIES: the natural-corruption grid (docs/CORRUPTIONS.md)."""
    from .corruptions.catalog import CORRUPTIONS, SEVERITIES

    _C = cfg
    # Run the natural-corruption passes (threat kind "corruption") besides ROBUSTNESS.ATTACKS;
    # off by default: the full grid is 75 passes. With ATTACKS [] only corruptions run.
    _C.ROBUSTNESS.RUN_CORRUPTIONS = False
    # Corruptions of imagecorruptions (the 15 of ImageNet-C / Cityscapes-C by default), each run at
    # every severity below; images are corrupted with a seed per image, corruption and severity.
    _C.ROBUSTNESS.CORRUPTIONS = list(CORRUPTIONS)
    _C.ROBUSTNESS.SEVERITIES = list(SEVERITIES)  # 1 (mildest) to 5


def add_fast_path_config(cfg):
    """ROBUSTNESS keys of the fast paths: batching, defense workers, mixed precision, memory
    format."""
    _C = cfg
    # None of them changes what is measured (AMP aside: it is part of a pass's key).
    # Images attacked together: one model run per attack step for the whole batch (per-image
    # eps-balls, seeds and objective values on a zero-padded batch) and one batched inference
    # per defense. Adaptive passes attack one image at a time.
    _C.ROBUSTNESS.BATCH_SIZE = 1
    # Worker processes for CPU defenses (0: in the main process); they defend a batch's images
    # in parallel while the model infers the variants already available.
    _C.ROBUSTNESS.DEFENSE_WORKERS = 0
    # Mixed precision for the attack's forward/backward: "" (off), "bfloat16" or "float16"
    # (torch.autocast on MODEL.DEVICE; meant for GPUs). Inference and scoring stay float32.
    # Unlike the keys above it can change the adversarial images, so it is part of a pass's key.
    _C.ROBUSTNESS.AMP = ""
    # Convert the model to channels-last memory format (faster convolutions on tensor cores).
    _C.ROBUSTNESS.CHANNELS_LAST = False


def add_sea_config(cfg):
    """ROBUSTNESS.SEA: the members and settings of the "sea" / "sea_fast" ensembles."""
    _C = cfg
    # SEA (Croce, Singh & Hein, ECCV 2024): "sea" / "sea_fast" in ATTACKS run, per eps, one pass
    # per member and keep, per image, the member whose prediction lowers the data set's PQ (mIoU
    # for semantic models) most: a greedy worst case over the ensemble (docs/ATTACKS.md).
    _C.ROBUSTNESS.SEA = CN()
    # Members of "sea", "attack:objective": APGD with each dense loss of SEA (both paper versions).
    _C.ROBUSTNESS.SEA.MEMBERS = [
        "apgd:masked_ce",
        "apgd:balanced_masked_ce",
        "apgd:js_divergence",
        "apgd:masked_spherical",
    ]
    # Iterations per member (replaces NUM_STEPS for members). SEA uses 300 on GPUs; 100
    # (AutoAttack's APGD standard) keeps CPU runs sane.
    _C.ROBUSTNESS.SEA.NUM_STEPS = 100
    _C.ROBUSTNESS.SEA.RANDOM_START = True  # members start inside the eps-ball, as in SEA
    _C.ROBUSTNESS.SEA.RADIUS_SCHEDULE = True  # members' APGD at 2, 1.5, 1 x eps, as in SEA
    # Members stop an image once none of its labelled pixels is right (EARLY_STOP), as in SEA.
    _C.ROBUSTNESS.SEA.EARLY_STOP = True
    # The point each APGD member returns per image: "accuracy" (fewest labelled pixels still
    # correct, as in SEA) or "loss" (highest objective value); see ROBUSTNESS.APGD_KEEP.
    _C.ROBUSTNESS.SEA.KEEP = "accuracy"
    # Members of "sea_fast": the strongest single member on the tiny UPSNet (10 val images, eps 8
    # and 16; benchmarks/bench_attack_strength.py): 0.99 / 0.43 PQ above "sea" at 25 % of its
    # passes; two members at 50 steps each were 0.9-2.1 PQ above "sea".
    _C.ROBUSTNESS.SEA.FAST_MEMBERS = ["apgd:balanced_masked_ce"]
    # Iterations per "sea_fast" member (equal to NUM_STEPS, its pass is shared with "sea").
    _C.ROBUSTNESS.SEA.FAST_NUM_STEPS = 100


def add_adv_train_config(cfg):
    """ADV_TRAIN: adversarial training in the Trainer (engine/adversarial_training.py)."""
    _C = cfg
    _C.ADV_TRAIN = CN()
    _C.ADV_TRAIN.ENABLED = False
    # "fgsm_rs" (FGSM from a random start, step 1.25 eps), "n_fgsm" (noise 2 eps, step eps, no
    # projection) or "pgd" (NUM_STEPS projected steps of 2.5 eps / NUM_STEPS).
    _C.ADV_TRAIN.ATTACK = "fgsm_rs"
    # L-inf budget on the 0-255 scale of INPUT.FORMAT, reached linearly over EPS_WARMUP_ITERS.
    _C.ADV_TRAIN.EPS = 8.0
    _C.ADV_TRAIN.EPS_WARMUP_ITERS = 0
    _C.ADV_TRAIN.STEP_SIZE = 0.0  # <= 0: the attack's default (see ATTACK)
    _C.ADV_TRAIN.NUM_STEPS = 1  # PGD-K's K (the single-step attacks ignore it)
    _C.ADV_TRAIN.NOISE = 2.0  # N-FGSM's noise radius, in multiples of eps
    _C.ADV_TRAIN.RATIO = 1.0  # share of each batch's images replaced by adversarial ones
    _C.ADV_TRAIN.SEED = 0  # crafting noise: per (seed, iteration, process)
    # What the attack maximises: "train_losses" (the model's own) or a registered dense objective.
    _C.ADV_TRAIN.OBJECTIVE = "train_losses"
    # Guard against catastrophic overfitting (engine/overfitting_guard.py): every PERIOD
    # iterations (0: off) a PGD check on IMAGES fixed training images; a collapse rolls back.
    _C.ADV_TRAIN.GUARD = CN()
    _C.ADV_TRAIN.GUARD.PERIOD = 0
    _C.ADV_TRAIN.GUARD.IMAGES = 2
    _C.ADV_TRAIN.GUARD.NUM_STEPS = 10
    _C.ADV_TRAIN.GUARD.ACC_DROP = 0.2  # robust pixel accuracy drop (fraction) that is a collapse
    _C.ADV_TRAIN.GUARD.LOSS_RISE = 1.5  # PGD loss factor that, with a falling FGSM loss, is one
