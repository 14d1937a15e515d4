"""Model construction: any Hugging Face video-LLM with its processor, ready for LoRA or full fine-tuning.

`load_video_llm` is the one entry point: a hub id or a local folder loads through
`AutoModelForImageTextToText` / `AutoProcessor`, the embedded demo's tiny model too (saved as a folder by
`python -m lightning_modules.tiny`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from datamodules.errors import UserError

log = logging.getLogger(__name__)


def _sdpa_mask_attending_somewhere(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, except that a query row allowed no key attends to every key.

    Such rows are left-padding positions (causally restricted to keys that the padding mask removes). On
    CUDA, SDPA returns NaN for them and the NaN spreads to the whole sequence in the next layer (`0 * NaN`
    where values are mixed): the likely cause of the NaN SFT loss seen in bf16 on an H200 (transformers
    5.17, torch 2.11; not rerun there since). transformers up to 4.57 unmasked these rows on CUDA; 5.x
    dropped that. Their outputs are padding, never scored and never attended to by a real token.
    """
    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return mask | ~mask.any(dim=-1, keepdim=True)


# Registered under its own name, so that only the models this project loads use it (transformers' "sdpa"
# stays as it is for every other model in the process): SDPA attention with the mask above.
SDPA_PADDING_SAFE = "sdpa_padding_safe"
AttentionInterface.register(SDPA_PADDING_SAFE, sdpa_attention_forward)
AttentionMaskInterface.register(SDPA_PADDING_SAFE, _sdpa_mask_attending_somewhere)


@dataclass
class LoraSettings:
    """LoRA through peft; `None` in `VideoLLMConfig.lora` means full fine-tuning."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator (lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (of the language model) that get adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (peft's `modules_to_save`), e.g.
    ["multi_modal_projector"] for a freshly initialised projector; disabling the adapters restores their
    original weights too (the DPO reference and `test`'s before-alignment model)."""


@dataclass
class VideoLLMConfig:
    """What model to build and how to fine-tune it."""

    name_or_path: str
    """A Hugging Face model id or a local checkpoint folder (the demo's tiny model: the folder that
    `python -m lightning_modules.tiny` writes)."""
    num_frames: int = 4
    """Frames sampled uniformly over each clip and given to the model."""
    lora: LoraSettings | None = None
    """LoRA settings; None trains the language model and projector in full."""
    freeze_vision_tower: bool = True
    """Keep the vision tower frozen (the default for video-LLM alignment)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    torch_dtype: str = "float32"
    """Weights' dtype when loading a checkpoint (float32, bfloat16, float16)."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own modelling code (off unless a config turns it on)."""
    video_max_pixels: int | None = 360 * 420
    """Most pixels per video frame after resizing, for video processors that resize to a pixel budget
    (Qwen2-VL / Qwen2.5-VL: `size["longest_edge"]`); the Qwen2.5-VL model card's advice for video is
    360 * 420. A checkpoint's own video limit can be far larger (12.8M pixels, from its image processor
    config): a 720p clip then gives ~600 tokens a frame. None keeps the processor's. Other processors ignore
    it."""
    attn_implementation: str | None = SDPA_PADDING_SAFE
    """E.g. "sdpa", "eager" or "flash_attention_2"; None lets transformers choose.
    The default is transformers' SDPA with a mask that lets a left-padding row attend somewhere (no NaN)."""
    rope_scaling: float | None = None
    """Linear RoPE scaling of the language model by this factor (positions divided by it), which stretches its
    context (`max_position_embeddings`) as many times; None keeps the checkpoint's RoPE. LLaVA-NeXT-Video's
    video demo uses 2 for Vicuna-7B (4,096 positions) at 32 frames. Every row must fit the context (checked
    at each step: `check_context`)."""


# ------------------------------------------------------------------------------------------ loading
class ModelPathError(UserError):
    """A model or vision-tower path that does not exist."""


# Folders the embedded demo's stages write, and the command that writes each.
DEMO_PRODUCTS = {
    "outputs/shapes/vision_tower": "python main.py fit -c configs/shapes/vision.yaml",
    "outputs/shapes/tiny": "python -m lightning_modules.tiny --out outputs/shapes/tiny "
    "--vision-tower outputs/shapes/vision_tower",
    "outputs/shapes/base/hf_model": "python main.py fit -c configs/shapes/base.yaml",
    "outputs/shapes/sft/hf_model": "python main.py fit -c configs/shapes/sft.yaml",
    "outputs/shapes/dpo/hf_model": "python main.py fit -c configs/shapes/dpo.yaml",
}


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hugging Face hub id ("owner/model"): it starts
    with ".", "/" or "~", has a separator a hub id cannot have (a second "/", or the OS's own), or a folder
    named by its leading part exists."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    parents = Path(name).parents
    return any(parent.is_dir() for parent in list(parents)[:-1])  # the last parent is "."


def check_model_path(name: str, setting: str) -> None:
    """Raise a `ModelPathError` naming `setting` when the path-like `name` does not exist (and, for a folder
    of the embedded demo, the command that makes it); hub ids are left to Hugging Face, except "tiny" (the
    tiny model's built-in name in earlier releases), unless a folder of that name exists."""
    if name == "tiny" and not Path(name).exists():
        raise ModelPathError(
            f"{setting}: 'tiny' is no longer built in: write the tiny model as a folder with `python -m "
            "lightning_modules.tiny --out DIR` and give DIR"
        )
    if not looks_like_path(name) or Path(name).expanduser().exists():
        return
    problem = f"{setting}: {name} does not exist"
    key = Path(name).as_posix().removeprefix("./").rstrip("/")
    if key in DEMO_PRODUCTS:
        problem += f"; it is made by `{DEMO_PRODUCTS[key]}`"
    raise ModelPathError(problem)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {name!r}") from None


def load_video_llm(config: VideoLLMConfig) -> tuple[nn.Module, Any]:
    """(model, processor) for `config`. A path that does not exist is a `ModelPathError` naming it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = config.name_or_path
    check_model_path(path, "model.name_or_path")
    kwargs: dict[str, Any] = {
        "dtype": _dtype(config.torch_dtype),
        "trust_remote_code": config.trust_remote_code,
    }
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.rope_scaling is not None:
        kwargs["config"] = _linear_rope_scaling(path, config)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if getattr(processor, "tokenizer", None) is not None and processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    limit_video_pixels(processor, config.video_max_pixels)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return prepare_for_training(model, config), processor


def _linear_rope_scaling(path: str, config: VideoLLMConfig) -> Any:
    """The checkpoint's config with its language model's RoPE scaled linearly by `config.rope_scaling`."""
    from transformers import AutoConfig

    if config.rope_scaling < 1:
        raise ContextError(f"model.rope_scaling must be 1 or more (a linear factor): {config.rope_scaling}")
    loaded = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    text = loaded.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ContextError(
            f"model.rope_scaling: {path}'s language model already uses {rope['rope_type']!r} RoPE scaling; "
            "linear scaling applies to unscaled RoPE only"
        )
    text.rope_parameters = {**rope, "rope_type": "linear", "factor": float(config.rope_scaling)}
    return loaded


class ContextError(UserError):
    """A row with more positions than the model's context, or a RoPE scaling that cannot apply."""


def context_length(model: nn.Module) -> tuple[int, str]:
    """The positions the language model of `model` takes, and where the number comes from: its
    `max_position_embeddings`, times the factor of a linear or dynamic RoPE scaling (for YaRN, Llama 3 and
    LongRoPE scaling, `original_max_position_embeddings` times the factor, if larger)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    positions = int(text.max_position_embeddings)
    rope = getattr(text, "rope_parameters", None) or {}
    kind, factor = rope.get("rope_type", "default"), float(rope.get("factor") or 1.0)
    if kind in ("linear", "dynamic"):
        return int(positions * factor), f"max_position_embeddings {positions} x {kind} RoPE factor {factor:g}"
    if kind in ("yarn", "llama3", "longrope"):
        original = int(rope.get("original_max_position_embeddings") or positions)
        scaled = max(positions, int(original * factor))
        return scaled, f"{kind} RoPE scaling {factor:g} of {original} positions"
    return positions, f"max_position_embeddings {positions}, no RoPE scaling"


def check_context(model: nn.Module, positions: torch.Tensor, records: Any, new_tokens: int = 0) -> None:
    """A `ContextError` naming the first record whose row spans more positions than the model's context:
    `positions` (rows,) counts each row's positions (video tokens included, as the processor expands them;
    the highest M-RoPE position + 1 for Qwen2-VL and Qwen2.5-VL), plus `new_tokens` to generate."""
    limit, source = context_length(model)
    for row, count in enumerate((positions + new_tokens).tolist()):
        if count > limit:
            generated = f" with {new_tokens} new tokens" if new_tokens else ""
            name = f"record {records[row].id!r}" if records is not None else f"row {row}"
            raise ContextError(
                f"{name}: its row spans {count} positions{generated} (its video tokens "
                f"included), over the model's context of {limit} ({source}): use fewer frames "
                "(data.num_frames), shorter rows (data.max_length) or a RoPE scaling (model.rope_scaling)"
            )


def limit_video_pixels(processor: Any, max_pixels: int | None) -> None:
    """Cap the pixels per frame of a video processor that resizes to a pixel budget: Qwen2-VL's kind, whose
    `size` holds `shortest_edge` and `longest_edge` as pixel counts and which has a `temporal_patch_size`
    (the minimum is lowered to the cap if above it). Other processors are left as they are."""
    video_processor = getattr(processor, "video_processor", None)
    size = getattr(video_processor, "size", None)
    if max_pixels is None or size is None or not hasattr(video_processor, "temporal_patch_size"):
        return
    get = size.get if isinstance(size, dict) else functools.partial(getattr, size)
    if get("shortest_edge", None) is None or get("longest_edge", None) is None:
        return
    limits = {"shortest_edge": min(int(get("shortest_edge", None)), max_pixels), "longest_edge": max_pixels}
    if isinstance(size, dict):
        video_processor.size = {**size, **limits}
    else:
        video_processor.size = dataclasses.replace(size, **limits)


# The keyword arguments of the HF video-LLM families' forward that a collated batch holds (its labels, ids and
# records are for the loss and the reports).
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
    "second_per_grid_ts",
    "pixel_values",
    "image_sizes",
)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs of a collated batch: its entries named in `MODEL_INPUTS`."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


# Attribute names of the vision tower(s) in the HF video-LLM families (Video-LLaVA has an image and a video
# tower); frozen by default and never given LoRA adapters.
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "video_tower", "image_tower")


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower(s) of a video-LLM, found by the attribute names the HF families use; a peft model's
    are those of the model it wraps."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    found = []
    for name in VISION_TOWER_NAMES:
        for holder in (model, getattr(model, "model", None)):
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, nn.Module) and module not in found:
                found.append(module)
    return found


def _may_need_grad(value: Any) -> bool:
    """Whether `value` (a module's argument) holds a tensor that requires grad, looking into lists, tuples
    and dicts; an object of any other kind than a scalar, a string or None counts as one that might."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_may_need_grad(item) for item in value)
    if isinstance(value, dict):
        return any(_may_need_grad(item) for item in value.values())
    return not isinstance(value, (type(None), bool, int, float, str))


class NoGradWhenFrozen:
    """Forward hooks that run a module without autograd while nothing in it can get a gradient: it has
    parameters, none of them requires grad, and no tensor among its inputs requires grad.

    Why: `enable_input_require_grads` (called by transformers' gradient checkpointing and again by peft) hooks
    the input embeddings of every `PreTrainedModel` in a video-LLM, the vision tower's patch embedding
    included, so a frozen tower's activations are kept for a backward pass that updates nothing (an
    estimated ~20 GB for a 32-frame clip through CLIP-L/336). Removing those hooks is fragile: the second
    call drops the first call's handles (`disable_input_require_grads` misses those), and any later call
    adds them again. The conditions are checked at each forward (as ms-swift's trainer does), so a tower
    unfrozen later, or given an input that requires grad, is tracked again; under an enclosing `no_grad`
    nothing changes.
    """

    def __init__(self) -> None:
        self._switched: list[bool] = []  # one entry per call in progress: whether `before` turned grad off

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        switch = torch.is_grad_enabled() and _all_frozen(module) and not _may_need_grad((args, kwargs))
        self._switched.append(switch)
        if switch:
            torch.set_grad_enabled(False)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Registered with `always_call`: it runs when the forward raises too.
        if self._switched and self._switched.pop():
            torch.set_grad_enabled(True)


def _all_frozen(module: nn.Module) -> bool:
    requires_grad = [parameter.requires_grad for parameter in module.parameters()]
    return bool(requires_grad) and not any(requires_grad)


def run_frozen_towers_without_grad(model: nn.Module) -> nn.Module:
    """Give each vision tower of `model` the `NoGradWhenFrozen` hooks (once: a tower that has them is left
    as it is)."""
    for tower in vision_modules(model):
        hooks = [getattr(hook, "__self__", None) for hook in tower._forward_pre_hooks.values()]
        if any(isinstance(hook, NoGradWhenFrozen) for hook in hooks):
            continue
        guard = NoGradWhenFrozen()
        tower.register_forward_pre_hook(guard.before, with_kwargs=True, prepend=True)
        tower.register_forward_hook(guard.after, with_kwargs=True, always_call=True)
    return model


def prepare_for_training(model: nn.Module, config: VideoLLMConfig) -> nn.Module:
    """Freeze the vision tower, wrap with LoRA adapters when asked, and turn on gradient checkpointing; a
    frozen tower runs without autograd (`NoGradWhenFrozen`)."""
    run_frozen_towers_without_grad(model)
    if config.freeze_vision_tower:
        for module in vision_modules(model):
            module.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        # Adapters go on the language model only: exclude the vision tower and projector by regex.
        targets = "|".join(config.lora.target_modules)
        excluded = "|".join([*VISION_TOWER_NAMES, "multi_modal_projector"])
        peft_config = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=rf"^(?!.*({excluded})).*\.({targets})$",
            modules_to_save=list(config.lora.modules_to_save) or None,
        )
        model = get_peft_model(model, peft_config)
    return model


def set_training_mode(model: nn.Module, config: VideoLLMConfig) -> nn.Module:
    """Train mode for fine-tuning, the frozen vision tower(s) excepted (kept in eval mode).

    `from_pretrained` returns a model in eval mode and Lightning (2.2+) keeps module modes in `fit`, so
    without this a loaded checkpoint trains in eval mode: transformers then skips gradient checkpointing
    (it recomputes layers in train mode only) and dropout is off.
    """
    model.train()
    if config.freeze_vision_tower:
        for module in vision_modules(model):
            module.eval()
    return model


# Float attributes through which HF modules apply dropout functionally (e.g. attention modules'
# `attention_dropout`, read at each forward); config fields of these names are zeroed too, so a saved config
# agrees.
DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "attn_dropout",
                      "resid_dropout", "embd_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                      "projector_dropout")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of `model` off, in train mode as in eval mode: each `nn.Dropout` gets p = 0 (LoRA's
    `lora_dropout` modules included, and peft's config says 0), and the dropout rates that modules and
    configs (the model's and its sub-configs) hold as floats become 0."""
    configs = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and all(config is not seen for seen in configs):
            configs.append(config)
    while configs:
        config = configs.pop()
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                configs.append(sub)
    for peft_config in (getattr(model, "peft_config", None) or {}).values():
        if hasattr(peft_config, "lora_dropout"):
            peft_config.lora_dropout = 0.0
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@contextmanager
def replacing_folder(folder: str | Path) -> Iterator[Path]:
    """Write a folder as a whole: the body writes into a new temporary sibling, which then takes the
    folder's place (an old folder is renamed aside first and deleted after). An error or a kill before the
    end leaves the old folder as it was; no reader ever sees a mix of old and new files.

    A kill between the two renames leaves the old folder aside (`.NAME.replaced-*`): the next export puts it
    back before it starts, and removes the temporary folders of killed exports. The new folder and its files
    get the modes the user's umask gives (0755 and 0644 under umask 022), not mkdtemp's private 0700.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    aside = sorted(folder.parent.glob(f".{folder.name}.replaced-*"))
    if aside and not folder.exists():
        os.rename(aside.pop(), folder)
    for stale in [*aside, *folder.parent.glob(f".{folder.name}.exporting-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.exporting-", dir=folder.parent))
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        for path in (temporary, *temporary.rglob("*")):  # mkdtemp makes 0700, transformers' shard files 0600
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)  # the user's usual modes
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder.parent))
            os.replace(folder, old)  # onto the empty folder just made: a name no one else holds
        os.rename(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_hf(
    model: nn.Module,
    processor: Any,
    folder: str | Path,
    meta: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a model (merged full weights, or a peft adapter) with its processor, loadable by name_or_path.
    `state_dict`: the model's full state dict when its own parameters are sharded (FSDP).

    The folder is replaced as a whole (`replacing_folder`): an interrupted export leaves the previous one."""
    folder = Path(folder)
    with replacing_folder(folder) as temporary:
        peft_config = getattr(model, "peft_config", None)
        if state_dict is not None and peft_config:
            # peft's own filter matches keys against the wrapped model's module names, which FSDP prefixes:
            # the adapter is written in peft's format (its weights, adapter name removed, and its config).
            from safetensors.torch import save_file

            (name,) = peft_config
            adapter = {
                key.replace(f".{name}.", "."): value.detach().cpu().contiguous()
                for key, value in state_dict.items()
                if "lora_" in key
            }
            save_file(adapter, temporary / "adapter_model.safetensors", metadata={"format": "pt"})
            peft_config[name].save_pretrained(temporary)
        else:
            model.save_pretrained(temporary, **({} if state_dict is None else {"state_dict": state_dict}))
        processor.save_pretrained(temporary)
        if meta:
            (temporary / "answerability.json").write_text(json.dumps(meta, indent=2))
    return folder
