"""The released UVQA files (EsYoon7/UVQA, `dataset/uvqa/<category>/`) as unanswerable `QARecord`s.

The eval and training files share one schema (docs/design.md section 3); exact duplicates are dropped
and counted, and a malformed item is an error naming the file, the item and the field.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.records import CATEGORIES, QARecord, write_records
from datamodules.sources.common import AnnotationError, load_json, require

# The field holding each category's missing element (the absent entity, relation or attribute).
MISSING_ELEMENT_FIELD = {
    "object": "generated_actor_or_object",
    "relation": "generated_relation",
    "attribute": "generated_attributes",
}
# Object and relation questions are about MOMA-LRG videos, whose `vid` is a bare YouTube-style id;
# attribute questions are about DiDeMo videos, whose `vid` is already a file name.
MOMA_CATEGORIES = frozenset({"object", "relation"})


@dataclass(frozen=True)
class UVQAImport:
    records: list[QARecord]
    duplicates: int  # exact duplicates dropped


def convert_uvqa(
    data: Any, category: str, path: str | os.PathLike = "<memory>", extension: str = ".mp4"
) -> UVQAImport:
    """Records from the decoded JSON of one UVQA file (a list of items) of the given category.

    `question`/`answer` come from `new_question`/`new_answer`, `missing_element` from the category's
    field, `video` from `vid` (plus `extension` for MOMA-LRG ids). Ids are a hash of the record's
    content, so they are stable across runs and file orderings.
    """
    if category not in MISSING_ELEMENT_FIELD:
        choices = ", ".join(MISSING_ELEMENT_FIELD)
        raise ValueError(f"unknown UVQA category {category!r}; choose one of {choices}")
    path = Path(path)
    if not isinstance(data, list):
        problem = f"expected a JSON list of UVQA items, got {type(data).__name__}"
        raise AnnotationError(path, None, None, problem)
    if extension and not extension.startswith("."):
        extension = "." + extension
    missing_field = MISSING_ELEMENT_FIELD[category]
    records: list[QARecord] = []
    seen: set[str] = set()
    duplicates = 0
    for number, item in enumerate(data, start=1):
        where = f"item {number}"
        vid = require(path, where, item, "vid", str).strip()
        question = require(path, where, item, "new_question", str).strip()
        answer = require(path, where, item, "new_answer", str).strip()
        if isinstance(item, dict) and item.get(missing_field) is None:
            raise AnnotationError(path, where, missing_field, f"missing (is this a UVQA {category} file?)")
        missing = " ".join(require(path, where, item, missing_field, str).split())
        values = {"vid": vid, "new_question": question, "new_answer": answer, missing_field: missing}
        for name, value in values.items():
            if not value:
                raise AnnotationError(path, where, name, "is empty")
        digest = hashlib.sha1("\n".join((category, vid, question, answer, missing)).encode()).hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        meta: dict[str, Any] = {"vid": vid, "index": number, "false_fact": item.get("generated_relation")}
        if "orig_relation" in item:
            meta["true_fact"] = item["orig_relation"]
        if "orig_attribute" in item:
            meta["orig_attribute"] = item["orig_attribute"]
        records.append(QARecord(
            id=f"uvqa-{category}-{digest[:12]}",
            video=vid + extension if category in MOMA_CATEGORIES else vid,
            question=question,
            answer=answer,
            answerable=False,
            category=category,
            missing_element=missing,
            source="uvqa",
            meta=meta,
        ))
    return UVQAImport(records, duplicates)


def read_uvqa(path: str | os.PathLike, category: str, extension: str = ".mp4") -> UVQAImport:
    """Records of one UVQA JSON file (eval or training) of the given category."""
    return convert_uvqa(load_json(path, "UVQA"), category, path, extension)


def import_uvqa(
    input_path: str | os.PathLike, category: str, out_path: str | os.PathLike, extension: str = ".mp4"
) -> UVQAImport:
    """Convert one UVQA file and write its records atomically to `out_path` (JSONL)."""
    result = read_uvqa(input_path, category, extension)
    write_records(out_path, result.records)
    return result


def add_uvqa_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The options of a command that converts a released UVQA file: `--input` (e.g. `example`),
    `--category`, `--out` and `--extension` (shared by `import-uvqa` and `import-uvqa-negatives`)."""
    parser.add_argument("--input", required=True, type=Path, metavar="FILE", help=f"e.g. {example}")
    parser.add_argument("--category", required=True, choices=CATEGORIES)
    parser.add_argument("--out", required=True, type=Path, metavar="OUT.jsonl")
    parser.add_argument("--extension", default=".mp4",
                        help="extension added to MOMA-LRG video ids (object, relation; default .mp4)")
