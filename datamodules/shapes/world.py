"""The synthetic video world: clips of coloured shapes that move, with an exact scene description.

Because every clip is rendered from a known `Scene`, the answerability of every generated question is
exact. Scenes are sampled deterministically from a seed and rendered to mp4 with PyAV.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.records import atomic_write

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 255),
    "yellow": (245, 225, 30),
    "purple": (170, 50, 220),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "still")
# The relation between two objects: an interaction seen on the objects themselves, as MOMA-LRG's relations
# (holding, touching, next to) are, rather than a comparison of coordinates. Two objects touch when their
# shapes meet in every frame; every other pair stays clearly apart (`Scene.relations`, `Scene.contradicts`).
RELATIONS = ("touching",)
BACKGROUND = (60, 60, 60)

_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class WorldConfig:
    """Geometry of the world; sizes are in pixels of a `size` x `size` frame."""

    frames: int = 16
    fps: int = 8
    size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    # The chance that a clip with two or more objects has a pair that touches. At 0.6 the answerable questions
    # that name an object by what it touches are about as many as the unanswerable ones that do.
    contact: float = 0.6

    @property
    def radius(self) -> dict[str, float]:
        return {"small": self.size * 0.1, "large": self.size * 0.16}

    @property
    def travel(self) -> float:
        """How far a moving object travels over the whole clip."""
        return self.size * 0.25

    @property
    def gap(self) -> float:
        """The least distance between the circumcircles of two objects that do not touch: enough background
        between them to tell them from a touching pair at the video tokens' resolution."""
        return self.size * 0.08

    @property
    def press(self) -> float:
        """How much closer than where their shapes first meet a touching pair is placed, so that the two
        visibly overlap rather than share a pixel."""
        return self.size * 0.025


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    motion: str
    x0: float
    y0: float

    def name(self, *, colour: bool = True, size: bool = False) -> str:
        parts = ([self.size] if size else []) + ([self.colour] if colour else []) + [self.shape]
        return " ".join(parts)

    def position(self, t: float, travel: float) -> tuple[float, float]:
        """Centre at clip time `t` in [0, 1]."""
        dx, dy = _VELOCITY[self.motion]
        return self.x0 + dx * travel * t, self.y0 + dy * travel * t


@dataclass(frozen=True)
class Scene:
    """An exactly known clip: its objects (distinct shapes and colours) and the world geometry."""

    objects: tuple[SceneObject, ...]
    world: WorldConfig

    def relations(self) -> list[tuple[int, str, int]]:
        """(i, "touching", j) for every ordered pair of objects whose shapes meet in every frame."""
        return [(i, "touching", j) for i, j in _contacts(self)]

    def partners(self, i: int) -> list[int]:
        """The indices of the objects that object i touches, in index order."""
        return [b for a, b in _contacts(self) if a == i]

    def holds(self, i: int, relation: str, j: int) -> bool:
        return (i, relation, j) in self.relations()

    def contradicts(self, i: int, relation: str, j: int) -> bool:
        """True when `relation` clearly does not hold: the two objects are apart by the world's gap in every
        frame (not just borderline)."""
        if relation != "touching" or i == j:
            raise ValueError(f"unknown relation {relation!r} between objects {i} and {j}")
        a, b = self.objects[i], self.objects[j]
        reach = self.world.radius[a.size] + self.world.radius[b.size] + self.world.gap
        return all(_distance(a, b, t, self.world.travel) >= reach for t in _times(self.world))

    def describe(self) -> str:
        """The exact scene description in plain English."""
        sentences = []
        for obj in self.objects:
            verb = "stays still" if obj.motion == "still" else f"moves {obj.motion}"
            sentences.append(f"A {obj.size} {obj.colour} {obj.shape} {verb}.")
        for i, relation, j in self.relations():
            if i < j:
                a, b = self.objects[i], self.objects[j]
                sentences.append(f"The {a.name()} is {relation} the {b.name()}.")
        return " ".join(sentences)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "world": asdict(self.world)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(tuple(SceneObject(**o) for o in data["objects"]), WorldConfig(**data["world"]))

    # ----------------------------------------------------------------------------------------- rendering
    def render(self) -> np.ndarray:
        """All frames as a (T, H, W, 3) uint8 array."""
        return np.stack([self.render_frame(k) for k in range(self.world.frames)])

    def render_frame(self, k: int) -> np.ndarray:
        world = self.world
        t = k / max(world.frames - 1, 1)
        frame = np.empty((world.size, world.size, 3), dtype=np.float32)
        frame[:] = BACKGROUND
        for obj in self.objects:
            colour = np.array(COLOURS[obj.colour], dtype=np.float32)
            radius = world.radius[obj.size]
            cx, cy = obj.position(t, world.travel)
            if obj.motion != "still":
                # A faint streak behind a moving object, as motion blur would leave in a real clip.
                dx, dy = _VELOCITY[obj.motion]
                for step, alpha in ((1.0, 0.5), (1.8, 0.3)):
                    tx, ty = cx - dx * radius * step, cy - dy * radius * step
                    mask = shape_mask(obj.shape, tx, ty, radius * 0.8, world.size)
                    frame[mask] = (1 - alpha) * frame[mask] + alpha * colour
            frame[shape_mask(obj.shape, cx, cy, radius, world.size)] = colour
        return frame.round().astype(np.uint8)


def _times(world: WorldConfig) -> list[float]:
    return [k / max(world.frames - 1, 1) for k in range(world.frames)]


def _distance(a: SceneObject, b: SceneObject, t: float, travel: float) -> float:
    (ax, ay), (bx, by) = a.position(t, travel), b.position(t, travel)
    return math.hypot(ax - bx, ay - by)


def shapes_meet(scene: Scene, i: int, j: int, t: float) -> bool:
    """Whether the rendered shapes of objects i and j overlap or share an edge (4-neighbour) at time t."""
    world = scene.world
    masks = []
    for obj in (scene.objects[i], scene.objects[j]):
        cx, cy = obj.position(t, world.travel)
        masks.append(shape_mask(obj.shape, cx, cy, world.radius[obj.size], world.size))
    a, b = masks
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


@lru_cache(maxsize=4096)
def _contacts(scene: Scene) -> tuple[tuple[int, int], ...]:
    """Ordered pairs (i, j) of objects whose shapes meet in every frame of the clip."""
    pairs = []
    for i in range(len(scene.objects)):
        for j in range(len(scene.objects)):
            if i != j and all(shapes_meet(scene, i, j, t) for t in _times(scene.world)):
                pairs.append((i, j))
    return tuple(pairs)


_SUBPIXEL = 16  # shape centres are rounded to 1/16 pixel, so masks can be cached and reused


def _polygon_inside(points: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Even-odd fill of a polygon sampled at the given pixel centres."""
    inside = np.zeros(ys.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (ys >= min(y1, y2)) & (ys < max(y1, y2))
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


@lru_cache(maxsize=16384)
def _local_mask(shape: str, radius: float, fx: int, fy: int) -> tuple[np.ndarray, int]:
    """The mask of a shape in a small square window, centred `fx`/`fy` sixteenths right of/below
    the window's pixel `reach`: (read-only mask, reach)."""
    reach = math.ceil(radius) + 1
    cx, cy = reach + fx / _SUBPIXEL, reach + fy / _SUBPIXEL
    ys, xs = np.mgrid[0 : 2 * reach + 1, 0 : 2 * reach + 1].astype(np.float32) + 0.5
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    else:
        if shape == "square":
            half = radius * 0.8
            points = np.array([(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half),
                               (cx - half, cy + half)])
        elif shape == "triangle":
            angles = (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
            points = np.array([(cx + radius * math.cos(a), cy - radius * math.sin(a)) for a in angles])
        elif shape == "star":
            radii = [radius if n % 2 == 0 else radius * 0.42 for n in range(10)]
            angles = [math.pi / 2 + n * math.pi / 5 for n in range(10)]
            pairs = zip(radii, angles, strict=True)
            points = np.array([(cx + r * math.cos(a), cy - r * math.sin(a)) for r, a in pairs])
        else:
            raise ValueError(f"unknown shape {shape!r}")
        mask = _polygon_inside(points, ys, xs)
    mask.setflags(write=False)
    return mask, reach


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with circumradius `radius`."""
    ix, fx = divmod(round(cx * _SUBPIXEL), _SUBPIXEL)
    iy, fy = divmod(round(cy * _SUBPIXEL), _SUBPIXEL)
    local, reach = _local_mask(shape, float(radius), fx, fy)
    x0, y0, n = ix - reach, iy - reach, local.shape[0]  # the window's top-left pixel in the frame
    mask = np.zeros((size, size), dtype=bool)
    gx0, gx1, gy0, gy1 = max(0, x0), min(size, x0 + n), max(0, y0), min(size, y0 + n)
    if gx0 < gx1 and gy0 < gy1:
        mask[gy0:gy1, gx0:gx1] = local[gy0 - y0 : gy1 - y0, gx0 - x0 : gx1 - x0]
    return mask


# --------------------------------------------------------------------------------------------- sampling
def sample_scene(rng: random.Random, world: WorldConfig = WorldConfig(), attempts: int = 1000) -> Scene:
    """A random scene with distinct shapes and colours and objects inside the frame.

    With probability `world.contact` a clip of two or more objects has one pair that touches: the second
    object moves with the first, placed in a random direction at the distance where their shapes meet. Every
    other pair stays apart by at least `world.gap` beyond their circumcircles in every frame, so whether two
    objects touch is never borderline.
    """
    count = rng.randint(world.min_objects, world.max_objects)
    contact = count >= 2 and rng.random() < world.contact
    for _ in range(attempts):
        shapes = rng.sample(SHAPES, count)
        colours = rng.sample(list(COLOURS), count)
        objects: list[SceneObject] = []
        for n, (shape, colour) in enumerate(zip(shapes, colours, strict=True)):
            size, motion = rng.choice(SIZES), rng.choice(MOTIONS)
            if contact and n == 1:
                objects.append(_touching(objects[0], shape, colour, size, world, rng))
                continue
            lo_x, hi_x, lo_y, hi_y = _start_box(world, size, motion)
            x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            objects.append(SceneObject(shape, colour, size, motion, x0, y0))
        scene = Scene(tuple(objects), world)
        if _valid(scene, contact):
            return scene
    raise RuntimeError(f"could not place {count} objects in a {world.size}px frame after {attempts} attempts")


def _start_box(world: WorldConfig, size: str, motion: str) -> tuple[float, float, float, float]:
    """(lo_x, hi_x, lo_y, hi_y): the starts from which an object's whole path stays inside the frame."""
    radius = world.radius[size]
    dx, dy = _VELOCITY[motion]
    return (
        radius + 1 + max(0.0, -dx * world.travel),
        world.size - radius - 1 - max(0.0, dx * world.travel),
        radius + 1 + max(0.0, -dy * world.travel),
        world.size - radius - 1 - max(0.0, dy * world.travel),
    )


def _touching(
    anchor: SceneObject, shape: str, colour: str, size: str, world: WorldConfig, rng: random.Random
) -> SceneObject:
    """An object that moves with `anchor`, placed in a random direction `world.press` closer than where its
    shape first meets the anchor's (found by stepping in from the circumcircles' distance)."""
    angle = rng.uniform(0.0, 2 * math.pi)
    distance = world.radius[anchor.size] + world.radius[size]
    while distance > 0:
        candidate = SceneObject(
            shape, colour, size, anchor.motion,
            anchor.x0 + distance * math.cos(angle), anchor.y0 + distance * math.sin(angle),
        )
        if shapes_meet(Scene((anchor, candidate), world), 0, 1, 0.0):
            distance -= world.press
            x0, y0 = anchor.x0 + distance * math.cos(angle), anchor.y0 + distance * math.sin(angle)
            return SceneObject(shape, colour, size, anchor.motion, x0, y0)
        distance -= 0.25
    raise AssertionError("unreachable: shapes with the same centre overlap")


def _valid(scene: Scene, contact: bool) -> bool:
    """Every object inside the frame; objects 0 and 1 touch in every frame when `contact`; every other
    pair clearly apart."""
    world = scene.world
    for obj in scene.objects:
        lo_x, hi_x, lo_y, hi_y = _start_box(world, obj.size, obj.motion)
        if not (lo_x <= obj.x0 <= hi_x and lo_y <= obj.y0 <= hi_y):
            return False
    for i in range(len(scene.objects)):
        for j in range(i + 1, len(scene.objects)):
            if contact and (i, j) == (0, 1):
                if not all(shapes_meet(scene, 0, 1, t) for t in _times(world)):
                    return False
            elif not scene.contradicts(i, "touching", j):
                return False
    return True


# ---------------------------------------------------------------------------------------------- writing
def write_clip(frames: np.ndarray, path: str | Path, fps: int = 8) -> None:
    """Encode (T, H, W, 3) uint8 frames to an mp4 file (MPEG-4 Part 2, high quality) with PyAV, atomically."""
    import av

    height, width = frames.shape[1:3]

    def encode(handle) -> None:
        with av.open(handle, mode="w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"qscale": "1"}
            stream.bit_rate = 2_000_000
            for array in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    atomic_write(path, encode)
