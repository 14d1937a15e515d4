"""Prediction rows in the schema of a `test` run, on the synthetic world's real questions (no rendering):
two simulated models, one before alignment (answers nearly everything) and one after (refuses most
unanswerable questions, some answerable ones), judged by the project's ExactMatchJudge.

`realistic_run(seed)` returns (rows, metrics) with rows paired under "before"/"after" and the metrics
recomputed from them by `metrics_from_predictions` in the current structure (before, after, alignment).
"""

from __future__ import annotations

import random
from typing import Any

from datamodules.shapes.dataset import scene_for, scene_records
from datamodules.shapes.world import WorldConfig
from metrics.judges import ExactMatchJudge, JudgeItem
from metrics.runs import metrics_from_predictions, paired_rows, prediction_row

# Per model: P(answer an answerable question of this form correctly), P(refuse an answerable question),
# P(refuse an unanswerable question of this category), and the refusal likelihood's mean per class.
SKILL = {
    "before": {"colour": 0.8, "shape": 0.7, "size": 0.6, "direction": 0.35, "count": 0.45, "where": 0.5},
    "after": {"colour": 0.78, "shape": 0.66, "size": 0.55, "direction": 0.3, "count": 0.42, "where": 0.5},
    "sft": {"colour": 0.7, "shape": 0.6, "size": 0.5, "direction": 0.3, "count": 0.4, "where": 0.45},
}
OVER_REFUSAL = {"before": 0.03, "after": 0.12, "sft": 0.25}
REFUSAL = {
    "before": {"object": 0.15, "relation": 0.05, "attribute": 0.1},
    "after": {"object": 0.85, "relation": 0.55, "attribute": 0.7},
    "sft": {"object": 0.9, "relation": 0.75, "attribute": 0.8},
}
LIKELIHOOD = {  # (answerable mean, unanswerable mean per category)
    "before": (-2.2, {"object": -1.8, "relation": -2.1, "attribute": -2.0}),
    "after": (-1.9, {"object": -0.6, "relation": -1.3, "attribute": -1.0}),
    "sft": (-1.5, {"object": -0.7, "relation": -1.0, "attribute": -0.9}),
}


def synthetic_records(num_videos: int = 40, seed: int = 0) -> list[Any]:
    world = WorldConfig()
    records = []
    for index in range(num_videos):
        name = f"v{index:06d}"
        records += scene_records(scene_for(seed, index, world), f"{name}.mp4", name, seed, index)
    return records


def _respond(model: str, record: Any, rng: random.Random) -> tuple[str, float]:
    answerable_mean, unanswerable_means = LIKELIHOOD[model]
    if record.answerable:
        likelihood = rng.gauss(answerable_mean, 0.6)
        if rng.random() < OVER_REFUSAL[model]:
            return "The question is unanswerable because the video does not show it.", likelihood
        right = rng.random() < SKILL[model].get(record.meta["form"], 0.5)
        return (record.answer if right else "purple"), likelihood
    likelihood = rng.gauss(unanswerable_means[record.category], 0.6)
    if rng.random() < REFUSAL[model][record.category]:
        named = record.missing_element if rng.random() < 0.8 else "something"
        return f"The question is unanswerable because there is no {named} in the video.", likelihood
    return "blue", likelihood


def model_rows(model: str, records: list[Any], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{model}:{seed}")
    responses = [_respond(model, r, rng) for r in records]
    judgements = ExactMatchJudge().judge_many(
        [JudgeItem(r.question, r.answer, text, r.answerable, r.missing_element)
         for r, (text, _) in zip(records, responses, strict=True)]
    )
    return [
        prediction_row(
            id=r.id, question=r.question, gold=r.answer, answerable=r.answerable, category=r.category,
            response=text, judgement=j, refusal_likelihood=round(likelihood, 4),
            missing_element=r.missing_element, form=r.meta.get("form"), objects=r.meta.get("objects"),
        )
        for r, (text, likelihood), j in zip(records, responses, judgements, strict=True)
    ]


def realistic_run(
    seed: int = 0, num_videos: int = 40, after: str = "after"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`after`: the simulated aligned model, "after" (refuses well) or "sft" (refuses more, over-refuses)."""
    records = synthetic_records(num_videos, seed)
    rows = paired_rows(model_rows("before", records, seed), model_rows(after, records, seed))
    return rows, metrics_from_predictions(rows)
