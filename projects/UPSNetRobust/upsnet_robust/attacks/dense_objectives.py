# Copyright (c) UPSNetRobust authors.
"""Per-pixel losses for attacking dense predictions, as objectives.

Plain cross-entropy is a weak attack loss for segmentation: pixels that are already wrong keep
raising it without bound, so the step direction is dominated by them while the pixels that are
still right, the ones that count for accuracy, IoU or PQ, get little of it. The losses here
(from Croce, Singh & Hein's segmentation ensemble attack, SEA, ECCV 2024) avoid that by masking
out wrong pixels or by being bounded per pixel. Each is an untargeted objective against the
ground-truth semantic map (``sem_seg``, mapped to the model's classes by its adapter, like
``semantic_ce``) that any attack can maximise; SegPGD and CosPGD still read the raw logits and
targets through ``logits_and_targets``.

Per image, with V the pixels whose target is not the ignore label, y_p the target, z_p the
logits and p_p = softmax(z_p) at pixel p, and C_set = {p in V : argmax_c z_p = y_p} the pixels
still classified correctly (recomputed at every call and held constant for the gradient;
ties go to the lowest class index, as ``argmax`` does). Every loss is 0, with a zero gradient,
when V is empty.
"""

import math

import torch
import torch.nn.functional as F

from .objectives import SemanticCEObjective, register_objective

__all__ = [
    "BalancedMaskedCEObjective",
    "JSDivergenceObjective",
    "MaskedCEObjective",
    "MaskedSphericalObjective",
    "balanced_masked_ce",
    "js_divergence",
    "masked_ce",
    "masked_spherical",
]

_LOG2 = math.log(2.0)


def _prepare(logits: torch.Tensor, target: torch.Tensor, ignore_value: int):
    """Check shapes; return (valid (h,w) bool, labels (h,w) long with ignored set to 0,
    correct (h,w) float, the number of valid pixels (>= 1) as a tensor)."""
    if logits.dim() != 3 or target.dim() != 2 or tuple(logits.shape[1:]) != tuple(target.shape):
        raise ValueError(
            f"Expected logits (C, h, w) and targets (h, w) of the same size, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    valid = target != ignore_value
    labels = target.long().masked_fill(~valid, 0)
    num_classes = logits.shape[0]
    if valid.any() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}) or be {ignore_value} (ignore), got values "
            f"in [{int(target[valid].min())}, {int(target[valid].max())}]"
        )
    correct = ((logits.detach().argmax(dim=0) == labels) & valid).to(logits.dtype)
    count = valid.sum().clamp_min(1).to(logits.dtype)
    return valid, labels, correct, count


def _pixel_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[None], labels[None], reduction="none")[0]


def masked_ce(logits: torch.Tensor, target: torch.Tensor, ignore_value: int = 255) -> torch.Tensor:
    """Masked cross-entropy: L = 1/|V| sum_{p in C_set} -log p_p[y_p].

    Only pixels that are still right pull on the perturbation; a pixel drops out once it is
    fooled, so the attack moves on to the others. 0 when no pixel is correct (nothing left to
    attack). Normalised by |V|, not |C_set|, so that fooling a pixel never raises the loss by
    shrinking the denominator.

    Args:
        logits (Tensor): (C, h, w) class logits of one image.
        target (Tensor): (h, w) labels in [0, C) or ``ignore_value``.

    Returns:
        Tensor: 0-d, differentiable w.r.t. ``logits``.
    """
    _, labels, correct, count = _prepare(logits, target, ignore_value)
    return (_pixel_ce(logits, labels) * correct).sum() / count


def balanced_masked_ce(
    logits: torch.Tensor, target: torch.Tensor, ignore_value: int = 255
) -> torch.Tensor:
    """Class-balanced masked cross-entropy:
    L = 1/K sum_k 1/n_k sum_{p in C_set, y_p = k} -log p_p[y_p],
    with n_k the number of pixels of class k in the target (V only) and K the number of classes
    present (n_k > 0): the mean over the image's classes of each class's masked CE, i.e. weights
    inversely proportional to the class's pixel count. Small classes (thin, distant objects)
    get as much weight as large ones, which plain or masked CE would let the large regions
    drown. With equally large classes it equals :func:`masked_ce`.
    """
    valid, labels, correct, _ = _prepare(logits, target, ignore_value)
    counts = torch.bincount(labels[valid], minlength=logits.shape[0]).to(logits.dtype)
    present = counts > 0
    weight = torch.where(present, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    num_present = present.sum().clamp_min(1).to(logits.dtype)
    return (_pixel_ce(logits, labels) * correct * weight[labels]).sum() / num_present


def js_divergence(
    logits: torch.Tensor, target: torch.Tensor, ignore_value: int = 255
) -> torch.Tensor:
    """Jensen-Shannon divergence between the prediction and the one-hot target, mean over V:
    L = 1/|V| sum_{p in V} JS(p_p, e_{y_p}), JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2 with
    M = (P + Q) / 2 and natural logarithms.

    For a one-hot Q it depends only on q = p_p[y_p]:
    JS = log 2 + (q log q - (1 + q) log(1 + q)) / 2, from 0 (q = 1) to log 2 (q = 0), which is
    how it is computed (log q from ``log_softmax``, so it stays finite when q underflows). A
    bounded per-pixel loss: a fooled pixel can add at most log 2, so the attack cannot gain by
    pushing pixels that are already wrong further away; no mask is needed.
    """
    valid, labels, _, count = _prepare(logits, target, ignore_value)
    log_q = F.log_softmax(logits, dim=0).gather(0, labels[None])[0]
    q = log_q.exp()
    js = _LOG2 + 0.5 * (q * log_q - (1 + q) * torch.log1p(q))
    return (js * valid.to(js.dtype)).sum() / count


def masked_spherical(
    logits: torch.Tensor, target: torch.Tensor, ignore_value: int = 255
) -> torch.Tensor:
    """Masked spherical loss on normalised logits:
    L = 1/|V| sum_{p in C_set} -z_p[y_p] / ||z_p||_2.

    The variant of the spherical score used by SEA's first version: the true-class logit of
    the L2-normalised logit vector (not of the probabilities, whose spherical score
    p[y] / ||p||_2 saturates once the softmax is confident), so the loss is invariant to the
    logits' scale and keeps a useful gradient on confident pixels. Only still-correct pixels
    count, as in :func:`masked_ce`; 0 when none is. (A vector of zero logits counts as norm 1.)
    """
    _, labels, correct, count = _prepare(logits, target, ignore_value)
    norm = logits.norm(dim=0).clamp_min(torch.finfo(logits.dtype).tiny)
    true_logit = logits.gather(0, labels[None])[0]
    return (-(true_logit / norm) * correct).sum() / count


class _GroundTruthLoss(SemanticCEObjective):
    """A per-pixel loss against the ground-truth semantic map (targets as in ``semantic_ce``).

    With ``tracks_cross_entropy`` the objective's gradient is the loss's but its VALUE is the
    plain cross-entropy of ``semantic_ce`` (value = CE + (L - L), the second term exactly 0 but
    carrying L's gradient). Attacks rank points by the value (APGD's step control and best
    point, PGD's restarts), and a masked loss is a poor ranking: it drops as soon as a pixel is
    fooled, so the best point "by masked CE" is the one just before pixels flip. SEA likewise
    steers APGD by plain CE while following the masked loss's gradient.
    """

    loss = staticmethod(masked_ce)
    tracks_cross_entropy = True

    def pixel_loss(self, logits, i):
        value = type(self).loss(logits, self.targets(i), self.ignore_value)
        if not self.tracks_cross_entropy:
            return value
        return super().pixel_loss(logits, i).detach() + (value - value.detach())


@register_objective("masked_ce")
class MaskedCEObjective(_GroundTruthLoss):
    """Gradient of :func:`masked_ce`; value: the plain cross-entropy (see above)."""

    description = "cross-entropy on the pixels still classified correctly (SEA)"

    loss = staticmethod(masked_ce)


@register_objective("balanced_masked_ce")
class BalancedMaskedCEObjective(_GroundTruthLoss):
    """Gradient of :func:`balanced_masked_ce`; value: the plain cross-entropy (see above)."""

    description = "class-balanced masked cross-entropy (SEA)"

    loss = staticmethod(balanced_masked_ce)


@register_objective("js_divergence")
class JSDivergenceObjective(_GroundTruthLoss):
    """:func:`js_divergence` (value and gradient: it rises as pixels are fooled, so it ranks
    points well itself)."""

    description = "Jensen-Shannon divergence of softmax and one-hot target (SEA)"

    loss = staticmethod(js_divergence)
    tracks_cross_entropy = False


@register_objective("masked_spherical")
class MaskedSphericalObjective(_GroundTruthLoss):
    """Gradient of :func:`masked_spherical`; value: the plain cross-entropy (see above)."""

    description = "masked spherical loss on the normalised true-class logit (SEA)"

    loss = staticmethod(masked_spherical)
