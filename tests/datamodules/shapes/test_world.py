"""The synthetic world: deterministic scenes, exact touching, objects inside the frame, rendering."""

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


def test_touching_is_read_from_the_rendered_shapes():
    # Two small circles (radius 6.4) 12 px apart overlap; the star 30 px away touches nothing.
    circle, square = obj("circle", x0=20, y0=20), obj("circle", "blue", x0=32, y0=20)
    scene = Scene((circle, square, obj("star", "green", x0=30, y0=50)), WORLD)
    assert set(scene.relations()) == {(0, "touching", 1), (1, "touching", 0)}
    assert scene.holds(0, "touching", 1) and not scene.holds(0, "touching", 2)
    assert (scene.partners(0), scene.partners(1), scene.partners(2)) == ([1], [0], [])
    assert scene.contradicts(0, "touching", 2) and scene.contradicts(2, "touching", 1)
    assert not scene.contradicts(0, "touching", 1)
    assert "The red circle is touching the blue circle." in scene.describe()
    assert "The blue circle is touching the red circle." not in scene.describe()  # each pair once
    # Shapes 1 px beyond their circumcircles neither touch nor are clearly apart by the gap: borderline.
    near = Scene((obj(x0=20, y0=20), obj("square", "blue", x0=20 + 2 * 6.4 + 1, y0=20)), WORLD)
    assert not near.holds(0, "touching", 1) and not near.contradicts(0, "touching", 1)
    with pytest.raises(ValueError, match="unknown relation"):
        scene.contradicts(0, "left of", 1)


def test_touching_must_hold_over_the_whole_clip():
    # The circle moves right into the still square: apart at the start, overlapping at the end.
    moving = Scene((obj("circle", motion="right", x0=14, y0=30), obj("square", "blue", x0=40, y0=30)), WORLD)
    assert not moving.relations() and not moving.contradicts(0, "touching", 1)
    # A square's edge is 0.8 of its circumradius from its centre: 30 - 5.1 < 20 + 6.4, so they overlap.
    circle = obj("circle", motion="up", x0=20, y0=40)
    together = Scene((circle, obj("square", "blue", motion="up", x0=30, y0=40)), WORLD)
    assert together.holds(0, "touching", 1)


def test_sampled_touching_pairs_move_together_and_every_other_pair_is_clearly_apart():
    rng, touching = random.Random(7), 0
    for _ in range(200):
        scene = sample_scene(rng, WORLD)
        pairs = {(i, j) for i, _, j in scene.relations()}
        touching += bool(pairs)
        assert pairs in (set(), {(0, 1), (1, 0)})  # at most one pair: the first two objects
        if pairs:
            assert scene.objects[0].motion == scene.objects[1].motion
        for i in range(len(scene.objects)):
            for j in range(len(scene.objects)):
                if i != j and (i, j) not in pairs:
                    assert scene.contradicts(i, "touching", j)
    # 2/3 of clips have two or more objects, 0.6 of those a touching pair: about 80 of 200.
    assert 55 <= touching <= 105
    assert not any(sample_scene(rng, WorldConfig(contact=0.0)).relations() for _ in range(50))


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
