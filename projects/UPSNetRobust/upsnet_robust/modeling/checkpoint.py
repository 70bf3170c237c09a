# Copyright (c) UPSNetRobust authors.
"""A checkpointer that refuses to unpickle arbitrary objects unless the user opts in, and that
tells an unreadable file (truncated, corrupt, not a checkpoint at all) from a checkpoint that
holds objects other than tensors."""

import os
import pickle
import pickletools
import zipfile
from typing import Mapping, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["UPSNetCheckpointer", "UnreadableCheckpointError", "describe_unreadable_checkpoint"]

_OPT_IN = "MODEL.UNSAFE_LOAD_CHECKPOINT True"
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END_MAGIC = b"PK\x05\x06"  # end-of-central-directory record, ends the archive
_PICKLE_PROTO = 0x80  # first byte of pickles of protocol >= 2 (torch.save, detectron2 .pkl)
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-1.6 format
_EOF_HINTS = ("unexpected eof", "ran out of input", "truncated", "more bytes")


class UnreadableCheckpointError(ValueError):
    """A ``MODEL.WEIGHTS`` file that is not a readable PyTorch checkpoint."""


def _head(path: str, size: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _has_zip_end(path: str, size: int) -> bool:
    """Whether the file ends with a complete end-of-central-directory record (22 bytes and a
    comment), which a truncated zip archive lacks."""
    with open(path, "rb") as f:
        start = max(0, size - (1 << 16) - 22)
        f.seek(start)
        tail = f.read()
    position = tail.rfind(_ZIP_END_MAGIC)
    if position < 0 or position + 22 > len(tail):
        return False
    comment_length = int.from_bytes(tail[position + 20 : position + 22], "little")
    return position + 22 + comment_length == len(tail)


def _describe_zip(path: str, size: int) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                return "it is a zip archive without data.pkl, not a file written by torch.save"
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        if not _has_zip_end(path, size):
            return (
                f"it starts as a zip archive (torch.save's format) but its end is missing: the "
                f"file is truncated ({size} bytes), e.g. by an interrupted download or copy"
            )
        return f"it is a damaged zip archive (corrupt): {e}"
    if bad is not None:
        return f"its zip member {bad} fails its CRC check: the file is corrupt"
    return None


def _describe_pickles(path: str, size: int, error: Optional[BaseException]) -> Optional[str]:
    # Walks the opcodes of the pickles (pickletools executes nothing): torch's legacy format is
    # five pickles (magic number, protocol, system info, object, storage keys) followed by the
    # raw storages; other pickle files hold one.
    with open(path, "rb") as f:
        count, index = 1, 0
        while index < count:
            try:
                for position, (_, arg, _) in enumerate(pickletools.genops(f)):
                    if index == 0 and position < 3 and arg == _LEGACY_TORCH_MAGIC:
                        count = 5
            except Exception as e:  # ValueError, or struct / unicode errors on garbage
                if f.tell() >= size:  # the parser ran into the end of the file
                    return f"its pickle data ends early: the file is truncated ({size} bytes)"
                return f"its pickle data is damaged (corrupt): {type(e).__name__}: {e}"
            index += 1
    message = str(error).lower() if error is not None else ""
    if isinstance(error, EOFError) or any(hint in message for hint in _EOF_HINTS):
        return f"its tensor data ends early: the file is truncated ({size} bytes)"
    return None


def describe_unreadable_checkpoint(
    path: str, error: Optional[BaseException] = None
) -> Optional[str]:
    """Why ``path`` is not a readable PyTorch checkpoint, or None if its container looks intact.

    Checks the container without unpickling anything: a zip archive (torch.save since 1.6)
    must be complete, hold ``data.pkl`` and pass its CRC checks; a pickle file (torch's legacy
    format, detectron2's ``.pkl``) must parse to its end.

    Args:
        path (str): a local file.
        error (Exception or None): the error loading it raised; an end-of-file error in a legacy
            file whose pickles are complete means its tensor data is cut short.

    Returns:
        str or None: a reason, e.g. "the file is truncated (1234 bytes)".
    """
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes): truncated, e.g. by an interrupted download or copy"
    head = _head(path)
    if head.startswith(_ZIP_MAGIC):
        return _describe_zip(path, size)
    if head[0] == _PICKLE_PROTO:
        return _describe_pickles(path, size, error)
    if head.startswith(b"version https://git-lfs"):
        kind = "a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)"
    elif head.lstrip().startswith(b"<"):
        kind = "HTML/XML text, e.g. an error page saved by a failed download"
    else:
        kind = f"neither a zip archive nor a pickle; it starts with {head[:16]!r}"
    return f"it is {kind}"


def _unreadable(path: str, reason: str) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(
        f"Checkpoint {path} is not a readable PyTorch checkpoint (a zip or pickle file written "
        f"by torch.save, or a detectron2 .pkl): {reason}."
    )


class UPSNetCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads ``.pth`` files with
    ``torch.load(weights_only=True)``, so a checkpoint cannot run code on load.

    Pickle-based formats (``.pkl`` of the detectron2 / Caffe2 model zoos, ``.pyth``) and torch
    files holding arbitrary objects need ``allow_unsafe=True`` (config
    ``MODEL.UNSAFE_LOAD_CHECKPOINT``). A truncated, corrupt or non-checkpoint file raises
    :class:`UnreadableCheckpointError`.
    """

    def __init__(self, model, save_dir="", *, allow_unsafe: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unsafe = allow_unsafe

    def load(self, path, *args, **kwargs):
        """A directory (e.g. one written by `transformers`' ``save_pretrained``) is handed to
        the model's ``load_pretrained_directory``, before fvcore asserts a file; files load as
        in detectron2."""
        if path and os.path.isdir(path):
            model = self.model.module if hasattr(self.model, "module") else self.model
            hook = getattr(model, "load_pretrained_directory", None)
            if hook is None:
                raise ValueError(
                    f"MODEL.WEIGHTS {path} is a directory; {type(model).__name__} loads "
                    "checkpoint files only (directories written by save_pretrained are for "
                    "MODEL.META_ARCHITECTURE TransformersSegmentor)"
                )
            self.logger.info("[UPSNetCheckpointer] Loading the model directory %s ...", path)
            hook(path)
            return {}
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if not self.allow_unsafe and filename.endswith((".pkl", ".pyth")):
            raise ValueError(
                f"Refusing to unpickle checkpoint {filename}: pickle files can run arbitrary code. "
                f"If you trust it, add `{_OPT_IN}` to the command line."
            )
        try:
            loaded = super()._load_file(filename)
        except UnreadableCheckpointError:
            raise
        except Exception as e:
            if not os.path.isfile(filename):
                raise
            reason = describe_unreadable_checkpoint(filename, e)
            if reason is None:
                raise
            raise _unreadable(filename, reason) from e
        if not isinstance(loaded.get("model"), Mapping):
            raise _unreadable(
                filename,
                f"it holds a {type(loaded.get('model')).__name__}, not a state dict (a dict of "
                "tensors) or a dict with one under 'model'",
            )
        return loaded

    def _torch_load(self, f):
        if self.allow_unsafe:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            reason = describe_unreadable_checkpoint(f, e)
            if reason is not None:
                raise _unreadable(f, reason) from e
            raise ValueError(
                f"Checkpoint {f} holds objects other than tensors and plain containers, which "
                f"weights_only loading rejects ({e}). If you trust the file, add `{_OPT_IN}`."
            ) from e
