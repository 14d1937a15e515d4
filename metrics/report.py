"""The report files of a `test` run: report.md (the scores as Markdown tables) beside the figures, and the
Markdown table that compares several models.

`write_reports` writes a run folder's predictions.jsonl, metrics.json (their schema: `metrics.runs`),
report.md and the figures of `metrics.figures` as one set: all of them are written first, then renamed into
place (`metrics.runs.replacing_files`), so a failed write leaves the previous run's set whole. An undefined
score (zero denominator) is "NaN" in the Markdown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datamodules.records import CATEGORIES, atomic_write, write_predictions
from metrics.figures import FIGURES, evaluation_from_test, scores_figure, write_figures
from metrics.names import AFTER, ALIGNMENT, ALIGNMENT_SCORES, MODELS, SCORE_KEYS, SCORES
from metrics.runs import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    float_or_none,
    form_accuracy,
    metrics_from_predictions,
    replacing_files,
    rows_by_model,
    write_metrics_json,
)

__all__ = [
    "REPORT_FILES",
    "combine_metrics_table",
    "format_report",
    "write_report_md",
    "write_report_png",
    "write_reports",
]

Metrics = Mapping[str, Any]


def _fmt(value: Any, digits: int = 3) -> str:
    value = float_or_none(value)
    return "NaN" if value is None else f"{value:.{digits}f}"


def _better(key: str) -> str:
    """The direction of a score, or of the score it refines (``<score>/<anything>``); "" for other keys."""
    score = SCORES.get(key) or SCORES.get(key.split("/")[0])
    return "" if score is None else score.better


def _ordered_keys(*metric_dicts: Metrics) -> list[str]:
    present = set().union(*(m.keys() for m in metric_dicts))
    ordered = [k for k in SCORE_KEYS if k in present]
    return ordered + sorted(k for k in present if k not in SCORE_KEYS)


def _models(metrics: Metrics) -> list[str]:
    models = [model for model in MODELS if isinstance(metrics.get(model), Mapping)]
    if AFTER not in models:
        raise ValueError(f"no scores of the model under test ('after') among the metrics {sorted(metrics)}")
    return models


def _counts_line(rows: Sequence[Mapping[str, Any]]) -> str:
    n_a = sum(bool(r["answerable"]) for r in rows)
    per_category = ", ".join(f"{c} {sum(r.get('category') == c for r in rows)}" for c in CATEGORIES)
    return f"Items: {len(rows)} ({n_a} answerable, {len(rows) - n_a} unanswerable: {per_category})."


def _skill_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A table of answerable accuracy by question form, split by one object / several objects in the clip when
    the rows say: which skills the model has, the first thing to check of a base before aligning it."""
    by_model = {model: form_accuracy(r, True, by_clip=True) for model, r in rows_by_model(rows).items()}
    groups = next(iter(by_model.values()), {})  # the same items, so the same groups, for every model
    if not groups:
        return []
    lines = [
        "",
        "## Answerable accuracy by question form",
        "",
        "| form | clip | items | " + " | ".join(by_model) + " |",
        "|---|---|---:|" + "---:|" * len(by_model),
    ]
    for (form, clip), (_, items) in groups.items():
        cells = " | ".join(_fmt(accuracy[(form, clip)][0]) for accuracy in by_model.values())
        lines.append(f"| {form} | {clip} | {items} | {cells} |")
    return lines


def format_report(
    metrics: Metrics, title: str = "Answerability report", rows: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """The Markdown report: one table of scores with a column per model (before, after), the alignment scores
    with their denominators when the model before alignment was scored, and, when the rows carry question
    forms, answerable accuracy by form (`_skill_lines`). Values have 3 decimals; NaN is "NaN"."""
    models = _models(metrics)
    lines = [f"# {title}", ""]
    if rows:
        lines += [_counts_line(rows), ""]
    lines += ["| score | better | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for key in _ordered_keys(*(metrics[model] for model in models)):
        cells = " | ".join(_fmt(metrics[model].get(key)) for model in models)
        lines.append(f"| {key} | {_better(key)} | {cells} |")
    alignment = metrics.get(ALIGNMENT) or {}
    if alignment:
        lines += [
            "",
            "## Alignment (before -> after)",
            "",
            "| score | better | value | denominator |",
            "|---|---|---:|---:|",
        ]
        for score in ALIGNMENT_SCORES:
            if score.key in alignment:
                denominator = float_or_none(alignment.get(score.denominator_key))
                shown = "" if denominator is None else str(int(denominator))
                lines.append(f"| {score.key} | {score.better} | {_fmt(alignment[score.key])} | {shown} |")
    lines += _skill_lines(rows or [])
    lines += ["", "NaN: the score's denominator is zero (no such items)."]
    return "\n".join(lines) + "\n"


def write_report_md(
    path: str | os.PathLike,
    metrics: Metrics,
    title: str = "Answerability report",
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write `format_report(...)` atomically."""
    return atomic_write(path, format_report(metrics, title=title, rows=rows))


def write_report_png(
    path: str | os.PathLike,
    metrics: Metrics,
    title: str = "Answerability report",
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Every score as a labelled bar, higher-is-better and lower-is-better apart (`metrics.figures`), with
    the denominators of undefined scores from `rows`; written atomically."""
    fig = scores_figure(evaluation_from_test(metrics, rows, title=title))
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))


REPORT_FILES: tuple[str, ...] = (PREDICTIONS_FILE, METRICS_FILE, "report.md", *FIGURES.values())
"""The report files of a `test` run, replaced as a set by `write_reports`."""


def write_reports(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    metrics: Metrics | None = None,
    title: str = "Answerability report",
) -> dict[str, Path]:
    """Write predictions.jsonl, metrics.json, report.md and the figures of `metrics.figures` (report.png,
    tradeoff.png, roc.png, by_form.png: those with something to show) into `out_dir`, as a set
    (`metrics.runs.replacing_files`): when any write fails, every file of the previous set stays as it was.

    `metrics` defaults to `metrics_from_predictions(rows)`; pass the torchmetrics results to report those.
    Returns the paths by name ("predictions", "metrics", "report_md", "report_png", "<figure>_png").
    """
    out_dir = Path(out_dir)
    rows = list(rows)
    metrics = metrics_from_predictions(rows) if metrics is None else metrics
    with replacing_files(out_dir, REPORT_FILES) as staging:
        write_predictions(staging / PREDICTIONS_FILE, rows)
        written = {
            "predictions": staging / PREDICTIONS_FILE,
            "metrics": write_metrics_json(staging / METRICS_FILE, metrics),
            "report_md": write_report_md(staging / "report.md", metrics, title=title, rows=rows),
        }
        figures = write_figures(staging, evaluation_from_test(metrics, rows, title=title))
        written.update({f"{'report' if n == 'scores' else n}_png": path for n, path in figures.items()})
    return {name: out_dir / path.name for name, path in written.items()}


def combine_metrics_table(
    models: Mapping[str, Metrics], keys: Sequence[str] | None = None, digits: int = 3
) -> str:
    """One Markdown table comparing several models: a row per model (e.g. before, sft, dpo), a column per
    score key (default: every single-model score any model has, in report order). ↑/↓ marks the better
    direction."""
    keys = list(keys) if keys is not None else _ordered_keys(*models.values())
    arrows = {True: " ↑", False: " ↓"}
    header = ["model"] + [k + (arrows[SCORES[k].higher_is_better] if k in SCORES else "") for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(keys) + "|"]
    for name, values in models.items():
        lines.append("| " + " | ".join([name] + [_fmt(values.get(k), digits) for k in keys]) + " |")
    return "\n".join(lines) + "\n"
