"""Command line of the project: `python main.py {fit,validate,test,predict} -c CONFIG` (LightningCLI).

Configs name the LightningModule and DataModule by `class_path`; they are parsed in OmegaConf mode so a
config can interpolate its own values (`${...}`). This file only wires; the work lives in the packages.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI


class AnswerabilityCLI(LightningCLI):
    """LightningCLI where `--ckpt_path last` means the run folder's `checkpoints/last.ckpt`.

    Lightning looks for "last" in its default checkpoint folder, which with a WandbLogger is a per-run W&B
    folder, before the module's own checkpoint callback is attached; a resumed run would then start afresh.
    """

    def _resolve_last_checkpoint(self) -> None:
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


if __name__ == "__main__":
    cli_main()
