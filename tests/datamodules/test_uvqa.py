"""UVQA import: the released files (when ../shared/uvqa is present) and small files written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.records import RecordError, read_records
from datamodules.sources.uvqa import MISSING_ELEMENT_FIELD, convert_uvqa, import_uvqa, read_uvqa

RELEASED = Path(__file__).resolve().parents[2] / ".." / "shared" / "uvqa"
EXPECTED = {"object": (238, 0), "relation": (111, 0), "attribute": (88, 30)}


def item(category: str = "object", **changes) -> dict:
    row = {
        "vid": "XediDCZ-HGo",
        "generated_relation": "barber on the side of belt",
        "prompt": "...",
        "response": "...",
        "new_question": "What color is the belt that the barber stands beside in the video?",
        "new_answer": "The question is unanswerable because there is no belt in the video.",
    }
    if category == "object":
        row["generated_actor_or_object"] = "belt"
    elif category == "relation":
        row["orig_relation"] = ["barber holding comb"]
    else:
        row.update(vid="123@N00_456_abc.mov", orig_relation="a red light blinks.", orig_attribute="red",
                   generated_attributes="pinkish")
    row.update(changes)
    return row


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.mark.skipif(not RELEASED.is_dir(), reason="the released UVQA files are not on this machine")
@pytest.mark.parametrize("category", sorted(EXPECTED))
def test_released_files(tmp_path, category):
    source = RELEASED / f"eval_{category}.json"
    result = import_uvqa(source, category, tmp_path / "out.jsonl")
    assert (len(result.records), result.duplicates) == EXPECTED[category]
    records, _ = read_records(tmp_path / "out.jsonl")  # valid under the record schema
    assert records == result.records
    raw = json.loads(source.read_text())
    assert all(not r.answerable and r.category == category and r.source == "uvqa" for r in records)
    field = MISSING_ELEMENT_FIELD[category]
    assert {r.missing_element for r in records} == {" ".join(x[field].split()) for x in raw}
    assert {r.question for r in records} == {x["new_question"].strip() for x in raw}
    if category == "attribute":  # DiDeMo file names are kept as they are
        assert {r.video for r in records} == {x["vid"] for x in raw}
    else:  # MOMA-LRG ids get the extension
        assert {r.video for r in records} == {x["vid"] + ".mp4" for x in raw}
    assert read_uvqa(source, category).records == records  # stable ids


def test_conversion_of_each_category():
    for category in MISSING_ELEMENT_FIELD:
        (record,) = convert_uvqa([item(category)], category).records
        assert record.answer == item(category)["new_answer"] and not record.answerable
        assert record.category == category and record.id.startswith(f"uvqa-{category}-")
    (record,) = convert_uvqa([item("relation", generated_relation="salon worker  stepping on  towel")],
                             "relation").records
    assert record.missing_element == "salon worker stepping on towel"  # whitespace normalised
    assert record.meta["true_fact"] == ["barber holding comb"]
    (record,) = convert_uvqa([item("attribute")], "attribute").records
    assert record.missing_element == "pinkish" and record.video == "123@N00_456_abc.mov"
    assert record.meta["orig_attribute"] == "red"


def test_extension_option():
    rows = [item()]
    assert convert_uvqa(rows, "object").records[0].video == "XediDCZ-HGo.mp4"
    assert convert_uvqa(rows, "object", extension="avi").records[0].video == "XediDCZ-HGo.avi"
    assert convert_uvqa(rows, "object", extension=".webm").records[0].video == "XediDCZ-HGo.webm"
    assert convert_uvqa(rows, "object", extension="").records[0].video == "XediDCZ-HGo"
    assert convert_uvqa([item("attribute")], "attribute", extension=".avi").records[0].video.endswith(".mov")


def test_exact_duplicates_are_dropped_and_counted():
    rows = [item(), item(), item(new_question="Where is the belt?"), item(), item(prompt="other prompt")]
    result = convert_uvqa(rows, "object")
    assert len(result.records) == 2 and result.duplicates == 3
    assert result.records[0].meta["index"] == 1 and result.records[1].meta["index"] == 3
    assert len({r.id for r in result.records}) == 2


def test_ids_do_not_depend_on_order():
    rows = [item(), item(new_question="Where is the belt?")]
    forward = {r.id for r in convert_uvqa(rows, "object").records}
    assert forward == {r.id for r in convert_uvqa(rows[::-1], "object").records}


@pytest.mark.parametrize(
    ("rows", "where", "field"),
    [
        ([item(), {k: v for k, v in item().items() if k != "new_question"}], "item 2", "new_question"),
        ([item(vid=5)], "item 1", "vid"),
        ([item(new_answer="  ")], "item 1", "new_answer"),
        ([item(new_question="")], "item 1", "new_question"),
        ([item(generated_actor_or_object=None)], "item 1", "generated_actor_or_object"),
        (["not an object"], "item 1", None),
    ],
)
def test_bad_items_name_the_file_item_and_field(tmp_path, rows, where, field):
    path = write(tmp_path / "bad.json", rows)
    with pytest.raises(RecordError) as info:
        read_uvqa(path, "object")
    message = str(info.value)
    assert str(path) in message and where in message
    if field:
        assert f"field '{field}'" in message


def test_wrong_category_for_the_file(tmp_path):
    path = write(tmp_path / "eval_object.json", [item("object")])
    with pytest.raises(RecordError, match="generated_attributes.*attribute file"):
        read_uvqa(path, "attribute")


@pytest.mark.parametrize(("content", "problem"), [("{not json", "invalid JSON"), ('{"vid": "x"}', "list")])
def test_bad_files(tmp_path, content, problem):
    with pytest.raises(RecordError, match=problem):
        read_uvqa(write(tmp_path / "f.json", content), "object")


def test_missing_file_and_unknown_category(tmp_path):
    with pytest.raises(RecordError, match="no such"):
        read_uvqa(tmp_path / "none.json", "object")
    with pytest.raises(ValueError, match="category"):
        convert_uvqa([item()], "colour")


def test_import_writes_atomically(tmp_path):
    out = tmp_path / "out" / "uvqa.jsonl"
    result = import_uvqa(write(tmp_path / "in.json", [item(), item()]), "object", out)
    assert result.duplicates == 1 and len(out.read_text().splitlines()) == 1
    with pytest.raises(RecordError):
        import_uvqa(write(tmp_path / "bad.json", [item(vid="")]), "object", out)
    assert len(out.read_text().splitlines()) == 1  # the old output is untouched


@pytest.mark.parametrize(
    ("content", "problem", "where"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply", None),
        ('[{"vid": ' + "7" * 5000 + "}]", "a number too long", None),
        (json.dumps([item(), item(new_question="Is the \ud800 red?")]), "lone UTF-16 surrogate",
         "at [1].new_question"),
    ],
    ids=["deep-nesting", "huge-integer", "lone-surrogate"],
)
def test_hostile_json_is_one_error_naming_the_file(tmp_path, content, problem, where):
    path = write(tmp_path / "eval_object.json", content)
    with pytest.raises(RecordError) as info:
        read_uvqa(path, "object")
    message = str(info.value)
    assert message.startswith(f"{path}") and problem in message and "\n" not in message
    if where:
        assert where in message
    # The command line: exit status 2, one line, no output file.
    from datamodules.__main__ import main

    out = tmp_path / "out.jsonl"
    assert main(["import-uvqa", "--input", str(path), "--category", "object", "--out", str(out)]) == 2
    assert not out.exists()


def test_import_uvqa_refuses_to_write_over_its_input(tmp_path, capsys):
    from datamodules.__main__ import main

    path = write(tmp_path / "eval_object.json", [item()])
    before = path.read_bytes()
    link = tmp_path / "link.json"
    link.symlink_to(path)
    for out in (path, tmp_path / "." / "eval_object.json", link):
        assert main(["import-uvqa", "--input", str(path), "--category", "object", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is the input" in err[0], err
        assert path.read_bytes() == before
