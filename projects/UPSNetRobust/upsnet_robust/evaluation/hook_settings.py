# Copyright (c) UPSNetRobust authors.
"""Settings of the attack hook (:class:`~.adversarial_inference.AdversarialInference`), read
from ``cfg.ROBUSTNESS`` by their ``from_config`` or given directly."""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["AdaptiveSettings", "HookSettings", "amp_dtype"]

_AMP_DTYPES = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(name: str) -> Optional[torch.dtype]:
    """The autocast dtype named by ROBUSTNESS.AMP ("" -> None)."""
    if name not in _AMP_DTYPES:
        raise ValueError(
            f"ROBUSTNESS.AMP must be one of {sorted(_AMP_DTYPES)} ('' = off), got {name!r}"
        )
    return _AMP_DTYPES[name]


@dataclass(frozen=True)
class HookSettings:
    """How the hook attacks, defends and infers a batch.

    Attributes:
        objective (str): objective used when the attack does not require its own.
        input_format (str): channel order of ``image`` (cfg.INPUT.FORMAT).
        quantize (bool): round adversarial images to uint8 before defense and model.
        seed (int): sweep seed; each image's seed derives from it and its image_id.
        batch_size (int): images attacked together (one model run per attack step for all of
            them, per-image eps-balls on a zero-padded batch); adaptive passes use 1.
        amp_dtype (torch.dtype): run the attack's forward/backward under ``torch.autocast``
            with this dtype (mixed precision); None: full precision. Inference stays float32.
        output_keys (tuple[str]): the model outputs the evaluators read (e.g.
            ``("panoptic_seg",)``); the adapter may skip the others, and the cache keeps only
            these. None: all outputs (cached: the adapter task's output).
    """

    objective: str = "train_losses"
    input_format: str = "BGR"
    quantize: bool = False
    seed: int = 0
    batch_size: int = 1
    amp_dtype: Optional[torch.dtype] = None
    output_keys: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.output_keys is not None:
            object.__setattr__(self, "output_keys", tuple(self.output_keys))

    @classmethod
    def from_config(cls, cfg, output_keys=None) -> "HookSettings":
        """ROBUSTNESS.{OBJECTIVE, QUANTIZE, SEED, BATCH_SIZE, AMP} and INPUT.FORMAT."""
        r = cfg.ROBUSTNESS
        return cls(
            objective=r.OBJECTIVE,
            input_format=cfg.INPUT.FORMAT,
            quantize=r.QUANTIZE,
            seed=r.SEED,
            batch_size=r.BATCH_SIZE,
            amp_dtype=amp_dtype(r.AMP),
            output_keys=output_keys,
        )

    def replace(self, **fields) -> "HookSettings":
        """A copy with ``fields`` changed; ``panoptic_only=True`` is shorthand for
        ``output_keys=("panoptic_seg",)``.

        Raises:
            TypeError: a name that is not a field, listing the fields.
        """
        if fields.pop("panoptic_only", False):
            fields["output_keys"] = ("panoptic_seg",)
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(
                f"Unknown hook setting(s) {unknown}; HookSettings fields: {sorted(names)} "
                "(and panoptic_only)"
            )
        return dataclasses.replace(self, **fields)


@dataclass(frozen=True)
class AdaptiveSettings:
    """A defense-aware (adaptive) pass: the attack runs against ``model o defense``, with BPDA
    through the real defense and EOT over the masks of a randomised one.

    Attributes:
        defense (str): the attacked defense, a name among the hook's defenses (not "none").
        surrogate: BPDA surrogate choice
            (:func:`upsnet_robust.defenses.surrogates.resolve_surrogates`; "auto" = defaults).
        eot_samples (int): EOT samples for a randomised defense (None/<= 0: the default).
    """

    defense: str
    surrogate: object = "auto"
    eot_samples: Optional[int] = None

    @classmethod
    def from_config(cls, cfg, defense: str) -> "AdaptiveSettings":
        """ROBUSTNESS.{BPDA_SURROGATE, EOT_SAMPLES} for an adaptive pass against ``defense``."""
        r = cfg.ROBUSTNESS
        return cls(defense=defense, surrogate=r.BPDA_SURROGATE, eot_samples=r.EOT_SAMPLES)
