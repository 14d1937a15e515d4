"""The embedded tiny video-LLM: real Hugging Face classes at tiny sizes, built from a config, no download.

A `LlavaNextVideoForConditionalGeneration` (CLIP vision tower + Llama) with a word-level tokenizer made in
code over the synthetic world's vocabulary and the real LLaVA-NeXT-Video processor around it. The vision
tower can come from the vision pretraining stage (`vision_pretraining.py`), whose probe heads also start
the projector. The command saves it as an ordinary Hugging Face checkpoint folder, which `load_video_llm`
loads by path like any other:

    python -m lightning_modules.tiny --out outputs/shapes/tiny \
        [--vision-tower outputs/shapes/vision_tower] [--seed 0] [--text-layers 4 ...]

The weights are those that `build_tiny` gives right after `torch.manual_seed(seed)` (the caller's random
state is left as it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from datamodules.errors import USER_ERRORS, UserError, user_error_message
from lightning_modules.video_llm import check_model_path, save_hf

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


class VisionTowerError(UserError):
    """A vision tower folder whose weights do not fit the tiny model's sizes."""


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
            raise VisionTowerError(
                f"vision tower {vision_tower}: mismatched weights (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); was it trained with the same tiny sizes?"
            )
        if not _project_to_words(model, tokenizer, Path(vision_tower)):
            _match_projector_scale(model)
    return model


def _project_to_words(model: nn.Module, tokenizer, tower_dir: Path) -> bool:
    """Start the projector as "tower concept -> word embedding", when the tower comes with its probe heads.

    The vision pretraining stage saves linear heads that read each video-token cell's shape, colour, size,
    motion and contact (`cell_heads.safetensors`, class names in `cell_heads.json`). The projector's first
    layer starts as those heads (one hidden unit per class), its second layer maps each class unit to the
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


def build_tiny(arch: TinyArchitecture, vision_tower: str | None = None, vocabulary: list[str] | None = None):
    """(model, processor) of the tiny video-LLM; `vocabulary` defaults to the synthetic world's words."""
    if vocabulary is None:
        from datamodules.shapes.questions import template_vocabulary

        vocabulary = template_vocabulary()
    processor = build_tiny_processor(vocabulary, arch)
    return build_tiny_model(processor.tokenizer, arch, vision_tower), processor


# ------------------------------------------------------------------------------------------- export
def export_tiny(
    out: str | Path,
    arch: TinyArchitecture | None = None,
    vision_tower: str | None = None,
    seed: int = 0,
    vocabulary: list[str] | None = None,
) -> Path:
    """Build the tiny video-LLM right after `torch.manual_seed(seed)` (the caller's random state untouched)
    and save it with its processor as a Hugging Face folder at `out`, which is replaced as a whole and only
    once the new one is complete (`video_llm.save_hf`)."""
    arch = arch or TinyArchitecture()
    if vision_tower is not None:
        check_model_path(vision_tower, "--vision-tower")
        if not Path(vision_tower).is_dir():
            raise VisionTowerError(f"--vision-tower: {vision_tower} is not a folder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = build_tiny(arch, vision_tower, vocabulary)
    meta = {
        "model": "tiny",
        "architecture": dataclasses.asdict(arch),
        "vision_tower": str(vision_tower) if vision_tower else "random",
        "seed": seed,
    }
    return save_hf(model, processor, out, meta)


def _architecture_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` option per `TinyArchitecture` field, defaulting to the field's default."""
    for field in dataclasses.fields(TinyArchitecture):
        kind = float if field.default is None or isinstance(field.default, float) else int
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default,
                            help=f"TinyArchitecture.{field.name} (default {field.default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.tiny",
        description="Build the tiny video-LLM (a LLaVA-NeXT-Video of tiny sizes over the synthetic world's "
        "words) and save it as a Hugging Face checkpoint folder.",
    )
    parser.add_argument("--out", required=True, help="the checkpoint folder to write (replaced if it exists)")
    parser.add_argument("--vision-tower", default=None,
                        help="a CLIPVisionModel folder (the vision pretraining stage's output); else random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    _architecture_arguments(parser)
    args = parser.parse_args(argv)
    sizes = {field.name: getattr(args, field.name) for field in dataclasses.fields(TinyArchitecture)}
    try:
        out = export_tiny(args.out, TinyArchitecture(**sizes), args.vision_tower, args.seed)
    except USER_ERRORS as error:
        print(f"error: {user_error_message(error)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
