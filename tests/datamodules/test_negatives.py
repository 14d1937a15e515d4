"""The released UVQA negatives (`train_negative_<category>.json`) joined by position to their training file,
and checked: same video, same question, or one error naming the negatives file, the item and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from datamodules.__main__ import main
from datamodules.records import read_records
from datamodules.sources.common import AnnotationError
from datamodules.sources.negatives import read_uvqa_with_negatives
from datamodules.sources.uvqa import read_uvqa

RELEASE = Path(__file__).parent / "fixtures" / "uvqa_train"
NEGATIVES = {"object": "train_negative_object.json", "relation": "train_negative_relation.json",
             "attribute": "train_negatvie_attribute.json"}  # sic: the release's attribute file name


def files(category: str) -> tuple[Path, Path]:
    return RELEASE / category / f"train_{category}.json", RELEASE / category / NEGATIVES[category]


def copy_with(tmp_path: Path, category: str, change) -> tuple[Path, Path]:
    """The category's training file and a copy of its negatives with `change(items)` applied."""
    training, negatives = files(category)
    items = json.loads(negatives.read_text())
    change(items)
    copied = tmp_path / negatives.name
    copied.write_text(json.dumps(items))
    return training, copied


@pytest.mark.parametrize("category", ["object", "relation", "attribute"])
def test_each_record_gets_the_answer_of_the_negative_at_its_position(category):
    training, negatives = files(category)
    result = read_uvqa_with_negatives(training, negatives, category)
    plain = read_uvqa(training, category)
    assert [replace_rejected(r) for r in result.records] == [replace_rejected(r) for r in plain.records]
    assert result.duplicates == plain.duplicates
    items = json.loads(negatives.read_text())
    for record in result.records:
        negative = items[record.meta["index"] - 1]
        assert record.rejected == negative["new_answer"]
        assert negative["vid"] in record.video
        assert record.meta["negatives"] == negatives.name


def replace_rejected(record):
    meta = {k: v for k, v in record.meta.items() if k != "negatives"}
    return record.id, record.video, record.question, record.answer, record.category, meta


def test_the_join_counts_the_duplicates_the_importer_drops():
    """The attribute fixture's item 5 repeats item 2 (as the release's files do): it is dropped, and the items
    after it are still joined to the negatives at their own positions."""
    result = read_uvqa_with_negatives(*files("attribute"), "attribute")
    assert result.duplicates == 1
    assert [r.meta["index"] for r in result.records] == [1, 2, 3, 4]
    assert result.records[1].rejected == "A yellow ball."


def test_questions_are_compared_with_whitespace_and_case_normalised():
    training, negatives = files("object")
    assert json.loads(negatives.read_text())[1]["new_question"].startswith("is the kettle")
    assert read_uvqa_with_negatives(training, negatives, "object").records[1].rejected.startswith("Yes")


@pytest.mark.parametrize("field, value", [("vid", "fxObjAAAA09"),
                                          ("new_question", "What is the cook eating?")])
def test_a_mismatch_names_the_negatives_file_the_item_and_the_field(tmp_path, field, value):
    training, negatives = copy_with(tmp_path, "object", lambda items: items[2].update({field: value}))
    with pytest.raises(AnnotationError) as caught:
        read_uvqa_with_negatives(training, negatives, "object")
    message = str(caught.value)
    assert message.startswith(f"{negatives}, item 3: field '{field}': {value!r} differs from item 3 of "
                              f"{training}")
    assert "joined to training items by position" in message


def test_a_missing_negative_shifts_the_join_and_the_first_mismatch_is_named(tmp_path):
    training, negatives = copy_with(tmp_path, "relation", lambda items: items.pop(1))
    with pytest.raises(AnnotationError, match=r", item 2: field 'vid': 'fxRelAAAA03' differs from item 2"):
        read_uvqa_with_negatives(training, negatives, "relation")


def test_fewer_or_more_negatives_than_training_items(tmp_path):
    training, negatives = copy_with(tmp_path, "relation", lambda items: items.pop())
    with pytest.raises(AnnotationError, match=r"has 3 items and .*train_relation.json has 4"):
        read_uvqa_with_negatives(training, negatives, "relation")
    training, negatives = copy_with(tmp_path, "relation", lambda items: items.append(dict(items[0])))
    with pytest.raises(AnnotationError, match=r"has 5 items and .*train_relation.json has 4"):
        read_uvqa_with_negatives(training, negatives, "relation")


@pytest.mark.parametrize("change, where, field", [
    (lambda items: items[0].update(new_answer="  "), "item 1", "new_answer"),
    (lambda items: items[1].pop("new_answer"), "item 2", "new_answer"),
    (lambda items: items[3].update(new_question=7), "item 4", "new_question"),
])
def test_bad_negatives_name_item_and_field(tmp_path, change, where, field):
    training, negatives = copy_with(tmp_path, "relation", change)
    with pytest.raises(AnnotationError, match=rf"{negatives}, {where}: field '{field}'"):
        read_uvqa_with_negatives(training, negatives, "relation")


def test_negatives_that_are_not_a_list(tmp_path):
    negatives = tmp_path / "neg.json"
    negatives.write_text('{"vid": "x"}')
    with pytest.raises(AnnotationError, match="expected a JSON list of UVQA items, got dict"):
        read_uvqa_with_negatives(files("object")[0], negatives, "object")


def test_command_writes_the_records_with_rejected(tmp_path, capsys):
    out = tmp_path / "train_object.jsonl"
    training, negatives = files("object")
    code = main(["import-uvqa-negatives", "--category", "object", "--input", str(training),
                 "--negatives", str(negatives), "--out", str(out)])
    assert code == 0
    assert "wrote 4 object records" in capsys.readouterr().out
    records, _ = read_records(out)
    assert all(r.rejected for r in records) and all(r.video.endswith(".mp4") for r in records)


def test_command_errors_are_one_line(tmp_path, capsys):
    training, negatives = copy_with(tmp_path, "object", lambda items: items[0].update(vid="other"))
    code = main(["import-uvqa-negatives", "--category", "object", "--input", str(training),
                 "--negatives", str(negatives), "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {negatives}, item 1: field 'vid': 'other' differs")
    assert not (tmp_path / "out.jsonl").exists()


def test_command_refuses_to_write_over_an_input(tmp_path, capsys):
    training = tmp_path / "train_object.json"
    shutil.copy(files("object")[0], training)
    code = main(["import-uvqa-negatives", "--category", "object", "--input", str(training),
                 "--negatives", str(files("object")[1]), "--out", str(training)])
    assert code == 2 and "would be overwritten" in capsys.readouterr().err
    assert json.loads(training.read_text())[0]["vid"] == "fxObjAAAA01"
