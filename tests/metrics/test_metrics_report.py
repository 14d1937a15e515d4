"""Reports: predictions.jsonl, metrics.json, report.md and report.png agree with each other and with the
torchmetrics; files are written atomically; W&B logging works offline; models compare in one table."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

from datamodules import records
from datamodules.records import RecordError, read_predictions, write_predictions
from metrics import report, runs
from metrics.answerability import (
    AnswerabilityAUROC,
    AnswerabilityMetrics,
    PairedAnswerabilityMetrics,
    category_ids,
)
from metrics.judges import ExactMatchJudge, JudgeItem, Judgement
from metrics.names import ALIGNMENT_SCORE_KEYS
from metrics.report import combine_metrics_table, format_report, write_reports
from metrics.runs import flat_metrics, metrics_from_predictions, paired_rows, prediction_row, report_metrics
from metrics.wandb_charts import log_to_wandb

CATEGORY_NAMES = ("object", "relation", "attribute")


def make_records(n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        answerable = rng.random() < 0.5
        category = None if answerable else rng.choice(CATEGORY_NAMES)
        missing = None if answerable else rng.choice(["green triangle", "red circle", "blue square"])
        gold = (
            rng.choice(["red", "two", "left"])
            if answerable
            else f"The question is unanswerable because there is no {missing} in the video."
        )
        records.append(
            {
                "id": f"item-{i:03d}",
                "question": f"Question {i}?",
                "gold": gold,
                "answerable": answerable,
                "category": category,
                "missing_element": missing,
            }
        )
    return records


def respond(record: dict, rng: random.Random) -> str:
    """A fake model: answers right or wrong, or refuses with or without naming the missing element."""
    roll = rng.random()
    if roll < 0.35:
        return record["gold"] if record["answerable"] else "It is blue."
    if roll < 0.55:
        return "blue"
    named = record["missing_element"] or "dog"
    if roll < 0.8:
        return f"The question is unanswerable because there is no {named} in the video."
    return "I cannot tell from the video."


def model_rows(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    judge = ExactMatchJudge()
    responses = [respond(r, rng) for r in records]
    judgements = judge.judge_many(
        [
            JudgeItem(r["question"], r["gold"], resp, r["answerable"], r["missing_element"])
            for r, resp in zip(records, responses, strict=True)
        ]
    )
    return [
        prediction_row(
            id=r["id"],
            question=r["question"],
            gold=r["gold"],
            answerable=r["answerable"],
            category=r["category"],
            missing_element=r["missing_element"],
            response=resp,
            judgement=j,
            refusal_likelihood=round(rng.gauss(-2.0 if r["answerable"] else -1.2, 0.8), 2),
        )
        for r, resp, j in zip(records, responses, judgements, strict=True)
    ]


def torchmetrics_scores(rows: list[dict]) -> dict[str, float]:
    """What the LightningModule does: feed the judged flags to the torchmetrics, two batches."""
    single, auroc = AnswerabilityMetrics(), AnswerabilityAUROC()
    for batch in (rows[:17], rows[17:]):
        flags = {
            k: torch.tensor([r[k] for r in batch]) for k in ("refused", "correct", "answerable", "reason_ok")
        }
        category = category_ids([r["category"] for r in batch])
        single.update(flags["refused"], flags["correct"], flags["answerable"], category, flags["reason_ok"])
        auroc.update(torch.tensor([r["refusal_likelihood"] for r in batch]), flags["answerable"], category)
    return {**single.compute(), **auroc.compute()}


def torchmetrics_paired(rows: list[dict]) -> dict[str, torch.Tensor]:
    metric = PairedAnswerabilityMetrics()
    t = lambda model, key: torch.tensor([r[model][key] for r in rows])  # noqa: E731
    metric.update(
        t("before", "refused"),
        t("before", "correct"),
        t("after", "refused"),
        t("after", "correct"),
        torch.tensor([r["answerable"] for r in rows]),
    )
    return metric.compute()


def parse_report_md(text: str) -> dict[str, list[str]]:
    """Rows of every Markdown table in report.md: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in {"score", "model"} and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


def close(cell: str, value: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == "NaN"
    return cell != "NaN" and abs(float(cell) - value) <= 0.0005 + 1e-9


def same(a, b) -> bool:
    a = float("nan") if a is None else float(a)
    b = float("nan") if b is None else float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-6


@pytest.fixture
def paired_run():
    records = make_records()
    before, after = model_rows(records, seed=1), model_rows(records, seed=2)
    random.Random(3).shuffle(before)  # joined on id, never by row order
    return paired_rows(before, after)


def test_single_model_reports_agree_with_predictions_and_torchmetrics(tmp_path):
    rows = model_rows(make_records(), seed=1)
    paths = write_reports(tmp_path, rows, metrics=report_metrics(torchmetrics_scores(rows)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
        "report.md",
        "report.png",
        "roc.png",
        "tradeoff.png",
    ], "every figure that has something to show (these rows carry no question form: no by_form.png)"
    assert paths["report_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    by_hand = metrics_from_predictions(tmp_path / "predictions.jsonl")
    assert len(read_predictions(paths["predictions"])) == len(rows)
    stored = json.loads(paths["metrics"].read_text())
    assert set(stored) == set(by_hand) == {"after"}
    stored, by_hand = stored["after"], by_hand["after"]
    assert set(stored) == set(by_hand)
    assert all(same(stored[k], by_hand[k]) for k in by_hand), {k: (stored[k], by_hand[k]) for k in by_hand}

    text = paths["report_md"].read_text()
    assert "| score | better | after |" in text and "## Alignment" not in text
    table = parse_report_md(text)
    assert set(by_hand) <= set(table)
    for key, value in by_hand.items():
        assert close(table[key][-1], value), (key, table[key], value)


def test_paired_reports_agree_with_predictions_and_torchmetrics(tmp_path, paired_run):
    rows = paired_run
    metrics = report_metrics(
        after=torchmetrics_scores([{**r, **r["after"]} for r in rows]),
        before=torchmetrics_scores([{**r, **r["before"]} for r in rows]),
        alignment=torchmetrics_paired(rows),
    )
    paths = write_reports(tmp_path, rows, metrics=metrics, title="before vs after")
    lines = paths["predictions"].read_text().splitlines()
    first = json.loads(lines[0])
    assert set(first) == {*runs.ITEM_FIELDS, "before", "after"}
    assert set(first["before"]) == set(first["after"]) == set(runs.MODEL_FIELDS)

    by_hand = metrics_from_predictions(paths["predictions"])
    stored = json.loads(paths["metrics"].read_text())
    assert list(stored) == list(by_hand) == ["before", "after", "alignment"]
    for part in by_hand:
        assert set(stored[part]) == set(by_hand[part]), part
        assert all(same(stored[part][k], by_hand[part][k]) for k in by_hand[part]), part

    text = paths["report_md"].read_text()
    assert text.startswith("# before vs after") and "| score | better | before | after |" in text
    table = parse_report_md(text)
    for key in by_hand["after"]:
        assert close(table[key][1], by_hand["before"][key]), key
        assert close(table[key][2], by_hand["after"][key]), key
    for key in ALIGNMENT_SCORE_KEYS:
        better, value, denominator = table[key]
        assert close(value, by_hand["alignment"][key]), key
        assert int(denominator) == by_hand["alignment"][f"{key}/denominator"]
    assert paths["report_png"].stat().st_size > 1000


def test_metrics_json_writes_nan_as_null_and_report_shows_nan(tmp_path):
    scores = {"answerable_accuracy": torch.tensor(float("nan")), "overall_accuracy": torch.tensor(0.25)}
    metrics = {"after": scores}
    runs.write_metrics_json(tmp_path / "metrics.json", metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "after": {"answerable_accuracy": None, "overall_accuracy": 0.25}
    }
    table = parse_report_md(format_report(metrics))
    assert table["answerable_accuracy"] == ["higher", "NaN"] and table["overall_accuracy"] == [
        "higher",
        "0.250",
    ]


def test_prediction_rows_are_json_safe(tmp_path):
    rows = [
        {"id": "a", "refusal_likelihood": float("nan")},
        {"id": "b", "refusal_likelihood": float("-inf")},
        {"id": "c", "refusal_likelihood": torch.tensor(-1.5)},
    ]
    write_predictions(tmp_path / "p.jsonl", rows)
    back = read_predictions(tmp_path / "p.jsonl")
    assert back[0]["refusal_likelihood"] is None and back[1]["refusal_likelihood"] < -1e300
    assert back[2]["refusal_likelihood"] == -1.5


def test_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old report\n")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.write_report_md(target, {"after": {"overall_accuracy": 0.5}})
    assert target.read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left behind


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_report_files_are_replaced_as_a_set(tmp_path, monkeypatch, paired_run):
    """A write that fails at the last file (a full disk, `ulimit -f`) leaves the previous run's whole set,
    byte for byte; a write that succeeds replaces all of it, a stale figure included."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_reports(run, model_rows(make_records(), seed=1))  # refusal likelihoods: with roc.png
    old = files_of(run)
    new_rows = [{**row, "before": {**row["before"], "refusal_likelihood": None},
                 "after": {**row["after"], "refusal_likelihood": None}} for row in paired_run]
    write_reports(tmp_path / "fresh", new_rows)
    new = files_of(tmp_path / "fresh")
    assert "roc.png" in old and "roc.png" not in new and set(new) & set(old) == set(new)

    fsync, calls = os.fsync, []

    def count(descriptor):
        calls.append(descriptor)
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", count)
    write_reports(tmp_path / "counted", new_rows)
    writes, calls[:] = len(calls), []

    def fail_last(descriptor):
        calls.append(descriptor)
        if len(calls) == writes:
            raise OSError(errno.EFBIG, "File too large")
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fail_last)
    with pytest.raises(OSError, match="File too large"):
        write_reports(run, new_rows)
    assert len(calls) == writes == len(new)
    assert files_of(run) == old
    assert sorted(p.name for p in run.iterdir()) == sorted([*old, "checkpoints"]), "no staging folder left"

    monkeypatch.setattr(os, "fsync", fsync)
    paths = write_reports(run, new_rows)
    assert files_of(run) == new
    assert sorted(p.name for p in run.iterdir()) == sorted([*new, "checkpoints"])
    assert {path.parent for path in paths.values()} == {run} and paths["report_png"].is_file()


def test_report_gives_answerable_accuracy_by_question_form_and_object_count():
    def row(item_id, form, objects, correct, answerable=True):
        category = None if answerable else "object"
        return prediction_row(
            id=item_id, question="q", gold="red", answerable=answerable, category=category, response="red",
            judgement=Judgement(refused=False, correct=correct, reason_ok=False), form=form, objects=objects,
        )

    # colour on 1-object clips: 2 of 2 right; on 2+ object clips 1 of 3 (a 3-object clip counts as 2+);
    # where: 0 of 1; the unanswerable item and the item without a form are not in the table.
    after = [row("a", "colour", 1, True), row("b", "colour", 1, True), row("c", "colour", 2, True),
             row("d", "colour", 2, False), row("e", "colour", 3, False), row("f", "where", 2, False),
             row("g", "colour", 2, False, answerable=False), row("h", None, None, True)]
    text = format_report(metrics_from_predictions(after), rows=after)
    section = text.split("## Answerable accuracy by question form")[1]
    assert "| form | clip | items | after |" in section
    assert "| colour | 1 object | 2 | 1.000 |" in section
    assert "| colour | 2+ objects | 3 | 0.333 |" in section
    assert "| where | 2+ objects | 1 | 0.000 |" in section
    assert section.count("\n| ") == 4  # the header and three groups

    before = [{**r, "correct": not r["correct"]} for r in after]
    paired = paired_rows(before, after)
    assert {r["form"] for r in paired} == {"colour", "where", None} and paired[0]["objects"] == 1
    section = format_report(metrics_from_predictions(paired), rows=paired).split("by question form")[1]
    assert "| form | clip | items | before | after |" in section
    assert "| colour | 2+ objects | 3 | 0.667 | 0.333 |" in section
    assert "by question form" not in format_report(metrics_from_predictions(after[-1:]), rows=after[-1:])


def test_paired_rows_join_on_id_and_name_the_missing_id():
    before = [{"id": "a", "answerable": True, "response": "x"},
              {"id": "b", "answerable": False, "response": "y"}]
    after = [{"id": "b", "answerable": False, "response": "z"},
             {"id": "a", "answerable": True, "response": "w"}]
    joined = paired_rows(before, after)
    assert [(r["id"], r["before"]["response"], r["after"]["response"]) for r in joined] == [
        ("b", "y", "z"),
        ("a", "x", "w"),
    ]
    with pytest.raises(ValueError, match="before predictions: field 'id': no prediction for id 'c'"):
        paired_rows(before, after + [{"id": "c"}])
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        paired_rows(before + before[:1], after)


def test_read_predictions_names_the_bad_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(RecordError, match=r"predictions.jsonl, line 2"):
        read_predictions(path)


def test_metrics_from_predictions_names_a_row_without_judgements():
    """A `predict` file (id and response only) is not a `test` file: one error naming the item and field."""
    with pytest.raises(ValueError, match=r"prediction 'a': field 'answerable': expected true or false"):
        metrics_from_predictions([{"id": "a", "response": "red"}])


def test_combine_metrics_table():
    models = {
        "before": {"answerable_accuracy": 0.5, "over_refusal_rate": 0.1, "unanswerable_accuracy": 0.0},
        "sft": {
            "answerable_accuracy": torch.tensor(0.45),
            "over_refusal_rate": 0.2,
            "unanswerable_accuracy": 0.8,
        },
        "dpo": {"answerable_accuracy": 0.48, "over_refusal_rate": float("nan")},
    }
    text = combine_metrics_table(
        models, keys=["answerable_accuracy", "over_refusal_rate", "unanswerable_accuracy"]
    )
    lines = text.strip().splitlines()
    assert lines[0] == "| model | answerable_accuracy ↑ | over_refusal_rate ↓ | unanswerable_accuracy ↑ |"
    assert lines[3] == "| sft | 0.450 | 0.200 | 0.800 |"
    assert lines[4] == "| dpo | 0.480 | NaN | NaN |"
    assert re.search(r"\| before \| 0\.500", text)
    assert "answerable_accuracy" in combine_metrics_table(models)  # default columns


def test_flat_metrics_leaves_out_or_keeps_undefined_scores():
    metrics = {"after": {"answerable_accuracy": 0.5, "answerability_auroc": float("nan")},
               "alignment": {"permissiveness": float("nan"), "permissiveness/denominator": 0}}
    assert flat_metrics(metrics) == {"test/after/answerable_accuracy": 0.5,
                                     "test/alignment/permissiveness/denominator": 0.0}
    assert flat_metrics(metrics, "val", keep_undefined=True) == {
        "val/after/answerable_accuracy": 0.5, "val/after/answerability_auroc": None,
        "val/alignment/permissiveness": None, "val/alignment/permissiveness/denominator": 0.0}


def test_log_to_wandb_offline(tmp_path, monkeypatch, paired_run):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    paths = write_reports(tmp_path / "run", paired_run)
    metrics = json.loads(paths["metrics"].read_text())
    logger = WandbLogger(project="answerability-tests", save_dir=str(tmp_path), offline=True)
    run = logger.experiment
    try:
        log_to_wandb(logger, metrics, rows=paired_run, image_path=paths["report_png"])
        summary = dict(run.summary)
        for model in ("before", "after"):
            accuracy = metrics[model]["answerable_accuracy"]
            assert summary[f"test/{model}/answerable_accuracy"] == pytest.approx(accuracy)
        denominator = metrics["alignment"]["discretion/denominator"]
        assert summary["test/alignment/discretion/denominator"] == denominator
        assert set(summary) >= set(flat_metrics(metrics, "test"))
    finally:
        run.finish()
    media = {p.parent.name + "/" + p.name.split("_")[0] for p in Path(run.dir).rglob("*") if p.is_file()}
    assert "test/predictions" in media and "test/report" in media, media
    table_file = next(Path(run.dir).rglob("predictions_*.table.json"))
    table = json.loads(table_file.read_text())
    assert {"before/response", "after/response"} <= set(table["columns"])
    assert len(table["data"]) == len(paired_run)
