"""Report figures: one PNG per question a reader asks of an evaluation, drawn on the Agg canvas.

- ``tradeoff.png``: what did alignment trade? Answerable accuracy (x) against unanswerable accuracy (y), a
  point per model, per-category marks, an arrow from the model before alignment to each aligned one.
- ``roc.png``: does the refusal likelihood rank unanswerable items above answerable ones? ROC curves per
  category, before and after, with the AUROC in the legend.
- ``report.png``: every score as a labelled bar, "higher is better" and "lower is better" apart; a zero is
  drawn as 0.00, an undefined score (NaN) as "n/a" with its empty denominator.
- ``by_form.png``: accuracy per question form (the records' ``meta["form"]``), answerable and unanswerable.

`python -m metrics.figures RUN_DIR` redraws them from a run folder's metrics.json and predictions.jsonl.
Every file is written atomically, and the command replaces the figures as a set
(`metrics.runs.replacing_files`); a figure that has nothing to show (no refusal likelihoods, no question
forms) is not written, and a stale one from an earlier run in the same folder is removed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.records import CATEGORIES, atomic_write
from metrics.names import (
    AFTER,
    ALIGNMENT,
    ALIGNMENT_SCORE_KEYS,
    ALIGNMENT_SCORES,
    ANSWERABLE_ACCURACY,
    BEFORE,
    HIGHER_IS_BETTER,
    MODELS,
    SCORE_KEYS,
    UNANSWERABLE_ACCURACY,
    denominator_name,
)
from metrics.runs import (
    PREDICTIONS_FILE,
    alignment_denominators,
    denominators,
    float_scores,
    form_accuracy,
    read_metrics,
    read_rows,
    replacing_files,
    rows_by_model,
)

__all__ = [
    "FIGURES",
    "Evaluation",
    "by_form_figure",
    "evaluation_from_combined",
    "evaluation_from_run",
    "evaluation_from_test",
    "model_denominators",
    "roc_curves",
    "roc_figure",
    "score_keys",
    "scores_figure",
    "tradeoff_figure",
    "write_figures",
]

FIGURES: dict[str, str] = {
    "tradeoff": "tradeoff.png",
    "roc": "roc.png",
    "scores": "report.png",
    "by_form": "by_form.png",
}
"""Figure name -> file name in the report folder."""

WIDTH_IN, DPI = 8.0, 100  # 800 px wide: legible at README width without scaling
BEFORE_COLOR = "#7f7f7f"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
CATEGORY_MARKERS = dict(zip(CATEGORIES, ("s", "^", "D"), strict=True))
NA_COLOR = "#555555"

Scores = Mapping[str, float]


# ---------------------------------------------------------------------------------------------------------
# What the figures draw


@dataclass
class Evaluation:
    """The scores of one or more models on the same test items.

    `scores`: model name -> single-model scores (NaN or absent when undefined), in legend order.
    `alignment`: aligned model name -> its paired scores and their ``<score>/denominator``.
    `rows`: model name -> that model's prediction rows (item fields and its own model fields, flat).
    `before`: the model before alignment (arrows start there), or None.
    """

    scores: dict[str, dict[str, float]]
    alignment: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    before: str | None = None
    title: str = "Answerability report"

    @property
    def models(self) -> list[str]:
        return list(self.scores)

    def color(self, model: str) -> str:
        if model == self.before:
            return BEFORE_COLOR
        others = [m for m in self.models if m != self.before]
        return COLORS[others.index(model) % len(COLORS)] if model in others else COLORS[-1]


def evaluation_from_test(
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Answerability report",
    source: str = "predictions",
) -> Evaluation:
    """A `test` run's metrics (``{"before", "after", "alignment"}`` or ``{"after"}``) and prediction rows
    (`source` names them in errors)."""
    groups = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
    models = [m for m in MODELS if m in groups]
    evaluation = Evaluation(
        scores={m: float_scores(groups[m]) for m in models},
        alignment={AFTER: float_scores(groups[ALIGNMENT])} if ALIGNMENT in groups else {},
        before=BEFORE if BEFORE in groups else None,
        title=title,
    )
    if rows:
        evaluation.rows = {m: r for m, r in rows_by_model(rows, source).items() if m in models}
    return evaluation


def evaluation_from_run(run_dir: str | os.PathLike, title: str | None = None) -> Evaluation:
    """A tested run folder's metrics.json and (when present) predictions.jsonl."""
    run_dir = Path(run_dir)
    metrics, rows = read_metrics(run_dir), read_rows(run_dir)
    title = title or f"Answerability report: {run_dir.name}"
    return evaluation_from_test(metrics, rows, title=title, source=str(run_dir / PREDICTIONS_FILE))


def evaluation_from_combined(
    report: Mapping[str, Any],
    run_dirs: Mapping[str, str | os.PathLike] | None = None,
    title: str = "Answerability before and after alignment",
) -> Evaluation:
    """The combined demo report (``{"before": scores, <run>: after and alignment scores, "seconds": N}``, see
    `metrics.combine`), with each run's predictions.jsonl from `run_dirs` (the first run's gives "before")."""
    before_name = BEFORE if BEFORE in report else None
    alignment_keys = {key for score in ALIGNMENT_SCORES for key in (score.key, score.denominator_key)}
    evaluation = Evaluation(scores={}, before=BEFORE if before_name else None, title=title)
    if before_name is not None:
        evaluation.scores[BEFORE] = float_scores(report[before_name])
    for name, values in report.items():
        if name == before_name or not isinstance(values, Mapping):
            continue
        evaluation.scores[name] = float_scores({k: v for k, v in values.items() if k not in alignment_keys})
        aligned = float_scores({k: v for k, v in values.items() if k in alignment_keys})
        if aligned:
            evaluation.alignment[name] = aligned
    for index, (name, run_dir) in enumerate((run_dirs or {}).items()):
        if name not in evaluation.scores or (rows := read_rows(run_dir)) is None:
            continue
        run_rows = rows_by_model(rows, str(Path(run_dir) / PREDICTIONS_FILE))
        if AFTER in run_rows:
            evaluation.rows[name] = run_rows[AFTER]
        if index == 0 and BEFORE in run_rows and before_name is not None:
            evaluation.rows[BEFORE] = run_rows[BEFORE]
    return evaluation


# ---------------------------------------------------------------------------------------------------------
# Denominators


def model_denominators(evaluation: Evaluation, model: str) -> dict[str, int]:
    """The denominator of every score of `model` (`metrics.runs.denominators` of its rows), the logged
    denominators of its alignment scores taking precedence."""
    rows = evaluation.rows.get(model)
    before_rows = None
    if evaluation.before is not None and model != evaluation.before:
        before_rows = evaluation.rows.get(evaluation.before)
    out = denominators(rows, before_rows) if rows else {}
    out.update(alignment_denominators(evaluation.alignment.get(model, {})))
    return out


# ---------------------------------------------------------------------------------------------------------
# Drawing helpers


def _figure(height: float, **subplots: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots) if subplots else fig.subplots()


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _label(model: str, evaluation: Evaluation) -> str:
    return f"{model} (before alignment)" if model == evaluation.before and model != BEFORE else model


# ---------------------------------------------------------------------------------------------------------
# 1. The trade-off


def tradeoff_figure(evaluation: Evaluation):
    """Answerable accuracy (x) against unanswerable accuracy (y): a large point per model, a small mark per
    category (the unanswerable accuracy within it), an arrow from the model before alignment to each other
    model. Returns the matplotlib Figure, or None when no model has both scores."""
    from matplotlib.lines import Line2D

    points = {
        m: (s.get(ANSWERABLE_ACCURACY.key, math.nan), s.get(UNANSWERABLE_ACCURACY.key, math.nan))
        for m, s in evaluation.scores.items()
    }
    drawn = {m: p for m, p in points.items() if _finite(p[0]) and _finite(p[1])}
    if not drawn:
        return None
    fig, ax = _figure(7.2)
    ax.set_xlim(-0.03, 1.08)
    ax.set_ylim(-0.03, 1.08)
    ax.set_aspect("equal")
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.plot([1.0], [1.0], marker="*", markersize=16, color="#f2b400", linestyle="none", zorder=2)
    ax.annotate("ideal", (1.0, 1.0), xytext=(-8, -14), textcoords="offset points", ha="right", fontsize=9,
                color="#9a7400")
    ax.text(0.0, 1.04, "refuses everything", fontsize=8, color="#777777", va="center")
    # Upright along the right edge, where no model's label (to the right of its point) reaches at x <= 1.
    ax.text(1.065, 0.0, "answers everything", fontsize=8, color="#777777", rotation=90, ha="center",
            va="bottom")

    if evaluation.before in drawn:
        start = drawn[evaluation.before]
        for model, end in drawn.items():
            if model != evaluation.before and end != start:
                ax.annotate("", xy=end, xytext=start, zorder=2, arrowprops=dict(
                    arrowstyle="-|>", color=evaluation.color(model), lw=1.8, shrinkA=9, shrinkB=9,
                    mutation_scale=16))
    used_categories = set()
    for model, (x, y) in drawn.items():
        color = evaluation.color(model)
        scores = evaluation.scores[model]
        category_ys = {c: scores.get(UNANSWERABLE_ACCURACY.category_key(c), math.nan) for c in CATEGORIES}
        category_ys = {c: v for c, v in category_ys.items() if _finite(v)}
        if category_ys:
            low, high = min([y, *category_ys.values()]), max([y, *category_ys.values()])
            ax.plot([x, x], [low, high], color=color, alpha=0.45, linewidth=1.2, zorder=2)
        for category, value in category_ys.items():
            used_categories.add(category)
            ax.scatter([x], [value], marker=CATEGORY_MARKERS[category], s=46, facecolor="white",
                       edgecolor=color, linewidth=1.5, zorder=4)
        ax.scatter([x], [y], s=140, color=color, edgecolor="white", linewidth=1.2, zorder=5)

    ax.set_xlabel("answerable accuracy: answerable questions answered correctly →", fontsize=10)
    ax.set_ylabel("unanswerable accuracy: unanswerable questions refused →", fontsize=10)
    ax.set_title(f"{evaluation.title}\nWhat alignment trades: answering against refusing", fontsize=11)
    ax.tick_params(labelsize=9)
    handles = [
        Line2D([], [], marker="o", linestyle="none", markersize=10, color=evaluation.color(m),
               label=_label(m, evaluation))
        for m in drawn
    ]
    handles += [
        Line2D([], [], marker=CATEGORY_MARKERS[c], linestyle="none", markersize=7, markerfacecolor="white",
               markeredgecolor="#333333", label=f"unanswerable accuracy: {c}")
        for c in CATEGORIES if c in used_categories
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8,
               frameon=False)
    missing = [m for m in points if m not in drawn]
    if missing:
        ax.text(0.5, 0.5, "not drawn (a score is n/a): " + ", ".join(missing), fontsize=9, color=NA_COLOR,
                ha="center", style="italic", transform=ax.transAxes)
    texts = {m: f"{_label(m, evaluation)}\n{x:.2f}, {y:.2f}" for m, (x, y) in drawn.items()}
    _place_labels(fig, ax, {m: (p, texts[m], evaluation.color(m)) for m, p in drawn.items()})
    return fig


# Label offsets (points) tried in order: right, left, above, below, then further out.
_OFFSETS = [(10, 4), (-10, 4), (10, 24), (-10, 24), (10, -18), (-10, -18), (10, 46), (-10, 46), (10, -40),
            (-10, -40), (10, 68), (-10, 68)]


def _place_labels(fig, ax, labels: Mapping[str, tuple[tuple[float, float], str, str]]) -> None:
    """Annotate each point with the first offset whose text box stays inside the axes and clear of the
    points and of the labels placed before it (measured on the laid-out figure)."""
    fig.draw_without_rendering()  # fixes the layout, so display coordinates below are final
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    obstacles = []
    for (x, y), _, _ in labels.values():
        px, py = ax.transData.transform((x, y))
        obstacles.append((px - 9, py - 9, px + 9, py + 9))

    def clear(box) -> bool:
        if box.x0 < inside.x0 or box.x1 > inside.x1 or box.y0 < inside.y0 or box.y1 > inside.y1:
            return False
        return not any(box.x0 < o[2] and o[0] < box.x1 and box.y0 < o[3] and o[1] < box.y1 for o in obstacles)

    for (x, y), text, color in labels.values():
        for dx, dy in _OFFSETS:
            annotation = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha="left" if dx > 0 else "right",
                va="center", fontsize=9, color=color, fontweight="bold", zorder=6,
            )
            box = annotation.get_window_extent(renderer)
            if clear(box) or (dx, dy) == _OFFSETS[-1]:
                obstacles.append((box.x0, box.y0, box.x1, box.y1))
                break
            annotation.remove()


# ---------------------------------------------------------------------------------------------------------
# 2. ROC of the refusal likelihood


def _ranks(scores: Sequence[float]):
    """Scores mapped to [0, 1] by their rank (ties share one value): the ROC is unchanged, and torchmetrics
    does not take values outside [0, 1] for logits (a log-probability of -inf included)."""
    import torch

    values = torch.tensor([float(s) for s in scores], dtype=torch.float64)
    unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return inverse.double() / max(unique.numel() - 1, 1)


def roc_curves(
    rows: Sequence[Mapping[str, Any]], category: str | None = None
) -> tuple[list[float], list[float], float, int, int] | None:
    """(false positive rates, true positive rates, AUROC, #unanswerable, #answerable) of the refusal
    likelihood with "unanswerable" the positive class (within `category` when given; all answerable items
    are the negatives). None when an item lacks a likelihood or a class is empty."""
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    if not rows or any(r.get("refusal_likelihood") is None for r in rows):
        return None
    chosen = [r for r in rows if r["answerable"] or category is None or r.get("category") == category]
    target = torch.tensor([0 if r["answerable"] else 1 for r in chosen])
    positives, negatives = int(target.sum()), int((1 - target).sum())
    if positives == 0 or negatives == 0:
        return None
    preds = _ranks([r["refusal_likelihood"] for r in chosen])
    fpr, tpr, _ = binary_roc(preds, target)
    auroc = float(binary_auroc(preds, target))
    return fpr.tolist(), tpr.tolist(), auroc, positives, negatives


def roc_figure(evaluation: Evaluation):
    """ROC curves of the refusal likelihood, all unanswerable items and per category, one curve per model
    with its AUROC in the legend. None when no model's rows carry refusal likelihoods."""
    models = [
        m for m in evaluation.models
        if evaluation.rows.get(m) and all(r.get("refusal_likelihood") is not None for r in evaluation.rows[m])
    ]
    if not models:
        return None
    fig, axes = _figure(7.6, nrows=2, ncols=2, sharex=True, sharey=True)
    for ax, category in zip(axes.flat, (None, *CATEGORIES), strict=True):
        ax.plot([0, 1], [0, 1], linestyle="--", color="#bbbbbb", linewidth=1, label="chance (0.50)")
        counts = None
        for j, model in enumerate(models):
            curve = roc_curves(evaluation.rows[model], category)
            if curve is None:
                continue
            fpr, tpr, auroc, positives, negatives = curve
            counts = (positives, negatives)
            # earlier curves are wider, so a curve that another one covers still shows at its edges
            ax.plot(fpr, tpr, color=evaluation.color(model), linewidth=2 + (len(models) - 1 - j),
                    label=f"{_label(model, evaluation)}: AUROC {auroc:.2f}")
        name = category or "all categories"
        if counts is None:
            ax.text(0.5, 0.5, f"n/a: no unanswerable {category or ''} items".replace("  ", " "),
                    ha="center", va="center", fontsize=9, color=NA_COLOR, style="italic")
            ax.set_title(name, fontsize=10)
        else:
            ax.set_title(f"{name}: {counts[0]} unanswerable vs {counts[1]} answerable", fontsize=10)
            ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(True, color="#eeeeee")
        ax.tick_params(labelsize=8)
    for ax in axes[1]:
        ax.set_xlabel("false positive rate (answerable items)", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate (unanswerable)", fontsize=9)
    fig.suptitle(
        f"{evaluation.title}\nDoes the refusal likelihood rank unanswerable items above answerable ones?",
        fontsize=11,
    )
    return fig


# ---------------------------------------------------------------------------------------------------------
# 3. Scores, grouped by direction


def score_keys(evaluation: Evaluation) -> tuple[list[str], list[str]]:
    """(higher-is-better keys, lower-is-better keys) in report order, the alignment scores last."""
    present = set().union(*(s.keys() for s in evaluation.scores.values()))
    single = [k for k in SCORE_KEYS if k in present]
    single += sorted(k for k in present if k not in SCORE_KEYS and k in HIGHER_IS_BETTER)
    aligned = set().union(*(s.keys() for s in evaluation.alignment.values()))
    keys = single + [k for k in ALIGNMENT_SCORE_KEYS if k in aligned]
    return [k for k in keys if HIGHER_IS_BETTER[k]], [k for k in keys if not HIGHER_IS_BETTER[k]]


def scores_figure(evaluation: Evaluation):
    """Every score as a horizontal bar per model with its value printed, in a "higher is better" and a
    "lower is better" panel; the alignment scores (before -> model) beside the others. A zero is a tick
    and "0.00"; an undefined score is "n/a" with its denominator; a score a model lacks, "not computed"."""
    from matplotlib.patches import Patch

    higher, lower = score_keys(evaluation)
    groups = [(name, keys) for name, keys in (("higher is better", higher), ("lower is better", lower))]
    groups = [(name, keys) for name, keys in groups if keys]
    if not groups:
        fig, ax = _figure(2.0)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no scores: the run scored no items", ha="center", va="center", fontsize=10,
                color=NA_COLOR, style="italic")
        fig.suptitle(evaluation.title, fontsize=11, x=0.01, ha="left")
        return fig
    models = evaluation.models
    bar = 0.8 / len(models)
    row_in = 0.17 * len(models) + 0.12
    height = 1.4 + sum(len(keys) for _, keys in groups) * row_in + 0.5 * len(groups)
    fig, axes = _figure(
        height, nrows=len(groups), ncols=1, squeeze=False,
        gridspec_kw={"height_ratios": [len(keys) + 0.8 for _, keys in groups]},
    )
    denominators_of = {m: model_denominators(evaluation, m) for m in models}
    for ax, (group, keys) in zip(axes[:, 0], groups, strict=True):
        for i, key in enumerate(keys):
            aligned = key in ALIGNMENT_SCORE_KEYS
            # the model before alignment has no alignment scores: those rows hold the aligned models only
            shown = [m for m in models if m in evaluation.alignment] if aligned else models
            for j, model in enumerate(shown):
                y = i + (j - (len(shown) - 1) / 2) * bar
                source = evaluation.alignment[model] if aligned else evaluation.scores[model]
                color = evaluation.color(model)
                value = source.get(key)
                if value is None:
                    ax.text(0.005, y, "not computed", va="center", fontsize=7, color=NA_COLOR, style="italic")
                elif math.isnan(value):
                    n = denominators_of[model].get(key)
                    before = evaluation.before or BEFORE
                    why = f"0 {denominator_name(key, before)}" if n == 0 else "undefined"
                    ax.text(0.005, y, f"n/a: {why}", va="center", fontsize=7, color=NA_COLOR, style="italic")
                else:
                    ax.barh(y, value, bar * 0.92, color=color)
                    if value == 0:
                        ax.plot([0, 0], [y - bar * 0.42, y + bar * 0.42], color=color, linewidth=2.5)
                    ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=7.5, color="#222222")
        aligned_models = list(evaluation.alignment)
        after = aligned_models[0] if len(aligned_models) == 1 else "each"
        change = f"{evaluation.before or BEFORE} → {after}"
        labels = [f"{k}\n({change})" if k in ALIGNMENT_SCORE_KEYS else k for k in keys]
        ax.set_yticks(range(len(keys)), labels, fontsize=8)
        ax.set_ylim(len(keys) - 0.5, -0.5)
        ax.set_xlim(-0.01, 1.12)  # a zero bar's tick stays clear of the axis
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
        ax.set_title(f"{group} {'→' if group.startswith('higher') else '←'}", fontsize=10, loc="left")
        for i in range(1, len(keys)):
            ax.axhline(i - 0.5, color="#f0f0f0", linewidth=0.8)
    handles = [Patch(color=evaluation.color(m), label=_label(m, evaluation)) for m in models]
    fig.legend(handles=handles, loc="outside upper right", ncols=len(models), fontsize=9, frameon=False)
    fig.suptitle(evaluation.title, fontsize=11, x=0.01, ha="left")
    return fig


# ---------------------------------------------------------------------------------------------------------
# 4. Accuracy by question form


def by_form_figure(evaluation: Evaluation):
    """Accuracy per question form, one bar per model: answerable questions answered correctly (top) and
    unanswerable questions refused (bottom), items per form under each label. None when no row has a form."""
    from matplotlib.patches import Patch

    models = [m for m in evaluation.models if evaluation.rows.get(m)]
    panels = []
    for answerable, name in ((True, "answerable questions answered correctly"),
                             (False, "unanswerable questions refused")):
        per_model = {m: form_accuracy(evaluation.rows[m], answerable) for m in models}
        forms = sorted(set().union(*(p.keys() for p in per_model.values()))) if per_model else []
        if forms:
            panels.append((name, forms, per_model))
    if not panels:
        return None
    fig, axes = _figure(3.3 * len(panels) + 0.8, nrows=len(panels), ncols=1, squeeze=False)
    width = 0.8 / len(models)
    for ax, (name, forms, per_model) in zip(axes[:, 0], panels, strict=True):
        for j, model in enumerate(models):
            for i, form in enumerate(forms):
                if form not in per_model[model]:
                    continue
                x = i + (j - (len(models) - 1) / 2) * width
                value, _ = per_model[model][form]
                ax.bar(x, value, width * 0.92, color=evaluation.color(model))
                if value == 0:
                    ax.plot([x - width * 0.42, x + width * 0.42], [0, 0], color=evaluation.color(model),
                            linewidth=2.5)
                ax.text(x, value + 0.015, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        counts = {f: max(per_model[m].get(f, (0, 0))[1] for m in models) for f in forms}
        ax.set_xticks(range(len(forms)), [f"{f}\n(n={counts[f]})" for f in forms], fontsize=8)
        ax.set_ylim(-0.015, 1.12)  # a zero bar's line stays clear of the axis
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.tick_params(axis="y", labelsize=8)
        ax.set_ylabel("accuracy", fontsize=9)
        ax.grid(True, axis="y", color="#eeeeee")
        ax.set_axisbelow(True)
        ax.set_title(name, fontsize=10, loc="left")
    handles = [Patch(color=evaluation.color(m), label=_label(m, evaluation)) for m in models]
    fig.legend(handles=handles, loc="outside upper right", ncols=len(models), fontsize=9, frameon=False)
    fig.suptitle(f"{evaluation.title}\nAccuracy by question form", fontsize=11, x=0.01, ha="left")
    return fig


# ---------------------------------------------------------------------------------------------------------
# Writing


DRAW = {"tradeoff": tradeoff_figure, "roc": roc_figure, "scores": scores_figure, "by_form": by_form_figure}


def write_figures(out_dir: str | os.PathLike, evaluation: Evaluation) -> dict[str, Path]:
    """Draw every figure of `evaluation` into `out_dir` (file names in FIGURES); returns name -> path of those
    written. A figure with nothing to show is not written, and an earlier file of that name is removed."""
    out_dir = Path(out_dir)
    written = {}
    for name, draw in DRAW.items():
        path = out_dir / FIGURES[name]
        fig = draw(evaluation)
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        written[name] = _save(fig, path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metrics.figures", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a tested run folder (metrics.json, predictions.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the figures (default: the run folder)")
    parser.add_argument("--title", default=None, help="title above every figure")
    args = parser.parse_args(argv)
    try:
        evaluation = evaluation_from_run(args.run_dir, title=args.title)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or args.run_dir)
    with replacing_files(out, FIGURES.values()) as staging:
        written = write_figures(staging, evaluation)
    for path in written.values():
        print(out / path.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
