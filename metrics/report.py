"""Evaluation outputs: predictions.jsonl, metrics.json, report.md, report.png and W&B logging.

Every file is written atomically (a temporary file in the same folder, then `os.replace`), and
`metrics_from_predictions` recomputes every score from predictions.jsonl in plain Python, so a report can
always be checked against the per-item predictions it came from.

predictions.jsonl, one JSON object per test item:

- single model: ``id, category, answerable, question, gold, missing_element, form, objects, response, refused,
  correct, reason_ok, refusal_likelihood`` (``category`` and ``missing_element`` null for answerable items,
  ``refusal_likelihood`` null when it was not computed; ``form``, the question's form such as "colour" or
  "where", and ``objects``, how many objects the clip shows, come from the record's ``meta`` and are null when
  it does not say);
- paired run (f0 before, f1 after alignment): the item fields ``id, category, answerable, question, gold,
  missing_element, form, objects`` once, and the model fields nested per model:
  ``"f0": {response, refused, correct, reason_ok, refusal_likelihood}, "f1": {...}``.

metrics.json: for one model a flat ``{score: value}``; for a paired run
``{"f0": {score: value}, "f1": {score: value}, "paired": {excessive_refusal, ..., <score>/denominator}}``.
JSON has no NaN, so an undefined score (zero denominator) is written as null.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from metrics.answerability import CATEGORIES, HIGHER_IS_BETTER
from metrics.judges import Judgement

__all__ = [
    "ITEM_FIELDS",
    "MODEL_FIELDS",
    "PAIRED_SCORE_KEYS",
    "SCORE_KEYS",
    "combine_metrics_table",
    "flatten_prediction",
    "format_report",
    "is_paired",
    "log_to_wandb",
    "metrics_from_predictions",
    "paired_metrics",
    "paired_rows",
    "prediction_row",
    "read_predictions",
    "to_plain",
    "write_metrics_json",
    "write_predictions",
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
PAIRED_SCORE_KEYS: tuple[str, ...] = ("excessive_refusal", "permissiveness", "discretion")

Metrics = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Atomic files


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    """Whether prediction rows are the paired (f0/f1) form."""
    return bool(rows) and "f0" in rows[0] and "f1" in rows[0]


def paired_rows(
    f0_rows: Iterable[Mapping[str, Any]], f1_rows: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Join two single-model prediction lists on `id` into paired rows (in the order of `f1_rows`).

    Raises ValueError naming the first id that is missing on one side or duplicated.
    """

    def by_id(rows: Iterable[Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for row in rows:
            if row["id"] in out:
                raise ValueError(f"{name} predictions: field 'id': duplicate id {row['id']!r}")
            out[row["id"]] = row
        return out

    f0, f1 = by_id(f0_rows, "f0"), by_id(f1_rows, "f1")
    if f0.keys() != f1.keys():
        missing = sorted(f1.keys() - f0.keys()) or sorted(f0.keys() - f1.keys())
        side = "f0" if f1.keys() - f0.keys() else "f1"
        raise ValueError(
            f"{side} predictions: field 'id': no prediction for id {missing[0]!r} ({len(missing)} missing)"
        )
    out = []
    for item_id, after in f1.items():
        before = f0[item_id]
        row = {field: after.get(field) for field in ITEM_FIELDS}
        row["f0"] = {field: before.get(field) for field in MODEL_FIELDS}
        row["f1"] = {field: after.get(field) for field in MODEL_FIELDS}
        out.append(row)
    return out


def _json_safe(value: Any) -> Any:
    """Tensors to Python numbers, NaN to None, +-inf to the largest float (keeps the ranking of scores)."""
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(sys.float_info.max, value)
    return value


def write_predictions(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write prediction rows (single or paired form) as JSON lines, atomically. NaN is written as null."""
    rows = list(rows)

    def write(f: IO) -> None:
        for row in rows:
            f.write(json.dumps(_json_safe(row), ensure_ascii=False, allow_nan=False) + "\n")

    return _atomic_write(path, write)


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read predictions.jsonl; a malformed line raises ValueError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{path}, line {number}: field 'id': missing")
            rows.append(row)
    return rows


def flatten_prediction(row: Mapping[str, Any]) -> dict[str, Any]:
    """A paired row with its nested model fields as ``f0/response``, ``f1/refused``, ...

    A single-model row comes back unchanged."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------------------------------------
# Recomputing the scores by hand


def _div(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def _auroc(positive: list[float], negative: list[float]) -> float:
    if not positive or not negative:
        return float("nan")
    wins = 0.0
    for p in positive:
        for n in negative:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positive) * len(negative))


def _single_scores(items: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, float]:
    """Scores of one model from (item fields, model fields) pairs (docs/design.md section 6)."""
    a = [m for item, m in items if item["answerable"]]
    u = [(item, m) for item, m in items if not item["answerable"]]
    a_correct = sum(bool(m["correct"]) for m in a)
    a_refused = sum(bool(m["refused"]) for m in a)
    u_refused = sum(bool(m["refused"]) for _, m in u)
    out = {
        "answerable_accuracy": _div(a_correct, len(a)),
        "over_refusal_rate": _div(a_refused, len(a)),
        "unanswerable_accuracy": _div(u_refused, len(u)),
    }
    for category in CATEGORIES:
        in_category = [m for item, m in u if item.get("category") == category]
        out[f"unanswerable_accuracy/{category}"] = _div(
            sum(bool(m["refused"]) for m in in_category), len(in_category)
        )
    out["reason_accuracy"] = _div(sum(bool(m["refused"]) and bool(m["reason_ok"]) for _, m in u), len(u))
    tp, fp, fn = u_refused, a_refused, len(u) - u_refused
    out["unanswerable_precision"] = _div(tp, tp + fp)
    out["unanswerable_recall"] = _div(tp, tp + fn)
    out["unanswerable_f1"] = _div(2 * tp, 2 * tp + fp + fn)
    out["overall_accuracy"] = _div(a_correct + u_refused, len(a) + len(u))
    if items and all(m.get("refusal_likelihood") is not None for _, m in items):
        a_scores = [float(m["refusal_likelihood"]) for m in a]
        out["answerability_auroc"] = _auroc([float(m["refusal_likelihood"]) for _, m in u], a_scores)
        for category in CATEGORIES:
            u_scores = [float(m["refusal_likelihood"]) for item, m in u if item.get("category") == category]
            out[f"answerability_auroc/{category}"] = _auroc(u_scores, a_scores)
    return out


def _paired_scores(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    a = [r for r in rows if r["answerable"]]
    u = [r for r in rows if not r["answerable"]]
    f0_correct = [r for r in a if r["f0"]["correct"]]
    f0_refused = [r for r in a if r["f0"]["refused"]]
    f0_answered = [r for r in u if not r["f0"]["refused"]]
    return {
        "excessive_refusal": _div(sum(bool(r["f1"]["refused"]) for r in f0_correct), len(f0_correct)),
        "excessive_refusal/denominator": float(len(f0_correct)),
        "permissiveness": _div(sum(bool(r["f1"]["correct"]) for r in f0_refused), len(f0_refused)),
        "permissiveness/denominator": float(len(f0_refused)),
        "discretion": _div(sum(bool(r["f1"]["refused"]) for r in f0_answered), len(f0_answered)),
        "discretion/denominator": float(len(f0_answered)),
    }


def metrics_from_predictions(rows_or_path: str | os.PathLike | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Recompute every score from prediction rows (or a predictions.jsonl path) in plain Python.

    Returns the metrics.json structure: flat for one model, ``{"f0", "f1", "paired"}`` for a paired run.
    The AUROC keys appear when every row has a refusal likelihood. NaN marks a zero denominator.
    """
    rows = (
        read_predictions(rows_or_path) if isinstance(rows_or_path, str | os.PathLike) else list(rows_or_path)
    )
    if is_paired(rows):
        return {
            "f0": _single_scores([(r, r["f0"]) for r in rows]),
            "f1": _single_scores([(r, r["f1"]) for r in rows]),
            "paired": _paired_scores(rows),
        }
    return _single_scores([(r, r) for r in rows])


def paired_metrics(f0: Metrics, f1: Metrics, paired: Metrics) -> dict[str, Any]:
    """The metrics.json structure of a paired run from the computed metric dicts of f0, f1 and the pair."""
    return {"f0": dict(f0), "f1": dict(f1), "paired": dict(paired)}


def _is_paired_metrics(metrics: Metrics) -> bool:
    return isinstance(metrics.get("f0"), Mapping) and isinstance(metrics.get("f1"), Mapping)


# ---------------------------------------------------------------------------------------------------------
# metrics.json, report.md, report.png


def write_metrics_json(path: str | os.PathLike, metrics: Metrics) -> Path:
    """Write metrics (single or paired structure, tensors allowed) as JSON, NaN as null, atomically."""
    text = json.dumps(to_plain(metrics), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text))


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
    answerable = [r for r in rows if r["answerable"] and r.get("form") is not None]
    if not answerable:
        return []
    models = ("f0", "f1") if is_paired(rows) else (None,)  # None: a single model's fields are the row's own

    def clip(row: Mapping[str, Any]) -> str:
        objects = row.get("objects")
        return "" if objects is None else "1 object" if objects == 1 else "2+ objects"

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in answerable:
        groups.setdefault((str(row["form"]), clip(row)), []).append(row)
    columns = [model or "accuracy" for model in models]
    lines = [
        "",
        "## Answerable accuracy by question form",
        "",
        "| form | clip | items | " + " | ".join(columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for (form, kind), members in sorted(groups.items()):
        accuracies = [
            sum(bool((row[model] if model else row)["correct"]) for row in members) / len(members)
            for model in models
        ]
        cells = " | ".join(_fmt(accuracy) for accuracy in accuracies)
        lines.append(f"| {form} | {kind} | {len(members)} | {cells} |")
    return lines


def format_report(
    metrics: Metrics, title: str = "Answerability report", rows: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """The Markdown report: one table of scores (columns f0 and f1 for a paired run), for a paired run a table
    of the alignment scores with their denominators, and, when the rows carry question forms, answerable
    accuracy by form (`_skill_lines`). Values have 3 decimals; NaN is "NaN"."""
    lines = [f"# {title}", ""]
    if rows:
        lines += [_counts_line(rows), ""]
    if _is_paired_metrics(metrics):
        f0, f1 = metrics["f0"], metrics["f1"]
        lines += ["| score | better | f0 | f1 |", "|---|---|---:|---:|"]
        for key in _ordered_keys(f0, f1):
            lines.append(f"| {key} | {_better(key)} | {_fmt(f0.get(key))} | {_fmt(f1.get(key))} |")
        paired = metrics.get("paired") or {}
        if paired:
            lines += [
                "",
                "## Alignment f0 -> f1",
                "",
                "| score | better | value | denominator |",
                "|---|---|---:|---:|",
            ]
            for key in PAIRED_SCORE_KEYS:
                if key in paired:
                    denominator = _number(paired.get(f"{key}/denominator"))
                    shown = "" if denominator is None else str(int(denominator))
                    lines.append(f"| {key} | {_better(key)} | {_fmt(paired[key])} | {shown} |")
    else:
        lines += ["| score | better | value |", "|---|---|---:|"]
        for key in _ordered_keys(metrics):
            lines.append(f"| {key} | {_better(key)} | {_fmt(metrics[key])} |")
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
    text = format_report(metrics, title=title, rows=rows)
    return _atomic_write(path, lambda f: f.write(text))


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
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi), binary=True)


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
    paths = {
        "predictions": write_predictions(out_dir / "predictions.jsonl", rows),
        "metrics": write_metrics_json(out_dir / "metrics.json", metrics),
        "report_md": write_report_md(out_dir / "report.md", metrics, title=title, rows=rows),
    }
    figures = write_figures(out_dir, evaluation_from_test(metrics, rows, title=title))
    paths.update({f"{'report' if name == 'scores' else name}_png": path for name, path in figures.items()})
    return paths


def combine_metrics_table(
    models: Mapping[str, Metrics], keys: Sequence[str] | None = None, digits: int = 3
) -> str:
    """One Markdown table comparing several models: a row per model (e.g. f0, sft, dpo), a column per
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


def _flat_metrics(metrics: Metrics, prefix: str) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            # the paired scores are already unambiguous keys
            flat.update(_flat_metrics(value, prefix if key == "paired" else f"{prefix}/{key}"))
        elif (number := _number(value)) is not None:
            flat[f"{prefix}/{key}"] = number
    return flat


def log_to_wandb(
    logger_or_run: Any,
    metrics: Metrics,
    rows: Sequence[Mapping[str, Any]] | None = None,
    image_path: str | os.PathLike | None = None,
    prefix: str = "test",
) -> None:
    """Log the scores as W&B summary values (``<prefix>/<score>``, ``<prefix>/f0/<score>`` for a paired run),
    the predictions as a ``wandb.Table`` (``<prefix>/predictions``; paired rows flattened to ``f0/...``
    columns), the chart as an image (``<prefix>/report``), and the charts and tables of
    `metrics.wandb_charts` (with the other figures found beside the image).

    A NaN score is left out of the summary (W&B drops NaN summary values anyway); for the paired scores
    the zero denominator beside it says why.

    Takes a Lightning `WandbLogger` or a `wandb` run. Call it on rank 0 only: it logs whatever it is given.
    """
    import wandb

    run = getattr(logger_or_run, "experiment", logger_or_run)
    flat = _flat_metrics(metrics, prefix)
    run.summary.update(flat)
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
