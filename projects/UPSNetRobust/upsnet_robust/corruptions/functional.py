# Copyright (c) UPSNetRobust authors.
"""One corruption of one image, seeded by the image, through the reference implementation.

``imagecorruptions`` draws its randomness from numpy's global RNG (and, for ``impulse_noise`` and
``glass_blur``, from an explicit ``seed`` argument). Every call here sets that state from a seed
derived from (sweep seed, image id, corruption, severity) and restores the caller's state
afterwards, so an image's corrupted version does not depend on which process corrupts it, in
which order, or whether the run was resumed.
"""

import hashlib
import inspect
import threading

import numpy as np
from imagecorruptions import corrupt, corruption_dict

from .catalog import CORRUPTIONS, SEVERITIES, UnknownCorruptionError

__all__ = ["corruption_seed", "corrupt_rgb", "corrupt_image", "check_input_format"]

# numpy's global RNG is one per process: two threads corrupting at once would share it.
_RNG_LOCK = threading.Lock()
# Reference functions that take their own seed (they do not read numpy's global state).
_TAKES_SEED = frozenset(
    name for name in CORRUPTIONS if "seed" in inspect.signature(corruption_dict[name]).parameters
)
_FORMATS = ("BGR", "RGB")


def corruption_seed(seed: int, image_id, corruption: str, severity: int) -> int:
    """A 32-bit seed for one image under one corruption cell: a hash of all four, so it is the
    same in every process and differs between images, corruptions and severities."""
    text = f"{int(seed)}:{image_id}:{corruption}:{int(severity)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def corrupt_rgb(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``imagecorruptions.corrupt`` of an (H, W, 3) uint8 RGB image with numpy's global RNG
    seeded by ``seed`` (and ``seed`` passed to the functions that take one); the caller's RNG
    state is restored. Returns (H, W, 3) uint8 RGB."""
    if corruption not in CORRUPTIONS:
        raise UnknownCorruptionError(f"Unknown corruption {corruption!r}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    kwargs = {"seed": int(seed)} if corruption in _TAKES_SEED else {}
    with _RNG_LOCK:
        state = np.random.get_state()
        try:
            np.random.seed(int(seed))
            out = corrupt(image, corruption_name=corruption, severity=int(severity), **kwargs)
        finally:
            np.random.set_state(state)
    return np.ascontiguousarray(out)


def check_input_format(input_format: str) -> str:
    """INPUT.FORMAT as a channel order corruptions can work in (BGR or RGB), else an error."""
    if input_format not in _FORMATS:
        raise ValueError(
            f"INPUT.FORMAT {input_format!r}: corruptions need a 3-channel image, BGR or RGB"
        )
    return input_format


def corrupt_image(
    image: np.ndarray, corruption: str, severity: int, seed: int, input_format: str = "BGR"
) -> np.ndarray:
    """Corrupt an (H, W, 3) uint8 image in the model's channel order (INPUT.FORMAT): the
    reference functions see RGB (fog, frost and snow are colour-specific), the result comes back
    in ``input_format``."""
    flip = check_input_format(input_format) == "BGR"
    rgb = image[..., ::-1] if flip else image
    out = corrupt_rgb(np.ascontiguousarray(rgb), corruption, severity, seed)
    return np.ascontiguousarray(out[..., ::-1]) if flip else out
