"""A frozen vision tower stays out of autograd; an unfrozen one is trained.

`enable_input_require_grads` (called by transformers' gradient checkpointing and again by peft) hooks the
input embeddings of every `PreTrainedModel` in a video-LLM, the vision tower's patch embedding included:
without a guard, a LoRA step with gradient checkpointing keeps the frozen tower's activations for a backward
pass that updates nothing. Each family's tiny checkpoint (`tiny_families.py`) is loaded by path through
`AlignmentModule`, and tensors saved for backward are counted while a tower's forward runs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny_families import EXTRA_WORDS, FAMILIES, checkpoint_builder

from datamodules.collation import ChatCollator, Example
from datamodules.records import QARecord
from datamodules.shapes.questions import template_vocabulary
from datamodules.shapes.world import sample_scene
from lightning_modules.alignment import AlignmentModule
from lightning_modules.video_llm import LoraSettings, VideoLLMConfig, vision_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCABULARY = template_vocabulary() + EXTRA_WORDS
RECORDS = [
    QARecord("a", "a.mp4", "what colour is the circle?", "the circle is red.", True),
    QARecord("b", "b.mp4", "what colour is the star?",
             "the question is unanswerable because there is no star in the video.", False,
             category="object", missing_element="star"),
]
# The module whose input is the tower's output: the LLaVA families' projector, Qwen's merger (in `visual`).
PROJECTORS = ("multi_modal_projector", "visual.merger")
families = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> folder of its tiny checkpoint, built once per module."""
    return checkpoint_builder(tmp_path_factory.mktemp, VOCABULARY)


@pytest.fixture(scope="module")
def items():
    """Two examples with rendered frames: (4, 64, 64, 3) uint8 each."""
    clips = [sample_scene(random.Random(seed)).render()[[0, 5, 10, 15]] for seed in (0, 1)]
    return [(Example(record, record.video, None), clip) for record, clip in zip(RECORDS, clips, strict=True)]


@contextmanager
def saved_for_backward_inside(modules: list[torch.nn.Module]) -> Iterator[dict[str, int]]:
    """Counts of `calls` of `modules` and of tensors `saved` for backward while one of them runs."""
    counts = {"calls": 0, "saved": 0, "depth": 0}

    def enter(module, args):
        counts["calls"] += 1
        counts["depth"] += 1

    def leave(module, args, output):
        counts["depth"] -= 1

    def pack(tensor):
        counts["saved"] += counts["depth"] > 0
        return tensor

    handles = [m.register_forward_pre_hook(enter) for m in modules]
    handles += [m.register_forward_hook(leave, always_call=True) for m in modules]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def projector_inputs(model: torch.nn.Module) -> Iterator[list[bool]]:
    """Whether each call of the projector got an input that requires grad."""
    seen: list[bool] = []
    projectors = [m for name, m in model.named_modules() if name.endswith(PROJECTORS)]
    assert projectors, "no projector found"

    def record(module, args):
        seen.append(any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))

    handles = [projector.register_forward_pre_hook(record) for projector in projectors]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def training_module(path: str, **settings) -> AlignmentModule:
    """An SFT `AlignmentModule` with gradient checkpointing, in the modes `fit` gives it."""
    torch.manual_seed(0)
    config = VideoLLMConfig(name_or_path=path, num_frames=4, gradient_checkpointing=True, **settings)
    module = AlignmentModule(model=config)
    module.on_fit_start()
    return module


def tower_grads(module: AlignmentModule) -> list[torch.Tensor | None]:
    return [p.grad for tower in vision_modules(module.llm) for p in tower.parameters()]


@families
def test_a_lora_step_with_checkpointing_keeps_nothing_of_the_frozen_tower(family, checkpoint, items):
    """LoRA + gradient checkpointing: no tensor is saved for backward while the frozen tower runs, the
    projector's input does not require grad, and the adapters still get gradients."""
    module = training_module(checkpoint(family), lora=LoraSettings(r=2, alpha=4))
    towers = vision_modules(module.llm)
    assert towers and all(not tower.training for tower in towers), "frozen towers in eval mode in fit"
    batch = ChatCollator(module.processor, "sft")(items)
    with saved_for_backward_inside(towers) as counts, projector_inputs(module.llm) as needs_grad:
        loss = module.training_step(batch, 0)
    loss.backward()
    assert counts["calls"] > 0, "the tower ran"
    assert counts["saved"] == 0, f"{counts['saved']} tensors saved for backward inside the frozen tower"
    assert needs_grad and not any(needs_grad), "the projector's input requires grad"
    assert all(grad is None for grad in tower_grads(module))
    lora = [p.grad for n, p in module.llm.named_parameters() if "lora_B" in n]
    assert lora and all(grad is not None for grad in lora) and any(grad.abs().sum() > 0 for grad in lora)


@families
def test_an_unfrozen_tower_is_trained(family, checkpoint, items):
    """Full fine-tuning with the tower unfrozen (and gradient checkpointing): the tower gets gradients."""
    module = training_module(checkpoint(family), freeze_vision_tower=False)
    batch = ChatCollator(module.processor, "sft")(items)
    with projector_inputs(module.llm) as needs_grad:
        module.training_step(batch, 0).backward()
    assert needs_grad and all(needs_grad)
    grads = tower_grads(module)
    assert any(grad is not None and grad.abs().sum() > 0 for grad in grads), "no gradient in the tower"


def test_the_check_is_made_at_each_forward(checkpoint, items):
    """A tower frozen at load and unfrozen later is trained; a frozen tower given inputs that require grad
    keeps them in autograd; an enclosing `no_grad` is left as it is."""
    module = training_module(checkpoint("llava_next_video"), lora=LoraSettings(r=2, alpha=4))
    (tower,) = vision_modules(module.llm)
    pixels = torch.rand(2, 3, 32, 32)
    assert not tower(pixels).last_hidden_state.requires_grad
    assert tower(pixels.requires_grad_()).last_hidden_state.requires_grad, "an input that needs grad"
    with torch.no_grad():
        assert not tower(pixels).last_hidden_state.requires_grad
    assert torch.is_grad_enabled()

    tower.requires_grad_(True)
    batch = ChatCollator(module.processor, "sft")(items)
    module.training_step(batch, 0).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
