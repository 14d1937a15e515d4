"""W&B logging of a `test` run: the scores as summary values, the predictions as a table, and the report's
figures as native W&B charts and tables, so a person can hover, filter and compare runs.

`log_to_wandb` logs all of it; `chart_payload(metrics, rows)` builds the charts, under a prefix (``test``):

- ``test/roc/{all,object,relation,attribute}``: ROC curves of the refusal likelihood, one line per model
  with its AUROC in the name (the chart of `wandb.plot.roc_curve`, from torchmetrics' `binary_roc`); a
  category without unanswerable items gets an empty chart titled "n/a";
- ``test/scores/higher_is_better`` and ``test/scores/lower_is_better``: bar charts of every score, an
  undefined one as an empty bar labelled "n/a" with its zero denominator;
- ``test/tradeoff``: answerable accuracy against unanswerable accuracy, a point per model;
- tables ``test/scores_table`` (every score with its denominator; an undefined one has value None),
  ``test/by_category`` and ``test/by_form``;
- ``test/figures/<name>``: the report's PNG figures found beside report.png.

W&B stores a chart ``K`` as the table ``K_table`` plus a panel spec in the run config (`wandb.plot_table`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datamodules.records import CATEGORIES
from metrics.figures import (
    FIGURES,
    Evaluation,
    evaluation_from_test,
    model_denominators,
    roc_curves,
    score_keys,
)
from metrics.names import (
    ALIGNMENT_SCORE_KEYS,
    ANSWERABILITY_AUROC,
    ANSWERABLE_ACCURACY,
    BEFORE,
    SCORES,
    UNANSWERABLE_ACCURACY,
    denominator_name,
)
from metrics.runs import flat_metrics, flatten_prediction, float_or_none, form_accuracy

__all__ = ["ROC_GROUPS", "chart_keys", "chart_payload", "log_charts", "log_to_wandb"]

ROC_GROUPS: tuple[str, ...] = ("all", *CATEGORIES)
MAX_CURVE_POINTS = 2000  # per curve: W&B plots at most 10,000 rows of a chart's table


def chart_keys(prefix: str = "test") -> dict[str, str]:
    """Chart or table name -> the key it is logged under (a chart's table is that key + ``_table``)."""
    keys = {f"roc/{group}": f"{prefix}/roc/{group}" for group in ROC_GROUPS}
    keys.update({
        "scores/higher_is_better": f"{prefix}/scores/higher_is_better",
        "scores/lower_is_better": f"{prefix}/scores/lower_is_better",
        "tradeoff": f"{prefix}/tradeoff",
        "scores_table": f"{prefix}/scores_table",
        "by_category": f"{prefix}/by_category",
        "by_form": f"{prefix}/by_form",
    })
    keys.update({f"figures/{name}": f"{prefix}/figures/{name}" for name in FIGURES if name != "scores"})
    return keys


def _thin(points: list[Any], limit: int = MAX_CURVE_POINTS) -> list[Any]:
    """At most `limit` points, evenly spaced, first and last kept."""
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def _scores_rows(evaluation: Evaluation) -> list[list[Any]]:
    higher, lower = score_keys(evaluation)
    rows = []
    for key in higher + lower:
        aligned = key in ALIGNMENT_SCORE_KEYS
        for model in evaluation.models:
            source = evaluation.alignment.get(model) if aligned else evaluation.scores[model]
            if source is None or key not in source:
                continue
            n = model_denominators(evaluation, model).get(key)
            rows.append([
                key, SCORES[key].better, model, float_or_none(source[key]), n,
                denominator_name(key, evaluation.before or BEFORE),
            ])
    return rows


def _bar_label(key: str, model: str, value: float | None, n: int | None, counts: str) -> str:
    label = f"{key} · {model}"
    if value is not None:
        return label
    return f"{label}: n/a" + ("" if n is None else f" ({n} {counts})")


def chart_payload(
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] | None = None,
    prefix: str = "test",
    figures_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The charts, tables and figure images of a `test` run (module docstring), ready for `run.log`."""
    import wandb

    evaluation = evaluation_from_test(metrics, rows)
    keys = chart_keys(prefix)
    payload: dict[str, Any] = {}

    def has_likelihoods(model: str) -> bool:
        items = evaluation.rows.get(model) or []
        return bool(items) and all(r.get("refusal_likelihood") is not None for r in items)

    scored = [m for m in evaluation.models if has_likelihoods(m)]
    for group in ROC_GROUPS:
        data = []
        for model in scored:
            curve = roc_curves(evaluation.rows.get(model) or [], None if group == "all" else group)
            if curve is None:
                continue
            fpr, tpr, auroc, _, _ = curve
            name = f"{model} (AUROC {auroc:.2f})"
            data += [[name, x, y] for x, y in _thin(list(zip(fpr, tpr, strict=True)))]
        if scored:  # a category without items still gets its chart, empty and titled n/a (an undefined score)
            table = wandb.Table(columns=["class", "fpr", "tpr"], data=data)
            title = f"Refusal likelihood ROC: {group} unanswerable vs answerable"
            payload[keys[f"roc/{group}"]] = wandb.plot_table(
                "wandb/area-under-curve/v0", table, {"x": "fpr", "y": "tpr", "class": "class"},
                {"title": title if data else f"{title} (n/a: no such items)",
                 "x-axis-title": "False positive rate (answerable)",
                 "y-axis-title": "True positive rate (unanswerable)"},
            )

    scores = _scores_rows(evaluation)
    payload[keys["scores_table"]] = wandb.Table(
        columns=["score", "better", "model", "value", "denominator", "denominator_counts"], data=scores
    )
    for direction in ("higher", "lower"):
        # An undefined score keeps its bar slot: no height, "n/a" and its zero denominator in the label, so
        # it cannot pass for a zero.
        bars = [[_bar_label(key, model, value, n, counts), 0.0 if value is None else value]
                for key, better, model, value, n, counts in scores if better == direction]
        if bars:
            payload[keys[f"scores/{direction}_is_better"]] = wandb.plot.bar(
                wandb.Table(columns=["score", "value"], data=bars), "score", "value",
                title=f"{direction} is better",
            )

    axes = (ANSWERABLE_ACCURACY.key, UNANSWERABLE_ACCURACY.key)
    points = [
        [model, *(s[k] for k in axes)]
        for model, s in evaluation.scores.items()
        if all(float_or_none(s.get(k)) is not None for k in axes)
    ]
    if points:
        payload[keys["tradeoff"]] = wandb.plot.scatter(
            wandb.Table(columns=["model", *axes], data=points), *axes,
            title="Answerable vs unanswerable accuracy",
        )

    per_category = (UNANSWERABLE_ACCURACY, ANSWERABILITY_AUROC)
    by_category = []
    for model in evaluation.models:
        counts, model_scores = model_denominators(evaluation, model), evaluation.scores[model]
        for category in CATEGORIES:
            values = [float_or_none(model_scores.get(s.category_key(category))) for s in per_category]
            items = counts.get(UNANSWERABLE_ACCURACY.category_key(category))
            by_category.append([model, category, items, *values])
    payload[keys["by_category"]] = wandb.Table(
        columns=["model", "category", "unanswerable_items", *(s.key for s in per_category)], data=by_category
    )

    by_form = [
        [model, form, answerable, items, accuracy]
        for model in evaluation.models
        for answerable in (True, False)
        for form, (accuracy, items) in form_accuracy(evaluation.rows.get(model) or [], answerable).items()
    ]
    if by_form:
        payload[keys["by_form"]] = wandb.Table(
            columns=["model", "form", "answerable", "items", "accuracy"], data=by_form
        )

    if figures_dir is not None:
        for name, file_name in FIGURES.items():
            path = Path(figures_dir) / file_name
            if name != "scores" and path.is_file():
                payload[keys[f"figures/{name}"]] = wandb.Image(str(path))
    return payload


def log_charts(
    run: Any,
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] | None = None,
    prefix: str = "test",
    figures_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Log `chart_payload(...)` to a W&B run (or a Lightning `WandbLogger`) in one step; returns its keys.
    Call it on rank 0 only."""
    run = getattr(run, "experiment", run)
    payload = chart_payload(metrics, rows, prefix, figures_dir)
    run.log(payload)
    return list(payload)


def log_to_wandb(
    logger_or_run: Any,
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] | None = None,
    image_path: str | os.PathLike | None = None,
    prefix: str = "test",
) -> None:
    """Log the scores as W&B summary values (`flat_metrics`: ``<prefix>/after/<score>``,
    ``<prefix>/before/<score>``, ``<prefix>/alignment/<score>``), the predictions as a ``wandb.Table``
    (``<prefix>/predictions``; nested model fields flattened to ``before/...``, ``after/...`` columns), the
    chart as an image (``<prefix>/report``), and the charts and tables of `chart_payload` (with the other
    figures found beside the image).

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
    figures_dir = None if image_path is None else Path(image_path).parent
    payload.update(chart_payload(metrics, rows, prefix, figures_dir))
    run.log(payload)
