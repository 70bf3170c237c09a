# Copyright (c) UPSNetRobust authors.
"""Street-like synthetic scenes with Cityscapes labels (the images of the synthetic data set,
:mod:`.synthetic_cityscapes`).

Every image is a street-like scene: sky at the top, a band of buildings and trees, a sidewalk
(with grass patches) and a road, and a thin ego-vehicle strip (void) at the bottom. Persons, cars
and bicycles stand on the ground and occlude each other, nearer ones in front. Each class has its
own base colour and texture, and each thing class its own shape, so that a tiny network trained
from scratch for a few minutes learns the task:

=========== ======== ======= ==============================================================
class       label id trainId appearance
=========== ======== ======= ==============================================================
road        7        0       dark grey, fine grain
sidewalk    8        1       light grey tiles (grid lines)
building    11       2       brown facades with a regular grid of dark windows
vegetation  21       8       green, blotchy (tree crowns, hedges)
terrain     22       9       khaki, diagonal stripes (grass patches in the sidewalk band)
sky         23       10      blue vertical gradient, smooth
person      24       11      purple tall ellipse with vertical stripes, skin-coloured head
car         26       13      red wide rounded box with horizontal stripes, windows, dark wheels
bicycle     33       18      yellow frame and orange rings (no fill), checker texture
ego vehicle 1        255     near-black strip at the bottom (void, like Cityscapes)
=========== ======== ======= ==============================================================

Cars and persons carry a dark outline and every instance a slight colour jitter, so that
touching instances of one class stay separable. A scene is a function of its generator's state
only: the drawing steps consume it in a fixed order.
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import cv2
from cityscapesscripts.helpers.labels import labels as _CS_LABELS
from cityscapesscripts.helpers.labels import name2label

__all__ = [
    "SYNTHETIC_STUFF_CLASSES",
    "SYNTHETIC_THING_CLASSES",
    "label_ids_to_train_ids",
    "render_synthetic_scene",
]

# Cityscapes class names (cityscapesscripts.helpers.labels) drawn by the generator.
SYNTHETIC_STUFF_CLASSES = ("road", "sidewalk", "building", "vegetation", "terrain", "sky")
SYNTHETIC_THING_CLASSES = ("person", "car", "bicycle")
_VOID_CLASS = "ego vehicle"

# Sizes below are in pixels of the reference 128x256 image and scale with the image.
_REF_HEIGHT, _REF_WIDTH = 128, 256
_MIN_VISIBLE_AREA = 40  # instances occluded down to fewer visible pixels are dropped
_GLOBAL_NOISE_STD = 3.0

# RGB base colours.
_COLORS = {
    "sky_top": (90, 145, 215),
    "sky_horizon": (175, 210, 240),
    "building": (150, 100, 70),
    "window": (45, 55, 75),
    "vegetation": (55, 130, 45),
    "terrain": (170, 160, 95),
    "sidewalk": (185, 180, 190),
    "road": (75, 75, 82),
    "ego vehicle": (22, 22, 26),
    "person": (150, 45, 190),
    "skin": (235, 195, 160),
    "car": (205, 35, 40),
    "car_window": (165, 200, 225),
    "wheel": (28, 28, 30),
    "bicycle": (245, 200, 25),
    "bicycle_ring": (225, 120, 15),
}


def _label_id(name: str) -> int:
    return name2label[name].id


@functools.lru_cache(maxsize=1)
def _train_id_lut() -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for label in _CS_LABELS:
        if 0 <= label.id < 256 and 0 <= label.trainId < 255:
            lut[label.id] = label.trainId
    lut.flags.writeable = False
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes ``labelIds`` map to ``labelTrainIds`` (255 for ignored classes).

    Args:
        label_ids (ndarray): uint8 (H, W) Cityscapes label ids.

    Returns:
        ndarray: uint8 (H, W) train ids.
    """
    return _train_id_lut()[label_ids]


@functools.lru_cache(maxsize=4)
def _grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.int32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _jitter(rng: np.random.Generator, color, amount: float) -> np.ndarray:
    return np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _blob_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Unit-variance noise constant over ``cell`` x ``cell`` blocks, (H, W) float32."""
    coarse = rng.standard_normal((height // cell + 1, width // cell + 1), dtype=np.float32)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]


# ---------------------------------------------------------------------------------------------
# Thing shapes. Each returns a uint8 "part map" (0 = outside; 1, 2, 3 = parts of the object)
# whose bottom row stands on the ground.
# ---------------------------------------------------------------------------------------------
def _fill_rounded_rect(canvas, x0, y0, x1, y1, radius, value):
    radius = int(max(0, min(radius, (x1 - x0) // 2, (y1 - y0) // 2)))
    cv2.rectangle(canvas, (x0 + radius, y0), (x1 - radius, y1), value, -1)
    cv2.rectangle(canvas, (x0, y0 + radius), (x1, y1 - radius), value, -1)
    if radius > 0:
        for cx, cy in (
            (x0 + radius, y0 + radius),
            (x1 - radius, y0 + radius),
            (x0 + radius, y1 - radius),
            (x1 - radius, y1 - radius),
        ):
            cv2.circle(canvas, (cx, cy), radius, value, -1)


def _car_parts(rng: np.random.Generator, size: float) -> np.ndarray:
    """Car seen from the side: rounded body, cabin with windows, two dark wheels.
    ``size`` is the width."""
    w = max(12, int(round(size)))
    h = max(6, int(round(w * rng.uniform(0.45, 0.55))))
    canvas = np.zeros((h, w), np.uint8)
    r_wheel = max(2, int(round(0.11 * w)))
    body_top = int(round(0.38 * h))
    body_bottom = h - 1 - max(1, int(round(0.5 * r_wheel)))
    _fill_rounded_rect(canvas, 0, body_top, w - 1, body_bottom, int(0.15 * h), 1)
    cab_x0, cab_x1 = int(round(0.18 * w)), int(round(0.74 * w))
    _fill_rounded_rect(canvas, cab_x0, 0, cab_x1, body_top + 1, int(0.15 * h), 1)
    inset = max(1, int(round(0.05 * w)))
    if cab_x1 - cab_x0 > 2 * inset + 2 and body_top > inset + 1:
        mid = (cab_x0 + cab_x1) // 2
        cv2.rectangle(canvas, (cab_x0 + inset, inset), (mid - 1, body_top - 1), 2, -1)
        cv2.rectangle(canvas, (mid + 1, inset), (cab_x1 - inset, body_top - 1), 2, -1)
    wheel_y = h - 1 - r_wheel
    for wheel_x in (int(round(0.22 * w)), int(round(0.78 * w))):
        cv2.circle(canvas, (wheel_x, wheel_y), r_wheel, 3, -1)
    if rng.random() < 0.5:
        canvas = np.ascontiguousarray(canvas[:, ::-1])
    return canvas


def _person_parts(rng: np.random.Generator, size: float) -> np.ndarray:
    """Standing person: tall elliptic body and a round head. ``size`` is the height."""
    h = max(12, int(round(size)))
    w = max(5, int(round(h * rng.uniform(0.32, 0.40))))
    canvas = np.zeros((h, w), np.uint8)
    r_head = max(2, int(round(0.11 * h)))
    body_top = 2 * r_head - 1
    cy = (body_top + h - 1) / 2.0
    cv2.ellipse(
        canvas,
        (int(round((w - 1) / 2.0)), int(round(cy))),
        (max(2, (w - 1) // 2), max(3, int((h - 1 - body_top) / 2.0))),
        0,
        0,
        360,
        1,
        -1,
    )
    cv2.circle(canvas, (int(round((w - 1) / 2.0)), r_head), r_head, 2, -1)
    return canvas


def _bicycle_parts(rng: np.random.Generator, size: float) -> np.ndarray:
    """Bicycle seen from the side: two thick rings and a frame. ``size`` is the width."""
    w = max(12, int(round(size)))
    h = max(8, int(round(w * rng.uniform(0.58, 0.66))))
    canvas = np.zeros((h, w), np.uint8)
    r = max(3, int(round(0.21 * w)))
    ring = max(2, int(round(0.5 * r)))
    frame = max(2, int(round(0.08 * w)))
    hub_y = h - 1 - r
    rear, front = (r, hub_y), (w - 1 - r, hub_y)
    crank = (int(round(0.46 * w)), hub_y)
    seat = (int(round(0.36 * w)), int(round(0.12 * h)))
    handle = (int(round(0.72 * w)), int(round(0.06 * h)))
    for p, q in (
        (rear, seat),
        (seat, crank),
        (crank, rear),
        (seat, handle),
        (handle, front),
        (crank, handle),
    ):
        cv2.line(canvas, p, q, 1, frame)
    for hub in (rear, front):
        cv2.circle(canvas, hub, max(1, r - ring // 2), 2, ring)
    if rng.random() < 0.5:
        canvas = np.ascontiguousarray(canvas[:, ::-1])
    return canvas


# name -> (shape function, size range at the reference resolution, outline?)
_THING_SPECS = {
    "car": (_car_parts, (26.0, 90.0), True),
    "person": (_person_parts, (16.0, 56.0), True),
    "bicycle": (_bicycle_parts, (18.0, 46.0), False),
}


def _paint_thing(image, name, parts, rng, y0, x0, scale):
    """Colour the parts of one instance (its own texture) into ``image`` at (y0, x0), clipped."""
    height, width = image.shape[:2]
    ph, pw = parts.shape
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = min(ph, height - y0), min(pw, width - x0)
    crop = parts[sy0:sy1, sx0:sx1]
    ly, lx = np.mgrid[sy0:sy1, sx0:sx1]
    region = image[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1]
    colors = np.zeros(crop.shape + (3,), np.float32)
    period = max(1, int(round(2 * scale)))
    if name == "car":
        stripes = np.where((ly // period) % 2 == 0, 1.1, 0.9)[..., None]
        colors[crop == 1] = (_jitter(rng, _COLORS["car"], 20) * stripes)[crop == 1]
        colors[crop == 2] = _jitter(rng, _COLORS["car_window"], 10)
        colors[crop == 3] = _jitter(rng, _COLORS["wheel"], 6)
    elif name == "person":
        stripes = np.where((lx // period) % 2 == 0, 1.12, 0.88)[..., None]
        colors[crop == 1] = (_jitter(rng, _COLORS["person"], 20) * stripes)[crop == 1]
        colors[crop == 2] = _jitter(rng, _COLORS["skin"], 12)
    elif name == "bicycle":
        checks = np.where(((lx // period) + (ly // period)) % 2 == 0, 1.08, 0.85)[..., None]
        colors[crop == 1] = (_jitter(rng, _COLORS["bicycle"], 15) * checks)[crop == 1]
        colors[crop == 2] = (_jitter(rng, _COLORS["bicycle_ring"], 15) * checks)[crop == 2]
    else:  # pragma: no cover - guarded by _THING_SPECS
        raise ValueError(f"Unknown thing class {name}")
    mask = crop > 0
    if _THING_SPECS[name][2]:
        # Dark outline on the shape's border keeps touching instances of one class apart.
        padded = np.pad(mask, 1).astype(np.uint8)
        inner = cv2.erode(padded, np.ones((3, 3), np.uint8))[1:-1, 1:-1].astype(bool)
        colors[mask & ~inner] *= 0.45
    region[mask] = colors[mask]


def _paste_ids(inst_map, parts, y0, x0, value):
    height, width = inst_map.shape
    ph, pw = parts.shape
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = min(ph, height - y0), min(pw, width - x0)
    if sy1 <= sy0 or sx1 <= sx0:
        return
    mask = parts[sy0:sy1, sx0:sx1] > 0
    inst_map[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1][mask] = value


@dataclass
class _Scene:
    """The image and label map being drawn, with the layout rows and the pixel grid."""

    image: np.ndarray  # (H, W, 3) float32 RGB
    label_ids: np.ndarray  # (H, W) uint8
    yy: np.ndarray
    xx: np.ndarray
    scale: float
    y_ground: int  # sky / buildings above, sidewalk band below
    y_road: int  # road below
    y_ego: int  # ego vehicle below

    @property
    def shape(self) -> Tuple[int, int]:
        return self.label_ids.shape


def _draw_sky(rng, s: _Scene) -> None:
    """Sky: vertical gradient."""
    t = (s.yy[: s.y_ground] / max(1, s.y_ground - 1))[..., None]
    top, horizon = _jitter(rng, _COLORS["sky_top"], 10), _jitter(rng, _COLORS["sky_horizon"], 8)
    s.image[: s.y_ground] = top * (1 - t) + horizon * t
    s.label_ids[: s.y_ground] = _label_id("sky")


def _draw_buildings(rng, s: _Scene) -> List[Tuple[int, int]]:
    """Buildings, left to right; returns the gaps ``(x, width)`` left for trees."""
    (H, W), scale, y_ground = s.shape, s.scale, s.y_ground
    win_px, win_py = max(4, int(round(8 * scale))), max(4, int(round(9 * scale)))
    win_wx, win_wy = max(2, int(round(0.45 * win_px))), max(2, int(round(0.5 * win_py)))
    y_top_lo, y_top_hi = int(0.10 * H), max(int(0.10 * H) + 1, y_ground - int(0.14 * H))
    trees: List[Tuple[int, int]] = []
    x = -int(rng.integers(0, int(20 * scale) + 1))
    while x < W:
        seg_w = int(rng.integers(int(22 * scale), int(70 * scale) + 1))
        x0, x1 = max(0, x), min(W, x + seg_w)
        if rng.random() < 0.25:
            trees.append((x, seg_w))
        elif x1 > x0:
            y_top = int(rng.integers(y_top_lo, y_top_hi))
            color = _jitter(rng, _COLORS["building"], 18)
            ly = s.yy[y_top:y_ground, x0:x1] - y_top
            lx = s.xx[y_top:y_ground, x0:x1] - x
            windows = (
                ((lx % win_px) >= win_px - win_wx)
                & ((ly % win_py) >= win_py - win_wy)
                & (lx < seg_w - 2)
                & (ly < y_ground - y_top - 2)
            )
            block = np.where(windows[..., None], _jitter(rng, _COLORS["window"], 8), color)
            s.image[y_top:y_ground, x0:x1] = block
            s.label_ids[y_top:y_ground, x0:x1] = _label_id("building")
        x += seg_w
    return trees


def _draw_vegetation(rng, s: _Scene, trees: List[Tuple[int, int]]) -> None:
    """Tree crowns in the gaps, sometimes a hedge in front of the facades."""
    (H, W), y_ground = s.shape, s.y_ground
    yy, xx = s.yy[:y_ground], s.xx[:y_ground]
    veg_color = _jitter(rng, _COLORS["vegetation"], 12)
    cell = max(2, int(round(3 * s.scale)))
    blobs = _blob_noise(rng, y_ground, W, cell)
    vegetation = np.zeros((y_ground, W), bool)
    for x, seg_w in trees:
        rx = 0.5 * seg_w * rng.uniform(0.9, 1.2)
        ry = rx * rng.uniform(0.9, 1.4)
        cx, cy = x + 0.5 * seg_w, y_ground - ry * rng.uniform(0.6, 0.9)
        vegetation |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    if rng.random() < 0.5:
        hedge_h = max(2, int(round(H * rng.uniform(0.04, 0.08))))
        hx0 = int(rng.integers(0, W // 2))
        hx1 = min(W, hx0 + int(rng.integers(W // 5, W // 2)))
        vegetation[y_ground - hedge_h :, hx0:hx1] = True
    veg_texture = (
        veg_color * (1.0 + 0.22 * blobs[..., None]) * np.array([0.9, 1.0, 0.9], np.float32)
    )
    s.image[:y_ground][vegetation] = veg_texture[vegetation]
    s.label_ids[:y_ground][vegetation] = _label_id("vegetation")


def _draw_ground(rng, s: _Scene) -> None:
    """Sidewalk band (tiles) with terrain patches (diagonal stripes); road with a fine grain;
    the ego vehicle, a flat near-black strip (void)."""
    W, y_ground, y_road, y_ego = s.shape[1], s.y_ground, s.y_road, s.y_ego
    tile = max(3, int(round(8 * s.scale)))
    band_y, band_x = s.yy[y_ground:y_road], s.xx[y_ground:y_road]
    grid_lines = ((band_x % tile) == 0) | (((band_y - y_ground) % max(2, tile // 2)) == 0)
    side_color = _jitter(rng, _COLORS["sidewalk"], 10)
    s.image[y_ground:y_road] = np.where(grid_lines[..., None], side_color * 0.72, side_color)
    s.label_ids[y_ground:y_road] = _label_id("sidewalk")
    stripe = max(2, int(round(3 * s.scale)))
    for _ in range(int(rng.choice(3, p=(0.15, 0.5, 0.35)))):
        tx0 = int(rng.integers(0, W))
        tx1 = min(W, tx0 + int(rng.integers(int(0.2 * W), int(0.45 * W))))
        terrain_color = _jitter(rng, _COLORS["terrain"], 10)
        stripes = (((band_x[:, tx0:tx1] + band_y[:, tx0:tx1]) // stripe) % 2 == 0)[..., None]
        s.image[y_ground:y_road, tx0:tx1] = terrain_color * np.where(stripes, 1.1, 0.88)
        s.label_ids[y_ground:y_road, tx0:tx1] = _label_id("terrain")
    road_color = _jitter(rng, _COLORS["road"], 6)
    grain = rng.standard_normal((y_ego - y_road, W), dtype=np.float32)[..., None] * 6.0
    s.image[y_road:y_ego] = road_color + grain
    s.label_ids[y_road:y_ego] = _label_id("road")
    s.image[y_ego:] = _jitter(rng, _COLORS["ego vehicle"], 4)
    s.label_ids[y_ego:] = _label_id(_VOID_CLASS)


def _place_things(rng, s: _Scene) -> List[tuple]:
    """Things standing on the ground, their size growing with the distance below the horizon;
    ``(y_bottom, index, name, parts, y0, x0)`` far (high) ones first."""
    W, scale, y_ground, y_road, y_ego = s.shape[1], s.scale, s.y_ground, s.y_road, s.y_ego
    things = []
    counts = {
        "car": int(rng.integers(1, 5)),
        "person": int(rng.integers(1, 6)),
        "bicycle": int(rng.integers(1, 4)),
    }
    for name in SYNTHETIC_THING_CLASSES:
        shape_fn, (lo, hi), _ = _THING_SPECS[name]
        for _ in range(counts[name]):
            if name == "car":
                y_b = rng.uniform(y_road + 0.2 * (y_ego - y_road), y_ego)
            elif rng.random() < 0.6:  # persons and bicycles: mostly on the sidewalk
                y_b = rng.uniform(y_ground + 0.4 * (y_road - y_ground), y_road)
            else:
                y_b = rng.uniform(y_road, y_ego)
            depth = (y_b - y_ground) / max(1.0, y_ego - y_ground)
            size = np.clip((lo + (hi - lo) * depth) * rng.uniform(0.85, 1.12), lo, hi) * scale
            parts = shape_fn(rng, max(12.0 * scale, size))
            x_c = rng.uniform(0, W)
            y0 = int(round(y_b)) - parts.shape[0]
            x0 = int(round(x_c - parts.shape[1] / 2.0))
            things.append((y_b, len(things), name, parts, y0, x0))
    things.sort(key=lambda t: (t[0], t[1]))  # far (high) ones first: nearer ones occlude them
    return things


def _draw_things(rng, s: _Scene, things: List[tuple]) -> np.ndarray:
    """Paint the visible things; returns the Cityscapes instance ids."""
    # Visible masks: paint ids in drawing order, drop instances left too small, repaint.
    # Dropping an instance only uncovers pixels of others, so one pass suffices.
    min_area = _MIN_VISIBLE_AREA * s.scale * s.scale
    inst_map = np.full(s.shape, -1, np.int32)
    for idx, (_, _, _, parts, y0, x0) in enumerate(things):
        _paste_ids(inst_map, parts, y0, x0, idx)
    areas = np.bincount(inst_map[inst_map >= 0], minlength=len(things))
    keep = [i for i in range(len(things)) if areas[i] >= min_area]
    inst_map.fill(-1)
    for idx in keep:
        _, _, _, parts, y0, x0 = things[idx]
        _paste_ids(inst_map, parts, y0, x0, idx)

    instance_ids = s.label_ids.astype(np.int32)
    per_class = {name: 0 for name in SYNTHETIC_THING_CLASSES}
    id_of = np.zeros(max(1, len(things)), np.int32)
    for idx in keep:
        _, _, name, parts, y0, x0 = things[idx]
        _paint_thing(s.image, name, parts, rng, y0, x0, s.scale)
        id_of[idx] = _label_id(name) * 1000 + per_class[name]
        per_class[name] += 1
    on_thing = inst_map >= 0
    instance_ids[on_thing] = id_of[inst_map[on_thing]]
    s.label_ids[on_thing] = (instance_ids[on_thing] // 1000).astype(np.uint8)
    return instance_ids


def render_synthetic_scene(
    rng: np.random.Generator, height: int = _REF_HEIGHT, width: int = _REF_WIDTH
) -> Dict[str, np.ndarray]:
    """Render one street-like scene.

    Args:
        rng (numpy.random.Generator): the only source of randomness (same state, same scene).
        height, width (int): image size; object sizes scale with ``min(H / 128, W / 256)``.

    Returns:
        dict with
            * "image": (H, W, 3) uint8 RGB image,
            * "label_ids": (H, W) uint8 Cityscapes label ids,
            * "instance_ids": (H, W) int32 Cityscapes instance ids (``label_id * 1000 + k`` on
              thing instances, k = 0, 1, ... per class in drawing order; ``label_id`` elsewhere).
    """
    if height < 32 or width < 32:
        raise ValueError(f"Synthetic scenes need at least 32x32 pixels, got {height}x{width}")
    H, W = int(height), int(width)
    yy, xx = _grid(H, W)
    # Rows of the layout: sky / buildings above y_ground, sidewalk band, road, ego vehicle.
    y_ground = int(round(H * rng.uniform(0.50, 0.58)))
    y_road = y_ground + max(2, int(round(H * rng.uniform(0.08, 0.13))))
    y_ego = H - max(1, int(round(H * 0.05)))
    s = _Scene(
        image=np.empty((H, W, 3), np.float32),
        label_ids=np.empty((H, W), np.uint8),
        yy=yy,
        xx=xx,
        scale=min(H / _REF_HEIGHT, W / _REF_WIDTH),
        y_ground=y_ground,
        y_road=y_road,
        y_ego=y_ego,
    )
    _draw_sky(rng, s)
    _draw_vegetation(rng, s, _draw_buildings(rng, s))
    _draw_ground(rng, s)
    instance_ids = _draw_things(rng, s, _place_things(rng, s))

    # Mild global photometric variation and noise.
    image = s.image * rng.uniform(0.93, 1.07)
    image += rng.standard_normal((H, W, 3), dtype=np.float32) * _GLOBAL_NOISE_STD
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return {"image": image, "label_ids": s.label_ids, "instance_ids": instance_ids}
