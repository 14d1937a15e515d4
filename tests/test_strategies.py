"""`-c configs/trainer/fsdp.yaml` with a shipped setup (a bf16 checkpoint, fp32 LoRA adapters, bf16-mixed):
`main.py fit` on 2 CPU processes (gloo), through a subclass of Lightning's FSDPStrategy that only lifts
Lightning's GPU-only check (tests/cpu_strategies.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]


def _fsdp_fit(tmp_path, cli_args, main_env, tiny_base, *extra: str, objective: str = "sft") -> str:
    """`main.py fit -c configs/trainer/fsdp.yaml` of the tiny bf16 base with LoRA, 2 steps on 2 CPU processes,
    lr 0.01 (AdamW moves each trained weight by about that much a step); returns its output."""
    env = dict(main_env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), main_env["PYTHONPATH"]]))
    args = ["fit", "-c", str(REPO / "configs/trainer/fsdp.yaml"),
            *cli_args(None, tmp_path, objective=objective, base=tiny_base, lora=True, steps=2),
            "--trainer.strategy.class_path=cpu_strategies.CPUFSDPStrategy", "--trainer.devices=2",
            "--trainer.precision=bf16-mixed", "--trainer.val_check_interval=2",
            "--model.init_args.model.torch_dtype=bfloat16", "--model.init_args.lr=0.01", *extra]
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "MEMBER: 2/2" in output and "Trainer.fit` stopped: `max_steps=2` reached" in output
    return output


def _lora_b(run: Path) -> list[torch.Tensor]:
    adapter = load_file(run / "hf_model" / "adapter_model.safetensors")
    return [v for k, v in adapter.items() if "lora_B" in k]


@pytest.mark.slow
def test_fsdp_fit_with_a_bf16_checkpoint_and_lora_on_two_cpu_processes(tmp_path, cli_args, main_env,
                                                                        tiny_base):
    """bf16 base + fp32 adapters used to stop at wrap time ("Must flatten tensors with uniform dtype"); the
    batch's records (frozen dataclasses) broke FSDP's input conversion; rank 0's export needed the sharded
    weights gathered by every rank; the 7B configs' `gradient_clip_val: 0.3` stopped the first optimizer step
    (Lightning's FSDP precision plugin refuses norm clipping). 2 steps: adapter-only checkpoint, and an
    exported adapter that trained."""
    output = _fsdp_fit(tmp_path, cli_args, main_env, tiny_base, "--trainer.gradient_clip_val=0.3")
    assert "MEMBER: 2/2" in output and "Trainer.fit` stopped: `max_steps=2` reached" in output
    assert output.count("exported the LoRA adapter to") == 1, "rank 0 exports"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"]
    assert all("lora_" in key for key in checkpoint["state_dict"]), "adapter weights only"
    lora_b = _lora_b(tmp_path)
    assert lora_b and max(v.abs().max() for v in lora_b) > 1e-3, "the exported adapter has trained weights"
    from peft import PeftModel

    from lightning_modules.video_llm import VideoLLMConfig, load_video_llm

    base, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    loaded = PeftModel.from_pretrained(base, tmp_path / "hf_model")
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(loaded.get_parameter(key.removeprefix("llm.")), value.float(), msg=key)


@pytest.mark.slow
def test_fsdp_dpo_runs_its_reference_pass_in_the_root_forward_and_clips_the_global_norm(
        tmp_path, cli_args, main_env, tiny_base):
    """DPO under FSDP: the reference pass before training ran the model outside FSDP's root forward, where the
    root unit's weights (embeddings, tower, projector, head) are shards. Run through the root, it gives the
    log-probabilities of the policy's first step (fresh LoRA adapters are the base model), so the first
    step's implicit rewards are 0. Clipping at 1e-12 bounds AdamW's update of each weight by lr * 1e-12 /
    eps = 1e-6 a step (unclipped it is about lr = 0.01): the clip reached the optimizer."""
    logs = tmp_path / "logs"
    _fsdp_fit(tmp_path, cli_args, main_env, tiny_base, "--trainer.gradient_clip_val=1e-12",
              "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
              f"--trainer.logger.init_args.save_dir={logs}", objective="dpo")
    cache = json.loads(next((tmp_path / "reference_logps").glob("*.json")).read_text())
    assert len(cache["pairs"]) > 4, "every training and validation pair, from both ranks"
    with next(logs.rglob("metrics.csv")).open() as file:
        first = next(row for row in csv.DictReader(file) if row.get("train/rewards/chosen"))
    assert first["step"] == "0"
    for key in ("train/rewards/chosen", "train/rewards/rejected"):
        assert abs(float(first[key])) < 1e-3, (key, first[key])
    lora_b = _lora_b(tmp_path)
    assert lora_b and max(v.abs().max() for v in lora_b) < 1e-5, "clipped to a gradient norm of 1e-12"


@pytest.mark.parametrize("items", [0, 1, 5, 6])
def test_the_reference_pass_gives_every_rank_as_many_items_and_covers_them_all(items):
    """Under FSDP each reference forward is collective (every rank gathers the weights), so every rank must
    run as many batches: equal shares, the last wrapping round as `DistributedSampler` pads."""
    from lightning_modules.preference import rank_share

    shares = [rank_share(items, rank, 4) for rank in range(4)]
    assert len({len(share) for share in shares}) == 1
    assert sorted({index for share in shares for index in share}) == list(range(items))
    assert shares[1][:1] == ([1 % items] if items else [])
