"""Command line of the project: `python main.py {fit,validate,test,predict} -c CONFIG` (LightningCLI).

Configs name the LightningModule and DataModule by `class_path`; they are parsed in OmegaConf mode so a
config can interpolate its own values (`${...}`). This file only wires; the work lives in the packages.

A user error (a bad record, video, setting, config key or checkpoint path; see `datamodules.errors`) exits
with status 2 and one line on stderr, also when it was raised in a DataLoader worker. A command stopped by
SIGTERM exits with status 143 and one line saying what was written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.errors import user_error_message
from lightning_modules.preference import ReferencePassStopped
from lightning_modules.run_folder import CheckpointError, RunFolderLock, check_checkpoint, last_checkpoint

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process ended by the signal

# ckpt_path values that Lightning resolves itself (not file paths).
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc")


class Terminated(Exception):
    """A command stopped by SIGTERM; the message says what was and was not written."""


class ConfigArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors start with one line naming the offending key (before jsonargparse's
    details), without the usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)  # an inner parse that the caller catches, or jsonargparse's debug mode
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {config_error_line(message)}\n")
        if "\n" in message:
            sys.stderr.write("details:\n" + "".join(f"  {line}\n" for line in message.splitlines()))
        sys.stderr.write(f"the accepted options: {prog} --help\n")
        sys.exit(2)


_STRUCTURE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|"
    r"- Expected a <class 'NoneType'>)"
)


def config_error_line(message: str) -> str:
    """One line of a jsonargparse error: its innermost problem with the dotted key it is under, e.g.
    `model.model.lora: Option 'rr' is not accepted (lightning_modules.video_llm.LoraSettings)`."""
    lines = message.splitlines()
    if len(lines) == 1:
        return message.strip()
    stack: list[tuple[int, str, str]] = []  # (indent, kind, name) of the keys and classes the line is under
    for raw in lines:
        text = raw.strip().removeprefix("- ").strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
        if key:
            stack.append((indent, "key", key[1]))
            if key[2]:
                text = key[2]
            else:
                continue
        elif (problem := re.match(r"Problem with given class_path '([^']+)':", text)) is not None:
            stack.append((indent, "class", problem[1]))
            continue
        if _STRUCTURE.search(raw):
            continue
        keys = ".".join(name for _, kind, name in stack if kind == "key")
        classes = [name for _, kind, name in stack if kind == "class"]
        return (f"{keys}: " if keys else "") + text + (f" ({classes[-1]})" if classes else "")
    return lines[0].strip()


class AnswerabilityCLI(LightningCLI):
    """LightningCLI where the config and command line set the module, and a checkpoint only its weights and
    training state; `--ckpt_path last` means the run folder's last checkpoint. Each command holds a lock on
    its run folder while it runs, and saves its config under its own name (`config.yaml` for `fit`,
    `<command>_config.yaml` for the others), so `test` in a run folder keeps `fit`'s config.
    """

    _lock: RunFolderLock | None = None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the module's arguments with those saved in the checkpoint, silently
        # dropping e.g. `--model.init_args.output_dir` or `before_predictions` given to `test` with a
        # checkpoint.
        return

    def before_instantiate_classes(self) -> None:
        name = "config.yaml" if self.subcommand == "fit" else f"{self.subcommand}_config.yaml"
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}

    def _run_folder(self) -> Path:
        return Path(getattr(self.model, "hparams", {}).get("output_dir") or self.trainer.default_root_dir)

    def _lock_run_folder(self) -> None:
        """Before anything is written (the config, a checkpoint): a second command into this folder, or a
        folder that cannot be written, stops here with one line."""
        if is_first_process():
            self._lock = RunFolderLock(self._run_folder(), self.subcommand).acquire()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as stopped:
            raise Terminated(self._terminated(subcommand, stopped)) from None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _terminated(self, subcommand: str, stopped: SIGTERMException) -> str:
        """What a SIGTERM left: `fit` saves a checkpoint (`RunCheckpoint`), or in DPO's reference pass, before
        training, the pairs computed so far (`ReferencePassStopped`); the others write at their end."""
        if isinstance(stopped, ReferencePassStopped):
            return (f"fit stopped by SIGTERM in the DPO reference pass, before training: {stopped}; rerun "
                    "the same command to compute the rest")
        if subcommand != "fit":
            folder = self._run_folder()
            return f"{subcommand} stopped by SIGTERM before its end: nothing was written to {folder}"
        saved = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
        if saved:
            return (f"fit stopped by SIGTERM at step {self.trainer.global_step}: checkpoint {saved} saved, "
                    "the model not exported; rerun with --ckpt_path last to resume")
        return "fit stopped by SIGTERM before its first step: nothing was saved"

    def _resolve_last_checkpoint(self) -> None:
        """`last`: the run folder's last checkpoint (`run_folder.last_checkpoint`). `fit` without one starts a
        new run; `validate`, `test` and `predict` without one are an error (they would score the untrained
        model), and so is a path that names no file."""
        # Lightning looks for "last" in its default checkpoint folder (with a WandbLogger a per-run W&B
        # folder), before the module's own checkpoint callback is attached: a resumed run would start afresh.
        kwargs = self.config_init[self.subcommand]
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            folder = self._run_folder() / "checkpoints"  # AlignmentModule.configure_callbacks
            path = last_checkpoint(folder)
            if path is not None:
                if path.name != "last.ckpt":
                    print(f"{folder / 'last.ckpt'} is missing: resuming from {path}", file=sys.stderr)
                check_checkpoint(path, "--ckpt_path last:")
                kwargs["ckpt_path"] = str(path)
            elif self.subcommand == "fit":
                print(f"no checkpoint in {folder}: starting a new run", file=sys.stderr)
                kwargs["ckpt_path"] = None
            else:
                raise CheckpointError(
                    f"--ckpt_path last: no checkpoint in {folder}; {self.subcommand} would use the untrained "
                    "model (train it first, or give the checkpoint's path)"
                )
        elif str(ckpt_path) not in LIGHTNING_CKPT_NAMES and not str(ckpt_path).startswith("registry"):
            check_checkpoint(ckpt_path)

    def _before_run(self) -> None:
        self._resolve_last_checkpoint()
        self._lock_run_folder()

    before_fit = before_validate = before_test = before_predict = _before_run


def is_first_process() -> bool:
    """Whether this is the job's first process: Lightning's launcher starts ranks > 0 of a node with
    LOCAL_RANK set, and nodes > 0 with NODE_RANK (torchrun and SLURM set RANK)."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") == "0" for name in ranks)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    return AnswerabilityCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=ConfigArgumentParser,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> int:
    try:
        cli_main(args)
    except Terminated as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return SIGTERM_EXIT
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
