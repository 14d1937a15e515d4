"""Record schema and JSONL I/O: every bad-input case names the file, line and field; writes are atomic."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from datamodules.records import (
    REFUSAL_OPENING,
    REFUSAL_TEMPLATE,
    QARecord,
    RecordError,
    atomic_write,
    iter_records,
    read_predictions,
    read_records,
    record_from_dict,
    summarize_records,
    write_jsonl,
    write_predictions,
    write_records,
)


def good(**changes) -> dict:
    row = {
        "id": "r1", "video": "videos/a.mp4", "question": "What colour is the circle?", "answer": "red",
        "answerable": True, "category": None, "missing_element": None, "rejected": None,
        "source": "shapes", "meta": {},
    }
    row.update(changes)
    return row


def unanswerable(**changes) -> dict:
    row = good(answerable=False, category="object", missing_element="triangle",
               answer="The question is unanswerable because there is no triangle in the video.")
    row.update(changes)
    return row


def write_lines(path: Path, *lines: str | dict) -> Path:
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def first_error(path: Path, video_root: Path | None = None) -> RecordError:
    with pytest.raises(RecordError) as info:
        read_records(path, video_root)
    return info.value


def test_round_trip(tmp_path):
    records = [
        QARecord(**good()),
        QARecord(**unanswerable(id="r2", rejected="red", meta={"form": "colour", "x": [1, {"a": None}]})),
    ]
    path = tmp_path / "data.jsonl"
    assert write_records(path, records) == 2
    loaded, skipped = read_records(path)
    assert loaded == records and skipped == []
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["r1", "r2"]


def test_optional_fields_default(tmp_path):
    row = {k: v for k, v in good().items() if k in ("id", "video", "question", "answer", "answerable")}
    (record,), _ = read_records(write_lines(tmp_path / "d.jsonl", row))
    assert record.category is None and record.rejected is None
    assert record.source == "unknown" and record.meta == {}


def test_blank_lines_are_ignored_and_line_numbers_count_them(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good(), "", "   ", good(id="r1"))
    error = first_error(path)
    assert error.line == 4 and error.field == "id"


def test_bad_json(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good(), '{"id": "r2", "video": ')
    error = first_error(path)
    assert (error.path, error.line, error.field) == (str(path), 2, None)
    assert "line 2" in str(error) and "invalid JSON" in str(error) and str(path) in str(error)


def test_not_an_object(tmp_path):
    error = first_error(write_lines(tmp_path / "d.jsonl", "[1, 2]"))
    assert error.line == 1 and "expected a JSON object" in str(error)


@pytest.mark.parametrize("name", ["id", "video", "question", "answer", "answerable"])
def test_missing_required_field(tmp_path, name):
    row = good()
    del row[name]
    error = first_error(write_lines(tmp_path / "d.jsonl", good(id="r0"), row))
    assert (error.line, error.field) == (2, name)
    assert f"field '{name}'" in str(error) and "missing" in str(error)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("answerable", "yes"),
        ("answerable", 1),
        ("question", 5),
        ("id", True),
        ("video", None),
        ("meta", []),
        ("rejected", 3.5),
        ("source", None),
        ("category", 7),
    ],
)
def test_mistyped_field(tmp_path, name, value):
    error = first_error(write_lines(tmp_path / "d.jsonl", good(**{name: value})))
    assert (error.line, error.field) == (1, name) and "expected" in str(error)


def test_unknown_field(tmp_path):
    error = first_error(write_lines(tmp_path / "d.jsonl", good(colour="red")))
    assert error.field == "colour" and "unknown field" in str(error)


@pytest.mark.parametrize("name", ["question", "answer", "id", "video"])
def test_empty_text_field(tmp_path, name):
    error = first_error(write_lines(tmp_path / "d.jsonl", good(**{name: "  \t"})))
    assert error.field == name and "empty" in str(error)


def test_unknown_category(tmp_path):
    error = first_error(write_lines(tmp_path / "d.jsonl", unanswerable(category="colour")))
    assert error.field == "category" and "'colour'" in str(error)


def test_unanswerable_needs_a_category(tmp_path):
    error = first_error(write_lines(tmp_path / "d.jsonl", unanswerable(category=None)))
    assert error.field == "category"


def test_answerable_with_a_category(tmp_path):
    error = first_error(write_lines(tmp_path / "d.jsonl", good(category="object")))
    assert error.field == "category" and "answerable" in str(error)


@pytest.mark.parametrize("missing", [None, "", "   "])
def test_unanswerable_without_missing_element(tmp_path, missing):
    error = first_error(write_lines(tmp_path / "d.jsonl", unanswerable(missing_element=missing)))
    assert error.field == "missing_element" and "missing element" in str(error)


def test_duplicate_id(tmp_path):
    error = first_error(write_lines(tmp_path / "d.jsonl", good(), good(id="r2"), good(question="Other?")))
    assert (error.line, error.field) == (3, "id") and "'r1'" in str(error) and "line 1" in str(error)


@pytest.mark.parametrize("video", ["../outside.mp4", "videos/../../outside.mp4", "/etc/passwd"])
def test_video_escaping_the_root(tmp_path, video):
    error = first_error(write_lines(tmp_path / "d.jsonl", good(video=video)))
    assert error.field == "video" and "outside the video root" in str(error)


def test_video_root_defaults_to_the_files_folder_and_can_be_given(tmp_path):
    data, videos = tmp_path / "data", tmp_path / "videos"
    data.mkdir()
    path = write_lines(data / "d.jsonl", good(video="clips/../a.mp4"), good(id="r2", video="../x.mp4"))
    error = first_error(path)
    assert error.line == 2 and str(data.resolve()) in str(error)
    error = first_error(path, video_root=videos)
    assert error.line == 2 and str(videos.resolve()) in str(error)
    records, _ = read_records(write_lines(data / "ok.jsonl", good(video="clips/../a.mp4")), video_root=videos)
    assert records[0].video == "clips/../a.mp4"


def test_video_symlink_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    error = first_error(write_lines(root / "d.jsonl", good(video="link/secret.mp4")))
    assert error.field == "video"


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(good()).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    error = first_error(path)
    assert error.line == 2 and "UTF-8" in str(error)


def test_missing_file(tmp_path):
    error = first_error(tmp_path / "nope.jsonl")
    assert "no such file" in str(error) and error.line is None


def test_skip_invalid_counts_every_bad_line(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        good(id="a"),
        "not json",
        good(id="b", question=""),
        good(id="a"),  # duplicate of line 1
        unanswerable(id="c", category="colour"),
        good(id="d"),
    )
    records, skipped = read_records(path, skip_invalid=True)
    assert [r.id for r in records] == ["a", "d"]
    assert [(e.line, e.field) for e in skipped] == [(2, None), (3, "question"), (4, "id"), (5, "category")]
    with pytest.raises(RecordError):  # the default stops at the first
        read_records(path)


def test_iter_records_is_lazy_and_stops_at_the_bad_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good(id="a"), good(id="b"), "{bad")
    seen = []
    with pytest.raises(RecordError):
        for record in iter_records(path):
            seen.append(record.id)
    assert seen == ["a", "b"]


def test_record_from_dict_without_root():
    record = record_from_dict(good(video="../anywhere.mp4"))
    assert record.video == "../anywhere.mp4"


def test_write_records_refuses_duplicate_ids_and_writes_nothing(tmp_path):
    path = tmp_path / "d.jsonl"
    with pytest.raises(RecordError) as info:
        write_records(path, [QARecord(**good()), QARecord(**good())])
    assert info.value.field == "id" and not path.exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_creates_folders_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write(path, "hello\n")
    assert path.read_text() == "hello\n" and _leftovers(path.parent) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    write_records(path, [QARecord(**good())])
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_records(path, [QARecord(**good(id="new"))])
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_atomic_write_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(path, "new")
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_write_takes_bytes_or_a_writer_and_a_failing_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "clip.bin"
    assert atomic_write(path, b"\x00\xffold") == path and path.read_bytes() == b"\x00\xffold"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask()), "the usual mode, not mkstemp's 0600"

    def half_then_crash(handle):
        handle.write(b"half")
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"\x00\xffold" and _leftovers(tmp_path) == []
    atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_jsonl_with_an_unserialisable_row_keeps_the_old_file(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(TypeError):
        write_jsonl(path, [{"a": 2}, {"b": {1, 2}}])
    assert path.read_text() == '{"a": 1}\n' and _leftovers(tmp_path) == []


def test_summarize_records():
    records = [
        QARecord(**good()),
        QARecord(**unanswerable(id="u1")),
        QARecord(**unanswerable(id="u2", category="relation")),
    ]
    assert summarize_records(records) == {
        "records": 3, "answerable": 1, "unanswerable": 2,
        "categories": {"object": 1, "relation": 1, "attribute": 0},
    }


def test_to_json_matches_the_schema():
    record = QARecord(**unanswerable())
    assert json.loads(record.to_json()) == asdict(record)


def test_refusal_opening_opens_the_gold_refusal():
    assert REFUSAL_TEMPLATE.format(missing="red star").startswith(REFUSAL_OPENING + " because")


def test_predictions_round_trip_with_nan_and_infinity(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    rows = [{"id": "a", "response": "red", "refusal_likelihood": float("nan")},
            {"id": "b", "response": "no", "refusal_likelihood": float("-inf"), "after": {"score": 1.5}}]
    assert write_predictions(path, rows) == 2
    back = read_predictions(path, ("response",))
    assert [row["id"] for row in back] == ["a", "b"]
    assert back[0]["refusal_likelihood"] is None and back[1]["refusal_likelihood"] < -1e300
    assert back[1]["after"] == {"score": 1.5}


@pytest.mark.parametrize(
    ("text", "required", "line", "field", "problem"),
    [
        ('{"id": "a", "response": "x"}\n{"id": \n', (), 2, None, "invalid JSON"),
        ('{"id": "a"}\n\n["a"]\n', (), 3, None, "expected a JSON object"),
        ('{"id": "a"}\n{"response": "x"}\n', (), 2, "id", "missing or not a string"),
        ('{"id": " "}\n', (), 1, "id", "is empty"),
        ('{"id": "a"}\n', ("response",), 1, "response", "missing or not a string"),
        ('{"id": "a", "response": "x"}\n{"id": "a", "response": "y"}\n', (), 2, "id",
         "duplicate id 'a' (first on line 1)"),
    ],
)
def test_read_predictions_names_file_line_and_field(tmp_path, text, required, line, field, problem):
    path = tmp_path / "predictions.jsonl"
    path.write_text(text)
    with pytest.raises(RecordError, match=re.escape(problem)) as error:
        read_predictions(path, required)
    assert (error.value.path, error.value.line, error.value.field) == (str(path), line, field)
    with pytest.raises(RecordError, match="no such predictions file"):
        read_predictions(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------ hostile input
@pytest.mark.parametrize(
    ("line", "problem", "field_name"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply", None),
        ('{"id": ' + "9" * 5000 + "}", "a number too long", None),
        (json.dumps(good(question="What colour is \ud800?")), "lone UTF-16 surrogate", "question"),
        (json.dumps(good(meta={"tags": ["ok", "\udfff"]})), "lone UTF-16 surrogate", "meta.tags[1]"),
        ('{"id": NaN}', "non-standard JSON constant NaN", None),
    ],
    ids=["deep-nesting", "huge-integer", "lone-surrogate", "surrogate-in-meta", "nan"],
)
def test_hostile_json_is_an_error_naming_the_file_and_line(tmp_path, line, problem, field_name):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good(id="first")) + "\n" + line + "\n", encoding="utf-8")
    error = first_error(path)
    assert error.path == str(path) and error.line == 2 and problem in str(error)
    assert error.field == field_name
    assert "\n" not in str(error) and len(str(error)) < 300


def test_a_valid_surrogate_pair_is_one_character_and_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "video": "v.mp4", "question": "Is it \\ud83d\\ude00?", "answer": "yes", '
                    '"answerable": true}\n', encoding="utf-8")
    records, _ = read_records(path)
    assert records[0].question == "Is it \U0001f600?"


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_a_file_without_records_is_an_error_unless_allowed(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    error = first_error(path)
    assert error.path == str(path) and "holds no records" in str(error)
    assert read_records(path, allow_empty=True) == ([], [])


def test_record_errors_pickle_with_their_message_and_fields():
    import pickle

    error = RecordError("f.jsonl", 3, "question", "is empty")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is RecordError and str(again) == str(error)
    assert (again.path, again.line, again.field) == ("f.jsonl", 3, "question")
