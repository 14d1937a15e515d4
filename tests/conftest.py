"""Shared fixtures of the alignment and command-line tests: a tiny synthetic dataset, a tiny base checkpoint
(the tiny model's export command at small sizes), the arguments of a tiny `main.py` run, and one LoRA DPO run
that several tests inspect.

Everything is built once per session, on the CPU, from code: no download.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `main.py` is a script at the repository root, not an installed module
    sys.path.insert(0, str(REPO))

# The tiny video-LLM of these tests: a real LlavaNextVideoForConditionalGeneration with 1-layer towers.
TINY_ARCH = {"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "text_hidden": 32, "text_layers": 1,
             "text_heads": 2}
NUM_FRAMES = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from intra-op threads, which only add synchronisation (on a busy
    2-core machine a step was 40x slower with two threads than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """12 rendered clips with train (68 records) / val (6) / test (6) files."""
    from datamodules.shapes.dataset import build_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic") / "data"
    build_synthetic_dataset(out, num_videos=12, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def processor():
    """The embedded tiny model's processor (its sizes do not matter to the collator beyond the frame size)."""
    from datamodules.shapes.questions import template_vocabulary
    from lightning_modules.tiny import TinyArchitecture, build_tiny_processor

    return build_tiny_processor(template_vocabulary(), TinyArchitecture())


def _export_tiny(out: Path, *options: str, **sizes: object) -> Path:
    from lightning_modules.tiny import main

    sizes_args = [f"--{key.replace('_', '-')}={value}" for key, value in sizes.items()]
    assert main(["--out", str(out), *options, *sizes_args]) == 0
    return out


@pytest.fixture(scope="session")
def export_tiny() -> Callable[..., Path]:
    """`export_tiny(out, *options, **sizes)`: `python -m lightning_modules.tiny --out OUT [OPTIONS]
    [--SIZE VALUE ...]` in this process, the tiny model at `sizes` (TinyArchitecture fields; the command's
    defaults for the others) saved as a folder; returns `out`."""
    return _export_tiny


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny model at the tests' sizes (seed 0), exported once by its command and loaded by path like a hub
    checkpoint: the base of the tests' runs."""
    return _export_tiny(tmp_path_factory.mktemp("base") / "tiny", **TINY_ARCH)


@pytest.fixture(scope="session")
def main_env() -> dict[str, str]:
    """Environment of a `python main.py` subprocess: one torch thread, W&B offline, the repo importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def cli_args(synthetic_data, tiny_base) -> Callable[..., list[str]]:
    """`cli_args(subcommand, out_dir, objective=, base=, lora=, steps=, logger=, extra=)`: the arguments of a
    tiny run of `main.py` on the synthetic data (no logger unless `logger` is a W&B save folder), from the
    `base` checkpoint (default: `tiny_base`)."""

    def build(
        subcommand: str | None,
        out_dir: str | os.PathLike,
        *,
        objective: str = "sft",
        base: str | os.PathLike | None = None,
        lora: bool = False,
        steps: int = 2,
        logger: str | os.PathLike | None = None,
        extra: tuple[str, ...] | list[str] = (),
    ) -> list[str]:
        args = [] if subcommand is None else [subcommand]
        args += [
            "--seed_everything=0",
            "--model=lightning_modules.alignment.AlignmentModule",
            "--data=datamodules.answerability.AnswerabilityDataModule",
            f"--data.init_args.data_dir={synthetic_data}",
            f"--data.init_args.objective={objective}",
            f"--model.init_args.objective={objective}",
            f"--data.init_args.num_frames={NUM_FRAMES}",
            f"--model.init_args.model.num_frames={NUM_FRAMES}",
            "--data.init_args.batch_size=4",
            "--data.init_args.eval_batch_size=6",
            "--model.init_args.max_new_tokens=4",
            f"--trainer.default_root_dir={out_dir}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
        if logger is None:
            args.append("--trainer.logger=false")
        else:
            args += [
                "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                f"--trainer.logger.init_args.save_dir={logger}",
                "--trainer.logger.init_args.offline=true",
                "--trainer.logger.init_args.project=answerability-tests",
            ]
        args.append(f"--model.init_args.model.name_or_path={base if base is not None else tiny_base}")
        if lora:
            args += ["--model.init_args.model.lora.r=4", "--model.init_args.model.lora.alpha=8"]
        return args + list(extra)

    return build


def _run_cli(args: list[str], run: bool = True):
    from main import cli_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli_main(args=args, run=run)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_main() -> Callable[..., object]:
    """`run_main(args, run=True)`: `main.cli_main` in this process, with one torch thread (restored after);
    returns the LightningCLI (`.trainer`, `.model`, `.datamodule`)."""
    return _run_cli


@pytest.fixture(scope="session")
def lora_dpo_run(tmp_path_factory, cli_args, tiny_base) -> SimpleNamespace:
    """One `fit` of LoRA DPO on the tiny base (3 steps, validation, offline W&B), shared by the tests that
    inspect its logged metrics, checkpoint and exported adapter, and that `test` / `predict` with it."""
    import wandb

    out = tmp_path_factory.mktemp("lora_dpo")
    args = cli_args("fit", out, objective="dpo", base=tiny_base, lora=True, steps=3, logger=out,
                    extra=["--model.init_args.lr=0.01", "--trainer.val_check_interval=3"])
    cli = _run_cli(args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    wandb.finish()
    # finish() can return before wandb-core has written the records to the offline run file (1 run in 10
    # here read back as its 7-byte header); tearing the service down closes the file.
    wandb.teardown()
    return SimpleNamespace(cli=cli, out=out, args=args, metrics=metrics, base=tiny_base)
