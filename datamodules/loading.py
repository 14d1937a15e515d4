"""Loading: the dataset of examples with their decoded clips (kept in a cache bounded by bytes), the seeded
sampler and the resumable loader."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler

from datamodules.collation import Example, pair_digest
from datamodules.errors import UserError
from datamodules.video import Clip, frame_size, read_clip

# The default bound of a dataset's clip cache, per process: 1 GiB holds the whole demo world (3,000 clips of
# 2-4 frames of 64 x 64: 74-147 MB) but only 12-48 real 32-frame clips (22-88 MB each at 360p-720p).
CLIP_CACHE_BYTES = 2**30


class ClipCache:
    """Decoded clips by path, at most `max_bytes` of frames (their arrays' `nbytes`), the least recently
    used dropped first; a clip larger than the bound is not kept. `max_bytes` 0 keeps nothing."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"clip_cache_bytes must be at least 0, got {max_bytes}")
        self.max_bytes, self.bytes = max_bytes, 0
        self.clips: OrderedDict[str, Clip] = OrderedDict()

    def get(self, path: str) -> Clip | None:
        clip = self.clips.get(path)
        if clip is not None:
            self.clips.move_to_end(path)
        return clip

    def put(self, path: str, clip: Clip) -> None:
        size = clip.frames.nbytes
        if size > self.max_bytes or path in self.clips:
            return
        while self.bytes + size > self.max_bytes:
            _, dropped = self.clips.popitem(last=False)
            self.bytes -= dropped.frames.nbytes
        self.clips[path] = clip
        self.bytes += size


class ExampleDataset(Dataset):
    """Examples with their decoded clips, which a `ClipCache` of `cache_bytes` keeps for the examples that
    follow (several questions about one clip, later epochs). The cache belongs to the process: each
    DataLoader worker holds its own copy of the dataset, so its bound holds per worker (and per split)."""

    def __init__(self, examples: Sequence[Example], num_frames: int, cache_bytes: int = CLIP_CACHE_BYTES):
        self.examples = list(examples)
        self.num_frames = num_frames
        self.cache = ClipCache(cache_bytes)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Example, Clip]:
        example = self.examples[index]
        clip = self.cache.get(example.video_path)
        if clip is None:
            clip = read_clip(example.video_path, self.num_frames)
            self.cache.put(example.video_path, clip)
        return example, clip

    def pair_key(self, index: int) -> tuple[str, str]:
        """Item `index`'s DPO pair as the reference cache keys it, (record id, `pair_digest`), read without
        decoding its clip."""
        example = self.examples[index]
        return example.record.id, pair_digest(example)


class BatchSplitError(UserError, ValueError):
    """An effective batch that no number of examples per device splits evenly over the devices."""


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's examples are spread: `per_device` examples a batch on each of `world_size`
    devices, `accumulation` batches accumulated."""

    per_device: int
    accumulation: int
    world_size: int

    @property
    def effective(self) -> int:
        return self.per_device * self.accumulation * self.world_size


def split_batch(batch_size: int, accumulation: int, world_size: int) -> BatchSplit:
    """The split of the effective batch `batch_size x accumulation` (the configured batch and the trainer's
    `accumulate_grad_batches`) over `world_size` devices, with the fewest batches accumulated.

    A device takes at most `batch_size` examples a batch (what the config sized for one device's memory): the
    largest divisor of its share of the effective batch that is not larger. At world size 1 that is the
    configuration as written. An effective batch that the world size does not divide has no split: an error
    naming both settings.
    """
    for name, value in (("data.init_args.batch_size", batch_size),
                        ("trainer.accumulate_grad_batches", accumulation), ("the world size", world_size)):
        if value < 1:
            raise BatchSplitError(f"{name} must be at least 1, got {value}")
    effective = batch_size * accumulation
    if effective % world_size:
        raise BatchSplitError(
            f"the effective batch (data.init_args.batch_size {batch_size} x trainer.accumulate_grad_batches "
            f"{accumulation} = {effective}) does not split evenly over {world_size} devices: make it a "
            f"multiple of {world_size}, or use a number of devices that divides it"
        )
    share = effective // world_size
    per_device = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return BatchSplit(per_device, share // per_device, world_size)


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


def generation_order(examples: Sequence[Example]) -> list[int]:
    """The order in which generation (`test`, `predict`) takes the examples, so that a batch holds prompts of
    alike lengths: clips by decreasing frame area (the video tokens of a model that sizes them by the frame,
    such as Qwen2-VL's, and most of a prompt; read from each file's header by `frame_size`, without
    decoding), each clip's questions together (its frames are decoded once and the clip cache keeps them for
    the next one), otherwise the file's order. The largest prompts come first, so that a batch too large for
    the memory fails at once. Questions are not sorted by their length: that would split a clip's questions
    across batches, and they pad 0.1% of a 32-frame prompt (docs/design.md)."""
    sizes: dict[str, tuple[int, int] | None] = {}
    first: dict[str, int] = {}
    for index, example in enumerate(examples):
        if example.video_path not in sizes:
            sizes[example.video_path] = frame_size(example.video_path)
            first[example.video_path] = index

    def key(index: int) -> tuple[int, int, int]:
        path = examples[index].video_path
        height, width = sizes[path] or (0, 0)
        return -height * width, first[path], index

    return sorted(range(len(examples)), key=key)


class GenerationSampler(UnrepeatedDistributedSampler):
    """The indices of `order` (`generation_order`) that fall to this rank, every item once across ranks:
    rank r takes positions r, r + world size, ... of the order, so that every rank's batches stay sorted. At
    world size 1, the whole order. A `DistributedSampler`, so that Lightning keeps it under DDP."""

    def __init__(self, dataset: Dataset, order: Sequence[int], num_replicas: int = 1, rank: int = 0):
        if sorted(order) != list(range(len(dataset))):
            raise ValueError("a generation order must hold each index of the dataset once")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.order = list(order)

    def __iter__(self):
        return iter(self.order[self.rank :: self.num_replicas])
