"""The data CLI: each command on real files, and user errors as exit status 2 with one message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.__main__ import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "datamodules", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def uvqa_item(**changes) -> dict:
    row = {"vid": "abc", "generated_relation": "x near belt", "generated_actor_or_object": "belt",
           "new_question": "What colour is the belt?", "new_answer": "There is no belt."}
    row.update(changes)
    return row


def test_synth_then_stats_in_a_subprocess(tmp_path):
    out = tmp_path / "data"
    done = run_cli("synth", "--out", str(out), "--num-videos", "6", "--seed", "1", "--frames", "3",
                   "--size", "32")
    assert done.returncode == 0, done.stderr
    assert "6 videos" in done.stdout
    for split in ("train", "val", "test"):
        assert f"{split}" in done.stdout
    assert "answerable" in done.stdout and "attribute" in done.stdout
    assert "rendering clips" in done.stderr  # the progress bar
    assert len(list((out / "videos").glob("*.mp4"))) == 6

    done = run_cli("stats", str(out / "train.jsonl"))
    assert done.returncode == 0, done.stderr
    assert "records" in done.stdout and "unanswerable by category" in done.stdout and "shapes" in done.stdout


def test_bad_record_exits_2_with_one_message(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"id": "a", "video": "v.mp4", "question": "Q?", "answer": "A", "answerable": True}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "answerable": "no"}) + "\n")
    done = run_cli("stats", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {path}, line 2: field 'answerable': expected bool, got str"
    ]


def test_missing_file_exits_2(tmp_path):
    done = run_cli("import-uvqa", "--input", str(tmp_path / "none.json"), "--category", "object",
                   "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "none.json" in done.stderr


def test_stats_skip_invalid(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    good = {"id": "a", "video": "v.mp4", "question": "Q?", "answer": "A", "answerable": True}
    path.write_text(json.dumps(good) + "\n{oops\n")
    assert main(["stats", str(path), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "1 records" in out and "skipped 1 invalid lines" in out and "line 2" in out


def test_stats_video_root(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    record = {"id": "a", "video": "../v.mp4", "question": "Q?", "answer": "A", "answerable": True}
    path.write_text(json.dumps(record) + "\n")
    assert main(["stats", str(path)]) == 2
    assert f"outside the video root {tmp_path.resolve()}" in capsys.readouterr().err
    root = tmp_path / "videos"
    assert main(["stats", str(path), "--video-root", str(root)]) == 2
    assert f"outside the video root {root.resolve()}" in capsys.readouterr().err
    path.write_text(json.dumps({**record, "video": "clips/../v.mp4"}) + "\n")
    assert main(["stats", str(path), "--video-root", str(root)]) == 0


def test_import_uvqa(tmp_path, capsys):
    source = tmp_path / "eval_object.json"
    source.write_text(json.dumps([uvqa_item(), uvqa_item(), uvqa_item(vid="def")]))
    out = tmp_path / "uvqa.jsonl"
    assert main(["import-uvqa", "--input", str(source), "--category", "object", "--out", str(out),
                 "--extension", ".avi"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 object records" in printed and "dropped 1 exact duplicates" in printed
    assert [json.loads(line)["video"] for line in out.read_text().splitlines()] == ["abc.avi", "def.avi"]


def test_import_uvqa_bad_item(tmp_path, capsys):
    source = tmp_path / "eval.json"
    source.write_text(json.dumps([uvqa_item(), uvqa_item(new_answer=3)]))
    assert main(["import-uvqa", "--input", str(source), "--category", "object", "--out",
                 str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "item 2" in err and "new_answer" in err


def test_synth_refuses_other_settings_in_the_same_folder(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--num-videos", "2", "--seed", "0", "--frames", "2",
            "--size", "32"]
    assert main(args) == 0
    args[args.index("--seed") + 1] = "1"
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--num-videos", "0", "--seed", "0"]) == 2


def test_synth_split_fractions(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--num-videos", "20", "--seed", "0", "--frames", "2",
            "--size", "32", "--split", "0.9,0.05,0.05"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [18, 1, 1]
    other = [*args[:-1], "0.5,0.6,0.1"]
    other[other.index("--out") + 1] = str(tmp_path / "other")
    assert main(other) == 2, "fractions that do not sum to 1"
    assert "sum" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args[:-1], "0.9,0.1"])


def test_synth_describe_splits(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--num-videos", "6", "--seed", "0", "--frames", "2",
            "--size", "32"]
    forms = {}
    for describe in ("none", "train,test"):
        assert main([*args, "--describe", describe]) == 0
        forms[describe] = {
            split: {json.loads(line)["meta"]["form"] for line in (tmp_path / f"{split}.jsonl").open()}
            for split in ("train", "val", "test")
        }
    dense = {"describe", "verify"}  # the caption and the qualifier checks
    assert not any(dense & f for f in forms["none"].values())
    assert dense <= forms["train,test"]["train"] and dense <= forms["train,test"]["test"]
    assert not dense & forms["train,test"]["val"]
    assert main([*args, "--describe", "train,dev"]) == 2
    assert "describe: unknown split(s) dev" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["import-uvqa", "--input", "x.json", "--category", "colour", "--out", "o"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_every_command_is_registered():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"synth", "import-uvqa", "stats"} <= set(commands)
