# Copyright (c) UPSNetRobust authors.
"""The per-image cache of one pass: finished images are stored and found again on resume."""
import os
from typing import Dict, Iterable, Optional

import torch

from ..utils.torch_io import atomic_torch_save
from .outputs import compact_outputs, expand_outputs

__all__ = ["FAILED_KEY", "ImageCache"]

# Output key of an image that could not be scored; evaluators skip it, the report counts it.
FAILED_KEY = "failed"


class ImageCache:
    """One file per finished image, ``<directory>/<image_id>.pt``, holding its record and its
    outputs ``{defense: output}`` (or ``{FAILED_KEY: reason}``).

    Only the outputs ``keys`` are kept, in the compact form of :mod:`.outputs`, which
    ``torch.load(weights_only=True)`` reads back; :meth:`normalize` gives fresh outputs the same
    form, so a resumed pass scores exactly like an uninterrupted one.

    Args:
        directory (str): created if missing.
        keys (iterable[str]): the model outputs the evaluators read.
    """

    def __init__(self, directory: str, keys: Iterable[str]):
        self.directory = directory
        self.keys = frozenset(keys)
        os.makedirs(directory, exist_ok=True)

    def path(self, x: Dict) -> str:
        """The file of input ``x`` (named by its image_id, else its file name)."""
        key = str(x.get("image_id", os.path.basename(x.get("file_name", ""))))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return os.path.join(self.directory, f"{safe}.pt")

    def load(self, x: Dict) -> Optional[Dict]:
        """The stored entry ``{"outputs", "record"}`` of ``x``, or None."""
        path = self.path(x)
        if not os.path.isfile(path):
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        outputs = entry["outputs"]
        if FAILED_KEY not in outputs:
            entry["outputs"] = {d: expand_outputs(o) for d, o in outputs.items()}
        return entry

    def store(self, x: Dict, entry: Dict) -> None:
        """Write ``entry`` of ``x`` atomically (outputs reduced to ``keys``)."""
        outputs = entry["outputs"]
        if FAILED_KEY not in outputs:
            outputs = {d: compact_outputs(o, self.keys) for d, o in outputs.items()}
        atomic_torch_save(self.path(x), dict(entry, outputs=outputs))

    def normalize(self, output: Dict) -> Dict:
        """One fresh output in the form a cached one is read back in."""
        return expand_outputs(compact_outputs(output, self.keys))
