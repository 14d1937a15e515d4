"""The released DPO negatives of UVQA (`train_negative_<category>.json`) as the `rejected` responses of the
records of their training file (`train_<category>.json`).

The paper's code (EsYoon7/UVQA, `training_code/data_utils/data_utils_dpo.py`) pairs item i of the training
file with item i of the negatives file, checking only that the two files have the same length: the chosen
response is the training item's `new_answer`, the rejected one the negative's `new_answer`, asked with the
negative's own `new_question` and shown the training item's video. The join here is the same, by position, and
checked: the two items must name the same video (`vid`) and ask the same question (`new_question`, compared
with runs of whitespace collapsed and case folded), else one error names the first mismatch (file, item,
field). Items are numbered from 1, as the UVQA importer numbers them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from datamodules.records import write_records
from datamodules.sources.common import AnnotationError, load_json, refuse_overwriting_inputs, require
from datamodules.sources.uvqa import UVQAImport, add_uvqa_arguments, convert_uvqa

JOINED_FIELDS = ("vid", "new_question")
"""The fields a training item and its negative must agree on."""


def _normalised(field_name: str, text: str) -> str:
    return text.strip() if field_name == "vid" else " ".join(text.split()).casefold()


def released_rejected(
    training: list[Any], negatives: Any, training_path: str | os.PathLike, negatives_path: str | os.PathLike
) -> list[str]:
    """The rejected response of every training item: the `new_answer` of the negative at its position.

    Raises `AnnotationError` naming the negatives file, the first item whose `vid` or `new_question` differs
    from its training item's, and the field; or the two lengths when they differ.
    """
    training_path, negatives_path = Path(training_path), Path(negatives_path)
    if not isinstance(negatives, list):
        problem = f"expected a JSON list of UVQA items, got {type(negatives).__name__}"
        raise AnnotationError(negatives_path, None, None, problem)
    rejected = []
    for number, (item, negative) in enumerate(zip(training, negatives, strict=False), start=1):
        where = f"item {number}"
        for name in JOINED_FIELDS:
            ours = require(training_path, where, item, name, str)
            theirs = require(negatives_path, where, negative, name, str)
            if _normalised(name, ours) != _normalised(name, theirs):
                raise AnnotationError(
                    negatives_path, where, name,
                    f"{theirs.strip()!r} differs from item {number} of {training_path} ({ours.strip()!r}); "
                    "negatives are joined to training items by position, as the paper's code joins them",
                )
        answer = require(negatives_path, where, negative, "new_answer", str).strip()
        if not answer:
            raise AnnotationError(negatives_path, where, "new_answer", "is empty")
        rejected.append(answer)
    if len(negatives) != len(training):
        raise AnnotationError(
            negatives_path, None, None,
            f"has {len(negatives)} items and {training_path} has {len(training)}: negatives are joined to "
            "training items by position, one each",
        )
    return rejected


def read_uvqa_with_negatives(
    training_path: str | os.PathLike,
    negatives_path: str | os.PathLike,
    category: str,
    extension: str = ".mp4",
) -> UVQAImport:
    """The records of a UVQA training file (as `import-uvqa` makes them), each with its released negative's
    answer as `rejected` (`meta["negatives"]` names the file it came from)."""
    training = load_json(training_path, "UVQA")
    result = convert_uvqa(training, category, training_path, extension)
    rejected = released_rejected(training, load_json(negatives_path, "UVQA negatives"), training_path,
                                 negatives_path)
    name = Path(negatives_path).name
    records = [
        replace(record, rejected=rejected[record.meta["index"] - 1], meta={**record.meta, "negatives": name})
        for record in result.records
    ]
    return UVQAImport(records, result.duplicates)


# ================================================================================================ CLI
def add_import_uvqa_negatives_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import-uvqa-negatives",
        help="import a released UVQA training file with its DPO negatives as rejected responses",
        description="Convert a UVQA training file as import-uvqa does, and give each record the answer of "
        "the released negative at the same position (train_negative_<category>.json) as its rejected "
        "response. The join is by position, as in the paper's code, and checked: each negative must name the "
        "same video and ask the same question as its training item.",
    )
    add_uvqa_arguments(parser, "train_object.json")
    parser.add_argument("--negatives", required=True, type=Path, metavar="FILE",
                        help="e.g. train_negative_object.json (attribute: train_negatvie_attribute.json)")
    parser.set_defaults(func=run_import_uvqa_negatives)
    return parser


def run_import_uvqa_negatives(args: argparse.Namespace) -> int:
    refuse_overwriting_inputs([args.out], [args.input, args.negatives])
    result = read_uvqa_with_negatives(args.input, args.negatives, args.category, args.extension)
    write_records(args.out, result.records)
    print(f"{args.out}: wrote {len(result.records)} {args.category} records from {args.input}, each with its "
          f"rejected response from {args.negatives}; dropped {result.duplicates} exact duplicates")
    return 0
