"""Combine the `test` reports of several aligned models into one comparison (the demo's final report).

`python -m metrics.combine --out DIR --run sft=RUN_DIR --run dpo=RUN_DIR [--seconds N]` reads each run's
metrics.json with the model before alignment (the paper's f0) and after it (f1), takes the model before from
the first run, and writes `report.json` (`{"before": {...}, "sft": {...}, "dpo": {...}, "seconds": N}`),
`report.md` and the figures (`report.png`, `tradeoff.png`, `roc.png`, `by_form.png`, see `metrics.figures`)
into DIR, replacing the files of an earlier combination as a set. A run's row holds its after scores and its
alignment scores. The runs must have been scored on the same test items (their predictions.jsonl ids); a
bad argument or run file is one line naming it, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datamodules.records import CATEGORIES, atomic_write
from metrics.figures import FIGURES, evaluation_from_combined, write_figures
from metrics.names import (
    AFTER,
    ALIGNMENT,
    ALIGNMENT_SCORE_KEYS,
    ANSWERABILITY_AUROC,
    ANSWERABLE_ACCURACY,
    BEFORE,
    REASON_ACCURACY,
    UNANSWERABLE_ACCURACY,
    UNANSWERABLE_F1,
)
from metrics.report import combine_metrics_table
from metrics.runs import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    RERUN_TEST,
    RunError,
    float_scores,
    read_metrics,
    read_rows,
    replacing_files,
    to_plain,
)

TABLE_KEYS: tuple[str, ...] = (
    ANSWERABLE_ACCURACY.key,
    *(UNANSWERABLE_ACCURACY.category_key(c) for c in CATEGORIES),
    REASON_ACCURACY.key,
    UNANSWERABLE_F1.key,
    ANSWERABILITY_AUROC.key,
    *ALIGNMENT_SCORE_KEYS,
)
"""The columns of the combined table (report.md)."""
COMBINED_FILES: tuple[str, ...] = ("report.json", "report.md", *FIGURES.values())
"""The files of a combined report, replaced as a set."""
RESERVED_NAMES = frozenset({BEFORE, "seconds"})
"""Keys of report.json that are not runs."""


def parse_runs(items: Sequence[str]) -> dict[str, Path]:
    """The runs of ``--run NAME=RUN_DIR`` arguments, by name, in their order. Raises `RunError` naming the
    argument when it lacks ``NAME=`` or the folder, or its name is given twice or is one of report.json's own
    keys."""
    runs: dict[str, Path] = {}
    for item in items:
        name, equals, folder = item.partition("=")
        if not (equals and name and folder):
            raise RunError(f"--run {item}: expected NAME=RUN_DIR, a row name and a tested run folder "
                           "(e.g. --run sft=outputs/shapes/sft)")
        if name in runs:
            raise RunError(f"--run {item}: the name {name!r} is given twice; give each run its own name")
        if name in RESERVED_NAMES:
            raise RunError(f"--run {item}: {name!r} is a key of report.json itself; choose another name")
        runs[name] = Path(folder)
    return runs


def check_same_items(runs: Mapping[str, str | Path]) -> None:
    """Refuse runs scored on different test items: with two runs or more, each run's item ids (its
    predictions.jsonl) must be the first run's. Raises `RunError` naming the two runs and how many ids one has
    and the other lacks, or naming a missing predictions.jsonl."""
    if len(runs) < 2:
        return
    ids: dict[str, set[str]] = {}
    for name, run_dir in runs.items():
        rows = read_rows(run_dir)
        if rows is None:
            path = Path(run_dir) / PREDICTIONS_FILE
            raise RunError(f"{path}: missing, so run {name!r} cannot be checked to be scored on the other "
                           f"runs' test items; {RERUN_TEST}")
        ids[name] = {row["id"] for row in rows}
    (first, first_ids), *others = ids.items()
    for name, these in others:
        if differ := first_ids ^ these:
            raise RunError(
                f"runs {first!r} ({runs[first]}) and {name!r} ({runs[name]}) were scored on different test "
                f"items: {len(differ)} ids are in one run and not the other (e.g. {min(differ)!r}); combine "
                "runs tested on the same test file"
            )


def check_out_folder(out: str | Path) -> None:
    """Raise `RunError` when `--out`, or a folder above it, is an existing file (it must be a folder)."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                problem = "is a file" if path == out else f"is inside {path}, a file"
                raise RunError(f"--out {out}: {problem}; name a folder for report.json, report.md and the "
                               "figures (it is made when missing)")
            return


def load_run(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """(scores before alignment, scores after it with the alignment scores) from a run's metrics.json."""
    metrics = read_metrics(run_dir)
    if not all(isinstance(metrics.get(k), Mapping) for k in (BEFORE, AFTER, ALIGNMENT)):
        path = Path(run_dir) / METRICS_FILE
        raise RunError(
            f"{path}: no scores before alignment (before, after, {ALIGNMENT}); test a LoRA model or give "
            "before_predictions"
        )
    return float_scores(metrics[BEFORE]), float_scores({**metrics[AFTER], **metrics[ALIGNMENT]})


def combine(runs: Mapping[str, str | Path], seconds: float | None = None) -> dict[str, Any]:
    """{"before": ..., <run name>: ..., "seconds": ...} with the model before alignment from the first run
    (all runs align the same base). Raises `RunError` when the runs were scored on different test items
    (`check_same_items`)."""
    check_same_items(runs)
    report: dict[str, Any] = {}
    for name, run_dir in runs.items():
        before, after = load_run(run_dir)
        report.setdefault(BEFORE, before)
        report[name] = after
    report["seconds"] = seconds
    return report


def write_combined(
    out_dir: str | Path, report: Mapping[str, Any], runs: Mapping[str, str | Path] | None = None
) -> str:
    """Write report.json, report.md and the figures of `metrics.figures` (report.png, tradeoff.png, and with
    the runs' predictions.jsonl from `runs`, roc.png and by_form.png) as a set (`replacing_files`); returns
    the Markdown table."""
    plain = {k: to_plain(v) if isinstance(v, Mapping) else v for k, v in report.items()}
    table = combine_metrics_table({k: v for k, v in report.items() if k != "seconds"}, keys=TABLE_KEYS)
    seconds = report.get("seconds")
    footer = f"\nWhole demo: {seconds:.0f} s.\n" if seconds is not None else ""
    with replacing_files(out_dir, COMBINED_FILES) as staging:
        atomic_write(staging / "report.json", json.dumps(plain, indent=2) + "\n")
        atomic_write(staging / "report.md", table + footer)
        write_figures(staging, evaluation_from_combined(report, runs))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metrics.combine", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, report.png")
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=RUN_DIR",
        help="a tested run folder (its metrics.json with the model before alignment); repeat for each model",
    )
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole pipeline")
    args = parser.parse_args(argv)
    try:
        runs = parse_runs(args.run)
        check_out_folder(args.out)
        table = write_combined(args.out, combine(runs, args.seconds), runs)
    except (OSError, ValueError) as error:  # OSError: a run folder or --out that cannot be read or written
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
