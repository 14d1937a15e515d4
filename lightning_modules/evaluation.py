"""`AnswerabilityEvaluator`: what `test` does with the responses (docs/design.md section 6): judge them,
update the answerability metrics of the model after alignment (and before it, with the alignment scores),
keep one prediction row per item, and at the end write the reports and log them.

The model under test is `after` (the paper's f1); `before` (f0) is the model before alignment, scored on the
same items when the run has it. `AlignmentModule` generates and calls this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from datamodules.records import QARecord, RecordError, read_predictions
from metrics.answerability import (
    AnswerabilityAUROC,
    AnswerabilityMetrics,
    PairedAnswerabilityMetrics,
    category_ids,
)
from metrics.judges import ExactMatchJudge, Judge, JudgeItem, Judgement
from metrics.names import ALIGNMENT, BEFORE
from metrics.report import write_reports
from metrics.runs import paired_rows, prediction_row, report_metrics
from metrics.wandb_charts import log_to_wandb


class AnswerabilityEvaluator(torch.nn.Module):
    """Judges responses and accumulates the answerability scores and prediction rows of a `test` epoch.

    An `nn.Module` so that its metrics (`self.metrics`, torchmetrics) are submodules of the LightningModule
    that holds it: they move to its device and sync across DDP ranks at `compute`. The rows are plain Python,
    gathered across ranks by `write`.

    Use: `reset()` at the epoch start, `update(records, after, ...)` per batch, then `results()` (every rank:
    the metrics sync) and `write(out_dir, logger)` (every rank: the rows are gathered; rank 0 writes).
    """

    def __init__(self, judge: Judge | None = None):
        super().__init__()
        self.judge = judge or ExactMatchJudge()
        self.metrics = torch.nn.ModuleDict(
            {
                "after": AnswerabilityMetrics(),
                "before": AnswerabilityMetrics(),
                "after_auroc": AnswerabilityAUROC(),
                "before_auroc": AnswerabilityAUROC(),
                ALIGNMENT: PairedAnswerabilityMetrics(),
            }
        )
        self.rows: list[dict[str, Any]] = []

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.rows = []

    def _judge(
        self, model: str, records: Sequence[QARecord], responses: Sequence[str], likelihood: Tensor | None
    ) -> tuple[list[Judgement], Tensor, Tensor, Tensor]:
        """Judge one model's responses and update its metrics; returns (judgements, refused, correct,
        answerable)."""
        judgements = self.judge.judge_many(
            [
                JudgeItem(r.question, r.answer, response, r.answerable, r.missing_element)
                for r, response in zip(records, responses, strict=True)
            ]
        )
        device = self.metrics["after"].device  # the metric states' device: inputs are made there
        refused = torch.tensor([j.refused for j in judgements], dtype=torch.bool, device=device)
        correct = torch.tensor([j.correct for j in judgements], dtype=torch.bool, device=device)
        reason = torch.tensor([j.reason_ok for j in judgements], dtype=torch.bool, device=device)
        answerable = torch.tensor([r.answerable for r in records], dtype=torch.bool, device=device)
        category = category_ids([r.category for r in records]).to(device)
        self.metrics[model].update(refused, correct, answerable, category, reason)
        if likelihood is not None:
            self.metrics[f"{model}_auroc"].update(likelihood, answerable, category)
        return judgements, refused, correct, answerable

    @staticmethod
    def _rows(
        records: Sequence[QARecord],
        responses: Sequence[str],
        judgements: Sequence[Judgement],
        likelihood: Tensor | None,
    ) -> list[dict[str, Any]]:
        return [
            prediction_row(
                id=r.id,
                question=r.question,
                gold=r.answer,
                answerable=r.answerable,
                category=r.category,
                response=response,
                judgement=judgement,
                missing_element=r.missing_element,
                form=r.meta.get("form"),
                objects=r.meta.get("objects"),
                refusal_likelihood=None if likelihood is None else float(likelihood[i]),
            )
            for i, (r, response, judgement) in enumerate(zip(records, responses, judgements, strict=True))
        ]

    def update(
        self,
        records: Sequence[QARecord],
        after: Sequence[str],
        after_likelihood: Tensor | None = None,
        before: Sequence[str] | None = None,
        before_likelihood: Tensor | None = None,
    ) -> None:
        """Judge and count one batch: the responses of the model under test (`after`) and, when given, of the
        model before alignment (`before`), with their refusal likelihoods (one per record) when computed."""
        judgements, after_refused, after_correct, answerable = self._judge(
            "after", records, after, after_likelihood
        )
        rows = self._rows(records, after, judgements, after_likelihood)
        if before is not None:
            judgements, before_refused, before_correct, _ = self._judge(
                "before", records, before, before_likelihood
            )
            self.metrics[ALIGNMENT].update(
                before_refused, before_correct, after_refused, after_correct, answerable
            )
            rows = paired_rows(self._rows(records, before, judgements, before_likelihood), rows)
        self.rows.extend(rows)

    def results(self) -> dict[str, dict[str, float]]:
        """The scores in metrics.json's structure: ``{"after"}``, or ``{"before", "after", "alignment"}`` when
        the model before alignment was scored. Synced across ranks: call it on every rank."""

        def plain(*metrics) -> dict[str, float]:
            return {
                k: float(v) for metric in metrics if metric.update_called for k, v in metric.compute().items()
            }

        m = self.metrics
        after = plain(m["after"], m["after_auroc"])
        if not m[ALIGNMENT].update_called:
            return report_metrics(after)
        return report_metrics(after, plain(m["before"], m["before_auroc"]), plain(m[ALIGNMENT]))

    def write(
        self,
        out_dir: str | os.PathLike,
        results: dict[str, dict[str, float]] | None = None,
        logger: Any = None,
        title: str = "Answerability report",
        order: Sequence[str] | None = None,
    ) -> dict[str, Path] | None:
        """Gather every rank's rows; on rank 0 write predictions.jsonl, metrics.json, report.md and report.png
        into `out_dir` and, with a `WandbLogger`, log them to W&B. Call it on every rank (the gather is
        collective). `results` defaults to `results()`. `order`: the record ids in the order the rows are
        written (the test file's; generation takes the items in another order, and ranks each take a share);
        rows of other ids follow, as they came. Returns the paths on rank 0, None elsewhere."""
        results = self.results() if results is None else results
        rows = gather_rows(self.rows)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        if order is not None:
            position = {record_id: index for index, record_id in enumerate(order)}
            rows = sorted(rows, key=lambda row: position.get(row["id"], len(position)))
        paths = write_reports(out_dir, rows, results, title=title)
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger, results, rows, paths["report_png"])
        return paths


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank, one per `id` (plain objects; metric states sync on their own)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    unique = {row["id"]: row for part in gathered for row in part}  # a padding sampler repeats items
    return list(unique.values())


def read_before(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, float] | None]:
    """The responses, by id, of the model before alignment from a predictions file, and its refusal
    likelihoods when the file has them for every row (else None): a `predict` file or a single-model `test`
    file (`response`, `refusal_likelihood`), or a paired `test` file, whose f0 fields are nested under
    "before" (so a second `test` of the same base reuses the first's f0, AUROC included). A row without a
    string response, or a likelihood on some rows only, is a `RecordError` naming the file and the record."""
    responses: dict[str, str] = {}
    likelihoods: dict[str, float] = {}
    prefix = ""
    for row in read_predictions(path):
        fields, prefix = (row[BEFORE], f"{BEFORE}.") if isinstance(row.get(BEFORE), dict) else (row, "")
        if not isinstance(fields.get("response"), str):
            problem = f"record {row['id']!r}: missing or not a string"
            raise RecordError(path, None, prefix + "response", problem)
        responses[row["id"]] = fields["response"]
        likelihood = fields.get("refusal_likelihood")
        if isinstance(likelihood, (int, float)) and not isinstance(likelihood, bool):
            likelihoods[row["id"]] = float(likelihood)
    if likelihoods and likelihoods.keys() != responses.keys():
        missing = next(i for i in responses if i not in likelihoods)
        problem = f"record {missing!r}: missing, while other rows have one (used for all items or none)"
        raise RecordError(path, None, prefix + "refusal_likelihood", problem)
    return responses, likelihoods or None
