"""Loading a video-LLM (the embedded tiny one, exported by its command and loaded by path), the tiny model's
export, and the atomic export of a trained model."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from lightning_modules.video_llm import SDPA_PADDING_SAFE, LoraSettings, VideoLLMConfig, load_video_llm

TWO_LAYERS = {"text_hidden": 32, "text_heads": 2, "text_layers": 2, "vision_layers": 1, "vision_hidden": 32}


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory, export_tiny):
    """The tiny model with a 2-layer language model, exported."""
    return export_tiny(tmp_path_factory.mktemp("two_layers") / "tiny", **TWO_LAYERS)


@pytest.mark.parametrize("width, given, expected", [(64, None, 0.125), (64, 0.02, 0.02)])
def test_language_model_starts_at_its_width_scale(width, given, expected, tmp_path, export_tiny):
    """By default the language model's weights start with std 1 / sqrt(width), not HF's fixed 0.02."""
    sizes = {"text_hidden": width, "text_heads": 4, "text_layers": 1, "vision_layers": 1, "vision_hidden": 32}
    if given is not None:
        sizes["initializer_range"] = given
    model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(export_tiny(tmp_path / "tiny", **sizes))))
    assert model.config.text_config.initializer_range == pytest.approx(expected)
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert weight.std().item() == pytest.approx(expected, rel=0.1)


def test_a_left_padded_batch_stays_finite_where_sdpa_gives_nan_to_rows_with_no_key(monkeypatch, two_layers):
    """CUDA's SDPA kernels return NaN for a query row that may attend to no key (the CPU's returns 0), so a
    left-padding position went NaN and spread to its whole sequence (seen on an H200 in bf16). Emulated here:
    the padded sequence must match the same sequence alone. transformers' own "sdpa" is left as it is for
    every other model in the process: it still gives the NaN."""
    model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(two_layers)))
    language_model = model.model.language_model.eval()
    assert language_model.config._attn_implementation == SDPA_PADDING_SAFE
    plain, _ = load_video_llm(VideoLLMConfig(name_or_path=str(two_layers), attn_implementation="sdpa"))
    real = torch.nn.functional.scaled_dot_product_attention

    def cuda_like(query, key, value, attn_mask=None, **kwargs):
        out = real(query, key, value, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            out = out.masked_fill(~attn_mask.any(dim=-1, keepdim=True), float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", cuda_like)
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = language_model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = language_model(input_ids=ids[:1, 2:]).last_hidden_state
        unsafe = plain.model.language_model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, 2:], alone[0], atol=1e-5, rtol=1e-4)
    assert torch.isnan(unsafe[0]).all() and torch.isfinite(unsafe[1]).all()


def test_the_tiny_model_takes_the_configured_attention_implementation(two_layers):
    """`attn_implementation` reaches the tiny model's language model and vision tower, and only changes the
    kernel: eager attention gives the same logits as SDPA on the same weights and a left-padded batch."""
    models = {}
    for implementation in (SDPA_PADDING_SAFE, "eager"):
        config = VideoLLMConfig(name_or_path=str(two_layers), attn_implementation=implementation)
        model, _ = load_video_llm(config)
        models[implementation], config = model, model.config
        assert config.text_config._attn_implementation == implementation
        assert config.vision_config._attn_implementation == implementation
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        sdpa, eager = (models[k].eval()(input_ids=ids, attention_mask=mask).logits
                       for k in (SDPA_PADDING_SAFE, "eager"))
    torch.testing.assert_close(eager[0, 2:], sdpa[0, 2:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eager[1], sdpa[1], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- missing paths
@pytest.mark.parametrize(
    "name, path_like",
    [("llava-hf/LLaVA-NeXT-Video-7B-hf", False), ("gpt2", False), ("outputs/shapes/base/hf_model", True),
     ("./model", True), ("/models/x", True), ("~/x", True), ("mine/model", True), ("owner/model", False)],
)
def test_path_like_names(name, path_like, tmp_path, monkeypatch):
    from lightning_modules.video_llm import looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # a folder named by the leading part: a path, not a hub id
    assert looks_like_path(name) == path_like


def test_a_missing_local_model_is_one_error_naming_it(tmp_path, monkeypatch):
    from lightning_modules.video_llm import ModelPathError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelPathError) as info:
        load_video_llm(VideoLLMConfig(name_or_path="./outputs/shapes/base/hf_model"))
    assert str(info.value) == ("model.name_or_path: ./outputs/shapes/base/hf_model does not exist; it is "
                               "made by `python main.py fit -c configs/shapes/base.yaml`")
    with pytest.raises(ModelPathError, match=r"^model.name_or_path: /nowhere/model does not exist$"):
        load_video_llm(VideoLLMConfig(name_or_path="/nowhere/model"))
    with pytest.raises(ModelPathError) as info:
        load_video_llm(VideoLLMConfig(name_or_path="outputs/shapes/tiny"))
    assert str(info.value) == ("model.name_or_path: outputs/shapes/tiny does not exist; it is made by "
                               "`python -m lightning_modules.tiny --out outputs/shapes/tiny --vision-tower "
                               "outputs/shapes/vision_tower`")


def test_the_retired_name_tiny_is_one_error_naming_the_export_command(tmp_path, monkeypatch):
    from lightning_modules.video_llm import ModelPathError

    monkeypatch.chdir(tmp_path)
    expected = ("model.name_or_path: 'tiny' is no longer built in: write the tiny model as a folder with "
                "`python -m lightning_modules.tiny --out DIR` and give DIR")
    with pytest.raises(ModelPathError, match=f"^{re.escape(expected)}$"):
        load_video_llm(VideoLLMConfig(name_or_path="tiny"))


# ------------------------------------------------------------------------------------- atomic export

def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_that_fails_midway_leaves_the_previous_model(tmp_path, monkeypatch, tiny_base):
    from lightning_modules.video_llm import save_hf

    model, processor = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    folder = save_hf(model, processor, tmp_path / "hf_model", {"base": "tiny"})
    before = files_of(folder)
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(processor, "save_pretrained", killed)  # after the new weights are written
    with pytest.raises(KeyboardInterrupt):
        save_hf(model, processor, folder, {"base": "tiny"})
    assert files_of(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf_model"], "no temporary folder left"
    loaded, _ = load_video_llm(VideoLLMConfig(name_or_path=str(folder)))  # the old export, whole
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in reference.items())

    monkeypatch.undo()
    save_hf(model, processor, folder, {"base": "tiny"})
    assert files_of(folder) != before and [p.name for p in tmp_path.iterdir()] == ["hf_model"]


def test_an_export_killed_between_its_renames_is_put_back(tmp_path):
    from lightning_modules.video_llm import replacing_folder

    folder = tmp_path / "hf_model"
    aside = tmp_path / ".hf_model.replaced-x1"
    aside.mkdir()
    (aside / "config.json").write_text("old")
    (tmp_path / ".hf_model.exporting-x2").mkdir()  # a killed export's half-written folder
    with pytest.raises(RuntimeError), replacing_folder(folder) as temporary:
        (temporary / "config.json").write_text("new")
        raise RuntimeError("failed")
    assert (folder / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["hf_model"]


def test_an_export_has_the_modes_of_the_users_umask(tmp_path, tiny_base):
    """Others on a shared machine can read an exported model (umask 022: folders 0755, files 0644), also one
    made by `save_smollm2_video` (through its staging folder)."""
    from lightning_modules.smollm2_video import save_smollm2_video
    from lightning_modules.video_llm import save_hf

    model, processor = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    umask = os.umask(0o022)
    try:
        folders = [save_hf(model, processor, tmp_path / "hf_model", {"base": "tiny"}),
                   save_smollm2_video(model, processor, tmp_path / "smollm2", {"base": "tiny"})]
    finally:
        os.umask(umask)
    for folder in folders:
        paths = (folder, *folder.rglob("*"))
        modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in paths}
        assert f"{folder.name}/model.safetensors" in modes, modes
        assert modes == {name: "0o755" if (tmp_path / name).is_dir() else "0o644" for name in modes}
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["hf_model", "smollm2"], "no staging folder left"


def test_lora_can_train_the_projector_in_full_beside_the_adapters(tiny_base):
    """`modules_to_save` trains the projector in full next to the adapters (the tower stays frozen), and
    disabling the adapters brings back the projector's original weights (the DPO reference, f0)."""
    for modules, expected in (([], False), (["multi_modal_projector"], True)):
        torch.manual_seed(0)
        lora = LoraSettings(r=2, alpha=4, modules_to_save=modules)
        model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base), lora=lora))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("lora_B" in n for n in trainable) and not any("vision_tower" in n for n in trainable)
        assert any("multi_modal_projector" in n for n in trainable) == expected
    projector = model.base_model.model.model.multi_modal_projector
    features = torch.randn(3, model.base_model.model.config.vision_config.hidden_size)
    before = projector(features)
    with torch.no_grad():
        for parameter in projector.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    assert not torch.allclose(projector(features), before)
    with model.disable_adapter():
        torch.testing.assert_close(projector(features), before)


def _clip_items(frames: int):
    """SFT items of two synthetic records, each with a rendered clip of `frames` frames (64 x 64)."""
    import random

    import numpy as np

    from datamodules.collation import Example
    from datamodules.records import QARecord
    from datamodules.shapes.world import sample_scene

    records = [QARecord("long-clip", "a.mp4", "what colour is the circle?", "the circle is red.", True),
               QARecord("other", "b.mp4", "what colour is the star?", "the star is red.", True)]
    clip = sample_scene(random.Random(0)).render()
    frames_array = clip[np.linspace(0, len(clip) - 1, frames).round().astype(int)]
    return [(Example(record, record.video), frames_array) for record in records]


def test_a_row_past_the_context_is_one_error_naming_the_record_and_the_settings(tiny_base):
    """The tiny model takes 256 positions; at 24 frames a row spans 24 x 16 video tokens and its text (the
    demo's model used to train on such rows without a word). Linear RoPE scaling x2 makes room for them."""
    from datamodules.collation import ChatCollator
    from datamodules.errors import UserError
    from lightning_modules.alignment import AlignmentModule
    from lightning_modules.video_llm import context_length

    module = AlignmentModule(VideoLLMConfig(name_or_path=str(tiny_base), num_frames=24))
    assert context_length(module.llm)[0] == 256
    batch = ChatCollator(module.processor, "sft", max_length=1024)(_clip_items(24))
    spanned = int(batch["attention_mask"].sum(dim=1).max())
    assert 256 < spanned <= 512
    with pytest.raises(UserError) as error:
        module.model_step(batch, "train")
    message = str(error.value)
    assert "\n" not in message and "'long-clip'" in message and f"{spanned} positions" in message
    assert all(s in message for s in ("data.num_frames", "data.max_length", "model.rope_scaling", "256"))
    with pytest.raises(UserError, match="with 24 new tokens"):
        module.generate(ChatCollator(module.processor, "generate")(_clip_items(24)))

    scaled = AlignmentModule(VideoLLMConfig(name_or_path=str(tiny_base), num_frames=24, rope_scaling=2.0))
    assert context_length(scaled.llm) == (512, "max_position_embeddings 256 x linear RoPE factor 2")
    assert torch.isfinite(scaled.model_step(batch, "train"))


def test_rows_inside_the_context_pass_the_check_by_their_positions(tiny_base):
    """The check counts each row's real positions: left padding is no position, and a DPO pair row's
    rejected response restarts after the prompt (its positions are those of [prompt][rejected])."""
    from datamodules.batch_format import Segment
    from datamodules.collation import ChatCollator
    from lightning_modules.preference import positions_spanned
    from lightning_modules.video_llm import ContextError, check_context

    model, processor = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2))
    items = [(dataclasses.replace(example, rejected="the circle is blue and small ."), clip)
             for example, clip in _clip_items(2)]
    sft = ChatCollator(processor, "sft")(items)
    assert positions_spanned(model, sft).tolist() == sft["attention_mask"].sum(dim=1).tolist()
    pairs = ChatCollator(processor, "dpo")(items)
    spanned = positions_spanned(model, pairs)
    parts = {segment: (pairs["pair_segments"] == segment).sum(dim=1) for segment in Segment}
    expected = parts[Segment.PROMPT] + torch.maximum(parts[Segment.CHOSEN], parts[Segment.REJECTED])
    assert spanned.tolist() == expected.tolist(), "the rejected response's positions restart after the prompt"
    assert (parts[Segment.REJECTED] > parts[Segment.CHOSEN]).all()
    check_context(model, spanned + 256 - int(spanned.max()), pairs["records"])
    with pytest.raises(ContextError, match="'long-clip'|'other'"):
        check_context(model, spanned + 257 - int(spanned.max()), pairs["records"])


def test_a_row_past_the_context_stops_fit_at_setup_before_any_step(tmp_path, cli_args, run_main, monkeypatch):
    """The longest rows are checked before training (`on_fit_start`): a run whose clips do not fit the
    tiny model's 256 positions stops before its first step, not when a batch first holds such a row."""
    from datamodules.errors import UserError
    from lightning_modules.alignment import AlignmentModule

    steps = []
    monkeypatch.setattr(AlignmentModule, "model_step", lambda self, *a: steps.append(1))
    frames = ["--data.init_args.num_frames=24", "--model.init_args.model.num_frames=24"]
    with pytest.raises(UserError, match="positions"):
        run_main(cli_args("fit", tmp_path, steps=1, extra=frames))
    assert steps == [], "no training or validation step ran"
