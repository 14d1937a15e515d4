"""The synthetic dataset builder: files, splits disjoint by video, validity, determinism, resuming."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from datamodules.records import CATEGORIES, REFUSAL_TEMPLATE, read_records
from datamodules.shapes.dataset import (
    GENERATOR_VERSION,
    INSTRUCT,
    SPLITS,
    SyntheticDatasetError,
    build_synthetic_dataset,
    check_synthetic_folder,
    format_summary,
    split_videos,
)
from datamodules.shapes.questions import (
    ABSENT_THINGS,
    GENERAL_FORMS,
    describe_scene,
    split_words,
    template_vocabulary,
)
from datamodules.shapes.world import Scene
from datamodules.video import read_video

SMALL = dict(frames=4, size=48, fps=4, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = build_synthetic_dataset(out, 20, seed=3, **SMALL)
    return out, summary


def load(out):
    return {split: read_records(out / f"{split}.jsonl")[0] for split in SPLITS}


def scene_rows(out):
    return [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]


def test_writes_every_file(built):
    out, summary = built
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"v{i:06d}.mp4" for i in range(20)]
    assert {p.name for p in out.iterdir()} == {"videos", "train.jsonl", "val.jsonl", "test.jsonl",
                                                "instruct.jsonl", "scenes.jsonl", "synth.json"}
    assert summary["videos"] == 20 and summary["rendered"] == 20
    assert [summary["splits"][s]["videos"] for s in SPLITS] == [16, 2, 2]
    frames = read_video(out / "videos" / "v000000.mp4", 4)
    assert frames.shape == (4, 48, 48, 3)


def test_records_are_valid_and_split_by_video(built):
    out, summary = built
    records = load(out)  # read_records validates every line, with the output folder as video root
    videos = {split: {r.video for r in rs} for split, rs in records.items()}
    assert not videos["train"] & videos["val"] and not videos["train"] & videos["test"]
    assert not videos["val"] & videos["test"]
    assert set().union(*videos.values()) == {f"videos/v{i:06d}.mp4" for i in range(20)}
    ids = [r.id for rs in records.values() for r in rs]
    assert len(ids) == len(set(ids))
    for split, rs in records.items():
        counts = summary["splits"][split]
        assert counts["records"] == len(rs)
        assert counts["answerable"] == sum(r.answerable for r in rs)
        assert counts["categories"] == {c: sum(r.category == c for r in rs) for c in CATEGORIES}
        for record in rs:
            assert (out / record.video).is_file() and record.source == "shapes"
            assert record.rejected and record.meta["form"]
            if record.answerable:
                assert record.category is None and record.missing_element is None
                assert record.rejected.startswith("The question is unanswerable because there is no ")
            else:
                assert record.answer == REFUSAL_TEMPLATE.format(missing=record.missing_element)
                assert record.meta["true_fact"] and record.meta["false_fact"]
                assert not record.rejected.startswith("The question")


def test_every_video_has_four_answerable_questions_and_training_clips_a_caption_and_checks(built):
    out, _ = built
    scenes = {row["video"]: Scene.from_dict(row["scene"]) for row in scene_rows(out)}
    for split, records in load(out).items():
        dense = ("describe", "verify")
        per_video = Counter(r.video for r in records if r.answerable and r.meta["form"] not in dense)
        captions = Counter(r.video for r in records if r.meta["form"] == "describe")
        checks = Counter(r.video for r in records if r.meta["form"] == "verify")
        assert set(per_video.values()) == {4}
        assert captions == (Counter(per_video.keys()) if split == "train" else Counter()), split
        expected = Counter({video: min(2, len(scenes[video].objects)) for video in per_video})
        assert checks == (expected if split == "train" else Counter()), split
        assert all(r.answerable for r in records if r.meta["form"] in dense)
        assert all(r.answer in ("yes", "no") for r in records if r.meta["form"] == "verify")
        assert all(r.meta["objects"] == len(scenes[r.video].objects) for r in records)


def test_the_instruct_file_is_the_answerable_training_records_and_one_general_refusal_a_clip(built):
    out, _ = built
    instruct = read_records(out / INSTRUCT)[0]  # valid records, videos resolved in the folder
    train = load(out)["train"]
    assert [r for r in instruct if r.answerable] == [r for r in train if r.answerable]
    general = [r for r in instruct if not r.answerable]
    assert Counter(r.video for r in general) == Counter({video: 1 for video in {r.video for r in train}})
    for record in general:
        assert record.meta["general"] is True and record.category in ("object", "attribute")
        assert record.answer == REFUSAL_TEMPLATE.format(missing=record.missing_element)
        absent = set(record.missing_element.split()) & set(ABSENT_THINGS)
        assert absent or record.missing_element in GENERAL_FORMS.values(), record.missing_element
        assert set(split_words(record.question)) <= set(template_vocabulary())
    assert not {r.id for r in general} & {r.id for rs in load(out).values() for r in rs}


def test_the_splits_with_captions_are_chosen(tmp_path):
    build_synthetic_dataset(tmp_path, 20, seed=3, describe=("val", "test"), **SMALL)
    forms = {split: {r.meta["form"] for r in records} for split, records in load(tmp_path).items()}
    assert not {"describe", "verify"} & forms["train"]
    assert {"describe", "verify"} <= forms["val"] and {"describe", "verify"} <= forms["test"]
    build_synthetic_dataset(tmp_path, 20, seed=3, describe=(), **SMALL)
    forms = {r.meta["form"] for records in load(tmp_path).values() for r in records}
    assert not {"describe", "verify"} & forms
    with pytest.raises(SyntheticDatasetError, match="describe: unknown split"):
        build_synthetic_dataset(tmp_path, 20, seed=3, describe=("dev",), **SMALL)


def test_scenes_file_matches_the_records(built):
    out, _ = built
    rows = scene_rows(out)
    assert len(rows) == 20
    records = load(out)
    split_of = {r.video: split for split, rs in records.items() for r in rs}
    for row in rows:
        assert row["split"] == split_of[row["video"]]
        scene = Scene.from_dict(row["scene"])
        colours = {o.colour for o in scene.objects}
        for record in records[row["split"]]:
            if record.video == row["video"] and record.answerable and record.meta["form"] == "colour":
                assert record.answer in colours
            if record.video == row["video"] and record.question.startswith("How many objects are there"):
                assert record.answer == ["zero", "one", "two", "three"][len(scene.objects)]
            if record.video == row["video"] and record.meta["form"] == "describe":
                assert record.answer == describe_scene(scene)


def test_vocabulary_covers_the_dataset(built):
    out, _ = built
    vocabulary = set(template_vocabulary())
    for rs in load(out).values():
        for record in rs:
            for text in (record.question, record.answer, record.rejected):
                assert set(split_words(text)) <= vocabulary, text


def test_rebuilding_is_idempotent_and_resumes(built, tmp_path):
    out, _ = built
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    clip = out / "videos" / "v000004.mp4"
    clip_time = clip.stat().st_mtime_ns
    summary = build_synthetic_dataset(out, 20, seed=3, **SMALL)
    assert summary["rendered"] == 0 and clip.stat().st_mtime_ns == clip_time
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    # An interrupted run: one clip missing, a temporary file left behind.
    clip.unlink()
    (out / "videos" / ".v000005.mp4.k3x9q1.tmp").write_bytes(b"partial")
    summary = build_synthetic_dataset(out, 20, seed=3, **SMALL)
    assert summary["rendered"] == 1 and clip.is_file()
    assert not list((out / "videos").glob(".*"))
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_deterministic_for_a_seed(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_synthetic_dataset(again, 20, seed=3, **SMALL)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", INSTRUCT, "scenes.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    build_synthetic_dataset(other, 20, seed=4, **SMALL)
    assert (other / "scenes.jsonl").read_bytes() != (out / "scenes.jsonl").read_bytes()


def test_more_videos_keep_the_first_scenes(built, tmp_path):
    out, _ = built
    bigger = tmp_path / "bigger"
    build_synthetic_dataset(bigger, 25, seed=3, **SMALL)
    assert (bigger / "videos" / "v000007.mp4").read_bytes() == (out / "videos" / "v000007.mp4").read_bytes()


def test_other_settings_in_the_same_folder_are_refused(built):
    out, _ = built
    with pytest.raises(SyntheticDatasetError, match="seed"):
        build_synthetic_dataset(out, 20, seed=4, **SMALL)
    with pytest.raises(SyntheticDatasetError, match="world"):
        build_synthetic_dataset(out, 20, seed=3, **{**SMALL, "size": 64})


def test_corrupt_manifest_is_a_user_error(tmp_path):
    (tmp_path / "synth.json").write_text("{not json")
    with pytest.raises(SyntheticDatasetError, match="synth.json"):
        build_synthetic_dataset(tmp_path, 3, seed=0, **SMALL)


@pytest.mark.parametrize("bad", [dict(num_videos=0), dict(frames=0), dict(size=8), dict(fps=0)])
def test_bad_settings(tmp_path, bad):
    settings = {"num_videos": 3, **SMALL, **bad}
    with pytest.raises(SyntheticDatasetError):
        build_synthetic_dataset(tmp_path, seed=0, **settings)


def test_split_videos():
    assert split_videos(1, 0) == ["train"]
    assert sorted(Counter(split_videos(3, 0)).values()) == [1, 1, 1]
    counts = Counter(split_videos(1000, 0))
    assert counts == {"train": 800, "val": 100, "test": 100}
    assert split_videos(50, 1) == split_videos(50, 1) and split_videos(50, 1) != split_videos(50, 2)
    assert Counter(split_videos(10, 0, (0.5, 0.5, 0.0))) == {"train": 5, "val": 5}
    with pytest.raises(SyntheticDatasetError):
        split_videos(10, 0, (0.5, 0.2, 0.2))


def test_parallel_rendering_gives_the_same_clips(tmp_path):
    settings = dict(frames=2, size=32, fps=4, progress=False)
    build_synthetic_dataset(tmp_path / "one", 64, seed=9, workers=1, **settings)
    build_synthetic_dataset(tmp_path / "two", 64, seed=9, workers=2, **settings)
    for index in (0, 31, 63):
        name = f"videos/v{index:06d}.mp4"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_format_summary(built):
    _, summary = built
    lines = list(format_summary(summary))
    assert "20 videos" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(SPLITS)
    assert all("records" in line and "unanswerable" in line and "object" in line for line in lines[1:])


# ------------------------------------------------------------------------------ whose folder, how complete
def test_a_folder_with_other_files_is_refused_and_left_as_it_was(tmp_path):
    """The user's own data without the builder's manifest (e.g. their train.jsonl, no val.jsonl)."""
    mine = tmp_path / "train.jsonl"
    mine.write_text('{"id": "mine"}\n')
    with pytest.raises(SyntheticDatasetError, match="not empty and was not built by synth"):
        build_synthetic_dataset(tmp_path, 3, seed=0, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"] and mine.read_text() == '{"id": "mine"}\n'
    (tmp_path / "file").write_text("x")
    with pytest.raises(SyntheticDatasetError, match="not empty"):
        build_synthetic_dataset(tmp_path / "file", 3, seed=0, **SMALL)


def test_the_manifest_records_the_clip_count_and_whether_the_build_finished(built):
    out, _ = built
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["records"] == {"num_videos": 20, "fractions": [0.8, 0.1, 0.1], "describe": ["train"]}
    assert manifest["complete"] is True and manifest["generator_version"] == GENERATOR_VERSION
    assert check_synthetic_folder(out) == manifest
    assert check_synthetic_folder(out / "videos") is None, "not a synth folder"


def test_an_interrupted_growth_is_refused_until_rerun(built, tmp_path, monkeypatch):
    """Growing a 20-clip set to 25 is interrupted after the new clips, before the record files: the old
    20-clip train.jsonl beside the new clips is never taken for the 25-clip set."""
    import shutil

    import datamodules.shapes.dataset as dataset

    out = tmp_path / "data"
    shutil.copytree(built[0], out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "write_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_synthetic_dataset(out, 25, seed=3, **SMALL)
    monkeypatch.undo()
    assert len(list((out / "videos").glob("*.mp4"))) == 25
    assert len({r.video for r in read_records(out / "train.jsonl")[0]}) == 16, "the old record file"
    with pytest.raises(SyntheticDatasetError, match="interrupted") as info:
        check_synthetic_folder(out)
    assert f"synth --out {out} --num-videos 25 --seed 3 --frames 4 --size 48 --fps 4 --split 0.8,0.1,0.1 " \
           "--describe train" in str(info.value)
    summary = build_synthetic_dataset(out, 25, seed=3, **SMALL)
    assert summary["rendered"] == 0 and check_synthetic_folder(out)["records"]["num_videos"] == 25
    assert sum(len({r.video for r in records}) for records in load(out).values()) == 25


def test_a_folder_of_an_earlier_generator_version_gets_a_clear_message_and_is_kept(built, tmp_path):
    import shutil

    out = tmp_path / "data"
    shutil.copytree(built[0], out)
    manifest = json.loads((out / "synth.json").read_text())
    old = {"generator_version": 3, "seed": manifest["seed"], "world": manifest["world"]}
    (out / "synth.json").write_text(json.dumps(old))
    stale = f"generator version 3, not {GENERATOR_VERSION}: delete the folder and rerun"
    with pytest.raises(SyntheticDatasetError, match=stale):
        check_synthetic_folder(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SyntheticDatasetError, match="version 3, whose clips and records differ"):
        build_synthetic_dataset(out, 20, seed=3, **SMALL)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "nothing overwritten"
