# Copyright (c) UPSNetRobust authors.
"""Conversions between model-input image tensors and numpy images."""

import numpy as np
import torch

__all__ = ["tensor_to_hwc_uint8"]


def tensor_to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float 0-255 -> (H, W, 3) uint8 numpy, same channel order (rounded, clipped)."""
    return image.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
