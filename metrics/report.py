"""Evaluation outputs: predictions.jsonl, metrics.json, report.md, report.png and W&B logging.

The models of a run are named ``after`` (the model under test; the paper's f1) and, when the run also scores
the model before alignment, ``before`` (the paper's f0); ``alignment`` holds the scores of the step from one
to the other. Every file is written atomically (`datamodules.records.atomic_write`), and
`metrics_from_predictions` recomputes every score from predictions.jsonl with the metrics' own functions, so a
report can always be checked against the per-item predictions it came from.

predictions.jsonl, one JSON object per test item:

- one model: ``id, category, answerable, question, gold, missing_element, form, objects, response, refused,
  correct, reason_ok, refusal_likelihood`` (``category`` and ``missing_element`` null for answerable items,
  ``refusal_likelihood`` null when it was not computed; ``form``, the question's form such as "colour" or
  "where", and ``objects``, how many objects the clip shows, come from the record's ``meta`` and are null when
  it does not say);
- before and after: the item fields ``id, category, answerable, question, gold, missing_element, form,
  objects`` once, and the model fields nested per model:
  ``"before": {response, refused, correct, reason_ok, refusal_likelihood}, "after": {...}``.

metrics.json: ``{"after": {score: value}}`` for one model; ``{"before": {...}, "after": {...}, "alignment":
{excessive_refusal, ..., <score>/denominator}}`` with the model before alignment. JSON has no NaN, so an
undefined score (zero denominator) is written as null. W&B and Lightning log the same scores as
``test/after/<score>``, ``test/before/<score>`` and ``test/alignment/<score>``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules.records import CATEGORIES, atomic_write, read_predictions, write_predictions
from metrics.answerability import (
    HIGHER_IS_BETTER,
    alignment_scores,
    answerability_auroc,
    answerability_scores,
    category_ids,
)
from metrics.judges import Judgement
from metrics.names import ALIGNMENT, MODELS

__all__ = [
    "ALIGNMENT",
    "ALIGNMENT_SCORE_KEYS",
    "ITEM_FIELDS",
    "MODELS",
    "MODEL_FIELDS",
    "SCORE_KEYS",
    "combine_metrics_table",
    "flat_metrics",
    "flatten_prediction",
    "format_report",
    "is_paired",
    "log_to_wandb",
    "metrics_from_predictions",
    "paired_rows",
    "prediction_row",
    "report_metrics",
    "to_plain",
    "write_metrics_json",
    "write_report_md",
    "write_report_png",
    "write_reports",
]


ITEM_FIELDS: tuple[str, ...] = (
    "id", "category", "answerable", "question", "gold", "missing_element", "form", "objects"
)
MODEL_FIELDS: tuple[str, ...] = ("response", "refused", "correct", "reason_ok", "refusal_likelihood")
SCORE_KEYS: tuple[str, ...] = (
    "answerable_accuracy",
    "over_refusal_rate",
    "unanswerable_accuracy",
    *(f"unanswerable_accuracy/{c}" for c in CATEGORIES),
    "reason_accuracy",
    "unanswerable_precision",
    "unanswerable_recall",
    "unanswerable_f1",
    "overall_accuracy",
    "answerability_auroc",
    *(f"answerability_auroc/{c}" for c in CATEGORIES),
)
"""Single-model scores in report order."""
ALIGNMENT_SCORE_KEYS: tuple[str, ...] = ("excessive_refusal", "permissiveness", "discretion")

Metrics = Mapping[str, Any]


def _number(value: Any) -> float | None:
    """A JSON-safe float: tensors and numpy scalars become floats, NaN becomes None."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return None if math.isnan(value) else value


def to_plain(metrics: Metrics) -> dict[str, Any]:
    """Metrics (possibly nested, with tensor values) as plain floats; NaN becomes None."""
    return {k: to_plain(v) if isinstance(v, Mapping) else _number(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------
# predictions.jsonl


def prediction_row(
    *,
    id: str,
    question: str,
    gold: str,
    answerable: bool,
    category: str | None,
    response: str,
    judgement: Judgement,
    refusal_likelihood: float | None = None,
    missing_element: str | None = None,
    form: str | None = None,
    objects: int | None = None,
) -> dict[str, Any]:
    """One line of a single-model predictions.jsonl."""
    return {
        "id": id,
        "category": category,
        "answerable": bool(answerable),
        "question": question,
        "gold": gold,
        "missing_element": missing_element,
        "form": form,
        "objects": objects,
        "response": response,
        "refused": bool(judgement.refused),
        "correct": bool(judgement.correct),
        "reason_ok": bool(judgement.reason_ok),
        "refusal_likelihood": None if refusal_likelihood is None else float(refusal_likelihood),
    }


def is_paired(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether prediction rows hold a model before and after alignment (nested fields) or one model."""
    return bool(rows) and all(isinstance(rows[0].get(model), Mapping) for model in MODELS)


def paired_rows(
    before_rows: Iterable[Mapping[str, Any]], after_rows: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Join the single-model prediction rows of the models before and after alignment on `id`, in the order of
    `after_rows`, into rows with the model fields nested under "before" and "after".

    Raises ValueError naming the first id that is missing on one side or duplicated.
    """

    def by_id(rows: Iterable[Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for row in rows:
            if row["id"] in out:
                raise ValueError(f"{name} predictions: field 'id': duplicate id {row['id']!r}")
            out[row["id"]] = row
        return out

    before, after = by_id(before_rows, "before"), by_id(after_rows, "after")
    if before.keys() != after.keys():
        missing = sorted(after.keys() - before.keys()) or sorted(before.keys() - after.keys())
        side = "before" if after.keys() - before.keys() else "after"
        raise ValueError(
            f"{side} predictions: field 'id': no prediction for id {missing[0]!r} ({len(missing)} missing)"
        )
    out = []
    for item_id, after_row in after.items():
        row = {field: after_row.get(field) for field in ITEM_FIELDS}
        row["before"] = {field: before[item_id].get(field) for field in MODEL_FIELDS}
        row["after"] = {field: after_row.get(field) for field in MODEL_FIELDS}
        out.append(row)
    return out


def flatten_prediction(row: Mapping[str, Any]) -> dict[str, Any]:
    """A paired row with its nested model fields as ``before/response``, ``after/refused``, ...

    A single-model row comes back unchanged."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------------------------------------
# Recomputing the scores from the predictions


def _model_fields(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Each model's fields per row: nested under "before"/"after", or the row itself for one model."""
    if is_paired(rows):
        return {model: [row[model] for row in rows] for model in MODELS}
    return {"after": list(rows)}


def _flags(rows: Sequence[Mapping[str, Any]], fields: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    values = []
    for row, model in zip(rows, fields, strict=True):
        value = model.get(key)
        if value not in (True, False):
            problem = f"expected true or false, got {value!r}"
            raise ValueError(f"prediction {row.get('id')!r}: field '{key}': {problem}")
        values.append(bool(value))
    return torch.tensor(values, dtype=torch.bool)


def metrics_from_predictions(
    rows_or_path: str | os.PathLike | Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, float]]:
    """Recompute every score from prediction rows (or a predictions.jsonl path) with the functions behind the
    metric classes (`answerability_scores`, `answerability_auroc`, `alignment_scores`).

    Returns the metrics.json structure (``{"after"}``, or ``{"before", "after", "alignment"}``) with float
    values. A model's AUROC keys appear when each of its rows has a refusal likelihood. NaN marks a zero
    denominator.
    """
    rows = (
        read_predictions(rows_or_path) if isinstance(rows_or_path, str | os.PathLike) else list(rows_or_path)
    )
    answerable = _flags(rows, rows, "answerable")
    category = category_ids([row.get("category") for row in rows])
    models = _model_fields(rows)
    out: dict[str, dict[str, Any]] = {}
    for name, fields in models.items():
        scores = answerability_scores(
            _flags(rows, fields, "refused"),
            _flags(rows, fields, "correct"),
            answerable,
            category,
            _flags(rows, fields, "reason_ok"),
        )
        likelihood = [model.get("refusal_likelihood") for model in fields]
        if rows and all(value is not None for value in likelihood):
            refusal_score = torch.tensor(likelihood, dtype=torch.float64)
            scores.update(answerability_auroc(refusal_score, answerable, category))
        out[name] = scores
    if "before" in models:
        before, after = models["before"], models["after"]
        out[ALIGNMENT] = alignment_scores(
            _flags(rows, before, "refused"),
            _flags(rows, before, "correct"),
            _flags(rows, after, "refused"),
            _flags(rows, after, "correct"),
            answerable,
        )
    return {group: {key: float(value) for key, value in scores.items()} for group, scores in out.items()}


def report_metrics(after: Metrics, before: Metrics | None = None, alignment: Metrics | None = None) -> dict:
    """The metrics.json structure from the computed score dicts of the model after alignment and, when it was
    scored, the model before it and the alignment scores."""
    out: dict[str, Any] = {} if before is None else {"before": dict(before)}
    out["after"] = dict(after)
    if alignment is not None:
        out[ALIGNMENT] = dict(alignment)
    return out


def _models(metrics: Metrics) -> list[str]:
    models = [model for model in MODELS if isinstance(metrics.get(model), Mapping)]
    if "after" not in models:
        raise ValueError(f"no scores of the model under test ('after') among the metrics {sorted(metrics)}")
    return models


# ---------------------------------------------------------------------------------------------------------
# metrics.json, report.md, report.png


def write_metrics_json(path: str | os.PathLike, metrics: Metrics) -> Path:
    """Write metrics (the metrics.json structure, tensors allowed) as JSON, NaN as null, atomically."""
    return atomic_write(path, json.dumps(to_plain(metrics), indent=2, allow_nan=False) + "\n")


def _fmt(value: Any, digits: int = 3) -> str:
    value = _number(value)
    return "NaN" if value is None else f"{value:.{digits}f}"


def _better(key: str) -> str:
    direction = HIGHER_IS_BETTER.get(key, HIGHER_IS_BETTER.get(key.split("/")[0]))
    return "" if direction is None else ("higher" if direction else "lower")


def _ordered_keys(*metric_dicts: Metrics) -> list[str]:
    present = set().union(*(m.keys() for m in metric_dicts))
    ordered = [k for k in SCORE_KEYS if k in present]
    return ordered + sorted(k for k in present if k not in SCORE_KEYS)


def _counts_line(rows: Sequence[Mapping[str, Any]]) -> str:
    n_a = sum(bool(r["answerable"]) for r in rows)
    per_category = ", ".join(f"{c} {sum(r.get('category') == c for r in rows)}" for c in CATEGORIES)
    return f"Items: {len(rows)} ({n_a} answerable, {len(rows) - n_a} unanswerable: {per_category})."


def _skill_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A table of answerable accuracy by question form, split by one object / several objects in the clip when
    the rows say: which skills the model has, the first thing to check of a base before aligning it."""
    if not any(r["answerable"] and r.get("form") is not None for r in rows):
        return []
    models = _model_fields(rows)

    def clip(row: Mapping[str, Any]) -> str:
        objects = row.get("objects")
        return "" if objects is None else "1 object" if objects == 1 else "2+ objects"

    groups: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        if row["answerable"] and row.get("form") is not None:
            groups.setdefault((str(row["form"]), clip(row)), []).append(index)
    lines = [
        "",
        "## Answerable accuracy by question form",
        "",
        "| form | clip | items | " + " | ".join(models) + " |",
        "|---|---|---:|" + "---:|" * len(models),
    ]
    for (form, kind), members in sorted(groups.items()):
        correct = [sum(bool(fields[i]["correct"]) for i in members) for fields in models.values()]
        cells = " | ".join(_fmt(count / len(members)) for count in correct)
        lines.append(f"| {form} | {kind} | {len(members)} | {cells} |")
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
        for key in ALIGNMENT_SCORE_KEYS:
            if key in alignment:
                denominator = _number(alignment.get(f"{key}/denominator"))
                shown = "" if denominator is None else str(int(denominator))
                lines.append(f"| {key} | {_better(key)} | {_fmt(alignment[key])} | {shown} |")
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
    from metrics.figures import evaluation_from_test, scores_figure

    fig = scores_figure(evaluation_from_test(metrics, rows, title=title))
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))


def write_reports(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    metrics: Metrics | None = None,
    title: str = "Answerability report",
) -> dict[str, Path]:
    """Write predictions.jsonl, metrics.json, report.md and the figures of `metrics.figures` (report.png,
    tradeoff.png, roc.png, by_form.png: those with something to show) into `out_dir`.

    `metrics` defaults to `metrics_from_predictions(rows)`; pass the torchmetrics results to report those.
    Returns the paths by name ("predictions", "metrics", "report_md", "report_png", "<figure>_png").
    """
    from metrics.figures import evaluation_from_test, write_figures

    out_dir = Path(out_dir)
    rows = list(rows)
    metrics = metrics_from_predictions(rows) if metrics is None else metrics
    write_predictions(out_dir / "predictions.jsonl", rows)
    paths = {
        "predictions": out_dir / "predictions.jsonl",
        "metrics": write_metrics_json(out_dir / "metrics.json", metrics),
        "report_md": write_report_md(out_dir / "report.md", metrics, title=title, rows=rows),
    }
    figures = write_figures(out_dir, evaluation_from_test(metrics, rows, title=title))
    paths.update({f"{'report' if name == 'scores' else name}_png": path for name, path in figures.items()})
    return paths


def combine_metrics_table(
    models: Mapping[str, Metrics], keys: Sequence[str] | None = None, digits: int = 3
) -> str:
    """One Markdown table comparing several models: a row per model (e.g. before, sft, dpo), a column per
    score key (default: every single-model score any model has, in report order). ↑/↓ marks the better
    direction."""
    keys = list(keys) if keys is not None else _ordered_keys(*models.values())
    arrows = {True: " ↑", False: " ↓"}
    header = ["model"] + [k + arrows.get(HIGHER_IS_BETTER.get(k), "") for k in keys]  # type: ignore[arg-type]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(keys) + "|"]
    for name, values in models.items():
        lines.append("| " + " | ".join([name] + [_fmt(values.get(k), digits) for k in keys]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# W&B


def flat_metrics(
    metrics: Metrics, prefix: str = "test", keep_undefined: bool = False
) -> dict[str, float | None]:
    """The scores as ``{"<prefix>/after/<score>": value, "<prefix>/alignment/<score>": ...}``, as Lightning
    and W&B log them. An undefined score (NaN: its denominator is zero) is left out, or with `keep_undefined`
    kept as None (W&B's null), so that every score a run computed has its key."""
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, f"{prefix}/{key}", keep_undefined))
        elif (number := _number(value)) is not None or (keep_undefined and value is not None):
            flat[f"{prefix}/{key}"] = number
    return flat


def log_to_wandb(
    logger_or_run: Any,
    metrics: Metrics,
    rows: Sequence[Mapping[str, Any]] | None = None,
    image_path: str | os.PathLike | None = None,
    prefix: str = "test",
) -> None:
    """Log the scores as W&B summary values (`flat_metrics`: ``<prefix>/after/<score>``,
    ``<prefix>/before/<score>``, ``<prefix>/alignment/<score>``), the predictions as a ``wandb.Table``
    (``<prefix>/predictions``; nested model fields flattened to ``before/...``, ``after/...`` columns), the
    chart as an image (``<prefix>/report``), and the charts and tables of `metrics.wandb_charts` (with the
    other figures found beside the image).

    An undefined score (NaN) is in the summary as null, so a dashboard panel on it finds its key and shows no
    bar; its ``<score>/denominator`` beside it (0) says why.

    Takes a Lightning `WandbLogger` or a `wandb` run. Call it on rank 0 only: it logs whatever it is given.
    """
    import wandb

    run = getattr(logger_or_run, "experiment", logger_or_run)
    run.summary.update(flat_metrics(metrics, prefix, keep_undefined=True))
    payload: dict[str, Any] = {}
    if rows:
        flat_rows = [flatten_prediction(r) for r in rows]
        columns = list(dict.fromkeys(k for r in flat_rows for k in r))
        payload[f"{prefix}/predictions"] = wandb.Table(
            columns=columns, data=[[r.get(c) for c in columns] for r in flat_rows]
        )
    if image_path is not None:
        payload[f"{prefix}/report"] = wandb.Image(str(image_path))
    from metrics.wandb_charts import chart_payload

    figures_dir = None if image_path is None else Path(image_path).parent
    payload.update(chart_payload(metrics, rows, prefix, figures_dir))
    run.log(payload)
