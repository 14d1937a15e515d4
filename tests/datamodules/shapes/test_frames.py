"""Labelled frames for the vision tower's pretraining: dense cell and patch labels of real rendered clips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.shapes.frames import LABEL_VALUES, LABELS, SceneFramesDataModule, cell_labels, patch_shapes
from datamodules.shapes.world import BACKGROUND, Scene, SceneObject, WorldConfig

WORLD = WorldConfig()


def scene(*objects: SceneObject) -> Scene:
    return Scene(tuple(objects), WORLD)


def test_a_covered_cell_gets_every_label_of_its_object_and_its_centre():
    # A large still red square centred in the middle of cell (row 1, column 2) of the 4 x 4 token grid.
    square = SceneObject("square", "red", "large", "still", 40.0, 24.0)
    labels = cell_labels(scene(square), 0, grid=4)
    n = len(LABELS)
    attributes = ("shape", "colour", "size", "motion")
    expected = [LABEL_VALUES[name].index(getattr(square, name)) + 1 for name in attributes]
    assert labels.shape == (4, 4, n + 2) and list(LABELS)[4] == "contact"
    assert labels[1, 2, :n].tolist() == [*expected, LABEL_VALUES["contact"].index("apart") + 1]
    assert labels[1, 2, n:].tolist() == pytest.approx([2 * 40 / 64 - 1, 2 * 24 / 64 - 1])
    covered = labels[..., 0] > 0
    assert covered.sum() == 1, "the square (16 px wide) fills exactly the one cell it is centred in"
    assert (labels[~covered] == 0).all(), "cells without an object carry no class and no position"


def test_a_small_star_too_thin_to_fill_min_cover_of_any_cell_keeps_its_centre_cell():
    star = SceneObject("star", "yellow", "small", "still", 40.0, 40.0)
    labels = cell_labels(scene(star), 0, grid=4)
    assert (labels[..., 0] > 0).sum() == 1 and labels[2, 2, 0] == LABEL_VALUES["shape"].index("star") + 1


def test_a_cell_barely_touched_by_an_object_stays_empty():
    # A small circle centred 1 px inside cell column 1: column 0 sees a sliver of it (under min_cover).
    circle = SceneObject("circle", "blue", "small", "still", 17.0, 40.0)
    labels = cell_labels(scene(circle), 0, grid=4)
    assert labels[2, 1, 0] == LABEL_VALUES["shape"].index("circle") + 1
    assert labels[2, 0, 0] == 0
    assert cell_labels(scene(circle), 0, grid=4, min_cover=0.0)[2, 0, 0] > 0


def test_each_cell_takes_the_object_that_covers_most_of_it_and_moving_objects_are_followed():
    left = SceneObject("triangle", "green", "large", "right", 12.0, 12.0)
    right = SceneObject("star", "white", "small", "still", 52.0, 52.0)
    first, last = cell_labels(scene(left, right), 0, 4), cell_labels(scene(left, right), WORLD.frames - 1, 4)
    assert first[0, 0, 0] == LABEL_VALUES["shape"].index("triangle") + 1
    assert first[3, 3, 0] == LABEL_VALUES["shape"].index("star") + 1
    assert first[0, 0, 3] == LABEL_VALUES["motion"].index("right") + 1
    moved = 2 * (12.0 + WORLD.travel) / 64 - 1
    assert last[..., len(LABELS)][last[..., 0] == first[0, 0, 0]].max() == pytest.approx(moved)


def test_the_cells_of_two_touching_objects_say_touching_and_the_others_apart():
    circle, square = SceneObject("circle", "red", "large", "up", 20.0, 40.0), SceneObject(
        "square", "blue", "large", "up", 38.0, 40.0
    )
    star = SceneObject("star", "white", "small", "still", 52.0, 10.0)
    labels = cell_labels(scene(circle, square, star), 0, grid=4)
    contact, shape = labels[..., list(LABELS).index("contact")], labels[..., 0]
    touching, apart = (LABEL_VALUES["contact"].index(v) + 1 for v in ("touching", "apart"))
    for name in ("circle", "square"):
        assert (contact[shape == LABEL_VALUES["shape"].index(name) + 1] == touching).all()
    assert (contact[shape == LABEL_VALUES["shape"].index("star") + 1] == apart).all()
    assert (contact[shape == 0] == 0).all()


def test_patch_shapes_label_the_finer_patch_grid():
    square = SceneObject("square", "red", "large", "still", 40.0, 24.0)
    patches = patch_shapes(scene(square), 0, grid=8)
    assert patches.shape == (8, 8) and patches.dtype == np.int64
    assert set(np.unique(patches)) == {0, LABEL_VALUES["shape"].index("square") + 1}
    assert (patches > 0).sum() == 4, "a 16 px square centred on a cell covers its 2 x 2 patches"


def test_the_datamodule_decodes_real_clips_with_both_label_grids(synthetic_data):
    data = SceneFramesDataModule(str(synthetic_data), frames_per_clip=2, grid=4, batch_size=4)
    data.prepare_data()
    data.setup("fit")
    pixels, labels, patches = next(iter(data.train_dataloader()))
    assert pixels.dtype.is_floating_point is False and pixels.shape == (4, 3, 64, 64)
    assert labels.shape == (4, 4, 4, len(LABELS) + 2) and patches.shape == (4, 8, 8)
    assert (labels[..., 0] > 0).any(), "the rendered clips have objects"
    rows = [json.loads(line) for line in (synthetic_data / "scenes.jsonl").open()]
    assert len(data.tensors["val"]) == 2 * sum(row["split"] == "val" for row in rows)
    # Labelled cells are where the decoded frames differ from the background (motion streaks aside).
    frames, cells = pixels.numpy().astype(int), labels.numpy()
    drawn = np.abs(frames - np.array(BACKGROUND)[None, :, None, None]).sum(1) > 60
    share = drawn.reshape(-1, 4, 16, 4, 16).mean((2, 4))
    assert (share[cells[..., 0] > 0] > 0.02).all(), "a labelled cell shows some of its object"
    assert share[cells[..., 0] > 0].mean() > share[cells[..., 0] == 0].mean() + 0.3


def test_a_missing_scenes_file_is_a_clear_error(tmp_path):
    from datamodules.records import RecordError

    with pytest.raises(RecordError, match="scenes.jsonl.*build the synthetic dataset"):
        SceneFramesDataModule(str(tmp_path)).prepare_data()


def test_an_interrupted_synthetic_build_is_refused(synthetic_data, tmp_path):
    import shutil

    from datamodules.shapes.dataset import SyntheticDatasetError

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    manifest = json.loads((data / "synth.json").read_text())
    (data / "synth.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(SyntheticDatasetError, match="last synth build was interrupted.*rerun it to finish"):
        SceneFramesDataModule(str(data)).prepare_data()
