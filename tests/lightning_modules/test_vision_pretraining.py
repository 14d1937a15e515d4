"""Stage 0 of the tiny model: the vision tower's dense pretraining, and the projector it starts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from datamodules.shapes.frames import LABELS
from lightning_modules.tiny import TinyArchitecture
from lightning_modules.video_llm import VideoLLMConfig, load_video_llm
from lightning_modules.vision_pretraining import VisionPretraining

ARCH = {"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "text_hidden": 48, "text_layers": 1,
        "text_heads": 2}


@pytest.fixture(scope="module")
def pretrained_tower(tmp_path_factory, synthetic_data, run_main):
    """`main.py fit` of the vision stage on the test clips (a few steps), as the demo runs it."""
    out = tmp_path_factory.mktemp("vision")
    run_main([
        "fit",
        "--seed_everything=0",
        "--model=lightning_modules.vision_pretraining.VisionPretraining",
        f"--model.init_args.output_dir={out / 'tower'}",
        *[f"--model.init_args.tiny.{key}={value}" for key, value in ARCH.items()],
        "--data=datamodules.shapes.frames.SceneFramesDataModule",
        f"--data.init_args.data_dir={synthetic_data}",
        "--data.init_args.frames_per_clip=2",
        "--data.init_args.batch_size=4",
        f"--trainer.default_root_dir={out}",
        "--trainer.max_steps=3",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ])
    return out / "tower"


def batch(module: VisionPretraining, n: int = 3):
    grid = module.arch.image_size // module.arch.patch_size // 2
    labels = torch.zeros(n, grid, grid, len(LABELS) + 2)
    # a circle of colour 2, size 1, motion 3, touching another object
    labels[:, 0, 0, : len(LABELS)] = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0])
    labels[:, 0, 0, len(LABELS) :] = torch.tensor([-0.75, -0.75])
    patches = torch.zeros(n, 2 * grid, 2 * grid, dtype=torch.long)
    patches[:, :2, :2] = 1
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8), labels, patches


def test_every_loss_term_is_finite_and_reaches_the_tower():
    torch.manual_seed(0)
    module = VisionPretraining(tiny=TinyArchitecture(**ARCH))
    out = module.model_step(batch(module))
    expected = {f"loss_{name}" for name in LABELS} | {f"loss_{name}_presence" for name in LABELS}
    assert expected | {"loss_centre", "loss_patch_shape"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.tower.parameters())
    assert module.patch_head.weight.grad.abs().sum() > 0
    without = VisionPretraining(tiny=TinyArchitecture(**ARCH), patch_weight=0.0).model_step(batch(module))
    assert "loss_patch_shape" not in without


def test_concept_heads_are_log_odds_against_no_object():
    torch.manual_seed(0)
    module = VisionPretraining(tiny=TinyArchitecture(**ARCH))
    weight, bias = module.concept_heads()
    features = torch.randn(5, ARCH["vision_hidden"])
    raw, concept = module.heads(features), F.linear(features, weight, bias)
    start = 0
    for classes in LABELS.values():
        log_odds = raw[:, start : start + classes] - raw[:, start : start + 1]
        assert torch.allclose(concept[:, start : start + classes], log_odds, atol=1e-5)
        start += classes
    assert torch.allclose(concept[:, start:], raw[:, start:]), "the centre rows are kept"


def test_the_pretrained_tower_starts_the_projector_as_concept_to_word(pretrained_tower, tmp_path,
                                                                      export_tiny):
    info = json.loads((pretrained_tower / "cell_heads.json").read_text())
    assert (pretrained_tower / "config.json").is_file() and info["typical_logit"] >= 1.0
    assert [axis["positive"] for axis in info["axes"]] == ["right", "below"]
    exported = export_tiny(tmp_path / "tiny", f"--vision-tower={pretrained_tower}", **ARCH)
    model, processor = load_video_llm(VideoLLMConfig(name_or_path=str(exported)))
    projector, words = model.model.multi_modal_projector, processor.tokenizer.get_vocab()
    embeddings = model.get_input_embeddings().weight
    classes = info["classes"]
    to_word = projector.linear_2.weight
    for word in ("red", "touching"):
        scaled = embeddings[words[word]] / info["typical_logit"]
        assert torch.allclose(to_word[:, classes.index(word)], scaled)
    assert "apart" not in words and not to_word[:, classes.index("apart")].any(), "no word: no direction"
    assert projector.linear_2.weight[:, classes.index("")].abs().sum() == 0, "no object maps to no word"
    # The axis units move a token along "left" -> "right" in proportion to the centre offset.
    features = torch.randn(7, ARCH["vision_hidden"])
    with torch.no_grad():
        hidden = projector.act(projector.linear_1(features))
        x_unit = len(classes)
        moved = hidden[:, x_unit : x_unit + 2] @ projector.linear_2.weight[:, x_unit : x_unit + 2].T
        offset = projector.linear_1(features)[:, x_unit]
    direction = (embeddings[words["right"]] - embeddings[words["left"]]) / 2
    assert torch.allclose(moved, offset[:, None] * direction, atol=1e-5)
    weight, bias = _heads(pretrained_tower)
    row = info["axes"][0]["row"]
    assert torch.allclose(offset, features @ weight[row] + bias[row], atol=1e-6)


def _heads(folder):
    from safetensors.torch import load_file

    heads = load_file(str(folder / "cell_heads.safetensors"))
    return heads["weight"], heads["bias"]


def test_an_interrupted_tower_export_leaves_the_previous_tower(tmp_path, monkeypatch):
    from transformers import CLIPVisionModel

    module = VisionPretraining(TinyArchitecture(**ARCH))
    monkeypatch.setattr(module, "typical_logit", lambda: 1.0)  # needs a trainer's validation data
    folder = module.save_tower(tmp_path / "tower")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "cell_heads.json", "cell_heads.safetensors"} <= set(before)
    with torch.no_grad():
        for parameter in module.tower.parameters():
            parameter.add_(1.0)

    def killed(_folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_heads", killed)  # the tower's new weights are written by then
    with pytest.raises(KeyboardInterrupt):
        module.save_tower(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["tower"]
    CLIPVisionModel.from_pretrained(folder)
