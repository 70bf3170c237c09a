# Copyright (c) UPSNetRobust authors.
"""detectron2 ``Transform`` adapters of the defenses, registered in :data:`DEFENSE_REGISTRY`.

Each class is a whole defense: ``@register_defense`` beside it declares its name and default
BPDA surrogate, and its keyword parameters' defaults are its ``cfg.DEFENSE.<NODE>`` keys.

Each adapter is a thin wrapper of a pure function in :mod:`.functional` or :mod:`.tvm`, so the
same defense can run in a ``DatasetMapper`` (``augmentations=[...]``, on stored or transferred
adversarial images) or inside a model wrapper on float tensors via
:func:`upsnet_robust.defenses.apply_defense_to_tensor`.

All of them are photometric: ``apply_segmentation`` and ``apply_coords`` (hence boxes and
polygons) return their input unchanged, and ``inverse()`` is a ``NoOpTransform``: denoising is
not invertible, and there is no geometry to undo.
"""

import numpy as np
import torch
from fvcore.transforms.transform import NoOpTransform, Transform

from . import functional as F
from .torch_nlmeans import nlmeans_torch
from .registry import register_defense
from .tvm import image_seed, sample_tvm_mask, tv_reconstruct

__all__ = [
    "DefenseTransform",
    "NLMeansTransform",
    "JPEGTransform",
    "BitDepthTransform",
    "MedianFilterTransform",
    "GaussianBlurTransform",
    "TVMTransform",
    "AdaptiveNLMeansTransform",
]


class DefenseTransform(Transform):
    """Base class of the defense transforms: pixel values change, geometry does not.

    Subclasses implement ``apply_image(img)`` on an (H, W, C) uint8 or float image in [0, 255]
    in ``INPUT.FORMAT`` channel order and return the same shape and dtype.
    """

    # set by @register_defense: registry key, cfg.DEFENSE node, default BPDA surrogate
    defense_name = None
    config_node = None
    default_surrogate = None

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Coordinates are unchanged (no geometry)."""
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """Label maps are unchanged: defenses act on pixel values only."""
        return segmentation

    def inverse(self) -> Transform:
        """A ``NoOpTransform``: denoising cannot be undone and the geometry is the identity."""
        return NoOpTransform()


# BPDA identity: OpenCV's uint8 filter has no autograd and g(x) ~ x on clean images, the case
# Athalye et al. name; "nlmeans_exact" (the torch port's own gradient) is the opt-in.
@register_defense("nlmeans", surrogate="identity")
class NLMeansTransform(DefenseTransform):
    """OpenCV colored NL-means (:func:`.functional.nlmeans_denoise`); defaults are the
    reference study's ``(h, hColor, template, search) = (10, 10, 7, 21)``.

    ``backend="torch"`` runs :func:`.torch_nlmeans.nlmeans_torch`, a batched torch port whose
    output is identical to OpenCV's (tested bit for bit) and which is differentiable."""

    def __init__(self, h=10.0, h_color=10.0, template_window=7, search_window=21, backend="opencv"):
        """
        Args:
            h (float): luminance filter strength.
            h_color (float): color filter strength.
            template_window (int): patch size (odd).
            search_window (int): search area size (odd).
            backend (str): "opencv" (cv2.fastNlMeansDenoisingColored) or "torch".
        """
        super().__init__()
        if h < 0 or h_color < 0:
            raise ValueError(f"NL-means strengths must be >= 0, got h={h}, h_color={h_color}.")
        if backend not in ("opencv", "torch"):
            raise ValueError(f"Unknown NL-means backend '{backend}'; use 'opencv' or 'torch'.")
        self._set_attributes(locals())

    def defend_tensor(self, images: torch.Tensor, input_format: str = "BGR"):
        """The torch backend's fast path: the whole (N, 3, H, W) batch on its own device (GPU
        included), no numpy round trip. Returns None for the OpenCV backend (use
        :meth:`apply_image`)."""
        if self.backend != "torch":
            return None
        with torch.no_grad():
            return nlmeans_torch(
                images, self.h, self.h_color, self.template_window, self.search_window,
                input_format=input_format,
            )

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if self.backend == "torch":
            return _nlmeans_with_torch(img, self.h, self.h_color, self.template_window, self.search_window)
        return F.nlmeans_denoise(
            img, self.h, self.h_color, self.template_window, self.search_window
        )


def _nlmeans_with_torch(img: np.ndarray, h, h_color, template_window, search_window) -> np.ndarray:
    """The torch port on one HWC BGR image, with OpenCV's dtype rules (uint8 in and out)."""
    img = F.check_image(img, channels=(3,))
    x = torch.from_numpy(np.ascontiguousarray(F.to_uint8(img))).permute(2, 0, 1)
    with torch.no_grad():
        out = nlmeans_torch(x, h, h_color, template_window, search_window, input_format="BGR")
    return out.permute(1, 2, 0).numpy().astype(img.dtype, copy=False)


@register_defense("jpeg", surrogate="jpeg")  # a differentiable JPEG codec
class JPEGTransform(DefenseTransform):
    """JPEG re-encoding (:func:`.functional.jpeg_compress`); quality 75 as in Guo et al.,
    OpenCV codec by default."""

    def __init__(self, quality=75, backend="opencv"):
        """
        Args:
            quality (int): JPEG quality in [1, 100].
            backend (str): "opencv" (``cv2.imencode``/``imdecode``) or "pil".
        """
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}.")
        if backend not in ("opencv", "pil"):
            raise ValueError(f"Unknown JPEG backend '{backend}'; use 'opencv' or 'pil'.")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return F.jpeg_compress(img, self.quality, self.backend)


@register_defense("bitdepth", surrogate="straight_through")  # the quantiser, STE rounding
class BitDepthTransform(DefenseTransform):
    """Bit-depth reduction (:func:`.functional.reduce_bit_depth`); 3 bits as in Guo et al.
    (Xu et al. use 5 on ImageNet)."""

    def __init__(self, bits=3):
        """
        Args:
            bits (int): bits per channel in [1, 8].
        """
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bits must be in [1, 8], got {bits}.")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return F.reduce_bit_depth(img, self.bits)


@register_defense("median", surrogate="soft_median")  # gradient spread near the median
class MedianFilterTransform(DefenseTransform):
    """Median filter (:func:`.functional.median_blur`); odd windows via OpenCV, even ones
    (Xu et al.'s 2x2) via scipy."""

    def __init__(self, window=3):
        """
        Args:
            window (int): window side, >= 1.
        """
        super().__init__()
        if int(window) < 1:
            raise ValueError(f"Median window must be >= 1, got {window}.")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return F.median_blur(img, self.window)


@register_defense("gaussian", surrogate="gaussian")  # the blur in torch: exact gradient
class GaussianBlurTransform(DefenseTransform):
    """Gaussian blur (:func:`.functional.gaussian_blur`), kernel radius ``truncate * sigma``."""

    def __init__(self, sigma=1.0, truncate=4.0):
        """
        Args:
            sigma (float): standard deviation in pixels, > 0.
            truncate (float): kernel radius in units of sigma.
        """
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"Gaussian sigma must be > 0, got {sigma}.")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return F.gaussian_blur(img, self.sigma, self.truncate)


# BPDA identity with EOT over the masks, as Athalye et al. broke TVM.
@register_defense("tvm", surrogate="identity")
class TVMTransform(DefenseTransform):
    """Guo et al.'s total-variation minimisation (:mod:`.tvm`): random pixel dropping, then a
    masked TV reconstruction.

    The defense is randomised, but the ``Transform`` is deterministic: the mask of an image is
    drawn from a generator seeded by ``(seed, blake2b hash of the image bytes, shape, dtype)``
    (:func:`.tvm.image_seed`). The same image thus always gets the same mask, in any process or
    data-loader worker and in any order, and different images (including successive iterates of
    an online attack) get independent masks. For EOT, draw masks with :meth:`sample_mask` from
    your own generator and pass them to ``apply_image(img, mask=...)``.
    """

    def __init__(self, keep_prob=0.5, tv_weight=0.03, num_iters=50, isotropic=False, seed=0):
        """
        Args:
            keep_prob (float): Bernoulli keep probability per pixel, in (0, 1].
            tv_weight (float): lambda_TV on the [0, 1] intensity scale.
            num_iters (int): primal-dual iterations.
            isotropic (bool): isotropic instead of anisotropic (Guo et al.'s code) TV.
            seed (int): seed combined with the image hash to draw the mask.
        """
        super().__init__()
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}.")
        if tv_weight < 0:
            raise ValueError(f"tv_weight must be >= 0, got {tv_weight}.")
        self._set_attributes(locals())

    def sample_mask(self, shape, rng=None):
        """Draw a fresh keep-mask (for EOT over the defense's randomness).

        Args:
            shape (tuple[int]): (H, W) or (H, W, C).
            rng (np.random.Generator or int or None): random source.

        Returns:
            ndarray: (H, W) bool, True for kept pixels.
        """
        return sample_tvm_mask(shape, self.keep_prob, rng)

    def mask_for(self, img):
        """The deterministic mask that :meth:`apply_image` uses for ``img``."""
        return sample_tvm_mask(img.shape, self.keep_prob, image_seed(img, self.seed))

    def apply_image(self, img: np.ndarray, mask=None) -> np.ndarray:
        """
        Args:
            img (ndarray): (H, W, C) image, uint8 or float in [0, 255].
            mask (ndarray or None): (H, W) bool keep-mask; None uses :meth:`mask_for`.
        """
        img = F.check_image(img)
        if mask is None:
            mask = self.mask_for(img)
        return tv_reconstruct(img, mask, self.tv_weight, self.num_iters, self.isotropic)


# BPDA identity: a denoiser, exactly the identity on images below its noise threshold.
@register_defense("adaptive_nlmeans", surrogate="identity")
class AdaptiveNLMeansTransform(DefenseTransform):
    """NL-means with a per-image strength from the estimated noise level
    (:func:`.functional.adaptive_nlmeans_denoise`): ``h = h_color = clip(sigma_scale * sigma_est
    - sigma_offset, 0, h_max)``; images with ``h < h_min`` are returned unchanged."""

    def __init__(
        self,
        sigma_scale=1.25,
        sigma_offset=2.5,
        h_max=15.0,
        h_min=1.0,
        template_window=7,
        search_window=21,
    ):
        """
        Args:
            sigma_scale (float): slope k of h in the estimated noise sigma.
            sigma_offset (float): offset subtracted from ``k * sigma_est``.
            h_max (float): upper bound of h.
            h_min (float): below this h the image is left unchanged.
            template_window (int): NL-means patch size.
            search_window (int): NL-means search area size.
        """
        super().__init__()
        self._set_attributes(locals())

    def strength(self, img):
        """The h this transform uses on ``img`` (before the ``h_min`` test)."""
        return F.adaptive_nlmeans_h(img, self.sigma_scale, self.sigma_offset, self.h_max)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return F.adaptive_nlmeans_denoise(
            img,
            self.sigma_scale,
            self.sigma_offset,
            self.h_max,
            self.h_min,
            self.template_window,
            self.search_window,
        )
