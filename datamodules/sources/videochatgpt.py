"""Video-ChatGPT instruction QA (`VideoInstruct_Dataset.json`, a list of `{video_id, q, a}`) as answerable
records.

Exact duplicates and items with an empty question or answer are dropped and counted, never silently.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.records import QARecord
from datamodules.sources.common import AnnotationError, load_json, require


@dataclass
class ImportSummary:
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def import_videochatgpt(
    path: str | os.PathLike, video_ext: str = ".mp4"
) -> tuple[list[QARecord], ImportSummary]:
    """Records of a Video-ChatGPT QA file; `video` is `video_id` + `video_ext` unless it has an extension."""
    path = Path(path)
    data = load_json(path, "Video-ChatGPT")
    if not isinstance(data, list):
        raise AnnotationError(path, None, None, "expected a list of {video_id, q, a} items")
    if video_ext and not video_ext.startswith("."):
        video_ext = "." + video_ext
    summary = ImportSummary()
    records: list[QARecord] = []
    seen: set[str] = set()
    for number, item in enumerate(data):
        where = f"item {number}"
        video_id = str(require(path, where, item, "video_id", (str, int))).strip()
        question = require(path, where, item, "q", str).strip()
        answer = require(path, where, item, "a", str).strip()
        if not video_id:
            raise AnnotationError(path, where, "video_id", "is empty")
        if not question or not answer:
            summary.drop("empty question or answer")
            continue
        digest = hashlib.sha1(f"{video_id}\n{question}\n{answer}".encode()).hexdigest()
        if digest in seen:
            summary.drop("exact duplicate")
            continue
        seen.add(digest)
        video = video_id if Path(video_id).suffix else video_id + video_ext
        records.append(QARecord(
            id=f"videochatgpt-{digest[:16]}",
            video=video,
            question=question,
            answer=answer,
            answerable=True,
            source="videochatgpt",
            meta={"video_id": video_id, "index": number},
        ))
    summary.written = len(records)
    return records, summary
