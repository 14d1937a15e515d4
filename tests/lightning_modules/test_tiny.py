"""The tiny model's export command (`python -m lightning_modules.tiny`): the folder it writes loads through
`load_video_llm` like any checkpoint, with the weights and processor of the in-memory build, and replaces an
existing folder only once it is complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_modules.tiny import TinyArchitecture, build_tiny, main
from lightning_modules.video_llm import VideoLLMConfig, load_video_llm


def architecture(folder) -> TinyArchitecture:
    return TinyArchitecture(**json.loads((folder / "answerability.json").read_text())["architecture"])


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_export_loads_like_a_checkpoint_with_the_in_memory_weights(tiny_base):
    """Seed 0's export is `build_tiny` right after `torch.manual_seed(0)`, tensor for tensor (the weights the
    demo's base stage built in-process after `seed_everything: 0`)."""
    model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    torch.manual_seed(0)
    built, _ = build_tiny(architecture(tiny_base))
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    loaded, expected = model.state_dict(), built.state_dict()
    assert loaded.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(loaded[k], expected[k])] == []


def test_the_export_leaves_the_callers_random_state(tmp_path, export_tiny):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    export_tiny(tmp_path / "tiny", vision_layers=1, text_layers=1)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_processor_round_trips(tiny_base):
    """The saved processor, reloaded by `load_video_llm`, renders and tokenises a chat with a video, and
    preprocesses its frames, as the in-memory one does."""
    _, loaded = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    _, built = build_tiny(architecture(tiny_base))
    question = {"type": "text", "text": "What colour is the circle?"}
    chat = [
        {"role": "user", "content": [{"type": "video"}, question]},
        {"role": "assistant", "content": [{"type": "text", "text": "The circle is red."}]},
    ]
    video = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    outputs = []
    for processor in (loaded, built):
        text = processor.apply_chat_template(chat)
        outputs.append((text, processor(text=[text], videos=[video], return_tensors="pt")))
    (text, ours), (expected_text, theirs) = outputs
    assert text == expected_text and "<video>" in text
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert loaded.tokenizer.unk_token_id not in ours["input_ids"][0].tolist(), "every word is a token"
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"], rtol=0, atol=0)
    assert loaded.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert (loaded.tokenizer.pad_token, loaded.tokenizer.eos_token) == ("<pad>", "</s>")


def test_an_existing_folder_is_replaced_only_at_the_end(tmp_path, monkeypatch, export_tiny):
    from transformers import LlavaNextVideoProcessor

    folder = export_tiny(tmp_path / "tiny", vision_layers=1, text_layers=1)
    before = files_of(folder)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LlavaNextVideoProcessor, "save_pretrained", killed)  # after the new weights
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(folder), "--seed", "1", "--vision-layers", "1", "--text-layers", "1"])
    assert files_of(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "no temporary folder left"

    monkeypatch.undo()
    export_tiny(folder, "--seed", "1", vision_layers=1, text_layers=1)
    after = files_of(folder)
    assert after.keys() == before.keys() and after != before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_a_missing_vision_tower_is_one_error_naming_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--out", "tiny", "--vision-tower", "outputs/shapes/vision_tower"]) == 2
    assert capsys.readouterr().err == (
        "error: --vision-tower: outputs/shapes/vision_tower does not exist; it is made by "
        "`python main.py fit -c configs/shapes/vision.yaml`\n"
    )
    assert not (tmp_path / "tiny").exists()
