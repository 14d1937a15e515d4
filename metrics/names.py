"""The names of a test run's model groups and scores: every score's key, direction and denominator, once.

A paired `test` run scores the model before alignment and after it on the same items: metrics.json is
``{"before": {score: value}, "after": {score: value}, "alignment": {excessive_refusal, ...}}`` (a single
model: ``{"after": {...}}``), and each predictions.jsonl row nests its model fields under "before" and
"after" (a single model's rows are flat). W&B and Lightning log a score as ``test/<group>/<score>``.

The scores' formulas are in `metrics.answerability`; this module says what each is called, which way is
better and what its denominator counts, and everything that lists scores (the torchmetrics' results, the
report's rows, the figures' bars, the W&B charts, the dashboard's panels, the combined table) reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass

from datamodules.records import CATEGORIES

__all__ = [
    "AFTER",
    "ALIGNMENT",
    "ALIGNMENT_SCORES",
    "ALIGNMENT_SCORE_KEYS",
    "ANSWERABILITY_AUROC",
    "ANSWERABLE_ACCURACY",
    "BEFORE",
    "DISCRETION",
    "EXCESSIVE_REFUSAL",
    "HIGHER_IS_BETTER",
    "MODELS",
    "MODEL_SCORES",
    "OVERALL_ACCURACY",
    "OVER_REFUSAL_RATE",
    "PERMISSIVENESS",
    "REASON_ACCURACY",
    "SCORES",
    "SCORE_KEYS",
    "Score",
    "UNANSWERABLE_ACCURACY",
    "UNANSWERABLE_F1",
    "UNANSWERABLE_PRECISION",
    "UNANSWERABLE_RECALL",
    "denominator_name",
    "summary_key",
]

BEFORE = "before"
"""The model before alignment (the base; with LoRA, the aligned model with its adapters disabled)."""
AFTER = "after"
"""The model after alignment (or the only model of a single-model run)."""
ALIGNMENT = "alignment"
"""The scores of the change before -> after: excessive_refusal, permissiveness, discretion."""
MODELS: tuple[str, str] = (BEFORE, AFTER)


def summary_key(prefix: str, group: str, score: str) -> str:
    """The W&B summary key of a score: ``test/after/answerable_accuracy``, ``test/alignment/discretion``."""
    return f"{prefix}/{group}/{score}"


@dataclass(frozen=True)
class Score:
    """One score of docs/design.md section 6.

    `key`: its name in metrics.json, report.md and the logged keys (``unanswerable_accuracy/object`` for the
    score within one category). `higher_is_better`: its direction. `counts`: what its denominator counts,
    as the figures and W&B charts say why a score is undefined ("0 answerable items"); ``{before}`` stands
    for the model before alignment. `alignment`: a score of the change before -> after, in the "alignment"
    group with its denominator beside it.
    """

    key: str
    higher_is_better: bool
    counts: str
    alignment: bool = False

    @property
    def better(self) -> str:
        """"higher" or "lower", as the report and the W&B scores table write the direction."""
        return "higher" if self.higher_is_better else "lower"

    @property
    def denominator_key(self) -> str | None:
        """The key of the denominator logged beside an alignment score (``<key>/denominator``); None for a
        single-model score, whose denominator follows from the item counts."""
        return f"{self.key}/denominator" if self.alignment else None

    def category_key(self, category: str) -> str:
        """The key of this score within one category of unanswerable items: ``<key>/<category>``."""
        return f"{self.key}/{category}"

    def denominator_name(self, before: str = BEFORE) -> str:
        """What the denominator counts, with `before` naming the model before alignment."""
        return self.counts.format(before=before)

    def summary_key(self, prefix: str = "test", group: str | None = None) -> str:
        """The logged key of this score of `group` (default: "alignment" for an alignment score, otherwise
        "after")."""
        return summary_key(prefix, group or (ALIGNMENT if self.alignment else AFTER), self.key)


def _by_category(score: Score, counts: str) -> tuple[Score, ...]:
    """`score` within each category; `counts` names the denominator with ``{category}`` in it."""
    return tuple(
        Score(score.category_key(c), score.higher_is_better, counts.format(category=c)) for c in CATEGORIES
    )


ANSWERABLE_ACCURACY = Score("answerable_accuracy", True, "answerable items")
OVER_REFUSAL_RATE = Score("over_refusal_rate", False, "answerable items")
UNANSWERABLE_ACCURACY = Score("unanswerable_accuracy", True, "unanswerable items")
REASON_ACCURACY = Score("reason_accuracy", True, "unanswerable items")
UNANSWERABLE_PRECISION = Score("unanswerable_precision", True, "refusals")
UNANSWERABLE_RECALL = Score("unanswerable_recall", True, "unanswerable items")
UNANSWERABLE_F1 = Score("unanswerable_f1", True, "refusals or unanswerable items")
OVERALL_ACCURACY = Score("overall_accuracy", True, "items")
ANSWERABILITY_AUROC = Score("answerability_auroc", True, "unanswerable x answerable pairs")
EXCESSIVE_REFUSAL = Score("excessive_refusal", False, "answerable items {before} answered correctly", True)
PERMISSIVENESS = Score("permissiveness", True, "answerable items {before} refused", True)
DISCRETION = Score("discretion", True, "unanswerable items {before} answered", True)

MODEL_SCORES: tuple[Score, ...] = (
    ANSWERABLE_ACCURACY,
    OVER_REFUSAL_RATE,
    UNANSWERABLE_ACCURACY,
    *_by_category(UNANSWERABLE_ACCURACY, "unanswerable {category} items"),
    REASON_ACCURACY,
    UNANSWERABLE_PRECISION,
    UNANSWERABLE_RECALL,
    UNANSWERABLE_F1,
    OVERALL_ACCURACY,
    ANSWERABILITY_AUROC,
    *_by_category(ANSWERABILITY_AUROC, "unanswerable {category} x answerable pairs"),
)
"""The scores of one model, in report order."""
ALIGNMENT_SCORES: tuple[Score, ...] = (EXCESSIVE_REFUSAL, PERMISSIVENESS, DISCRETION)
"""The scores of the change from the model before alignment to the model after it, in report order."""
SCORES: dict[str, Score] = {score.key: score for score in (*MODEL_SCORES, *ALIGNMENT_SCORES)}
"""Every score by key."""

SCORE_KEYS: tuple[str, ...] = tuple(score.key for score in MODEL_SCORES)
ALIGNMENT_SCORE_KEYS: tuple[str, ...] = tuple(score.key for score in ALIGNMENT_SCORES)
HIGHER_IS_BETTER: dict[str, bool] = {key: score.higher_is_better for key, score in SCORES.items()}
"""Direction of every score key (denominators have none)."""


def denominator_name(key: str, before: str = BEFORE) -> str:
    """What the denominator of the score `key` counts ("items" for a key that is not a score)."""
    score = SCORES.get(key)
    return "items" if score is None else score.denominator_name(before)
