# Copyright (c) UPSNetRobust authors.
"""Conversions between model-input image tensors and numpy images."""

import numpy as np
import torch

__all__ = ["pad_stack", "tensor_to_hwc_uint8"]


def tensor_to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float 0-255 -> (H, W, 3) uint8 numpy, same channel order (rounded, clipped)."""
    return image.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def pad_stack(images) -> torch.Tensor:
    """(3, h_i, w_i) images as one (N, 3, H, W) batch, zero-padded at the bottom/right to the
    largest size (objectives crop each image back, so padding gets no gradient)."""
    height = max(im.shape[-2] for im in images)
    width = max(im.shape[-1] for im in images)
    if all(im.shape[-2:] == (height, width) for im in images):
        return torch.stack(list(images))
    batch = images[0].new_zeros((len(images), 3, height, width))
    for j, im in enumerate(images):
        batch[j, :, : im.shape[-2], : im.shape[-1]] = im
    return batch
