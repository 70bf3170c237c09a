# Copyright (c) UPSNetRobust authors.
"""The panoptic objective's matching rules (``panoptic_objective_targets``) on hand-made
tensors: which channel each pixel's cross-entropy pulls towards."""
import pytest
import torch

from upsnet_robust.attacks.objectives import panoptic_objective_targets

NUM_STUFF = 2  # stuff classes 0, 1; detector class c is semantic class NUM_STUFF + c
IGNORE = 255
H, W = 4, 10


def _scene(gt_columns, gt_class=0):
    """Stuff class 0 everywhere except one GT instance on the given columns (all rows)."""
    sem = torch.zeros(H, W, dtype=torch.long)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, :, gt_columns] = True
    sem[mask[0]] = NUM_STUFF + gt_class
    return sem, mask, torch.tensor([gt_class])


def _pred(*regions):
    """Argmax map with instance j (channel NUM_STUFF + j) on ``regions[j]`` (flat pixel
    indices), stuff channel 0 elsewhere."""
    pred = torch.zeros(H * W, dtype=torch.long)
    for j, pixels in enumerate(regions):
        pred[list(pixels)] = NUM_STUFF + j
    return pred.reshape(H, W)


def _targets(pred, pred_classes, sem, masks, classes):
    out = panoptic_objective_targets(
        pred, torch.tensor(pred_classes, dtype=torch.long), sem, masks, classes, NUM_STUFF, IGNORE
    )
    assert out.shape == (H, W) and out.dtype == torch.long
    return out


def _gt_pixels(columns):
    """Flat indices of the pixels of ``columns`` (all rows), row-major like ``_pred``."""
    return [r * W + c for r in range(H) for c in range(W)[columns]]


def test_stuff_pixels_keep_their_class_and_unclaimed_things_are_ignored():
    sem = torch.zeros(H, W, dtype=torch.long)
    sem[:, 5:] = 1
    sem[0, 0] = IGNORE
    sem[3, 9] = NUM_STUFF + 4  # a thing label outside every GT mask (e.g. a crowd region)
    pred = _pred(range(0, 40))  # an instance everywhere: stuff targets do not care
    out = _targets(pred, [4], sem, torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    expected = sem.clone()
    expected[3, 9] = IGNORE
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "inside,outside,matched",
    [
        (20, 0, True),  # IoU 1
        (11, 0, True),  # 11 / 20 = 0.55
        (11, 1, True),  # 11 / 21 = 0.524: just above
        (10, 0, False),  # 10 / 20 = 0.5: not above 0.5
        (10, 1, False),  # 10 / 21 = 0.476: just below
        (20, 20, False),  # 20 / 40 = 0.5: covers the instance, but twice too large
    ],
)
def test_iou_threshold_is_strictly_above_one_half(inside, outside, matched):
    sem, masks, classes = _scene(slice(0, 5))  # GT: 20 pixels
    gt = _gt_pixels(slice(0, 5))
    region = gt[:inside] + _gt_pixels(slice(5, 10))[:outside]
    out = _targets(_pred(region), [0], sem, masks, classes)
    unknown = NUM_STUFF + 1
    want = NUM_STUFF + 0 if matched else unknown
    # every pixel of the GT instance (also those the prediction missed) targets the same channel
    assert torch.equal(out[masks[0]], torch.full((20,), want))
    assert torch.equal(out[~masks[0]], torch.zeros(20, dtype=torch.long))  # stuff class 0


def test_class_mismatch_is_not_matched():
    sem, masks, classes = _scene(slice(0, 5), gt_class=0)
    pred = _pred(_gt_pixels(slice(0, 5)))  # perfect overlap...
    out = _targets(pred, [1], sem, masks, classes)  # ...but detector class 1, GT class 0
    assert torch.equal(out[masks[0]], torch.full((20,), NUM_STUFF + 1))  # unknown (K = 1)
    out = _targets(pred, [0], sem, masks, classes)
    assert torch.equal(out[masks[0]], torch.full((20,), NUM_STUFF + 0))


def test_the_qualifying_candidate_wins_in_any_order():
    sem, masks, classes = _scene(slice(0, 5))
    gt = _gt_pixels(slice(0, 5))
    weak, good = gt[:4], gt[4:16]  # IoU 4 / 20 = 0.2 and 12 / 20 = 0.6, same class
    out = _targets(_pred(weak, good), [0, 0], sem, masks, classes)
    assert torch.equal(out[masks[0]], torch.full((20,), NUM_STUFF + 1))  # instance 1
    out = _targets(_pred(good, weak), [0, 0], sem, masks, classes)
    assert torch.equal(out[masks[0]], torch.full((20,), NUM_STUFF + 0))  # instance 0
    # the larger overlap has the wrong class and the right class is below 0.5: unknown
    out = _targets(_pred(weak, good), [0, 3], sem, masks, classes)
    assert torch.equal(out[masks[0]], torch.full((20,), NUM_STUFF + 2))  # unknown (K = 2)


def test_ignore_pixels_stay_ignored_inside_instances():
    sem, masks, classes = _scene(slice(0, 5))
    sem[1, 2] = IGNORE
    sem[2, 7] = IGNORE  # and in stuff
    out = _targets(_pred(_gt_pixels(slice(0, 5))), [0], sem, masks, classes)
    assert out[1, 2] == IGNORE and out[2, 7] == IGNORE
    matched = masks[0].clone()
    matched[1, 2] = False
    assert torch.equal(out[matched], torch.full((19,), NUM_STUFF + 0))


def test_two_instances_and_overlapping_masks():
    sem = torch.zeros(H, W, dtype=torch.long)
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, :, 0:5] = True  # class 0, predicted by instance 1
    masks[1, :, 4:8] = True  # class 2, overlaps column 4; predicted by nobody of its class
    classes = torch.tensor([0, 2])
    sem[masks[0]] = NUM_STUFF + 0
    sem[masks[1]] = NUM_STUFF + 2
    pred = _pred(_gt_pixels(slice(4, 8)), _gt_pixels(slice(0, 5)))
    out = _targets(pred, [1, 0], sem, masks, classes)  # instance 0 has class 1: no match
    unknown = NUM_STUFF + 2
    assert torch.equal(out[:, 0:4], torch.full((H, 4), NUM_STUFF + 1))
    assert torch.equal(out[:, 4:8], torch.full((H, 4), unknown))  # the later instance wins
    assert torch.equal(out[:, 8:], torch.zeros(H, 2, dtype=torch.long))
