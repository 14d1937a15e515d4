"""The prepared GPU check (issue 28): LLaVA-NeXT-Video-7B's shapes with random weights, through the project's
own code, in one script that needs no download.

Run: `python benchmarks/gpu_check.py [--out FILE] [--reduced] [--steps 3] [--peak-tflops T]`

The model is a `LlavaNextVideoForConditionalGeneration` of LLaVA-NeXT-Video-7B's shapes, its config written
below (Llama 32 x 4096, vocabulary 32,064; CLIP-L/336; 32 frames), with random weights made on the device:
`load_video_llm` reads a folder that holds that config and a processor (the real `LlavaNextVideoProcessor`
around the word-level tokenizer of `lightning_modules/tiny.py`), and only the weight read is replaced, by
random initialisation (the check needs the shapes, not 14 GB on disk). 32 frames x 144 video tokens and the
text make ~4.6k positions, beyond the 4,096 of that checkpoint's Llama: the config scales RoPE linearly by 2
(8,192 positions), as a real run at 32 frames would need to. Clips and records come from the synthetic
world, rendered in a temporary folder. Everything runs as the 7B configs do (configs/llava_next_video_7b/):
`AlignmentModule` with LoRA through peft (r 16 on the 7 projections), gradient checkpointing, bf16 weights,
bf16 autocast (Lightning's `bf16-mixed`), `ChatCollator` batches, `sdpa_padding_safe` attention.

It measures, and prints as one JSON object at the end (also written to `--out`):
- `sft` / `dpo`: a LoRA step (`model_step`, backward, clip at 0.3, AdamW) on 4 clips / 2 pairs: median step
  time, peak memory (`torch.cuda.max_memory_allocated`, weights included), tokens/s (non-padding positions)
  and model FLOPs utilisation; `definitions` in the output says how each is counted (FLOPs:
  torch.utils.flop_counter on one forward, F_vision + 3 x F_language).
- `pair_vs_separate`: DPO's one-pass pair rows against the rows [prompt][chosen] and [prompt][rejected], in
  bf16: the summed log-probabilities and token counts of each response.
- `left_padded_finite`: a left-padded bf16 batch through the model under `sdpa_padding_safe` with each SDPA
  kernel (`torch.nn.attention.sdpa_kernel`), and under transformers' plain `sdpa` (where CUDA gave NaN).
- `test`: `Trainer.test` on 8 items, paired (f1, and f0 with the adapters disabled): items/s.

`--reduced` (the default on a CPU) keeps all of that at tiny shapes (2 layers x 64, 4 frames) so that it runs
on a CPU in about a minute: tests/benchmarks/test_gpu_check.py runs it so. On a CPU, the CUDA-only parts
(kernel selection, CUDA memory statistics, MFU) are skipped, each with its reason in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from datamodules.collation import ChatCollator, Example  # noqa: E402
from datamodules.loading import ExampleDataset  # noqa: E402
from datamodules.records import read_records  # noqa: E402
from lightning_modules.video_llm import LoraSettings, VideoLLMConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of the model and the run."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    frames: int
    max_length: int
    max_new_tokens: int
    vocab_size: int = 32064
    max_positions: int = 4096
    """Llama's context in the checkpoint; loading scales RoPE linearly by `rope_factor` (`model.rope_scaling`,
    as the 7B configs do), so the context checked is max_positions x rope_factor."""
    rope_factor: float = 2.0


# llava-hf/LLaVA-NeXT-Video-7B-hf: Vicuna-7B (Llama 2) and CLIP ViT-L/14 at 336 px; the 7B configs' 32 frames,
# max_length 5120 and max_new_tokens 64.
FULL = Shape(text_hidden=4096, text_intermediate=11008, text_layers=32, text_heads=32, vision_hidden=1024,
             vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch_size=14,
             frames=32, max_length=5120, max_new_tokens=64)
REDUCED = Shape(text_hidden=64, text_intermediate=128, text_layers=2, text_heads=2, vision_hidden=32,
                vision_intermediate=64, vision_layers=2, vision_heads=2, image_size=56, patch_size=14,
                frames=4, max_length=1024, max_new_tokens=8)
SFT_CLIPS, DPO_PAIRS, TEST_ITEMS, EVAL_BATCH = 4, 2, 8, 4
LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
# Dense bf16 peak of NVIDIA GPUs (no sparsity), by a part of the device name; the first match counts.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
# Module names (torch.utils.flop_counter's) of the frozen vision side: the tower, pooling, projector.
VISION_PARTS = ("vision_tower", "vision_resampler", "multi_modal_projector")
DEFINITIONS = {
    "flops_per_step": "model FLOPs of a step = F_vision + 3 x F_language, from torch.utils.flop_counter on "
    "one no-grad forward of the step's batch (matmuls, convolutions and SDPA as executed, the LM head "
    "included): F_vision the frozen tower, pooling and projector (forward only), F_language the rest; 3x is "
    "the usual forward + backward (6 N T) convention, so it counts the weight gradients of the frozen "
    "weights that LoRA skips, and not the recompute of gradient checkpointing",
    "mfu": "flops_per_step / step_s / peak_flops",
    "tokens_per_s": "non-padding positions of the batch (attention_mask) / step_s",
    "step_s": "median of the timed steps: model_step, backward, clip at 0.3, AdamW step (synchronised)",
    "peak_memory_gib": "torch.cuda.max_memory_allocated over the warm-up and timed steps, weights included",
}


# ------------------------------------------------------------------------------------------ model
def model_config(shape: Shape, tokenizer: Any):
    """LLaVA-NeXT-Video's config at `shape`, with the token ids of the word-level tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    text = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads, rms_norm_eps=1e-5,
        max_position_embeddings=shape.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=768, hidden_act="quick_gelu",
    )
    return LlavaNextVideoConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, spatial_pool_mode="average",
        spatial_pool_stride=2, image_grid_pinpoints=[[shape.image_size, shape.image_size]],
        tie_word_embeddings=False,
    )


def write_checkpoint(shape: Shape, folder: Path) -> Path:
    """A checkpoint folder without weights: the model's config and its processor."""
    from datamodules.shapes.questions import template_vocabulary
    from lightning_modules.tiny import TinyArchitecture, build_tiny_processor

    arch = TinyArchitecture(image_size=shape.image_size, patch_size=shape.patch_size)
    processor = build_tiny_processor(template_vocabulary(), arch)
    processor.tokenizer.model_max_length = shape.max_length
    model_config(shape, processor.tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def random_weights(device: torch.device):
    """`from_pretrained` of the image-text-to-text auto class builds the folder's config with random weights,
    on `device`, in eval mode (as loaded models are); everything else `load_video_llm` does is unchanged."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    def build(path: str, **kwargs: Any):
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)  # `rope_scaling` passes one
        with torch.device(device):
            return AutoModelForImageTextToText.from_config(config, **kwargs).eval()

    with mock.patch.object(AutoModelForImageTextToText, "from_pretrained", build):
        yield


def build_module(folder: Path, shape: Shape, objective: str, device: torch.device, out: Path):
    """The `AlignmentModule` of the 7B configs at `shape`, its model on `device`."""
    from lightning_modules.alignment import AlignmentModule

    # As the 7B configs: the checkpoint's 4,096 positions, scaled linearly at load (model.rope_scaling).
    config = VideoLLMConfig(name_or_path=str(folder), num_frames=shape.frames, torch_dtype="bfloat16",
                            gradient_checkpointing=True, lora=LORA, rope_scaling=shape.rope_factor)
    torch.manual_seed(0)
    with random_weights(device):
        module = AlignmentModule(model=config, objective=objective, lr=1e-5,
                                 max_new_tokens=shape.max_new_tokens, output_dir=str(out))
    return module.to(device)


# ------------------------------------------------------------------------------------------- data
def examples(shape: Shape, folder: Path) -> list[Example]:
    """Records of synthetic clips (one clip per example, each with a rejected response), clips rendered
    with `shape.frames` frames."""
    from datamodules.shapes.dataset import build_synthetic_dataset

    build_synthetic_dataset(folder, num_videos=TEST_ITEMS, seed=0, frames=shape.frames, progress=False,
                            fractions=(1.0, 0.0, 0.0), workers=1)
    records, _ = read_records(folder / "train.jsonl", folder)
    chosen, videos = [], set()
    for record in records:
        paired = record.rejected is not None and record.rejected.strip() != record.answer.strip()
        if paired and record.video not in videos:
            videos.add(record.video)
            chosen.append(Example(record, str(folder / record.video), record.rejected))
    if len(chosen) < TEST_ITEMS:
        raise RuntimeError(f"{len(chosen)} clips with a pair, {TEST_ITEMS} needed")
    return chosen[:TEST_ITEMS]


def collate(module, examples: list[Example], mode: str, shape: Shape) -> dict[str, Any]:
    items = [ExampleDataset(examples, shape.frames)[i] for i in range(len(examples))]
    batch = ChatCollator(module.processor, mode, shape.max_length)(items)
    return module.transfer_batch_to_device(batch, module.device, 0)


# ---------------------------------------------------------------------------------------- measures
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16(device: torch.device):
    """Lightning's `bf16-mixed` forward context."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def forward_flops(module, batch: dict[str, Any]) -> tuple[float, float]:
    """(vision, language) FLOPs of one no-grad forward of `batch` (pair rows for a DPO batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), bf16(module.device), counter:
        if "pair_segments" in batch:
            module.pair_logps(module.llm, batch)
        else:
            module(batch)
    counts = counter.get_flop_counts()
    vision = 0
    for name, ops in counts.items():
        parts = name.split(".")
        if parts[-1] in VISION_PARTS:  # the outermost module of each vision part (nested ones repeat it)
            vision += sum(ops.values())
    return float(vision), float(counter.get_total_flops() - vision)


def peak_flops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "skipped: no peak FLOP/s known for a CPU"
    name = torch.cuda.get_device_name(device)
    for part, peak in PEAK_BF16.items():
        if part in name:
            return peak, f"dense bf16 peak of {part}: {peak / 1e12:.0f} TFLOP/s"
    return None, f"skipped: no peak FLOP/s known for {name}; give --peak-tflops"


def train_steps(module, batch: dict[str, Any], warmup: int, steps: int, peak: float | None) -> dict[str, Any]:
    """`warmup` + `steps` LoRA steps on `batch` as `fit` runs them (train mode, bf16 autocast, clipping at
    0.3, AdamW): median step time, tokens/s, MFU and peak memory."""
    from lightning_modules.video_llm import set_training_mode

    device = module.device
    vision_flops, language_flops = forward_flops(module, batch)
    set_training_mode(module.llm, module.config)
    params = [p for p in module.llm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for index in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with bf16(device):
            loss = module.model_step(batch, "train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        losses.append(loss.item())
        if index >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = int(batch["attention_mask"].sum())
    flops = vision_flops + 3 * language_flops
    result = {
        "rows": int(batch["input_ids"].shape[0]),
        "positions": int(batch["input_ids"].shape[1]),
        "tokens": tokens,
        "losses": losses,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": tokens / step_s,
        "flops_vision_forward": vision_flops,
        "flops_language_forward": language_flops,
        "flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else "skipped: no peak FLOP/s (see peak_flops)",
    }
    result.update(memory(device))
    del optimizer
    return result


def memory(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"peak_memory_gib": "skipped: torch.cuda.max_memory_allocated needs CUDA"}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def pair_vs_separate(module, pairs: list[Example], shape: Shape) -> dict[str, Any]:
    """The pair rows' log-probabilities (one pass) against the separate rows [prompt][chosen] and
    [prompt][rejected] (SFT rows of the same prompts), in bf16, before any training step (eval mode)."""
    from lightning_modules.losses import sequence_logps

    module.llm.eval()
    rejected = [dataclasses.replace(e, record=dataclasses.replace(e.record, answer=e.rejected))
                for e in pairs]
    rows = pairs + rejected
    with torch.no_grad(), bf16(module.device):
        pair_batch = collate(module, pairs, "dpo", shape)
        pair, pair_counts = module.pair_logps(module.llm, pair_batch)
        row_batch = collate(module, rows, "sft", shape)
        separate, counts = sequence_logps(module(row_batch), row_batch["labels"])
    pair, separate = pair.float().cpu(), separate.float().cpu()
    difference = (pair - separate).abs()
    return {
        "dtype": "bfloat16 weights, bf16 autocast",
        "pair_logps": pair.tolist(),
        "separate_logps": separate.tolist(),
        "token_counts_equal": pair_counts.tolist() == counts.tolist(),
        "max_abs_diff": float(difference.max()),
        "max_rel_diff": float((difference / separate.abs().clamp_min(1e-6)).max()),
    }


def left_padded_finite(module, batch: dict[str, Any]) -> dict[str, Any]:
    """Whether the logits of a left-padded bf16 batch are finite: under `sdpa_padding_safe` and under
    transformers' `sdpa`, with each SDPA kernel on CUDA (the default kernel on a CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_modules.video_llm import SDPA_PADDING_SAFE

    device, base = module.device, module.llm.get_base_model()
    padded = int((batch["attention_mask"] == 0).any(dim=1).sum())
    result: dict[str, Any] = {"rows": int(batch["input_ids"].shape[0]), "left_padded_rows": padded}
    kernels = {"default": contextlib.nullcontext}
    if device.type == "cuda":
        backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH)
        kernels.update({b.name: (lambda b=b: sdpa_kernel([b])) for b in backends})
    else:
        result["kernels"] = "skipped: SDPA kernel selection (torch.nn.attention.sdpa_kernel) is CUDA-only"
    module.llm.eval()
    try:
        for implementation in (SDPA_PADDING_SAFE, "sdpa"):
            base.set_attn_implementation(implementation)
            result[implementation] = {name: _finite(module, batch, k) for name, k in kernels.items()}
    finally:
        base.set_attn_implementation(SDPA_PADDING_SAFE)
    return result


def _finite(module, batch: dict[str, Any], kernel) -> str:
    try:
        with torch.no_grad(), bf16(module.device), kernel():
            logits = module(batch)
    except RuntimeError as error:  # e.g. the flash kernel takes no attention mask
        return "unavailable: " + str(error).strip().splitlines()[0][:200]
    return "finite" if bool(torch.isfinite(logits).all()) else "NOT FINITE"


def paired_test_throughput(module, items: list[Example], shape: Shape, out: Path) -> dict[str, Any]:
    """`Trainer.test` (bf16-mixed) on `items`, paired: f1, and f0 with the adapters disabled."""
    import lightning as L
    from torch.utils.data import DataLoader

    device = module.device
    loader = DataLoader(ExampleDataset(items, shape.frames), batch_size=EVAL_BATCH,
                        collate_fn=ChatCollator(module.processor, "generate", shape.max_length))
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))
    synchronize(device)
    start = time.perf_counter()
    trainer.test(module, dataloaders=loader, verbose=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"items": len(items), "paired": bool(module.hparams.paired and module.uses_lora),
            "max_new_tokens": shape.max_new_tokens, "seconds": seconds, "items_per_s": len(items) / seconds,
            "note": "wall time of Trainer.test: generation of f1 and f0, refusal likelihoods, judge, reports"}


def positions_note(shape: Shape, report: dict[str, Any]) -> str:
    per_frame = (shape.image_size // shape.patch_size) ** 2 // 4  # patches pooled 2 x 2
    sft, dpo = report["sft"]["positions"], report["dpo"]["positions"]
    return (f"{shape.frames} frames x {per_frame} video tokens = {shape.frames * per_frame}; the longest "
            f"row: {sft} positions (SFT), {dpo} (DPO pair row); the checkpoint's Llama has "
            f"{shape.max_positions}: loading scales RoPE linearly by {shape.rope_factor:g} "
            f"({int(shape.max_positions * shape.rope_factor)} positions)")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- main
def run(shape: Shape, device: torch.device, work: Path, warmup: int, steps: int, peak_tflops: float | None):
    """Every measure, as one JSON-able dict."""
    import peft
    import transformers

    begin = time.perf_counter()
    peak, peak_source = peak_flops(device, peak_tflops)
    folder = write_checkpoint(shape, work / "checkpoint")
    items = examples(shape, work / "data")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "shape": dataclasses.asdict(shape),
        "lora": dataclasses.asdict(LORA),
        "precision": "bfloat16 weights, bf16 autocast (bf16-mixed), gradient checkpointing",
        "definitions": DEFINITIONS,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
    }

    module = build_module(folder, shape, "sft", device, work / "sft")
    report["weights_gib"] = (torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda"
                             else "skipped: torch.cuda.memory_allocated needs CUDA")
    batch = collate(module, items[:SFT_CLIPS], "sft", shape)
    report["sft"] = {"clips": SFT_CLIPS, **train_steps(module, batch, warmup, steps, peak)}
    by_length = sorted(items, key=lambda e: len(e.record.question))  # the shortest and longest prompts:
    generate = collate(module, [by_length[0], by_length[-1]], "generate", shape)  # left padding
    report["left_padded_finite"] = left_padded_finite(module, generate)
    report["test"] = paired_test_throughput(module, items, shape, work / "test")
    del module, batch, generate
    free(device)

    module = build_module(folder, shape, "dpo", device, work / "dpo")
    pairs = items[:DPO_PAIRS]
    report["pair_vs_separate"] = pair_vs_separate(module, pairs, shape)
    batch = collate(module, pairs, "dpo", shape)
    start = time.perf_counter()
    with bf16(device):
        module.precompute_reference([batch])
    reference_s = time.perf_counter() - start
    report["dpo"] = {"pairs": DPO_PAIRS, "reference_pass_s": reference_s,
                     **train_steps(module, batch, warmup, steps, peak)}
    del module, batch
    free(device)
    report["positions"] = positions_note(shape, report)
    report["seconds"] = time.perf_counter() - begin
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--reduced", action="store_true", help="tiny shapes (the default on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per objective")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = args.reduced or device.type != "cuda"
    shape = REDUCED if reduced else FULL
    print(f"gpu_check: {'reduced' if reduced else 'LLaVA-NeXT-Video-7B'} shapes on {device}", file=sys.stderr)
    # What the project's code prints (Lightning, the test reports) goes to stderr: stdout is the JSON alone.
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work, contextlib.redirect_stdout(sys.stderr):
        report = run(shape, device, Path(work), args.warmup, args.steps, args.peak_tflops)
    report = {"reduced": reduced, **report}
    text = json.dumps(report)  # a NaN or an infinity is written as such (NaN, Infinity)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
