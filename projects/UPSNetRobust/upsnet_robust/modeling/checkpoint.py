# Copyright (c) UPSNetRobust authors.
"""A checkpointer that refuses to unpickle arbitrary objects unless the user opts in."""
import pickle

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["UPSNetCheckpointer"]

_OPT_IN = "MODEL.UNSAFE_LOAD_CHECKPOINT True"


class UPSNetCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads ``.pth`` files with
    ``torch.load(weights_only=True)``, so a checkpoint cannot run code on load.

    Pickle-based formats (``.pkl`` of the detectron2 / Caffe2 model zoos, ``.pyth``) and torch
    files holding arbitrary objects need ``allow_unsafe=True`` (config ``MODEL.UNSAFE_LOAD_CHECKPOINT``).
    """

    def __init__(self, model, save_dir="", *, allow_unsafe: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unsafe = allow_unsafe

    def _load_file(self, filename):
        if not self.allow_unsafe and filename.endswith((".pkl", ".pyth")):
            raise ValueError(
                f"Refusing to unpickle checkpoint {filename}: pickle files can run arbitrary code. "
                f"If you trust it, add `{_OPT_IN}` to the command line."
            )
        return super()._load_file(filename)

    def _torch_load(self, f):
        if self.allow_unsafe:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"Checkpoint {f} holds objects other than tensors and plain containers, which "
                f"weights_only loading rejects ({e}). If you trust the file, add `{_OPT_IN}`."
            ) from e
