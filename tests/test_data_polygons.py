# Copyright (c) UPSNetRobust authors.
"""Tests of the Cityscapes polygons json (upsnet_robust.data.cityscapes_polygons) and of the
generated ``*_gtFine_polygons.json`` files, checked with cityscapesscripts' own rasteriser
(json2labelImg), the tool that makes Cityscapes' label PNGs from these files."""

import glob
import json
import numpy as np
import os

import cv2
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import createLabelImage

from upsnet_robust.data.cityscapes_polygons import trace_cityscapes_polygons


def _rasterize(content, encoding="ids"):
    annotation = Annotation()
    annotation.fromJsonText(json.dumps(content))
    return np.asarray(createLabelImage(annotation, encoding))


def _instance_map(objects, shape):
    """Fill the objects in order like json2instanceImg, but keeping each polygon's own segment id
    (given as ``obj["segment"]``) so that instance maps can be compared."""
    out = np.full(shape, -1, np.int64)
    for obj in objects:
        canvas = np.zeros(shape, np.uint8)
        # PIL fills the polygon including its outline, like cv2.fillPoly on integer vertices.
        cv2.fillPoly(canvas, [np.asarray(obj["polygon"], np.int32)], 1)
        out[canvas > 0] = obj["segment"]
    return out


def test_generated_polygons_reproduce_label_maps(synthetic_cityscapes_root):
    files = sorted(
        glob.glob(os.path.join(synthetic_cityscapes_root, "gtFine", "*", "*", "*_polygons.json"))
    )
    assert len(files) == 6
    for path in files:
        with open(path) as f:
            content = json.load(f)
        prefix = path[: -len("polygons.json")]
        label_ids = cv2.imread(prefix + "labelIds.png", cv2.IMREAD_UNCHANGED)
        train_ids = cv2.imread(prefix + "labelTrainIds.png", cv2.IMREAD_UNCHANGED)
        assert (content["imgHeight"], content["imgWidth"]) == label_ids.shape == (64, 128)
        assert all(set(obj) == {"label", "polygon"} for obj in content["objects"])
        assert {obj["label"] for obj in content["objects"]} <= set(name2label)
        for obj in content["objects"]:
            points = np.asarray(obj["polygon"])
            assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
            assert points.dtype.kind == "i"
            # Traced through pixel centres of the object's own class.
            ids = label_ids[points[:, 1], points[:, 0]]
            assert (ids == name2label[obj["label"]].id).all(), obj["label"]
        assert np.array_equal(_rasterize(content, "ids"), label_ids)
        assert np.array_equal(_rasterize(content, "trainIds"), train_ids)


def _crafted_map():
    """Road with a sidewalk ring holding a car that holds a road island; a person cut in two by a
    pole; a one-pixel bicycle; and a diagonal one-pixel road notch in a car."""
    ids = np.full((24, 40), 7, np.int64)
    ids[2:14, 2:14] = 8  # sidewalk ring ...
    ids[4:12, 4:12] = 26000  # ... around a car ...
    ids[7:9, 7:9] = 7  # ... around a road island (nested components)
    ids[2:10, 20:24] = 24000
    ids[2:10, 21] = 17  # a pole cuts the person in two
    ids[20, 2] = 33000  # a one-pixel bicycle
    ids[15:22, 28:36] = 26001
    ids[18, 30] = 7  # road pixel only diagonally connected to the road outside
    ids[19, 29] = 7
    ids[20, 28] = 7
    ids[21, 27] = 7
    return ids


def test_trace_crafted_map():
    ids = _crafted_map()
    objects = trace_cityscapes_polygons(ids)
    content = {"imgHeight": 24, "imgWidth": 40, "objects": objects}
    label_ids = np.where(ids >= 1000, ids // 1000, ids)
    assert np.array_equal(_rasterize(content), label_ids)
    labels = [obj["label"] for obj in objects]
    assert labels.count("person") == 2  # one object per visible part (Cityscapes: one instance)
    assert labels.count("bicycle") == 1 and labels.count("car") >= 2
    assert labels.count("road") >= 2  # outer road and the island, drawn after the car
    assert labels.index("road") < labels.index("sidewalk") < labels.index("car")
    bicycle = objects[labels.index("bicycle")]["polygon"]
    assert bicycle == [[2, 20]] * 3
    # The island is written after the car that surrounds it.
    island = max(i for i, obj in enumerate(objects) if [7, 7] in obj["polygon"])
    assert island > labels.index("car")


@pytest.mark.parametrize("seed", range(25))
def test_trace_random_maps_exactly(seed):
    """Noise maps (many tiny components, diagonal contacts, nesting) are reproduced exactly, also
    per instance, with an independent rasteriser (OpenCV) as well as with json2labelImg."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 24, size=2))
    values = np.array([7, 8, 11, 24000, 24001, 26000])
    ids = values[rng.integers(0, len(values), size=shape)]
    if seed % 2:  # blockier maps: upsample a coarse map
        ids = np.kron(ids, np.ones((2, 3), np.int64))
    objects = trace_cityscapes_polygons(ids)
    content = {"imgHeight": ids.shape[0], "imgWidth": ids.shape[1], "objects": objects}
    assert np.array_equal(_rasterize(content), np.where(ids >= 1000, ids // 1000, ids))
    # Recover each polygon's segment id from its vertices (all on pixels of that segment).
    for obj in objects:
        points = np.asarray(obj["polygon"])
        segment = np.unique(ids[points[:, 1], points[:, 0]])
        assert len(segment) == 1
        obj["segment"] = int(segment[0])
    assert np.array_equal(_instance_map(objects, ids.shape), ids)


def test_trace_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        trace_cityscapes_polygons(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match="no Cityscapes label 99"):
        trace_cityscapes_polygons(np.full((4, 4), 99000))
