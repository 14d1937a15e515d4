"""Helpers of the DataModule and collator tests over a synthetic record folder (the `synthetic_data`
fixture): its record rows, (Example, frames) items for the collator, and JSONL files written from rows."""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.collation import Example
from datamodules.records import read_records
from datamodules.video import read_video


def items_of(data_dir: Path, ids: list[str] | None = None, split: str = "train", num_frames: int = 2):
    """(Example, frames) pairs of the records of `split` with the given ids (default: all)."""
    records, _ = read_records(data_dir / f"{split}.jsonl", data_dir)
    if ids is not None:
        by_id = {r.id: r for r in records}
        records = [by_id[i] for i in ids]
    return [
        (Example(r, str(data_dir / r.video), r.rejected, str(data_dir / f"{split}.jsonl")),
         read_video(data_dir / r.video, num_frames))
        for r in records
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def record_rows(data_dir: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
