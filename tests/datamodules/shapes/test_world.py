"""The synthetic world: deterministic scenes, exact relations, objects inside the frame, rendering."""

from __future__ import annotations

import random

import numpy as np
import pytest

from datamodules.shapes.world import (
    BACKGROUND,
    COLOURS,
    MOTIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    WorldConfig,
    sample_scene,
    shape_mask,
    write_clip,
)
from datamodules.video import read_video

WORLD = WorldConfig()


def obj(shape="circle", colour="red", size="small", motion="still", x0=32.0, y0=32.0) -> SceneObject:
    return SceneObject(shape, colour, size, motion, x0, y0)


def test_the_world_has_the_required_vocabulary():
    assert {"circle", "square", "triangle", "star"} <= set(SHAPES)
    assert len(COLOURS) >= 6 and set(SIZES) == {"small", "large"}
    assert set(MOTIONS) == {"left", "right", "up", "down", "still"}


def test_sampling_is_deterministic_for_a_seed():
    first = [sample_scene(random.Random(seed)) for seed in range(20)]
    again = [sample_scene(random.Random(seed)) for seed in range(20)]
    assert first == again
    assert np.array_equal(first[3].render(), again[3].render())
    assert len({scene.to_dict().__repr__() for scene in first}) == 20


@pytest.mark.parametrize(
    "world", [WORLD, WorldConfig(frames=8, size=48), WorldConfig(size=96, min_objects=3)]
)
def test_sampled_scenes_are_valid(world):
    rng = random.Random(1)
    counts = set()
    for _ in range(150):
        scene = sample_scene(rng, world)
        counts.add(len(scene.objects))
        assert world.min_objects <= len(scene.objects) <= world.max_objects
        assert len({o.shape for o in scene.objects}) == len(scene.objects)  # distinct shapes
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # distinct colours
        for o in scene.objects:
            radius = world.radius[o.size]
            for t in (0.0, 1.0):  # motion is linear, so the ends bound the whole path
                x, y = o.position(t, world.travel)
                assert radius <= x <= world.size - radius and radius <= y <= world.size - radius
    assert counts == set(range(world.min_objects, world.max_objects + 1))


def test_relations_of_a_known_scene():
    circle, square = obj("circle", x0=10, y0=10), obj("square", "blue", x0=50, y0=12)
    objects = (circle, square, obj("star", "green", x0=30, y0=50))
    scene = Scene(objects, WORLD)
    held = set(scene.relations())
    assert (0, "left of", 1) in held and (1, "right of", 0) in held
    assert (0, "above", 1) not in held and (1, "below", 0) not in held  # 2 px apart: under the margin
    assert {(0, "above", 2), (1, "above", 2), (2, "below", 0), (2, "below", 1)} <= held
    assert (0, "left of", 2) in held and (2, "right of", 0) in held
    assert (2, "left of", 1) in held  # 30 vs 50
    assert scene.holds(0, "left of", 1) and not scene.holds(1, "left of", 0)
    assert scene.contradicts(1, "left of", 0)  # the square is clearly right of the circle
    assert not scene.contradicts(0, "above", 1) and not scene.holds(0, "above", 1)  # borderline: neither
    assert "The red circle is left of the blue square." in scene.describe()


def test_relations_must_hold_over_the_whole_clip():
    # The circle moves right past the still square: left of it at the start, right of it at the end.
    moving = Scene((obj("circle", motion="right", x0=22, y0=20), obj("square", "blue", x0=30, y0=50)), WORLD)
    assert not any(i == 0 and r in ("left of", "right of") for i, r, _ in moving.relations())
    assert moving.holds(0, "above", 1)
    still = Scene((obj("circle", motion="right", x0=5, y0=20), obj("square", "blue", x0=50, y0=50)), WORLD)
    assert still.holds(0, "left of", 1)  # 5 + 16 travel is still well left of 50


def test_describe_mentions_every_object_and_motion():
    objects = (obj("triangle", "yellow", "large", "up"), obj("star", "white", motion="still", x0=5, y0=5))
    scene = Scene(objects, WORLD)
    text = scene.describe()
    assert "A large yellow triangle moves up." in text and "A small white star stays still." in text


def test_to_dict_round_trip():
    scene = sample_scene(random.Random(5))
    assert Scene.from_dict(scene.to_dict()) == scene


def test_render_shape_and_content():
    world = WorldConfig(frames=6, size=64)
    scene = Scene((obj("square", "green", "large", "right", x0=20, y0=20),), world)
    frames = scene.render()
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    assert tuple(frames[0, 20, 20]) == COLOURS["green"]
    assert tuple(frames[0, 60, 60]) == BACKGROUND
    end_x = round(20 + world.travel)
    assert tuple(frames[-1, 20, end_x]) == COLOURS["green"] and tuple(frames[0, 20, end_x + 5]) == BACKGROUND
    # A faint streak trails the moving square: between background and its colour, on its left.
    streak = frames[-1, 20, end_x - int(world.radius["large"] * 1.4)]
    assert tuple(streak) not in (COLOURS["green"], BACKGROUND)
    assert not (frames[0] == frames[-1]).all()


def test_still_scene_frames_are_identical():
    frames = Scene((obj("star", "purple", "large"),), WorldConfig(frames=4)).render()
    assert all(np.array_equal(frames[0], f) for f in frames)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks(shape):
    mask = shape_mask(shape, 20.0, 30.0, 8.0, 64)
    assert mask.shape == (64, 64) and mask[30, 20]  # filled at the centre
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 11 and xs.max() <= 28 and ys.min() >= 21 and ys.max() <= 38
    assert not shape_mask(shape, -30.0, -30.0, 8.0, 64).any()  # fully outside: empty, no error
    assert shape_mask(shape, 1.0, 1.0, 8.0, 64).any()  # partly outside: clipped


def test_shapes_are_distinguishable():
    masks = {shape: shape_mask(shape, 32.0, 32.0, 10.0, 64) for shape in SHAPES}
    areas = {shape: int(mask.sum()) for shape, mask in masks.items()}
    assert len(set(areas.values())) == len(SHAPES)
    with pytest.raises(ValueError):
        shape_mask("hexagon", 1, 1, 1, 8)


def test_write_clip_round_trip(tmp_path):
    scene = sample_scene(random.Random(2), WorldConfig(frames=5, size=32))
    path = tmp_path / "sub" / "clip.mp4"
    write_clip(scene.render(), path, fps=8)
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    frames = read_video(path, 5)
    assert frames.shape == (5, 32, 32, 3)
    assert np.abs(frames.astype(int) - scene.render()).mean() < 6
