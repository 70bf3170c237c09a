# Copyright (c) UPSNetRobust authors.
"""What a threat *kind* is: how its passes expand from the config, what keys their caches, how
it produces the images that are scored, what its cells record and which properties the sanity
checks and report texts read.

A kind is one class in one module, registered with :func:`~.registry.register_threat`. The
sweep (and the Trainer's attacked evaluation, and transfer) never branch on a kind's name: they
ask the kind. A *pass* (:class:`ThreatSpec`) is computed once and scored under every defense;
its images come from the kind's :class:`ImageStep` inside the attack hook, one batch at a time.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    "ImageFailure",
    "ImageStep",
    "StepContext",
    "StepResult",
    "ThreatKind",
    "ThreatProperties",
    "ThreatSpec",
    "canonical",
]


@dataclass(frozen=True)
class ThreatProperties:
    """What the sanity checks and texts read about a pass (never its name).

    Attributes:
        reference: the unperturbed images (clean): the reference of ratios and checks.
        single_step / iterative: one gradient step, or several (an attack is one or the other;
            corruptions and clean are neither).
        ensemble: a worst case over member passes (its cells list ``members``).
        targeted: pushes towards chosen targets (not held against untargeted attacks).
        needs_gradients / needs_objective: runs backward passes / maximises an objective.
        needs_training_split: has a ``prepare`` phase over training images (universal
            perturbations, patches).
        eps_bounded: its images lie in an L-inf ball of radius ``eps`` (eps checks apply).
        baseline: the name of a pass it must be at least as strong as at an equal budget of
            forward-backward passes (APGD declares "pgd"), or None.
    """

    reference: bool = False
    single_step: bool = False
    iterative: bool = False
    ensemble: bool = False
    targeted: bool = False
    needs_gradients: bool = False
    needs_objective: bool = False
    needs_training_split: bool = False
    eps_bounded: bool = False
    baseline: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ThreatProperties":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _frozen(mapping: Optional[Mapping]) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted((str(k), v) for k, v in (mapping or {}).items()))


@dataclass(frozen=True)
class ThreatSpec:
    """One pass of a sweep (or of the Trainer's attacked evaluation, or of transfer).

    Attributes:
        kind: the registered kind's name (``THREAT_REGISTRY``).
        name: the cells' ``attack`` value ("clean", "pgd", "sea", a corruption's name, ...).
        eps: the L-inf budget (0 where the kind has none).
        adaptive: the defense an adaptive pass attacks through, else None.
        objective: the objective the pass maximises, resolved once at expansion (None where
            the kind needs none).
        overrides: ``ROBUSTNESS`` keys this pass runs with instead of the config's (a sea
            member's steps and objective), as sorted ``(key, value)`` pairs.
        params: kind-specific settings, sorted ``(key, value)`` pairs (a corruption's
            ``corruption`` and ``severity``); they go into the cells as they are.
        members: an ensemble's member passes.
        member_of: the ensembles a pass serves.
    """

    kind: str
    name: str
    eps: float = 0.0
    adaptive: Optional[str] = None
    objective: Optional[str] = None
    overrides: Tuple[Tuple[str, Any], ...] = ()
    params: Tuple[Tuple[str, Any], ...] = ()
    members: Tuple["ThreatSpec", ...] = ()
    member_of: Tuple[str, ...] = ()

    @classmethod
    def make(cls, kind: str, name: str, *, overrides=None, params=None, **fields) -> "ThreatSpec":
        """A spec with ``overrides`` / ``params`` given as dicts."""
        return cls(kind, name, overrides=_frozen(overrides), params=_frozen(params), **fields)

    def replace(self, **fields) -> "ThreatSpec":
        return dataclasses.replace(self, **fields)

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)

    def override(self, key: str, default=None):
        return dict(self.overrides).get(key, default)

    def same_pass(self, other: "ThreatSpec") -> bool:
        """Same images: equal but for ``member_of``."""
        return self.replace(member_of=()) == other.replace(member_of=())

    # the dict view of older callbacks (``spec["attack"]``, ``spec["eps"]``, ...)
    def __getitem__(self, key: str):
        if key == "attack":
            return self.name
        if key == "member_of":
            return list(self.member_of)
        if key in dict(self.params):
            return self.param(key)
        if key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value in ((), []) and key == "member_of" else value

    def cfg(self, cfg):
        """``cfg`` with this pass's ``overrides`` (``cfg`` itself when there are none)."""
        if not self.overrides:
            return cfg
        out = cfg.clone()
        out.defrost()
        for key, value in self.overrides:
            out.ROBUSTNESS[key] = value
        out.freeze()
        return out


def canonical(value):
    """A JSON-able, order-stable form of a constructor argument, for cache keys: a generator by
    its seed, a tensor by its values, mappings and sequences element-wise."""
    if isinstance(value, torch.Generator):
        return {"generator_seed": int(value.initial_seed())}
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "dump"):  # a CfgNode
        return value.dump()
    return repr(value)


class ImageFailure(RuntimeError):
    """An :class:`ImageStep` could not produce an image; the hook records the reason and skips
    the image (a batch is redone image by image to find which one failed)."""


class StepResult(NamedTuple):
    """What an :class:`ImageStep` gives back for a batch.

    Attributes:
        images: per image, the (3, H, W) float image to score (0-255, the input's size).
        passes: per image, forward-backward passes it needed (None: not counted).
        stats: numbers recorded in every image's record (e.g. adaptive defense seconds).
        seconds: the batch's time as the step measured it (None: the hook times the call).
        losses: per image, the objective's value at the returned image (None: not measured);
            the report checks that it rises with eps (a flat or falling loss points at a
            masked gradient or a broken step control).
    """

    images: List[torch.Tensor]
    passes: Optional[List[int]] = None
    stats: Dict[str, float] = {}
    seconds: Optional[float] = None
    losses: Optional[List[float]] = None


class ImageStep:
    """Produces a batch's scored images; built by :meth:`ThreatKind.image_step` per pass and
    called by the attack hook (:class:`~upsnet_robust.evaluation.AdversarialInference`) under
    ``torch.enable_grad()``, timed as the pass's ``attack_s``.

    Attributes:
        batch_size: images per call (None: the hook's ROBUSTNESS.BATCH_SIZE; an adaptive pass
            uses 1).
        needs_objective: whether it maximises an objective (the hook's mapper then loads the
            objective's ground truth).
        steps: ``(num_steps, step_size)`` the cells record (the real ones of the built attack).
    """

    batch_size: Optional[int] = None
    needs_objective: bool = False
    steps: Tuple[int, float] = (0, 0.0)

    def __call__(self, inputs: Sequence[Dict], images: Sequence[torch.Tensor]) -> StepResult:
        """
        Args:
            inputs: the batch's dataset dicts (``image_id``, ground truth, ...).
            images: their (3, H, W) float images on the model's device.

        Raises:
            ImageFailure (or NonFiniteGradientError): an image cannot be produced.
        """
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """Fields every cell of the pass records (``random_start``, ``restarts``, ...)."""
        return {}


@dataclass
class StepContext:
    """What a kind may use to build its :class:`ImageStep`.

    Attributes:
        cfg: the pass's config (its ``overrides`` applied).
        adapter: the model's :class:`~upsnet_robust.adapters.ModelAdapter`.
        defenses: ordered ``{name: Transform or None}`` of the pass.
        adaptive: the pass's adaptive settings (surrogate, EOT samples) or None.
        device: the model's device.
        cache_dir: the pass's directory (where :meth:`ThreatKind.prepare` keeps what it fits),
            or None.
    """

    cfg: Any
    adapter: Any
    defenses: Mapping[str, Any] = field(default_factory=dict)
    adaptive: Any = None
    device: Any = None
    cache_dir: Optional[str] = None


class ThreatKind:
    """Base class of threat kinds (see the module docstring). Subclasses set the class
    attributes and override the methods they need; the defaults fit a kind with one pass per
    name and eps and no training phase.

    Attributes:
        name: the kind's registry name (set by :func:`~.registry.register_threat`).
        properties: default :class:`ThreatProperties` of its passes (see
            :meth:`spec_properties`).
        threat_model: one sentence for the report: what the adversary knows and may do.
        combines: True for kinds whose cells are computed from other passes' stored per-image
            statistics (an ensemble): :meth:`combine` instead of an image step.
        sweep_only: True if only the sweep can run it (the Trainer's attacked evaluation and
            transfer raise a clear error).
        objective_texts: ``{objective name: sentence}`` for objective names the kind puts in
            its cells that are not registered objectives (an ensemble's "ensemble").
        own_modules: modules or packages (dotted names) that implement the kind besides its
            own module (e.g. the image functions of a corruption kind): they, too, may compare
            against its names.
    """

    name = "threat"
    properties = ThreatProperties()
    threat_model = ""
    combines = False
    sweep_only = False
    objective_texts: Dict[str, str] = {}
    own_modules: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ config -> specs
    @classmethod
    def expand(cls, cfg, include_adaptive: bool = True) -> List[ThreatSpec]:
        """This kind's passes in ``cfg``, in order (may be empty). Expansion never builds a
        model; the sweep merges passes equal to one listed earlier."""
        return []

    @classmethod
    def names(cls) -> List[str]:
        """The ``ROBUSTNESS.ATTACKS`` names this kind serves (for error messages)."""
        return []

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether a cell whose ``attack`` is ``name`` belongs to this kind (cells of older
        runs carry no ``threat`` record)."""
        return False

    @classmethod
    def check(cls, cfg, adapter, specs: Sequence[ThreatSpec]) -> None:
        """Fail at set-up, naming the key and what to set, for anything of ``specs`` that cannot
        run on ``adapter``'s model."""

    # ------------------------------------------------------------------ per spec
    @classmethod
    def spec_properties(cls, spec_or_name) -> ThreatProperties:
        """The properties of one pass (or cell name); default: the kind's."""
        return cls.properties

    @classmethod
    def cache_key(cls, cfg, spec: ThreatSpec) -> Dict[str, Any]:
        """Everything that determines the pass's images besides the model, data, seed,
        quantisation and defenses (the sweep adds those). ``cfg``: the pass's config."""
        return {"name": spec.name, "eps": spec.eps, "params": canonical(dict(spec.params))}

    @classmethod
    def tag(cls, spec: ThreatSpec) -> str:
        """The pass's readable name in directory and file names (a hash follows it)."""
        return f"{spec.name}_eps{spec.eps:g}"

    @classmethod
    def example_name(cls, spec: ThreatSpec) -> str:
        """The pass's name in example-grid file names (distinct per pass)."""
        if spec.adaptive:
            return f"{spec.name}-adaptive-{spec.adaptive}"
        if spec.member_of:  # a member's grids, apart from a plain pass of its attack
            return f"{spec.name}-{spec.objective}-T{spec.override('NUM_STEPS', '')}"
        return spec.name

    @classmethod
    def example_title(cls, spec: ThreatSpec) -> str:
        """The title of the pass's example grids."""
        return f"{spec.name} eps={spec.eps:g}"

    #: The label of the perturbed row of the example grids.
    example_label = "adversarial"

    @classmethod
    def prepare(cls, cfg, spec: ThreatSpec, context: StepContext, cache_dir: str) -> None:
        """Optional phase before the pass (``properties.needs_training_split``): e.g. fit a
        universal perturbation or a patch on the training split (``cfg.DATASETS.TRAIN``), stored
        in ``cache_dir`` (the pass's cache directory) so a resumed run loads it instead of
        fitting again; :meth:`image_step` then reads it. Runs on every process before the pass
        (sweep, Trainer, transfer): write from the main process and synchronize. Default:
        nothing."""

    @classmethod
    def image_step(cls, spec: ThreatSpec, context: StepContext) -> Optional[ImageStep]:
        """The step producing the pass's images; None scores the clean images."""
        return None

    @classmethod
    def cell_fields(cls, spec: ThreatSpec, step: Optional[ImageStep]) -> Dict[str, Any]:
        """The kind's fields of every cell of the pass (besides metrics, times and counts):
        ``attack``, ``objective``, ``eps``, ``num_steps``, ``step_size``, ``params``, the
        ``threat`` record, ..."""
        num_steps, step_size = step.steps if step is not None else (0, 0.0)
        fields = {
            "attack": spec.name,
            "objective": spec.objective,
            "eps": spec.eps,
            "num_steps": int(num_steps),
            "step_size": float(step_size),
            "random_start": False,
            "restarts": 1,
        }
        if step is not None:
            fields.update(step.describe())
        fields.update(dict(spec.params))
        fields["threat"] = dict(kind=cls.name, **cls.spec_properties(spec).to_dict())
        return fields

    @classmethod
    def combine(cls, spec: ThreatSpec, members, task: str, directory: str) -> List[Dict]:
        """Cells of a combining kind (:attr:`combines`) from its members' passes: ``members``
        holds, per member spec, ``(member spec, its pass dir, its cells)``."""
        raise NotImplementedError(f"threat kind {cls.name!r} does not combine passes")
