"""Frames of the synthetic world with dense labels, for pretraining the tiny model's vision tower.

Real video-LLMs start from a pretrained vision tower; the embedded tiny one gets its tower from this data:
each frame is split into the grid of video tokens the video-LLM will see, and every cell is labelled with the
object that covers it (shape, colour, size, motion, whether it touches another object) and that object's
exact centre.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.records import RecordError
from datamodules.shapes.dataset import check_synthetic_folder
from datamodules.shapes.world import COLOURS, MOTIONS, SHAPES, SIZES, Scene, shape_mask
from datamodules.video import read_video

# Label heads: name -> number of classes (class 0 is "no object in this cell").
LABELS = {
    "shape": len(SHAPES) + 1,
    "colour": len(COLOURS) + 1,
    "size": len(SIZES) + 1,
    "motion": len(MOTIONS) + 1,
    "contact": 3,
}
LABEL_VALUES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "motion": MOTIONS,
    "contact": ("touching", "apart"),  # "apart" is no word of the world's: the projector maps it to none
}


def object_labels(scene: Scene, i: int) -> list[int]:
    """The class ids (1-based, as `LABELS` orders them) of object i of `scene`."""
    obj = scene.objects[i]
    values = {name: getattr(obj, name) for name in ("shape", "colour", "size", "motion")}
    values["contact"] = "touching" if scene.partners(i) else "apart"
    return [LABEL_VALUES[name].index(values[name]) + 1 for name in LABELS]


def _object_covers(scene: Scene, frame_index: int, grid: int):
    """(object index, its centre in pixels, the (grid, grid) share of each cell it covers) per object of a
    frame."""
    world = scene.world
    t = frame_index / max(world.frames - 1, 1)
    cell = world.size // grid
    for i, obj in enumerate(scene.objects):
        cx, cy = obj.position(t, world.travel)
        mask = shape_mask(obj.shape, cx, cy, world.radius[obj.size], world.size)
        cover = mask[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).mean(axis=(1, 3))
        yield i, (cx, cy), cover


def cell_labels(scene: Scene, frame_index: int, grid: int, min_cover: float = 0.2) -> np.ndarray:
    """(grid, grid, len(LABELS) + 2) labels of one frame: a class id per head of `LABELS`, then the object's
    centre (x, y) in frame coordinates scaled to [-1, 1] (-1: left / top edge, 1: right / bottom edge).

    A cell belongs to the object that covers most of it, if that object covers at least `min_cover` of it
    (less is too little of a shape to tell what shape it is) or has its centre there (so a small star, which
    fills under a fifth of any cell, still has one); it gets all of that object's labels, so each video token
    describes one whole object or nothing. Cells that no object covers are class 0, centre 0.
    """
    labels = np.zeros((grid, grid, len(LABELS) + 2), dtype=np.float32)
    best = np.zeros((grid, grid), dtype=np.float32)
    cell = scene.world.size // grid
    for i, (cx, cy), cover in _object_covers(scene, frame_index, grid):
        centre = np.zeros((grid, grid), dtype=bool)
        centre[min(grid - 1, int(cy // cell)), min(grid - 1, int(cx // cell))] = True
        take = (cover > best) & ((cover >= min_cover) | centre)
        best = np.where(take, cover, best)
        centre_xy = [2 * cx / scene.world.size - 1, 2 * cy / scene.world.size - 1]
        labels[take] = [*object_labels(scene, i), *centre_xy]
    return labels


def patch_shapes(scene: Scene, frame_index: int, grid: int, min_cover: float = 0.3) -> np.ndarray:
    """(grid, grid) shape class ids of one frame at the tower's patch grid (0: no object).

    A patch is labelled with the shape that covers most of it, if at least `min_cover` of it: dense targets
    that teach the tower's patches local shape evidence, which the cells of `cell_labels` then pool.
    """
    labels = np.zeros((grid, grid), dtype=np.int64)
    best = np.zeros((grid, grid), dtype=np.float32)
    for i, _, cover in _object_covers(scene, frame_index, grid):
        take = (cover > best) & (cover >= min_cover)
        best = np.where(take, cover, best)
        labels[take] = SHAPES.index(scene.objects[i].shape) + 1
    return labels


class SceneFramesDataModule(L.LightningDataModule):
    """Decoded frames of the synthetic clips (train/val splits of `scenes.jsonl`): batches of (uint8 pixels,
    `cell_labels` at the video-token grid, `patch_shapes` at the tower's patch grid, twice as fine)."""

    def __init__(
        self,
        data_dir: str = "outputs/shapes/data",
        frames_per_clip: int = 8,
        grid: int = 4,
        batch_size: int = 128,
        max_clips: int | None = None,
    ):
        """
        Args:
            data_dir: the synthetic dataset folder (with `scenes.jsonl` and `videos/`).
            frames_per_clip: frames decoded per clip, uniformly over the clip.
            grid: cells per side; must equal the video-LLM's token grid (image_size / patch_size / 2, as
                LLaVA-NeXT-Video pools patches 2 x 2).
            batch_size: frames per batch.
            max_clips: use at most this many training clips (for quick runs).
        """
        super().__init__()
        self.save_hyperparameters()
        self.tensors: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        """Check that `data_dir` holds a finished build of the synthetic world (it builds none)."""
        path = Path(self.hparams.data_dir) / "scenes.jsonl"
        if not path.exists():
            raise RecordError(
                path,
                None,
                None,
                "no scenes file: build the synthetic dataset first (python -m datamodules synth --out DIR)",
            )
        check_synthetic_folder(self.hparams.data_dir)

    def _load(self, split: str, max_clips: int | None) -> TensorDataset:
        root = Path(self.hparams.data_dir)
        frames, labels, patches = [], [], []
        with (root / "scenes.jsonl").open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        rows = [row for row in rows if row["split"] == split][:max_clips]
        for row in rows:
            scene = Scene.from_dict(row["scene"])
            count = self.hparams.frames_per_clip
            clip = read_video(root / row["video"], count)
            indices = np.linspace(0, scene.world.frames - 1, count).round().astype(int)
            frames.append(clip)
            labels.append(np.stack([cell_labels(scene, int(k), self.hparams.grid) for k in indices]))
            patches.append(np.stack([patch_shapes(scene, int(k), 2 * self.hparams.grid) for k in indices]))
        pixels = torch.from_numpy(np.concatenate(frames)).permute(0, 3, 1, 2).contiguous()  # uint8 (N,3,H,W)
        return TensorDataset(
            pixels, torch.from_numpy(np.concatenate(labels)), torch.from_numpy(np.concatenate(patches))
        )

    def setup(self, stage: str | None = None) -> None:
        if "train" not in self.tensors:
            self.tensors["train"] = self._load("train", self.hparams.max_clips)
            self.tensors["val"] = self._load("val", None)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.tensors["train"], batch_size=self.hparams.batch_size, shuffle=True, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.tensors["val"], batch_size=512)
