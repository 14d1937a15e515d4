"""Real-data sources on small fixtures: MOMA-LRG graphs, DiDeMo descriptions, Video-ChatGPT QA.

Covers the loaders and their errors, each perturbation with its substring traps ("cup" / "cupboard",
"red" / "redwood", "back" / "background"), the splits, and `generate` / `import-videochatgpt` end to end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from datamodules.__main__ import main
from datamodules.perturb import (
    ATTRIBUTE_GROUPS,
    SKIP_ANNOTATED,
    SKIP_ATTRIBUTE_DESCRIBED,
    SKIP_EQUALS_TRUE_FACT,
    SKIP_NO_ABSENT_ENTITY,
    GraphFact,
    Perturbation,
    Skip,
    VideoGraph,
    find_attribute_words,
    perturb_attribute_word,
    perturb_entity,
    perturb_predicate,
)
from datamodules.records import read_records
from datamodules.sources import didemo, moma
from datamodules.sources.common import AnnotationError, Candidate
from datamodules.sources.videochatgpt import import_videochatgpt
from datamodules.writers import TemplateWriter

FIXTURES = Path(__file__).parent / "fixtures"
MOMA = FIXTURES / "moma"
DIDEMO_TRAIN = FIXTURES / "didemo" / "train_data.json"


@pytest.fixture(scope="module")
def moma_videos() -> dict[str, moma.MomaVideo]:
    return {v.graph.video: v for v in moma.load_moma(MOMA / "anns.json")}


@pytest.fixture(scope="module")
def taxonomy() -> moma.MomaTaxonomy:
    return moma.load_taxonomy(MOMA / "taxonomy")


def candidates_of(stream) -> tuple[list[Candidate], list[Skip]]:
    items = list(stream)
    return [c for c in items if isinstance(c, Candidate)], [s for s in items if isinstance(s, Skip)]


# ============================================================================================ MOMA-LRG
def test_moma_facts_are_concrete_predicate_instances(moma_videos) -> None:
    graph = moma_videos["Kx81vQz2mPo.mp4"].graph
    texts = {f.text for f in graph.facts}
    assert {"barber holding comb", "barber touching comb", "towel on top of customer", "customer sitting",
            "barber talking to customer", "barber holding razor"} <= texts
    assert graph.actors == {"barber", "customer"} and graph.objects == {"comb", "chair", "towel", "razor"}
    assert len(texts) == len(graph.facts)  # a fact seen in two interactions is one fact


def test_moma_splits_are_the_source_split_file(moma_videos) -> None:
    splits = moma.load_splits(MOMA / "splits" / "standard.json")
    videos = list(moma_videos.values())
    chosen = {name: {v.graph.video for v in moma.select_split(videos, splits, name, "s")} for name in splits}
    # Videos are matched by activity id ("a81f3c2e") or by file-name stem.
    assert chosen == {"train": {"Kx81vQz2mPo.mp4", "p0BzW4nTqLe.mp4", "Zr5uYt7wQ0c.mp4"},
                      "val": {"Qm2sLk9vBnA.mp4"}, "test": {"Wt6hJp3cXe8.mp4"}}


def test_overlapping_splits_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "standard.json"
    path.write_text(json.dumps({"train": ["a", "b"], "test": ["b"]}))
    with pytest.raises(AnnotationError, match=r"standard.json: field 'train': video 'b' is also in split"):
        moma.load_splits(path)


def test_whole_name_matching_cup_is_not_in_cupboard(moma_videos) -> None:
    graph = moma_videos["Zr5uYt7wQ0c.mp4"].graph  # shows a cup and a cupboard
    assert {f.text for f in graph.facts_with("cup")} == {
        "bartender holding cup", "mug next to cup", "cup on top of table"}
    assert "cupboard" not in " ".join(f.text for f in graph.facts_with("cup"))


def test_object_swap_picks_absent_members_of_the_category(moma_videos, taxonomy) -> None:
    # p0BzW4nTqLe shows a cupboard, a plate and a glass but no cup: "cup" is absent by whole name, so it
    # may replace the plate; a substring test would wrongly find it inside "cupboard".
    graph = moma_videos["p0BzW4nTqLe.mp4"].graph
    fact = GraphFact("transitive_actions", "[src] holding [trg]", "waiter", "plate")
    _, members = taxonomy.category("plate", "object")
    picked = set()
    for seed in range(60):
        p = perturb_entity(graph, fact, "plate", members, random.Random(seed))
        assert isinstance(p, Perturbation) and p.category == "object"
        assert p.false_fact == f"waiter holding {p.missing_element}"
        picked.add(p.missing_element)
    assert picked == {"cup", "bowl", "mug"}  # never "plate" or "glass": both are in the video


def test_object_swap_replaces_only_the_entity_slot(moma_videos, taxonomy) -> None:
    graph = moma_videos["Zr5uYt7wQ0c.mp4"].graph
    _, members = taxonomy.category("cup", "object")
    for fact in graph.facts_with("cup"):
        for seed in range(20):
            p = perturb_entity(graph, fact, "cup", members, random.Random(seed))
            assert p.missing_element in {"plate", "bowl", "glass"}  # the mug is in the video
            assert p.false_fact == fact.text.replace("cup", p.missing_element)
    opening = GraphFact("transitive_actions", "[src] opening [trg]", "bartender", "cupboard")
    _, furniture = taxonomy.category("cupboard", "object")
    results = {perturb_entity(graph, opening, "cupboard", furniture, random.Random(s)).false_fact
               for s in range(30)}
    assert results == {"bartender opening chair", "bartender opening sofa"}  # the table is in the video


def test_object_swap_drops(moma_videos) -> None:
    graph = moma_videos["Kx81vQz2mPo.mp4"].graph
    fact = GraphFact("transitive_actions", "[src] holding [trg]", "barber", "comb")
    none_absent = perturb_entity(graph, fact, "comb", ["comb", "razor"], random.Random(0))
    assert none_absent == Skip(SKIP_NO_ABSENT_ENTITY)
    # A graph whose facts mention an entity that its entity lists lack: the swap gives a true fact.
    odd = VideoGraph("v.mp4", frozenset({"barber"}), frozenset({"comb"}),
                     (fact, GraphFact("transitive_actions", "[src] holding [trg]", "barber", "brush")))
    assert perturb_entity(odd, fact, "comb", ["brush"], random.Random(0)) == Skip(SKIP_EQUALS_TRUE_FACT)


def test_object_candidates_never_name_a_present_entity_or_a_placeholder(moma_videos, taxonomy) -> None:
    videos = list(moma_videos.values())
    found, skipped = candidates_of(moma.object_candidates(videos, taxonomy, random.Random(5), "all"))
    assert found and {s.reason for s in skipped} <= {SKIP_NO_ABSENT_ENTITY, moma.SKIP_PLACEHOLDER}
    assert [s.reason for s in skipped].count(moma.SKIP_PLACEHOLDER) == 1  # "unsure standing"
    for c in found:
        graph = moma_videos[c.video].graph
        assert c.perturbation.missing_element not in graph.actors | graph.objects
        assert "unsure" not in c.perturbation.false_fact and "unsure" not in c.perturbation.true_fact
        assert c.perturbation.true_fact in {f.text for f in graph.facts}


def test_relation_swap_keeps_type_arity_and_node_types_and_drops_annotated(moma_videos, taxonomy) -> None:
    graph = moma_videos["Kx81vQz2mPo.mp4"].graph
    holding = next(f for f in graph.facts if f.text == "barber holding comb")
    templates = taxonomy.templates_for(holding, graph)
    assert "[src] touching [trg]" in templates and "[src] talking to [trg]" not in templates  # comb: object
    outcomes = [perturb_predicate(graph, holding, templates, random.Random(seed)) for seed in range(80)]
    made = {p.false_fact for p in outcomes if isinstance(p, Perturbation)}
    assert Skip(SKIP_ANNOTATED) in outcomes  # "barber touching comb" is annotated: dropped
    assert "barber touching comb" not in made and made <= {
        "barber cutting comb", "barber wiping comb", "barber pouring into comb", "barber opening comb"}
    sitting = next(f for f in graph.facts if f.text == "customer sitting")
    unary = [perturb_predicate(graph, sitting, taxonomy.templates_for(sitting, graph), random.Random(s))
             for s in range(40)]
    assert Skip(SKIP_ANNOTATED) in unary  # "customer talking" is annotated too
    assert {p.false_fact for p in unary if isinstance(p, Perturbation)} == {
        "customer standing", "customer walking", "customer laughing"}


def test_relation_candidates_are_false_for_their_video(moma_videos, taxonomy) -> None:
    videos = list(moma_videos.values())
    found, skipped = candidates_of(moma.relation_candidates(videos, taxonomy, random.Random(1), "all"))
    assert found and {s.reason for s in skipped} <= {SKIP_ANNOTATED, moma.SKIP_PLACEHOLDER}
    for c in found:
        assert c.perturbation.false_fact not in {f.text for f in moma_videos[c.video].graph.facts}
        assert c.perturbation.missing_element == c.perturbation.false_fact


def test_candidates_are_deterministic_for_a_seed(moma_videos, taxonomy) -> None:
    videos = list(moma_videos.values())

    def run(seed: int) -> list:
        return list(moma.object_candidates(videos, taxonomy, random.Random(seed)))

    assert run(3) == run(3) and run(3) != run(4)


def test_dangling_entity_ids_are_counted(tmp_path: Path, taxonomy) -> None:
    video = json.loads((MOMA / "anns.json").read_text())[0]
    interaction = video["activity"]["sub_activities"][0]["higher_order_interactions"][0]
    interaction["transitive_actions"].append({"class_name": "[src] holding [trg]", "source_id": "A",
                                              "target_id": "99"})
    path = tmp_path / "anns.json"
    path.write_text(json.dumps([video]))
    (loaded,) = moma.load_moma(path)
    assert loaded.dangling == 1
    _, skipped = candidates_of(moma.relation_candidates([loaded], taxonomy, random.Random(0)))
    assert Skip(moma.SKIP_DANGLING) in skipped


def test_bad_moma_annotations_name_file_item_and_field(tmp_path: Path) -> None:
    path = tmp_path / "anns.json"
    path.write_text(json.dumps([{"file_name": "a.mp4", "activity": {"id": "a", "sub_activities": [
        {"higher_order_interactions": [{"actors": [{"id": "A"}], "objects": []}]}]}}]))
    message = r"anns.json, video 0 \(a.mp4\) .*actors\[0\]: field 'class_name': missing"
    with pytest.raises(AnnotationError, match=message):
        moma.load_moma(path)
    path.write_text("[{")
    with pytest.raises(AnnotationError, match="anns.json, line 1: invalid JSON"):
        moma.load_moma(path)
    with pytest.raises(AnnotationError, match="no such taxonomy folder"):
        moma.load_taxonomy(tmp_path / "missing")


# ============================================================================================== DiDeMo
@pytest.mark.parametrize(
    "description, expected",
    [
        ("a red light blinks under the drums.", [("red", "colour", "light")]),
        ("a man walks past a redwood tree", []),  # "red" inside "redwood"
        ("the background turns dark when he left the room", []),  # "back" inside "background"; verb "left"
        ("the dog runs right after the ball is thrown", []),  # "right after" is no position
        ("a girl with a backpack drinks a glass of water", []),  # "glass" as a noun
        ("the boy on the left waves at the camera", [("left", "position", None)]),
        ("the door is open", [("open", "state", None)]),
        ("the small brown dog jumps", [("small", "size", "brown dog"), ("brown", "colour", "dog")]),
        ("the wooden table is covered with a white cloth",
         [("wooden", "material", "table"), ("white", "colour", "cloth")]),
        ("A Red-Colored kite flies", []),  # a hyphenated word is one word
    ],
)
def test_attribute_words_are_whole_words_in_context(description: str, expected: list) -> None:
    assert [(w.word.lower(), w.group, w.head) for w in find_attribute_words(description)] == expected


def test_attribute_replacements_skip_near_synonyms_and_substrings() -> None:
    colour = ATTRIBUTE_GROUPS["colour"]
    assert not {"reddish", "maroon", "red"} & set(colour.replacements("red"))
    assert not {"gray", "grey", "silver"} & set(colour.replacements("grey"))
    assert not {"green", "blue", "teal"} & set(colour.replacements("turquoise"))
    assert not {"large", "huge", "big"} & set(ATTRIBUTE_GROUPS["size"].replacements("big"))
    assert not {"middle", "centre", "center"} & set(ATTRIBUTE_GROUPS["position"].replacements("center"))
    assert "blue" in colour.replacements("red") and "small" in ATTRIBUTE_GROUPS["size"].replacements("big")


def test_attribute_swap_changes_only_that_word() -> None:
    description = "a red ball rolls past the redwood and a Red car"
    first, second = find_attribute_words(description)
    for seed in range(30):
        p = perturb_attribute_word(description, first, random.Random(seed))
        assert p.false_fact == f"a {p.missing_element} ball rolls past the redwood and a Red car"
        assert p.slots["phrase"] == f"{p.missing_element} ball"
        q = perturb_attribute_word(description, second, random.Random(seed))
        assert q.false_fact.startswith("a red ball rolls past the redwood and a ")
        assert q.false_fact.split()[-2][0].isupper()  # "Red" -> "Blue": the capital is kept


def test_attribute_swap_drops_values_described_for_the_video() -> None:
    moments = didemo.load_didemo(DIDEMO_TRAIN)
    red_car = next(m for m in moments if m.description == "the red car appears for the first time")
    others = [m.description for m in moments if m.video == red_car.video and m is not red_car]
    (site,) = find_attribute_words(red_car.description)
    outcomes = [perturb_attribute_word(red_car.description, site, random.Random(s), others)
                for s in range(100)]
    assert Skip(SKIP_ATTRIBUTE_DESCRIBED) in outcomes  # "blue" (a blue car) and "white" (a white cloth)
    made = {p.missing_element for p in outcomes if isinstance(p, Perturbation)}
    assert made and not made & {"blue", "white", "bluish", "navy", "whitish"}


def test_didemo_candidates_and_split_from_the_file_name() -> None:
    moments = didemo.load_didemo(DIDEMO_TRAIN)
    assert didemo.resolve_split(DIDEMO_TRAIN, None) == "train"
    found, skipped = candidates_of(didemo.attribute_candidates(moments, random.Random(0), "train"))
    assert len(found) == 10 and all(c.source == "didemo" and c.meta["split"] == "train" for c in found)
    assert {c.video for c in found} <= {m.video for m in moments}
    reasons = [s.reason for s in skipped]
    assert reasons.count(didemo.SKIP_NO_ATTRIBUTE) == 5 and reasons.count(SKIP_ATTRIBUTE_DESCRIBED) == 3


def test_didemo_split_argument(tmp_path: Path) -> None:
    assert didemo.split_from_name("val_data.json") == "val" and didemo.split_from_name("moments.json") is None
    assert didemo.resolve_split(tmp_path / "moments.json", "test") == "test"
    with pytest.raises(AnnotationError, match="cannot tell its split from the file name; pass --split"):
        didemo.resolve_split(tmp_path / "moments.json", None)
    with pytest.raises(AnnotationError, match="--split test contradicts the file name"):
        didemo.resolve_split(DIDEMO_TRAIN, "test")


def test_bad_didemo_file_names_the_moment_and_field(tmp_path: Path) -> None:
    path = tmp_path / "train_data.json"
    path.write_text(json.dumps([{"video": "a.mp4", "description": "a red car"}, {"video": "b.mp4"}]))
    with pytest.raises(AnnotationError, match=r"train_data.json, moment 1: field 'description': missing"):
        didemo.load_didemo(path)


# ================================================================================ writers and the CLI
def test_template_writer_phrases_real_perturbations() -> None:
    items = [
        Perturbation("object", "barber holding comb", "barber holding belt", "belt", {}),
        Perturbation("relation", "barber holding comb", "barber cutting comb", "barber cutting comb", {}),
        Perturbation("attribute", "a red light blinks.", "a pinkish light blinks.", "pinkish",
                     {"phrase": "pinkish light"}),
        Perturbation("attribute", "the door is open", "the door is closed", "closed", {"phrase": None}),
    ]
    written = TemplateWriter(seed=0).write(items)
    assert written[0].answer == "The question is unanswerable because there is no belt in the video."
    assert "belt" in written[0].question
    assert written[1].answer.endswith("does not show the barber cutting comb.")
    assert "barber cutting comb" in written[1].question
    assert "pinkish light" in written[2].question
    assert written[2].answer.endswith("no pinkish light in the video.")
    assert written[3].answer.endswith("does not show that the door is closed.")
    assert TemplateWriter(seed=0).write(items) == written


@pytest.mark.parametrize(
    "source, annotations, category, split, videos",
    [
        ("moma", MOMA / "anns.json", "object", "train",
         {"Kx81vQz2mPo.mp4", "p0BzW4nTqLe.mp4", "Zr5uYt7wQ0c.mp4"}),
        ("moma", MOMA / "anns.json", "relation", "val", {"Qm2sLk9vBnA.mp4"}),
        ("didemo", DIDEMO_TRAIN, "attribute", None, None),
    ],
)
def test_generate_with_template_writer(tmp_path, capsys, source, annotations, category, split, videos):
    out = tmp_path / f"{category}.jsonl"
    args = ["generate", "--source", source, "--annotations", str(annotations), "--category", category,
            "--num", "6", "--seed", "2"] + (["--split", split] if split else []) + ["--out", str(out)]
    assert main(args) == 0
    records, _ = read_records(out)
    assert 1 <= len(records) <= 6 and len({r.id for r in records}) == len(records)
    assert all(r.source == source and r.category == category and not r.answerable for r in records)
    assert all(r.meta["split"] == (split or "train") and r.meta["writer"] == "template" for r in records)
    assert all(r.missing_element.lower() in (r.question + r.answer).lower() for r in records)
    if videos is not None:
        assert {r.video for r in records} <= videos
    assert "written:" in capsys.readouterr().out
    again = tmp_path / "again.jsonl"
    assert main(args[:-1] + [str(again)]) == 0
    assert again.read_text() == out.read_text()  # deterministic for a seed


def test_generate_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    base = ["generate", "--num", "3", "--out", str(tmp_path / "o.jsonl")]
    cases = [
        (["--source", "moma", "--annotations", str(MOMA / "anns.json"), "--category", "attribute"],
         "--source moma gives the categories object, relation, not attribute"),
        (["--source", "moma", "--annotations", str(tmp_path / "anns.json"), "--category", "object"],
         "anns.json: no such annotation file"),
        (["--source", "moma", "--annotations", str(MOMA / "anns.json"), "--category", "object",
          "--splits", str(tmp_path / "s.json")], "s.json: no such split file"),
        (["--source", "didemo", "--annotations", str(DIDEMO_TRAIN), "--category", "attribute",
          "--split", "val"], "--split val contradicts the file name"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


# ======================================================================================= Video-ChatGPT
def test_import_videochatgpt(tmp_path: Path, capsys) -> None:
    records, summary = import_videochatgpt(FIXTURES / "videochatgpt" / "VideoInstruct_Dataset.json")
    assert [r.video for r in records] == ["v_k_ZXmr8pmrs.mp4", "v_Xn7cBKq4aVo.mp4", "v_3Hq0dLfYb8w.mp4"]
    assert all(r.answerable and r.category is None and r.source == "videochatgpt" for r in records)
    assert summary.dropped == {"exact duplicate": 1, "empty question or answer": 1}
    out = tmp_path / "vcg.jsonl"
    args = ["import-videochatgpt", "--input", str(FIXTURES / "videochatgpt" / "VideoInstruct_Dataset.json"),
            "--out", str(out)]
    assert main(args) == 0
    assert read_records(out)[0] == records
    assert "wrote 3 answerable records; dropped empty question or answer: 1, exact duplicate: 1" in (
        capsys.readouterr().out)


def test_import_videochatgpt_bad_item(tmp_path: Path, capsys) -> None:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"video_id": "v_1", "q": "Why?", "a": "Because."},
                                {"video_id": "v_2", "a": "x"}]))
    assert main(["import-videochatgpt", "--input", str(path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "qa.json, item 1: field 'q': missing" in capsys.readouterr().err


# ==================================================================================== output = input
@pytest.mark.parametrize("importer", ["videochatgpt", "generate-moma", "generate-moma-splits",
                                      "generate-moma-taxonomy", "generate-didemo"])
def test_an_importer_refuses_an_output_that_is_its_input(tmp_path: Path, capsys, importer) -> None:
    """Copies of the inputs, the output given as one of them (by another spelling of the path): one line,
    exit status 2, the input unchanged and no partial file beside it."""
    import shutil

    shutil.copytree(FIXTURES, tmp_path / "fixtures")
    moma_dir = tmp_path / "fixtures" / "moma"
    inputs = {
        "videochatgpt": tmp_path / "fixtures" / "videochatgpt" / "VideoInstruct_Dataset.json",
        "generate-moma": moma_dir / "anns.json",
        "generate-moma-splits": moma_dir / "splits" / "standard.json",
        "generate-moma-taxonomy": moma_dir / "taxonomy" / "object.json",
        "generate-didemo": tmp_path / "fixtures" / "didemo" / "train_data.json",
    }
    victim = inputs[importer]
    out = victim.parent / ".." / victim.parent.name / victim.name  # the same file, spelled differently
    if importer == "videochatgpt":
        args = ["import-videochatgpt", "--input", str(victim), "--out", str(out)]
    elif importer == "generate-didemo":
        args = ["generate", "--source", "didemo", "--annotations", str(victim), "--category", "attribute",
                "--num", "2", "--out", str(out)]
    else:
        args = ["generate", "--source", "moma", "--annotations", str(moma_dir / "anns.json"),
                "--category", "object", "--num", "2", "--out", str(out)]
    before = {p: p.read_bytes() for p in (tmp_path / "fixtures").rglob("*") if p.is_file()}
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the input" in err[0] and victim.name in err[0], err
    after = {p: p.read_bytes() for p in (tmp_path / "fixtures").rglob("*") if p.is_file()}
    assert after == before
