# Copyright (c) UPSNetRobust authors.
"""The parameter-free panoptic head's rules on hand-made logits, against plain recomputations."""
import numpy as np
import torch
import torch.nn.functional as F

from upsnet_robust.modeling.panoptic_head import (
    integer_boxes,
    panoptic_logits,
    panoptic_loss,
    panoptic_segments,
    panoptic_targets,
    paste_in_boxes,
    remove_overlapping_masks,
    select_panoptic_candidates,
)

NUM_STUFF = 3  # channels 0-2 stuff, 3-4 things (detector classes 0, 1)


def test_integer_boxes_cover_and_clip():
    boxes = torch.tensor([[1.2, 2.7, 5.1, 6.0], [-3.0, 0.0, 100.0, 0.2], [4.0, 4.0, 4.0, 4.0]])
    out = integer_boxes(boxes, height=8, width=10).tolist()
    assert out[0] == [1, 2, 6, 6]
    assert out[1] == [0, 0, 10, 1]  # clipped, at least one pixel high
    assert out[2] == [4, 4, 5, 5]  # degenerate box still covers one pixel


def test_panoptic_logits_match_explicit_definition():
    g = torch.Generator().manual_seed(0)
    sem = torch.randn(5, 12, 16, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[2, 1, 9, 7], [6, 4, 15, 11]])
    classes = torch.tensor([1, 0])
    masks = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    pasted = paste_in_boxes(masks, boxes, 12, 16, resize=True)
    out = panoptic_logits(sem, boxes, classes, pasted, NUM_STUFF).numpy()
    assert out.shape == (NUM_STUFF + 2 + 1, 12, 16)

    s, p = sem.numpy(), pasted.numpy()
    y = np.zeros((2, 12, 16))
    for i, ((x0, y0, x1, y1), c) in enumerate(zip(boxes.tolist(), classes.tolist())):
        y[i, y0:y1, x0:x1] = s[NUM_STUFF + c, y0:y1, x0:x1]
        # the pasted mask is the bilinear resize of the mask into the box, zero outside
        ref = F.interpolate(masks[i][None, None], size=(y1 - y0, x1 - x0), mode="bilinear")
        assert np.allclose(p[i, y0:y1, x0:x1], ref[0, 0].numpy())
        outside = np.ones((12, 16), bool)
        outside[y0:y1, x0:x1] = False
        assert np.all(p[i][outside] == 0) and np.all(out[NUM_STUFF + i][outside] == 0)
    np.testing.assert_allclose(out[:NUM_STUFF], s[:NUM_STUFF])
    np.testing.assert_allclose(out[NUM_STUFF : NUM_STUFF + 2], y + p)
    unknown = s[NUM_STUFF:].max(axis=0) - y.max(axis=0)  # y is 0 outside boxes
    np.testing.assert_allclose(out[-1], unknown)


def test_panoptic_logits_without_instances():
    sem = torch.randn(5, 4, 4)
    out = panoptic_logits(sem, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, 4, 4), NUM_STUFF)
    assert out.shape == (NUM_STUFF + 1, 4, 4)
    torch.testing.assert_close(out[-1], sem[NUM_STUFF:].max(0).values)


def test_panoptic_targets_assign_kept_dropped_and_ignore():
    sem = torch.tensor([[0, 1, 3, 3], [2, 4, 4, 255], [3, 3, 3, 0]])
    masks = torch.zeros(3, 3, 4, dtype=torch.bool)
    masks[0, 0, 2:4] = True  # class-3 instance
    masks[1, 1, 1:3] = True  # class-4 instance
    masks[2, 2, 0:3] = True  # class-3 instance
    keep = torch.tensor([True, False, True])
    t = panoptic_targets(sem, masks, keep, NUM_STUFF, 255)
    unknown = NUM_STUFF + 2
    expected = torch.tensor(
        [[0, 1, NUM_STUFF, NUM_STUFF], [2, unknown, unknown, 255], [NUM_STUFF + 1] * 3 + [0]]
    )
    assert torch.equal(t, expected)


def test_panoptic_loss_counts_ignored_pixels_in_denominator():
    logits = torch.randn(4, 3, 5, dtype=torch.float64)
    target = torch.tensor([[0, 1, 2, 3, 255], [255, 255, 0, 1, 2], [3, 3, 3, 0, 0]])
    log_p = torch.log_softmax(logits, 0)
    manual = 0.0
    for r in range(3):
        for c in range(5):
            if target[r, c] != 255:
                manual -= float(log_p[target[r, c], r, c])
    assert abs(float(panoptic_loss(logits, target)) - manual / 15) < 1e-10


def test_candidates_threshold_class_agnostic_nms_and_order():
    # 3 proposals x 2 classes; boxes per class; probabilities with background last.
    boxes = torch.tensor(
        [
            [0, 0, 10, 10, 0, 0, 10, 10],
            [1, 1, 11, 11, 1, 1, 11, 11],  # overlaps proposal 0 strongly
            [20, 20, 30, 30, 20, 20, 40, 40],
        ],
        dtype=torch.float,
    )
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.65, 0.61, 0.0]])
    b, s, c = select_panoptic_candidates(boxes, scores, (50, 50), 0.6, 0.5, 100)
    # pairs above 0.6: (0,cls0) .7, (1,cls1) .8, (2,cls0) .65, (2,cls1) .61.
    # Class-agnostic NMS removes (0,cls0) under (1,cls1); (2,cls1) box [20,20,40,40] has
    # IoU 0.25 with (2,cls0) box and survives.
    assert s.tolist() == sorted(s.tolist(), reverse=True)
    assert torch.allclose(s, torch.tensor([0.8, 0.65, 0.61]))
    assert c.tolist() == [1, 0, 1]
    assert select_panoptic_candidates(boxes, scores, (50, 50), 0.6, 0.5, 2)[0].shape[0] == 2
    assert select_panoptic_candidates(boxes, scores, (50, 50), 0.9, 0.5, 100)[0].shape[0] == 0


def test_mask_removal_by_same_class_overlap():
    logits = -torch.ones(4, 10, 10)
    logits[0, 0:5, 0:5] = 1  # kept
    logits[1, 0:5, 2:7] = 1  # 60% covered by mask 0, same class: dropped
    logits[2, 0:5, 0:5] = 1  # fully covered but another class: kept
    # mask 3 stays empty: dropped
    keep = remove_overlapping_masks(logits, torch.tensor([0, 0, 1, 0]), overlap_thresh=0.3)
    assert keep == [0, 2]
    logits[1, 0:5, 2:7] = -1
    logits[1, 0:5, 4:9] = 1  # 20% covered: kept
    assert remove_overlapping_masks(logits, torch.tensor([0, 0, 1, 0]), 0.3) == [0, 1, 2]


def test_panoptic_segments_relabel_area_limit_and_void():
    # channels: 0..2 stuff, 3, 4 instances, 5 unknown
    pan = torch.zeros(10, 10, dtype=torch.long)
    pan[0:2, :] = 1  # stuff 1, 20 px
    pan[2:3, 0:3] = 2  # stuff 2, 3 px: below the area limit -> void
    pan[4:8, 0:4] = 3  # instance 0 (class 1 -> sem channel 4), semantic says stuff 0 there
    pan[4:8, 5:9] = 4  # instance 1 (class 0 -> sem channel 3), semantic agrees
    pan[9, :] = 5  # unknown -> void
    sem = torch.zeros(10, 10, dtype=torch.long)
    sem[4:8, 5:9] = 3
    ids, segs = panoptic_segments(
        pan, sem, torch.tensor([1, 0]), torch.tensor([0.9, 0.8]), NUM_STUFF,
        stuff_area_limit=5, relabel_fraction=0.5,
    )
    by_cat = {(s["category_id"], s["isthing"]): s for s in segs}
    # instance 0 became stuff 0 and merged with the stuff-0 area
    stuff0 = by_cat[(0, False)]
    assert stuff0["area"] == int((ids == stuff0["id"]).sum()) == 100 - 20 - 3 - 16 - 10 + 0
    assert (1, False) in by_cat and (2, False) not in by_cat
    thing = by_cat[(NUM_STUFF + 0, True)]
    assert thing["area"] == 16 and abs(thing["score"] - 0.8) < 1e-6
    assert bool((ids[9] == 0).all()) and bool((ids[2, 0:3] == 0).all())
    assert ids.dtype == torch.int32 and len({s["id"] for s in segs}) == len(segs)


def test_instance_kept_when_semantic_majority_is_weak_stuff():
    pan = torch.full((4, 4), 3)
    sem = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [4, 4, 4, 0], [1, 2, 2, 0]])  # stuff 0: 5/16
    ids, segs = panoptic_segments(pan, sem, torch.tensor([1]), torch.tensor([0.7]), NUM_STUFF, 0, 0.5)
    assert [(s["category_id"], s["isthing"]) for s in segs] == [(NUM_STUFF + 1, True)]


def test_instance_relabelled_when_stuff_holds_exactly_the_fraction():
    """UPSNet's rule is "at least relabel_fraction": 8 of 16 pixels of stuff 0 at 0.5 relabel."""
    pan = torch.full((4, 4), 3)
    sem = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]])
    classes, scores = torch.tensor([1]), torch.tensor([0.7])
    ids, segs = panoptic_segments(pan, sem, classes, scores, NUM_STUFF, 0, 0.5)
    assert [(s["category_id"], s["isthing"], s["area"]) for s in segs] == [(0, False, 16)]
    assert bool((ids == segs[0]["id"]).all())
