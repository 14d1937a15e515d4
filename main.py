"""Command line of the project: `python main.py {fit,validate,test,predict} -c CONFIG` (LightningCLI).

Configs name the LightningModule and DataModule by `class_path`; they are parsed in OmegaConf mode so a
config can interpolate its own values (`${...}`). This file only wires; the work lives in the packages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from datamodules.records import RecordError
from datamodules.shapes.dataset import SyntheticDatasetError
from datamodules.video import VideoError

# Errors that are the user's to fix (a bad record, pair, video or dataset setting): one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (RecordError, VideoError, SyntheticDatasetError)


class AnswerabilityCLI(LightningCLI):
    """LightningCLI where the config and command line set the module, and a checkpoint only its weights and
    training state; `--ckpt_path last` means the run folder's `checkpoints/last.ckpt`.
    """

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the module's arguments with those saved in the checkpoint, silently
        # dropping e.g. `--model.init_args.output_dir` or `before_predictions` given to `test` with a
        # checkpoint.
        return

    def _resolve_last_checkpoint(self) -> None:
        # Lightning looks for "last" in its default checkpoint folder (with a WandbLogger a per-run W&B
        # folder), before the module's own checkpoint callback is attached: a resumed run would start afresh.
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") != "last":
            return
        output_dir = getattr(self.model, "hparams", {}).get("output_dir") or self.trainer.default_root_dir
        path = Path(output_dir) / "checkpoints" / "last.ckpt"  # AlignmentModule.configure_callbacks
        if path.is_file():
            kwargs["ckpt_path"] = str(path)

    before_fit = before_validate = before_test = before_predict = _resolve_last_checkpoint


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    return AnswerabilityCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> int:
    try:
        cli_main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
