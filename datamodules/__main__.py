"""The data CLI, `python -m datamodules COMMAND`: build the synthetic dataset, import UVQA, check records.

Each command is registered by one `add_*_parser(subparsers)` call in `build_parser`; a user error (a
missing file, a bad record) exits with status 2 and one message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datamodules.errors import USER_ERRORS, user_error_message
from datamodules.records import RecordError, read_records, summarize_records
from datamodules.shapes.dataset import build_synthetic_dataset, check_synthetic_folder, format_summary
from datamodules.sources.assemble import add_assemble_parser
from datamodules.sources.generate import add_generate_parser, add_import_videochatgpt_parser
from datamodules.sources.negatives import add_import_uvqa_negatives_parser
from datamodules.sources.uvqa import add_uvqa_arguments

# How many missing videos `stats --video-root` names.
MISSING_VIDEOS_SHOWN = 5


# ============================================================================================== synth
def add_synth_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="render the synthetic shapes dataset (clips and train/val/test records)",
        description="Render clips of coloured moving shapes to DIR/videos/*.mp4 and write answerable and "
        "unanswerable questions about them to DIR/{train,val,test}.jsonl (split by video) and the scene "
        "descriptions to DIR/scenes.jsonl. Rerunning resumes: clips already rendered are kept.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--num-videos", required=True, type=int, metavar="N", help="number of clips")
    parser.add_argument("--seed", required=True, type=int, metavar="S", help="seed of scenes and questions")
    parser.add_argument("--frames", type=int, default=16, metavar="F", help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=64, metavar="PX", help="frame side, pixels (default 64)")
    parser.add_argument("--fps", type=int, default=8, help="frames per second (default 8)")
    parser.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                        help="fractions of the clips in each split, by clip (default 0.8,0.1,0.1)")
    parser.add_argument("--describe", type=_splits, default=("train",), metavar="SPLITS",
                        help="splits whose clips also get the caption question and two qualifier checks "
                        "(\"Is the star small?\"), comma-separated, or none (default train)")
    parser.add_argument("--workers", type=int, default=None,
                        help="rendering processes (default: the CPU count)")
    parser.set_defaults(func=run_synth)
    return parser


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}")
    return values  # type: ignore[return-value]


def _splits(text: str) -> tuple[str, ...]:
    """"train,test" -> ("train", "test"); "none" -> (). The builder checks the names."""
    return () if text.strip().lower() == "none" else tuple(part.strip() for part in text.split(","))


def run_synth(args: argparse.Namespace) -> int:
    summary = build_synthetic_dataset(
        args.out, args.num_videos, args.seed, frames=args.frames, size=args.size, fps=args.fps,
        progress=True, fractions=args.split, workers=args.workers, describe=args.describe,
    )
    for line in format_summary(summary):
        print(line)
    return 0


# ======================================================================================== import-uvqa
def add_import_uvqa_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import-uvqa",
        help="convert a released UVQA JSON file into unanswerable records",
        description="Convert a UVQA file (eval or training; docs/design.md section 3) into JSONL records. "
        "Exact duplicates are dropped and counted.",
    )
    add_uvqa_arguments(parser, "eval_object.json")
    parser.set_defaults(func=run_import_uvqa)
    return parser


def run_import_uvqa(args: argparse.Namespace) -> int:
    from datamodules.sources.common import refuse_overwriting_inputs
    from datamodules.sources.uvqa import import_uvqa

    refuse_overwriting_inputs([args.out], [args.input])
    result = import_uvqa(args.input, args.category, args.out, args.extension)
    print(f"{args.out}: wrote {len(result.records)} {args.category} records from {args.input}; "
          f"dropped {result.duplicates} exact duplicates")
    return 0


# ============================================================================================== stats
def add_stats_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "stats",
        help="validate a record file and count its records",
        description="Validate a JSONL record file as every reader does and print counts per answerability, "
        "category and source. With --video-root, also check that every record's video file is there.",
    )
    parser.add_argument("file", type=Path, metavar="FILE.jsonl")
    parser.add_argument("--video-root", type=Path, metavar="DIR",
                        help="folder the video paths are relative to (default: the file's folder); given, "
                        "every video must exist (exit status 2 naming the first missing ones)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="count and report invalid lines instead of stopping at the first")
    parser.set_defaults(func=run_stats)
    return parser


def run_stats(args: argparse.Namespace) -> int:
    check_synthetic_folder(args.file.parent)
    records, skipped = read_records(args.file, args.video_root, skip_invalid=args.skip_invalid)
    if args.video_root is not None:
        if not args.video_root.is_dir():
            raise RecordError(args.file, None, "video", f"the video root {args.video_root} is not a folder")
        videos = sorted({record.video for record in records})
        missing = [video for video in videos if not (args.video_root / video).resolve().is_file()]
        if missing:
            shown = ", ".join(missing[:MISSING_VIDEOS_SHOWN])
            shown += ", ..." if len(missing) > MISSING_VIDEOS_SHOWN else ""
            raise RecordError(args.file, None, "video", f"{len(missing)} of {len(videos)} videos are missing "
                              f"under {args.video_root}: {shown}")
    summary = summarize_records(records)
    print(f"{args.file}: {summary['records']} records ({summary['answerable']} answerable, "
          f"{summary['unanswerable']} unanswerable)")
    print("  unanswerable by category: " + ", ".join(f"{k} {v}" for k, v in summary["categories"].items()))
    sources = Counter(record.source for record in records)
    print("  by source: " + (", ".join(f"{k} {v}" for k, v in sorted(sources.items())) or "none"))
    if args.skip_invalid:
        print(f"  skipped {len(skipped)} invalid lines" + (f"; first: {skipped[0]}" if skipped else ""))
    return 0


# ============================================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules", description="Build, import and check answerability QA data."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_synth_parser(subparsers)
    add_import_uvqa_parser(subparsers)
    add_stats_parser(subparsers)
    add_generate_parser(subparsers)
    add_import_videochatgpt_parser(subparsers)
    add_import_uvqa_negatives_parser(subparsers)
    add_assemble_parser(subparsers)
    # More commands: one `add_*_parser(subparsers)` line each here; the parser sets `func` (args -> exit
    # status), and errors listed in USER_ERRORS are reported by `main`.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"error: {user_error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
