"""Loading: the clip cache's bound in bytes over an epoch, and the split of the effective batch over devices
(each device's batch and the accumulation) for the shipped configs' values.

The clips are those of the 12-clip synthetic dataset of tests/conftest.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import datamodules.loading as loading
from datamodules.answerability import AnswerabilityDataModule
from datamodules.errors import user_error_message
from datamodules.loading import BatchSplit, BatchSplitError, ClipCache, split_batch
from datamodules.shapes.datamodule import ShapesDataModule
from datamodules.shapes.dataset import build_synthetic_dataset
from datamodules.video import Clip

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SEVEN_B = [c for c in CONFIGS if "_7b" in c.parent.name]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def clip_of(nbytes: int) -> Clip:
    return Clip(np.zeros((1, 1, nbytes // 3, 3), dtype=np.uint8), (0,), 1, None)


# ------------------------------------------------------------------------------------------ clip cache
def test_the_clip_cache_drops_the_least_recently_used_clip_first():
    cache = ClipCache(max_bytes=300)
    for path in "abc":
        cache.put(path, clip_of(99))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", clip_of(99))
    assert list(cache.clips) == ["c", "a", "d"] and cache.bytes == 297
    cache.put("e", clip_of(201))
    assert list(cache.clips) == ["d", "e"] and cache.bytes == 300
    cache.put("f", clip_of(303))
    assert cache.get("f") is None and cache.bytes == 300, "a clip larger than the bound is not kept"
    none = ClipCache(max_bytes=0)
    none.put("a", clip_of(3))
    assert none.get("a") is None and none.bytes == 0


def test_an_epoch_over_more_clips_than_fit_keeps_the_cache_under_its_bound(synthetic_data, processor,
                                                                          monkeypatch):
    """A bound of 3 clips and an epoch over 12: the cache's bytes (its clips' arrays) never pass the bound,
    and the questions that follow one about the same clip are served from it (one read per clip)."""
    reads, read_clip = [], loading.read_clip
    monkeypatch.setattr(loading, "read_clip", lambda path, n: reads.append(path) or read_clip(path, n))
    clip_bytes = 2 * 64 * 64 * 3  # 2 frames of 64 x 64 RGB
    bound = 3 * clip_bytes + clip_bytes // 2
    data = AnswerabilityDataModule(str(synthetic_data), num_frames=2, unanswerable_fraction=None,
                                   clip_cache_bytes=bound, processor=processor)
    data.setup("fit")
    train = data.datasets["train"]
    clips = {e.video_path for e in train.examples}
    assert len(clips) * clip_bytes > bound and len(train) > len(clips)

    def epoch(order: list[int]) -> None:
        for index in order:
            example, clip = train[index]
            assert clip.frames.nbytes == clip_bytes
            assert train.cache.bytes == sum(c.frames.nbytes for c in train.cache.clips.values()) <= bound
            assert example.video_path in train.cache.clips

    epoch(sorted(range(len(train)), key=lambda i: train.examples[i].video_path))
    assert sorted(reads) == sorted(clips), "one read per clip: its other questions hit the cache"
    assert len(train.cache.clips) == 3
    reads.clear()
    epoch(list(np.random.default_rng(0).permutation(len(train))))
    assert len(reads) < len(train), "a shuffled epoch still finds the clips it read last"


def test_the_demo_world_fits_the_default_clip_cache():
    """The shipped configs on the synthetic world keep every clip of the world (all splits) within the default
    bound, as before the bound: no clip is decoded twice."""
    world_clips = inspect.signature(ShapesDataModule.__init__).parameters["synthetic_videos"].default
    frame_size = inspect.signature(build_synthetic_dataset).parameters["size"].default
    checked = 0
    for config in CONFIGS:
        data = yaml.safe_load(config.read_text()).get("data", {})
        if data.get("class_path") != "datamodules.shapes.datamodule.ShapesDataModule":
            continue
        settings = data["init_args"]
        videos = settings.get("synthetic_videos", world_clips)
        bound = settings.get("clip_cache_bytes", loading.CLIP_CACHE_BYTES)
        assert videos * settings["num_frames"] * frame_size * frame_size * 3 <= bound, config.name
        checked += 1
    assert checked >= 5  # shapes base, sft, dpo; smollm2_video sft, dpo


# ------------------------------------------------------------------------------------ the batch split
@pytest.mark.parametrize("config", SEVEN_B, ids=lambda c: f"{c.parent.name}/{c.stem}")
def test_the_7b_configs_effective_batch_splits_over_1_2_and_8_devices_not_3(config):
    """An effective batch of 128 (the paper's) at every world size that divides it, each device taking at most
    the config's batch: at world size 1 the config as written, on 2 and 8 devices fewer batches accumulated
    (8 GPUs took global batches of 2 or 4 before, which 8 does not divide); checkpoints at validation still
    fall between optimizer steps. 3 devices: no split, one error naming both settings."""
    parsed = yaml.safe_load(config.read_text())
    batch = parsed["data"]["init_args"]["batch_size"]
    trainer = parsed["trainer"]
    accumulation = trainer["accumulate_grad_batches"]
    assert batch * accumulation == 128
    assert split_batch(batch, accumulation, 1) == BatchSplit(batch, accumulation, 1)
    for world in (2, 8):
        split = split_batch(batch, accumulation, world)
        assert split.effective == 128 and split.world_size == world
        assert split.per_device == min(batch, 128 // world)
        assert trainer["val_check_interval"] % split.accumulation == 0
    with pytest.raises(BatchSplitError) as error:
        split_batch(batch, accumulation, 3)
    message = user_error_message(error.value)
    assert "data.init_args.batch_size" in message and "trainer.accumulate_grad_batches" in message
    assert "3 devices" in message and "\n" not in message


def test_the_demo_configs_batches_are_unchanged_on_one_device():
    for config in CONFIGS:
        parsed = yaml.safe_load(config.read_text())
        batch = parsed.get("data", {}).get("init_args", {}).get("batch_size")
        if batch is None:
            continue
        accumulation = parsed["trainer"].get("accumulate_grad_batches", 1)
        assert split_batch(batch, accumulation, 1) == BatchSplit(batch, accumulation, 1), config.name


def test_fit_setup_sets_the_trainers_accumulation_from_the_configured_one(synthetic_data, processor):
    """On 8 devices, batch_size 8 x 16 accumulated: each device's loader takes 8, the trainer accumulates 2,
    and a second setup (another `fit` on the same trainer) derives it from the configured 16 again."""
    data = AnswerabilityDataModule(str(synthetic_data), num_frames=2, batch_size=8, eval_batch_size=12,
                                   processor=processor)
    data.trainer = SimpleNamespace(world_size=8, accumulate_grad_batches=16, global_rank=0)
    for _ in range(2):
        data.setup("fit")
        assert data.trainer.accumulate_grad_batches == 2
        assert data.train_dataloader().batch_size == 8
    assert data.val_dataloader().batch_size == 2, "eval batches: 12 over 8 devices, rounded up"


def test_a_split_takes_the_largest_batch_a_device_allows():
    assert split_batch(4, 1, 2) == BatchSplit(2, 1, 2), "batch 4 on 2 devices: 2 + 2, as before"
    assert split_batch(1, 4, 2) == BatchSplit(1, 2, 2), "a batch smaller than the world size accumulates"
    assert split_batch(3, 4, 4) == BatchSplit(3, 1, 4)
    assert split_batch(4, 3, 2) == BatchSplit(3, 2, 2), "6 a device: 3 x 2, not 4 (no split of 6)"
    with pytest.raises(BatchSplitError, match="batch_size must be at least 1"):
        split_batch(0, 1, 1)


# ------------------------------------------------------------------------------ generation order
def test_generation_order_takes_the_largest_frames_first_and_each_clips_questions_together(tmp_path):
    """Clips by decreasing frame area (read from the file's header), each clip's questions together, ties in
    the file's order; the sampler gives ranks interleaved shares."""
    from datamodules.collation import Example
    from datamodules.loading import GenerationSampler, generation_order
    from datamodules.records import QARecord
    from datamodules.shapes.world import write_clip

    sides = {"a": 32, "b": 64, "c": 32, "d": 48}
    for name, side in sides.items():
        write_clip(np.zeros((4, side, side, 3), dtype=np.uint8), tmp_path / f"{name}.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    files = ["a", "b", "a", "c", "broken", "d", "b", "c"]
    examples = [Example(QARecord(str(i), f"{f}.mp4", "q?", "x", True), str(tmp_path / f"{f}.mp4"))
                for i, f in enumerate(files)]
    order = generation_order(examples)
    # b (64 px), d (48 px), then a and c (32 px, in the file's order), then the file that cannot be opened
    # (read_clip reports it when its batch comes)
    assert order == [1, 6, 5, 0, 2, 3, 7, 4]
    dataset = list(range(len(order)))
    assert list(GenerationSampler(dataset, order)) == order
    shares = [list(GenerationSampler(dataset, order, num_replicas=3, rank=r)) for r in range(3)]
    assert shares == [order[0::3], order[1::3], order[2::3]]
    assert sorted(sum(shares, [])) == dataset, "every item once across ranks"
    with pytest.raises(ValueError, match="each index of the dataset once"):
        GenerationSampler(dataset, order[:-1])


def test_test_and_predict_loaders_take_the_generation_order(synthetic_data, processor):
    """The DataModule's `test` and `predict` loaders batch in `generation_order`, which on the synthetic
    world (the demo's) is the file's order; `fit`'s validation does not use it."""
    from datamodules.loading import GenerationSampler

    data = ShapesDataModule(data_dir=str(synthetic_data), processor=processor, num_frames=2,
                            eval_batch_size=4, predict_file="test.jsonl")
    data.setup("test")
    data.setup("predict")
    data.setup("validate")
    for loader in (data.test_dataloader(), data.predict_dataloader()):
        assert isinstance(loader.sampler, GenerationSampler)
        examples = loader.dataset.examples
        assert list(loader.sampler) == loading.generation_order(examples)
        # the synthetic world's clips are all of one size and its files list a clip's questions together
        assert list(loader.sampler) == list(range(len(examples)))
    assert not isinstance(data.val_dataloader().sampler, GenerationSampler)
