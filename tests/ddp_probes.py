"""Callbacks that tests hand to `main.py` processes through `--trainer.callbacks` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class CrashAt(L.Callback):
    """Raises on every rank before optimizer step `step`: a run killed mid-epoch, after a checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"killed before step {self.step}")


class SeenBatches(L.Callback):
    """Appends `{"rank", "step", "ids"}` for the batch of each optimizer step to `<path>.rank<N>.jsonl`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        row = {"rank": trainer.global_rank, "step": trainer.global_step, "ids": list(batch["ids"])}
        with Path(f"{self.path}.rank{trainer.global_rank}.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
