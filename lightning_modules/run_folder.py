"""The run folder that `main.py` commands write: one writer at a time, checkpoints that a kill cannot leave
half-linked, a checkpoint on SIGTERM, and the `last` checkpoint found even when its link was lost.

- `RunFolderLock`: an exclusive lock on `<run>/.lock` for the whole command (taken by rank 0 before anything
  is written), so a second command into the same folder stops at once with one line instead of mixing its
  checkpoints, config and exported model with the first one's. Taking it also checks that the folder is
  writable, before a whole epoch is trained.
- `RunCheckpoint`: Lightning's `ModelCheckpoint` whose `last.ckpt` link is made under a temporary name and
  renamed over the old one (a kill leaves the old link or the new one, never none), and which saves a
  checkpoint when the run is stopped by SIGTERM (a scheduler's preemption), so `--ckpt_path last` resumes.
- `StopOnSigterm`: `predict` stops at the next batch after a SIGTERM, as `fit` and `test` do.
- `SigtermNoted`: SIGTERM noted, not fatal, in work that runs before Lightning installs its handler (DPO's
  reference pass, in `on_fit_start`), so that the work can save what it did and stop.
- `check_checkpoint`: a damaged checkpoint file is one line naming it, not a traceback from the loader.
- `check_model_settings`, `check_trainable_keys`: a checkpoint of another model than the config's (another
  base, full fine-tuning for LoRA, other LoRA settings) is one line naming what differs, never scored in its
  place (the module loads with `strict_loading=False`, which would drop its weights without a word).
- `last_checkpoint`: the file `--ckpt_path last` means: `last.ckpt` when it resolves, else the newest
  complete checkpoint of the folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.errors import UserError

LOCK_NAME = ".lock"
LAST = "last.ckpt"


class RunFolderError(UserError):
    """A run folder that another command is writing, or that cannot be written."""


class CheckpointError(UserError):
    """A `--ckpt_path` that names no checkpoint, or a checkpoint file that cannot be read."""


def check_checkpoint(path: str | os.PathLike, setting: str = "--ckpt_path") -> None:
    """A `CheckpointError` naming `path` when it is no file, or a file whose archive cannot be opened (cut
    short by a full disk or an interrupted copy: its zip directory, at the end, is missing). Opening reads the
    directory only, not the tensors. A folder (DeepSpeed's sharded checkpoint) is left to its strategy."""
    import torch

    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)  # name the file to delete
    if path.is_dir():
        return
    if not path.is_file():
        raise CheckpointError(f"{setting} {path}: no such checkpoint file")
    try:
        torch._C.PyTorchFileReader(str(path))
    except RuntimeError:
        raise CheckpointError(
            f"{setting} {path}: the checkpoint file is damaged (cut short?); delete it, or give another"
        ) from None


def check_model_settings(where: str, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """A `CheckpointError` when the model settings a checkpoint was saved with (`saved`) differ from the
    config's (`config`), both as `AlignmentModule.model_settings` gives them, naming each difference. `where`
    names the checkpoint, e.g. "--ckpt_path FILE"."""
    differences = []
    if not _same_base(saved.get("name_or_path"), config.get("name_or_path")):
        differences.append(f"model.name_or_path {saved.get('name_or_path')!r} in the checkpoint, "
                           f"{config.get('name_or_path')!r} in the config")
    saved_lora, lora = saved.get("lora"), config.get("lora")
    if (saved_lora is None) != (lora is None):
        kinds = ("full fine-tuning", "LoRA") if saved_lora is None else ("LoRA", "full fine-tuning")
        differences.append(f"model.lora: {kinds[0]} in the checkpoint, {kinds[1]} in the config")
    elif lora is not None:
        for key in sorted(set(saved_lora) | set(lora)):
            if saved_lora.get(key) != lora.get(key):
                differences.append(f"model.lora.{key} {saved_lora.get(key)} in the checkpoint, "
                                   f"{lora.get(key)} in the config")
    if differences:
        raise CheckpointError(
            f"{where}: a checkpoint of another model than the config's ({'; '.join(differences)}); give the "
            "checkpoint of a run with this config's model settings, or the settings it was trained with"
        )


def _same_base(saved: Any, config: Any) -> bool:
    """The same base model: the same name, or two spellings of one existing local folder."""
    if saved == config:
        return True
    if not isinstance(saved, str) or not isinstance(config, str):
        return False
    return Path(saved).exists() and Path(config).exists() and Path(saved).resolve() == Path(config).resolve()


def check_trainable_keys(where: str, saved: Iterable[str], trainable: Iterable[str]) -> None:
    """A `CheckpointError` when a checkpoint's weights (`saved` keys) are not the model's trainable ones:
    some missing (they would keep their initial values) or unexpected (they would be dropped), with the
    count and the first few of each."""
    saved, trainable = set(saved), set(trainable)
    problems = []
    for kind, keys in (("missing", trainable - saved), ("unexpected", saved - trainable)):
        if keys:
            first = ", ".join(sorted(keys)[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {kind} ({first})")
    if problems:
        raise CheckpointError(
            f"{where}: the checkpoint does not hold this model's trainable weights: {'; '.join(problems)}; "
            "it was saved from another model or LoRA setting: give the checkpoint of a run with this "
            "config's model settings"
        )


class RunFolderLock:
    """An exclusive, non-blocking `flock` on `<folder>/.lock`, released when the process ends or `release`
    is called; the file holds the holder's pid for the error message. The lock is advisory: it keeps this
    project's commands apart, on one machine or on a file system with working `flock` (NFS v4, Lustre)."""

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder = Path(folder)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise RunFolderError(
                f"{self.folder}: the run folder cannot be written ({error.strerror}); give a writable "
                "--model.init_args.output_dir / --trainer.default_root_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunFolderError(
                f"{self.folder}: another command is writing this run folder ({holder}); wait for it to end "
                "or give this one another --model.init_args.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {self.command}".encode(), 0)
        self._check_writable()
        self._fd = fd
        return self

    def _check_writable(self) -> None:
        """The lock file may exist from an earlier run in a folder that is now read-only: try a new file."""
        probe = self.folder / f".write-check-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise RunFolderError(
                f"{self.folder}: the run folder cannot be written ({error.strerror}); give a writable "
                "--model.init_args.output_dir / --trainer.default_root_dir"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with an atomic `last.ckpt` link and a checkpoint on SIGTERM.

    Lightning writes each checkpoint file atomically (a transaction: temporary file, then rename) but replaces
    the `last` link by removing it and then linking: a kill in between leaves no `last.ckpt`. Here the new
    link is made under a temporary name and renamed over the old one. On SIGTERM, which Lightning turns into a
    `SIGTERMException` between two training steps (so the weights and the optimizer agree), a checkpoint is
    saved and linked as `last`; any other exception saves nothing (a crash may leave a half-updated state).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(save_on_exception=True, **kwargs)

    @staticmethod
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            partial = f"{linkpath}.partial"
            if os.path.lexists(partial):
                os.remove(partial)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), partial)
            os.replace(partial, linkpath)
        trainer.strategy.barrier()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


class StopOnSigterm(Callback):
    """Stop `predict` at the next batch after a SIGTERM, as Lightning's training and evaluation loops do (its
    prediction loop notes the signal but runs to the end: minutes on a large set)."""

    def on_predict_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException


class SigtermNoted:
    """A context in which a SIGTERM is noted (`received`) instead of ending the process, for work that runs
    before Lightning installs its own handler (it does so after `on_fit_start`); at exit the previous handler
    is back. `forward(signum)` is called at the first signal (Lightning's handler passes it on to the ranks
    its launcher started). Outside the main thread no handler can be set, and nothing is noted."""

    def __init__(self, forward: Callable[[int], None] | None = None):
        self.forward = forward
        self.received = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> SigtermNoted:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
            self._installed = True
        return self

    def _note(self, signum: int, frame: Any) -> None:
        if not self.received and self.forward is not None:
            self.forward(signum)
        self.received = True

    def __exit__(self, *exc_info: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint `--ckpt_path last` resumes from: `<folder>/last.ckpt` when it resolves to a file, else
    the newest `*.ckpt` of the folder (a kill between removing an old checkpoint and relinking `last` leaves a
    dangling link beside a complete checkpoint); None when there is none."""
    folder = Path(folder)
    last = folder / LAST
    if last.is_file():
        return last
    candidates = [p for p in folder.glob("*.ckpt") if p.name != LAST and p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
