"""Read an offline W&B run file (``run-<id>.wandb``) back: the history, summary and config keys it holds.

The file is W&B's record log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records
(4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) in 32 KiB blocks, each record a
serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    out, pending, index = [], b"", HEADER
    while index + HEADER <= len(data):
        left = BLOCK - index % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            index += left
            continue
        _, length, kind = struct.unpack("<IHB", data[index:index + HEADER])
        if kind == 0 and length == 0:  # zero-filled tail of the last block
            break
        chunk = data[index + HEADER:index + HEADER + length]
        index += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _set(target: dict[str, Any], item: Any) -> None:
    """Store an item: a nested key (a table's or image's fields) as a dict under its first part."""
    value = json.loads(item.value_json)
    if item.key:
        target[item.key] = value
        return
    *parents, last = item.nested_key
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def _key(item: Any) -> str:
    return item.key or item.nested_key[0]


@dataclass
class OfflineRun:
    history: dict[str, list[Any]] = field(default_factory=dict)  # key -> logged values (JSON-decoded)
    # summary and config: key -> value; a value with fields (a table, an image, W&B's own settings) is a dict
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def read_run(path: str | Path) -> OfflineRun:
    """History rows, final summary and config of an offline run file."""
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            for key, value in row.items():
                run.history.setdefault(key, []).append(value)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, item)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, item)
    return run


def run_file(folder: str | Path) -> Path:
    """The one offline run file under a W&B save folder."""
    found = sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
    assert len(found) == 1, f"expected one offline run under {folder}, found {found}"
    return found[0]
