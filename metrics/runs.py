"""A `test` run's outputs as data: the predictions.jsonl rows, the metrics.json structure and the run folder.

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
{excessive_refusal, ..., <score>/denominator}}`` with the model before alignment (`metrics.names`). JSON has
no NaN, so an undefined score (zero denominator) is written as null and read back as NaN. W&B and Lightning
log the same scores as ``test/after/<score>``, ``test/before/<score>`` and ``test/alignment/<score>``
(`flat_metrics`).

`metrics_from_predictions` recomputes every score from the rows with the metrics' own functions, so a report
can always be checked against the per-item predictions it came from. `replacing_files` replaces a run's
report files (predictions, metrics, report.md, figures) as a set; `RunError` is a user's mistake in a run's
files or in how runs are named.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from datamodules.errors import UserError
from datamodules.records import CATEGORIES, JSONProblem, atomic_write, parse_json, read_predictions
from metrics.answerability import alignment_scores, answerability_auroc, answerability_scores, category_ids
from metrics.judges import Judgement
from metrics.names import (
    AFTER,
    ALIGNMENT,
    ALIGNMENT_SCORES,
    ANSWERABILITY_AUROC,
    ANSWERABLE_ACCURACY,
    BEFORE,
    DISCRETION,
    EXCESSIVE_REFUSAL,
    MODELS,
    OVER_REFUSAL_RATE,
    OVERALL_ACCURACY,
    PERMISSIVENESS,
    REASON_ACCURACY,
    UNANSWERABLE_ACCURACY,
    UNANSWERABLE_F1,
    UNANSWERABLE_PRECISION,
    UNANSWERABLE_RECALL,
)

__all__ = [
    "ITEM_FIELDS",
    "METRICS_FILE",
    "MODEL_FIELDS_NEEDED",
    "MODEL_FIELDS",
    "PREDICTIONS_FILE",
    "RERUN_TEST",
    "RunError",
    "alignment_denominators",
    "clip_size",
    "denominators",
    "flat_metrics",
    "flatten_prediction",
    "float_or_nan",
    "float_or_none",
    "float_scores",
    "form_accuracy",
    "metrics_from_predictions",
    "paired_rows",
    "prediction_row",
    "read_metrics",
    "read_rows",
    "replacing_files",
    "report_metrics",
    "rows_by_model",
    "to_plain",
    "write_metrics_json",
]

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
ITEM_FIELDS: tuple[str, ...] = (
    "id", "category", "answerable", "question", "gold", "missing_element", "form", "objects"
)
MODEL_FIELDS: tuple[str, ...] = ("response", "refused", "correct", "reason_ok", "refusal_likelihood")
MODEL_FIELDS_NEEDED: tuple[str, ...] = ("refused", "correct")
"""The model fields every row must have to be scored or drawn."""

Metrics = Mapping[str, Any]
RERUN_TEST = "rerun `python main.py test` for this run to write it again"


class RunError(UserError, ValueError):
    """A user's mistake in a run folder's files or in how runs are given: the message names the file or the
    argument, and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Undefined scores: NaN in Python, null in JSON and W&B


def float_or_nan(value: Any) -> float:
    """A score as a float (tensors and numpy scalars too); None (JSON's null) becomes NaN."""
    if value is None:
        return math.nan
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def float_or_none(value: Any) -> float | None:
    """A score as a JSON-safe float (tensors and numpy scalars too); NaN becomes None."""
    if value is None:
        return None
    value = float_or_nan(value)
    return None if math.isnan(value) else value


def float_scores(scores: Mapping[str, Any]) -> dict[str, float]:
    """A group's scores as floats, null as NaN; nested groups are left out."""
    return {k: float_or_nan(v) for k, v in scores.items() if not isinstance(v, Mapping)}


def to_plain(metrics: Metrics) -> dict[str, Any]:
    """Metrics (possibly nested, with tensor values) as plain floats; NaN becomes None."""
    return {k: to_plain(v) if isinstance(v, Mapping) else float_or_none(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------
# predictions.jsonl rows


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

    before, after = by_id(before_rows, BEFORE), by_id(after_rows, AFTER)
    if before.keys() != after.keys():
        missing = sorted(after.keys() - before.keys()) or sorted(before.keys() - after.keys())
        side = BEFORE if after.keys() - before.keys() else AFTER
        raise ValueError(
            f"{side} predictions: field 'id': no prediction for id {missing[0]!r} ({len(missing)} missing)"
        )
    out = []
    for item_id, after_row in after.items():
        row = {field: after_row.get(field) for field in ITEM_FIELDS}
        row[BEFORE] = {field: before[item_id].get(field) for field in MODEL_FIELDS}
        row[AFTER] = {field: after_row.get(field) for field in MODEL_FIELDS}
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


def rows_by_model(
    rows: Sequence[Mapping[str, Any]], source: str = "predictions"
) -> dict[str, list[dict[str, Any]]]:
    """Flat single-model rows per model: a paired row's item fields with each model's own fields ("before"
    and "after", those the first row nests), a single-model row as "after". Raises ValueError naming
    `source`, the record and the field when a row lacks what scoring and drawing read."""
    paired = bool(rows) and isinstance(rows[0].get(AFTER), Mapping)
    models = [m for m in MODELS if isinstance(rows[0].get(m), Mapping)] if paired else [AFTER]
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for number, row in enumerate(rows, start=1):
        where = f"{source}, record {row.get('id', f'#{number}')!r}"
        if "answerable" not in row:
            raise ValueError(f"{where}: field 'answerable': missing")
        item = {k: v for k, v in row.items() if not isinstance(v, Mapping)}
        for model in models:
            fields = row.get(model) if paired else row
            if not isinstance(fields, Mapping):
                raise ValueError(f"{where}: field {model!r}: missing (other rows have it)")
            for name in MODEL_FIELDS_NEEDED:
                if name not in fields:
                    raise ValueError(f"{where}: field {(model + '.' if paired else '') + name!r}: missing")
            out[model].append({**item, **fields} if paired else item)
    return out


# ---------------------------------------------------------------------------------------------------------
# What the rows say: scores, denominators, accuracy by question form


def _flags(rows: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    values = []
    for row in rows:
        value = row.get(key)
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
    from_file = isinstance(rows_or_path, str | os.PathLike)
    rows = read_predictions(rows_or_path) if from_file else list(rows_or_path)
    answerable = _flags(rows, "answerable")
    category = category_ids([row.get("category") for row in rows])
    models = rows_by_model(rows, str(rows_or_path) if from_file else "predictions")
    out: dict[str, dict[str, Any]] = {}
    for name, model_rows in models.items():
        scores = answerability_scores(
            _flags(model_rows, "refused"),
            _flags(model_rows, "correct"),
            answerable,
            category,
            _flags(model_rows, "reason_ok"),
        )
        likelihood = [row.get("refusal_likelihood") for row in model_rows]
        if rows and all(value is not None for value in likelihood):
            refusal_score = torch.tensor(likelihood, dtype=torch.float64)
            scores.update(answerability_auroc(refusal_score, answerable, category))
        out[name] = scores
    if BEFORE in models:
        before, after = models[BEFORE], models[AFTER]
        out[ALIGNMENT] = alignment_scores(
            _flags(before, "refused"),
            _flags(before, "correct"),
            _flags(after, "refused"),
            _flags(after, "correct"),
            answerable,
        )
    return {group: {key: float(value) for key, value in scores.items()} for group, scores in out.items()}


def denominators(
    rows: Sequence[Mapping[str, Any]], before_rows: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, int]:
    """The denominator of every score of a model from its flat prediction rows (docs/design.md section 6);
    the alignment scores' need the rows of the model before alignment too (same items, any order)."""
    a = [r for r in rows if r["answerable"]]
    u = [r for r in rows if not r["answerable"]]
    refused = sum(bool(r["refused"]) for r in rows)
    out = {
        ANSWERABLE_ACCURACY.key: len(a),
        OVER_REFUSAL_RATE.key: len(a),
        UNANSWERABLE_ACCURACY.key: len(u),
        REASON_ACCURACY.key: len(u),
        UNANSWERABLE_RECALL.key: len(u),
        UNANSWERABLE_PRECISION.key: refused,
        UNANSWERABLE_F1.key: refused + len(u),  # 2 TP + FP + FN = (TP + FP) + (TP + FN)
        OVERALL_ACCURACY.key: len(rows),
        ANSWERABILITY_AUROC.key: len(u) * len(a),
    }
    for category in CATEGORIES:
        n = sum(r.get("category") == category for r in u)
        out[UNANSWERABLE_ACCURACY.category_key(category)] = n
        out[ANSWERABILITY_AUROC.category_key(category)] = n * len(a)
    if before_rows is not None:
        before = {r["id"]: r for r in before_rows}
        pairs = [(before[r["id"]], r) for r in rows if r["id"] in before]
        out[EXCESSIVE_REFUSAL.key] = sum(b["answerable"] and bool(b["correct"]) for b, _ in pairs)
        out[PERMISSIVENESS.key] = sum(b["answerable"] and bool(b["refused"]) for b, _ in pairs)
        out[DISCRETION.key] = sum(not b["answerable"] and not b["refused"] for b, _ in pairs)
    return out


def alignment_denominators(alignment: Mapping[str, float]) -> dict[str, int]:
    """The denominators logged beside the alignment scores (``<score>/denominator``), by score key; an
    absent or NaN one is left out."""
    out = {}
    for score in ALIGNMENT_SCORES:
        value = float_or_none(alignment.get(score.denominator_key))
        if value is not None:
            out[score.key] = int(value)
    return out


def clip_size(row: Mapping[str, Any]) -> str:
    """"1 object" or "2+ objects" in the clip of a row, "" when the row does not say."""
    objects = row.get("objects")
    return "" if objects is None else "1 object" if objects == 1 else "2+ objects"


def form_accuracy(
    rows: Sequence[Mapping[str, Any]], answerable: bool, by_clip: bool = False
) -> dict[Any, tuple[float, int]]:
    """Per question form (with `by_clip`, per (form, `clip_size`) pair), in sorted order: (accuracy, items) of
    a model's flat rows, the answerable items (correct) or the unanswerable ones (refused). Rows without a
    form are left out."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        if bool(row["answerable"]) == answerable and row.get("form") is not None:
            key = (str(row["form"]), clip_size(row)) if by_clip else str(row["form"])
            groups.setdefault(key, []).append(row)
    flag = "correct" if answerable else "refused"
    return {key: (sum(bool(r[flag]) for r in g) / len(g), len(g)) for key, g in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------------------
# The metrics.json structure


def report_metrics(after: Metrics, before: Metrics | None = None, alignment: Metrics | None = None) -> dict:
    """The metrics.json structure from the computed score dicts of the model after alignment and, when it was
    scored, the model before it and the alignment scores."""
    out: dict[str, Any] = {} if before is None else {BEFORE: dict(before)}
    out[AFTER] = dict(after)
    if alignment is not None:
        out[ALIGNMENT] = dict(alignment)
    return out


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
        elif (number := float_or_none(value)) is not None or (keep_undefined and value is not None):
            flat[f"{prefix}/{key}"] = number
    return flat


# ---------------------------------------------------------------------------------------------------------
# The run folder's files


def write_metrics_json(path: str | os.PathLike, metrics: Metrics) -> Path:
    """Write metrics (the metrics.json structure, tensors allowed) as JSON, NaN as null, atomically."""
    return atomic_write(path, json.dumps(to_plain(metrics), indent=2, allow_nan=False) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A tested run folder's metrics.json (null for an undefined score). Raises FileNotFoundError when the
    run was not tested, `RunError` when the file is not the metrics.json structure (not JSON, e.g. cut short;
    not a JSON object of groups of scores; a score that is not a number or null), each naming the file."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (run `python main.py test` for this run first)")
    try:
        metrics = parse_json(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{path}: not valid UTF-8 text; {RERUN_TEST}") from None
    except JSONProblem as problem:
        line = "" if problem.line is None else f" on line {problem.line}"
        raise RunError(f"{path}: {problem.problem}{line}, cut short or damaged; {RERUN_TEST}") from None
    if not isinstance(metrics, dict) or not all(isinstance(group, dict) for group in metrics.values()):
        raise RunError(f"{path}: expected a JSON object of score groups ({BEFORE}, {AFTER}); {RERUN_TEST}")
    for group, scores in metrics.items():
        for key, value in scores.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise RunError(f"{path}: field '{group}.{key}': expected a number or null, got {value!r}; "
                               f"{RERUN_TEST}")
    return metrics


def read_rows(run_dir: str | os.PathLike) -> list[dict[str, Any]] | None:
    """A run folder's predictions.jsonl rows, None when it has none."""
    path = Path(run_dir) / PREDICTIONS_FILE
    return read_predictions(path) if path.is_file() else None


STAGING_PREFIX = ".report-staging-"
"""The name of the hidden folder in which `replacing_files` writes a new set of files."""


@contextmanager
def replacing_files(folder: str | os.PathLike, names: Iterable[str]) -> Iterator[Path]:
    """Replace the files `names` of `folder` as a set (a run's report files beside its checkpoints).

    The body writes the new set into a hidden staging folder inside `folder`, which it is given. When the
    body ends without error, each file it wrote is renamed over its old version and each of `names` it did
    not write is removed (a figure with nothing to show this time); on any error nothing in `folder` changes.
    Either way the staging folder is removed. Renames write no data, so a full disk or a file-size limit
    stops a write before any old file is touched; only a kill within the renames themselves can leave a mix.
    The staging folders of killed writes are removed at the next write into `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
