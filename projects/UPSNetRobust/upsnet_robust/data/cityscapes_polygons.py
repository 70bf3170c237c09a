# Copyright (c) UPSNetRobust authors.
"""Cityscapes ``*_gtFine_polygons.json`` annotations traced from label maps.

Real Cityscapes ships one polygons json per image (``imgHeight``, ``imgWidth`` and ``objects``,
each a ``label`` name and a ``polygon`` of integer ``[x, y]`` vertices) and derives its label PNGs
from it with cityscapesscripts' ``json2labelImg``, which fills the polygons in file order, later
ones painting over earlier ones. detectron2's ``load_cityscapes_semantic`` reads the json for the
image size and its ``load_cityscapes_instances(from_json=True)`` reads the polygons, so a
Cityscapes-format data set needs these files.

Here the polygons are traced from a finished label map: every connected component of every
segment (a stuff class or one thing instance) becomes one object whose polygon is the component's
outer boundary (through the centres of its boundary pixels, as ``cv2.findContours`` returns it).
Objects are written largest first, so a component lying in a hole of another is painted after
it. Where a boundary cuts a diagonal one-pixel notch of a neighbour, filling would still paint
the notch over; the pixels painted wrongly are traced again and appended, until filling the
polygons in file order the way ``json2labelImg`` does (``PIL.ImageDraw.polygon``) gives back the
instance map exactly, hence also the label map.

NOTE: a Cityscapes json object is one instance; a thing instance split into several visible
parts by an occluder is therefore written as several objects of its class.
"""

import json
import numpy as np
from typing import Dict, List, Tuple

import cv2
from cityscapesscripts.helpers.labels import id2label
from PIL import Image, ImageDraw

__all__ = ["trace_cityscapes_polygons", "write_cityscapes_polygons_json"]


def _outer_contours(mask: np.ndarray) -> List[np.ndarray]:
    # RETR_CCOMP puts the outer boundary of every component at the top level (parent -1), also
    # components lying inside a hole of another; RETR_EXTERNAL would drop those.
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    return [c.reshape(-1, 2) for c, h in zip(contours, hierarchy[0]) if h[3] == -1]


def _trace(segments: np.ndarray, mask: np.ndarray) -> List[Tuple[int, List[List[int]]]]:
    """``(segment index, polygon)`` of the components of ``segments`` within ``mask``, ordered
    by decreasing polygon area (ties: segment index, then tracing order)."""
    traced = []
    for index in np.unique(segments[mask]).tolist():
        for contour in _outer_contours(mask & (segments == index)):
            points = contour.tolist()
            points += [points[-1]] * (3 - len(points))
            area = abs(cv2.contourArea(contour.astype(np.float32))) if len(contour) > 2 else 0.0
            traced.append((-area, index, len(traced), points))
    traced.sort(key=lambda t: t[:3])
    return [(index, points) for _, index, _, points in traced]


def _fill_in_order(objects, shape) -> np.ndarray:
    # What cityscapesscripts' json2labelImg does, with segment indices as the fill values.
    canvas = Image.new("I", (shape[1], shape[0]), -1)
    draw = ImageDraw.Draw(canvas)
    for index, points in objects:
        draw.polygon([tuple(p) for p in points], fill=index)
    return np.asarray(canvas)


def trace_cityscapes_polygons(instance_ids: np.ndarray, max_rounds: int = 10) -> List[Dict]:
    """Trace the Cityscapes polygon objects of one image.

    Args:
        instance_ids (ndarray): (H, W) integer Cityscapes instance ids: ``label_id * 1000 + k``
            on thing instances, the label id elsewhere.
        max_rounds (int): repair rounds allowed (see the module docstring; one or two suffice).

    Returns:
        list[dict]: ``{"label": Cityscapes label name, "polygon": [[x, y], ...]}`` objects, at
        least 3 vertices each (a one- or two-pixel component repeats its last vertex). Filled in
        order with ``PIL.ImageDraw.polygon``, they reproduce ``instance_ids`` exactly.
    """
    if instance_ids.ndim != 2:
        raise ValueError(f"instance_ids must be a (H, W) map, got shape {instance_ids.shape}")
    segment_ids, segments = np.unique(instance_ids, return_inverse=True)
    segments = segments.reshape(instance_ids.shape).astype(np.int32)
    label_names = []
    for segment_id in segment_ids.tolist():
        label_id = segment_id // 1000 if segment_id >= 1000 else segment_id
        if label_id not in id2label:
            raise ValueError(f"Instance id {segment_id} has no Cityscapes label {label_id}")
        label_names.append(id2label[label_id].name)

    objects = _trace(segments, np.ones(segments.shape, bool))
    for _ in range(max_rounds):
        wrong = _fill_in_order(objects, segments.shape) != segments
        if not wrong.any():
            return [{"label": label_names[i], "polygon": points} for i, points in objects]
        objects += _trace(segments, wrong)
    raise RuntimeError(f"Polygons still differ from the label map after {max_rounds} rounds")


def write_cityscapes_polygons_json(path: str, instance_ids: np.ndarray) -> None:
    """Write the ``*_gtFine_polygons.json`` of one image (see :func:`trace_cityscapes_polygons`).

    The output is byte-identical for identical maps (fixed key order and formatting).
    """
    height, width = instance_ids.shape
    content = {
        "imgHeight": int(height),
        "imgWidth": int(width),
        "objects": trace_cityscapes_polygons(instance_ids),
    }
    with open(path, "w") as f:
        json.dump(content, f, separators=(",", ":"))
        f.write("\n")
