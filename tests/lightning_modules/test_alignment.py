"""AlignmentModule through `main.py fit`: SFT and DPO smoke runs, the DPO reference, checkpoints that hold the
trainable weights only and resume exactly, the exported adapter and the learning-rate schedule (the
DataModule's and the collator's own tests are in tests/datamodules/).

Runs use the tiny LLaVA-NeXT-Video model (1-layer towers, width 32) on a 12-clip synthetic dataset; the
shared fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from probes import CrashAt, SeenBatches, StopAfter
from record_items import items_of

import datamodules.loading as loading
from datamodules.collation import ChatCollator
from lightning_modules.alignment import AlignmentModule, warmup_cosine
from lightning_modules.preference import DPOReference
from lightning_modules.video_llm import LoraSettings, VideoLLMConfig, load_video_llm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")  # TRL's names, logged under train/ and val/


def trainable_keys(module) -> set[str]:
    return {f"llm.{name}" for name, p in module.llm.named_parameters() if p.requires_grad}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------- fit
def test_fit_sft_smoke(tmp_path, cli_args, run_main, synthetic_data):
    """Full fine-tuning SFT for 2 steps: losses logged, a checkpoint of the trainable weights only (no frozen
    vision tower), and an exported model that loads by path and gives the module's logits."""
    cli = run_main(cli_args("fit", tmp_path, steps=2, extra=["--trainer.val_check_interval=2"]))
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 2
    for key in ("train/loss", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key

    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert set(checkpoint["state_dict"]) == trainable_keys(module)
    assert not any("vision_tower" in key for key in checkpoint["state_dict"])

    exported = tmp_path / "hf_model"
    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()
    model, _ = load_video_llm(VideoLLMConfig(name_or_path=str(exported), num_frames=2))
    batch = ChatCollator(module.processor, "sft")(items_of(synthetic_data)[:2])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**module._inputs(batch)).logits, module(batch))


def test_dpo_lora_fit_logs_rewards_and_logps(lora_dpo_run):
    """LoRA DPO logs the loss, the rewards and both log-probs (train and val), to W&B too; the reference is
    the model with adapters disabled, not a copy."""
    metrics = lora_dpo_run.metrics
    stages = ("train", "val")
    for key in ("train/loss", "val/loss", *(f"{stage}/{k}" for stage in stages for k in DPO_METRICS)):
        assert key in metrics and metrics[key] == metrics[key], f"{key} missing or NaN: {sorted(metrics)}"
    assert 0.0 <= metrics["train/rewards/accuracies"] <= 1.0
    # margin = mean(chosen - rejected) in float32: equal to the difference of means up to rounding
    margin = metrics["train/rewards/chosen"] - metrics["train/rewards/rejected"]
    assert metrics["train/rewards/margins"] == pytest.approx(margin, rel=1e-4, abs=1e-5), dict(metrics)
    assert metrics["train/logps/chosen"] < 0 and metrics["train/logps/rejected"] < 0
    assert lora_dpo_run.cli.trainer.global_step == 3

    module = lora_dpo_run.cli.model
    assert module.uses_lora and module.reference is None, "LoRA: the reference is the adapters-disabled model"
    assert not any(name.startswith("reference.") for name, _ in module.named_parameters())

    runs = list((lora_dpo_run.out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline W&B run"
    logged = runs[0].read_bytes()
    for key in ("train/loss", *(f"train/{k}" for k in DPO_METRICS)):
        assert key.encode() in logged, f"{key} not in the W&B run"


def test_lora_checkpoint_holds_adapter_weights_only(lora_dpo_run):
    module = lora_dpo_run.cli.model
    checkpoint = load_checkpoint(lora_dpo_run.out / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    assert state and all("lora_" in key for key in state), [k for k in state if "lora_" not in k][:3]
    assert set(state) == trainable_keys(module)
    current = dict(module.named_parameters())
    for key, value in state.items():
        torch.testing.assert_close(value, current[key].detach(), rtol=0, atol=0)
    assert checkpoint["global_step"] == 3


def test_a_checkpoint_names_its_model_settings_and_loads_under_another_objective(lora_dpo_run):
    """The checkpoint keeps the settings its weights belong to (checked on load), as plain data; the
    objective is not among them: the DPO run's adapters load into an SFT module of the same model, every
    trainable weight replaced."""
    checkpoint = torch.load(lora_dpo_run.out / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    assert checkpoint["model_settings"] == {
        "name_or_path": str(lora_dpo_run.base),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
                 "modules_to_save": []},
    }
    lora = LoraSettings(r=4, alpha=8, target_modules=["v_proj", "q_proj", "k_proj", "o_proj"])
    sft = AlignmentModule(VideoLLMConfig(name_or_path=str(lora_dpo_run.base), num_frames=2, lora=lora))
    sft.on_load_checkpoint(checkpoint)
    result = sft.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys and not set(result.missing_keys) & trainable_keys(sft)


def test_exported_adapter_loads_with_peft(lora_dpo_run, synthetic_data):
    """hf_model/ is a peft adapter: PeftModel.from_pretrained(base, folder) gives the module's logits."""
    from peft import PeftModel

    folder = lora_dpo_run.out / "hf_model"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists(), "the adapter, not a merged model"

    module = lora_dpo_run.cli.model.eval()
    base, _ = load_video_llm(VideoLLMConfig(name_or_path=str(lora_dpo_run.base), num_frames=2))
    with torch.no_grad():
        batch = ChatCollator(module.processor, "sft")(items_of(synthetic_data, split="val")[:3])
        inputs = module._inputs(batch)
        base_logits = base.eval()(**inputs).logits
        loaded = PeftModel.from_pretrained(base, folder).eval()
        torch.testing.assert_close(loaded(**inputs).logits, module(batch))
    assert not torch.allclose(base_logits, module(batch), atol=1e-6), "the adapter changed the model"


def test_full_finetuning_dpo_reference_is_a_frozen_copy(tmp_path, cli_args, run_main, tiny_base):
    """With the reference run in every step (precompute_ref_log_probs=False), full fine-tuning keeps a frozen
    copy of the initial model."""
    cli = run_main(cli_args("fit", tmp_path, objective="dpo", base=tiny_base, steps=2,
                            extra=["--model.init_args.lr=0.01", "--trainer.limit_val_batches=0",
                                   "--model.init_args.precompute_ref_log_probs=false"]))
    module = cli.model
    reference = module.reference
    assert reference is not None and reference is not module.llm
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in reference.parameters()}

    fresh, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2))
    fresh_state = fresh.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, fresh_state[name], rtol=0, atol=0, msg=name)
    policy = dict(module.llm.named_parameters())
    assert any(not torch.equal(policy[n], fresh_state[n]) for n, p in policy.items() if p.requires_grad)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(state) == trainable_keys(module), "no reference weights in the checkpoint"


def dpo_pairs(datamodule, split: str) -> list[dict]:
    """Every pair of a split, collated as the training loader does, in batches."""
    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset, collate = loader.dataset, loader.collate_fn
    return [collate([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
            for start in range(0, len(dataset), 4)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_reference_log_probs_are_computed_once_before_training(tmp_path, cli_args, run_main, tiny_base,
                                                                   lora):
    """precompute_ref_log_probs (the default): `fit` computes the reference log-probabilities of every
    training and validation pair before training, equal to the initial model's (the frozen copy's, then
    freed; or the adapters-disabled model's), in one cache file; the steps read them from it."""
    cli = run_main(cli_args("fit", tmp_path, objective="dpo", base=tiny_base, lora=lora, steps=2,
                            extra=["--model.init_args.lr=0.01"]))
    module = cli.model
    assert module.reference is None, "no reference model is kept for training"
    files = list((tmp_path / "reference_logps").glob("*.json"))
    assert len(files) == 1 and files[0] == module.reference_cache.path
    cached = json.loads(files[0].read_text())
    assert cached["identity"]["name_or_path"] == str(tiny_base) and cached["identity"]["num_frames"] == 2

    config = VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2)
    initial = AlignmentModule(model=config, objective="dpo", precompute_ref_log_probs=False).eval()
    seen = 0
    for split in ("train", "val"):
        for batch in dpo_pairs(cli.datamodule, split):
            with torch.no_grad():
                expected, _ = initial.pair_logps(initial.llm, batch)
            half = len(batch["ids"])
            for row, (record, digest) in enumerate(zip(batch["ids"], batch["pair_digests"], strict=True)):
                entry = cached["pairs"][record]
                assert entry[0] == digest
                pair = [float(expected[row]), float(expected[half + row])]
                assert entry[1:] == pytest.approx(pair, abs=1e-5)
                seen += 1
    assert seen == len(cached["pairs"]) > 0

    if lora:
        return
    # a changed pair is not matched to its stale entry: the step refuses it, naming the pair and the file
    batch = dpo_pairs(cli.datamodule, "train")[0]
    batch["pair_digests"] = ["changed"] + batch["pair_digests"][1:]
    with pytest.raises(RuntimeError, match=f"pair {batch['ids'][0]!r}: the reference log-probability cache"):
        module.model_step(batch, "train")


def test_dpo_reference_pass_runs_in_the_training_precision(tmp_path, cli_args, run_main, tiny_base):
    """Under `precision: bf16-mixed` the reference pass runs in the steps' autocast, so that the cached
    log-probabilities are the initial policy's as the first step computes them; the cache is keyed by the
    precision."""
    cli = run_main(cli_args("fit", tmp_path, objective="dpo", base=tiny_base, lora=True, steps=1,
                            extra=["--trainer.precision=bf16-mixed", "--trainer.limit_val_batches=0"]))
    cached = json.loads(cli.model.reference_cache.path.read_text())
    assert cached["identity"]["precision"] == "bf16-mixed"

    config = VideoLLMConfig(name_or_path=str(tiny_base), num_frames=2)
    initial = AlignmentModule(model=config, objective="dpo", precompute_ref_log_probs=False).eval()
    batch = dpo_pairs(cli.datamodule, "train")[0]
    with torch.no_grad():
        full, _ = initial.pair_logps(initial.llm, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            mixed, _ = initial.pair_logps(initial.llm, batch)
    half = len(batch["ids"])
    entries = [cached["pairs"][record][1:] for record in batch["ids"]]
    got = torch.tensor([[chosen for chosen, _ in entries], [rejected for _, rejected in entries]]).flatten()
    assert not torch.allclose(full, mixed, atol=1e-3), "bf16 changes the log-probabilities"
    torch.testing.assert_close(got, mixed.float().reshape(2, half).flatten(), rtol=0, atol=1e-4)


def test_dpo_resume_reuses_the_cached_reference_and_matches_an_uninterrupted_run(tmp_path, cli_args,
                                                                                 run_main, tiny_base):
    """Full fine-tuning DPO with cached reference log-probabilities, one epoch of 4 batches checkpointed
    every 2: a run killed before step 3 and resumed from `last.ckpt` reuses the cache (the reference
    identity is the initial model's, not the restored weights') and ends with the uninterrupted run's
    weights."""

    def fit(out: Path, *callbacks: L.Callback, ckpt_path: Path | None = None):
        args = cli_args(None, out, objective="dpo", base=tiny_base, steps=-1,
                        extra=["--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                               "--trainer.val_check_interval=2", "--model.init_args.lr=0.01",
                               "--model.init_args.warmup_steps=1"])
        cli = run_main(args, run=False)
        cli.trainer.callbacks.extend(callbacks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in cli.model.llm.named_parameters() if p.requires_grad}

    straight = fit(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "resumed", CrashAt(2))
    files = list((tmp_path / "resumed" / "reference_logps").glob("*.json"))
    assert len(files) == 1, "the reference pass ran, and its cache was written, before the crash"
    written = files[0].stat().st_mtime_ns
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2
    final = fit(tmp_path / "resumed", ckpt_path=last)
    assert list((tmp_path / "resumed" / "reference_logps").glob("*.json")) == files, "the same identity"
    assert files[0].stat().st_mtime_ns == written, "nothing recomputed: the cache is not rewritten"
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], msg=name)


def test_dpo_reference_pass_keys_pairs_by_file_identity_without_decoding(tmp_path, cli_args, run_main,
                                                                         synthetic_data, monkeypatch):
    """Pairs are keyed by their texts and their video file's size and modification time: a second run with
    the cache complete decodes no clip in the reference pass and computes nothing; replacing one clip file's
    bytes recomputes that clip's pairs alone, reading that clip alone."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    reads, read_clip = [], loading.read_clip
    monkeypatch.setattr(loading, "read_clip", lambda path, n: reads.append(str(path)) or read_clip(path, n))
    passes = []  # (pairs computed, clips read) of each run's reference pass
    precompute_for_fit = DPOReference.precompute_for_fit

    def counted(self, *args, **kwargs):
        before = len(reads)
        computed = precompute_for_fit(self, *args, **kwargs)
        passes.append((computed, reads[before:]))
        return computed

    monkeypatch.setattr(DPOReference, "precompute_for_fit", counted)

    def fit(out: str):
        return run_main(cli_args("fit", tmp_path / out, objective="dpo", lora=True, steps=1, extra=[
            f"--data.init_args.data_dir={data}", "--trainer.limit_val_batches=0",
            f"--model.init_args.reference_cache_dir={tmp_path / 'reference_logps'}"]))

    examples = fit("first").datamodule.datasets["train"].examples
    clips = sorted({e.video_path for e in examples})
    assert passes[0][0] == len(examples) and sorted(passes[0][1]) == clips, "each clip read once"
    fit("resumed")
    assert passes[1] == (0, []), "a complete cache: no pair computed, no clip decoded"

    replaced = examples[0].video_path
    before = os.stat(replaced)
    Path(replaced).write_bytes(Path(next(c for c in clips if c != replaced)).read_bytes())
    assert (os.stat(replaced).st_size, os.stat(replaced).st_mtime_ns) != (before.st_size, before.st_mtime_ns)
    fit("replaced")
    assert passes[2] == (sum(e.video_path == replaced for e in examples), [replaced]), "not the stale values"


def test_mid_epoch_resume_trains_on_the_batches_an_uninterrupted_run_does(tmp_path, cli_args, run_main,
                                                                          tiny_base):
    """One epoch of 4 batches, validated and checkpointed every 2: a run killed before step 3 and resumed
    from its step-2 `last.ckpt` trains steps 3-4 on batches 3-4 (not on batches 1-2 again) and ends with the
    uninterrupted run's adapters."""

    def args(out: Path, subcommand: str | None = "fit") -> list[str]:
        return cli_args(subcommand, out, base=tiny_base, lora=True, steps=-1,
                        extra=["--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                               "--trainer.val_check_interval=2", "--model.init_args.lr=0.01",
                               "--model.init_args.warmup_steps=1"])

    def fit(out: Path, *callbacks: L.Callback, ckpt_path: Path | None = None):
        cli = run_main(args(out, subcommand=None), run=False)
        cli.trainer.callbacks.extend(callbacks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in cli.model.llm.named_parameters() if p.requires_grad}

    straight_batches, resumed_batches = SeenBatches(), SeenBatches()
    straight = fit(tmp_path / "straight", straight_batches)
    assert sorted(straight_batches.ids) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "resumed", CrashAt(2))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2, "a checkpoint at the mid-epoch validation"
    final = fit(tmp_path / "resumed", resumed_batches, ckpt_path=last)
    assert resumed_batches.ids == {2: straight_batches.ids[2], 3: straight_batches.ids[3]}
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], msg=name)


def test_resume_matches_uninterrupted_run(tmp_path, cli_args, run_main, tiny_base):
    """2 epochs of 2 steps straight == interrupted after epoch 1, then `--ckpt_path last` (LoRA, a cosine
    schedule over the 4 steps, shuffled batches). The resumed run logs to W&B: `last` must still find the run
    folder's checkpoint, not look in a W&B folder.

    Lightning 2.6 misplaces an epoch-end resume of a max_steps-bounded run, hence max_epochs here."""
    import wandb

    def args(out: Path, subcommand: str | None = "fit", **kwargs) -> list[str]:
        return cli_args(subcommand, out, base=tiny_base, lora=True, steps=-1, **kwargs,
                        extra=["--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                               "--trainer.limit_val_batches=0", "--model.init_args.lr=0.01",
                               "--model.init_args.warmup_steps=1"])

    def adapters(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.llm.named_parameters() if p.requires_grad}

    straight = adapters(run_main(args(tmp_path / "straight")).model)

    interrupted = run_main(args(tmp_path / "resumed", subcommand=None), run=False)
    interrupted.trainer.callbacks.append(StopAfter(2))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert interrupted.trainer.global_step == 2 and load_checkpoint(last)["global_step"] == 2
    halfway = adapters(interrupted.model)

    try:
        resumed = run_main(args(tmp_path / "resumed", logger=tmp_path / "wandb") + ["--ckpt_path=last"])
    finally:
        wandb.finish()
    assert Path(resumed.trainer.ckpt_path) == last
    assert resumed.trainer.global_step == 4
    final = adapters(resumed.model)
    assert straight.keys() == final.keys()
    assert any(not torch.allclose(halfway[n], straight[n]) for n in straight), "steps 3-4 moved the adapters"
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], msg=name)


# ------------------------------------------------------------------------------------- lr schedule
def hand_written_factor(step: int, warmup_steps: int, total: int) -> float:
    """The schedule AlignmentModule wrote by hand before it used transformers': linear warm-up from
    1/(warmup + 1), then cosine decay to 0 at `total`."""
    if step == 0:
        return 1 / (warmup_steps + 1)
    warmup = min(warmup_steps, total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize(("warmup_steps", "total"), [(0, 10), (1, 4), (3, 10), (9, 10), (0, 1)])
def test_warmup_cosine_is_the_hand_written_schedule(warmup_steps, total):
    """transformers' get_cosine_schedule_with_warmup, one step ahead, gives the old factors at every step,
    from the start and from a resumed step."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps, total)
    for step in range(total):
        expected = hand_written_factor(step, warmup_steps, total)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * expected, abs=1e-12), step
        optimizer.step()
        scheduler.step()
    resumed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    warmup_cosine(resumed, warmup_steps, total, step=total - 1)
    expected = hand_written_factor(total - 1, warmup_steps, total)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.1 * expected, abs=1e-12)


def test_fit_installs_the_schedule_at_the_first_step(lora_dpo_run):
    """The 3-step LoRA DPO run: transformers' schedule, one step ahead of the optimizer steps taken."""
    config = lora_dpo_run.cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler.lr_lambdas[0], functools.partial)
    assert config.scheduler.lr_lambdas[0].func.__module__ == "transformers.optimization"
    assert config.scheduler.last_epoch == lora_dpo_run.cli.trainer.global_step + 1 == 4
