# Copyright (c) UPSNetRobust authors.
"""Example grids: clean vs adversarial (vs defended) images, panoptic results, and amplified
perturbations (the study's Figs. 4, 5 and 10).

Layout of :func:`save_example_grid` (3 panels per row, each ``H x W`` below a label strip of
:data:`LABEL_HEIGHT` pixels, an optional title strip of :data:`TITLE_HEIGHT` on top)::

    clean image        | clean panoptic (or blank)   | blank
    adversarial image  | adversarial panoptic        | amplified |x_adv - x|
    defended image     | defended panoptic (or blank)| amplified |x_def - x|   (if given)

:func:`example_grid_shape` gives the resulting image size.
"""

import logging
import os
import tempfile
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

__all__ = [
    "LABEL_HEIGHT",
    "TITLE_HEIGHT",
    "amplified_difference",
    "example_grid_shape",
    "save_example_grid",
]

logger = logging.getLogger(__name__)

# Height in pixels of the text strip above each panel, and of the optional title strip.
LABEL_HEIGHT = 24
TITLE_HEIGHT = 32
_NUM_COLS = 3
_BLANK_VALUE = 40  # dark grey for panels without content
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _to_hwc_float(image, name: str) -> np.ndarray:
    """(H, W, 3) float64 array from a uint8/float numpy array or CPU/GPU tensor."""
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) image, got shape {image.shape}")
    return image.astype(np.float64)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def amplified_difference(a, b, amplification: float = 10.0) -> np.ndarray:
    """``clip(amplification * |a - b|, 0, 255)`` rounded to uint8: a visible perturbation.

    Args:
        a, b: (H, W, 3) images (uint8 or float, 0-255), same shape; computed in float64, so
            sub-unit perturbations of float adversarial images are not lost before scaling.
        amplification (float): factor applied to the absolute difference.

    Returns:
        ndarray: (H, W, 3) uint8, in the channel order of the inputs.
    """
    a = _to_hwc_float(a, "a")
    b = _to_hwc_float(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return _to_uint8(np.clip(float(amplification) * np.abs(a - b), 0.0, 255.0))


def example_grid_shape(
    height: int, width: int, defended: bool, title: Optional[str] = None
) -> Tuple[int, int]:
    """Size ``(rows_px, cols_px)`` of the grid :func:`save_example_grid` writes for ``H x W``
    images, with or without the defended row and the title strip."""
    rows = 3 if defended else 2
    return (TITLE_HEIGHT if title else 0) + rows * (LABEL_HEIGHT + height), _NUM_COLS * width


def _to_bgr(image_u8: np.ndarray, input_format: str) -> np.ndarray:
    if input_format == "BGR":
        return image_u8
    if input_format == "RGB":
        return np.ascontiguousarray(image_u8[:, :, ::-1])
    raise ValueError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")


def _draw_panoptic(image_bgr: np.ndarray, panoptic, metadata) -> np.ndarray:
    """detectron2's panoptic drawing over the image; returns BGR uint8 of the image's size."""
    from detectron2.utils.visualizer import Visualizer

    ids, segments_info = panoptic
    ids = np.asarray(ids.detach().cpu() if torch.is_tensor(ids) else ids)
    if ids.ndim != 2:
        raise ValueError(f"panoptic ids must be an (H, W) map, got shape {ids.shape}")
    h, w = image_bgr.shape[:2]
    if ids.shape != (h, w):
        # Outputs are at the original resolution, the attacked images at the model's input
        # resolution: resample the ids (nearest) onto the image.
        logger.debug("Resizing panoptic ids %s to the image size %s", ids.shape, (h, w))
        rows = np.minimum((np.arange(h) + 0.5) * ids.shape[0] / h, ids.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) * ids.shape[1] / w, ids.shape[1] - 1).astype(int)
        ids = ids[rows[:, None], cols[None, :]]
    ids = torch.from_numpy(np.ascontiguousarray(ids))
    # Thing colours are jittered with np.random: a fixed seed gives the same colours to the same
    # segments in every panel. The caller's global RNG state is restored afterwards.
    state = np.random.get_state()
    try:
        np.random.seed(0)
        vis = Visualizer(np.ascontiguousarray(image_bgr[:, :, ::-1]), metadata)
        out = vis.draw_panoptic_seg(ids, segments_info).get_image()
    finally:
        np.random.set_state(state)
    if out.shape[:2] != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(out[:, :, ::-1])


def _put_text(strip: np.ndarray, text: str, scale_max: float) -> None:
    """Draw ``text`` (shrunk until it fits) left-aligned, vertically centered, white."""
    h, w = strip.shape[:2]
    scale = scale_max
    while scale > 0.2:
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
        if tw <= w - 8 and th <= h - 6:
            break
        scale -= 0.05
    (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
    cv2.putText(strip, text, (4, (h + th) // 2), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _panel(image_bgr: Optional[np.ndarray], label: str, height: int, width: int) -> np.ndarray:
    panel = np.zeros((LABEL_HEIGHT + height, width, 3), np.uint8)
    if image_bgr is None:
        panel[LABEL_HEIGHT:] = _BLANK_VALUE
    else:
        panel[LABEL_HEIGHT:] = image_bgr
    if label:
        _put_text(panel[:LABEL_HEIGHT], label, 0.5)
    return panel


def save_example_grid(
    path: str,
    clean_image,
    adversarial_image,
    panoptic_adv,
    metadata,
    defended_image=None,
    panoptic_def=None,
    panoptic_clean=None,
    amplification: float = 10.0,
    input_format: str = "BGR",
    title: Optional[str] = None,
) -> str:
    """Save a labelled PNG grid comparing clean, adversarial and (optionally) defended inputs.

    Rows (see the module docstring): [clean | clean panoptic], [adversarial | adversarial
    panoptic | amplified |x_adv - x|], and with ``defended_image``: [defended | defended
    panoptic | amplified |x_def - x|]. Missing panels are dark grey. The differences are taken
    against the clean image ``x`` in float (:func:`amplified_difference`).

    Args:
        path (str): output PNG path (parent directories are created; written atomically).
        clean_image, adversarial_image: (H, W, 3) uint8 or float 0-255 arrays (or tensors) in
            ``input_format``.
        panoptic_adv (tuple or None): ``(ids, segments_info)``: (H', W') int tensor/ndarray
            of segment ids and a list of dicts with ``id``, ``category_id`` (contiguous),
            ``isthing``, as in a detectron2 ``"panoptic_seg"`` output; ``segments_info`` None
            decodes ids with the metadata's ``label_divisor``. Ids at another resolution than
            the images (outputs are at the original image size) are resampled (nearest) onto
            the image. None: a blank panel.
        metadata: detectron2 ``Metadata`` of the data set (class names and colours).
        defended_image: (H, W, 3) defended adversarial image, or None (no third row).
        panoptic_def, panoptic_clean: the same tuples for the defended and clean images.
        amplification (float): factor on |difference| before clipping to [0, 255].
        input_format (str): "BGR" or "RGB", the channel order of the images.
        title (str): optional title strip on top (e.g. "I-FGSM eps=4, nlmeans").

    Returns:
        str: ``path``.
    """
    clean = _to_hwc_float(clean_image, "clean_image")
    adv = _to_hwc_float(adversarial_image, "adversarial_image")
    if adv.shape != clean.shape:
        raise ValueError(f"adversarial image {adv.shape} and clean image {clean.shape} differ")
    h, w = clean.shape[:2]
    amp = f"{amplification:g}"

    def bgr(x):
        return _to_bgr(_to_uint8(x), input_format)

    clean_bgr, adv_bgr = bgr(clean), bgr(adv)
    rows: Sequence[Sequence[np.ndarray]] = [
        [
            _panel(clean_bgr, "clean", h, w),
            _panel(
                (
                    _draw_panoptic(clean_bgr, panoptic_clean, metadata)
                    if panoptic_clean is not None
                    else None
                ),
                "clean panoptic" if panoptic_clean is not None else "",
                h,
                w,
            ),
            _panel(None, "", h, w),
        ],
        [
            _panel(adv_bgr, "adversarial", h, w),
            _panel(
                (
                    _draw_panoptic(adv_bgr, panoptic_adv, metadata)
                    if panoptic_adv is not None
                    else None
                ),
                "adversarial panoptic" if panoptic_adv is not None else "",
                h,
                w,
            ),
            _panel(
                _to_bgr(amplified_difference(adv, clean, amplification), input_format),
                f"|x_adv - x| x{amp}",
                h,
                w,
            ),
        ],
    ]
    if defended_image is not None:
        dfd = _to_hwc_float(defended_image, "defended_image")
        if dfd.shape != clean.shape:
            raise ValueError(f"defended image {dfd.shape} and clean image {clean.shape} differ")
        dfd_bgr = bgr(dfd)
        rows.append(
            [
                _panel(dfd_bgr, "defended", h, w),
                _panel(
                    (
                        _draw_panoptic(dfd_bgr, panoptic_def, metadata)
                        if panoptic_def is not None
                        else None
                    ),
                    "defended panoptic" if panoptic_def is not None else "",
                    h,
                    w,
                ),
                _panel(
                    _to_bgr(amplified_difference(dfd, clean, amplification), input_format),
                    f"|x_def - x| x{amp}",
                    h,
                    w,
                ),
            ]
        )
    elif panoptic_def is not None:
        logger.warning("panoptic_def given without defended_image; the defended row is skipped")
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    if title:
        strip = np.zeros((TITLE_HEIGHT, grid.shape[1], 3), np.uint8)
        _put_text(strip, title, 0.7)
        grid = np.concatenate([strip, grid], axis=0)
    assert grid.shape[:2] == example_grid_shape(h, w, defended_image is not None, title), grid.shape

    # cv2.imwrite picks the encoder from the extension: the temp name ends in ".png".
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp.png", dir=directory
    )
    os.close(fd)
    try:
        if not cv2.imwrite(tmp, grid):
            raise RuntimeError(f"cv2.imwrite failed for {tmp} (grid of shape {grid.shape})")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; figures are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
