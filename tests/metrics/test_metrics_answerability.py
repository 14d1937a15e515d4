"""Answerability torchmetrics, and the scores `metrics_from_predictions` recomputes from prediction rows,
against plain-Python references over random batches; edge cases; doctests."""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch

import metrics.answerability
import metrics.judges
import metrics.refusal
from datamodules.records import CATEGORIES
from metrics.answerability import (
    AnswerabilityAUROC,
    AnswerabilityMetrics,
    PairedAnswerabilityMetrics,
    category_ids,
)
from metrics.names import HIGHER_IS_BETTER
from metrics.runs import metrics_from_predictions

SINGLE_KEYS = {
    "answerable_accuracy",
    "over_refusal_rate",
    "unanswerable_accuracy",
    "unanswerable_accuracy/object",
    "unanswerable_accuracy/relation",
    "unanswerable_accuracy/attribute",
    "reason_accuracy",
    "unanswerable_precision",
    "unanswerable_recall",
    "unanswerable_f1",
    "overall_accuracy",
}


# ---------------------------------------------------------------------------------------------------------
# Plain-Python references, written from the definitions in docs/design.md section 6


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def reference_single(items: list[dict]) -> dict[str, float]:
    answerable = [i for i in items if i["answerable"]]
    unanswerable = [i for i in items if not i["answerable"]]
    tp = sum(i["refused"] for i in unanswerable)
    fp = sum(i["refused"] for i in answerable)
    fn = len(unanswerable) - tp
    out = {
        "answerable_accuracy": _div(sum(i["correct"] for i in answerable), len(answerable)),
        "over_refusal_rate": _div(fp, len(answerable)),
        "unanswerable_accuracy": _div(tp, len(unanswerable)),
        "reason_accuracy": _div(
            sum(i["refused"] and i["reason_ok"] for i in unanswerable), len(unanswerable)
        ),
        "unanswerable_precision": _div(tp, tp + fp),
        "unanswerable_recall": _div(tp, tp + fn),
        "unanswerable_f1": _div(2 * tp, 2 * tp + fp + fn),
        "overall_accuracy": _div(sum(i["correct"] for i in answerable) + tp, len(items)),
    }
    for c, name in enumerate(CATEGORIES):
        in_c = [i for i in unanswerable if i["category"] == c]
        out[f"unanswerable_accuracy/{name}"] = _div(sum(i["refused"] for i in in_c), len(in_c))
    return out


def reference_paired(items: list[dict]) -> dict[str, float]:
    a = [i for i in items if i["answerable"]]
    u = [i for i in items if not i["answerable"]]
    before_c = [i for i in a if i["before_correct"]]
    before_r = [i for i in a if i["before_refused"]]
    before_n = [i for i in u if not i["before_refused"]]
    return {
        "excessive_refusal": _div(sum(i["after_refused"] for i in before_c), len(before_c)),
        "excessive_refusal/denominator": len(before_c),
        "permissiveness": _div(sum(i["after_correct"] for i in before_r), len(before_r)),
        "permissiveness/denominator": len(before_r),
        "discretion": _div(sum(i["after_refused"] for i in before_n), len(before_n)),
        "discretion/denominator": len(before_n),
    }


def reference_auroc(items: list[dict]) -> dict[str, float]:
    def auc(pos, neg):
        if not pos or not neg:
            return math.nan
        return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))

    neg = [i["score"] for i in items if i["answerable"]]
    out = {"answerability_auroc": auc([i["score"] for i in items if not i["answerable"]], neg)}
    for c, name in enumerate(CATEGORIES):
        pos = [i["score"] for i in items if not i["answerable"] and i["category"] == c]
        out[f"answerability_auroc/{name}"] = auc(pos, neg)
    return out


def random_items(rng: random.Random, n: int, p_answerable: float = 0.5) -> list[dict]:
    items = []
    for _ in range(n):
        answerable = rng.random() < p_answerable
        before_refused, after_refused = rng.random() < 0.4, rng.random() < 0.5
        items.append(
            {
                "answerable": answerable,
                "category": -1 if answerable else rng.choice([-1, 0, 1, 1, 2]),
                "refused": after_refused,
                # the judge's invariants: correct answers are not refusals; unanswerable correct == refused
                "correct": (not after_refused and rng.random() < 0.6) if answerable else after_refused,
                "reason_ok": after_refused and rng.random() < 0.7,
                "before_refused": before_refused,
                "before_correct": (not before_refused and rng.random() < 0.6) if answerable
                else before_refused,
                "after_refused": after_refused,
                "after_correct": (not after_refused and rng.random() < 0.6) if answerable else after_refused,
                # ties on purpose: scores on a coarse grid
                "score": round(rng.gauss(-2.0 + (0.0 if answerable else 0.8), 1.0), 1),
            }
        )
    return items


def tensors(batch: list[dict]) -> dict[str, torch.Tensor]:
    out = {
        key: torch.tensor([i[key] for i in batch], dtype=torch.bool) for key in batch[0] if key != "category"
    }
    out["category"] = torch.tensor([i["category"] for i in batch], dtype=torch.long)
    out["score"] = torch.tensor([i["score"] for i in batch], dtype=torch.float32)
    return out


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        got = actual[key].item()
        assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, abs=1e-6), (
            key,
            got,
            value,
        )


def split_batches(rng: random.Random, items: list[dict]) -> list[list[dict]]:
    batches, start = [], 0
    while start < len(items):
        size = rng.randint(1, 17)
        batches.append(items[start : start + size])
        start += size
    return batches


# ---------------------------------------------------------------------------------------------------------
# Class versus reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_answerability_metrics_match_reference(seed):
    rng = random.Random(seed)
    items = random_items(rng, rng.randint(20, 80), p_answerable=[0.5, 0.2, 0.8, 0.5, 1.0, 0.0][seed])
    metric = AnswerabilityMetrics()
    for batch in split_batches(rng, items):
        t = tensors(batch)
        metric.update(
            t["refused"], t["correct"], t["answerable"], category=t["category"], reason_ok=t["reason_ok"]
        )
    result = metric.compute()
    assert set(result) == SINGLE_KEYS
    assert_same(result, reference_single(items))
    metric.reset()
    assert math.isnan(metric.compute()["overall_accuracy"].item())


@pytest.mark.parametrize("seed", range(6))
def test_paired_metrics_match_reference(seed):
    rng = random.Random(100 + seed)
    items = random_items(rng, rng.randint(20, 80), p_answerable=[0.5, 0.2, 0.8, 0.5, 1.0, 0.0][seed])
    metric = PairedAnswerabilityMetrics()
    for batch in split_batches(rng, items):
        t = tensors(batch)
        metric.update(
            t["before_refused"], t["before_correct"], t["after_refused"], t["after_correct"], t["answerable"]
        )
    assert_same(metric.compute(), reference_paired(items))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_reference(seed):
    rng = random.Random(200 + seed)
    items = random_items(rng, rng.randint(20, 80), p_answerable=[0.5, 0.2, 0.8, 0.5, 1.0, 0.0][seed])
    metric = AnswerabilityAUROC()
    for batch in split_batches(rng, items):
        t = tensors(batch)
        metric.update(t["score"], t["answerable"], t["category"])
    assert_same(metric.compute(), reference_auroc(items))


def prediction_rows(items: list[dict], paired: bool) -> list[dict]:
    """`random_items` as predictions.jsonl rows: the model after alignment answers as the items' refused,
    correct and reason_ok say, the model before it as their before_* flags; the refusal likelihoods are the
    items' scores (negated for the model before)."""
    rows = []
    for index, item in enumerate(items):
        category = None if item["category"] < 0 else CATEGORIES[item["category"]]
        after = {"response": "r", "refused": item["refused"], "correct": item["correct"],
                 "reason_ok": item["reason_ok"], "refusal_likelihood": item["score"]}
        row = {"id": f"i{index}", "answerable": item["answerable"], "category": category}
        if paired:
            before = {"response": "r", "refused": item["before_refused"], "correct": item["before_correct"],
                      "reason_ok": False, "refusal_likelihood": -item["score"]}
            rows.append({**row, "before": before, "after": after})
        else:
            rows.append({**row, **after})
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_metrics_from_predictions_match_reference(seed):
    """The scores recomputed from prediction rows are the plain-Python references' (and so the classes')."""
    rng = random.Random(400 + seed)
    items = random_items(rng, rng.randint(20, 80), p_answerable=[0.5, 0.2, 0.8, 0.5, 1.0, 0.0][seed])
    single = metrics_from_predictions(prediction_rows(items, paired=False))
    assert list(single) == ["after"]
    expected = {**reference_single(items), **reference_auroc(items)}
    assert_same({k: torch.tensor(v) for k, v in single["after"].items()}, expected)

    paired = metrics_from_predictions(prediction_rows(items, paired=True))
    assert list(paired) == ["before", "after", "alignment"]
    assert_same({k: torch.tensor(v) for k, v in paired["after"].items()}, expected)
    before_items = [{**i, "refused": i["before_refused"], "correct": i["before_correct"], "reason_ok": False,
                     "score": -i["score"]} for i in items]
    assert_same({k: torch.tensor(v) for k, v in paired["before"].items()},
                {**reference_single(before_items), **reference_auroc(before_items)})
    after_items = [{**i, "after_correct": i["correct"]} for i in items]  # the rows' after/correct
    assert_same({k: torch.tensor(v) for k, v in paired["alignment"].items()}, reference_paired(after_items))


def test_metrics_from_predictions_without_likelihoods_has_no_auroc():
    rows = prediction_rows(random_items(random.Random(7), 12), paired=False)
    rows[3]["refusal_likelihood"] = None
    assert not any("auroc" in key for key in metrics_from_predictions(rows)["after"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metrics_on_a_gpu_match_reference():
    """As `test` uses them: the metrics moved to the GPU with the module, inputs made on the GPU."""
    rng = random.Random(300)
    items = random_items(rng, 60, p_answerable=0.5)
    single, paired, auroc = (m.to("cuda") for m in (AnswerabilityMetrics(), PairedAnswerabilityMetrics(),
                                                     AnswerabilityAUROC()))
    for batch in split_batches(rng, items):
        t = {name: value.to("cuda") for name, value in tensors(batch).items()}
        single.update(t["refused"], t["correct"], t["answerable"], t["category"], t["reason_ok"])
        paired.update(
            t["before_refused"], t["before_correct"], t["after_refused"], t["after_correct"], t["answerable"]
        )
        auroc.update(t["score"], t["answerable"], t["category"])
    references = ((single, reference_single), (paired, reference_paired), (auroc, reference_auroc))
    for metric, reference in references:
        result = metric.compute()
        assert all(value.device.type == "cuda" for value in result.values()), metric
        assert_same(result, reference(items))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_auroc_extremes_and_without_category():
    metric = AnswerabilityAUROC()
    metric.update(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([True, True, False, False]))
    assert metric.compute() == {"answerability_auroc": torch.tensor(1.0)}
    metric = AnswerabilityAUROC()
    metric.update(torch.tensor([-1.0, -1.0, float("-inf")]), torch.tensor([False, True, True]))
    assert metric.compute()["answerability_auroc"].item() == pytest.approx(0.75)
    assert math.isnan(AnswerabilityAUROC().compute()["answerability_auroc"].item())
    # Scores far outside [0, 1] keep their order: unanswerable 50 > answerable 40 and -200 > -300 count as
    # wins (a sigmoid would tie both pairs in floating point: 0.5).
    metric = AnswerabilityAUROC()
    metric.update(torch.tensor([40.0, 50.0, -300.0, -200.0]), torch.tensor([True, False, True, False]))
    assert metric.compute()["answerability_auroc"].item() == 0.75
    with pytest.raises(ValueError, match="NaN"):
        AnswerabilityAUROC().update(torch.tensor([float("nan")]), torch.tensor([True]))


def test_empty_denominators_are_nan():
    metric = AnswerabilityMetrics()
    metric.update(torch.tensor([True, False]), torch.tensor([False, True]), torch.tensor([True, True]))
    result = metric.compute()
    assert result["answerable_accuracy"].item() == 0.5 and result["over_refusal_rate"].item() == 0.5
    for key in (
        "unanswerable_accuracy",
        "unanswerable_recall",
        "reason_accuracy",
        "unanswerable_accuracy/object",
    ):
        assert math.isnan(result[key].item()), key
    assert result["unanswerable_precision"].item() == 0.0  # one refusal, no unanswerable item
    paired = PairedAnswerabilityMetrics()
    paired.update(*(torch.tensor([False]),) * 4, torch.tensor([True]))
    result = paired.compute()
    assert (
        math.isnan(result["excessive_refusal"].item()) and result["excessive_refusal/denominator"].item() == 0
    )


def test_unanswerable_correct_is_taken_as_refused():
    """For an unanswerable item correct means refused: a stray `correct` flag cannot inflate a score."""
    metric = AnswerabilityMetrics()
    metric.update(torch.tensor([False]), torch.tensor([True]), torch.tensor([False]), torch.tensor([0]))
    assert metric.compute()["overall_accuracy"].item() == 0.0


def test_update_validates_inputs():
    metric = AnswerabilityMetrics()
    with pytest.raises(ValueError, match="expected 2"):
        metric.update(torch.tensor([True]), torch.tensor([True, False]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="category ids"):
        metric.update(torch.tensor([True]), torch.tensor([True]), torch.tensor([False]), torch.tensor([3]))
    with pytest.raises(ValueError, match="booleans"):
        metric.update(torch.tensor([0.5]), torch.tensor([True]), torch.tensor([False]))


def test_category_ids():
    assert category_ids([None, "object", "relation", "attribute"]).tolist() == [-1, 0, 1, 2]
    with pytest.raises(ValueError, match="unknown category"):
        category_ids(["colour"])


def test_metric_contract():
    for cls in (AnswerabilityMetrics, PairedAnswerabilityMetrics, AnswerabilityAUROC):
        assert cls.is_differentiable is False and cls.full_state_update is False
        metric = cls()
        for name, reduce in metric._reductions.items():
            default = metric._defaults[name]
            if isinstance(default, torch.Tensor):
                assert reduce.__name__ == "dim_zero_sum" and not default.is_floating_point(), name
            else:
                assert reduce.__name__ == "dim_zero_cat", name  # float score lists (AUROC only)
        assert metric.state_dict() == {}  # states are not checkpointed by default
    assert AnswerabilityAUROC.higher_is_better is True
    assert {k for k in HIGHER_IS_BETTER if "auroc" not in k} >= SINGLE_KEYS


def test_forward_returns_batch_scores_and_accumulates():
    metric = AnswerabilityMetrics()
    batch = metric(torch.tensor([False, True]), torch.tensor([True, False]), torch.tensor([True, False]))
    assert batch["overall_accuracy"].item() == 1.0
    metric(torch.tensor([True]), torch.tensor([False]), torch.tensor([True]))
    assert metric.compute()["overall_accuracy"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("module", [metrics.answerability, metrics.refusal, metrics.judges])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
