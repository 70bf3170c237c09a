# Copyright (c) UPSNetRobust authors.
"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

The data goes to a temporary file in the destination's directory (same file system), which is
then moved over the destination with ``os.replace``, an atomic rename on POSIX and Windows. A
failure at any point leaves the old file (if any) untouched and no temporary file behind.
"""

import json
import os
import tempfile
from typing import Union

__all__ = ["atomic_json", "atomic_write", "read_json_if_present"]


def atomic_write(path: str, data: Union[str, bytes], mode: str = "w") -> str:
    """Write ``data`` to ``path`` atomically, creating missing parent directories.

    Args:
        path (str): destination file.
        data (str or bytes): the whole content.
        mode (str): "w" for text (written with ``newline=""``: line endings as given) or "wb"
            for bytes.

    Returns:
        str: ``path``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write({path!r}): mode must be 'w' or 'wb', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = "." + os.path.basename(path) + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        kwargs = {"newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_json(path: str, obj, indent: int = 2, allow_nan: bool = True) -> str:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically.

    Args:
        path (str): destination file.
        obj: JSON-serialisable object.
        indent (int): indentation, as in :func:`json.dumps`.
        allow_nan (bool): False raises on NaN/inf instead of writing the non-standard tokens
            ``NaN``/``Infinity`` (which strict JSON readers reject).

    Returns:
        str: ``path``.
    """
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n"
    return atomic_write(path, text, mode="w")


def read_json_if_present(path: str):
    """The JSON object in ``path``, or None when there is no such file (an optional record,
    e.g. a pass's per-image statistics)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
