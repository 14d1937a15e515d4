"""Evaluation: refusal detection, judges, answerability torchmetrics and reports (docs/design.md section 6).

This package imports `datamodules` (the record files, categories and gold refusal) but never
`lightning_modules`; the LightningModule calls into it.
"""

from metrics.answerability import (
    AnswerabilityAUROC,
    AnswerabilityMetrics,
    PairedAnswerabilityMetrics,
    alignment_scores,
    answerability_auroc,
    answerability_scores,
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
from metrics.names import HIGHER_IS_BETTER
from metrics.refusal import is_refusal, reason_ok
from metrics.report import combine_metrics_table, write_reports
from metrics.runs import flat_metrics, metrics_from_predictions, paired_rows, prediction_row, report_metrics
from metrics.wandb_charts import log_to_wandb

__all__ = [
    "HIGHER_IS_BETTER",
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
    "alignment_scores",
    "answerability_auroc",
    "answerability_scores",
    "category_ids",
    "combine_metrics_table",
    "flat_metrics",
    "is_refusal",
    "log_to_wandb",
    "metrics_from_predictions",
    "paired_rows",
    "prediction_row",
    "reason_ok",
    "report_metrics",
    "write_reports",
]
