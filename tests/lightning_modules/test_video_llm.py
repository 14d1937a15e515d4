"""The embedded tiny video-LLM's construction."""

from __future__ import annotations

import pytest

from lightning_modules.video_llm import TinyArchitecture, VideoLLMConfig, load_video_llm


@pytest.mark.parametrize("width, given, expected", [(64, None, 0.125), (64, 0.02, 0.02)])
def test_language_model_starts_at_its_width_scale(width, given, expected):
    """By default the language model's weights start with std 1 / sqrt(width), not HF's fixed 0.02."""
    arch = TinyArchitecture(text_hidden=width, text_heads=4, text_layers=1, vision_layers=1, vision_hidden=32,
                            initializer_range=given)
    model, _ = load_video_llm(VideoLLMConfig(tiny=arch))
    assert model.config.text_config.initializer_range == pytest.approx(expected)
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert weight.std().item() == pytest.approx(expected, rel=0.1)
