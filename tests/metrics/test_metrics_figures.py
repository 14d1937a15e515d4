"""Report figures: what each one draws agrees with the scores and the prediction rows it came from; a zero
is drawn, an undefined score says why; files are 800 px wide, written atomically, stale ones removed."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from realistic_rows import realistic_run

from metrics.answerability import CATEGORIES
from metrics.figures import (
    FIGURES,
    Evaluation,
    by_form_figure,
    evaluation_from_combined,
    evaluation_from_run,
    evaluation_from_test,
    main,
    roc_curves,
    scores_figure,
    tradeoff_figure,
    write_figures,
)
from metrics.names import AFTER, ALIGNMENT, BEFORE
from metrics.report import write_reports
from metrics.runs import denominators, form_accuracy, metrics_from_predictions, rows_by_model


@pytest.fixture(scope="module")
def run():
    """(rows, metrics) of a simulated before/after run on the synthetic world's real questions."""
    return realistic_run(seed=0, num_videos=30)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def texts_of(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_roc_auroc_is_the_reported_auroc(run):
    rows, metrics = run
    evaluation = evaluation_from_test(metrics, rows)
    for model in (BEFORE, AFTER):
        for category in (None, *CATEGORIES):
            fpr, tpr, auroc, positives, negatives = roc_curves(evaluation.rows[model], category)
            key = "answerability_auroc" + (f"/{category}" if category else "")
            assert auroc == pytest.approx(metrics[model][key], abs=1e-6), (model, key)
            assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
            assert all(a <= b for a, b in zip(fpr, fpr[1:], strict=False)), "a ROC curve never turns back"
            unanswerable = [r for r in rows if not r["answerable"] and category in (None, r["category"])]
            assert (positives, negatives) == (len(unanswerable), sum(r["answerable"] for r in rows))


def test_roc_takes_minus_infinity_and_needs_both_classes():
    rows = [
        {"answerable": True, "category": None, "refusal_likelihood": float("-inf")},
        {"answerable": True, "category": None, "refusal_likelihood": -3.0},
        {"answerable": False, "category": "object", "refusal_likelihood": -1.0},
        # tied with an answerable item
        {"answerable": False, "category": "object", "refusal_likelihood": -3.0},
    ]
    _, _, auroc, _, _ = roc_curves(rows)
    assert auroc == pytest.approx((1 + 1 + 1 + 0.5) / 4)  # ties count one half, like answerability_auroc
    assert roc_curves(rows, "relation") is None, "no unanswerable relation items"
    assert roc_curves([*rows[:2], {**rows[2], "refusal_likelihood": None}]) is None


def test_denominators_are_zero_exactly_where_a_score_is_undefined(run):
    rows, _ = run
    # A model that never refuses, on items without relation questions: several scores become undefined.
    silent = [
        {**r, BEFORE: {**r[BEFORE], "refused": False}, AFTER: {**r[AFTER], "refused": False}}
        for r in rows if r["category"] != "relation"
    ]
    by_model = rows_by_model(silent)
    metrics = metrics_from_predictions(silent)
    scores = {BEFORE: metrics[BEFORE], AFTER: {**metrics[AFTER], **metrics[ALIGNMENT]}}
    counts = {BEFORE: denominators(by_model[BEFORE]), AFTER: denominators(by_model[AFTER], by_model[BEFORE])}
    for model in (BEFORE, AFTER):
        for key, value in scores[model].items():
            if key.endswith("/denominator"):
                assert counts[model][key.removesuffix("/denominator")] == value, key
            else:
                assert math.isnan(value) == (counts[model][key] == 0), (model, key, value, counts[model][key])
    assert math.isnan(scores[AFTER]["permissiveness"]) and math.isnan(scores[AFTER]["unanswerable_precision"])


def test_scores_figure_draws_zero_and_says_why_a_score_is_na():
    evaluation = Evaluation(
        scores={
            BEFORE: {"answerable_accuracy": 0.5, "over_refusal_rate": 0.0, "unanswerable_accuracy": 0.0},
            # unanswerable_accuracy not computed for this model
            AFTER: {"answerable_accuracy": 0.25, "over_refusal_rate": 0.5},
        },
        alignment={AFTER: {"permissiveness": math.nan, "permissiveness/denominator": 0.0,
                           "excessive_refusal": 0.5, "excessive_refusal/denominator": 2.0}},
        before=BEFORE,
    )
    fig = scores_figure(evaluation)
    higher, lower = fig.axes[:2]
    assert higher.get_title(loc="left").startswith("higher is better")
    assert lower.get_title(loc="left").startswith("lower is better")
    assert [t.get_text() for t in higher.get_yticklabels()] == [
        "answerable_accuracy", "unanswerable_accuracy", "permissiveness\n(before → after)"
    ]
    assert [t.get_text() for t in lower.get_yticklabels()] == [
        "over_refusal_rate", "excessive_refusal\n(before → after)"
    ]
    texts = texts_of(fig)
    assert "n/a: 0 answerable items before refused" in texts
    assert "not computed" in texts
    assert texts.count("0.00") == 2, "a zero is printed, not an empty gap"
    assert {"0.50", "0.25"} <= set(texts)
    widths = sorted(round(p.get_width(), 6) for ax in (higher, lower) for p in ax.patches)
    assert widths == [0.0, 0.0, 0.25, 0.5, 0.5, 0.5], "one bar per defined score, as long as its value"


def test_tradeoff_figure_puts_each_model_at_its_scores_with_arrows_from_before(run):
    rows, metrics = run
    evaluation = evaluation_from_test(metrics, rows)
    nearby = metrics[AFTER]["answerable_accuracy"] + 0.02  # labels of close points must not overprint
    evaluation.scores["sft"] = {**metrics[AFTER], "answerable_accuracy": nearby}
    fig = tradeoff_figure(evaluation)
    ax = fig.axes[0]
    big = [float(v) for c in ax.collections if c.get_sizes()[0] == 140 for v in c.get_offsets()[0]]
    axes = ("answerable_accuracy", "unanswerable_accuracy")
    expected = [s[k] for s in evaluation.scores.values() for k in axes]
    assert big == pytest.approx(expected)
    arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None and a.get_text() == ""]
    assert len(arrows) == 2, "one arrow from before to each other model"
    marks = [c for c in ax.collections if c.get_sizes()[0] == 46]
    assert len(marks) == 3 * len(CATEGORIES)
    labels = [a for a in ax.texts if a.get_text().startswith(("before", "after", "sft"))]
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in labels]
    assert len(boxes) == 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "labels overprint"


def test_tradeoff_and_by_form_need_something_to_draw():
    assert tradeoff_figure(Evaluation(scores={AFTER: {"answerable_accuracy": math.nan}})) is None
    rows = [{"id": "a", "answerable": True, "refused": False, "correct": True}]
    assert by_form_figure(Evaluation(scores={AFTER: {}}, rows={AFTER: rows})) is None


def test_by_form_figure_shows_accuracy_per_form(run):
    rows, metrics = run
    evaluation = evaluation_from_test(metrics, rows)
    fig = by_form_figure(evaluation)
    answerable_ax = fig.axes[0]
    expected = form_accuracy(evaluation.rows[AFTER], answerable=True)
    labels = [t.get_text() for t in answerable_ax.get_xticklabels()]
    assert labels == [f"{form}\n(n={n})" for form, (_, n) in expected.items()]
    heights = [round(p.get_height(), 6) for p in answerable_ax.patches][len(expected):]  # after's bars
    assert heights == [round(a, 6) for a, _ in expected.values()]
    colour = [r for r in evaluation.rows[AFTER] if r["answerable"] and r["form"] == "colour"]
    assert expected["colour"] == (sum(r["correct"] for r in colour) / len(colour), len(colour))


def test_write_figures_are_800_px_wide_and_stale_ones_go(tmp_path, run):
    rows, metrics = run
    written = write_figures(tmp_path, evaluation_from_test(metrics, rows))
    assert {name: p.name for name, p in written.items()} == FIGURES
    for path in written.values():
        assert png_size(path)[0] == 800
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"
    again = write_figures(tmp_path, evaluation_from_test(metrics))  # scores only: no rows
    assert set(again) == {"tradeoff", "scores"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png", "tradeoff.png"]


def test_paired_and_single_runs_give_their_models(run):
    rows, metrics = run
    current = evaluation_from_test(metrics, rows)
    assert current.before == BEFORE and list(current.alignment) == [AFTER]
    flat = [{**{k: v for k, v in r.items() if k not in (BEFORE, AFTER)}, **r[AFTER]} for r in rows]
    single = evaluation_from_test({AFTER: metrics[AFTER]}, flat)
    assert single.models == [AFTER] and single.before is None and not single.alignment


def test_cli_redraws_a_run_folder_and_names_a_bad_record(tmp_path, run, capsys):
    rows, _ = run
    write_reports(tmp_path / "run", rows)
    for name in FIGURES.values():
        (tmp_path / "run" / name).unlink(missing_ok=True)
    assert main([str(tmp_path / "run"), "--title", "redrawn"]) == 0
    assert sorted(Path(p).name for p in capsys.readouterr().out.split()) == sorted(FIGURES.values())
    assert evaluation_from_run(tmp_path / "run").title == "Answerability report: run"

    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    broken = json.loads(lines[3])
    del broken[BEFORE]["refused"]
    lines[3] = json.dumps(broken)
    (tmp_path / "run" / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "predictions.jsonl" in error and repr(broken["id"]) in error and "'before.refused'" in error
    assert main([str(tmp_path / "missing")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_combined_report_figures_use_each_runs_predictions(tmp_path):
    from metrics.combine import combine, write_combined

    runs = {}
    for name, after in (("sft", "sft"), ("dpo", "after")):
        rows, _ = realistic_run(seed=0, num_videos=12, after=after)
        write_reports(tmp_path / name, rows)
        runs[name] = tmp_path / name
    report = combine(runs)
    evaluation = evaluation_from_combined(report, runs)
    assert evaluation.models == [BEFORE, "sft", "dpo"] and list(evaluation.alignment) == ["sft", "dpo"]
    assert set(evaluation.rows) == {BEFORE, "sft", "dpo"}
    assert "permissiveness" not in evaluation.scores["sft"], "alignment scores are kept apart"
    sft_auroc = roc_curves(evaluation.rows["sft"])[2]
    assert sft_auroc == pytest.approx(report["sft"]["answerability_auroc"], abs=1e-6)

    write_combined(tmp_path / "out", report, runs)
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == set(FIGURES.values())
    write_combined(tmp_path / "scores_only", report)
    assert {p.name for p in (tmp_path / "scores_only").glob("*.png")} == {"report.png", "tradeoff.png"}
