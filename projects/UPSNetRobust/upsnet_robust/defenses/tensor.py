# Copyright (c) UPSNetRobust authors.
"""Apply a (numpy) defense transform to a batch of image tensors."""

import numpy as np
import torch

__all__ = ["apply_defense_to_tensor"]

_NUMPY_DTYPES = (torch.uint8, torch.float32, torch.float64)


@torch.no_grad()
def apply_defense_to_tensor(transform, images, input_format="BGR"):
    """Run a defense on model-input tensors, image by image (or, for a transform with an
    ``defend_tensor`` fast path such as torch NL-means, on the whole batch on its device).

    Each image is moved to the CPU, laid out as (H, W, 3) BGR numpy (channels reversed when
    ``input_format`` is "RGB", since the defenses assume OpenCV's BGR order), passed to
    ``transform.apply_image`` and converted back. The result has the input's layout, channel
    order, dtype and device. uint8, float32 and float64 images keep their numpy dtype; other
    dtypes (float16, bfloat16) are processed as float32.

    NOTE: not differentiable (runs under ``no_grad`` and returns a tensor without history).
    Adaptive attacks need BPDA/EOT around it.

    Args:
        transform (Transform or str): a defense transform (anything with ``apply_image``), or a
            defense name for :func:`build_defense`.
        images (Tensor): (N, 3, H, W) or (3, H, W), values in [0, 255], in ``input_format``.
        input_format (str): "BGR" or "RGB" (detectron2's ``cfg.INPUT.FORMAT``).

    Returns:
        Tensor: defended images, same shape, dtype and device as ``images``.
    """
    if isinstance(transform, str):
        from .registry import build_defense

        transform = build_defense(transform)
    if input_format not in ("BGR", "RGB"):
        raise ValueError(f"Defenses support INPUT.FORMAT 'BGR' or 'RGB', got '{input_format}'.")
    single = images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"Expected (N, 3, H, W) or (3, H, W) images, got {tuple(images.shape)}.")
    tensor_path = getattr(transform, "defend_tensor", None)  # e.g. torch NL-means, on-device
    if tensor_path is not None:
        out = tensor_path(batch.detach(), input_format)
        if out is not None:
            out = out.to(device=images.device, dtype=images.dtype)
            return out[0] if single else out
    x = batch.detach().cpu()
    if x.dtype not in _NUMPY_DTYPES:
        x = x.float()
    outs = []
    for img in x:
        hwc = img.permute(1, 2, 0).numpy()
        if input_format == "RGB":
            hwc = hwc[:, :, ::-1]
        out = np.asarray(transform.apply_image(np.ascontiguousarray(hwc)))
        if out.shape != hwc.shape:
            raise RuntimeError(f"{transform} changed the image shape {hwc.shape} -> {out.shape}.")
        if input_format == "RGB":
            out = out[:, :, ::-1]
        outs.append(out.transpose(2, 0, 1))
    # one numpy copy into (N, 3, H, W); torch.stack on permuted views is much slower
    result = torch.from_numpy(np.ascontiguousarray(np.stack(outs)))
    result = result.to(device=images.device, dtype=images.dtype)
    return result[0] if single else result
