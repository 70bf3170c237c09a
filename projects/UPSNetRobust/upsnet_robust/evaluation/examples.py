# Copyright (c) UPSNetRobust authors.
"""Example grids: clean vs adversarial (vs defended) images, the model's result on each
(panoptic, semantic or instances), and amplified perturbations (the study's Figs. 4, 5, 10).

Layout of :func:`save_example_grid` (3 panels per row, each ``H x W`` below a label strip of
:data:`LABEL_HEIGHT` pixels, an optional title strip of :data:`TITLE_HEIGHT` on top)::

    clean image        | clean result (or blank)     | blank
    adversarial image  | adversarial result          | amplified |x_adv - x|
    defended image     | defended result (or blank)  | amplified |x_def - x|   (if given)

The clean result is the reference: comparing it with the adversarial one shows what the attack
changed.

:func:`example_grid_shape` gives the resulting image size.
"""

import logging
from typing import Mapping, Optional, Tuple

import cv2
import numpy as np
import torch

from ..utils.io import atomic_write

__all__ = [
    "LABEL_HEIGHT",
    "TITLE_HEIGHT",
    "amplified_difference",
    "draw_result",
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


def _resample_nearest(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """An (H', W') label map resampled (nearest, pixel centres) onto ``h x w``: outputs are at
    the original image size, the attacked images at the model's input size."""
    if labels.shape == (h, w):
        return labels
    logger.debug("Resizing a label map %s to the image size %s", labels.shape, (h, w))
    rows = np.minimum((np.arange(h) + 0.5) * labels.shape[0] / h, labels.shape[0] - 1)
    cols = np.minimum((np.arange(w) + 0.5) * labels.shape[1] / w, labels.shape[1] - 1)
    return labels[rows.astype(int)[:, None], cols.astype(int)[None, :]]


def _as_numpy(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)


def _visualize(image_bgr: np.ndarray, metadata, draw) -> np.ndarray:
    """``draw(Visualizer)`` over the image; returns BGR uint8 of the image's size.

    Thing colours are jittered with np.random: a fixed seed gives the same colours to the same
    segments in every panel. The caller's global RNG state is restored afterwards.
    """
    from detectron2.utils.visualizer import Visualizer

    h, w = image_bgr.shape[:2]
    state = np.random.get_state()
    try:
        np.random.seed(0)
        out = draw(Visualizer(np.ascontiguousarray(image_bgr[:, :, ::-1]), metadata)).get_image()
    finally:
        np.random.set_state(state)
    if out.shape[:2] != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(out[:, :, ::-1])


def _draw_panoptic(image_bgr: np.ndarray, panoptic, metadata) -> np.ndarray:
    """detectron2's panoptic drawing of ``(ids, segments_info)`` over the image."""
    ids, segments_info = panoptic
    ids = _as_numpy(ids)
    if ids.ndim != 2:
        raise ValueError(f"panoptic ids must be an (H, W) map, got shape {ids.shape}")
    ids = torch.from_numpy(np.ascontiguousarray(_resample_nearest(ids, *image_bgr.shape[:2])))
    return _visualize(image_bgr, metadata, lambda v: v.draw_panoptic_seg(ids, segments_info))


def _draw_semantic(image_bgr: np.ndarray, sem_seg, metadata) -> np.ndarray:
    """detectron2's semantic drawing of ``sem_seg``: (C, H, W) scores (a model's output; the
    argmax over C is drawn) or (H, W) class labels (255 and other unknown labels undrawn)."""
    sem_seg = _as_numpy(sem_seg)
    if sem_seg.ndim == 3:
        sem_seg = sem_seg.argmax(axis=0)
    if sem_seg.ndim != 2:
        raise ValueError(
            f"sem_seg must be (C, H, W) scores or (H, W) labels, got shape {sem_seg.shape}"
        )
    labels = np.ascontiguousarray(_resample_nearest(sem_seg.astype(np.int64), *image_bgr.shape[:2]))
    return _visualize(image_bgr, metadata, lambda v: v.draw_sem_seg(labels))


def _draw_instances(image_bgr: np.ndarray, instances, metadata) -> np.ndarray:
    """detectron2's drawing of predicted ``Instances`` (boxes, classes, scores, masks), made on
    the image resized to the instances' image size, then resized back."""
    instances = instances.to("cpu")
    h, w = image_bgr.shape[:2]
    ih, iw = instances.image_size
    canvas = image_bgr if (ih, iw) == (h, w) else cv2.resize(image_bgr, (iw, ih))
    out = _visualize(canvas, metadata, lambda v: v.draw_instance_predictions(instances))
    return out if (ih, iw) == (h, w) else cv2.resize(out, (w, h), interpolation=cv2.INTER_AREA)


# Drawers of a detectron2 output dict's keys, in order of preference, and their panel names.
_OUTPUT_DRAWERS = (
    ("panoptic_seg", "panoptic", _draw_panoptic),
    ("sem_seg", "semantic", _draw_semantic),
    ("instances", "instances", _draw_instances),
)


def draw_result(image_bgr: np.ndarray, result, metadata) -> Tuple[Optional[np.ndarray], str]:
    """A model's result drawn over an image, and the kind of result drawn.

    Args:
        image_bgr: (H, W, 3) uint8 BGR image.
        result: a detectron2 output dict (``panoptic_seg`` drawn if present, else ``sem_seg``,
            else ``instances``); a ``(ids, segments_info)`` panoptic tuple; a ``sem_seg``
            tensor/array ((C, H, W) scores or (H, W) labels); or None. Results at another
            resolution than the image (outputs are at the original image size) are resampled.
        metadata: detectron2 ``Metadata`` of the data set (class names and colours).

    Returns:
        (ndarray or None, str): the BGR drawing and "panoptic", "semantic" or "instances";
        ``(None, "")`` for None.
    """
    if result is None:
        return None, ""
    if isinstance(result, Mapping):
        for key, kind, draw in _OUTPUT_DRAWERS:
            if result.get(key) is not None:
                return draw(image_bgr, result[key], metadata), kind
        raise ValueError(
            f"model outputs have none of {[k for k, _, _ in _OUTPUT_DRAWERS]} to draw; "
            f"keys: {sorted(result)}"
        )
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return _draw_panoptic(image_bgr, result, metadata), "panoptic"
    if torch.is_tensor(result) or isinstance(result, np.ndarray):
        return _draw_semantic(image_bgr, result, metadata), "semantic"
    raise TypeError(
        "a result to draw must be a model's output dict, a (ids, segments_info) tuple or a "
        f"sem_seg tensor/array, got {type(result).__name__}"
    )


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


def _result_panel(image_bgr, result, metadata, name: str, h: int, w: int) -> np.ndarray:
    drawn, kind = draw_result(image_bgr, result, metadata)
    return _panel(drawn, f"{name} {kind}" if kind else "", h, w)


def _grid_rows(clean, adv, dfd, results, metadata, amplification, input_format, label):
    """The grid's panel rows (see the module docstring); ``dfd`` None: no defended row."""
    h, w = clean.shape[:2]
    amp = f"{amplification:g}"

    def bgr(x):
        return _to_bgr(_to_uint8(x), input_format)

    def difference(x, name):
        diff = _to_bgr(amplified_difference(x, clean, amplification), input_format)
        return _panel(diff, f"|x_{name} - x| x{amp}", h, w)

    clean_bgr, adv_bgr = bgr(clean), bgr(adv)
    rows = [
        [
            _panel(clean_bgr, "clean", h, w),
            _result_panel(clean_bgr, results["clean"], metadata, "clean", h, w),
            _panel(None, "", h, w),
        ],
        [
            _panel(adv_bgr, label, h, w),
            _result_panel(adv_bgr, results["adv"], metadata, label, h, w),
            difference(adv, "adv"),
        ],
    ]
    if dfd is not None:
        dfd_bgr = bgr(dfd)
        rows.append(
            [
                _panel(dfd_bgr, "defended", h, w),
                _result_panel(dfd_bgr, results["def"], metadata, "defended", h, w),
                difference(dfd, "def"),
            ]
        )
    return rows


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
    perturbed_label: str = "adversarial",
) -> str:
    """Save a labelled PNG grid comparing clean, adversarial and (optionally) defended inputs
    and the model's result on each, so a reader sees what the attack changed.

    Rows (see the module docstring): [clean | clean result], [adversarial | adversarial
    result | amplified |x_adv - x|], and with ``defended_image``: [defended | defended result
    | amplified |x_def - x|]. Missing panels are dark grey. The differences are taken against
    the clean image ``x`` in float (:func:`amplified_difference`).

    Args:
        path (str): output PNG path (parent directories are created; written atomically).
        clean_image, adversarial_image: (H, W, 3) uint8 or float 0-255 arrays (or tensors) in
            ``input_format``.
        panoptic_adv: the model's result on the adversarial image, any form
            :func:`draw_result` takes (the name is from the panoptic-only grids): the model's
            output dict (``panoptic_seg``, ``sem_seg`` or ``instances`` drawn), a
            ``(ids, segments_info)`` panoptic tuple (``segments_info`` None decodes ids with
            the metadata's ``label_divisor``), or ``sem_seg`` scores/labels. Results at
            another resolution than the images are resampled (nearest). None: a blank panel.
        metadata: detectron2 ``Metadata`` of the data set (class names and colours).
        defended_image: (H, W, 3) defended adversarial image, or None (no third row).
        panoptic_def, panoptic_clean: the same for the defended and clean images.
        amplification (float): factor on |difference| before clipping to [0, 255].
        input_format (str): "BGR" or "RGB", the channel order of the images.
        title (str): optional title strip on top (e.g. "I-FGSM eps=4, nlmeans").
        perturbed_label (str): the label of the second row ("corrupted" for a corruption).

    Returns:
        str: ``path``.
    """
    clean = _to_hwc_float(clean_image, "clean_image")
    adv = _to_hwc_float(adversarial_image, "adversarial_image")
    if adv.shape != clean.shape:
        raise ValueError(f"adversarial image {adv.shape} and clean image {clean.shape} differ")
    dfd = None
    if defended_image is not None:
        dfd = _to_hwc_float(defended_image, "defended_image")
        if dfd.shape != clean.shape:
            raise ValueError(f"defended image {dfd.shape} and clean image {clean.shape} differ")
    elif panoptic_def is not None:
        logger.warning("panoptic_def given without defended_image; the defended row is skipped")
    results = {"clean": panoptic_clean, "adv": panoptic_adv, "def": panoptic_def}
    rows = _grid_rows(
        clean, adv, dfd, results, metadata, amplification, input_format, perturbed_label
    )
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    if title:
        strip = np.zeros((TITLE_HEIGHT, grid.shape[1], 3), np.uint8)
        _put_text(strip, title, 0.7)
        grid = np.concatenate([strip, grid], axis=0)
    h, w = clean.shape[:2]
    assert grid.shape[:2] == example_grid_shape(h, w, dfd is not None, title), grid.shape
    ok, png = cv2.imencode(".png", grid)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path} (grid of shape {grid.shape})")
    return atomic_write(path, png.tobytes(), mode="wb")
