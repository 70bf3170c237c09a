# Copyright (c) UPSNetRobust authors.
"""Small helpers shared across the package (no detectron2 or model code)."""

from .io import atomic_json, atomic_write

__all__ = ["atomic_json", "atomic_write"]
