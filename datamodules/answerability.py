"""`AnswerabilityDataModule`: record files -> SFT examples, DPO pairs or prompts via the model's processor.

The processor (tokenizer, chat template, frame preprocessing) belongs to the model; the DataModule takes it
from the LightningModule at `setup` (attribute `processor`) or from its own `processor` argument.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler

from datamodules.records import REFUSAL_OPENING, QARecord, RecordError, read_predictions, read_records
from datamodules.shapes.dataset import check_synthetic_folder
from datamodules.video import Clip, read_clip

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# What each position of a DPO pair row ([prompt][chosen][rejected], left-padded) holds: `pair_segments`.
SEGMENT_PAD, SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED = 0, 1, 2, 3
# Processor outputs with one value per token, which a pair row extends over its rejected response.
PER_TOKEN_KEYS = {"input_ids": None, "attention_mask": 1, "labels": None, "mm_token_type_ids": 0,
                  "token_type_ids": 0}


@dataclass(frozen=True)
class Example:
    """One item for the collator: a record and, for DPO, the rejected response it is paired with.

    `follow_ups` are further records about the same clip, asked as later turns of one conversation (SFT only).
    """

    record: QARecord
    video_path: str
    rejected: str | None = None
    record_file: str = "<records>"
    follow_ups: tuple[QARecord, ...] = ()


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


class RecordBatch:
    """A batch's records, in order: iterable, indexable and sized like a list, but no `Sequence`, so that
    Lightning's `apply_to_collection` (which precision plugins such as FSDP's run over each batch) leaves it
    whole instead of rebuilding each `QARecord` (a frozen dataclass, which it cannot)."""

    __slots__ = ("records",)

    def __init__(self, records):
        self.records = tuple(records)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __eq__(self, other) -> bool:
        return list(self.records) == list(other) if isinstance(other, (RecordBatch, list, tuple)) else False

    def __repr__(self) -> str:
        return f"RecordBatch({list(self.records)!r})"


class ChatCollator:
    """Turns (example, clip) pairs into model inputs with the processor's chat template (a clip: a `Clip`,
    whose frame rate and frame indices reach the processor, or a bare (T, H, W, 3) frame array).

    `mode`: "sft" (prompt + gold answer, labels on the answer only), "dpo" (one row per pair, see `_pairs`),
    "generate" (prompt only, plus prompt + refusal opening for the refusal likelihood).
    A prompt longer than `max_length` is an error, never truncated (it would cut through video tokens).

    Every response is labelled up to and including the tokenizer's end-of-turn token (`eos_token`: `</s>`
    for the Llama/Vicuna families, `<|im_end|>` for ChatML ones), so that training teaches the model to stop.
    Templates that close the assistant turn with it already (ChatML) are used as they are; for those that do
    not (the llava-hf Vicuna templates render the turn as `text + ' '`), the token is appended to the
    response text before rendering, as the original LLaVA conversation format (`ASSISTANT: text</s>`) has it.
    """

    # Conversations whose text and response spans are kept, so later epochs skip the chat template (each
    # DataLoader worker keeps its own; with `persistent_workers=False` it starts empty every epoch).
    CACHE_SIZE = 100_000

    def __init__(self, processor: Any, mode: Literal["sft", "dpo", "generate"], max_length: int = 1024):
        self.processor, self.mode, self.max_length = processor, mode, max_length
        self.tokenizer = processor.tokenizer
        self._spans: dict[tuple, tuple[str, int, tuple[tuple[int, int], ...]]] = {}
        self._end_of_turn: str | None = None

    @staticmethod
    def _conversation(turns: Sequence[tuple[str, str | None]], end: str = "") -> list[dict]:
        """Chat messages for (question, response) turns; the clip comes with the first question; `end` is
        appended to every response."""
        messages: list[dict] = []
        for index, (question, response) in enumerate(turns):
            content = [{"type": "video"}] if index == 0 else []
            messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
            if response is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": response + end}]})
        return messages

    @property
    def end_of_turn(self) -> str:
        """What the collator appends to each response: the tokenizer's `eos_token` when the chat template does
        not put it right after the response (whitespace aside), else nothing."""
        if self._end_of_turn is None:
            eos = self.tokenizer.eos_token
            marker = "RESPONSE_END_PROBE"
            text = self.processor.apply_chat_template(
                self._conversation([("question", marker)]), add_generation_prompt=False, tokenize=False
            )
            after = text[text.index(marker) + len(marker) :].lstrip()
            self._end_of_turn = "" if not eos or after.startswith(eos) else eos
        return self._end_of_turn

    def prompt(self, question: str) -> str:
        return self.processor.apply_chat_template(
            self._conversation([(question, None)]), add_generation_prompt=True, tokenize=False
        )

    def full_text(self, question: str, response: str) -> str:
        return self._chat([(question, response)])

    def _chat(self, turns: Sequence[tuple[str, str | None]], generation_prompt: bool = False) -> str:
        messages = self._conversation(turns, self.end_of_turn)
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
        return text if generation_prompt else text.rstrip()

    def _encode(self, texts: list[str], videos: list[Clip | np.ndarray]) -> dict[str, torch.Tensor]:
        """The processor's batch; clips (not bare frame arrays) also give it their `video_metadata`."""
        frames = [video.frames if isinstance(video, Clip) else video for video in videos]
        timing = {}
        if all(isinstance(video, Clip) for video in videos):
            timing["video_metadata"] = [video.metadata() for video in videos]
        return dict(self.processor(text=texts, videos=frames, return_tensors="pt", padding=True, **timing))

    def _response_spans(self, conversations: list[tuple[tuple[str, str | None], ...]]) -> list[tuple]:
        """For each conversation: (its text, its token count, the (start, end) token span of each response).

        Spans come from the token counts of the text up to each turn's question (with the generation prompt)
        and up to its response, which must tokenize as a prefix of the whole conversation's tokens (checked:
        a tokenizer that merges tokens across the prompt's end would misplace the labels). Conversations not
        seen before are tokenized together in one call; results are kept, so later epochs skip the template.
        """
        new = list(dict.fromkeys(turns for turns in conversations if turns not in self._spans))
        texts = []
        for turns in new:
            texts.append(self._chat(turns))
            for turn in range(len(turns)):
                texts.append(self._chat([*turns[:turn], (turns[turn][0], None)], generation_prompt=True))
                texts.append(self._chat(turns[: turn + 1]))
        encoded = self.tokenizer(texts)["input_ids"] if texts else []
        if len(self._spans) + len(new) > self.CACHE_SIZE:
            self._spans.clear()
        at = 0
        for turns in new:
            whole, prefixes = encoded[at], encoded[at + 1 : at + 1 + 2 * len(turns)]
            for number, prefix in enumerate(prefixes, start=1):
                if whole[: len(prefix)] != prefix:
                    name, part, conversation = type(self.tokenizer).__name__, texts[at + number], texts[at]
                    raise ValueError(
                        f"{name}: the chat text {part[-40:]!r} does not tokenize as a prefix of its "
                        f"conversation {conversation[:200]!r}, so the response labels would be misplaced; "
                        "the chat template must end a prompt (and a response) where the tokenizer does not "
                        "merge across"
                    )
            counts = [len(ids) for ids in (whole, *prefixes)]
            self._spans[turns] = (texts[at], counts[0], tuple(zip(counts[1::2], counts[2::2], strict=True)))
            at += len(counts)
        return [self._spans[turns] for turns in conversations]

    def _labelled(
        self, examples: list[Example], responses: list[str], videos: list[Clip | np.ndarray]
    ) -> dict[str, Any]:
        """Encode each example's conversation; labels on its responses only.

        The first turn's response is `responses[i]`; an example's `follow_ups` add turns with gold answers.
        A response's span is found from text-only token counts of the conversation up to it, shifted by the
        number of tokens the processor adds when it expands the clip into video tokens (the clip is in the
        first turn, so every span moves by the same amount): the clip is processed once per batch.
        """
        spans = self._response_spans(
            [
                ((e.record.question, r), *((f.question, f.answer) for f in e.follow_ups))
                for e, r in zip(examples, responses, strict=True)
            ]
        )
        batch = self._encode([text for text, _, _ in spans], videos)
        attention = batch["attention_mask"]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        prompt_lengths = []
        for row, (_, text_length, turn_spans) in enumerate(spans):
            length = int(attention[row].sum())
            expansion = length - text_length
            padding = attention.shape[1] - length  # left padding
            for start, end in turn_spans:
                span = slice(padding + expansion + start, padding + expansion + end)
                labels[row, span] = batch["input_ids"][row, span]
            prompt_lengths.append(turn_spans[0][0] + expansion)
        self._check_length(torch.tensor(prompt_lengths), examples)
        batch["labels"] = labels
        return batch

    def _pairs(self, examples: list[Example], videos: list[Clip | np.ndarray]) -> dict[str, Any]:
        """One row per pair: [prompt with its video tokens][chosen response][rejected response], left-padded.

        The clip and prompt are encoded once per pair. `labels` hold both responses' tokens; `pair_segments`
        marks each position `SEGMENT_PAD`, `_PROMPT`, `_CHOSEN` or `_REJECTED`, from which the model step
        builds the attention mask (rejected tokens do not see chosen ones) and positions (the rejected
        response's restart after the prompt); `losses.pair_logps` then scores both responses as the rows
        [prompt][chosen] and [prompt][rejected] would be. `pair_digests` identify each pair's content (its
        clip's path, tokens and segments), so cached reference log-probabilities of a changed pair are
        never reused.
        """
        batch = self._labelled(examples, [e.record.answer for e in examples], videos)
        spans = self._response_spans([((e.record.question, e.rejected or ""),) for e in examples])
        encoded = self.tokenizer([text for text, _, _ in spans])["input_ids"]
        rejected = [ids[start:end] for ids, (_, _, ((start, end),)) in zip(encoded, spans, strict=True)]
        per_token = {k: v for k, v in batch.items() if k in PER_TOKEN_KEYS}
        rows, width = batch["input_ids"].shape
        for key, value in batch.items():
            if key not in per_token and torch.is_tensor(value) and tuple(value.shape) == (rows, width):
                raise ValueError(f"processor output {key!r} has one value per token; DPO pair rows cannot "
                                 "extend it over the rejected response")
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        packed_width = max(n + len(r) for n, r in zip(lengths, rejected, strict=True))
        pad = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        packed = {
            k: torch.full((rows, packed_width), pad.get(k, 0), dtype=v.dtype) for k, v in per_token.items()
        }
        segments = torch.full((rows, packed_width), SEGMENT_PAD, dtype=torch.long)
        digests = []
        for row, (length, tokens) in enumerate(zip(lengths, rejected, strict=True)):
            start, middle = packed_width - length - len(tokens), packed_width - len(tokens)
            ids = torch.tensor(tokens, dtype=batch["input_ids"].dtype)
            for key, value in per_token.items():
                packed[key][row, start:middle] = value[row, width - length :]
                fill = PER_TOKEN_KEYS[key]
                packed[key][row, middle:] = ids if fill is None else fill
            chosen = (packed["labels"][row, start:middle] != IGNORE_INDEX).nonzero().flatten()
            prompt_end = start + int(chosen[0])
            segments[row, start:prompt_end] = SEGMENT_PROMPT
            segments[row, prompt_end:middle] = SEGMENT_CHOSEN
            segments[row, middle:] = SEGMENT_REJECTED
            content = [examples[row].video_path, packed["input_ids"][row, start:].tolist(),
                       segments[row, start:].tolist()]
            digests.append(hashlib.sha1(json.dumps(content).encode()).hexdigest()[:20])
        batch.update(packed)
        batch["pair_segments"] = segments
        batch["pair_digests"] = digests
        return batch

    def _check_length(self, lengths: torch.Tensor, examples: list[Example]) -> None:
        for example, length in zip(examples, lengths.tolist(), strict=True):
            if length > self.max_length:
                raise RecordError(
                    example.record_file,
                    None,
                    "question",
                    f"record {example.record.id!r}: the prompt with its video tokens is {length} tokens, "
                    f"over max_length={self.max_length}; it is not truncated (that would cut video tokens): "
                    "raise max_length or use fewer frames",
                )

    def __call__(self, items: list[tuple[Example, Clip | np.ndarray]]) -> dict[str, Any]:
        examples = [example for example, _ in items]
        videos = [video for _, video in items]
        ids = [e.record.id for e in examples]
        if self.mode == "sft":
            batch = self._labelled(examples, [e.record.answer for e in examples], videos)
        elif self.mode == "dpo":
            batch = self._pairs(examples, videos)
        else:
            prompts = [self.prompt(e.record.question) for e in examples]
            batch = self._encode(prompts, videos)
            self._check_length(batch["attention_mask"].sum(dim=1), examples)
            refusal = self._labelled(examples, [REFUSAL_OPENING] * len(examples), videos)
            # The chat template closes the turn after the opening; keep only the opening's tokens.
            opening = len(self.tokenizer(" " + REFUSAL_OPENING, add_special_tokens=False)["input_ids"])
            labels = refusal["labels"]
            for row in range(labels.shape[0]):
                positions = (labels[row] != IGNORE_INDEX).nonzero().flatten()
                labels[row, positions[opening:]] = IGNORE_INDEX
            batch["refusal"] = {k: v for k, v in refusal.items() if k != "pixel_values_videos"}
        batch["ids"] = ids
        batch["records"] = RecordBatch(e.record for e in examples)
        return batch


class AnswerabilityDataModule(L.LightningDataModule):
    """Reads record files, mixes answerable and unanswerable records, yields SFT/DPO/generation batches.

    Stages: `fit` uses `train_file`/`val_file` with `objective`; `test`/`predict` use `test_file`/
    `predict_file`
    in generation mode. DPO's rejected responses come from each record's `rejected` field, or from a
    predictions file of `main.py predict` joined on `id` (never by row).
    """

    def __init__(
        self,
        data_dir: str = "outputs/shapes/data",
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
        seed: int = 0,
        synthetic: bool = False,
        synthetic_videos: int = 3000,
        synthetic_split: tuple[float, float, float] = (0.9, 0.05, 0.05),
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
            batch_size: global training batch size in examples (divided by the world size).
            max_length: the longest prompt + response in tokens; longer prompts are errors.
            synthetic: `data_dir` holds the synthetic world: when its record files are missing (or its last
                build was interrupted), `prepare_data` builds it there, into an empty folder or one `synth`
                built only. Off, a missing record file is an error; nothing is ever built over user files.
            synthetic_videos, synthetic_split: with `synthetic`, the number of clips and the train/val/test
                fractions (by clip) of the world `prepare_data` builds.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.datasets: dict[str, ExampleDataset] = {}
        self.skipped_pairs = 0

    # ------------------------------------------------------------------------------------------ files
    def _path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else Path(self.hparams.data_dir) / path

    def prepare_data(self) -> None:
        """With `synthetic`, build the synthetic dataset when its record files are missing or its last build
        was interrupted (rank 0 only, once). The builder refuses a folder it did not build."""
        if not self.hparams.synthetic:
            return
        from datamodules.shapes.dataset import SyntheticDatasetError, build_synthetic_dataset

        data_dir = Path(self.hparams.data_dir)
        wanted = [self.hparams.train_file, self.hparams.val_file, self.hparams.test_file]
        try:
            finished = check_synthetic_folder(data_dir) is not None
        except SyntheticDatasetError:
            finished = False
        if finished and all(self._path(name).exists() for name in wanted if name):
            return
        log.info("building the synthetic dataset in %s", data_dir)
        build_synthetic_dataset(
            data_dir,
            num_videos=self.hparams.synthetic_videos,
            seed=self.hparams.seed,
            fractions=tuple(self.hparams.synthetic_split),
        )

    def _read(self, name: str, key: str) -> tuple[list[QARecord], Path]:
        """The records of file `name` (the `key` setting); a missing file is one error naming the path."""
        path = self._path(name)
        if not path.is_file():
            hint = "" if self.hparams.synthetic else " or synthetic: true to build the synthetic world there"
            raise RecordError(path, None, None, f"no such record file (data.init_args.{key}; set it to null "
                              f"to go without it{hint})")
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
        wanted_unanswerable = round(len(answerable) * fraction / (1 - fraction))
        if wanted_unanswerable <= len(unanswerable):
            unanswerable = rng.sample(unanswerable, wanted_unanswerable)
        else:
            answerable = rng.sample(answerable, round(len(unanswerable) * (1 - fraction) / fraction))
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
        check_synthetic_folder(h.data_dir)
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
            self.datasets["train"] = ExampleDataset(examples, h.num_frames)
        if stage in ("fit", "validate", None) and h.val_file:
            examples = self._examples(h.val_file, "val_file", True, pairs)
            self.datasets["val"] = ExampleDataset(examples, h.num_frames)
        if stage in ("test", None) and h.test_file:
            examples = self._examples(h.test_file, "test_file", False, False)
            self.datasets["test"] = ExampleDataset(examples, h.num_frames)
        if stage == "predict":
            key = "predict_file" if h.predict_file else "test_file"
            examples = self._examples(h.predict_file or h.test_file, key, False, False)
            if h.predict_answerable is not None:
                examples = [e for e in examples if e.record.answerable == h.predict_answerable]
                if not examples:
                    raise RecordError(self._path(h.predict_file or h.test_file), None, "answerable",
                                      f"no record has answerable={str(h.predict_answerable).lower()} "
                                      "(data.init_args.predict_answerable)")
            self.datasets["predict"] = ExampleDataset(examples, h.num_frames)

    def _per_device(self, batch_size: int) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world}")
        return batch_size // world

    def _loader(
        self, split: str, mode: str, batch_size: int, shuffle: bool, every_item_once: bool = False
    ) -> DataLoader:
        """`every_item_once`: under DDP, split the items across ranks without the repeats that Lightning's
        `DistributedSampler` pads with, so that `test` scores every item once (ranks may then run one batch
        apart: safe outside `fit`, where the model is not wrapped in DDP)."""
        dataset = self.datasets[split]
        sampler = EpochSeededSampler(dataset, self.hparams.seed) if shuffle else None
        if every_item_once and self.trainer is not None and self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        options: dict[str, Any] = {
            "batch_size": self._per_device(batch_size),
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

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.objective, self.hparams.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.objective, self.hparams.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", "generate", self.hparams.eval_batch_size, False, every_item_once=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", "generate", self.hparams.eval_batch_size, False, every_item_once=True)

