"""Training probes: callbacks that tests use in-process, or hand to `main.py` processes through
`--trainer.callbacks` (the process tests put tests/ on PYTHONPATH)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class StopAfter(L.Callback):
    """Stops training after `steps` optimizer steps: an interrupted run whose schedule spans max_steps."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class CrashAt(L.Callback):
    """Raises (on every rank) before optimizer step `step`: a run killed mid-epoch, after a checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"killed before step {self.step}")


class SeenBatches(L.Callback):
    """The record ids of the batch of each optimizer step: `ids[step]`, and with `path` also one JSON line
    `{"rank", "step", "ids"}` a step in `<path>.rank<N>.jsonl` (what a test reads back from a process)."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.ids: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step, ids = trainer.global_step, list(batch["ids"])
        self.ids[step] = ids
        if self.path is not None:
            row = {"rank": trainer.global_rank, "step": step, "ids": ids}
            with Path(f"{self.path}.rank{trainer.global_rank}.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process at the start of batch `batch` of `stage` (fit, test or predict): a
    scheduler's preemption at a known point. Lightning's handler is installed while the trainer runs."""

    def __init__(self, stage: str, batch: int):
        self.stage, self.batch = stage, batch

    def _maybe_signal(self, batch_idx: int) -> None:
        import os
        import signal

        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.stage == "fit":
            self._maybe_signal(batch_idx)

    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "test":
            self._maybe_signal(batch_idx)

    def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "predict":
            self._maybe_signal(batch_idx)
