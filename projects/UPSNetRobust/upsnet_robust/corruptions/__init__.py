# Copyright (c) UPSNetRobust authors.
"""Natural corruptions (noise, blur, weather, digital) at severities 1-5, as in ImageNet-C and
Cityscapes-C, computed by the ``imagecorruptions`` package (the reference implementation) with a
seed per image, corruption and severity; and their summary metrics mPC and rPC."""

from .catalog import (
    CORRUPTIONS,
    FAMILIES,
    FAMILY_NAMES,
    SEVERITIES,
    UnknownCorruptionError,
    family_of,
    validate_corruptions,
    validate_severities,
)
from .functional import check_input_format, corrupt_image, corrupt_rgb, corruption_seed
from .metrics import corruption_summary

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "FAMILY_NAMES",
    "SEVERITIES",
    "UnknownCorruptionError",
    "check_input_format",
    "corrupt_image",
    "corrupt_rgb",
    "corruption_seed",
    "corruption_summary",
    "family_of",
    "validate_corruptions",
    "validate_severities",
]
