"""`assemble`: train/val/test by video from per-category and answerable files, the mix, the counts, DPO's
rejected responses, and every bad input as one error naming the file, the record and the field."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from datamodules.__main__ import main
from datamodules.records import QARecord, RecordError, read_records, write_jsonl, write_records
from datamodules.sources.assemble import TO_PREDICT, assemble, label, mix, split_videos
from datamodules.sources.negatives import read_uvqa_with_negatives
from datamodules.sources.uvqa import read_uvqa
from datamodules.sources.videochatgpt import import_videochatgpt

FIXTURES = Path(__file__).parent / "fixtures"
NEGATIVES = {"object": "train_negative_object.json", "relation": "train_negative_relation.json",
             "attribute": "train_negatvie_attribute.json"}


@pytest.fixture
def sources(tmp_path) -> dict[str, list[Path]]:
    """The fixture release imported as the README does: train files with their negatives, the evaluation
    files (the test split) and Video-ChatGPT's answerable questions."""
    folder = tmp_path / "sources"
    inputs, tests = [], []
    for category, negatives in NEGATIVES.items():
        release = FIXTURES / "uvqa_train" / category
        inputs.append(folder / f"train_{category}.jsonl")
        result = read_uvqa_with_negatives(release / f"train_{category}.json", release / negatives, category)
        write_records(inputs[-1], result.records)
        tests.append(folder / f"test_{category}.jsonl")
        write_records(tests[-1], read_uvqa(release / f"small_eval_{category}.json", category).records)
    inputs.append(folder / "answerable.jsonl")
    write_records(inputs[-1], import_videochatgpt(FIXTURES / "videochatgpt" / "VideoInstruct_small.json")[0])
    return {"inputs": inputs, "tests": tests}


def record(id: str, video: str, question: str = "What is it?", answer: str = "A ball.",
           category: str | None = None, **changes) -> QARecord:
    missing = {"missing_element": "dog"} if category else {}
    return QARecord(id=id, video=video, question=question, answer=answer, answerable=category is None,
                    category=category, **missing, **changes)


def written(tmp_path: Path, name: str, *records: QARecord) -> Path:
    path = tmp_path / name
    write_records(path, records)
    return path


def splits_of(out: Path) -> dict[str, list[QARecord]]:
    return {split: read_records(out / f"{split}.jsonl")[0] for split in ("train", "val", "test")}


# ------------------------------------------------------------------------------------------- the split
def test_every_video_is_in_one_split_and_the_test_files_are_the_test_split(tmp_path, sources):
    out = tmp_path / "uvqa"
    summary = assemble(out, sources["inputs"], sources["tests"], val_fraction=0.05, test_fraction=0.02)
    splits = splits_of(out)
    videos = {split: {r.video for r in records} for split, records in splits.items()}
    assert not videos["train"] & videos["val"] and not videos["train"] & videos["test"]
    assert not videos["val"] & videos["test"]
    test_ids = {r.id for r in splits["test"]}
    for path in sources["tests"]:
        assert {r.id for r in read_records(path)[0]} <= test_ids
    # fxObjAAAA04 has a training question and an evaluation one: the training one is held out
    assert summary.held_out == 1
    assert "fxObjAAAA04.mp4" in videos["test"]
    given = sum(len(read_records(p)[0]) for p in sources["inputs"] + sources["tests"])
    assert sum(len(r) for r in splits.values()) == given - summary.held_out
    # each label's group of videos gives one to val and one to test (--test-fraction), keeping two for train
    for split in ("train", "val"):
        assert set(Counter(label(r) for r in splits[split])) == {"answerable", *NEGATIVES}


def test_the_counts_are_printed_per_split_and_category(tmp_path, sources, capsys):
    out = tmp_path / "uvqa"
    code = main(["assemble", "--out", str(out), "--input", *map(str, sources["inputs"]),
                 "--test", *map(str, sources["tests"]), "--unanswerable-fraction", "0.5"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["split", "records", "videos", "answerable", "object", "relation", "attribute",
                                "rejected"]
    manifest = json.loads((out / "assemble.json").read_text())
    for line in lines[2:5]:
        split, *numbers = line.split()
        row = manifest["counts"][split]
        assert [int(n) for n in numbers] == [row[c] for c in ("records", "videos", "answerable", *NEGATIVES,
                                                                "rejected")]
        assert row["records"] == len(read_records(out / f"{split}.jsonl")[0])
    assert any("held out: 1 input records" in line for line in lines)


def test_a_rerun_writes_the_same_bytes_whatever_the_order_of_the_files(tmp_path, sources):
    first, second = tmp_path / "first", tmp_path / "second"
    assemble(first, sources["inputs"], sources["tests"], unanswerable_fraction=0.5, seed=3)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    assemble(first, sources["inputs"], sources["tests"], unanswerable_fraction=0.5, seed=3)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assemble(second, sources["inputs"][::-1], sources["tests"][::-1], unanswerable_fraction=0.5, seed=3)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", TO_PREDICT):
        assert (second / name).read_bytes() == before[name]


def test_another_seed_gives_another_split(tmp_path, sources):
    assemble(tmp_path / "a", sources["inputs"], sources["tests"], seed=0)
    splits = [(tmp_path / "a" / "val.jsonl").read_text()]
    for seed in range(1, 6):
        assemble(tmp_path / str(seed), sources["inputs"], sources["tests"], seed=seed)
        splits.append((tmp_path / str(seed) / "val.jsonl").read_text())
    assert len(set(splits)) > 1


def test_split_videos_cuts_each_group_of_labels():
    records = [record(f"a{i}", f"a{i}.mp4") for i in range(40)]
    records += [record(f"o{i}", f"o{i}.mp4", category="object") for i in range(20)]
    records += [record("r0", "r0.mp4", category="relation")]  # a group of one video stays in train
    split_of = split_videos(records, val_fraction=0.1, test_fraction=0.05, seed=0)
    counts = Counter((video[0], split) for video, split in split_of.items())
    assert counts == {("a", "test"): 2, ("a", "val"): 4, ("a", "train"): 34, ("o", "test"): 1,
                      ("o", "val"): 2, ("o", "train"): 17, ("r", "train"): 1}
    assert split_videos(records[::-1], 0.1, 0.05, 0) == split_of


# --------------------------------------------------------------------------------------------- the mix
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_the_mix_has_the_asked_share_of_unanswerable_records(fraction):
    records = [record(f"a{i}", f"a{i}.mp4") for i in range(30)]
    records += [record(f"{c}{i}", f"{c}{i}.mp4", category=c) for c in NEGATIVES for i in range(10)]
    mixed = mix(records, fraction, random.Random(0), "train")
    share = sum(not r.answerable for r in mixed) / len(mixed)
    assert share == pytest.approx(fraction, abs=0.02)
    assert len({r.id for r in mixed}) == len(mixed)
    if 0 < fraction < 1:  # the smaller side is kept whole, the larger one subsampled
        kept_whole = [r for r in mixed if r.answerable == (fraction <= 0.5)]
        assert len(kept_whole) == 30


def test_the_mix_keeps_one_record_of_each_category_when_it_can():
    records = [record(f"a{i}", f"a{i}.mp4") for i in range(3)]
    records += [record(f"o{i}", f"o{i}.mp4", category="object") for i in range(50)]
    records += [record("r", "r.mp4", category="relation"), record("t", "t.mp4", category="attribute")]
    for seed in range(10):
        mixed = mix(records, 0.5, random.Random(seed), "train")
        assert Counter(label(r) for r in mixed) == {"answerable": 3, "object": 1, "relation": 1,
                                                    "attribute": 1}


def test_the_mix_needs_both_sides(tmp_path):
    with pytest.raises(RecordError, match="the train split has no answerable records to mix"):
        mix([record("o", "o.mp4", category="object")], 0.5, random.Random(0), "train")
    assert mix([record("o", "o.mp4", category="object")], 1.0, random.Random(0), "train")


def test_assembled_splits_follow_the_mix(tmp_path, sources):
    assemble(tmp_path / "u", sources["inputs"], sources["tests"], unanswerable_fraction=1.0)
    assert all(not r.answerable for s in ("train", "val") for r in splits_of(tmp_path / "u")[s])
    assemble(tmp_path / "a", sources["inputs"], sources["tests"], unanswerable_fraction=0.0)
    assert all(r.answerable for s in ("train", "val") for r in splits_of(tmp_path / "a")[s])
    # the test split is never mixed
    assert any(not r.answerable for r in splits_of(tmp_path / "a")["test"])


# ------------------------------------------------------------------------------------ DPO's rejected
def test_rejected_responses_from_predictions_for_train_and_val(tmp_path, sources):
    out = tmp_path / "uvqa"
    summary = assemble(out, sources["inputs"], sources["tests"], unanswerable_fraction=0.5)
    pending, _ = read_records(out / TO_PREDICT)
    splits = splits_of(out)
    without = {r.id for split in ("train", "val") for r in splits[split] if r.rejected is None}
    assert {r.id for r in pending} == without
    assert summary.to_predict == len(pending) and {r.answerable for r in pending} == {True}
    assert any(r.id in {p.id for p in pending} for r in splits["val"])
    predictions = tmp_path / "predictions.jsonl"
    write_jsonl(predictions, [{"id": r.id, "response": f"f0 says {r.id}"} for r in pending])

    summary = assemble(out, sources["inputs"], sources["tests"], unanswerable_fraction=0.5,
                       rejected_from=predictions)
    assert summary.from_predictions == len(pending)
    attached = splits_of(out)
    for split in ("train", "val"):
        assert [r.id for r in attached[split]] == [r.id for r in splits[split]]
        for before, after in zip(splits[split], attached[split], strict=True):
            assert after.rejected == (before.rejected or f"f0 says {before.id}")
    assert attached["test"] == splits["test"]
    assert read_records(out / TO_PREDICT)[0] == pending  # the same list, to predict again


def test_a_prediction_of_no_train_or_val_record(tmp_path, sources):
    out = tmp_path / "uvqa"
    assemble(out, sources["inputs"], sources["tests"])
    rows = [{"id": r.id, "response": "x"} for r in read_records(out / TO_PREDICT)[0]]
    test_id = read_records(out / "test.jsonl")[0][0].id
    predictions = tmp_path / "predictions.jsonl"
    write_jsonl(predictions, rows + [{"id": test_id, "response": "x"}])
    with pytest.raises(RecordError) as caught:
        assemble(out, sources["inputs"], sources["tests"], rejected_from=predictions)
    assert str(caught.value) == (f"{predictions}: field 'id': prediction {test_id!r} matches no train or val "
                                 f"record (1 such predictions): was it made on this folder's {TO_PREDICT}?")


def test_a_record_left_without_rejected(tmp_path, sources):
    out = tmp_path / "uvqa"
    assemble(out, sources["inputs"], sources["tests"])
    pending = read_records(out / TO_PREDICT)[0]
    predictions = tmp_path / "predictions.jsonl"
    write_jsonl(predictions, [{"id": r.id, "response": "x"} for r in pending[1:]])
    with pytest.raises(RecordError, match=rf"{predictions}: field 'id': no prediction for train record "
                                          rf"'{pending[0].id}', which has no rejected response of its own"):
        assemble(out, sources["inputs"], sources["tests"], rejected_from=predictions)


# --------------------------------------------------------------------------------------- bad inputs
def test_conflicting_answers_in_two_files(tmp_path):
    first = written(tmp_path, "a.jsonl", record("a1", "v.mp4", "What colour is the dog?", "Brown."))
    second = written(tmp_path, "b.jsonl", record("b1", "v.mp4", "What  colour is the DOG?", "Black."))
    with pytest.raises(RecordError) as caught:
        assemble(tmp_path / "out", [first, second], test_fraction=0.1)
    assert str(caught.value) == (f"{second}: field 'answer': record 'b1' answers the question 'What  colour "
                                 f"is the DOG?' about video 'v.mp4' otherwise than record 'a1' of {first}")


def test_conflict_with_the_test_files(tmp_path):
    train = written(tmp_path, "train.jsonl", record("a1", "v.mp4", "Is there a dog?", "Yes."),
                    record("a2", "w.mp4"))
    test = written(tmp_path, "test.jsonl", record("t1", "v.mp4", "Is there a dog?",
                                                  "The question is unanswerable.", category="object"))
    with pytest.raises(RecordError, match=rf"{train}: field 'answer': record 'a1' .* record 't1' of {test}"):
        assemble(tmp_path / "out", [train], [test])


def test_agreeing_copies_in_two_files_are_dropped_and_counted(tmp_path):
    first = written(tmp_path, "a.jsonl", *[record(f"a{i}", f"v{i}.mp4") for i in range(4)])
    second = written(tmp_path, "b.jsonl", record("b1", "v1.mp4", "what is  it?", "a ball."),
                     record("b2", "w.mp4"))
    summary = assemble(tmp_path / "out", [first, second], test_fraction=0.2)
    assert summary.duplicates == 1
    ids = {r.id for records in splits_of(tmp_path / "out").values() for r in records}
    assert ids == {"a0", "a1", "a2", "a3", "b2"}


def test_duplicate_ids_across_inputs(tmp_path):
    first = written(tmp_path, "a.jsonl", record("x", "v.mp4"), record("y", "w.mp4"))
    second = written(tmp_path, "b.jsonl", record("x", "u.mp4", "Who is there?"))
    with pytest.raises(RecordError) as caught:
        assemble(tmp_path / "out", [first, second], test_fraction=0.2)
    assert str(caught.value) == (f"{second}: field 'id': record 'x' is also in {first} (ids must be unique "
                                 "across the input files)")


def test_duplicate_ids_between_test_and_inputs(tmp_path):
    train = written(tmp_path, "train.jsonl", record("x", "v.mp4"), record("y", "w.mp4"))
    test = written(tmp_path, "test.jsonl", record("x", "t.mp4", "Who is there?"))
    with pytest.raises(RecordError, match=rf"{train}: field 'id': record 'x' is also in {test}"):
        assemble(tmp_path / "out", [train], [test])


def test_an_empty_file(tmp_path, sources):
    empty = tmp_path / "train_relation.jsonl"
    empty.write_text("")
    with pytest.raises(RecordError, match=rf"{empty}: the file holds no records"):
        assemble(tmp_path / "out", [*sources["inputs"], empty], sources["tests"])


def test_a_file_whose_videos_are_all_test_videos(tmp_path, sources):
    train = written(tmp_path, "train_extra.jsonl", record("e1", "fxRelAAAA05.mp4", "Who is there?"))
    with pytest.raises(RecordError) as caught:
        assemble(tmp_path / "out", [*sources["inputs"], train], sources["tests"])
    message = str(caught.value)
    assert message.startswith(f"{train}: field 'video': every record is on a video of the test files")


def test_a_category_the_mix_would_empty(tmp_path):
    answerable = written(tmp_path, "answerable.jsonl", *[record(f"a{i}", f"a{i}.mp4") for i in range(3)])
    unanswerable = written(tmp_path, "unanswerable.jsonl",
                           *[record(f"o{i}", f"o{i}.mp4", category="object") for i in range(12)],
                           *[record(f"r{i}", f"r{i}.mp4", category="relation") for i in range(3)])
    # train keeps 1 answerable video (3 go to val and test), so the mix keeps 1 unanswerable record
    with pytest.raises(RecordError, match=rf"{unanswerable}: field 'category': the train split has no "
                                          r"(object|relation) record"):
        assemble(tmp_path / "out", [answerable, unanswerable], val_fraction=0.34, test_fraction=0.34,
                 unanswerable_fraction=0.5)


@pytest.mark.parametrize("options, problem", [
    ({}, "no test split: give --test FILE"),
    ({"test_fraction": 0.1, "val_fraction": 0.0}, "--val-fraction must be in (0, 1), got 0.0"),
    ({"test_fraction": 0.6, "val_fraction": 0.4}, "leave nothing for train"),
    ({"test_fraction": 0.1, "unanswerable_fraction": 1.5}, "--unanswerable-fraction must be in [0, 1]"),
])
def test_bad_settings(tmp_path, options, problem):
    train = written(tmp_path, "train.jsonl", record("x", "v.mp4"))
    with pytest.raises(RecordError, match=re.escape(problem)):
        assemble(tmp_path / "out", [train], **options)


def test_a_file_given_twice(tmp_path):
    train = written(tmp_path, "train.jsonl", record("x", "v.mp4"))
    with pytest.raises(RecordError, match=f"{train} is given twice"):
        assemble(tmp_path / "out", [train], [tmp_path / "." / "train.jsonl"])


# ---------------------------------------------------------------------------------- files and folders
def test_refuses_to_overwrite_an_input(tmp_path, sources, capsys):
    out = tmp_path / "uvqa"
    assemble(out, sources["inputs"], sources["tests"])
    before = (out / "train.jsonl").read_bytes()
    code = main(["assemble", "--out", str(out), "--input", str(out / "train.jsonl"),
                 "--test", *map(str, sources["tests"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "would be overwritten" in err
    assert (out / "train.jsonl").read_bytes() == before


def test_refuses_a_folder_with_record_files_it_did_not_write(tmp_path, sources):
    out = tmp_path / "mine"
    written(out, "train.jsonl", record("x", "v.mp4"))
    with pytest.raises(RecordError, match=rf"{out / 'train.jsonl'}: was not written by assemble"):
        assemble(out, sources["inputs"], sources["tests"])
    assert read_records(out / "train.jsonl")[0] == [record("x", "v.mp4")]


def test_a_stale_to_predict_is_removed(tmp_path, sources):
    out = tmp_path / "uvqa"
    assemble(out, sources["inputs"], sources["tests"])
    assert (out / TO_PREDICT).exists()
    assemble(out, sources["inputs"], sources["tests"], unanswerable_fraction=1.0)  # every record has one
    assert not (out / TO_PREDICT).exists()


def test_bad_input_through_the_command_is_one_line(tmp_path, capsys):
    first = written(tmp_path, "a.jsonl", record("a1", "v.mp4", answer="Brown."))
    second = written(tmp_path, "b.jsonl", record("b1", "v.mp4", answer="Black."))
    code = main(["assemble", "--out", str(tmp_path / "out"), "--input", str(first), str(second),
                 "--test-fraction", "0.1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith(f"error: {second}: field 'answer': record 'b1'")
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "out").exists()
