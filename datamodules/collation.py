"""Collation: (example, clip) items -> model inputs through the model's processor and its chat template.

`ChatCollator` renders SFT conversations (labels on the responses only), DPO pair rows (`pack_pairs`: one row
a pair, [prompt][chosen][rejected], in the format of `batch_format`) and generation prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from datamodules.batch_format import IGNORE_INDEX, Segment
from datamodules.records import REFUSAL_OPENING, QARecord, RecordError
from datamodules.video import Clip

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


def pair_digest(example: Example) -> str:
    """What a DPO pair's reference log-probabilities depend on besides the reference itself: its question,
    chosen and rejected responses, its clip's name in the record and the video file's identity (size and
    modification time in ns, from one `stat`: a replaced file changes the digest). Computed without decoding
    the clip, so that cached pairs are found before any clip is loaded. A path with no file (frames handed
    to the collator directly) has no identity: its name alone is used."""
    try:
        stat = os.stat(example.video_path)
        identity = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        identity = None
    record = example.record
    content = [record.question, record.answer, example.rejected, record.video, identity]
    return hashlib.sha1(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:20]


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

    `mode`: "sft" (prompt + gold answer, labels on the answer only), "dpo" (one row per pair, see
    `pack_pairs`, with each pair's `pair_digest` in `pair_digests`), "generate" (prompt only, each clip
    processed once, plus `refusal_ids`: the refusal opening's tokens after each prompt, which
    `AlignmentModule.score` reads as a continuation of the prompt).
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
        self._texts: dict[tuple, str] = {}
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
        return self._chat(((question, None),), generation_prompt=True)

    def full_text(self, question: str, response: str) -> str:
        return self._chat(((question, response),))

    def _chat(self, turns: tuple[tuple[str, str | None], ...], generation_prompt: bool = False) -> str:
        """The chat text of `turns` (a response of None: a question awaiting its answer), with the generation
        prompt or without trailing whitespace. Texts are kept (up to `CACHE_SIZE`): a conversation's last
        response ends where the whole conversation does, and a question's prompt recurs in every conversation
        that starts with it (DPO's chosen and rejected rows, the many records that ask the same question), so
        each is rendered once; the chat template is most of what collation costs."""
        key = (turns, generation_prompt)
        text = self._texts.get(key)
        if text is None:
            messages = self._conversation(turns, self.end_of_turn)
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )
            text = text if generation_prompt else text.rstrip()
            if len(self._texts) >= self.CACHE_SIZE:
                self._texts.clear()
            self._texts[key] = text
        return text

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
                texts.append(self._chat((*turns[:turn], (turns[turn][0], None)), generation_prompt=True))
                texts.append(self._chat(turns[: turn + 1]))
        unique = list(dict.fromkeys(texts))  # each distinct text tokenized once
        ids = dict(zip(unique, self.tokenizer(unique)["input_ids"] if unique else [], strict=True))
        encoded = [ids[text] for text in texts]
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
        """One row per pair (`pack_pairs`): the clip and prompt are encoded once, with the chosen response;
        the rejected response's tokens are those it has after the same prompt."""
        batch = self._labelled(examples, [e.record.answer for e in examples], videos)
        spans = self._response_spans([((e.record.question, e.rejected or ""),) for e in examples])
        encoded = self.tokenizer([text for text, _, _ in spans])["input_ids"]
        rejected = [ids[start:end] for ids, (_, _, ((start, end),)) in zip(encoded, spans, strict=True)]
        batch = pack_pairs(batch, rejected, self.tokenizer.pad_token_id)
        batch["pair_digests"] = [pair_digest(e) for e in examples]
        return batch

    def _refusal_ids(self, questions: list[str], prompts: list[str]) -> torch.Tensor:
        """The refusal opening's tokens after each prompt, counted in context: the chat text up to the end of
        the opening, tokenized whole, less the prompt's tokens (checked to be its prefix). Tokenized alone,
        `" " + opening` can give a SentencePiece tokenizer one token more (a lone "▁"). Right-padded with
        `IGNORE_INDEX` to the longest opening of the batch."""
        texts = []
        for question in questions:
            chat = self._chat(((question, REFUSAL_OPENING),))
            texts.append(chat[: chat.rindex(REFUSAL_OPENING) + len(REFUSAL_OPENING)])
        encoded = self.tokenizer(prompts + texts)["input_ids"]
        openings = []
        halves = encoded[: len(prompts)], encoded[len(prompts) :]
        for prompt, whole, text in zip(*halves, texts, strict=True):
            if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
                raise ValueError(
                    f"{type(self.tokenizer).__name__}: the prompt does not tokenize as a prefix of "
                    f"{text[-80:]!r}, so the refusal opening cannot be scored after it"
                )
            openings.append(whole[len(prompt) :])
        ids = torch.full((len(openings), max(map(len, openings))), IGNORE_INDEX, dtype=torch.long)
        for row, opening in enumerate(openings):
            ids[row, : len(opening)] = torch.tensor(opening)
        return ids

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
            batch = self._encode(prompts, videos)  # each clip processed once
            self._check_length(batch["attention_mask"].sum(dim=1), examples)
            batch["refusal_ids"] = self._refusal_ids([e.record.question for e in examples], prompts)
        batch["ids"] = ids
        batch["records"] = RecordBatch(e.record for e in examples)
        return batch


def pack_pairs(batch: dict[str, Any], rejected: list[list[int]], pad_token_id: int) -> dict[str, Any]:
    """DPO pair rows from a labelled batch of left-padded [prompt][chosen] rows and their rejected tokens.

    Each row becomes [prompt with its video tokens][chosen response][rejected response], left-padded: the
    per-token outputs (`PER_TOKEN_KEYS`) are extended over the rejected response, whose tokens are labelled
    too. `pair_segments` marks each position with its `Segment`, from which the model step builds the
    attention mask (rejected tokens do not see chosen ones) and positions (the rejected response's restart
    after the prompt); `losses.pair_logps` then scores both responses as the rows [prompt][chosen] and
    [prompt][rejected] would be.
    """
    per_token = _per_token_outputs(batch)
    rows, width = batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    packed_width = max(n + len(r) for n, r in zip(lengths, rejected, strict=True))
    pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    packed = {k: torch.full((rows, packed_width), pad.get(k, 0), dtype=v.dtype) for k, v in per_token.items()}
    segments = torch.full((rows, packed_width), Segment.PAD, dtype=torch.long)
    for row, (length, tokens) in enumerate(zip(lengths, rejected, strict=True)):
        start, middle = packed_width - length - len(tokens), packed_width - len(tokens)
        ids = torch.tensor(tokens, dtype=batch["input_ids"].dtype)
        for key, value in per_token.items():
            packed[key][row, start:middle] = value[row, width - length :]
            fill = PER_TOKEN_KEYS[key]
            packed[key][row, middle:] = ids if fill is None else fill
        chosen = (packed["labels"][row, start:middle] != IGNORE_INDEX).nonzero().flatten()
        prompt_end = start + int(chosen[0])
        segments[row, start:prompt_end] = Segment.PROMPT
        segments[row, prompt_end:middle] = Segment.CHOSEN
        segments[row, middle:] = Segment.REJECTED
    batch.update(packed)
    batch["pair_segments"] = segments
    return batch


def _per_token_outputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's `PER_TOKEN_KEYS` outputs; any other output with one value per token is an error (a pair
    row could not extend it over the rejected response)."""
    shape = tuple(batch["input_ids"].shape)
    for key, value in batch.items():
        if key not in PER_TOKEN_KEYS and torch.is_tensor(value) and tuple(value.shape) == shape:
            raise ValueError(f"processor output {key!r} has one value per token; DPO pair rows cannot "
                             "extend it over the rejected response")
    return {k: v for k, v in batch.items() if k in PER_TOKEN_KEYS}
