"""Synthetic questions: references resolved exactly, perturbations checked false, balanced forms, writer."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from datamodules.perturb import Perturbation
from datamodules.records import REFUSAL_TEMPLATE
from datamodules.shapes.questions import (
    ABSENT_THINGS,
    FORMS,
    GENERAL_FORMS,
    REF_KINDS,
    VERIFY_ANSWERS,
    Fact,
    QuestionSpec,
    Ref,
    ShapesWriter,
    answer_choices,
    answerable_specs,
    describe_item,
    describe_scene,
    form_fits,
    general_items,
    is_false,
    perturb_attribute,
    perturb_object,
    perturb_relation,
    resolve_ref,
    split_words,
    synthetic_items,
    template_vocabulary,
    true_answer,
    unwarranted_refusal,
    verify_items,
)
from datamodules.shapes.world import Scene, SceneObject, WorldConfig, sample_scene

WORLD = WorldConfig()


def known_scene() -> Scene:
    """A small red circle touching a large blue square, both moving down; a small green star moving right, far
    from both."""
    return Scene(
        (
            SceneObject("circle", "red", "small", "down", 20, 20),
            SceneObject("square", "blue", "large", "down", 33, 20),
            SceneObject("star", "green", "small", "right", 36, 56),
        ),
        WORLD,
    )


def scenes(count: int = 300, seed: int = 0) -> list[Scene]:
    return [sample_scene(random.Random(f"{seed}:{i}")) for i in range(count)]


def test_ref_phrases_and_kinds():
    cases = [
        (Ref("circle"), "circle", "shape"),
        (Ref("circle", colour="red"), "red circle", "colour_shape"),
        (Ref("circle", size="large"), "large circle", "size_shape"),
        (Ref("circle", motion="up"), "circle moving up", "motion_shape"),
        (Ref("circle", motion="still"), "still circle", "motion_shape"),
        (Ref(colour="green"), "green object", "colour_object"),
        (Ref("circle", relation="touching", other="square"), "circle touching the square", "relational"),
    ]
    for ref, element, kind in cases:
        assert (ref.element, ref.text, ref.kind) == (element, "the " + element, kind)


@pytest.mark.parametrize(
    "bad",
    [
        dict(shape="circle", colour="red", size="small"),
        dict(shape="circle", relation="touching"),
        dict(shape=None, colour=None),
        dict(shape=None, size="small"),
    ],
)
def test_invalid_refs(bad):
    with pytest.raises(ValueError):
        Ref(**bad)


def test_resolve_ref_on_a_known_scene():
    scene = known_scene()
    assert resolve_ref(scene, Ref("circle")) == [0]
    assert resolve_ref(scene, Ref("square", colour="blue")) == [1]
    assert resolve_ref(scene, Ref("square", colour="red")) == []
    assert resolve_ref(scene, Ref(colour="green")) == [2]
    assert resolve_ref(scene, Ref(colour="white")) == []
    assert resolve_ref(scene, Ref("star", motion="right")) == [2]
    assert resolve_ref(scene, Ref("circle", motion="down")) == [0]
    assert resolve_ref(scene, Ref("circle", motion="still")) == []
    assert resolve_ref(scene, Ref("triangle")) == []
    assert scene.relations() == [(0, "touching", 1), (1, "touching", 0)]
    assert resolve_ref(scene, Ref("circle", relation="touching", other="square")) == [0]
    assert resolve_ref(scene, Ref("square", relation="touching", other="circle")) == [1]
    assert resolve_ref(scene, Ref("circle", relation="touching", other="star")) == []
    assert resolve_ref(scene, Ref("star", relation="touching", other="square")) == []


def test_true_answers_on_a_known_scene():
    scene = known_scene()
    assert true_answer(scene, QuestionSpec("colour", Ref("square", size="large"))) == "blue"
    assert true_answer(scene, QuestionSpec("shape", Ref(colour="green"))) == "star"
    assert true_answer(scene, QuestionSpec("size", Ref("circle"))) == "small"
    assert true_answer(scene, QuestionSpec("direction", Ref("square"))) == "down"
    assert true_answer(scene, QuestionSpec("direction", Ref("star"))) == "right"
    assert true_answer(scene, QuestionSpec("count")) == "three"
    assert true_answer(scene, QuestionSpec("count", Ref("circle"), relation="touching")) == "one"
    assert true_answer(scene, QuestionSpec("count", Ref(colour="green"), relation="touching")) == "zero"
    assert true_answer(scene, QuestionSpec("touch", Ref("circle"))) == "square"
    assert true_answer(scene, QuestionSpec("touch", Ref("square", size="large"))) == "circle"
    assert true_answer(scene, QuestionSpec("touch", Ref("star"))) == "nothing"
    touching_square, touching_star = (Ref("circle", relation="touching", other=o) for o in ("square", "star"))
    assert true_answer(scene, QuestionSpec("colour", touching_square)) == "red"
    assert true_answer(scene, QuestionSpec("colour", touching_star)) is None
    assert true_answer(scene, QuestionSpec("colour", Ref("triangle"))) is None


def perturbation(category: str, ref: Ref) -> Perturbation:
    return Perturbation(category, "true", "false", ref.element, {"ref": ref})


def test_is_false_checks_each_category_explicitly():
    scene = known_scene()
    # object: the shape (or colour) must be absent.
    assert is_false(scene, perturbation("object", Ref("triangle")))
    assert is_false(scene, perturbation("object", Ref("triangle", colour="red")))  # red exists, triangle not
    assert is_false(scene, perturbation("object", Ref(colour="white")))
    assert not is_false(scene, perturbation("object", Ref("circle")))
    assert not is_false(scene, perturbation("object", Ref("circle", colour="green")))  # present shape
    assert not is_false(scene, perturbation("object", Ref(colour="red")))
    # attribute: the shape is present with another colour, size or motion.
    assert is_false(scene, perturbation("attribute", Ref("circle", colour="green")))
    assert is_false(scene, perturbation("attribute", Ref("circle", size="large")))
    assert is_false(scene, perturbation("attribute", Ref("square", motion="still")))
    assert is_false(scene, perturbation("attribute", Ref("circle", motion="up")))
    assert not is_false(scene, perturbation("attribute", Ref("circle", motion="down")))
    assert not is_false(scene, perturbation("attribute", Ref("circle", colour="red")))
    assert not is_false(scene, perturbation("attribute", Ref("square", motion="down")))
    assert not is_false(scene, perturbation("attribute", Ref("triangle", colour="red")))  # absent: object
    # relation: both present and clearly apart.
    assert is_false(scene, perturbation("relation", Ref("circle", relation="touching", other="star")))
    assert is_false(scene, perturbation("relation", Ref("star", relation="touching", other="square")))
    assert not is_false(scene, perturbation("relation", Ref("circle", relation="touching", other="square")))
    assert not is_false(scene, perturbation("relation", Ref("circle", relation="touching", other="triangle")))
    # Borderline (1 px beyond their circumcircles, under the world's gap of 5 px): not clearly false.
    near = Scene((SceneObject("circle", "red", "small", "still", 20, 20),
                  SceneObject("square", "blue", "small", "still", 20 + 2 * 6.4 + 1, 20)), WORLD)
    assert not near.relations()
    assert not is_false(near, perturbation("relation", Ref("circle", relation="touching", other="square")))
    assert not is_false(scene, Perturbation("object", "t", "f", "x"))  # no reference at all


def test_perturbers_always_produce_false_facts():
    made = Counter()
    for index, scene in enumerate(scenes(400)):
        rng = random.Random(index)
        for maker in (perturb_object, perturb_attribute, perturb_relation):
            result = maker(scene, rng)
            if result is None:  # no two objects that do not touch
                assert maker is perturb_relation
                assert len(scene.objects) == 1 or (len(scene.objects) == 2 and scene.relations())
                continue
            made[result.category] += 1
            assert is_false(scene, result), result
            assert result.missing_element == result.slots["ref"].element
            assert result.true_fact != result.false_fact
    assert made["object"] == made["attribute"] == 400 and made["relation"] > 150


def all_items(count: int = 300) -> list[tuple[Scene, Fact | Perturbation]]:
    return [
        (scene, item)
        for index, scene in enumerate(scenes(count))
        for item in synthetic_items(scene, random.Random(index))
    ]


@pytest.fixture(scope="module")
def items():
    return all_items()


def test_items_per_scene():
    for index, scene in enumerate(scenes(200)):
        made = synthetic_items(scene, random.Random(index))
        facts = [i for i in made if isinstance(i, Fact)]
        perturbations = [i for i in made if isinstance(i, Perturbation)]
        assert len(facts) == 4 and 1 <= len(perturbations) <= 3
        categories = [p.category for p in perturbations]
        assert len(set(categories)) == len(categories)  # at most one per category
        assert {"object", "attribute"} <= set(categories) or len(scene.objects) == 1
        specs = [i.slots["spec"] for i in made]
        assert len(set(specs)) == len(specs)
    smaller = synthetic_items(scenes(1)[0], random.Random(0), num_answerable=2, num_unanswerable=1)
    assert [isinstance(i, Fact) for i in smaller] == [True, True, False]


def test_items_are_deterministic():
    scene = scenes(1)[0]
    assert synthetic_items(scene, random.Random(5)) == synthetic_items(scene, random.Random(5))


def test_answerable_items_are_exact_and_unanswerable_ones_false(items):
    for scene, item in items:
        spec: QuestionSpec = item.slots["spec"]
        assert spec.form in FORMS
        assert all(form_fits(spec.form, ref) for ref in spec.refs())  # never asks a stated attribute
        if isinstance(item, Fact):
            assert true_answer(scene, spec) == item.answer and item.answer in answer_choices(spec)
            assert all(len(resolve_ref(scene, ref)) == 1 for ref in spec.refs())
        else:
            assert is_false(scene, item)
            assert true_answer(scene, spec) is None
            false_ref = item.slots["ref"]
            assert false_ref in spec.refs() and resolve_ref(scene, false_ref) == []
            assert all(len(resolve_ref(scene, r)) == 1 for r in spec.refs() if r != false_ref)
            assert item.slots["hallucination"] in answer_choices(spec)


def test_attribute_questions_never_ask_the_wrong_attribute(items):
    for _, item in items:
        if isinstance(item, Perturbation) and item.category == "attribute":
            ref, form = item.slots["ref"], item.slots["spec"].form
            wrong = "colour" if ref.colour else "size" if ref.size else "direction"
            assert form != wrong and form != "shape"


def test_every_unanswerable_form_and_reference_kind_also_has_answerable_questions(items):
    answerable, unanswerable = Counter(), Counter()
    for _, item in items:
        spec = item.slots["spec"]
        if isinstance(item, Fact):
            for ref in spec.refs():
                answerable[spec.form, ref.kind] += 1
            answerable[spec.form] += 1
        else:
            unanswerable[spec.form, item.slots["ref"].kind] += 1
            unanswerable[spec.form] += 1
    for key in unanswerable:
        assert answerable[key] > 0, key
    for form in FORMS:
        assert answerable[form] > 0 and unanswerable[form] > 0, form
    # No form is (nearly) always unanswerable.
    for form in FORMS:
        assert answerable[form] >= 0.5 * unanswerable[form], form


def test_all_categories_and_reference_kinds_occur(items):
    categories = Counter(i.category for _, i in items if isinstance(i, Perturbation))
    assert set(categories) == {"object", "attribute", "relation"}
    kinds = Counter(i.slots["ref"].kind for _, i in items if isinstance(i, Perturbation))
    assert set(kinds) == set(REF_KINDS)


def test_hallucination_answers_about_the_look_alike_object():
    scene = known_scene()
    seen = 0
    for seed in range(60):
        items = synthetic_items(scene, random.Random(seed))
        for item in items:
            if isinstance(item, Perturbation) and item.category == "attribute":
                spec = item.slots["spec"]
                if spec.form == "size" and item.slots["ref"].shape == "circle":
                    assert item.slots["hallucination"] == "small"  # the size of the actual circle
                    seen += 1
    assert seen


def test_answerable_specs_cover_the_forms():
    scene = known_scene()
    for form in FORMS:
        specs = answerable_specs(scene, form)
        assert specs and all(true_answer(scene, s) is not None for s in specs)
    assert QuestionSpec("count") in answerable_specs(scene, "count")
    alone = Scene((known_scene().objects[2],), WORLD)
    assert {true_answer(alone, spec) for spec in answerable_specs(alone, "touch")} == {"nothing"}
    assert not any(ref.kind == "relational" for form in FORMS for spec in answerable_specs(alone, form)
                   for ref in spec.refs())


# ------------------------------------------------------------------------------------------ writer
def test_template_writer_phrases_items():
    scene = known_scene()
    made = synthetic_items(scene, random.Random(1))
    written = ShapesWriter(3).write(made)
    assert len(written) == len(made)
    for item, text in zip(made, written, strict=True):
        assert text is not None
        assert text.question.endswith("?") and text.question[0].isupper()
        spec = item.slots["spec"]
        for ref in spec.refs():
            assert ref.text in text.question
        if isinstance(item, Fact):
            assert text.answer == item.answer
        else:
            assert text.answer == REFUSAL_TEMPLATE.format(missing=item.missing_element)


def test_template_writer_is_deterministic_and_seeded():
    specs = [item.slots["spec"] for _, item in all_items(30)]
    items = [Fact("f", "a", {"spec": spec}) for spec in specs]
    first, again = ShapesWriter(0).write(items), ShapesWriter(0).write(items)
    assert first == again
    assert ShapesWriter(0).write(items[::-1]) == first[::-1]  # independent of the order of items
    other = ShapesWriter(1).write(items)
    assert other != first and sum(a == b for a, b in zip(first, other, strict=True)) > len(items) / 4


def test_template_writer_examples():
    writer = ShapesWriter(0)
    phrasings = {
        QuestionSpec("colour", Ref("circle", size="small")): {
            "What colour is the small circle?", "What is the colour of the small circle?"},
        QuestionSpec("count", Ref("star"), relation="touching"): {
            "How many objects are touching the star?",
            "How many objects can be seen touching the star?"},
        QuestionSpec("count"): {"How many objects are there?", "How many objects are in the video?"},
        QuestionSpec("touch", Ref(colour="red")): {
            "What is the red object touching?", "Which object is the red object touching?"},
        QuestionSpec("direction", Ref("square", relation="touching", other="star")): {
            "Which direction is the square touching the star moving?",
            "In which direction is the square touching the star moving?"},
    }
    for spec, allowed in phrasings.items():
        seen = {ShapesWriter(seed).question(spec) for seed in range(40)}
        assert seen == allowed
        assert writer.question(spec) in allowed


def test_template_writer_returns_none_for_items_it_cannot_phrase():
    assert ShapesWriter(0).write([Fact("the circle is red", "red")]) == [None]  # no spec


def test_unwarranted_refusal_names_the_reference():
    spec = QuestionSpec("colour", Ref("circle", relation="touching", other="square"))
    assert unwarranted_refusal(spec) == (
        "The question is unanswerable because there is no circle touching the square in the video."
    )
    assert "no object in the video" in unwarranted_refusal(QuestionSpec("count"))


def test_split_words():
    assert split_words("Is the red circle, or not? Yes.") == [
        "is", "the", "red", "circle", ",", "or", "not", "?", "yes", "."
    ]


def test_general_refusals_are_unanswerable_whatever_the_clip_shows():
    forms = Counter()
    for index, scene in enumerate(scenes(200)):
        (item,) = general_items(scene, random.Random(index))
        spec, ref = item.slots["spec"], item.slots["ref"]
        forms[spec.form] += 1
        assert item.slots["general"] is True and true_answer(scene, spec) is None
        if spec.form in GENERAL_FORMS:  # sound, speech, who films: no clip of the world has them
            assert item.missing_element == GENERAL_FORMS[spec.form]
            assert item.category == ("object" if spec.form == "camera" else "attribute")
        else:  # a thing the world never has, in one of the clip's own question forms
            assert ref.shape in ABSENT_THINGS and not resolve_ref(scene, ref) and spec.form in FORMS
            assert item.missing_element == ref.element and item.category == "object"
        (written,) = ShapesWriter(index).write([item])
        assert written.answer == REFUSAL_TEMPLATE.format(missing=item.missing_element)
        assert set(split_words(written.question + " " + written.answer)) <= set(template_vocabulary())
    assert set(forms) == {*GENERAL_FORMS, *FORMS} - {"shape"}  # "shape" asks about "the red object"
    assert sum(forms[form] for form in GENERAL_FORMS) > 60 and sum(forms[form] for form in FORMS) > 60


def test_vocabulary_covers_every_generated_word(items):
    vocabulary = set(template_vocabulary())
    assert template_vocabulary() == sorted(vocabulary)
    assert all(word == word.lower() for word in vocabulary) and {"?", "."} <= vocabulary
    used = set()
    dense = []  # the caption, the qualifier checks and the general refusals of each scene
    for index, scene in enumerate(dict.fromkeys(scene for scene, _ in items)):
        dense += [describe_item(scene), *verify_items(scene, random.Random(index))]
        dense += general_items(scene, random.Random(index), num=3)
    for index, item in enumerate([*(item for _, item in items), *dense]):
        (written,) = ShapesWriter(index).write([item])
        spec = item.slots["spec"]
        is_fact = isinstance(item, Fact)
        rejected = unwarranted_refusal(spec) if is_fact else item.slots.get("hallucination", written.answer)
        for text in (written.question, written.answer, rejected):
            words = split_words(text)
            assert "".join(words) == "".join(text.lower().split()), text  # nothing dropped by the split
            used.update(words)
    assert used <= vocabulary, sorted(used - vocabulary)
    assert len(vocabulary - used) <= 3, sorted(vocabulary - used)  # and nearly every word is used


def test_the_caption_names_every_object_left_to_right_with_all_its_attributes():
    scene = Scene(
        objects=(
            SceneObject("star", "blue", "small", "still", 40.0, 10.0),
            SceneObject("square", "red", "large", "up", 12.0, 30.0),
        ),
        world=WorldConfig(),
    )
    assert describe_scene(scene) == "large red square moving up, small blue star standing still"
    item = describe_item(scene)
    assert item.answer == describe_scene(scene) and true_answer(scene, item.slots["spec"]) == item.answer
    assert item.fact == "the video shows large red square moving up, small blue star standing still"
    (written,) = ShapesWriter(0).write([item])
    assert written.question in ("What objects are in the video?", "Describe the objects in the video.")
    assert written.answer == item.answer
    for scene in scenes(50):  # every object once, each with its four attributes
        parts = describe_scene(scene).split(", ")
        assert len(parts) == len(scene.objects)
        named = {tuple(part.split()[:3]) for part in parts}
        assert named == {(o.size, o.colour, o.shape) for o in scene.objects}
    # What an object touches follows its attributes, said from both sides.
    assert describe_scene(known_scene()) == (
        "small red circle moving down touching the square, "
        "large blue square moving down touching the circle, small green star moving right"
    )


def test_a_qualifier_check_asks_one_attribute_of_a_present_object():
    scene = known_scene()  # a small red circle touching a large blue square (both down), a green star (right)
    writer = ShapesWriter(0)
    cases = [
        (Ref("circle", colour="red"), "yes", "red", "the circle is red"),
        (Ref("square", size="small"), "no", "small", "the square is not small"),
        (Ref("circle", motion="still"), "no", "standing still", "the circle is not standing still"),
        (Ref("star", motion="right"), "yes", "moving right", "the star is moving right"),
        (Ref("square", relation="touching", other="circle"), "yes", "touching the circle",
         "the square is touching the circle"),
        (Ref("star", relation="touching", other="circle"), "no", "touching the circle",
         "the star is not touching the circle"),
    ]
    for ref, answer, predicate, fact in cases:
        spec = QuestionSpec("verify", ref)
        assert ref.predicate == predicate and true_answer(scene, spec) == answer
        assert answer_choices(spec) == VERIFY_ANSWERS
        item = Fact(fact, answer, {"spec": spec})
        (written,) = writer.write([item])
        phrasings = (f"Is the {ref.shape} {predicate}?", f"Is the {ref.shape} in the video {predicate}?")
        assert written.question in phrasings
        assert written.answer == answer
        assert unwarranted_refusal(spec) == REFUSAL_TEMPLATE.format(missing=ref.shape)
    assert true_answer(scene, QuestionSpec("verify", Ref("heart", colour="red"))) is None  # no heart
    with pytest.raises(ValueError, match="predicate"):
        _ = Ref("circle").predicate


def test_qualifier_checks_are_true_or_false_at_even_odds_about_different_objects():
    answers, attributes = Counter(), Counter()
    for index, scene in enumerate(scenes(300)):
        made = verify_items(scene, random.Random(index))
        assert len(made) == min(2, len(scene.objects))
        shapes = [item.slots["spec"].ref.shape for item in made]
        assert len(set(shapes)) == len(shapes)
        for item in made:
            ref = item.slots["spec"].ref
            (obj,) = [o for o in scene.objects if o.shape == ref.shape]
            # checked against the object's attributes and the clip's pairs directly, not through `resolve_ref`
            if ref.relation is not None:
                attribute = "touching"
                (other,) = [j for j, o in enumerate(scene.objects) if o.shape == ref.other]
                truth = (scene.objects.index(obj), "touching", other) in scene.relations()
            else:
                attribute, value = next((a, v) for a, v in (("colour", ref.colour), ("size", ref.size),
                                                             ("motion", ref.motion)) if v is not None)
                truth = getattr(obj, attribute) == value
            assert item.answer == ("yes" if truth else "no")
            assert item.fact == f"the {ref.shape} is {'' if item.answer == 'yes' else 'not '}{ref.predicate}"
            answers[item.answer] += 1
            attributes[attribute] += 1
    total = sum(answers.values())
    assert abs(answers["yes"] / total - 0.5) < 0.06, answers
    assert set(attributes) == {"colour", "size", "motion", "touching"}
    assert all(n > total / 6 for n in attributes.values()), attributes
