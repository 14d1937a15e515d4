"""W&B charts and tables of a test run, logged offline and read back from the run's own files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from realistic_rows import realistic_run
from wandb_records import read_run, run_file

from metrics.answerability import CATEGORIES
from metrics.figures import evaluation_from_test, roc_curves, write_figures
from metrics.names import AFTER, BEFORE
from metrics.runs import form_accuracy
from metrics.wandb_charts import ROC_GROUPS, chart_keys, chart_payload, log_to_wandb

pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def run():
    return realistic_run(seed=1, num_videos=20)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An offline W&B run in tmp_path; yields it and finishes it when the test is done."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_run = wandb.init(project="answerability-tests", dir=str(tmp_path))
    yield wandb_run
    wandb_run.finish()


def table_file(run_dir: Path, summary: dict, key: str) -> dict:
    """The JSON of the table logged under `key`: the media file its summary entry points at."""
    assert summary[key]["_type"] == "table-file", summary[key]
    return json.loads((run_dir / "files" / summary[key]["path"]).read_text())


def test_charts_and_tables_are_in_the_offline_run(tmp_path, offline, run):
    import wandb

    rows, metrics = run
    figures = write_figures(tmp_path / "report", evaluation_from_test(metrics, rows))
    log_to_wandb(offline, metrics, rows, image_path=figures["scores"])  # finds the other figures beside it
    run_dir = Path(offline.dir).parent
    offline.finish()
    wandb.teardown()  # closes the run file (see tests/conftest.py: lora_dpo_run)
    logged = read_run(run_file(tmp_path))

    keys = chart_keys("test")
    for group in ROC_GROUPS:
        key = keys[f"roc/{group}"]
        spec = logged.config["_wandb"]["visualize"][key]["panel_config"]
        assert spec["panelDefId"] == "wandb/area-under-curve/v0", spec
        assert f"{key}_table" in logged.summary
    for key, spec in (("scores/higher_is_better", "bar"), ("scores/lower_is_better", "bar"),
                      ("tradeoff", "scatter")):
        assert f"{keys[key]}_table" in logged.summary, key
        panel = logged.config["_wandb"]["visualize"][keys[key]]["panel_config"]
        assert panel["panelDefId"] == f"wandb/{spec}/v0"
    for key in ("scores_table", "by_category", "by_form"):
        assert logged.summary[keys[key]]["_type"] == "table-file", key
    for key in ("figures/tradeoff", "figures/roc", "figures/by_form"):
        assert logged.summary[keys[key]]["_type"] == "image-file", key
    assert "test/predictions" in logged.summary and "test/report" in logged.summary
    accuracy = metrics[AFTER]["answerable_accuracy"]
    assert logged.summary["test/after/answerable_accuracy"] == pytest.approx(accuracy)

    # The ROC table holds each model's curve, named with its AUROC.
    evaluation = evaluation_from_test(metrics, rows)
    roc = table_file(run_dir, logged.summary, f"{keys['roc/object']}_table")
    assert roc["columns"] == ["class", "fpr", "tpr"]
    for model in (BEFORE, AFTER):
        fpr, tpr, auroc, _, _ = roc_curves(evaluation.rows[model], "object")
        assert auroc == pytest.approx(metrics[model]["answerability_auroc/object"], abs=1e-6)
        points = [v for row in roc["data"] if row[0] == f"{model} (AUROC {auroc:.2f})" for v in row[1:]]
        assert points == pytest.approx([v for p in zip(fpr, tpr, strict=True) for v in p])

    by_form = table_file(run_dir, logged.summary, keys["by_form"])
    expected = form_accuracy(evaluation.rows[AFTER], answerable=False)
    got = {row[1]: (row[4], row[3]) for row in by_form["data"] if row[0] == AFTER and not row[2]}
    assert got.keys() == expected.keys()
    assert all(got[f][1] == expected[f][1] and got[f][0] == pytest.approx(expected[f][0]) for f in got), got

    by_category = table_file(run_dir, logged.summary, keys["by_category"])
    assert len(by_category["data"]) == 2 * len(CATEGORIES)


def test_undefined_scores_are_none_with_a_zero_denominator_and_an_n_a_bar(run):
    rows, metrics = run
    silent = [{**r, AFTER: {**r[AFTER], "refused": False}} for r in rows]
    metrics = {**metrics, AFTER: {**metrics[AFTER], "unanswerable_precision": math.nan}}
    payload = chart_payload(metrics, silent)
    table = payload["test/scores_table"]
    rows_by_key = {(r[0], r[2]): r for r in table.data}
    score, better, model, value, n, counts = rows_by_key[("unanswerable_precision", AFTER)]
    assert (value, n, counts) == (None, 0, "refusals")
    assert better == "higher"
    assert rows_by_key[("over_refusal_rate", AFTER)][1] == "lower"
    bars = payload["test/scores/higher_is_better"].table.data
    labels = {label: value for label, value in bars}
    assert labels[f"unanswerable_precision · {AFTER}: n/a (0 refusals)"] == 0.0
    assert f"unanswerable_precision · {AFTER}" not in labels, "an undefined score does not pass for a zero"
    assert [f"answerable_accuracy · {BEFORE}", metrics[BEFORE]["answerable_accuracy"]] in bars


def test_a_single_model_without_likelihoods_logs_no_roc(run):
    rows, metrics = run
    single = [
        {**{k: v for k, v in r.items() if k not in (BEFORE, AFTER)}, **r[AFTER], "refusal_likelihood": None}
        for r in rows
    ]
    payload = chart_payload({AFTER: metrics[AFTER]}, single, prefix="val")
    assert not any(key.startswith("val/roc/") for key in payload)
    assert {"val/scores_table", "val/tradeoff", "val/by_form"} <= set(payload)
    assert {row[2] for row in payload["val/scores_table"].data} == {AFTER}


def test_a_category_without_items_gets_an_empty_roc_chart_titled_n_a(run):
    """As on a small test set without relation questions: the chart's key is still logged, empty and n/a."""
    rows, metrics = run
    no_relations = [r for r in rows if r["answerable"] or r["category"] != "relation"]
    payload = chart_payload(metrics, no_relations)
    relation = payload["test/roc/relation"]
    assert relation.table.data == []
    assert relation.spec.string_fields["title"].endswith("(n/a: no such items)")
    obj = payload["test/roc/object"]
    assert obj.table.data and "n/a" not in obj.spec.string_fields["title"]
