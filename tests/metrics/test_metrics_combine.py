"""The demo's combined report: the model before alignment from the first run, each aligned model's after and
alignment scores."""

import json
import math

import pytest

from datamodules.records import write_predictions
from metrics.combine import TABLE_KEYS, combine, main, write_combined
from metrics.runs import RunError

IDS = ("q1", "q2", "q3", "q4")


def _write_run(folder, before_accuracy, after_accuracy, discretion, ids=IDS):
    """A tested run folder: metrics.json and a predictions.jsonl of the items `ids`."""
    folder.mkdir(parents=True)
    metrics = {
        "before": {"answerable_accuracy": before_accuracy, "unanswerable_accuracy/object": 0.1},
        "after": {"answerable_accuracy": after_accuracy, "unanswerable_accuracy/object": 0.9},
        "alignment": {"excessive_refusal": 0.05, "permissiveness": None, "discretion": discretion},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    model = {"refused": False, "correct": True}
    write_predictions(folder / "predictions.jsonl", [
        {"id": i, "answerable": n % 2 == 0, "category": None if n % 2 == 0 else "object", "before": model,
         "after": model} for n, i in enumerate(ids)
    ])


def _one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_combine_takes_before_from_the_first_run_and_keeps_nan(tmp_path):
    _write_run(tmp_path / "sft", 0.8, 0.78, 0.9)
    _write_run(tmp_path / "dpo", 0.81, 0.79, 0.7)
    report = combine({"sft": tmp_path / "sft", "dpo": tmp_path / "dpo"}, seconds=12.0)
    assert list(report) == ["before", "sft", "dpo", "seconds"]
    assert report["before"]["answerable_accuracy"] == 0.8
    assert report["sft"]["answerable_accuracy"] == 0.78 and report["dpo"]["answerable_accuracy"] == 0.79
    assert report["sft"]["discretion"] == 0.9 and report["dpo"]["discretion"] == 0.7
    assert math.isnan(report["sft"]["permissiveness"])
    table = write_combined(tmp_path / "out", report)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["sft"]["permissiveness"] is None and saved["seconds"] == 12.0
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    assert table.splitlines()[0].count("|") == len(TABLE_KEYS) + 2
    assert "| sft |" in table and "| before |" in table


def test_cli_errors_name_the_run(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o"), "--run", f"sft={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "metrics.json").write_text(json.dumps({"after": {"answerable_accuracy": 1.0}}))
    assert main(["--out", str(tmp_path / "o"), "--run", f"x={tmp_path / 'single'}"]) == 2
    assert "no scores before alignment" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", [None, 5.0])
def test_report_md_footer(tmp_path, seconds):
    _write_run(tmp_path / "sft", 0.5, 0.5, 0.5)
    write_combined(tmp_path / "out", combine({"sft": tmp_path / "sft"}, seconds))
    text = (tmp_path / "out" / "report.md").read_text()
    assert ("Whole demo: 5 s." in text) == (seconds is not None)


@pytest.mark.parametrize(
    "content", ['{"before": {"answerable_accuracy": 0.8}, "af', "", "[1]", '{"before": {"a": "x"}}']
)
def test_a_damaged_metrics_json_is_one_line_naming_it(tmp_path, capsys, content):
    _write_run(tmp_path / "sft", 0.8, 0.78, 0.9)
    (tmp_path / "sft" / "metrics.json").write_text(content)
    assert main(["--out", str(tmp_path / "out"), "--run", f"sft={tmp_path / 'sft'}"]) == 2
    error = _one_line_error(capsys)
    assert f"{tmp_path / 'sft' / 'metrics.json'}: " in error and "rerun `python main.py test`" in error
    assert not (tmp_path / "out" / "report.json").exists()


def test_run_and_out_arguments_are_one_line_naming_them(tmp_path, capsys):
    _write_run(tmp_path / "sft", 0.8, 0.78, 0.9)
    out = ["--out", str(tmp_path / "out")]
    for runs, named in (
        (["--run", str(tmp_path / "sft")], f"--run {tmp_path / 'sft'}: expected NAME=RUN_DIR"),
        (["--run", f"={tmp_path / 'sft'}"], "expected NAME=RUN_DIR"),
        (["--run", "sft="], "--run sft=: expected NAME=RUN_DIR"),
        (["--run", f"a={tmp_path / 'sft'}", "--run", f"a={tmp_path / 'sft'}"], "'a' is given twice"),
        (["--run", f"before={tmp_path / 'sft'}"], "'before' is a key of report.json itself"),
    ):
        assert main(out + runs) == 2, runs
        assert named in _one_line_error(capsys)
    (tmp_path / "file").write_text("mine\n")
    for target, named in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "a file")):
        assert main(["--out", str(target), "--run", f"sft={tmp_path / 'sft'}"]) == 2
        error = _one_line_error(capsys)
        assert f"--out {target}: " in error and named in error and "name a folder" in error
    assert (tmp_path / "file").read_text() == "mine\n"
    assert main(out + ["--run", f"sft={tmp_path / 'sft'}"]) == 0, "the check can pass"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]


def test_runs_scored_on_different_items_are_refused(tmp_path, capsys):
    _write_run(tmp_path / "sft", 0.8, 0.78, 0.9)
    _write_run(tmp_path / "dpo", 0.8, 0.79, 0.7, ids=("q1", "q2", "q3", "other"))
    _write_run(tmp_path / "kto", 0.8, 0.79, 0.7, ids=tuple(reversed(IDS)))
    args = ["--out", str(tmp_path / "out"), "--run", f"sft={tmp_path / 'sft'}"]
    assert main([*args, "--run", f"dpo={tmp_path / 'dpo'}"]) == 2
    error = _one_line_error(capsys)
    assert f"'sft' ({tmp_path / 'sft'}) and 'dpo' ({tmp_path / 'dpo'})" in error and ": 2 ids" in error
    assert not (tmp_path / "out").exists()
    assert main([*args, "--run", f"kto={tmp_path / 'kto'}"]) == 0, "the same items in another order"
    assert "| kto |" in capsys.readouterr().out
    with pytest.raises(RunError, match="2 ids"):
        combine({"kto": tmp_path / "kto", "dpo": tmp_path / "dpo"})

    (tmp_path / "dpo" / "predictions.jsonl").unlink()
    assert main([*args, "--run", f"dpo={tmp_path / 'dpo'}"]) == 2
    assert f"{tmp_path / 'dpo' / 'predictions.jsonl'}: missing" in _one_line_error(capsys)
