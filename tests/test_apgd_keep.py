# Copyright (c) UPSNetRobust authors.
"""APGD's keep-accuracy rule (SEA's): per image, the iterate with the fewest labelled pixels
still correct, ties to the higher objective value. The reference picks from a log of every point
the objective saw, so the returned point is checked against the rule, not against APGD's code."""
import pytest
import torch

from upsnet_robust.attacks import APGD


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _CoarseAccuracy:
    """Value: minus the squared distance of the pixels' channel means to ``target``, a point
    inside the eps-ball the steps overshoot and then circle (values differ from step to step).
    A pixel counts as correct while its mean is below 100, so many iterates share a count: the
    tie-break decides. Logs (point, value, correct) per image at each call."""

    supports_early_stop = True
    name = "coarse_accuracy"

    def __init__(self, target):
        self.target = target
        self.correct_pixels = None
        self.log = []

    def __call__(self, x):
        m = x.mean(1)
        self.correct_pixels = (m.detach() < 100.0).flatten(1).sum(1)
        value = -((m - self.target) ** 2).flatten(1).sum(1)
        self.log.append((x.detach().clone(), value.detach().clone(), self.correct_pixels.clone()))
        return value


def _rule(log, n):
    """Per image, the logged point with the fewest correct pixels, ties to the higher value
    (the first one seen among exact ties)."""
    out = []
    for i in range(n):
        best = None
        for point, value, correct in log:
            c, v = int(correct[i]), float(value[i])
            if best is None or c < best[0] or (c == best[0] and v > best[1]):
                best = (c, v, point[i])
        out.append(best)
    return out


def test_keep_accuracy_breaks_ties_to_the_higher_value():
    x = torch.full((2, 3, 3, 4), 90.0)  # image 0: no pixel can flip at eps 8 (all tie at 12)
    x[1, :, 0, :] = 99.0  # image 1: its first row flips at once, the others never
    objective = _CoarseAccuracy(x.mean(1) + 5.0)
    adv = APGD(8.0, num_steps=6, keep="accuracy").perturb(x, objective)
    expected = _rule(objective.log, 2)
    for i, (correct, value, point) in enumerate(expected):
        torch.testing.assert_close(adv[i], point, rtol=0, atol=0)
        first = next(v for _, v, c in objective.log if int(c[i]) == correct)
        assert value > float(first[i])  # not the first point with that count: the tie-break chose
    assert [e[0] for e in expected] == [12, 8]
