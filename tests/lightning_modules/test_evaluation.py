"""`AnswerabilityEvaluator` without a model: judged batches give the scores recomputed from its own prediction
rows, the reports it writes hold them, and its metrics are submodules of the LightningModule that holds it."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from datamodules.records import REFUSAL_TEMPLATE, QARecord, read_predictions
from lightning_modules.evaluation import AnswerabilityEvaluator
from metrics.runs import metrics_from_predictions

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method")


def records() -> list[QARecord]:
    def unanswerable(i: int, category: str, missing: str) -> QARecord:
        gold = REFUSAL_TEMPLATE.format(missing=missing)
        return QARecord(f"u{i}", "v.mp4", f"Is the {missing} moving?", gold, False, category, missing,
                        meta={"form": "verify", "objects": 2})

    answerable = [QARecord(f"a{i}", "v.mp4", "What colour is the star?", colour, True,
                           meta={"form": "colour", "objects": 1})
                  for i, colour in enumerate(["red", "blue", "green", "red"])]
    return answerable + [unanswerable(0, "object", "red star"), unanswerable(1, "relation", "blue circle"),
                         unanswerable(2, "object", "green square")]


REFUSE = "The question is unanswerable because there is no {} in the video."
# after: 3 of 4 answerable right (a3 refused), refuses u0 (naming it) and u1 (naming another element)
AFTER = ["red", "blue", "green", REFUSE.format("red star"), REFUSE.format("red star"), REFUSE.format("dog"),
         "yes"]
# before: answers a0, a1, a3 right, a2 wrong; refuses nothing
BEFORE = ["red", "blue", "red", "red", "yes", "no", "yes"]


def likelihood(values: list[float]) -> torch.Tensor:
    return torch.tensor(values)


def run(evaluator: AnswerabilityEvaluator, paired: bool) -> None:
    items, scores = records(), [-3.0, -2.5, -2.0, -3.5, -0.2, -1.0, -1.5]
    for batch in (slice(0, 3), slice(3, 7)):
        evaluator.update(items[batch], AFTER[batch], likelihood(scores[batch]),
                         BEFORE[batch] if paired else None, likelihood(scores[batch]) * 2 if paired else None)


def test_paired_results_match_the_rows_and_the_hand_count(tmp_path):
    evaluator = AnswerabilityEvaluator()
    run(evaluator, paired=True)
    results = evaluator.results()
    assert list(results) == ["before", "after", "alignment"]
    after, before, alignment = results["after"], results["before"], results["alignment"]
    assert after["answerable_accuracy"] == 0.75 and after["over_refusal_rate"] == 0.25
    assert after["unanswerable_accuracy"] == pytest.approx(2 / 3)
    assert after["unanswerable_accuracy/object"] == 0.5 and after["unanswerable_accuracy/relation"] == 1.0
    assert math.isnan(after["unanswerable_accuracy/attribute"])
    assert after["reason_accuracy"] == pytest.approx(1 / 3)
    assert before["answerable_accuracy"] == 0.75 and before["unanswerable_accuracy"] == 0.0
    # before right on a0, a1, a3, after refuses a3: 1 of 3; before refused no answerable item: NaN;
    # before answered all 3 unanswerable items, after refuses 2
    assert alignment["excessive_refusal"] == pytest.approx(1 / 3)
    assert alignment["excessive_refusal/denominator"] == 3.0
    assert math.isnan(alignment["permissiveness"]) and alignment["permissiveness/denominator"] == 0.0
    assert alignment["discretion"] == pytest.approx(2 / 3)
    assert after["answerability_auroc"] == 1.0  # every unanswerable score above every answerable one

    recomputed = metrics_from_predictions(evaluator.rows)
    assert recomputed.keys() == results.keys()
    for group in results:
        assert recomputed[group] == pytest.approx(results[group], nan_ok=True), group

    paths = evaluator.write(tmp_path, results)
    written_files = sorted(p.name for p in tmp_path.iterdir())
    assert written_files == ["by_form.png", "metrics.json", "predictions.jsonl", "report.md", "report.png",
                             "roc.png", "tradeoff.png"]
    assert paths is not None and paths["metrics"] == tmp_path / "metrics.json"
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["alignment"]["discretion"] == pytest.approx(2 / 3)
    rows = read_predictions(tmp_path / "predictions.jsonl")
    assert [row["id"] for row in rows] == [r.id for r in records()]
    assert rows[3]["before"]["response"] == "red" and rows[3]["after"]["refused"] is True
    assert "| score | better | before | after |" in (tmp_path / "report.md").read_text()

    evaluator.reset()
    assert evaluator.rows == [] and not evaluator.metrics["after"].update_called


def test_one_model_is_after_alone(tmp_path):
    evaluator = AnswerabilityEvaluator()
    run(evaluator, paired=False)
    results = evaluator.results()
    assert list(results) == ["after"] and results["after"]["answerable_accuracy"] == 0.75
    assert "refused" in evaluator.rows[0] and "after" not in evaluator.rows[0]
    assert metrics_from_predictions(evaluator.rows)["after"] == pytest.approx(results["after"], nan_ok=True)


def test_metrics_are_submodules_of_the_lightning_module():
    """Lightning moves and syncs metrics it finds among the module's submodules."""

    class Holder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.evaluator = AnswerabilityEvaluator()

    modules = dict(Holder().named_modules())
    for name in ("after", "before", "after_auroc", "before_auroc", "alignment"):
        assert f"evaluator.metrics.{name}" in modules, name
    holder = Holder().to(torch.float64)
    assert holder.evaluator.metrics["after_auroc"].dtype == torch.float64
