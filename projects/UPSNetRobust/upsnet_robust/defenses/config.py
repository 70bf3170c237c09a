# Copyright (c) UPSNetRobust authors.
"""Config nodes ``cfg.DEFENSE.<NAME>`` holding the parameters of each registered defense."""

from detectron2.config import CfgNode as CN

__all__ = ["add_defense_config"]


def add_defense_config(cfg):
    """Add one ``cfg.DEFENSE.<NAME>`` node per defense, with the reference settings.

    Keys are the defense's keyword parameters in upper case (read by
    :func:`upsnet_robust.defenses.build_defense_from_cfg`). Existing nodes (e.g. ``NLMEANS`` from
    ``add_robustness_config``) are kept as they are, so the call is idempotent; ``cfg.DEFENSE`` is
    created if missing.
    """
    _C = cfg
    if "DEFENSE" not in _C:
        _C.DEFENSE = CN()
    D = _C.DEFENSE

    if "NLMEANS" not in D:
        # OpenCV fastNlMeansDenoisingColored(img, None, H, H_COLOR, TEMPLATE, SEARCH): the study's.
        D.NLMEANS = CN()
        D.NLMEANS.H = 10.0
        D.NLMEANS.H_COLOR = 10.0
        D.NLMEANS.TEMPLATE_WINDOW = 7
        D.NLMEANS.SEARCH_WINDOW = 21
        D.NLMEANS.BACKEND = "opencv"  # or "torch": the bit-exact, differentiable torch port

    if "JPEG" not in D:
        D.JPEG = CN()
        D.JPEG.QUALITY = 75  # Guo et al.
        D.JPEG.BACKEND = "opencv"  # "opencv" (cv2.imencode/imdecode) or "pil" (Pillow)

    if "BITDEPTH" not in D:
        D.BITDEPTH = CN()
        D.BITDEPTH.BITS = 3  # Guo et al.; Xu et al. use 5 on ImageNet

    if "MEDIAN" not in D:
        D.MEDIAN = CN()
        D.MEDIAN.WINDOW = 3  # window side; even sizes (Xu et al.'s 2) go through scipy

    if "GAUSSIAN" not in D:
        D.GAUSSIAN = CN()
        D.GAUSSIAN.SIGMA = 1.0  # pixels
        D.GAUSSIAN.TRUNCATE = 4.0  # kernel radius in sigmas (scipy's rule): 9x9 for sigma 1

    if "TVM" not in D:
        # Guo et al.: min_z sum m (z - x)^2 + TV_WEIGHT * TV(z) on the [0, 1] scale.
        D.TVM = CN()
        D.TVM.KEEP_PROB = 0.5  # Bernoulli keep probability per pixel
        D.TVM.TV_WEIGHT = 0.03  # lambda_TV
        D.TVM.NUM_ITERS = 50  # Chambolle-Pock iterations
        D.TVM.ISOTROPIC = False  # False: anisotropic TV as in the reference code
        D.TVM.SEED = 0  # combined with a hash of each image to draw its mask

    if "ADAPTIVE_NLMEANS" not in D:
        # h = h_color = clip(SIGMA_SCALE * sigma_est - SIGMA_OFFSET, 0, H_MAX); none if h < H_MIN.
        D.ADAPTIVE_NLMEANS = CN()
        D.ADAPTIVE_NLMEANS.SIGMA_SCALE = 1.25
        D.ADAPTIVE_NLMEANS.SIGMA_OFFSET = 2.5
        D.ADAPTIVE_NLMEANS.H_MAX = 15.0
        D.ADAPTIVE_NLMEANS.H_MIN = 1.0
        D.ADAPTIVE_NLMEANS.TEMPLATE_WINDOW = 7
        D.ADAPTIVE_NLMEANS.SEARCH_WINDOW = 21
