"""Model construction: any Hugging Face video-LLM with its processor, or the embedded tiny one.

`load_video_llm` is the one entry point. A name or path loads a real checkpoint through
`AutoModelForImageTextToText` / `AutoProcessor`; the name `"tiny"` builds the embedded default, a small
`LlavaNextVideoForConditionalGeneration` (CLIP vision tower + Llama) with a word-level tokenizer made in
code and the real LLaVA-NeXT-Video processor around it. Nothing is downloaded for the tiny model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


AttentionMaskInterface.register("sdpa", _sdpa_mask_attending_somewhere)

TINY = "tiny"
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", VIDEO_TOKEN, IMAGE_TOKEN)
# The LLaVA-NeXT-Video conversation format ("USER: <video>\n... ASSISTANT: ..."), as a chat template.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<video>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


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


@dataclass
class TinyArchitecture:
    """Sizes of the embedded tiny video-LLM (a real `LlavaNextVideoForConditionalGeneration`)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    max_positions: int = 256
    initializer_range: float | None = None
    """Std of the language model's initial weights; None: 1 / sqrt(text_hidden) (0.072 at 192 wide). HF's
    0.02 suits 1,000s-wide models; at 192 wide it keeps attention uniform for hundreds of steps."""

    @property
    def text_init_std(self) -> float:
        return self.initializer_range if self.initializer_range is not None else self.text_hidden**-0.5


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
    attn_implementation: str | None = None
    """E.g. "sdpa", "eager" or "flash_attention_2" (the tiny model too); None lets transformers choose."""


# ---------------------------------------------------------------------------------------- tokenizer
def build_word_tokenizer(
    vocabulary: list[str],
    named_tokens: dict[str, str] | None = None,
    extra_tokens: tuple[str, ...] | list[str] = (),
    eos_token: str = "</s>",
):
    """A word-level `PreTrainedTokenizerFast` over `vocabulary` (lowercased words and punctuation).

    `named_tokens` are special tokens the processor finds by attribute (default: `video_token` "<video>" and
    `image_token` "<image>"); `extra_tokens` are further special tokens of a family's chat template (for
    example Qwen's "<|im_start|>"); `eos_token` ends an assistant turn. The defaults give the embedded tiny
    model's tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    named = {"video_token": VIDEO_TOKEN, "image_token": IMAGE_TOKEN}
    if named_tokens is not None:
        named = dict(named_tokens)
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *named.values(), *extra_tokens, eos_token]))
    words = sorted({w.lower() for w in vocabulary} - set(specials))
    punctuation = [".", ",", "?", ":", "!", "'", "\n"]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *punctuation, "user", "assistant"])}
    for token in specials:
        vocab.setdefault(token, len(vocab))
    for word in words:
        vocab.setdefault(word, len(vocab))
    model = WordLevel(vocab=vocab, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Lowercase()
    # Split on whitespace, and keep punctuation and newlines as tokens of their own.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[.,?:!']"), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=eos_token,
        extra_special_tokens=named,
        padding_side="left",
        model_max_length=1024,
    )
    return fast


def build_tiny_processor(vocabulary: list[str], arch: TinyArchitecture):
    """The real LLaVA-NeXT-Video processor around the word-level tokenizer, sized for `arch`."""
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    tokenizer = build_word_tokenizer(vocabulary)
    size = {"shortest_edge": arch.image_size}
    crop = {"height": arch.image_size, "width": arch.image_size}
    video_processor = LlavaNextVideoVideoProcessor(size=size, crop_size=crop)
    image_processor = LlavaNextImageProcessor(
        size=size, crop_size=crop, image_grid_pinpoints=[[arch.image_size, arch.image_size]]
    )
    return LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TINY_CHAT_TEMPLATE,
        patch_size=arch.patch_size,
        vision_feature_select_strategy="default",
        video_token=VIDEO_TOKEN,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def tiny_vision_config(arch: TinyArchitecture):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_hidden * 4,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        projection_dim=arch.vision_hidden,
    )


def build_tiny_model(tokenizer, arch: TinyArchitecture, vision_tower: str | None = None):
    """A randomly initialised tiny `LlavaNextVideoForConditionalGeneration`, maybe with a trained tower."""
    from transformers import (
        CLIPVisionModel,
        LlamaConfig,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_hidden * 4,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=arch.max_positions,
        initializer_range=arch.text_init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaNextVideoConfig(
        vision_config=tiny_vision_config(arch).to_dict(),
        text_config=text_config.to_dict(),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        spatial_pool_stride=2,
        spatial_pool_mode="average",
        image_grid_pinpoints=[[arch.image_size, arch.image_size]],
        video_seq_length=(arch.image_size // arch.patch_size) ** 2 // 4,
        tie_word_embeddings=True,  # answering by copying a word the video token carries
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    model = LlavaNextVideoForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if vision_tower is not None:
        tower = CLIPVisionModel.from_pretrained(vision_tower)
        missing, unexpected = model.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"vision tower {vision_tower}: mismatched weights (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); was it trained with the same tiny sizes?"
            )
        if not _project_to_words(model, tokenizer, Path(vision_tower)):
            _match_projector_scale(model)
    return model


def _project_to_words(model: nn.Module, tokenizer, tower_dir: Path) -> bool:
    """Start the projector as "tower concept -> word embedding", when the tower comes with its probe heads.

    The vision pretraining stage saves linear heads that read each video-token cell's shape, colour, size
    and motion (`cell_heads.safetensors`, class names in `cell_heads.json`). The projector's first layer
    starts as those heads (one hidden unit per class), its second layer maps each class unit to the
    embedding of the class's word ("red", "circle", ...; none for "no object"). A video token then starts
    near the sum of its object's word embeddings, and with tied input/output embeddings the language model
    can answer by copying: the closed-form version of LLaVA's projector-alignment stage. The heads' centre
    rows (`axes`) move the token along "left" -> "right" and "above" -> "below" with the object's position.
    Returns False when the tower has no heads.
    """
    heads_path, names_path = tower_dir / "cell_heads.safetensors", tower_dir / "cell_heads.json"
    if not (heads_path.is_file() and names_path.is_file()):
        return False
    from safetensors.torch import load_file

    heads = load_file(str(heads_path))
    info = json.loads(names_path.read_text())
    classes: list[str] = info["classes"]  # one name per head row; "" for rows that map to no word
    axes: list[dict] = info.get("axes", [])  # head rows that are signed offsets between two words
    projector = model.model.multi_modal_projector
    first, second = projector.linear_1, projector.linear_2
    units = len(classes) + 2 * len(axes)
    if units > first.out_features:
        return False
    embeddings = model.get_input_embeddings().weight
    words = tokenizer.get_vocab()
    with torch.no_grad():
        first.weight[: len(classes)] = heads["weight"]
        first.bias[: len(classes)] = heads["bias"]
        second.weight.zero_()  # units beyond the heads' stay silent
        for unit, word in enumerate(classes):
            if word in words:
                second.weight[:, unit] = embeddings[words[word]] / float(info.get("typical_logit", 1.0))
        # An axis v takes two units, +v and -v: gelu(v) - gelu(-v) = v, so the token moves linearly along
        # (positive word - negative word) / 2 with the offset.
        for number, axis in enumerate(axes):
            unit = len(classes) + 2 * number
            row = axis["row"]
            if axis["positive"] not in words or axis["negative"] not in words:
                continue
            direction = (embeddings[words[axis["positive"]]] - embeddings[words[axis["negative"]]]) / 2
            first.weight[unit], first.bias[unit] = heads["weight"][row], heads["bias"][row]
            first.weight[unit + 1], first.bias[unit + 1] = -heads["weight"][row], -heads["bias"][row]
            second.weight[:, unit], second.weight[:, unit + 1] = direction, -direction
        # The bias is one fixed "nothing here" vector of a word's norm: every empty cell becomes the same
        # token (the language model's norm would blow any small, varying residue up to full size), and an
        # object's token is that vector plus its words.
        nothing = torch.randn(second.bias.shape, generator=torch.Generator().manual_seed(0))
        second.bias.copy_(nothing / nothing.norm() * embeddings.norm(dim=-1).mean())
    return True


def _match_projector_scale(model: nn.Module) -> None:
    """Scale the projector's last layer so projected video tokens start at the text embeddings' norm.

    A pretrained tower's features are far larger than freshly initialised text embeddings; without this,
    video tokens dominate the residual stream and the language model learns little from the text.
    """
    with torch.no_grad():
        text_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
        arch_size = model.config.vision_config.image_size
        pixels = torch.randn(8, 3, arch_size, arch_size)
        features = model.model.get_video_features(
            pixels.unsqueeze(0),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        scale = float(text_norm / features.norm(dim=-1).mean().clamp_min(1e-6))
        projector = model.model.multi_modal_projector
        projector.linear_2.weight.mul_(scale)
        if projector.linear_2.bias is not None:
            projector.linear_2.bias.mul_(scale)


# ------------------------------------------------------------------------------------------ loading
def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {name!r}") from None


def load_video_llm(config: VideoLLMConfig, vocabulary: list[str] | None = None) -> tuple[nn.Module, Any]:
    """(model, processor) for `config`; the tiny model needs the world's `vocabulary`."""
    if config.name_or_path == TINY:
        if vocabulary is None:
            from datamodules.writers import template_vocabulary

            vocabulary = template_vocabulary()
        processor = build_tiny_processor(vocabulary, config.tiny)
        model = build_tiny_model(processor.tokenizer, config.tiny, config.vision_tower)
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
