"""Tiny random checkpoints of each supported video-LLM family, saved like a hub checkpoint.

Each builder makes the family's real model class from a small config and its real processor class (image and
video processors sized small) around a word-level tokenizer made in code, with the family's real chat
template (`fixtures/chat_templates/`, sources in its SOURCES.md) unless another is given, and
`save_pretrained`s both into a folder that `load_video_llm` then loads by path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning_modules.tiny import TINY_CHAT_TEMPLATE, TinyArchitecture, build_word_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# The template file of each family (Qwen2-VL-Instruct ships the same template as Qwen2.5-VL-Instruct).
REAL_TEMPLATE = {"llava_next_video": "llava_next_video", "video_llava": "video_llava",
                 "qwen2_vl": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl", "llava_onevision": "llava_onevision"}


def real_template(family: str) -> str:
    """The chat template the family's hub checkpoint ships (see fixtures/chat_templates/SOURCES.md)."""
    return (TEMPLATES / f"{REAL_TEMPLATE[family]}.jinja").read_text()


# Words of the system prompts in the families' real templates, so they are not <unk> in the word tokenizer.
EXTRA_WORDS = ["you", "are", "a", "helpful", "assistant", "system", "user"]

IMAGE = 32  # frame side after the processor (px) for the CLIP / SigLIP families
PATCH = 16  # 2 x 2 patches a frame (LLaVA-NeXT-Video: patch 8, 4 x 4 pooled to 2 x 2)
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 512}

# Templates written for the tests before the real ones were collected; unlike the hub's Vicuna-style ones they
# close the assistant turn with the end-of-turn token themselves.
# Video-LLaVA's conversation format (Vicuna v1 style): "USER: <video>\n... ASSISTANT: ...</s>".
VIDEO_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# LLaVA-OneVision's (Qwen2 ChatML with the media token first).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2-VL / Qwen2.5-VL's, with its default system prompt.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TOKENS = {"video_token": "<|video_pad|>", "image_token": "<|image_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def _finish(model, tokenizer, processor, folder: Path, template: str) -> Path:
    processor.chat_template = template
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _clip():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=IMAGE, patch_size=PATCH, projection_dim=32).to_dict()


def _text(config_class, tokenizer, **extra):
    return config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False, **TEXT, **extra).to_dict()


def llava_next_video(folder: Path, vocabulary: list[str], template: str | None = None) -> Path:
    """The embedded default's builders, smaller: CLIP + Llama, 4 video tokens a frame (16 for 4 frames)."""
    from lightning_modules.tiny import build_tiny_model, build_tiny_processor

    arch = TinyArchitecture(image_size=IMAGE, patch_size=PATCH // 2, vision_hidden=32, vision_layers=1,
                            vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, max_positions=512)
    processor = build_tiny_processor(vocabulary, arch)
    model = build_tiny_model(processor.tokenizer, arch)
    template = template or real_template("llava_next_video")
    return _finish(model, processor.tokenizer, processor, folder, template)


def video_llava(folder: Path, vocabulary: list[str], template: str | None = None) -> Path:
    """CLIP video and image towers + Llama; the CLS token is kept for videos: 5 tokens a frame (20)."""
    from transformers import (
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    tokenizer = build_word_tokenizer(vocabulary)
    size, crop = {"shortest_edge": IMAGE}, {"height": IMAGE, "width": IMAGE}
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size=size, crop_size=crop),
        video_processor=VideoLlavaVideoProcessor(size=size, crop_size=crop), tokenizer=tokenizer,
        patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config = VideoLlavaConfig(
        vision_config=_clip(), text_config=_text(LlamaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(IMAGE // PATCH) ** 2, video_seq_length=8 * ((IMAGE // PATCH) ** 2 + 1),
    )
    model = VideoLlavaForConditionalGeneration(config)
    return _finish(model, tokenizer, processor, folder, template or real_template("video_llava"))


def llava_onevision(folder: Path, vocabulary: list[str], template: str | None = None) -> Path:
    """SigLIP + Qwen2; 2 x 2 patches pooled to 1 token a frame, plus a newline token (5)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_word_tokenizer(vocabulary, extra_tokens=["<|im_start|>"], eos_token="<|im_end|>")
    size = {"height": IMAGE, "width": IMAGE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[IMAGE, IMAGE]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
        num_image_tokens=(IMAGE // PATCH) ** 2, vision_feature_select_strategy="full",
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=IMAGE, patch_size=PATCH)
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=_text(Qwen2Config, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[IMAGE, IMAGE]],
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    return _finish(model, tokenizer, processor, folder, template or real_template("llava_onevision"))


def _qwen(folder: Path, vocabulary: list[str], version: str, template: str | None = None) -> Path:
    """Qwen2-VL or Qwen2.5-VL (`version` names the classes): own vision transformer, M-RoPE text model."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = build_word_tokenizer(
        vocabulary, named_tokens=QWEN_TOKENS, extra_tokens=["<|im_start|>"], eos_token="<|im_end|>"
    )
    # 64 px frames -> 56 x 56 (a multiple of patch 14 x merge 2): grid (2, 4, 4), 8 video tokens for 4 frames.
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
    processor_class = getattr(transformers, f"{version}Processor")
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
    )
    text = _text(getattr(transformers, f"{version}TextConfig"), tokenizer,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]})
    if version == "Qwen2VL":
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}
    else:
        vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "out_hidden_size": 32, "fullatt_block_indexes": [0], "window_size": 56}
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    config = getattr(transformers, f"{version}Config")(text_config=text, vision_config=vision, **ids)
    model = getattr(transformers, f"{version}ForConditionalGeneration")(config)
    return _finish(model, tokenizer, processor, folder, template or real_template("qwen2_5_vl"))


def qwen2_vl(folder: Path, vocabulary: list[str], template: str | None = None) -> Path:
    return _qwen(folder, vocabulary, "Qwen2VL", template)


def qwen2_5_vl(folder: Path, vocabulary: list[str], template: str | None = None) -> Path:
    return _qwen(folder, vocabulary, "Qwen2_5_VL", template)


FAMILIES: dict[str, Callable[..., Path]] = {
    "llava_next_video": llava_next_video,
    "video_llava": video_llava,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "llava_onevision": llava_onevision,
}
"""model_type -> builder(folder, vocabulary, template=None) -> folder."""

TEST_TEMPLATES = {"llava_next_video": TINY_CHAT_TEMPLATE, "video_llava": VIDEO_LLAVA_TEMPLATE,
                  "qwen2_vl": QWEN_TEMPLATE, "qwen2_5_vl": QWEN_TEMPLATE,
                  "llava_onevision": ONEVISION_TEMPLATE}
"""The templates written for the tests (LLaVA-NeXT-Video: the embedded tiny model's); each closes the
assistant turn with the end-of-turn token itself."""


def checkpoint_builder(root: Callable[[str], Path], vocabulary: list[str]) -> Callable[[str], str]:
    """`get(family)`: the folder of the family's tiny checkpoint, built on first use in `root(family)` (e.g.
    `tmp_path_factory.mktemp`) from seed 0, so its random weights do not depend on the tests run before."""
    import torch

    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                built[family] = str(FAMILIES[family](root(family), vocabulary))
        return built[family]

    return get
