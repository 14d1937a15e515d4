"""Loading: the dataset of examples with their decoded clips, the seeded sampler and the resumable loader."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from datamodules.collation import Example
from datamodules.video import Clip, read_clip


class ExampleDataset(Dataset):
    """Examples with their decoded clips, kept in memory after the first read (clips are small)."""

    def __init__(self, examples: Sequence[Example], num_frames: int, cache_frames: bool = True):
        self.examples = list(examples)
        self.num_frames = num_frames
        self.cache: dict[str, Clip] | None = {} if cache_frames else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Example, Clip]:
        example = self.examples[index]
        if self.cache is not None and example.video_path in self.cache:
            return example, self.cache[example.video_path]
        clip = read_clip(example.video_path, self.num_frames)
        if self.cache is not None:
            self.cache[example.video_path] = clip
        return example, clip


class EpochSeededSampler(RandomSampler):
    """A shuffling sampler whose order is a function of (seed, epoch) alone.

    Lightning calls `set_epoch` before each epoch, so a resumed run sees the batches of an uninterrupted one
    (a plain `RandomSampler` draws from the global RNG, whose state a resumed run does not share); mid-epoch,
    `ResumableDataLoader` then skips the batches already trained on. Under DDP Lightning swaps it for a
    `DistributedSampler`, seeded likewise.
    """

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that a run resumed from a mid-epoch checkpoint continues where it stopped.

    Lightning's protocol for resumable loaders (`state_dict` / `load_state_dict`, kept in the checkpoint): the
    state is the number of batches of the current epoch the trainer had processed (`processed`, read through
    the `processed` callable when the checkpoint is written), and the first epoch iterated after
    `load_state_dict` skips that many batches of its sampler's order, without loading them. So the sampler's
    order must be a function of the epoch (`EpochSeededSampler`, or Lightning's `DistributedSampler` under
    DDP); without this a resumed epoch starts again from its first batch and never reaches its last ones.
    """

    def __init__(self, *args: Any, processed: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.processed = processed
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches": int(self.processed()) if self.processed is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches", 0))

    @property
    def _index_sampler(self):
        # torch's iterators draw their batches of indices from here (and may keep the object across epochs,
        # with persistent workers), so the skip is read from the loader each time an epoch starts.
        return _SkipFirst(super()._index_sampler, self)


class _SkipFirst:
    """`inner`'s indices, less the first `loader._skip` items of the next pass (then the skip is spent)."""

    def __init__(self, inner: Any, loader: ResumableDataLoader):
        self.inner, self.loader = inner, loader

    def __iter__(self):
        skip, self.loader._skip = self.loader._skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)
