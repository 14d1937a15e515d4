"""DPO versus SFT training steps of the demo's tiny video-LLM: step time and peak memory, in one run.

Run: `.venv/bin/python benchmarks/train_step.py [--pairs 32] [--frames 2 16] [--steps 5] [--threads 1]`

The model is the demo's tiny LLaVA-NeXT-Video (`python -m lightning_modules.tiny`'s default sizes, those of
configs/shapes/*.yaml, randomly initialised), exported into a temporary folder with a small synthetic dataset.
For each clip length (`--frames`: the demo's 2 frames, and 16 frames, where the video tokens are most of the
prompt) and for LoRA and full fine-tuning, DPO on B pairs is compared with SFT on the same B prompts (the
same clips and questions, one response each: the gold answer). Each setting runs in fresh subprocesses, one
after another: each decodes and collates one batch, builds the module (`AlignmentModule`) and AdamW, and runs
`--steps` steps of `model_step` + backward + optimizer step (no Trainer, so no loop overhead).

With `precompute_ref_log_probs` (the default) the DPO module's reference log-probabilities are computed once
before the timed steps (`AlignmentModule.precompute_reference`), as `fit` does before training; that one-off
pass is timed on its own ("ref pass"). A module without that option (the code before it) runs the reference
inside each step.

Peak memory is the rise of the process's peak resident set (VmHWM, /proc/self/status) over its resident set
just before the model is built, with the peak reset there (`/proc/self/clear_refs`, Linux): it covers the
weights, the reference (a frozen copy without LoRA, while it exists), the optimizer state, activations and
gradients. It is measured in a second subprocess per setting with `MALLOC_MMAP_THRESHOLD_=65536`, so that
glibc maps every tensor of 64 KiB or more on its own and returns it when freed: the resident set then follows
the live tensors, where the default heap keeps freed memory. That setting slows allocation, so step times
come from the first subprocess, with the default allocator. Both subprocesses first warm up on a throwaway
copy of the module. (`tracemalloc` cannot see torch's allocations; `torch.cuda` statistics need a GPU.)

Targets (issue 19): DPO/SFT step time <= 1.4 at the long prompt and <= 1.6 at the demo's, peak memory
<= 1.2 in both. Step times are medians; other processes on the machine make them noisy.
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
KINDS = ("lora", "full")
OBJECTIVES = ("sft", "dpo")
TIME_TARGETS = {"long": 1.4, "demo": 1.6}
MEMORY_TARGET = 1.2


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(objective: str, kind: str, frames: int, data_dir: Path, model_dir: Path, pairs: int, warmup: int,
           steps: int, threads: int) -> dict:
    """One setting in this process: a JSON-able dict of its median step time and its peak memory."""
    import torch

    from datamodules.collation import ChatCollator, Example
    from datamodules.records import read_records
    from datamodules.shapes.questions import template_vocabulary
    from datamodules.video import read_video
    from lightning_modules.alignment import AlignmentModule
    from lightning_modules.tiny import TinyArchitecture, build_tiny_processor
    from lightning_modules.video_llm import LoraSettings, VideoLLMConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lora = LoraSettings(r=16, alpha=32) if kind == "lora" else None
    # The demo's model takes 256 positions and a 16-frame row spans 292 (16 x 16 video tokens and the text):
    # linear RoPE scaling x2 (512 positions) keeps every row inside its context at the same cost.
    config = VideoLLMConfig(name_or_path=str(model_dir), num_frames=frames, lora=lora, rope_scaling=2.0)
    records, _ = read_records(data_dir / "train.jsonl", data_dir)
    records = [r for r in records if r.rejected is not None and r.rejected.strip() != r.answer.strip()]
    records = records[:pairs]
    if len(records) < pairs:
        raise SystemExit(f"only {len(records)} pairs in {data_dir}")
    items = [(Example(r, str(data_dir / r.video), r.rejected), read_video(data_dir / r.video, frames))
             for r in records]
    processor = build_tiny_processor(template_vocabulary(), TinyArchitecture())  # the exported one's
    batch = ChatCollator(processor, objective, max_length=4096)(items)

    def build():
        torch.manual_seed(0)
        module = AlignmentModule(model=config, objective=objective)
        module.setup("fit")  # full fine-tuning DPO: the frozen reference copy
        module.train()
        reference_s = 0.0
        if objective == "dpo" and module.hparams.get("precompute_ref_log_probs", False):
            start = time.perf_counter()
            module.precompute_reference([batch])  # once per run, before training (frees a frozen copy)
            reference_s = time.perf_counter() - start
        optimizer = torch.optim.AdamW([p for p in module.llm.parameters() if p.requires_grad], lr=1e-4)
        return module, optimizer, reference_s

    def step(module, optimizer) -> float:
        start = time.perf_counter()
        loss = module.model_step(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # Warm-up in a first copy: imports, and the one-time buffers of the first forward and backward passes,
    # are the runtime's, not the step's. Then free it and hand the freed heap back (glibc's malloc_trim).
    module, optimizer, _ = build()
    for _ in range(warmup):
        step(module, optimizer)
    del module, optimizer
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = memory_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    module, optimizer, reference_s = build()
    built = memory_kb("VmRSS")
    times = [step(module, optimizer) for _ in range(steps)]
    return {
        "sequences": int(batch["input_ids"].shape[0]),
        "tokens": int(batch["input_ids"].shape[1]),
        "step_s": statistics.median(times),
        "reference_s": reference_s,
        "peak_mb": (memory_kb("VmHWM") - baseline) / 1024,
        "model_mb": (built - baseline) / 1024,
        "reference_copy": getattr(module, "reference", None) is not None,
    }


def run_worker(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], cwd=REPO, capture_output=True,
                          text=True, check=False, env={**os.environ, **env})
    if done.returncode != 0:
        sys.exit(f"{args[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32, help="B: DPO pairs a step, and SFT examples a step")
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 16],
                        help="clip lengths: the demo's (2), then a long prompt (16)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        objective, kind, frames = args.worker
        print(json.dumps(worker(objective, kind, int(frames), args.data, args.model, args.pairs, args.warmup,
                                args.steps, args.threads)))
        return

    from datamodules.shapes.dataset import build_synthetic_dataset
    from lightning_modules.tiny import export_tiny

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    results: dict[tuple[int, str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        data = Path(tmp) / "data"
        build_synthetic_dataset(data, num_videos=12, seed=0, progress=False)
        model = export_tiny(Path(tmp) / "tiny")
        for frames in args.frames:
            for kind in args.kinds:
                for objective in OBJECTIVES:
                    options = ["--data", str(data), "--model", str(model), "--pairs", str(args.pairs),
                               "--steps", str(args.steps), "--warmup", str(args.warmup),
                               "--threads", str(args.threads)]
                    setting = [objective, kind, str(frames)]
                    timed = run_worker(setting + options, {})
                    measured = run_worker(setting + options, {"MALLOC_MMAP_THRESHOLD_": "65536"})
                    results[frames, kind, objective] = {**measured, "step_s": timed["step_s"],
                                                        "reference_s": timed["reference_s"]}
                    print(f"  done: {frames} frames, {kind}, {objective}", flush=True)

    print(f"demo's tiny video-LLM (random weights), CPU, {args.threads} torch thread(s); "
          f"B = {args.pairs}: DPO on B pairs, SFT on the same B prompts; median of {args.steps} steps")
    print("peak: the most resident memory (VmHWM) over build + steps, above the level before the module "
          "was built; ref pass: the one-off reference pass over this batch (0: none, or inside the step)")
    print(f"{'frames':>6} {'kind':<5} {'objective':<9} {'rows x tokens':>14} {'ref copy':>8} "
          f"{'weights (MB)':>12} {'step (ms)':>10} {'ref pass (ms)':>13} {'peak (MB)':>10}")
    for (frames, kind, objective), r in results.items():
        shape = f"{r['sequences']} x {r['tokens']}"
        copy = "yes" if r["reference_copy"] else "no"
        print(f"{frames:>6} {kind:<5} {objective:<9} {shape:>14} {copy:>8} {r['model_mb']:>12.1f} "
              f"{1000 * r['step_s']:>10.1f} {1000 * r['reference_s']:>13.1f} {r['peak_mb']:>10.1f}")
    for index, frames in enumerate(args.frames):
        prompt = "demo" if index == 0 else "long"
        for kind in args.kinds:
            sft, dpo = results[frames, kind, "sft"], results[frames, kind, "dpo"]
            time_ratio, memory_ratio = dpo["step_s"] / sft["step_s"], dpo["peak_mb"] / sft["peak_mb"]
            time_ok = "ok" if time_ratio <= TIME_TARGETS[prompt] else "OVER"
            memory_ok = "ok" if memory_ratio <= MEMORY_TARGET else "OVER"
            print(f"{frames:>2} frames ({prompt}), {kind:<4} DPO/SFT: step time {time_ratio:.2f}x "
                  f"(target <= {TIME_TARGETS[prompt]}: {time_ok}), peak memory {memory_ratio:.2f}x "
                  f"(target <= {MEMORY_TARGET}: {memory_ok})")


if __name__ == "__main__":
    main()
