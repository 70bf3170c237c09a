# Copyright (c) UPSNetRobust authors.
"""The natural-corruption kind ("corruption"): every corruption of ``ROBUSTNESS.CORRUPTIONS`` at
every severity of ``ROBUSTNESS.SEVERITIES`` (the Cityscapes-C protocol), when
``ROBUSTNESS.RUN_CORRUPTIONS`` is on. No adversary: each image is corrupted by the reference
``imagecorruptions`` function with a seed derived from (ROBUSTNESS.SEED, image id, corruption,
severity), so a pass's images are the same in any process, batch or order, and after a resume.
Every defense scores the corrupted images; cells carry ``corruption`` and ``severity``."""
import importlib.metadata
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..corruptions import (
    CORRUPTIONS,
    check_input_format,
    corrupt_image,
    corruption_seed,
    validate_corruptions,
    validate_severities,
)
from ..utils.image import tensor_to_hwc_uint8
from .base import ImageStep, StepContext, StepResult, ThreatKind, ThreatProperties, ThreatSpec
from .registry import register_threat

__all__ = ["CorruptionKind", "CorruptionStep"]

# The implementation that defines the images: a different release may draw differently.
_PACKAGE = "imagecorruptions-imaug"


def _implementation() -> str:
    try:
        return f"{_PACKAGE} {importlib.metadata.version(_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:  # e.g. the module installed another way
        return "imagecorruptions"


class CorruptionStep(ImageStep):
    """A batch's corrupted images: each image rounded to uint8 (the reference works on 8-bit
    images), corrupted in RGB and returned in the model's channel order as float 0-255.

    Args:
        corruption, severity: the cell.
        seed: ROBUSTNESS.SEED (each image's seed derives from it, its id and the cell).
        input_format: INPUT.FORMAT ("BGR" or "RGB").
    """

    needs_objective = False
    steps = (0, 0.0)

    def __init__(self, corruption: str, severity: int, seed: int, input_format: str = "BGR"):
        self.corruption = corruption
        self.severity = int(severity)
        self.seed = int(seed)
        self.input_format = check_input_format(input_format)

    def image_seed(self, inputs: Dict) -> int:
        """The image's seed: from its ``image_id`` (else ``file_name``), never its position."""
        image_id = inputs.get("image_id", inputs.get("file_name"))
        if image_id is None:
            raise ValueError("corruption cells need an 'image_id' or 'file_name' per image")
        return corruption_seed(self.seed, image_id, self.corruption, self.severity)

    def __call__(self, inputs: Sequence[Dict], images: Sequence[torch.Tensor]) -> StepResult:
        out = []
        for x, image in zip(inputs, images):
            corrupted = corrupt_image(
                tensor_to_hwc_uint8(image), self.corruption, self.severity, self.image_seed(x),
                self.input_format,
            )  # fmt: skip
            tensor = torch.from_numpy(corrupted).permute(2, 0, 1).to(torch.float32)
            out.append(tensor.to(image.device))
        return StepResult(out)

    def describe(self) -> Dict:
        return {}


@register_threat("corruption")
class CorruptionKind(ThreatKind):
    """One pass per (corruption, severity); the cells' ``attack`` is the corruption's name."""

    properties = ThreatProperties()  # no gradient, no objective, no eps: attack checks skip it
    threat_model = (
        "natural corruptions (noise, blur, weather, digital; imagecorruptions, severities 1-5) "
        "applied to every test image with a seed per image, corruption and severity: no "
        "adversary, the camera's and the weather's perturbations (mPC, rPC)"
    )

    @classmethod
    def names(cls) -> List[str]:
        return list(CORRUPTIONS)

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in CORRUPTIONS

    @classmethod
    def expand(cls, cfg, include_adaptive: bool = True) -> List[ThreatSpec]:
        r = cfg.ROBUSTNESS
        listed = [a for a in r.ATTACKS if cls.claims(a)]
        if listed:
            raise ValueError(
                f"ROBUSTNESS.ATTACKS lists corruptions ({', '.join(listed)}): corruptions go in "
                "ROBUSTNESS.CORRUPTIONS, with ROBUSTNESS.RUN_CORRUPTIONS True"
            )
        if not r.RUN_CORRUPTIONS:
            return []
        corruptions = validate_corruptions(r.CORRUPTIONS)
        severities = validate_severities(r.SEVERITIES)
        return [
            ThreatSpec.make(cls.name, c, params={"corruption": c, "severity": s})
            for c in corruptions
            for s in severities
        ]

    @classmethod
    def check(cls, cfg, adapter, specs: Sequence[ThreatSpec]) -> None:
        check_input_format(cfg.INPUT.FORMAT)

    @classmethod
    def cache_key(cls, cfg, spec: ThreatSpec) -> Dict:
        return {
            "corruption": spec.param("corruption"),
            "severity": int(spec.param("severity")),
            "input_format": cfg.INPUT.FORMAT,
            "implementation": _implementation(),
        }

    @classmethod
    def tag(cls, spec: ThreatSpec) -> str:
        return f"{spec.param('corruption')}_s{spec.param('severity')}"

    @classmethod
    def example_name(cls, spec: ThreatSpec) -> str:
        return cls.tag(spec)

    example_label = "corrupted"

    @classmethod
    def example_title(cls, spec: ThreatSpec) -> str:
        return f"{spec.param('corruption')} severity {spec.param('severity')}"

    @classmethod
    def prepare(cls, cfg, spec: ThreatSpec, context: StepContext, cache_dir: str) -> None:
        """Run the corruption once on a blank 32x32 image: its one-off set-up (glass_blur's
        numba kernel compiles, 2-4 s) then stays out of the cells' time per image."""
        blank = np.zeros((32, 32, 3), np.uint8)
        corrupt_image(blank, spec.param("corruption"), spec.param("severity"), 0, "RGB")

    @classmethod
    def image_step(cls, spec: ThreatSpec, context: StepContext) -> Optional[ImageStep]:
        cfg = context.cfg
        return CorruptionStep(
            spec.param("corruption"), spec.param("severity"), cfg.ROBUSTNESS.SEED,
            cfg.INPUT.FORMAT,
        )  # fmt: skip
