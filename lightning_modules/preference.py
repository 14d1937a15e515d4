"""DPO's shared-prefix pass and its reference log-probabilities, computed once and cached on disk.

A DPO pair row is [prompt with its video tokens][chosen][rejected] (`ChatCollator` mode "dpo"). One forward
pass scores both responses when the rejected tokens do not attend to the chosen ones (a 4-D attention mask)
and take the positions they would have in [prompt][rejected] (position ids that restart after the prompt;
for the M-RoPE families, Qwen2-VL and Qwen2.5-VL, the model's own `get_rope_index` positions of the row, the
rejected part moved back by the chosen length). `losses.pair_logps` then reads both log-probabilities.

The reference log-probabilities of a pair never change during training, so `fit` computes them once
(`ReferenceCache`), keyed by the reference model's identity (`reference_identity`) and, per pair, by record
id and the pair's content digest.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.batch_format import Segment
from datamodules.records import atomic_write

# Attention implementations that take a custom 4-D mask: a boolean one (SDPA) or an additive one (eager).
BOOLEAN_MASK_ATTENTION = ("sdpa", "sdpa_padding_safe")
ADDITIVE_MASK_ATTENTION = ("eager",)
CACHE_FORMAT = 1


def _base_model(llm: nn.Module) -> nn.Module:
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def attention_implementation(llm: nn.Module) -> str:
    config = _base_model(llm).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", ""))


def pair_attention_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, len, len) mask of pair rows: causal, no padding keys, no chosen key for a rejected query.

    A padding query attends to itself alone (a query with no key gives NaN in SDPA); its output is never
    used. Boolean (True: attend) for SDPA, additive (0 or the dtype's minimum) for eager attention.
    """
    length = segments.shape[1]
    positions = torch.arange(length, device=segments.device)
    valid = segments != Segment.PAD
    allowed = (positions[:, None] >= positions[None, :]) & valid[:, None, :] & valid[:, :, None]
    allowed &= ~((segments[:, :, None] == Segment.REJECTED) & (segments[:, None, :] == Segment.CHOSEN))
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device) & ~valid[:, :, None]
    allowed = allowed[:, None]
    if implementation in BOOLEAN_MASK_ATTENTION:
        return allowed
    if implementation in ADDITIVE_MASK_ATTENTION:
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    accepted = ", ".join(BOOLEAN_MASK_ATTENTION + ADDITIVE_MASK_ATTENTION)
    raise ValueError(
        f"DPO's shared-prefix pass needs an attention implementation that takes a 4-D mask ({accepted}); "
        f"the model uses {implementation!r}: set model.attn_implementation to one of those"
    )


def _rope_index(llm: nn.Module):
    """The model's multimodal rotary index (`get_rope_index`, M-RoPE families), or None."""
    base = _base_model(llm)
    for holder in (base, getattr(base, "model", None)):
        function = getattr(holder, "get_rope_index", None) if holder is not None else None
        if callable(function):
            return function
    return None


def pair_position_ids(llm: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Position ids of pair rows: those of [prompt][chosen], and of [prompt][rejected] for the rejected part.

    (batch, len) counting real tokens from 0; for models with `get_rope_index` (Qwen2-VL, Qwen2.5-VL) its
    (3, batch, len) M-RoPE positions of the row. Either way the rejected tokens' positions are moved back by
    the chosen response's length: the prompt ends in text, whose positions step by one on every axis.
    """
    segments = batch["pair_segments"]
    valid = segments != Segment.PAD
    rope_index = _rope_index(llm)
    if rope_index is not None and "mm_token_type_ids" in batch:
        accepted = inspect.signature(rope_index).parameters
        keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        extra = {k: batch[k] for k in keys if k in batch and k in accepted}
        positions, _ = rope_index(batch["input_ids"], attention_mask=valid.long(), **extra)
    else:
        positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
    chosen_length = (segments == Segment.CHOSEN).sum(dim=1, keepdim=True)
    shift = (segments == Segment.REJECTED).long() * chosen_length
    return positions - shift.to(positions.device)


def pair_model_inputs(llm: nn.Module, inputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    """`inputs` (the model's inputs of the batch) with the pair rows' 4-D attention mask and position ids."""
    dtype = llm.get_input_embeddings().weight.dtype
    return {
        **inputs,
        "attention_mask": pair_attention_mask(batch["pair_segments"], attention_implementation(llm), dtype),
        "position_ids": pair_position_ids(llm, batch),
    }


# ---------------------------------------------------------------------------------- reference identity
def _fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A digest of weights: each tensor's name, shape, dtype, its sum and 1,024 evenly spaced values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        step = max(flat.numel() // 1024, 1)
        sample = flat[::step][:1024].to("cpu", torch.float64)
        total = float(flat.to(torch.float64).sum()) if flat.numel() else 0.0
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def reference_weights(llm: nn.Module, reference: nn.Module | None) -> list[tuple[str, torch.Tensor]]:
    """The reference's weights, named as in the base model: the frozen copy, or the model without adapters."""
    if reference is not None:
        source = reference.named_parameters()
    else:
        source = ((n, p) for n, p in llm.named_parameters() if "lora_" not in n)
    buffers = (reference if reference is not None else llm).named_buffers()
    named = []
    for name, tensor in [*source, *buffers]:
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        named.append((name, tensor))
    return named


def reference_identity(
    name_or_path: str,
    num_frames: int,
    processor: Any,
    weights: list[tuple[str, torch.Tensor]],
    precision: str,
) -> dict[str, Any]:
    """What the reference log-probabilities depend on besides the pairs: the model, tokenizer and template,
    and the precision they are computed in (Lightning's `trainer.precision`, e.g. "bf16-mixed")."""
    tokenizer = processor.tokenizer
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None) or ""
    return {
        "format": CACHE_FORMAT,
        "name_or_path": name_or_path,
        "num_frames": num_frames,
        "weights": _fingerprint(weights),
        "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest(),
        "chat_template": hashlib.sha256(str(template).encode()).hexdigest(),
        "processor": type(processor).__name__,
        "precision": precision,
    }


class ReferenceCache:
    """Reference log-probabilities of pairs: record id -> (pair digest, chosen, rejected), in memory and in
    one JSON file per reference identity (`<folder>/<key>.json`, written atomically; no file without a
    folder)."""

    def __init__(self, folder: str | Path | None, identity: dict[str, Any]):
        self.identity = identity
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.path = None if folder is None else Path(folder) / f"{key}.json"
        self.pairs: dict[str, tuple[str, float, float]] = {}

    def load(self) -> int:
        """Read the file if there is one (its identity must match); returns the number of pairs read."""
        if self.path is None or not self.path.is_file():
            return 0
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: not a reference log-probability cache ({error.msg})") from None
        if data.get("identity") != self.identity:
            raise ValueError(f"{self.path}: its reference identity differs from this run's; delete the file")
        self.pairs.update({i: (d, float(c), float(r)) for i, (d, c, r) in data["pairs"].items()})
        return len(data["pairs"])

    def save(self) -> None:
        if self.path is None:
            return
        data = {"identity": self.identity, "pairs": {i: list(v) for i, v in sorted(self.pairs.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data))

    def missing(self, ids: list[str], digests: list[str]) -> bool:
        return any(self.pairs.get(i, ("",))[0] != d for i, d in zip(ids, digests, strict=True))

    def add(self, ids: list[str], digests: list[str], logps: torch.Tensor) -> None:
        """`logps`: (2 * pairs,) reference log-probabilities, the chosen responses' first."""
        half = len(ids)
        values = logps.detach().to("cpu", torch.float64).tolist()
        for row, (record, digest) in enumerate(zip(ids, digests, strict=True)):
            self.pairs[record] = (digest, values[row], values[half + row])

    def lookup(self, ids: list[str], digests: list[str], dtype: torch.dtype, device: torch.device):
        """(2 * pairs,) reference log-probabilities of a batch, the chosen responses' first."""
        chosen, rejected = [], []
        for record, digest in zip(ids, digests, strict=True):
            entry = self.pairs.get(record)
            if entry is None or entry[0] != digest:
                state = "no entry" if entry is None else "an entry for other content"
                where = "" if self.path is None else f" {self.path}"
                raise RuntimeError(
                    f"pair {record!r}: the reference log-probability cache{where} has {state}; the "
                    "reference pass before training covers the training and validation loaders' pairs"
                )
            chosen.append(entry[1])
            rejected.append(entry[2])
        return torch.tensor(chosen + rejected, dtype=torch.float64).to(device=device, dtype=dtype)
