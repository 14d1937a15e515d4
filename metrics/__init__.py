"""Evaluation: refusal detection, judges, answerability torchmetrics and reports (docs/design.md section 6).

This package never imports `lightning_modules` or `datamodules`; the LightningModule calls into it.
"""

from metrics.answerability import (
    CATEGORIES,
    HIGHER_IS_BETTER,
    AnswerabilityAUROC,
    AnswerabilityMetrics,
    PairedAnswerabilityMetrics,
    answerability_auroc,
    category_ids,
)
from metrics.judges import (
    ChatJudge,
    ChatJudgeError,
    ExactMatchJudge,
    Judge,
    JudgeItem,
    Judgement,
    LexicalJudge,
)
from metrics.refusal import REFUSAL_OPENING, is_refusal, reason_ok
from metrics.report import (
    combine_metrics_table,
    log_to_wandb,
    metrics_from_predictions,
    paired_metrics,
    paired_rows,
    prediction_row,
    read_predictions,
    write_reports,
)

__all__ = [
    "CATEGORIES",
    "HIGHER_IS_BETTER",
    "REFUSAL_OPENING",
    "AnswerabilityAUROC",
    "AnswerabilityMetrics",
    "ChatJudge",
    "ChatJudgeError",
    "ExactMatchJudge",
    "Judge",
    "JudgeItem",
    "Judgement",
    "LexicalJudge",
    "PairedAnswerabilityMetrics",
    "answerability_auroc",
    "category_ids",
    "combine_metrics_table",
    "is_refusal",
    "log_to_wandb",
    "metrics_from_predictions",
    "paired_metrics",
    "paired_rows",
    "prediction_row",
    "read_predictions",
    "reason_ok",
    "write_reports",
]
