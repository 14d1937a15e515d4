"""What a run on a real (hub-loaded) checkpoint relies on, checked on the tiny model saved and loaded by path
the same way: train mode in `fit` (gradient checkpointing recomputes), dropout off for DPO, video frame-size
limits, greedy generation that is greedy, and SFT loss normalised over the accumulation window.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.answerability import AnswerabilityDataModule
from lightning_modules.alignment import AlignmentModule
from lightning_modules.video_llm import VideoLLMConfig, vision_modules

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
    module = AlignmentModule(model=config, objective=objective, output_dir=str(tmp_path))
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
