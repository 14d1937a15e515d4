"""`AnswerabilityDataModule`: record files -> SFT examples, DPO pairs or prompts via the model's processor.

The processor (tokenizer, chat template, frame preprocessing) belongs to the model; the DataModule takes it
from the LightningModule at `setup` (attribute `processor`) or from its own `processor` argument. Collation is
in `collation.py`, the dataset, sampler and loader in `loading.py`.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from datamodules.collation import ChatCollator, Example
from datamodules.loading import (
    CLIP_CACHE_BYTES,
    BatchSplit,
    EpochSeededSampler,
    ExampleDataset,
    GenerationSampler,
    ResumableDataLoader,
    generation_order,
    split_batch,
)
from datamodules.mixing import mix_sizes
from datamodules.records import QARecord, RecordError, read_predictions, read_records

log = logging.getLogger(__name__)


class AnswerabilityDataModule(L.LightningDataModule):
    """Reads record files, mixes answerable and unanswerable records, yields SFT/DPO/generation batches.

    Stages: `fit` uses `train_file`/`val_file` with `objective`; `test`/`predict` use `test_file`/
    `predict_file` in generation mode. DPO's rejected responses come from each record's `rejected` field, or
    from a predictions file of `main.py predict` joined on `id` (never by row). A missing record file is an
    error; nothing is ever built in its place.
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str | None = "train.jsonl",
        val_file: str | None = "val.jsonl",
        test_file: str | None = "test.jsonl",
        predict_file: str | None = None,
        video_root: str | None = None,
        objective: Literal["sft", "dpo"] = "sft",
        unanswerable_fraction: float | None = None,
        max_train_samples: int | None = None,
        predict_answerable: bool | None = None,
        rejected_predictions: str | None = None,
        rejected_predictions_for: Literal["all", "unanswerable", "answerable"] = "unanswerable",
        num_frames: int = 4,
        turns_per_example: int = 1,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_length: int = 1024,
        num_workers: int = 0,
        clip_cache_bytes: int = CLIP_CACHE_BYTES,
        seed: int = 0,
        processor: Any = None,
    ):
        """
        Args:
            data_dir: folder of the record files (relative names below resolve inside it).
            train_file, val_file, test_file, predict_file: record files (JSONL) for each stage.
            video_root: root of the `video` paths; defaults to each record file's folder.
            objective: "sft" (prompt -> gold answer) or "dpo" (chosen gold vs rejected response).
            unanswerable_fraction: share of unanswerable records in the training mix (0 keeps answerable only,
                None keeps the files' mix); the larger side is subsampled, deterministically for `seed`. For
                DPO it is the share of the pairs kept: pairs whose rejected response is the gold one go first.
            max_train_samples: train on a random subset of this many examples of the (mixed) training set,
                the same for a given `seed` (as in Hugging Face's example scripts). An epoch then covers just
                these, and so does DPO's reference pass, which `limit_train_batches` would not shorten.
            predict_answerable: for `predict`, keep only answerable (True) or unanswerable (False) records.
            rejected_predictions: a `predictions.jsonl` (id, response; a path as given, not inside data_dir)
                whose responses are the rejected side of DPO pairs, for the records selected by
                `rejected_predictions_for`.
            num_frames: frames sampled uniformly over each clip.
            turns_per_example: for SFT training, pack up to this many questions about one clip into one
                multi-turn conversation (LLaVA-style: the clip is encoded once for several answers); 1 keeps
                one question per example. Validation, test and predict always ask one question per prompt.
            batch_size: training examples a device takes in one batch, at most; `batch_size` x the trainer's
                `accumulate_grad_batches` is the effective batch (one optimizer step's examples), kept at any
                world size: `fit` derives each device's batch and the accumulation from it (`split_batch`) and
                sets the trainer's `accumulate_grad_batches`. At world size 1 both stay as configured.
            eval_batch_size: validation, test and predict examples a batch, over all devices (each takes
                its share, rounded up).
            max_length: the longest prompt + response in tokens; longer prompts are errors.
            num_workers: DataLoader worker processes (persistent across epochs when more than 0).
            clip_cache_bytes: bytes of decoded frames each split's dataset keeps for later reads of the same
                clip, the least recently used dropped first (0 keeps none). The bound holds per process:
                every DataLoader worker has its own cache.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.datasets: dict[str, ExampleDataset] = {}
        self.skipped_pairs = 0
        self.batch_split: BatchSplit | None = None
        self._configured_accumulation: int | None = None

    # ------------------------------------------------------------------------------------------ files
    def _path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else Path(self.hparams.data_dir) / path

    def _missing_file_advice(self) -> str:
        """What the error for a missing record file suggests, after the name of the file's setting."""
        return "set it to null to go without it"

    def _read(self, name: str, key: str) -> tuple[list[QARecord], Path]:
        """The records of file `name` (the `key` setting); a missing file is one error naming the path."""
        path = self._path(name)
        if not path.is_file():
            raise RecordError(path, None, None, f"no such record file (data.init_args.{key}; "
                              f"{self._missing_file_advice()})")
        root = Path(self.hparams.video_root) if self.hparams.video_root else path.parent
        records, _ = read_records(path, root)
        return records, root

    def _mix(self, records: list[QARecord]) -> list[QARecord]:
        fraction = self.hparams.unanswerable_fraction
        if fraction is None:
            return records
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"unanswerable_fraction must be in [0, 1), got {fraction}")
        answerable = [r for r in records if r.answerable]
        unanswerable = [r for r in records if not r.answerable]
        if fraction == 0.0:
            return answerable
        rng = random.Random(self.hparams.seed)
        keep_answerable, keep_unanswerable = mix_sizes(len(answerable), len(unanswerable), fraction)
        if keep_answerable == len(answerable):  # the unanswerable side is subsampled (or drawn in full)
            unanswerable = rng.sample(unanswerable, keep_unanswerable)
        else:
            answerable = rng.sample(answerable, keep_answerable)
        mixed = answerable + unanswerable
        rng.shuffle(mixed)
        return mixed

    def _examples(
        self, name: str, key: str, mix: bool, pairs: bool, predictions: str | None = None
    ) -> list[Example]:
        records, root = self._read(name, key)
        rejected: dict[str, str] = {}
        if pairs:
            rejected = self._rejected_responses(records, self._path(name), predictions)
            # A pair whose rejected response is the gold one has no preference to learn. It is dropped before
            # mixing, so that `unanswerable_fraction` is the share of the pairs that are trained on.
            kept = [r for r in records if rejected[r.id].strip() != r.answer.strip()]
            skipped = len(records) - len(kept)
            if skipped:
                self.skipped_pairs += skipped
                log.warning("%s: skipped %d pairs whose rejected response is the chosen one", name, skipped)
            records = kept
        if mix:
            records = self._mix(records)
        if not records:
            steps = [f"unanswerable_fraction={self.hparams.unanswerable_fraction}"] if mix else []
            steps += ["dropping the pairs without a preference"] if pairs else []
            problem = f"no records left for {key} after {' and '.join(steps)}"
            raise RecordError(self._path(name), None, None, problem)
        path = str(self._path(name))
        return [Example(r, str(root / r.video), rejected.get(r.id), path) for r in records]

    def _subset(self, examples: list[Example], size: int) -> list[Example]:
        """A random subset of `size` examples, in the order they had (seeded; all when there are fewer)."""
        if size < 1:
            raise ValueError(f"max_train_samples must be at least 1, got {size}")
        if size >= len(examples):
            return examples
        kept = sorted(random.Random(self.hparams.seed).sample(range(len(examples)), size))
        return [examples[i] for i in kept]

    def _pack(self, examples: list[Example], turns: int) -> list[Example]:
        """Conversations of up to `turns` questions about one clip, in a seeded random order per clip."""
        by_clip: dict[str, list[Example]] = {}
        for example in examples:
            by_clip.setdefault(example.video_path, []).append(example)
        rng = random.Random(self.hparams.seed)
        packed = []
        for group in by_clip.values():
            rng.shuffle(group)
            for start in range(0, len(group), turns):
                first, *rest = group[start : start + turns]
                follow_ups = tuple(e.record for e in rest)
                packed.append(Example(first.record, first.video_path, None, first.record_file, follow_ups))
        return packed

    def _rejected_responses(self, records: list[QARecord], path: Path, source: str | None) -> dict[str, str]:
        rejected = {r.id: r.rejected for r in records if r.rejected is not None}
        if source:
            which = self.hparams.rejected_predictions_for
            covered = {
                r.id for r in records if which == "all" or (which == "unanswerable") == (not r.answerable)
            }
            predictions = {row["id"]: row["response"] for row in read_predictions(source, ("response",))}
            unknown = sorted(set(predictions) - covered)
            missing = sorted(covered - set(predictions))
            if missing:
                raise RecordError(
                    source,
                    None,
                    "id",
                    f"no prediction for record {missing[0]!r} of {path} "
                    f"({len(missing)} of its '{which}' records have none)",
                )
            if unknown:
                raise RecordError(
                    source,
                    None,
                    "id",
                    f"prediction {unknown[0]!r} matches no '{which}' record "
                    f"of {path} ({len(unknown)} such predictions)",
                )
            rejected.update({i: predictions[i] for i in covered})
        for record in records:
            if record.id not in rejected:
                raise RecordError(
                    path,
                    None,
                    "rejected",
                    f"record {record.id!r} has no rejected response for DPO "
                    "(set `rejected` or give rejected_predictions)",
                )
        return rejected

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None and self.trainer is not None:
            self.processor = getattr(self.trainer.lightning_module, "processor", None)
        if self.processor is None:
            raise ValueError("AnswerabilityDataModule needs the model's processor (from the LightningModule)")
        h = self.hparams
        pairs = h.objective == "dpo"
        if h.turns_per_example < 1 or (pairs and h.turns_per_example > 1):
            raise ValueError(
                f"turns_per_example must be 1 for DPO and at least 1 for SFT, got {h.turns_per_example}"
            )
        if stage in ("fit", None) and h.train_file:
            examples = self._examples(h.train_file, "train_file", True, pairs, h.rejected_predictions)
            if h.max_train_samples is not None:
                examples = self._subset(examples, h.max_train_samples)
            if h.turns_per_example > 1:
                examples = self._pack(examples, h.turns_per_example)
            self.datasets["train"] = self._dataset(examples)
            self._split_training_batch()
        if stage in ("fit", "validate", None) and h.val_file:
            examples = self._examples(h.val_file, "val_file", True, pairs)
            self.datasets["val"] = self._dataset(examples)
        if stage in ("test", None) and h.test_file:
            examples = self._examples(h.test_file, "test_file", False, False)
            self.datasets["test"] = self._dataset(examples)
        if stage == "predict":
            key = "predict_file" if h.predict_file else "test_file"
            examples = self._examples(h.predict_file or h.test_file, key, False, False)
            if h.predict_answerable is not None:
                examples = [e for e in examples if e.record.answerable == h.predict_answerable]
                if not examples:
                    raise RecordError(self._path(h.predict_file or h.test_file), None, "answerable",
                                      f"no record has answerable={str(h.predict_answerable).lower()} "
                                      "(data.init_args.predict_answerable)")
            self.datasets["predict"] = self._dataset(examples)

    def _dataset(self, examples: list[Example]) -> ExampleDataset:
        return ExampleDataset(examples, self.hparams.num_frames, self.hparams.clip_cache_bytes)

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _split_training_batch(self) -> None:
        """Derive the training batch of each device and the accumulation for the trainer's world size, from
        the effective batch the config gives (`batch_size` x the `accumulate_grad_batches` the trainer had
        when it first met this DataModule), and set the trainer's `accumulate_grad_batches`."""
        if self.trainer is None:
            self.batch_split = split_batch(self.hparams.batch_size, 1, 1)
            return
        if self._configured_accumulation is None:
            self._configured_accumulation = self.trainer.accumulate_grad_batches
        split = split_batch(self.hparams.batch_size, self._configured_accumulation, self._world_size())
        if split != self.batch_split:
            log.info("training batch: an effective batch of %d = %d devices x %d examples x %d accumulated",
                     split.effective, split.world_size, split.per_device, split.accumulation)
        self.batch_split = split
        self.trainer.accumulate_grad_batches = split.accumulation

    def _loader(self, split: str, mode: str, batch_size: int, shuffle: bool) -> DataLoader:
        """`batch_size`: the examples of a batch on this device. Generation (`mode` "generate": `test`,
        `predict`) takes the items in `generation_order` (prompts of alike lengths together; the outputs are
        written in the file's order) and, under DDP, splits them across ranks without the repeats that
        Lightning's `DistributedSampler` pads with, so that every item is scored once (ranks may then run one
        batch apart: safe outside `fit`, where the model is not wrapped in DDP)."""
        dataset = self.datasets[split]
        sampler = EpochSeededSampler(dataset, self.hparams.seed) if shuffle else None
        if mode == "generate":
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = GenerationSampler(dataset, generation_order(dataset.examples), world, rank)
        options: dict[str, Any] = {
            "batch_size": batch_size,
            "sampler": sampler,
            "num_workers": self.hparams.num_workers,
            "collate_fn": ChatCollator(self.processor, mode, self.hparams.max_length),
            "persistent_workers": self.hparams.num_workers > 0,
        }
        if split == "train":
            return ResumableDataLoader(dataset, processed=self._train_batches_processed, **options)
        return DataLoader(dataset, **options)

    def _train_batches_processed(self) -> int:
        """Batches of the current training epoch the trainer has processed (what a resumed run skips)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def _eval_batch_size(self) -> int:
        return math.ceil(self.hparams.eval_batch_size / self._world_size())

    def train_dataloader(self) -> DataLoader:
        if self.batch_split is None:
            self._split_training_batch()
        return self._loader("train", self.hparams.objective, self.batch_split.per_device, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.objective, self._eval_batch_size(), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", "generate", self._eval_batch_size(), False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", "generate", self._eval_batch_size(), False)

