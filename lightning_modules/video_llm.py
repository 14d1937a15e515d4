"""Model construction: any Hugging Face video-LLM with its processor, ready for LoRA or full fine-tuning.

`load_video_llm` is the one entry point. A name or path loads a real checkpoint through
`AutoModelForImageTextToText` / `AutoProcessor`; the name `"tiny"` builds the embedded default
(`lightning_modules/tiny.py`), of the same classes, without a download.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lightning_modules.tiny import TINY, TinyArchitecture, build_tiny

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

    name_or_path: str = TINY
    """A Hugging Face model id or local folder, or "tiny" for the embedded default."""
    num_frames: int = 4
    """Frames sampled uniformly over each clip and given to the model."""
    vision_tower: str | None = None
    """For "tiny": a folder with a pretrained `CLIPVisionModel` (from the vision pretraining stage)."""
    tiny: TinyArchitecture = field(default_factory=TinyArchitecture)
    """For "tiny": its sizes."""
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
    attn_implementation: str | None = SDPA_PADDING_SAFE
    """E.g. "sdpa", "eager" or "flash_attention_2" (the tiny model too); None lets transformers choose.
    The default is transformers' SDPA with a mask that lets a left-padding row attend somewhere (no NaN)."""


# ------------------------------------------------------------------------------------------ loading
def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {name!r}") from None


def load_video_llm(config: VideoLLMConfig, vocabulary: list[str] | None = None) -> tuple[nn.Module, Any]:
    """(model, processor) for `config`; the tiny model needs the world's `vocabulary`."""
    if config.name_or_path == TINY:
        model, processor = build_tiny(config.tiny, config.vision_tower, vocabulary)
        if config.attn_implementation:
            model.set_attn_implementation(config.attn_implementation)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = config.name_or_path
        kwargs: dict[str, Any] = {
            "dtype": _dtype(config.torch_dtype),
            "trust_remote_code": config.trust_remote_code,
        }
        if config.attn_implementation:
            kwargs["attn_implementation"] = config.attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        if getattr(processor, "tokenizer", None) is not None and processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return prepare_for_training(model, config), processor


# Attribute names of the vision tower(s) in the HF video-LLM families (Video-LLaVA has an image and a video
# tower); frozen by default and never given LoRA adapters.
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "video_tower", "image_tower")


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower(s) of a video-LLM, found by the attribute names the HF families use."""
    found = []
    for name in VISION_TOWER_NAMES:
        for holder in (model, getattr(model, "model", None)):
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, nn.Module) and module not in found:
                found.append(module)
    return found


def prepare_for_training(model: nn.Module, config: VideoLLMConfig) -> nn.Module:
    """Freeze the vision tower, wrap with LoRA adapters when asked, and turn on gradient checkpointing."""
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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_hf(model: nn.Module, processor: Any, folder: str | Path, meta: dict | None = None) -> Path:
    """Save a model (merged full weights, or a peft adapter) with its processor, loadable by name_or_path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if meta:
        (folder / "answerability.json").write_text(json.dumps(meta, indent=2))
    return folder
