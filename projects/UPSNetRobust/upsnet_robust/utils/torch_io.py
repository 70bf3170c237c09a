# Copyright (c) UPSNetRobust authors.
"""``torch.save`` through :func:`~upsnet_robust.utils.io.atomic_write`: a resumed run never
loads a half-written tensor file."""

import io

import torch

from .io import atomic_write

__all__ = ["atomic_torch_save"]


def atomic_torch_save(path: str, obj) -> str:
    """``torch.save(obj)`` to ``path`` atomically (serialised in memory, then moved in).

    Returns:
        str: ``path``.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getvalue(), mode="wb")
