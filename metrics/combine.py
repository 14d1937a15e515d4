"""Combine the `test` reports of several aligned models into one comparison (the demo's final report).

`python -m metrics.combine --out DIR --run sft=RUN_DIR --run dpo=RUN_DIR [--seconds N]` reads each run's
metrics.json with the model before alignment (the paper's f0) and after it (f1), takes the model before from
the first run, and writes `report.json` (`{"before": {...}, "sft": {...}, "dpo": {...}, "seconds": N}`),
`report.md` and the figures (`report.png`, `tradeoff.png`, `roc.png`, `by_form.png`, see `metrics.figures`)
into DIR. A run's row holds its after scores and its alignment scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datamodules.records import atomic_write
from metrics.figures import evaluation_from_combined, write_figures
from metrics.report import ALIGNMENT, combine_metrics_table

TABLE_KEYS = (
    "answerable_accuracy",
    "unanswerable_accuracy/object",
    "unanswerable_accuracy/relation",
    "unanswerable_accuracy/attribute",
    "reason_accuracy",
    "unanswerable_f1",
    "answerability_auroc",
    "excessive_refusal",
    "permissiveness",
    "discretion",
)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def load_run(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """(scores before alignment, scores after it with the alignment scores) from a run's metrics.json."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (run `python main.py test` for this run first)")
    metrics = json.loads(path.read_text())
    if not all(isinstance(metrics.get(k), Mapping) for k in ("before", "after", ALIGNMENT)):
        raise ValueError(
            f"{path}: no scores before alignment (before, after, {ALIGNMENT}); test a LoRA model or give "
            "before_predictions"
        )
    before = {k: _number(v) for k, v in metrics["before"].items()}
    after = {k: _number(v) for k, v in {**metrics["after"], **metrics[ALIGNMENT]}.items()}
    return before, after


def combine(runs: Mapping[str, str | Path], seconds: float | None = None) -> dict[str, Any]:
    """{"before": ..., <run name>: ..., "seconds": ...} with the model before alignment from the first run
    (all runs align the same base)."""
    report: dict[str, Any] = {}
    for name, run_dir in runs.items():
        before, after = load_run(run_dir)
        report.setdefault("before", before)
        report[name] = after
    report["seconds"] = seconds
    return report


def write_combined(
    out_dir: str | Path, report: Mapping[str, Any], runs: Mapping[str, str | Path] | None = None
) -> str:
    """Write report.json, report.md and the figures of `metrics.figures` (report.png, tradeoff.png, and with
    the runs' predictions.jsonl from `runs`, roc.png and by_form.png); returns the Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = {
        k: (
            {m: (None if math.isnan(v) else v) for m, v in vals.items()}
            if isinstance(vals, Mapping)
            else vals
        )
        for k, vals in report.items()
    }
    atomic_write(out / "report.json", json.dumps(plain, indent=2) + "\n")
    table = combine_metrics_table({k: v for k, v in report.items() if k != "seconds"}, keys=TABLE_KEYS)
    seconds = report.get("seconds")
    footer = f"\nWhole demo: {seconds:.0f} s.\n" if seconds is not None else ""
    atomic_write(out / "report.md", table + footer)
    write_figures(out, evaluation_from_combined(report, runs))
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
        runs = dict(item.split("=", 1) for item in args.run)
        table = write_combined(args.out, combine(runs, args.seconds), runs)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
