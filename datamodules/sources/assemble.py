"""`assemble`: one dataset folder, `train/val/test.jsonl`, from per-category and answerable record files.

The steps, each deterministic for the seed and independent of the order of the files given:

1. Read every file (validated; a file without records is an error). Ids must be unique across the input
   files and across the test files.
2. Records of two files about the same video and question must give the same answer (compared with runs of
   whitespace collapsed and case folded): a conflict is an error naming both; an agreeing copy is dropped and
   counted, and the test files' copy is the one kept.
3. The test files are the test split whole, and their videos are held out: input records on them are dropped
   and counted (an input file left with no record is an error). Ids must then be unique across all records.
4. The input videos are split by video, so that a video is in exactly one split: grouped by the labels of
   their records (`answerable` or the category), each group gives `test_fraction` of its videos to test (in
   addition to the test files) and `val_fraction` to val, at least one video each when the fraction is not 0
   and one is left for train; the rest go to train.
5. Train and val are mixed to `unanswerable_fraction` (the larger side subsampled; None keeps every record).
   Every label the inputs have must keep a train record (unless the mix drops its whole side).
6. DPO: `to_predict.jsonl` lists the train and val records whose sources gave no rejected response.
   `rejected_from` (the predictions file of `main.py predict` on it) gives the `rejected` response of the
   train and val records it names, joined on id; it must name no other record and leave no train or val
   record without one.

Everything is computed before anything is written; each file is written atomically, the manifest
(`assemble.json`) last. A rerun with the same arguments and inputs writes the same bytes. The folder must be
one `assemble` wrote or hold none of its output files, and no output may be an input.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from datamodules.mixing import mix_sizes
from datamodules.records import (
    CATEGORIES,
    QARecord,
    RecordError,
    atomic_write,
    read_predictions,
    read_records,
    write_records,
)
from datamodules.sources.common import AnnotationError, refuse_overwriting_inputs

SPLITS = ("train", "val", "test")
TO_PREDICT = "to_predict.jsonl"
MANIFEST = "assemble.json"
LABELS = ("answerable", *CATEGORIES)


def label(record: QARecord) -> str:
    """`answerable`, or the category of an unanswerable record."""
    return "answerable" if record.answerable else str(record.category)


def _same_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def _command_line(problem: str) -> AnnotationError:
    return AnnotationError("command line", None, None, problem)


@dataclass(frozen=True)
class Sourced:
    """A record and the file it was read from."""

    record: QARecord
    path: Path


@dataclass
class AssembleSummary:
    """What `assemble` wrote and dropped; `lines()` is what the command prints."""

    splits: dict[str, list[QARecord]]
    to_predict: int = 0
    held_out: int = 0  # input records on videos of the test files
    duplicates: int = 0  # records of another file with the same video, question and answer
    mixed_out: dict[str, int] = field(default_factory=dict)  # split -> records the mix dropped
    from_predictions: int = 0  # rejected responses taken from --rejected-from

    def counts(self) -> dict[str, dict[str, int]]:
        table = {}
        for split, records in self.splits.items():
            labels = Counter(label(r) for r in records)
            table[split] = {"records": len(records), **{name: labels[name] for name in LABELS},
                            "rejected": sum(r.rejected is not None for r in records),
                            "videos": len({r.video for r in records})}
        return table

    def lines(self) -> list[str]:
        columns = ("records", "videos", *LABELS, "rejected")
        width = max(len(c) for c in columns) + 1
        lines = ["split " + "".join(c.rjust(width) for c in columns)]
        for split, row in self.counts().items():
            lines.append(split.ljust(6) + "".join(str(row[c]).rjust(width) for c in columns))
        if self.held_out:
            lines.append(f"held out: {self.held_out} input records on videos of the test files")
        if self.duplicates:
            lines.append(f"dropped: {self.duplicates} records with the video, question and answer of a "
                         "record of another file")
        for split, dropped in self.mixed_out.items():
            if dropped:
                lines.append(f"mix: dropped {dropped} {split} records (--unanswerable-fraction)")
        if self.from_predictions:
            lines.append(f"rejected: {self.from_predictions} responses from --rejected-from")
        if self.to_predict and not self.from_predictions:
            lines.append(f"{self.to_predict} train and val records have no rejected response (DPO needs "
                         f"one): predict on {TO_PREDICT} and rerun with --rejected-from PREDICTIONS")
        return lines


# ============================================================================================ reading
def read_sources(paths: Sequence[Path], what: str) -> list[Sourced]:
    """Every record of the files, in order; an id in two of the files is an error naming both."""
    sourced: list[Sourced] = []
    first: dict[str, Path] = {}
    for path in paths:
        records, _ = read_records(path)
        for record in records:
            if record.id in first:
                raise RecordError(path, None, "id", f"record {record.id!r} is also in {first[record.id]} "
                                  f"(ids must be unique across the {what})")
            first[record.id] = path
            sourced.append(Sourced(record, path))
    return sourced


def drop_agreeing_copies(sourced: list[Sourced]) -> tuple[list[Sourced], int]:
    """The records less those whose video and question a record of an earlier file already has with the
    same answer; the same video and question with another answer in another file is an error."""
    first: dict[tuple[str, str], Sourced] = {}
    kept: list[Sourced] = []
    for item in sourced:
        record = item.record
        key = (record.video, _same_text(record.question))
        seen = first.setdefault(key, item)
        if seen.path == item.path:
            kept.append(item)
        elif _same_text(seen.record.answer) != _same_text(record.answer):
            raise RecordError(
                item.path, None, "answer",
                f"record {record.id!r} answers the question {record.question!r} about video {record.video!r} "
                f"otherwise than record {seen.record.id!r} of {seen.path}",
            )
    duplicates = len(sourced) - len(kept)
    return kept, duplicates


def hold_out(inputs: list[Sourced], test_videos: set[str], paths: Sequence[Path]) -> list[Sourced]:
    """The input records not on a test video; an input file left without records is an error."""
    kept = [item for item in inputs if item.record.video not in test_videos]
    left = Counter(item.path for item in kept)
    for path in paths:
        if not left[path]:
            raise RecordError(path, None, "video", "every record is on a video of the test files, which are "
                              "held out of train and val: nothing of this file is left")
    return kept


# ========================================================================================== splitting
def _share(fraction: float, size: int, left: int) -> int:
    """Videos of a group of `size` for a split: `fraction` of them, at least one when `fraction` > 0, and
    never the last of the `left` still unassigned (it stays for train)."""
    count = round(fraction * size)
    if fraction > 0:
        count = max(count, 1)
    return max(0, min(count, left - 1))


def split_videos(records: Iterable[QARecord], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, str]:
    """video -> split, by video: each group of videos with the same labels is shuffled (seeded) and cut."""
    labels: dict[str, set[str]] = {}
    for record in records:
        labels.setdefault(record.video, set()).add(label(record))
    groups: dict[tuple[str, ...], list[str]] = {}
    for video, names in labels.items():
        groups.setdefault(tuple(sorted(names)), []).append(video)
    rng = random.Random(f"assemble/{seed}/videos")
    split_of: dict[str, str] = {}
    for key in sorted(groups):
        videos = sorted(groups[key])
        rng.shuffle(videos)
        test = _share(test_fraction, len(videos), len(videos))
        val = _share(val_fraction, len(videos), len(videos) - test)
        for index, video in enumerate(videos):
            split_of[video] = "test" if index < test else "val" if index < test + val else "train"
    return split_of


def mix(records: list[QARecord], fraction: float | None, rng: random.Random, split: str) -> list[QARecord]:
    """`records` with a share `fraction` of unanswerable ones, the larger side subsampled (None: all); the
    subsampled side keeps one record of each of its labels when it keeps as many records as it has labels.

    A fraction that needs a side the split lacks is an error naming the split."""
    if fraction is None:
        return records
    answerable = [r for r in records if r.answerable]
    unanswerable = [r for r in records if not r.answerable]
    for side, records_of_side, needed in (("answerable", answerable, fraction < 1),
                                          ("unanswerable", unanswerable, fraction > 0)):
        if needed and not records_of_side:
            raise _command_line(f"--unanswerable-fraction {fraction}: the {split} split has no {side} "
                                "records to mix")
    keep_answerable, keep_unanswerable = mix_sizes(len(answerable), len(unanswerable), fraction)
    if keep_answerable < len(answerable):
        answerable = _subsample(answerable, keep_answerable, rng)
    if keep_unanswerable < len(unanswerable):
        unanswerable = _subsample(unanswerable, keep_unanswerable, rng)
    return answerable + unanswerable


def _subsample(records: list[QARecord], count: int, rng: random.Random) -> list[QARecord]:
    """`count` of the records, drawn at random but one of each label first when `count` allows, so that a
    small category is not mixed out by chance."""
    by_label: dict[str, list[QARecord]] = {}
    for record in records:
        by_label.setdefault(label(record), []).append(record)
    first = [rng.choice(by_label[name]) for name in sorted(by_label)] if count >= len(by_label) else []
    chosen = {record.id for record in first}
    rest = [record for record in records if record.id not in chosen]
    return first + rng.sample(rest, count - len(first))


def _check_labels_kept(inputs: list[Sourced], train: list[QARecord], fraction: float | None) -> None:
    """Every label of the inputs keeps a train record, unless the mix drops its whole side."""
    present = Counter(label(r) for r in train)
    for item in inputs:
        name = label(item.record)
        dropped = fraction is not None and (fraction == 0) != (name == "answerable")
        if not present[name] and not dropped:
            count = sum(label(i.record) == name for i in inputs)
            raise RecordError(item.path, None, "category" if name != "answerable" else "answerable",
                              f"the train split has no {name} record: the {count} {name} records of the "
                              "inputs all went to val or test, or were mixed out; give more, or lower the "
                              "fractions")


# ============================================================================================ rejected
def attach_predictions(splits: dict[str, list[QARecord]], path: Path) -> int:
    """Set `rejected` of the train and val records named in predictions file `path` to their responses;
    returns how many. A prediction of no train or val record is an error, and so is a train or val record
    left without a rejected response."""
    responses = {row["id"]: row["response"] for row in read_predictions(path, ("response",))}
    known = {r.id for split in ("train", "val") for r in splits[split]}
    unknown = sorted(set(responses) - known)
    if unknown:
        raise RecordError(path, None, "id", f"prediction {unknown[0]!r} matches no train or val record "
                          f"({len(unknown)} such predictions): was it made on this folder's {TO_PREDICT}?")
    for split in ("train", "val"):
        splits[split] = [replace(r, rejected=responses[r.id]) if r.id in responses else r
                         for r in splits[split]]
        missing = [r.id for r in splits[split] if r.rejected is None]
        if missing:
            raise RecordError(path, None, "id", f"no prediction for {split} record {missing[0]!r}, which has "
                              f"no rejected response of its own ({len(missing)} such {split} records)")
    return len(responses)


# ============================================================================================ folder
def _claim(out: Path) -> None:
    """`out` may be written: it holds none of the output files, or `assemble` wrote them (its manifest)."""
    if (out / MANIFEST).is_file():
        return
    found = [name for name in (*(f"{s}.jsonl" for s in SPLITS), TO_PREDICT) if (out / name).exists()]
    if found:
        raise AnnotationError(out / found[0], None, None,
                              f"was not written by assemble (no {MANIFEST} in {out}); assemble writes only "
                              "into a folder without record files or one it wrote: choose another --out")


def output_paths(out: Path) -> list[Path]:
    return [out / f"{split}.jsonl" for split in SPLITS] + [out / TO_PREDICT, out / MANIFEST]


def assemble(
    out: str | Path,
    inputs: Sequence[str | Path],
    tests: Sequence[str | Path] = (),
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    unanswerable_fraction: float | None = None,
    seed: int = 0,
    rejected_from: str | Path | None = None,
) -> AssembleSummary:
    """Build and write `out/{train,val,test}.jsonl` (module docstring); returns the summary."""
    out, inputs, tests = Path(out), [Path(p) for p in inputs], [Path(p) for p in tests]
    _check_settings(inputs, tests, val_fraction, test_fraction, unanswerable_fraction)
    given = [*inputs, *tests] + ([Path(rejected_from)] if rejected_from is not None else [])
    refuse_overwriting_inputs(output_paths(out), given)
    _claim(out)

    test_sourced, kept, summary = _gather(inputs, tests)
    summary.splits = splits = _split(kept, test_sourced, val_fraction, test_fraction, seed)
    for split in ("train", "val"):
        rng = random.Random(f"assemble/{seed}/mix/{split}")
        mixed = sorted(mix(splits[split], unanswerable_fraction, rng, split), key=_order)
        summary.mixed_out[split] = len(splits[split]) - len(mixed)
        splits[split] = mixed
    _check_labels_kept(kept, splits["train"], unanswerable_fraction)

    pending = [r for split in ("train", "val") for r in splits[split] if r.rejected is None]
    summary.to_predict = len(pending)
    if rejected_from is not None:
        summary.from_predictions = attach_predictions(splits, Path(rejected_from))
    _write(out, splits, pending, summary, {
        "inputs": [str(p) for p in inputs], "tests": [str(p) for p in tests], "val_fraction": val_fraction,
        "test_fraction": test_fraction, "unanswerable_fraction": unanswerable_fraction, "seed": seed,
        "rejected_from": str(rejected_from) if rejected_from is not None else None,
    })
    return summary


def _order(record: QARecord) -> tuple[str, str]:
    return record.video, record.id


def _split(kept: list[Sourced], test_sourced: list[Sourced], val_fraction: float, test_fraction: float,
           seed: int) -> dict[str, list[QARecord]]:
    """Step 4: the records of each split, sorted by video and id; an empty split is an error."""
    split_of = split_videos((item.record for item in kept), val_fraction, test_fraction, seed)
    splits: dict[str, list[QARecord]] = {split: [] for split in SPLITS}
    for item in kept:
        splits[split_of[item.record.video]].append(item.record)
    splits["test"] += [item.record for item in test_sourced]
    for split in SPLITS:
        if not splits[split]:
            raise _command_line(f"the {split} split is empty: give more input videos or larger fractions")
        splits[split].sort(key=_order)
    return splits


def _gather(inputs: list[Path], tests: list[Path]) -> tuple[list[Sourced], list[Sourced], AssembleSummary]:
    """Steps 1-3 of the module docstring: (test records, input records kept, summary of the drops)."""
    everything, duplicates = drop_agreeing_copies(read_sources(tests, "test files")
                                                  + read_sources(inputs, "input files"))
    test_paths = set(tests)
    test_sourced = [item for item in everything if item.path in test_paths]
    input_sourced = [item for item in everything if item.path not in test_paths]
    kept = hold_out(input_sourced, {item.record.video for item in test_sourced}, inputs)
    test_ids = {item.record.id: item.path for item in test_sourced}
    for item in kept:
        if item.record.id in test_ids:
            raise RecordError(item.path, None, "id", f"record {item.record.id!r} is also in "
                              f"{test_ids[item.record.id]} (ids must be unique across all files)")
    summary = AssembleSummary({}, held_out=len(input_sourced) - len(kept), duplicates=duplicates)
    return test_sourced, kept, summary


def _check_settings(inputs: list[Path], tests: list[Path], val_fraction: float, test_fraction: float,
                    unanswerable_fraction: float | None) -> None:
    if not inputs:
        raise _command_line("--input needs at least one record file")
    if not 0 < val_fraction < 1:
        raise _command_line(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= test_fraction < 1:
        raise _command_line(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1:
        raise _command_line(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} leave "
                            "nothing for train")
    if unanswerable_fraction is not None and not 0 <= unanswerable_fraction <= 1:
        raise _command_line(f"--unanswerable-fraction must be in [0, 1], got {unanswerable_fraction}")
    if not tests and not test_fraction:
        raise _command_line("no test split: give --test FILE (e.g. the imported evaluation files) or "
                            "--test-fraction")
    seen: set[Path] = set()
    for path in [*inputs, *tests]:
        if path.resolve() in seen:
            raise _command_line(f"{path} is given twice (in --input or --test)")
        seen.add(path.resolve())


def _write(out: Path, splits: dict[str, list[QARecord]], pending: list[QARecord], summary: AssembleSummary,
           settings: dict[str, Any]) -> None:
    for split in SPLITS:
        write_records(out / f"{split}.jsonl", splits[split])
    if pending:
        write_records(out / TO_PREDICT, pending)
    else:
        (out / TO_PREDICT).unlink(missing_ok=True)  # an earlier run's, in a folder assemble wrote
    manifest = {"command": "assemble", "settings": settings, "counts": summary.counts(),
                "to_predict": summary.to_predict}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


# ================================================================================================ CLI
def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_assemble_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "assemble",
        help="build train/val/test.jsonl from per-category and answerable record files",
        description="Split record files into DIR/{train,val,test}.jsonl by video (a video is in one split "
        "only; the --test files are the test split and their videos are held out), mix train and val to "
        "--unanswerable-fraction, and print the counts per split and category. Conflicting records (same "
        "video and question, another answer) in two files are errors. A rerun with the same arguments writes "
        "the same files. For DPO, train and val records without a rejected response are listed in "
        f"DIR/{TO_PREDICT}: predict on it and rerun with --rejected-from.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--input", required=True, nargs="+", type=Path, metavar="FILE",
                        help="record files to split (per category, answerable)")
    parser.add_argument("--test", nargs="+", type=Path, default=[], metavar="FILE",
                        help="record files kept whole as the test split (e.g. the imported evaluation files)")
    parser.add_argument("--val-fraction", type=_fraction, default=0.05, metavar="F",
                        help="share of the input videos (per group of labels) for val (default 0.05)")
    parser.add_argument("--test-fraction", type=_fraction, default=0.0, metavar="F",
                        help="share of the input videos for test, besides the --test files (default 0)")
    parser.add_argument("--unanswerable-fraction", type=_fraction, default=None, metavar="F",
                        help="share of unanswerable records in train and val, the larger side subsampled "
                        "(default: keep every record)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the mix (default 0)")
    parser.add_argument("--rejected-from", type=Path, metavar="PREDICTIONS.jsonl",
                        help="a main.py predict predictions file: its responses become the rejected "
                        "responses of the train and val records, joined on id")
    parser.set_defaults(func=run_assemble)
    return parser


def run_assemble(args: argparse.Namespace) -> int:
    summary = assemble(args.out, args.input, args.test, args.val_fraction, args.test_fraction,
                       args.unanswerable_fraction, args.seed, args.rejected_from)
    print(f"{args.out}: wrote {', '.join(f'{s}.jsonl' for s in SPLITS)}")
    for line in summary.lines():
        print(f"  {line}")
    return 0
