"""What a run on a real (hub-loaded) checkpoint relies on, checked on the tiny model saved and loaded by path
the same way: train mode in `fit` (gradient checkpointing recomputes), dropout off for DPO, video frame-size
limits, greedy generation that is greedy, and SFT loss normalised over the accumulation window.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from datamodules.answerability import AnswerabilityDataModule
from datamodules.collation import ChatCollator, Example
from datamodules.records import RecordError, read_records
from datamodules.video import read_video
from lightning_modules.alignment import AlignmentModule
from lightning_modules.losses import sequence_logps
from lightning_modules.video_llm import (
    LoraSettings,
    VideoLLMConfig,
    disable_dropout,
    load_video_llm,
    save_hf,
    set_training_mode,
    vision_modules,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

NUM_FRAMES = 2


def data(synthetic_data: Path, objective: str, batch_size: int = 4) -> AnswerabilityDataModule:
    return AnswerabilityDataModule(data_dir=str(synthetic_data), objective=objective, num_frames=NUM_FRAMES,
                                   batch_size=batch_size, eval_batch_size=4)


def trainer(out: Path, steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=out, accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
                     num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks), **kwargs)


class Modes(L.Callback):
    """The training flag of the policy, its vision tower(s) and the reference, at each training batch."""

    def __init__(self):
        self.seen: list[tuple[bool, set[bool], bool | None]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        reference = None if module.reference is None else module.reference.training
        towers = {m.training for m in vision_modules(module.llm)}
        self.seen.append((module.llm.training, towers, reference))


@pytest.mark.parametrize("objective, checkpointing", [("sft", True), ("sft", False), ("dpo", True)])
def test_fit_trains_a_loaded_checkpoint_in_train_mode_so_checkpointing_recomputes(
    objective, checkpointing, tmp_path, tiny_base, synthetic_data
):
    """`from_pretrained` gives an eval-mode model and Lightning keeps modes: `fit` must switch the policy to
    train mode (vision tower and reference copy stay in eval), else transformers never checkpoints. Counted on
    a decoder layer's MLP (inside the checkpointed `forward`; the layer's own hooks run outside it): with
    checkpointing it runs twice a step (forward, then recomputed in backward), without it once."""
    torch.manual_seed(0)
    config = VideoLLMConfig(name_or_path=str(tiny_base), num_frames=NUM_FRAMES,
                            gradient_checkpointing=checkpointing)
    # DPO with the reference run in every step, so that a frozen reference copy is held during training.
    module = AlignmentModule(model=config, objective=objective, output_dir=str(tmp_path),
                             precompute_ref_log_probs=objective != "dpo")
    assert not module.llm.training, "from_pretrained returns eval mode"
    mlp = module.llm.model.language_model.layers[0].mlp
    calls = []
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    modes = Modes()
    trainer(tmp_path, 2, [modes]).fit(module, datamodule=data(synthetic_data, objective))
    assert len(modes.seen) == 2
    for llm, towers, reference in modes.seen:
        assert llm and towers == {False}
        assert reference is (False if objective == "dpo" else None), "the frozen reference copy stays in eval"
    # DPO's reference is a deep copy made at `setup`, hook included: one more pass a step, without gradients.
    per_step = (2 if checkpointing else 1) + (objective == "dpo")
    assert len(calls) == 2 * per_step, calls


def dpo_batch(module: AlignmentModule, synthetic_data: Path, count: int = 2) -> dict:
    records, _ = read_records(synthetic_data / "train.jsonl", synthetic_data)
    items = [(Example(r, str(synthetic_data / r.video), r.rejected), read_video(synthetic_data / r.video,
                                                                                NUM_FRAMES))
             for r in records[:count]]
    return ChatCollator(module.processor, "dpo")(items)


@pytest.fixture(scope="module")
def base_with_dropout(tiny_base, tmp_path_factory) -> Path:
    """The tiny base saved with attention dropout 0.5 in its text config (read by each attention module)."""
    model, processor = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    model.config.text_config.attention_dropout = 0.5
    return save_hf(model, processor, tmp_path_factory.mktemp("dropout") / "base")


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_disables_dropout_so_policy_equals_reference_at_init(disable, base_with_dropout, synthetic_data):
    """LoRA dropout 0.5 on a base with attention dropout 0.5, in train mode. Dropout disabled (the DPO
    default): at init the policy's log-probabilities of a pair equal the reference's (adapters disabled), and
    with non-zero adapters one pass equals the next. Dropout kept: the policy differs from the reference at
    init, and with non-zero adapters (LoRA's B starts at 0, hiding its dropout) from one pass to the next."""
    torch.manual_seed(0)
    config = VideoLLMConfig(name_or_path=str(base_with_dropout), num_frames=NUM_FRAMES,
                            lora=LoraSettings(r=4, alpha=8, dropout=0.5))
    module = AlignmentModule(model=config, objective="dpo", **({} if disable else {"disable_dropout": False}))
    set_training_mode(module.llm, module.config)
    assert module.llm.training
    batch = dpo_batch(module, synthetic_data)

    def logps():
        return sequence_logps(module(batch), batch["labels"])[0]

    with torch.no_grad():
        policy = logps()
        with module.llm.disable_adapter():
            reference = logps()
        for name, parameter in module.llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
        first, second = logps(), logps()
    dropouts = [m for n, m in module.llm.named_modules() if n.endswith("lora_dropout.default")]
    if disable:
        assert dropouts and all(m.p == 0 for m in dropouts)
        assert module.llm.peft_config["default"].lora_dropout == 0
        torch.testing.assert_close(policy, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
    else:
        assert dropouts and all(m.p == 0.5 for m in dropouts)
        assert not torch.allclose(policy, reference, atol=1e-3), "dropout noise in one pass, not the other"
        assert not torch.allclose(first, second, atol=1e-3), "dropout noise differs run to run"


def test_disable_dropout_zeroes_modules_and_configs(tiny_base):
    """Every nn.Dropout and every float dropout rate of modules and configs (sub-configs too) becomes 0."""
    model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base), lora=LoraSettings(dropout=0.3)))
    model.config.text_config.attention_dropout = 0.2
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.2
    disable_dropout(model)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]
    assert len(rates) > 4 and set(rates) == {0.0}
    assert model.config.text_config.attention_dropout == 0.0


# ------------------------------------------------------------------------------------ video frame size
@pytest.fixture(scope="module")
def qwen_with_image_limits(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL whose video processor allows 12.8M pixels a frame, as a hub checkpoint whose video
    limits come from its image processor config."""
    from tiny_families import EXTRA_WORDS, FAMILIES

    from datamodules.shapes.questions import template_vocabulary

    folder = FAMILIES["qwen2_5_vl"](tmp_path_factory.mktemp("qwen"), template_vocabulary() + EXTRA_WORDS)
    processor = AutoProcessor.from_pretrained(folder)
    processor.video_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 12_845_056}
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("height, width", [(720, 1280), (1080, 1920)])
def test_qwen_video_frames_are_capped_to_the_configured_pixels(height, width, qwen_with_image_limits,
                                                               synthetic_data):
    """8 frames of 720p / 1080p: with `video_max_pixels` (default 360 * 420) each frame is resized to at most
    that many pixels and the prompt fits max_length 1024; with the checkpoint's own limit (None) it does
    not."""
    records, _ = read_records(synthetic_data / "train.jsonl", synthetic_data)
    frames = np.random.default_rng(0).integers(0, 256, (8, height, width, 3), dtype=np.uint8)
    items = [(Example(records[0], "clip.mp4", records[0].rejected), frames)]
    _, processor = load_video_llm(VideoLLMConfig(name_or_path=str(qwen_with_image_limits), num_frames=8))
    batch = ChatCollator(processor, "sft", max_length=1024)(items)
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert t == 4 and h * w * 14 * 14 <= 360 * 420, (t, h, w)
    video_tokens = int((batch["input_ids"] == processor.video_token_id).sum())
    assert video_tokens == t * h * w // 4 <= 4 * 360 * 420 // (28 * 28)

    _, unlimited = load_video_llm(VideoLLMConfig(name_or_path=str(qwen_with_image_limits), num_frames=8,
                                                 video_max_pixels=None))
    with pytest.raises(RecordError, match="over max_length=1024"):
        ChatCollator(unlimited, "sft", max_length=1024)(items)


# ---------------------------------------------------------------------------------------- generation
def test_greedy_generation_ignores_the_checkpoints_sampling_settings(tiny_base, synthetic_data, monkeypatch):
    """A checkpoint whose generation_config has repetition_penalty 1.05 and top_p/top_k/temperature (as
    Qwen2.5-VL's): `generate` decodes greedily with no repetition penalty (the processor never runs), and
    returns the tokens of step-by-step argmax decoding; `do_sample=False` alone would keep the penalty."""
    from transformers.generation import logits_process

    torch.manual_seed(0)
    module = AlignmentModule(model=VideoLLMConfig(name_or_path=str(tiny_base), num_frames=NUM_FRAMES),
                             max_new_tokens=6)
    module.llm.generation_config.update(repetition_penalty=1.05, top_p=0.8, top_k=20, temperature=0.7)
    module.eval()
    config = module.greedy_generation_config()
    assert (config.do_sample, config.repetition_penalty, config.max_new_tokens) == (False, 1.0, 6)
    assert config.eos_token_id == module.llm.generation_config.eos_token_id is not None
    calls = []
    real = logits_process.RepetitionPenaltyLogitsProcessor.__call__
    monkeypatch.setattr(logits_process.RepetitionPenaltyLogitsProcessor, "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    records, _ = read_records(synthetic_data / "val.jsonl", synthetic_data)
    items = [(Example(r, str(synthetic_data / r.video)), read_video(synthetic_data / r.video, NUM_FRAMES))
             for r in records[:1]]
    batch = ChatCollator(module.processor, "generate")(items)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values_videos")}
    with torch.no_grad():
        output = module.llm.generate(**inputs, generation_config=config)
        text = module.generate(batch)[0]
        assert calls == [], "no repetition penalty"
        new = output[0, inputs["input_ids"].shape[1]:]
        assert text == module.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        ids = inputs["input_ids"]
        for _ in range(output.shape[1] - ids.shape[1]):
            logits = module.llm(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert output.tolist() == ids.tolist()
        module.llm.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert calls, "the checkpoint's penalty stays on under do_sample=False alone"


# ------------------------------------------------------------------------------ gradient accumulation
class GradientRecorder(AlignmentModule):
    """Records the gradients the optimizer is about to use (after `on_before_optimizer_step`)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.recorded = {n: p.grad.clone() for n, p in self.llm.named_parameters() if p.grad is not None}


def test_sft_accumulation_normalises_over_the_windows_response_tokens(tiny_base, synthetic_data, tmp_path):
    """2 micro-batches of 2 accumulated give the gradient of one batch of the same 4 examples (float32): the
    window's summed token NLL over its response tokens, not the mean of the two micro-batch means."""
    grads, counts = {}, {}
    for batch_size, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        config = VideoLLMConfig(name_or_path=str(tiny_base), num_frames=NUM_FRAMES)
        module = GradientRecorder(model=config, output_dir=str(tmp_path / str(batch_size)))
        datamodule = data(synthetic_data, "sft", batch_size=batch_size)
        trainer(tmp_path / str(batch_size), 1, accumulate_grad_batches=accumulate).fit(module, datamodule)
        grads[batch_size] = module.recorded
        loader = datamodule.train_dataloader()
        batches = [next(iter(loader))] if batch_size == 4 else list(itertools.islice(iter(loader), 2))
        counts[batch_size] = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert sum(counts[2]) == counts[4][0] and counts[2][0] != counts[2][1], counts
    assert grads[4].keys() == grads[2].keys() and len(grads[4]) > 10
    for name, expected in grads[4].items():
        torch.testing.assert_close(grads[2][name], expected, rtol=1e-5, atol=1e-6, msg=name)
