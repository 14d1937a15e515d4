"""`-c configs/trainer/fsdp.yaml` with a shipped setup (a bf16 checkpoint, fp32 LoRA adapters, bf16-mixed):
`main.py fit` on 2 CPU processes (gloo), through a subclass of Lightning's FSDPStrategy that only lifts
Lightning's GPU-only check (tests/cpu_strategies.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp_fit_with_a_bf16_checkpoint_and_lora_on_two_cpu_processes(tmp_path, cli_args, main_env,
                                                                        tiny_base):
    """bf16 base + fp32 adapters used to stop at wrap time ("Must flatten tensors with uniform dtype"); the
    batch's records (frozen dataclasses) broke FSDP's input conversion; rank 0's export needed the sharded
    weights gathered by every rank. 2 steps: adapter-only checkpoint, and an exported adapter that trained."""
    env = dict(main_env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), main_env["PYTHONPATH"]]))
    args = ["fit", "-c", str(REPO / "configs/trainer/fsdp.yaml"),
            *cli_args(None, tmp_path, base=tiny_base, lora=True, steps=2),
            "--trainer.strategy.class_path=cpu_strategies.CPUFSDPStrategy", "--trainer.devices=2",
            "--trainer.precision=bf16-mixed", "--trainer.val_check_interval=2",
            "--model.init_args.model.torch_dtype=bfloat16", "--model.init_args.lr=0.01"]
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "MEMBER: 2/2" in output and "Trainer.fit` stopped: `max_steps=2` reached" in output
    assert output.count("exported the LoRA adapter to") == 1, "rank 0 exports"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"]
    assert all("lora_" in key for key in checkpoint["state_dict"]), "adapter weights only"
    adapter = load_file(tmp_path / "hf_model" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "the exported adapter has trained weights"
    from peft import PeftModel

    from lightning_modules.video_llm import VideoLLMConfig, load_video_llm

    base, _ = load_video_llm(VideoLLMConfig(name_or_path=str(tiny_base)))
    loaded = PeftModel.from_pretrained(base, tmp_path / "hf_model")
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(loaded.get_parameter(key.removeprefix("llm.")), value.float(), msg=key)
