"""SFT versus DPO training steps of the embedded tiny video-LLM: step time and peak memory, in one run.

Run: `.venv/bin/python benchmarks/train_step.py [--pairs 8] [--steps 10] [--threads 1]`

The model is `VideoLLMConfig()`'s default (the tiny LLaVA-NeXT-Video, randomly initialised vision tower, 4
frames), on a small synthetic dataset built in a temporary folder. Each setting runs in fresh subprocesses,
one after another: each decodes and collates one batch, builds the module (`AlignmentModule`) and AdamW, and
runs `--steps` steps of `model_step` + backward + optimizer step (no Trainer, so no loop overhead). Both
objectives see the same number of sequences per step: SFT a batch of 2 x pairs examples, DPO `pairs` pairs
(a chosen and a rejected row each), plus for DPO the reference's no-grad forward pass.

Peak memory is the rise of the process's peak resident set (VmHWM) over its resident set just before the
model is built, with the peak reset there (`/proc/self/clear_refs`, Linux): it covers the weights, the
reference (a frozen copy without LoRA), the optimizer state, activations and gradients. It is measured in a
second subprocess per setting with `MALLOC_MMAP_THRESHOLD_=65536`, so that glibc maps every tensor of 64 KiB
or more on its own and returns it when freed: the resident set then follows the live tensors (repeat runs
agree to 0.1 MB), where the default heap keeps freed memory and made the figure vary by tens of MB. That
setting slows allocation, so step times come from the first subprocess, with the default allocator.
Both subprocesses first warm up on a throwaway copy of the module (imports and the one-time buffers of the
first passes are the runtime's, not the step's). `tracemalloc` cannot see torch's allocations, and
`torch.cuda` memory statistics do not exist on a CPU.

The issue's target: LoRA DPO peak memory within 1.2x of LoRA SFT's (one model copy: the reference is the
adapters-disabled model). Step times are medians; other processes on the machine make them noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> (objective, LoRA?)
    "sft-lora": ("sft", True),
    "dpo-lora": ("dpo", True),
    "sft-full": ("sft", False),
    "dpo-full": ("dpo", False),
}


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(setting: str, data_dir: Path, pairs: int, warmup: int, steps: int, threads: int) -> dict:
    """One setting in this process: a JSON-able dict of its median step time and its peak memory."""
    import torch

    from datamodules.answerability import ChatCollator, Example
    from datamodules.records import read_records
    from datamodules.shapes.questions import template_vocabulary
    from datamodules.video import read_video
    from lightning_modules.alignment import AlignmentModule
    from lightning_modules.tiny import build_tiny_processor
    from lightning_modules.video_llm import LoraSettings, VideoLLMConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    objective, lora = SETTINGS[setting]
    config = VideoLLMConfig(lora=LoraSettings(r=16, alpha=32) if lora else None)
    records, _ = read_records(data_dir / "train.jsonl", data_dir)
    records = records[: 2 * pairs if objective == "sft" else pairs]
    items = [(Example(r, str(data_dir / r.video), r.rejected),
              read_video(data_dir / r.video, config.num_frames)) for r in records]
    batch = ChatCollator(build_tiny_processor(template_vocabulary(), config.tiny), objective)(items)

    def build():
        torch.manual_seed(0)
        module = AlignmentModule(model=config, objective=objective)
        module.setup("fit")  # full fine-tuning DPO: the frozen reference copy
        module.train()
        return module, torch.optim.AdamW([p for p in module.llm.parameters() if p.requires_grad], lr=1e-4)

    def step(module, optimizer) -> float:
        start = time.perf_counter()
        loss = module.model_step(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # Warm-up in a first copy: imports, and the one-time buffers of the first forward and backward passes,
    # are the runtime's, not the step's. Then free it and hand the freed heap back (glibc's malloc_trim).
    module, optimizer = build()
    for _ in range(warmup):
        step(module, optimizer)
    del module, optimizer
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = memory_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    module, optimizer = build()
    built = memory_kb("VmRSS")
    times = [step(module, optimizer) for _ in range(steps)]
    trainable = sum(p.numel() for p in module.llm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {
        "setting": setting,
        "sequences": int(batch["input_ids"].shape[0]),
        "tokens": int(batch["input_ids"].shape[1]),
        "step_s": statistics.median(times),
        "peak_mb": (memory_kb("VmHWM") - baseline) / 1024,
        "model_mb": (built - baseline) / 1024,
        "trainable": trainable,
        "parameters": total,
        "reference_copy": module.reference is not None,
    }


def run_worker(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], cwd=REPO, capture_output=True,
                          text=True, check=False, env={**os.environ, **env})
    if done.returncode != 0:
        sys.exit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="DPO pairs a step (SFT: twice as many examples)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.pairs, args.warmup, args.steps, args.threads)))
        return

    from datamodules.shapes.dataset import build_synthetic_dataset

    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        data = Path(tmp) / "data"
        build_synthetic_dataset(data, num_videos=8, seed=0, progress=False)
        for setting in args.settings:
            options = ["--pairs", str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(args.threads)]
            timed = run_worker([setting, "--data", str(data), *options], {})
            measured = run_worker([setting, "--data", str(data), *options],
                                  {"MALLOC_MMAP_THRESHOLD_": "65536"})
            results[setting] = {**measured, "step_s": timed["step_s"]}

    print(f"tiny default video-LLM (VideoLLMConfig(), random tower), CPU, {args.threads} torch thread(s); "
          f"{args.pairs} DPO pairs = {2 * args.pairs} SFT examples per step; median of {args.steps} steps")
    print("weights: resident memory of the built module (policy, and reference copy if any); peak: the most "
          "resident memory over the steps, above the level before the module was built")
    print(f"{'setting':<10} {'sequences x tokens':>18} {'trainable':>10} {'params':>10} {'ref copy':>8} "
          f"{'weights (MB)':>12} {'step (ms)':>10} {'peak (MB)':>10}")
    for r in results.values():
        shape = f"{r['sequences']} x {r['tokens']}"
        copy = "yes" if r["reference_copy"] else "no"
        print(f"{r['setting']:<10} {shape:>18} {r['trainable']:>10,} {r['parameters']:>10,} {copy:>8} "
              f"{r['model_mb']:>12.1f} {1000 * r['step_s']:>10.1f} {r['peak_mb']:>10.1f}")
    for kind in ("lora", "full"):
        sft, dpo = results.get(f"sft-{kind}"), results.get(f"dpo-{kind}")
        if sft and dpo:
            time_ratio, memory_ratio = dpo["step_s"] / sft["step_s"], dpo["peak_mb"] / sft["peak_mb"]
            verdict = ("within" if memory_ratio <= 1.2 else "OVER") + " the 1.2x target"
            print(f"{kind:<5} DPO/SFT: step time {time_ratio:.2f}x, peak memory {memory_ratio:.2f}x"
                  + (f" ({verdict})" if kind == "lora" else " (reference: a frozen copy)"))


if __name__ == "__main__":
    main()
