"""One code path for every supported video-LLM family: load by path -> ChatCollator -> train -> generate.

A tiny random checkpoint of each family (its real model and processor classes, a word-level tokenizer made
in code, see `tiny_families.py`) is saved to a folder and loaded only through `load_video_llm` /
`AlignmentModule`, exactly as a hub checkpoint would be. Family differences (video tensors, `video_grid_thw`,
`mm_token_type_ids`, `second_per_grid_ts`) must come from the processor's output alone.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_families import EXTRA_WORDS, FAMILIES, TEST_TEMPLATES, checkpoint_builder, real_template

from datamodules.batch_format import IGNORE_INDEX, Segment
from datamodules.collation import ChatCollator, Example
from datamodules.loading import ExampleDataset
from datamodules.records import REFUSAL_OPENING, QARecord
from datamodules.shapes.questions import template_vocabulary
from datamodules.shapes.world import WorldConfig, sample_scene, write_clip
from lightning_modules.alignment import AlignmentModule
from lightning_modules.losses import preference_loss, sequence_logps, sft_loss
from lightning_modules.preference import pair_model_inputs, positions_spanned
from lightning_modules.video_llm import MODEL_INPUTS, LoraSettings, VideoLLMConfig, load_video_llm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCABULARY = template_vocabulary() + EXTRA_WORDS
RECORDS = [
    QARecord("a", "a.mp4", "what colour is the circle?", "the circle is red.", True,
             rejected="the circle is blue."),
    QARecord("b", "b.mp4", "what colour is the star?",
             "the question is unanswerable because there is no star in the video.", False,
             category="object", missing_element="star", rejected="the star is green."),
]
COLLATED_KEYS = {"labels", "ids", "records", "refusal_ids"}
# Vision-tower attribute names in these families' modules (Video-LLaVA has two towers).
TOWERS = ("vision_tower.", "visual.", "video_tower.", "image_tower.")
families = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> folder of its tiny checkpoint (model + processor), built once per module."""
    return checkpoint_builder(tmp_path_factory.mktemp, VOCABULARY)


@pytest.fixture(scope="module")
def items() -> list[tuple[Example, np.ndarray]]:
    """Two examples with real rendered frames: (4, 64, 64, 3) uint8 each."""
    clips = [sample_scene(random.Random(seed)).render()[[0, 5, 10, 15]] for seed in (0, 1)]
    assert clips[0].dtype == np.uint8 and clips[0].shape == (4, 64, 64, 3)
    pairs = zip(RECORDS, clips, strict=True)
    return [(Example(record, record.video, record.rejected), clip) for record, clip in pairs]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def response_ids(tokenizer, response: str) -> list[int]:
    """The tokens a training row must be scored on: the response and the end-of-turn token."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def assert_labels_cover(batch: dict, tokenizer, responses: list[str]) -> None:
    """Every label is IGNORE_INDEX except a final span equal to the response's tokens plus the end of turn."""
    for row, response in enumerate(responses):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        expected = response_ids(tokenizer, response)
        kept = (labels != IGNORE_INDEX).nonzero().flatten()
        assert kept.tolist() == list(range(len(labels) - len(expected), len(labels))), f"row {row}: {kept}"
        assert labels[kept].tolist() == expected == ids[kept].tolist()


@families
def test_processor_output_drives_the_collator(family, checkpoint, items):
    """sft / dpo / generate batches: inputs the model knows, no <unk>, labels on the response only."""
    model, processor = load_video_llm(VideoLLMConfig(name_or_path=checkpoint(family), num_frames=4))
    tokenizer = processor.tokenizer
    video_id = processor.video_token_id
    answers = [r.answer for r in RECORDS]

    sft = ChatCollator(processor, "sft")(items)
    assert set(sft) - COLLATED_KEYS <= set(MODEL_INPUTS), f"processor outputs not in MODEL_INPUTS: {set(sft)}"
    assert "pixel_values_videos" in sft
    assert tokenizer.unk_token_id not in sft["input_ids"], tokenizer.decode(sft["input_ids"][0])
    video_positions = sft["input_ids"] == video_id
    assert video_positions.sum(dim=1).min() > 0 and (sft["labels"][video_positions] == IGNORE_INDEX).all()
    assert_labels_cover(sft, tokenizer, answers)
    assert sft["ids"] == ["a", "b"]

    dpo = ChatCollator(processor, "dpo")(items)
    assert dpo["input_ids"].shape[0] == 2, "one row a pair: [prompt][chosen][rejected]"
    for row, record in enumerate(RECORDS):
        labels = dpo["labels"][row]
        expected = response_ids(tokenizer, record.answer) + response_ids(tokenizer, record.rejected)
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        assert labels[-len(expected) :].tolist() == expected

    generate = ChatCollator(processor, "generate")(items)
    assert "labels" not in generate
    prompt = tokenizer.decode(generate["input_ids"][0], skip_special_tokens=True)
    assert RECORDS[0].question.rstrip("?") in prompt and RECORDS[0].answer not in prompt
    opening = tokenizer(" " + REFUSAL_OPENING, add_special_tokens=False)["input_ids"]
    assert generate["refusal_ids"].tolist() == [opening] * len(items), "the opening after each prompt"

    with torch.no_grad():  # the same batches run through the model
        for batch in (sft, dpo, generate):
            logits = model(**model_inputs(batch), use_cache=False).logits
            assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


END_OF_TURN = {"llava_next_video": "</s>", "video_llava": "</s>", "qwen2_vl": "<|im_end|>",
               "qwen2_5_vl": "<|im_end|>", "llava_onevision": "<|im_end|>"}


@families
@pytest.mark.parametrize("template", ["real", "test"])
def test_labels_end_with_the_end_of_turn_token_whatever_the_template(family, template, items, tmp_path):
    """With the family's real chat template (the llava-hf Vicuna ones render the assistant turn as
    `text + ' '`, no `</s>`) and with the tests' templates (which close the turn themselves): SFT and DPO
    labels are exactly the response's tokens plus the family's end-of-turn token, once, and the response
    text is unchanged."""
    chosen = real_template(family) if template == "real" else TEST_TEMPLATES[family]
    folder = FAMILIES[family](tmp_path / family, VOCABULARY, chosen)
    _, processor = load_video_llm(VideoLLMConfig(name_or_path=str(folder), num_frames=4))
    tokenizer = processor.tokenizer
    assert processor.chat_template == chosen and tokenizer.eos_token == END_OF_TURN[family]
    collator = ChatCollator(processor, "sft")
    for response in (RECORDS[0].answer, RECORDS[1].rejected):
        text = collator.full_text(RECORDS[0].question, response)
        assert text.endswith(response + tokenizer.eos_token), text
        assert text.count(tokenizer.eos_token) == text.count("<|im_start|>") or tokenizer.eos_token == "</s>"
        assert text.count(response) == 1 and text.count(tokenizer.eos_token + tokenizer.eos_token) == 0
    answers = [r.answer for r in RECORDS]
    assert_labels_cover(collator(items), tokenizer, answers)
    pairs = ChatCollator(processor, "dpo")(items)
    for row, record in enumerate(RECORDS):  # one row per pair: [prompt][chosen][rejected]
        labels, segments = pairs["labels"][row], pairs["pair_segments"][row]
        for segment, response in ((Segment.CHOSEN, record.answer), (Segment.REJECTED, record.rejected)):
            span = segments == segment
            assert (labels[span] != IGNORE_INDEX).all(), f"row {row}: unscored {segment} tokens"
            assert labels[span].tolist() == response_ids(tokenizer, response)
        assert (labels[segments == Segment.PROMPT] == IGNORE_INDEX).all()
    batch = collator(items)
    for row, answer in enumerate(answers):
        scored = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert scored[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(scored[:-1]) == answer, "the response text itself is unchanged"


@families
def test_full_finetuning_step_and_greedy_generation(family, checkpoint, items):
    """AlignmentModule on the tiny checkpoint: the SFT loss falls, and greedy generation returns the trained
    answers (both rows of a left-padded batch), so generation sees the video as the training forward did."""
    torch.manual_seed(0)
    config = VideoLLMConfig(name_or_path=checkpoint(family), num_frames=4)
    module = AlignmentModule(model=config, max_new_tokens=16)
    towers = {n: p for n, p in module.llm.named_parameters() if any(t in n for t in TOWERS)}
    assert towers and not any(p.requires_grad for p in towers.values()), "vision tower(s) frozen by default"
    batch = ChatCollator(module.processor, "sft")(items)
    generate = ChatCollator(module.processor, "generate")(items)
    answers = [r.answer for r in RECORDS]
    optimizer = torch.optim.AdamW([p for p in module.llm.parameters() if p.requires_grad], lr=1e-2)
    losses, responses = [], []
    for _ in range(20):  # overfit the two examples, checking greedy generation every 10 steps (60-80 needed)
        module.train()
        for _ in range(10):
            loss, _, _ = sft_loss(module(batch), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        module.eval()
        responses = module.generate(generate)
        if responses == answers:
            break
    assert losses[5] < losses[0] and min(losses) < 0.1 * losses[0], losses[::5]
    assert responses == answers, f"after {len(losses)} steps"
    likelihood = module.refusal_likelihood(generate)
    assert likelihood.shape == (2,) and torch.isfinite(likelihood).all()
    assert likelihood[1] > likelihood[0], "trained to refuse the second question only"


@families
def test_lora_reference_is_the_base_model(family, checkpoint, items):
    """With LoRA: adapters on the language model only; after a DPO step, adapters off == a fresh base load."""
    torch.manual_seed(0)
    path = checkpoint(family)
    config = VideoLLMConfig(name_or_path=path, num_frames=4, lora=LoraSettings(r=4, alpha=8))
    module = AlignmentModule(model=config, objective="dpo", beta=0.5)
    trainable = [n for n, p in module.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not [n for n in trainable if any(t in n for t in TOWERS)], "adapters on the language model only"

    dpo = ChatCollator(module.processor, "dpo")(items)
    optimizer = torch.optim.AdamW([p for p in module.llm.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    assert module.precompute_reference([dpo]) == 2, "the reference pass, once, before training"
    loss = module.model_step(dpo, "train")
    assert torch.isclose(loss, torch.log(torch.tensor(2.0))), "policy == reference before training"
    loss.backward()
    optimizer.step()
    assert any(p.abs().sum() > 0 for n, p in module.llm.named_parameters() if "lora_B" in n)

    module.eval()
    sft = ChatCollator(module.processor, "sft")(items)
    with torch.no_grad():
        adapted = module(sft)
        with module.llm.disable_adapter():
            disabled = module(sft)
        base, _ = load_video_llm(VideoLLMConfig(name_or_path=path, num_frames=4))
        reference = base(**model_inputs(sft), use_cache=False).logits
    torch.testing.assert_close(disabled, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    with torch.no_grad():
        assert module.model_step(dpo, "train") < loss, "one DPO step moves the policy toward the chosen side"


@pytest.mark.parametrize("family,attention", [(f, "sdpa_padding_safe") for f in FAMILIES]
                         + [("llava_next_video", "eager"), ("qwen2_5_vl", "eager")])
def test_shared_prefix_pair_pass_equals_two_rows(family, attention, checkpoint, items):
    """One pass over [prompt][chosen][rejected] rows gives the log-probabilities, token counts, DPO loss and
    gradients of the two-row computation ([prompt][chosen] and [prompt][rejected] rows, left-padded, the
    layout before pair rows) within 1e-5 in float32; without the pair mask and positions it would not."""
    torch.manual_seed(0)
    config = VideoLLMConfig(name_or_path=checkpoint(family), num_frames=4, attn_implementation=attention)
    module = AlignmentModule(model=config, objective="dpo", precompute_ref_log_probs=False)
    collator = ChatCollator(module.processor, "dpo")
    pairs = collator(items)
    examples, clips = [e for e, _ in items], [c for _, c in items]
    rows = collator._labelled(examples * 2, [r.answer for r in RECORDS] + [r.rejected for r in RECORDS],
                              clips * 2)
    assert (rows["attention_mask"] == 0).any() and (pairs["attention_mask"] == 0).any(), "left padding"
    params = [p for p in module.llm.parameters() if p.requires_grad]

    def loss_and_grads(logps, counts):
        # a DPO loss against a fixed reference, so that both sides of each pair carry a gradient
        reference = torch.tensor([-9.0, -30.0, -7.0, -2.0], dtype=logps.dtype)
        losses, _, _ = preference_loss(logps[:2], logps[2:], reference[:2], reference[2:], beta=0.5)
        grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        return losses.mean().detach(), grads

    module.train()
    logps, counts = module.pair_logps(module.llm, pairs)
    two_logps, two_counts = sequence_logps(module(rows), rows["labels"])
    assert counts.tolist() == two_counts.tolist()
    torch.testing.assert_close(logps, two_logps, rtol=0, atol=1e-5)
    loss, grads = loss_and_grads(logps, counts)
    two_loss, two_grads = loss_and_grads(two_logps, two_counts)
    torch.testing.assert_close(loss, two_loss, rtol=0, atol=1e-5)
    for grad, two_grad in zip(grads, two_grads, strict=True):
        torch.testing.assert_close(grad, two_grad, rtol=0, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)

    with torch.no_grad():  # the pair mask and positions matter: a plain causal pass scores rejected otherwise
        inputs = pair_model_inputs(module.llm, model_inputs(pairs), pairs)
        plain = module.llm(**{**inputs, "attention_mask": pairs["attention_mask"], "position_ids": None},
                           use_cache=False).logits
        from lightning_modules.losses import pair_logps

        plain_logps, _ = pair_logps(plain, pairs["labels"], pairs["pair_segments"])
    assert (plain_logps[2:] - two_logps[2:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.startswith("qwen")])
def test_qwen_pair_rows_without_mm_token_type_ids_are_an_error(family, checkpoint, items):
    """Qwen2-VL and Qwen2.5-VL place pair rows by their M-RoPE positions, which need the processor's
    `mm_token_type_ids`; a batch without them used to fall back to 1-D positions and score other positions
    than training's rows, silently."""
    module = AlignmentModule(model=VideoLLMConfig(name_or_path=checkpoint(family), num_frames=4),
                             objective="dpo", precompute_ref_log_probs=False)
    pairs = ChatCollator(module.processor, "dpo")(items)
    assert "mm_token_type_ids" in pairs, "the processor's own output carries them"
    del pairs["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids") as error:
        module.pair_logps(module.llm, pairs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.startswith("qwen")])
def test_the_context_check_counts_qwen_rows_by_their_m_rope_positions(family, checkpoint, items):
    """A Qwen row spans its highest M-RoPE position + 1 positions, not its token count (a frame grid's tokens
    share a temporal position; the temporal step follows the clip's timing): as the model's own forward
    places them (its `rope_deltas`: highest position + 1 - tokens)."""
    model, processor = load_video_llm(VideoLLMConfig(name_or_path=checkpoint(family), num_frames=4))
    batch = ChatCollator(processor, "sft")(items)
    with torch.no_grad():
        model(**model_inputs(batch), use_cache=False)
    tokens = batch["attention_mask"].sum(dim=1)
    expected = tokens + model.model.rope_deltas.flatten()
    spanned = positions_spanned(model, batch)
    assert spanned.tolist() == expected.tolist() and spanned.tolist() != tokens.tolist()


def test_qwen2_5_vl_places_frames_in_time_by_the_clip_frame_rate(checkpoint, tmp_path):
    """Clips read from files bring their frame rate and frame indices to the processor: Qwen2.5-VL's
    `second_per_grid_ts` (seconds per temporal patch, which spaces the frames' temporal positions) is
    temporal_patch_size / sampled fps, not the 24 fps the processor assumes for bare frame arrays."""
    path = tmp_path / "clip.mp4"
    write_clip(sample_scene(random.Random(0), WorldConfig(frames=16)).render(), path, fps=8)
    examples = [Example(record, str(path), record.rejected) for record in RECORDS]
    items = [ExampleDataset(examples, num_frames=4)[i] for i in (0, 1)]
    assert items[0][1].indices == (0, 5, 10, 15) and items[0][1].fps == pytest.approx(8.0)
    model, processor = load_video_llm(VideoLLMConfig(name_or_path=checkpoint("qwen2_5_vl"), num_frames=4))
    patch = processor.video_processor.temporal_patch_size
    sampled_fps = 4 / 16 * 8
    batch = ChatCollator(processor, "sft")(items)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([patch / sampled_fps] * 2)
    bare = ChatCollator(processor, "sft")([(example, clip.frames) for example, clip in items])
    assert bare["second_per_grid_ts"].tolist() == pytest.approx([patch / 24] * 2), "no timing: 24 fps"
    with torch.no_grad():
        logits = model(**model_inputs(batch), use_cache=False).logits
    assert torch.isfinite(logits).all()
