"""DPO's shared-prefix pass and its reference log-probabilities, computed once and cached on disk.

A DPO pair row is [prompt with its video tokens][chosen][rejected] (`ChatCollator` mode "dpo"). One forward
pass scores both responses when the rejected tokens do not attend to the chosen ones (a 4-D attention mask)
and take the positions they would have in [prompt][rejected] (position ids that restart after the prompt;
for the M-RoPE families, Qwen2-VL and Qwen2.5-VL, the model's own `get_rope_index` positions of the row, the
rejected part moved back by the chosen length). `losses.pair_logps` then reads both log-probabilities.

The reference log-probabilities of a pair never change during training, so `fit` computes them once
(`ReferenceCache`), keyed by the reference model's identity (`reference_identity`) and, per pair, by record
id and the pair's digest (`datamodules.collation.pair_digest`: its texts and its video file's identity, read
without decoding the clip). `DPOReference` is the reference as `AlignmentModule` holds it: the policy
with its adapters disabled (LoRA) or a frozen copy of the initial policy, run in every step or once before
training into the cache.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from datamodules.batch_format import Segment
from datamodules.errors import UserError
from datamodules.records import JSONProblem, atomic_write, parse_json
from lightning_modules.losses import pair_logps
from lightning_modules.run_folder import SigtermNoted
from lightning_modules.video_llm import model_inputs

# Attention implementations that take a custom 4-D mask: a boolean one (SDPA) or an additive one (eager).
BOOLEAN_MASK_ATTENTION = ("sdpa", "sdpa_padding_safe")
ADDITIVE_MASK_ATTENTION = ("eager",)
CACHE_FORMAT = 2  # 2: pairs keyed by their texts and video file identity, not their tokens


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
    the chosen response's length: the prompt ends in text, whose positions step by one on every axis. An
    M-RoPE model's batch must carry the processor's `mm_token_type_ids` (which tokens are video): 1-D
    positions would silently score the pairs at other positions than training's rows.
    """
    segments = batch["pair_segments"]
    positions = _row_positions(llm, batch, (segments != Segment.PAD).long())
    chosen_length = (segments == Segment.CHOSEN).sum(dim=1, keepdim=True)
    shift = (segments == Segment.REJECTED).long() * chosen_length
    return positions - shift.to(positions.device)


def _row_positions(llm: nn.Module, batch: dict[str, Any], attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a batch's rows as the model places them: (batch, len) counting attended tokens from 0,
    or the (3, batch, len) M-RoPE positions of `get_rope_index` (which need the `mm_token_type_ids`)."""
    rope_index = _rope_index(llm)
    if rope_index is None:
        return (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    if "mm_token_type_ids" not in batch:
        raise ValueError(
            f"{type(_base_model(llm)).__name__} places tokens with M-RoPE positions (get_rope_index), which "
            "need the batch's 'mm_token_type_ids', and its processor returned none: use the model's own "
            "processor with return_mm_token_type_ids on (transformers' default for Qwen2-VL and Qwen2.5-VL)"
        )
    accepted = inspect.signature(rope_index).parameters
    keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    extra = {k: batch[k] for k in keys if k in batch and k in accepted}
    positions, _ = rope_index(batch["input_ids"], attention_mask=attention_mask, **extra)
    return positions


def positions_spanned(llm: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(rows,) how many positions each row of a batch spans (its highest position id + 1): pair rows by their
    own positions (the rejected response restarts after the prompt), other rows as the model places them."""
    if "pair_segments" in batch:
        positions, valid = pair_position_ids(llm, batch), batch["pair_segments"] != Segment.PAD
    else:
        valid = batch["attention_mask"].bool()
        positions = _row_positions(llm, batch, batch["attention_mask"].long())
    valid = valid.to(positions.device)
    if positions.dim() == 3:  # M-RoPE: the highest position on any axis
        positions = positions.amax(dim=0)
    return (positions.masked_fill(~valid, -1).amax(dim=1) + 1).cpu()


def score_pairs(llm: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`llm`'s summed log-probabilities and token counts of a DPO batch's responses (chosen ones first), from
    one shared-prefix pass over its pair rows (`losses.pair_logps`)."""
    if "pair_segments" not in batch:
        raise ValueError("a DPO batch needs pair rows (ChatCollator mode 'dpo'): no 'pair_segments'")
    inputs = pair_model_inputs(llm, model_inputs(batch), batch)
    logits = llm(**inputs, use_cache=False).logits
    return pair_logps(logits, batch["labels"], batch["pair_segments"])


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
    the processor's settings (frame size, pixel budget: the pair digests do not see the video tokens), and
    the precision they are computed in (Lightning's `trainer.precision`, e.g. "bf16-mixed")."""
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
        "processor_settings": hashlib.sha256(processor.to_json_string().encode()).hexdigest(),
        "precision": precision,
    }


class ReferenceCacheError(UserError):
    """A reference-cache file that cannot be read as this run's cache."""


def _is_entry(entry: Any) -> bool:
    """Whether a cache file's pair entry is [digest, chosen, rejected]: a string and two finite numbers."""
    numbers = entry[1:] if isinstance(entry, list) else ()
    return (
        isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers)
    )


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
        """Read the file if there is one (its identity must match); returns the number of pairs read. A file
        that is not such a cache (damaged, cut short, edited) is a `ReferenceCacheError` naming it."""
        if self.path is None or not self.path.is_file():
            return 0
        try:
            data = parse_json(self.path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise self._damaged("not UTF-8 text") from None
        except JSONProblem as problem:
            raise self._damaged(problem.problem) from None
        if not isinstance(data, dict) or not isinstance(data.get("pairs"), dict):
            raise self._damaged("no 'pairs' object")
        if data.get("identity") != self.identity:
            raise self._damaged("its reference identity differs from this run's")
        pairs = {}
        for record, entry in data["pairs"].items():
            if not _is_entry(entry):
                raise self._damaged(f"pair {record!r} is not [digest, chosen log-probability, rejected one]")
            pairs[record] = (entry[0], float(entry[1]), float(entry[2]))
        self.pairs.update(pairs)
        return len(pairs)

    def _damaged(self, problem: str) -> ReferenceCacheError:
        return ReferenceCacheError(
            f"{self.path}: not a reference log-probability cache of this run ({problem}); delete the file "
            "(the reference pass computes it again)"
        )

    def save(self) -> None:
        if self.path is None:
            return
        data = {"identity": self.identity, "pairs": {i: list(v) for i, v in sorted(self.pairs.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data))

    def has(self, record: str, digest: str) -> bool:
        return self.pairs.get(record, ("",))[0] == digest

    def missing(self, ids: list[str], digests: list[str]) -> bool:
        return not all(self.has(i, d) for i, d in zip(ids, digests, strict=True))

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


# ---------------------------------------------------------------------------------- the reference
@dataclass
class PassProgress:
    """How far a reference pass went: pairs computed, and whether a SIGTERM stopped it before its end."""

    computed: int = 0
    stopped: bool = False


class ReferencePassStopped(SIGTERMException):
    """A SIGTERM during `fit`'s reference pass, raised after the pairs gone through were saved: `saved` of
    the pass's `total` pairs are in the cache file `path`."""

    def __init__(self, saved: int, total: int, path: Path | None):
        where = f" to {path}" if path is not None else ""
        super().__init__(f"reference pass: {saved} of {total} pairs saved{where}")
        self.saved, self.total, self.path = saved, total, path


class DPOReference(nn.Module):
    """DPO's reference: the initial policy's log-probabilities of the pairs.

    With LoRA it is the policy with its adapters disabled (no second copy); with full fine-tuning a frozen
    copy of the initial policy (`keep_frozen_copy`; a submodule here, so that it follows the module to its
    device). `logps` runs it on a batch; or `precompute` / `precompute_for_fit` run it once over every pair
    into the `cache` (then the frozen copy is freed) and `cached_logps` reads them.
    """

    def __init__(self, lora: bool, name_or_path: str, num_frames: int):
        super().__init__()
        self.lora, self.name_or_path, self.num_frames = lora, name_or_path, num_frames
        self.frozen: nn.Module | None = None
        self.cache: ReferenceCache | None = None

    def keep_frozen_copy(self, llm: nn.Module) -> None:
        """Full fine-tuning: freeze a copy of the initial policy `llm`, unless one is held already or the
        cache has taken its place."""
        if not self.lora and self.frozen is None and self.cache is None:
            self.frozen = copy.deepcopy(llm).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, llm: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's log-probabilities of a DPO batch's responses (chosen first), in eval mode."""
        if self.frozen is None and not self.lora:
            raise RuntimeError(
                "full fine-tuning DPO: the frozen reference copy was freed after the reference pass, and "
                "these pairs are not in its cache"
            )
        reference = self.frozen if self.frozen is not None else llm
        training = reference.training
        reference.eval()
        try:
            with llm.disable_adapter() if self.lora else nullcontext():
                logps, _ = score_pairs(reference, batch)
        finally:
            reference.train(training)
        return logps

    def cached_logps(self, batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """The cached log-probabilities of a DPO batch's responses (chosen first), in `like`'s dtype and
        device."""
        if self.cache is None:
            raise RuntimeError(
                "DPO with precompute_ref_log_probs: no reference log-probabilities; `fit` computes them "
                "before training (or call `precompute_reference` with the batches)"
            )
        return self.cache.lookup(batch["ids"], batch["pair_digests"], like.dtype, like.device)

    def open_cache(self, folder: str | Path | None, llm: nn.Module, processor: Any, precision: str) -> int:
        """Set up the cache of this reference (in `folder`; in memory only without one), its identity rank
        0's (with every rank's weights fingerprinted where FSDP shards them), and read its file; returns the
        number of pairs read (0 when the cache is open already).
        `precision`: the one the pass runs in (Lightning's `trainer.precision`)."""
        if self.cache is not None:
            return 0
        weights = reference_weights(llm, self.frozen)
        identity = reference_identity(self.name_or_path, self.num_frames, processor, weights, precision)
        if dist.is_available() and dist.is_initialized():  # every rank names the same file
            identities: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(identities, identity)
            identity = identities[0]
            fingerprints = [other["weights"] for other in identities]
            if len(set(fingerprints)) > 1:  # FSDP: each rank holds (and fingerprinted) its shards only
                combined = hashlib.sha256("|".join(fingerprints).encode()).hexdigest()
                identity = {**identity, "weights": combined}
        self.cache = ReferenceCache(folder, identity)
        return self.cache.load()

    def precompute(
        self,
        score: Callable[[dict[str, Any]], torch.Tensor],
        batches: Iterable[dict[str, Any]],
        to_device: Callable[[dict[str, Any]], dict[str, Any]],
        lockstep: bool = False,
    ) -> int:
        """Compute the reference log-probabilities of these DPO batches' pairs that the (open) cache lacks,
        each batch moved by `to_device` first and scored by `score` (the reference's `logps` on a batch); then
        a frozen copy is freed. Returns the number of pairs computed.

        `lockstep`: the forward is collective (FSDP gathers each unit's weights from every rank), so every
        rank must score the same number of batches: the ranks' `batches` are as many, and a batch is skipped
        only where every rank has its pairs cached."""
        return self._run_pass(score, batches, to_device, lockstep).computed

    def _run_pass(
        self,
        score: Callable[[dict[str, Any]], torch.Tensor],
        batches: Iterable[dict[str, Any]],
        to_device: Callable[[dict[str, Any]], dict[str, Any]],
        lockstep: bool = False,
        stop: Callable[[], bool] = lambda: False,
    ) -> PassProgress:
        """`precompute`, asking `stop` before each batch (in lockstep, stopping where any rank says so): when
        it says so (a SIGTERM) the pass ends there, with the pairs computed so far in the cache."""
        cache, progress = self.cache, PassProgress()
        for batch in batches:
            stopping = any_rank(stop()) if lockstep else stop()
            if stopping:
                progress.stopped = True
                break
            needed = cache.missing(batch["ids"], batch["pair_digests"])
            if lockstep:
                needed = any_rank(needed)
            if not needed:
                continue
            batch = to_device(dict(batch))
            cache.add(batch["ids"], batch["pair_digests"], score(batch))
            progress.computed += len(batch["ids"])
        self.frozen = None  # the log-probabilities are all the reference is needed for
        return progress

    def precompute_for_fit(
        self,
        trainer: Any,
        score: Callable[[dict[str, Any]], torch.Tensor],
        to_device: Callable[[dict[str, Any]], dict[str, Any]],
        lockstep: bool = False,
    ) -> int:
        """The reference pass of `fit`: every training and validation pair of the trainer's datamodule,
        this rank's share, scored by `score` (see `precompute`, as `lockstep`), gathered on every rank and
        saved by rank 0. The cache must be open. Returns the number of pairs computed, on all ranks together.

        Only the pairs the cache lacks are collated: the dataset's `pair_key` reads a pair's key without
        decoding its clip, so a complete cache (a resumed run) costs no decoding. In lockstep every rank's
        list is padded to the longest with pairs of its own share (`rank_share`), so that the ranks run as
        many batches.

        A SIGTERM ends the pass at the next batch (noted by `SigtermNoted`: Lightning installs its own handler
        only after `on_fit_start`): the pairs computed so far are gathered and saved all the same, then every
        rank raises `ReferencePassStopped`, and a rerun computes only the rest."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "DPO with precompute_ref_log_probs reads the pairs from the LightningDataModule: fit with "
                "`datamodule=`, or set precompute_ref_log_probs=False to run the reference in every step"
            )
        loaders = [datamodule.train_dataloader()]
        if trainer.limit_val_batches != 0:
            loaders.append(datamodule.val_dataloader())
        shares = []
        for loader in loaders:
            dataset = loader.dataset
            if lockstep:
                share = rank_share(len(dataset), trainer.global_rank, trainer.world_size)
            else:
                share = list(range(trainer.global_rank, len(dataset), trainer.world_size))
            missing = [i for i in share if not self.cache.has(*dataset.pair_key(i))]
            if lockstep:
                missing = padded_to_longest(missing, share)
            if missing:
                shares.append(torch.utils.data.DataLoader(
                    dataset, batch_size=loader.batch_size, sampler=missing, collate_fn=loader.collate_fn,
                    num_workers=loader.num_workers))
        # In the training steps' precision (autocast under bf16-mixed), so that before the first update the
        # policy's log-probabilities equal the reference's and the implicit rewards start at zero.
        launcher = trainer.strategy.launcher
        with SigtermNoted(launcher.kill if launcher is not None else None) as sigterm:
            with trainer.precision_plugin.forward_context():
                progress = self._run_pass(score, itertools.chain(*shares), to_device, lockstep,
                                          stop=lambda: sigterm.received)  # then a copy is freed
            progress.stopped = progress.stopped or sigterm.received  # also one after the last batch
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, (self.cache.pairs, progress))
            for pairs, _ in gathered:
                self.cache.pairs.update(pairs)
            progress = PassProgress(
                computed=sum(share.computed for _, share in gathered),
                stopped=any(share.stopped for _, share in gathered),
            )
        if trainer.is_global_zero and progress.computed:
            self.cache.save()
        trainer.strategy.barrier("reference log-probabilities")
        if progress.stopped:
            saved = sum(self.cache.has(*loader.dataset.pair_key(i))
                        for loader in loaders for i in range(len(loader.dataset)))
            total = sum(len(loader.dataset) for loader in loaders)
            raise ReferencePassStopped(saved, total, self.cache.path)
        return progress.computed


def rank_share(items: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s indices of `items` items: every `world_size`-th from `rank`, the last ones wrapping round
    to the first items (as `DistributedSampler` pads), so that every rank has as many."""
    per_rank = -(-items // world_size) if items else 0
    return [(rank + world_size * step) % items for step in range(per_rank)]


def padded_to_longest(indices: list[int], share: list[int]) -> list[int]:
    """`indices` made as long as the longest list of any rank (a collective), with items of this rank's
    `share` cycled in: ranks in lockstep then run as many batches (a padding pair is scored again)."""
    longest = torch.tensor(len(indices), device=_collective_device())
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    padding = int(longest) - len(indices)
    return indices + [share[k % len(share)] for k in range(padding)] if padding else indices


def _collective_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank of the default process group (a collective: every rank calls it)."""
    value = torch.tensor(float(flag), device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)
