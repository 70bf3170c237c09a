# Copyright (c) UPSNetRobust authors.
"""Result cells: the typed view of one (attack, eps, defense, ...) result of a robustness sweep.

A sweep stores its cells as plain dicts (robustness.json, the sweep's cache). :class:`ResultCell`
gives them typed fields and converts both ways exactly: ``ResultCell.from_dict(d).to_dict() ==
d``, key order included, unknown keys kept in ``extra``. Every report function accepts dicts or
ResultCells.

Every cell belongs to a *task*, whose metrics it carries at top level under detectron2's names
(:data:`TASK_METRICS`, 0-100 scale, None when undefined); its ``metric`` names the headline
metric that the sanity checks, ranking, ratios and plots use. A cell without ``task`` is
panoptic; one without ``metric`` uses its task's headline (:data:`HEADLINE_METRICS`).
"""

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

from ...tasks import HEADLINE_METRICS, TABLE_METRICS, TASK_METRICS, TASKS  # one place
from ...utils.numbers import finite  # noqa: F401  (re-exported)

__all__ = [
    "CLEAN",
    "HEADLINE_METRICS",
    "METRICS",
    "TABLE_METRICS",
    "TASKS",
    "TASK_METRICS",
    "UNDEFENDED",
    "ReportKind",
    "ResultCell",
    "as_cells",
    "cell_order",
    "clean_scores",
    "finite",
    "metric_ratios",
    "report_kind",
    "split_by_model_task",
]

CLEAN = "clean"  # ``attack`` of a clean (unattacked) cell; its eps is 0
UNDEFENDED = "none"  # ``defense`` of an undefended cell
DEFAULT_TASK = "panoptic_seg"

METRICS = tuple(m for names in TASK_METRICS.values() for m in names)

CellLike = Union["ResultCell", Mapping[str, Any]]


@dataclass
class ResultCell:
    """One result of a robustness sweep (see the module docstring).

    Clean cells have ``attack == "clean"`` and ``eps == 0``; ``defense == "none"`` marks
    undefended cells. Adaptive cells (the attack differentiated through the defense: BPDA and
    EOT) also carry ``surrogate``, ``eot_samples`` and ``attack_defense_s_per_image``.
    ``breakdown`` (optional) splits the metrics by segment size, things/stuff and class (see
    :mod:`upsnet_robust.evaluation.breakdown`). Values are stored as given (no type coercion),
    so a round trip through a dict is exact.
    """

    attack: str
    objective: Optional[str] = None
    eps: float = 0.0
    num_steps: int = 0
    step_size: float = 0.0
    random_start: bool = False
    restarts: int = 1
    defense: str = UNDEFENDED
    adaptive: bool = False
    quantized: bool = False
    task: str = DEFAULT_TASK
    metric: Optional[str] = None  # None: the task's headline metric
    model: Optional[str] = None  # meta-architecture name, e.g. "UPSNet"
    PQ: Optional[float] = None
    SQ: Optional[float] = None
    RQ: Optional[float] = None
    PQ_th: Optional[float] = None
    PQ_st: Optional[float] = None
    mIoU: Optional[float] = None
    fwIoU: Optional[float] = None
    mACC: Optional[float] = None
    pACC: Optional[float] = None
    AP: Optional[float] = None
    AP50: Optional[float] = None
    AP75: Optional[float] = None
    APs: Optional[float] = None
    APm: Optional[float] = None
    APl: Optional[float] = None
    attack_s_per_image: Optional[float] = None
    attack_passes_per_image: Optional[float] = None  # forward+backward passes per image
    # mean objective value at the adversarial images (attacks that report it): rises with eps
    attack_loss: Optional[float] = None
    defense_s_per_image: Optional[float] = None
    num_images: int = 0
    num_failed: int = 0
    failures: List[Dict[str, Any]] = field(default_factory=list)
    surrogate: Optional[str] = None
    eot_samples: Optional[int] = None
    attack_defense_s_per_image: Optional[float] = None
    # size / things-stuff / per-class split of the metrics (evaluation.breakdown); None in
    # cells from sweeps that predate it, which report it as n/a
    breakdown: Optional[Dict[str, Any]] = None
    # the threat kind and the properties the checks and texts read (upsnet_robust.threats);
    # None in cells of older sweeps, whose properties come from their attack's registered kind
    threat: Optional[Dict[str, Any]] = None
    corruption: Optional[str] = None  # a natural corruption's name (corruption cells)
    severity: Optional[int] = None  # its severity
    extra: Dict[str, Any] = field(default_factory=dict)  # keys this class does not know

    def __post_init__(self):
        self.task = self.task or DEFAULT_TASK
        if self.task not in TASK_METRICS:
            raise ValueError(
                f"Result cell {self.label()}: 'task' must be one of {list(TASKS)}, "
                f"got {self.task!r}"
            )
        self.metric = self.metric or HEADLINE_METRICS[self.task]
        if self.metric not in TASK_METRICS[self.task]:
            raise ValueError(
                f"Result cell {self.label()}: 'metric' of a {self.task} cell must be one of "
                f"{list(TASK_METRICS[self.task])}, got {self.metric!r}"
            )
        if self.breakdown is not None and not isinstance(self.breakdown, Mapping):
            raise ValueError(
                f"Result cell {self.label()}: 'breakdown' must be a dict (size, things, stuff, "
                f"per_class) or absent, got {type(self.breakdown).__name__}"
            )

    # -- conversion ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ResultCell":
        """The cell of a sweep's dict; keys that are not fields go to ``extra``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"A result cell must be a dict, got {type(data).__name__}")
        if "attack" not in data:
            raise ValueError(
                f"Result cell without an 'attack' key (keys: {sorted(map(str, data))}); "
                "expected the sweep's cell dict with 'attack', 'eps', 'defense' and metrics"
            )
        known = {k: v for k, v in data.items() if k in _FIELDS}
        if isinstance(known.get("failures"), list):
            known["failures"] = list(known["failures"])
        cell = cls(**known, extra={k: v for k, v in data.items() if k not in _FIELDS})
        cell._source_keys = tuple(data)
        return cell

    def to_dict(self) -> Dict[str, Any]:
        """The sweep's dict form. A cell read by :meth:`from_dict` gives back its keys in their
        order (plus fields changed since); a constructed one gives the keys a sweep writes: the
        settings, times, counts and the task's metrics, plus every optional field that is set."""
        source = getattr(self, "_source_keys", None)
        out = {}
        for key in source or ():
            if key in _FIELDS:
                out[key] = getattr(self, key)
            elif key in self.extra:
                out[key] = self.extra[key]
        for name in _FIELDS:
            if name not in out and self._emit(name, source is None):
                out[name] = getattr(self, name)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def _emit(self, name: str, constructed: bool) -> bool:
        if constructed and (name in _ALWAYS or name in TASK_METRICS[self.task]):
            return True
        if name == "task":
            implicit = DEFAULT_TASK
        elif name == "metric":
            implicit = HEADLINE_METRICS[self.task]
        else:
            implicit = _DEFAULTS[name]
        return getattr(self, name) != implicit

    # -- reading ---------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        """A field or ``extra`` value by its dict key, like ``dict.get`` on the dict form."""
        if key in _FIELDS:
            return getattr(self, key)
        return self.extra.get(key, default)

    def value(self, key: str) -> Optional[float]:
        """The finite number under ``key`` (a metric or time), else None."""
        return finite(self.get(key))

    @property
    def score(self) -> Optional[float]:
        """The headline metric's finite value, else None."""
        return self.value(self.metric)

    @property
    def properties(self):
        """The cell's :class:`~upsnet_robust.threats.ThreatProperties` (its ``threat`` record,
        else those of the kind serving its ``attack``)."""
        from ...threats import cell_properties

        return cell_properties(self)

    @property
    def is_adversarial(self) -> bool:
        """An L-inf adversary's cell (an attack or an ensemble at some eps): the cells that
        worst cases, rankings and the eps checks compare (not clean, not corruptions)."""
        props = self.properties
        return props.eps_bounded and not props.reference

    @property
    def is_clean(self) -> bool:
        """The reference cell (the clean kind's)."""
        return self.properties.reference

    @property
    def defense_name(self) -> str:
        return str(self.defense or UNDEFENDED)

    @property
    def eps_value(self) -> float:
        return float(self.eps or 0.0)

    @property
    def steps(self) -> int:
        return int(self.num_steps or 0)

    @property
    def restart_count(self) -> int:
        return int(self.restarts or 1)

    @property
    def is_adaptive(self) -> bool:
        return bool(self.adaptive)

    def label(self) -> str:
        """``attack@eps/defense``, to name the cell in messages."""
        return f"{self.attack}@{self.eps}/{self.defense}"


_FIELDS = tuple(f.name for f in dataclasses.fields(ResultCell) if f.name != "extra")
_DEFAULTS = {
    f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in dataclasses.fields(ResultCell)
}
# Keys a constructed cell always writes (those every sweep cell has), besides the task's metrics.
_ALWAYS = frozenset(
    (
        "attack",
        "objective",
        "eps",
        "num_steps",
        "step_size",
        "random_start",
        "restarts",
        "defense",
        "adaptive",
        "quantized",
        "task",
        "metric",
        "attack_s_per_image",
        "defense_s_per_image",
        "num_images",
        "num_failed",
        "failures",
    )
)


def as_cells(cells: Iterable[CellLike]) -> List[ResultCell]:
    """ResultCells of dicts or ResultCells (ResultCells are passed through, not copied)."""
    out = []
    for i, c in enumerate(cells):
        if isinstance(c, ResultCell):
            out.append(c)
        elif isinstance(c, Mapping):
            out.append(ResultCell.from_dict(c))
        else:
            raise TypeError(f"Result cell {i} must be a dict or ResultCell, got {type(c).__name__}")
    return out


class ReportKind(NamedTuple):
    """What one report is about: its cells' task, headline metric and model (None: unnamed)."""

    task: str
    metric: str
    model: Optional[str]

    @property
    def metrics(self):
        """Every metric of the task, headline first."""
        return (self.metric,) + tuple(m for m in TASK_METRICS[self.task] if m != self.metric)


def report_kind(cells: Iterable[CellLike]) -> ReportKind:
    """The one (task, metric, model) of ``cells``; raises ValueError if they mix several.

    A report compares cells by one headline metric, so it covers one model on one task; cells
    without ``model`` go with any model. Split mixed cells with :func:`split_by_model_task` and
    write one report per group. No cells: a panoptic (PQ) report.
    """
    cells = as_cells(cells)
    kinds = OrderedDict()
    for c in cells:
        kinds.setdefault((c.task, c.metric), []).append(c)
    models = list(OrderedDict.fromkeys(c.model for c in cells if c.model))
    if len(kinds) > 1 or len(models) > 1:
        found = ", ".join(f"{t}/{m}: {len(cs)} cells" for (t, m), cs in kinds.items())
        raise ValueError(
            "A robustness report covers one model and task, but the cells mix "
            f"tasks/metrics [{found}] and models {models or ['(unnamed)']}. Write one report per "
            "group of split_by_model_task(cells) (e.g. one output directory each)."
        )
    task, metric = next(iter(kinds)) if kinds else (DEFAULT_TASK, HEADLINE_METRICS[DEFAULT_TASK])
    return ReportKind(task, metric, models[0] if models else None)


def split_by_model_task(cells: Iterable[CellLike]) -> "OrderedDict":
    """Cells grouped by ``(model, task, metric)`` in order of appearance; each group is a valid
    input of :func:`write_report`. The input objects are kept (dicts stay dicts)."""
    groups = OrderedDict()
    cells = list(cells)
    for raw, c in zip(cells, as_cells(cells)):
        groups.setdefault((c.model, c.task, c.metric), []).append(raw)
    return groups


def cell_order(cells: Sequence[ResultCell]) -> List[ResultCell]:
    """Clean cells first, then attacks in order of appearance; eps ascending; defenses and
    adaptive flags in order of appearance."""
    attacks = list(OrderedDict.fromkeys(c.attack for c in cells if not c.is_clean))
    defenses = list(OrderedDict.fromkeys(c.defense_name for c in cells))

    def key(c):
        return (
            -1 if c.is_clean else attacks.index(c.attack),
            str(c.objective),
            c.is_adaptive,
            c.eps_value,
            c.steps,
            c.restart_count,
            defenses.index(c.defense_name),
        )

    return sorted(cells, key=key)


def clean_scores(cells: Iterable[CellLike]) -> Dict[str, float]:
    """Clean headline metric per defense (the first clean cell of each defense that has one)."""
    out = {}
    for c in as_cells(cells):
        if c.is_clean and c.score is not None and c.defense_name not in out:
            out[c.defense_name] = c.score
    return out


def metric_ratios(cells: Sequence[CellLike]) -> List[Optional[float]]:
    """Headline metric of each cell over the clean one of the same defense (falling back to the
    clean, undefended one when that defense has no clean cell); the analogue of the IoU ratio.

    Args:
        cells (list[dict or ResultCell]): sweep cells of one report (:func:`report_kind`).

    Returns:
        list[float or None]: one ratio per cell, in order; None where the cell has no score or
        no usable (present, non-zero) clean reference exists.
    """
    cells = as_cells(cells)
    report_kind(cells)
    clean = clean_scores(cells)
    ratios = []
    for c in cells:
        ref = clean.get(c.defense_name, clean.get(UNDEFENDED))
        ratios.append(None if c.score is None or not ref else c.score / ref)
    return ratios
