"""The synthetic world's questions: referring expressions, question specs and their template phrasing.

Every question is resolved exactly against a `Scene`: answerable specs get their true answer, and the three
kinds of false reference (object, attribute, relation) are checked false before they are phrased. Forms and
wording are shared by answerable and unanswerable items, so the wording never gives a refusal away.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from datamodules.perturb import Perturbation
from datamodules.records import REFUSAL_TEMPLATE
from datamodules.shapes.world import COLOURS, MOTIONS, RELATIONS, SHAPES, SIZES, Scene
from datamodules.writers import TemplateWriter, WrittenQuestion

RELATION_PHRASES = {"touching": "touching"}
COUNT_WORDS = ("zero", "one", "two", "three")
# "touch" asks what an object touches: "What is the circle touching?" -> "square", or "nothing".
FORMS = ("colour", "shape", "size", "direction", "count", "touch")
NOTHING = "nothing"
# The caption form: "What objects are in the video?" answered with every object and its attributes. Never
# asked unanswerable; by default written for training clips only, as dense supervision (see
# `scene_records`), so the evaluation splits hold the question forms above.
DESCRIBE = "describe"
# The qualifier check: "Is the star small?", answered "yes" or "no", about one present object. Written where
# the caption is: the skill a refusal needs is checking each qualifier of a reference against the object
# its shape names, and answerable questions of the other forms never need it (a clip's shapes differ).
VERIFY = "verify"
VERIFY_ANSWERS = ("yes", "no")
REF_KINDS = ("shape", "colour_shape", "size_shape", "motion_shape", "colour_object", "relational")
# General refusals: questions that no clip of this world can answer, whatever it shows, because they ask about
# things the world never has (a dog, a car), about sound or speech (the clips are silent), or about who films.
# They teach the base model the refusal sentence, the way an instruction-tuned language model can say it
# cannot answer, without teaching it to check a question against the video (see `general_items`).
ABSENT_THINGS = ("dog", "cat", "bird", "car", "ball", "tree", "person", "hand")
GENERAL_FORMS = {  # form -> the missing element its refusal names
    "sound": "sound", "speech": "speech", "camera": "camera operator",
}


@dataclass(frozen=True)
class Ref:
    """A referring expression for one object of a synthetic scene: a shape with at most one qualifier.

    "the circle", "the red circle", "the small circle", "the circle moving left", "the still circle",
    "the red object" (no shape), "the circle touching the square" (`relation` to the `other` shape).
    """

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    motion: str | None = None
    relation: str | None = None
    other: str | None = None

    def __post_init__(self) -> None:
        qualifiers = [q for q in (self.colour, self.size, self.motion, self.relation) if q is not None]
        if len(qualifiers) > 1 or (self.relation is None) != (self.other is None):
            raise ValueError(f"a reference takes at most one qualifier: {self}")
        if self.shape is None and self.colour is None:
            raise ValueError(f"a reference without a shape must name a colour: {self}")

    @property
    def kind(self) -> str:
        if self.shape is None:
            return "colour_object"
        if self.relation is not None:
            return "relational"
        if self.colour is not None:
            return "colour_shape"
        if self.size is not None:
            return "size_shape"
        return "shape" if self.motion is None else "motion_shape"

    @property
    def element(self) -> str:
        """The expression without its article, as a refusal names it: "circle moving up"."""
        if self.shape is None:
            return f"{self.colour} object"
        if self.relation is not None:
            return f"{self.shape} {RELATION_PHRASES[self.relation]} the {self.other}"
        if self.motion == "still":
            return f"still {self.shape}"
        if self.motion is not None:
            return f"{self.shape} moving {self.motion}"
        qualifier = self.colour or self.size
        return f"{qualifier} {self.shape}" if qualifier else self.shape

    @property
    def text(self) -> str:
        return f"the {self.element}"

    @property
    def predicate(self) -> str:
        """The qualifier as said of the object: "red", "small", "moving up", "standing still", "touching the
        square"."""
        if self.relation is not None:
            return f"{RELATION_PHRASES[self.relation]} the {self.other}"
        if self.motion is not None:
            return motion_phrase(self.motion)
        qualifier = self.colour or self.size
        if qualifier is None or self.shape is None:
            raise ValueError(f"a predicate needs a shape with a colour, size or motion: {self}")
        return qualifier


@dataclass(frozen=True)
class QuestionSpec:
    """What a synthetic question asks, before it is phrased.

    `form` is one of FORMS. `ref` is the object asked about (None only for "How many objects are
    there?"); `relation` the relation counted ("How many objects are touching the circle?").
    """

    form: str
    ref: Ref | None = None
    relation: str | None = None

    def refs(self) -> tuple[Ref, ...]:
        return () if self.ref is None else (self.ref,)


@dataclass(frozen=True)
class Fact:
    """A true fact about one video with the short answer to the question asked about it (answerable)."""

    fact: str
    answer: str
    slots: dict[str, Any] = field(default_factory=dict)


def answer_choices(spec: QuestionSpec) -> tuple[str, ...]:
    """Every answer of the type `spec` asks for (what a hallucinating model picks from)."""
    if spec.form == "count":
        return COUNT_WORDS[1:] if spec.ref is None else COUNT_WORDS[:3]
    if spec.form == "touch":
        return (*SHAPES, NOTHING)
    if spec.form == VERIFY:
        return VERIFY_ANSWERS
    return {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "direction": MOTIONS}[spec.form]


def form_fits(form: str, ref: Ref) -> bool:
    """Whether `form` may ask about `ref`: never for an attribute the reference itself states."""
    if form == "colour":
        return ref.colour is None and ref.shape is not None
    if form == "shape":
        return ref.kind == "colour_object"
    if form == "size":
        return ref.size is None
    if form == "direction":
        return ref.motion is None
    if form == "touch":
        return ref.relation is None
    return form == "count"


@lru_cache(maxsize=4096)
def _held(scene: Scene) -> frozenset[tuple[int, str, int]]:
    return frozenset(scene.relations())


def resolve_ref(scene: Scene, ref: Ref) -> list[int]:
    """Indices of the scene's objects that `ref` truly describes (a relation must hold in every frame)."""
    matches = [
        i
        for i, obj in enumerate(scene.objects)
        if (ref.shape is None or obj.shape == ref.shape)
        and (ref.colour is None or obj.colour == ref.colour)
        and (ref.size is None or obj.size == ref.size)
        and (ref.motion is None or obj.motion == ref.motion)
    ]
    if ref.relation is not None:
        held = _held(scene)
        others = [j for j, obj in enumerate(scene.objects) if obj.shape == ref.other]
        matches = [i for i in matches if any((i, ref.relation, j) in held for j in others if j != i)]
    return matches


def true_answer(scene: Scene, spec: QuestionSpec) -> str | None:
    """The exact answer of `spec` for `scene`, or None when the question has no exact answer.

    None means: a reference does not pick out exactly one object.
    """
    if spec.form == "count" and spec.ref is None:
        return COUNT_WORDS[len(scene.objects)]
    if spec.form == DESCRIBE:
        return describe_scene(scene)
    if spec.form == VERIFY:
        assert spec.ref is not None and spec.ref.shape is not None
        if len(resolve_ref(scene, Ref(shape=spec.ref.shape))) != 1:
            return None
        return "yes" if resolve_ref(scene, spec.ref) else "no"
    resolved = [resolve_ref(scene, ref) for ref in spec.refs()]
    if not resolved or any(len(r) != 1 for r in resolved):
        return None
    i = resolved[0][0]
    obj = scene.objects[i]
    if spec.form in ("colour", "shape", "size", "direction"):
        attributes = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "direction": obj.motion}
        return attributes[spec.form]
    held = _held(scene)
    if spec.form == "count":
        assert spec.relation is not None
        return COUNT_WORDS[sum((k, spec.relation, i) in held for k in range(len(scene.objects)))]
    if spec.form == "touch":
        partners = scene.partners(i)
        return scene.objects[partners[0]].shape if len(partners) == 1 else NOTHING if not partners else None
    return None


def is_false(scene: Scene, perturbation: Perturbation) -> bool:
    """The explicit check that a synthetic perturbation's reference is false for `scene`.

    object: its shape (or, for "the {colour} object", its colour) is absent from the scene;
    attribute: its shape is present but with another colour, size or motion;
    relation: both shapes are present and clearly do not touch (`Scene.contradicts`).
    In every case the reference must also resolve to no object at all.
    """
    ref = perturbation.slots.get("ref")
    if not isinstance(ref, Ref) or resolve_ref(scene, ref):
        return False
    objects = scene.objects
    by_shape = {obj.shape: i for i, obj in enumerate(objects)}
    if perturbation.category == "object":
        if ref.shape is None:
            return all(obj.colour != ref.colour for obj in objects)
        return ref.shape not in by_shape
    if ref.shape not in by_shape:
        return False
    obj = objects[by_shape[ref.shape]]
    if perturbation.category == "attribute":
        return (
            (ref.colour is not None and obj.colour != ref.colour)
            or (ref.size is not None and obj.size != ref.size)
            or (ref.motion is not None and obj.motion != ref.motion)
        )
    if perturbation.category == "relation":
        if ref.relation is None or ref.other not in by_shape:
            return False
        return scene.contradicts(by_shape[ref.shape], ref.relation, by_shape[ref.other])
    return False


def _motion_fact(shape: str, motion: str) -> str:
    return f"the {shape} stays still" if motion == "still" else f"the {shape} moves {motion}"


def perturb_object(scene: Scene, rng: random.Random) -> Perturbation:
    """A reference to an absent object: an absent shape (bare or qualified) or an absent colour."""
    present_shapes = {obj.shape for obj in scene.objects}
    present_colours = {obj.colour for obj in scene.objects}
    kind = rng.choice(("shape", "colour_shape", "size_shape", "motion_shape", "colour_object"))
    shape = rng.choice([s for s in SHAPES if s not in present_shapes])
    if kind == "colour_object":
        ref = Ref(colour=rng.choice([c for c in COLOURS if c not in present_colours]))
        false_fact = f"there is a {ref.colour} object"
    else:
        ref = Ref(
            shape=shape,
            colour=rng.choice(list(COLOURS)) if kind == "colour_shape" else None,
            size=rng.choice(SIZES) if kind == "size_shape" else None,
            motion=rng.choice(MOTIONS) if kind == "motion_shape" else None,
        )
        false_fact = f"there is a {ref.element}"
    true_fact = "the video shows " + " and ".join(f"a {obj.colour} {obj.shape}" for obj in scene.objects)
    return Perturbation("object", true_fact, false_fact, ref.element, {"ref": ref, "near": None})


def perturb_attribute(scene: Scene, rng: random.Random) -> Perturbation:
    """A present shape with a wrong colour, size or motion."""
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    attribute = rng.choice(("colour", "size", "motion"))
    if attribute == "colour":
        ref = Ref(shape=obj.shape, colour=rng.choice([c for c in COLOURS if c != obj.colour]))
        true_fact, false_fact = f"the {obj.shape} is {obj.colour}", f"the {obj.shape} is {ref.colour}"
    elif attribute == "size":
        ref = Ref(shape=obj.shape, size=next(s for s in SIZES if s != obj.size))
        true_fact, false_fact = f"the {obj.shape} is {obj.size}", f"the {obj.shape} is {ref.size}"
    else:
        ref = Ref(shape=obj.shape, motion=rng.choice([m for m in MOTIONS if m != obj.motion]))
        assert ref.motion is not None
        true_fact, false_fact = _motion_fact(obj.shape, obj.motion), _motion_fact(obj.shape, ref.motion)
    return Perturbation("attribute", true_fact, false_fact, ref.element, {"ref": ref, "near": i})


def perturb_relation(scene: Scene, rng: random.Random) -> Perturbation | None:
    """Two present objects said to touch that do not; None when no such pair exists (fewer than two
    objects, or the clip's only two objects touch)."""
    apart = [
        (i, j)
        for i in range(len(scene.objects))
        for j in range(len(scene.objects))
        if i != j and scene.contradicts(i, "touching", j)
    ]
    if not apart:
        return None
    i, j = rng.choice(apart)
    a, b = scene.objects[i].shape, scene.objects[j].shape
    ref = Ref(shape=a, relation="touching", other=b)
    true_fact, false_fact = f"the {a} is not touching the {b}", f"the {a} is touching the {b}"
    return Perturbation("relation", true_fact, false_fact, ref.element, {"ref": ref, "near": i})


PERTURBERS = {"object": perturb_object, "attribute": perturb_attribute, "relation": perturb_relation}


def true_refs(scene: Scene, i: int) -> list[Ref]:
    """Every reference that picks out object i alone, relational ones included."""
    obj = scene.objects[i]
    refs = [
        Ref(shape=obj.shape),
        Ref(shape=obj.shape, colour=obj.colour),
        Ref(shape=obj.shape, size=obj.size),
        Ref(shape=obj.shape, motion=obj.motion),
        Ref(colour=obj.colour),
    ]
    refs += [
        Ref(shape=obj.shape, relation=relation, other=scene.objects[j].shape)
        for a, relation, j in sorted(_held(scene))
        if a == i
    ]
    return [ref for ref in refs if resolve_ref(scene, ref) == [i]]


def answerable_specs(scene: Scene, form: str) -> list[QuestionSpec]:
    """Every answerable question of `form` about `scene`; each has an exact `true_answer` by construction."""
    refs = {i: true_refs(scene, i) for i in range(len(scene.objects))}
    if form == "count":
        specs = [QuestionSpec("count")]
        for relation in RELATIONS:
            specs += [QuestionSpec("count", ref, relation=relation) for i in refs for ref in refs[i]]
        return specs
    return [QuestionSpec(form, ref) for i in refs for ref in refs[i] if form_fits(form, ref)]


def _spec_for_false_ref(
    scene: Scene, perturbation: Perturbation, rng: random.Random
) -> QuestionSpec | None:
    """A question that presupposes the perturbation's false reference, in a randomly chosen fitting form."""
    ref: Ref = perturbation.slots["ref"]
    forms = [form for form in FORMS if form_fits(form, ref)]
    if not forms:
        return None
    form = rng.choice(forms)
    return QuestionSpec(form, ref, relation=rng.choice(RELATIONS) if form == "count" else None)


def _hallucination(scene: Scene, spec: QuestionSpec, perturbation: Perturbation, rng: random.Random) -> str:
    """A plausible wrong answer: about the look-alike present object when there is one, else any answer."""
    near = perturbation.slots.get("near")
    ref: Ref = perturbation.slots["ref"]
    if near is not None and ref.shape is not None:
        plain = Ref(shape=ref.shape) if spec.ref == ref else spec.ref
        answer = true_answer(scene, QuestionSpec(spec.form, plain, spec.relation))
        if answer is not None:
            return answer
    return rng.choice(answer_choices(spec))


def synthetic_items(
    scene: Scene, rng: random.Random, num_answerable: int = 4, num_unanswerable: int = 3
) -> list[Fact | Perturbation]:
    """Answerable facts and unanswerable perturbations for one scene, each carrying its `QuestionSpec`.

    Up to one perturbation per category (object, attribute, relation), each checked with `is_false`.
    Every unanswerable question gets an answerable twin of the same form and reference kind when the
    scene allows it, so forms and wording are shared across answerability; the remaining answerable
    questions take forms not used yet in this scene. Slots: "spec"; perturbations also "ref", "near"
    and "hallucination" (a plausible wrong answer, the `rejected` response).
    """
    categories = list(PERTURBERS)
    rng.shuffle(categories)
    perturbations: list[Perturbation] = []
    for category in categories:
        if len(perturbations) >= num_unanswerable:
            break
        perturbation = PERTURBERS[category](scene, rng)
        if perturbation is None:
            continue
        if not is_false(scene, perturbation):
            raise AssertionError(f"perturbation is not false for its scene: {perturbation}")
        spec = _spec_for_false_ref(scene, perturbation, rng)
        if spec is None:
            continue
        assert true_answer(scene, spec) is None
        hallucination = _hallucination(scene, spec, perturbation, rng)
        slots = {**perturbation.slots, "spec": spec, "hallucination": hallucination}
        perturbations.append(replace(perturbation, slots=slots))

    chosen: list[QuestionSpec] = []

    def pick(candidates: list[QuestionSpec]) -> bool:
        fresh = [spec for spec in candidates if spec not in chosen]
        if fresh:
            chosen.append(rng.choice(fresh))
        return bool(fresh)

    cache: dict[str, list[QuestionSpec]] = {}
    for perturbation in perturbations:
        if len(chosen) >= num_answerable:
            break
        spec = perturbation.slots["spec"]
        candidates = cache.setdefault(spec.form, answerable_specs(scene, spec.form))
        kind = perturbation.slots["ref"].kind
        twins = [c for c in candidates if any(r.kind == kind for r in c.refs())]
        if not pick(twins):
            pick(candidates)
    # A relational reference must not give a refusal away: a clip with a touching pair is also asked one
    # answerable question through one ("What colour is the circle touching the square?").
    relational_asked = any(r.kind == "relational" for spec in chosen for r in spec.refs())
    if len(chosen) < num_answerable and not relational_asked:
        pick([
            spec
            for form in FORMS
            for spec in cache.setdefault(form, answerable_specs(scene, form))
            if any(r.kind == "relational" for r in spec.refs())
        ])
    # "total" ("How many objects are there?") is a form of its own here so that it is asked regularly.
    forms = [*FORMS, "total"]
    rng.shuffle(forms)
    forms.sort(key=lambda form: sum(spec.form == form for spec in chosen))  # stable: unused forms first
    for form in forms * num_answerable:
        if len(chosen) >= num_answerable:
            break
        if form == "total":
            pick([QuestionSpec("count")])
        else:
            pick(cache.setdefault(form, answerable_specs(scene, form)))

    facts: list[Fact | Perturbation] = []
    for spec in chosen:
        answer = true_answer(scene, spec)
        assert answer is not None
        facts.append(Fact(_fact_text(spec, answer), answer, {"spec": spec}))
    return facts + perturbations


def general_items(scene: Scene, rng: random.Random, num: int = 1) -> list[Perturbation]:
    """Questions no clip of the world can answer, for reasons unrelated to what `scene` shows.

    Half ask about a thing the world never has, in a form and with a qualifier that the clip's own
    questions use ("What colour is the dog?", "How many objects are touching the small car?", "What is the
    ball touching?"): category object. The other half ask about sound or speech
    ("What sound does the red star make?": category attribute) or about who films ("Who is holding the
    camera?": category object). Each refusal is `REFUSAL_TEMPLATE` naming the missing element, as the
    grounded refusals do. Slots: "spec", "ref" (the reference to the absent thing, or None), "near" None
    and "general" True.
    """
    items = []
    for _ in range(num):
        obj = scene.objects[rng.randrange(len(scene.objects))]
        if rng.random() < 0.5:
            thing = rng.choice(ABSENT_THINGS)
            kind = rng.choice(("shape", "colour_shape", "size_shape", "motion_shape"))
            ref = Ref(
                shape=thing,
                colour=rng.choice(list(COLOURS)) if kind == "colour_shape" else None,
                size=rng.choice(SIZES) if kind == "size_shape" else None,
                motion=rng.choice(MOTIONS) if kind == "motion_shape" else None,
            )
            form = rng.choice([form for form in FORMS if form_fits(form, ref)])
            spec = QuestionSpec(form, ref, relation=rng.choice(RELATIONS) if form == "count" else None)
            category, missing, false_fact = "object", ref.element, f"there is a {ref.element}"
        else:
            form = rng.choice(tuple(GENERAL_FORMS))
            named = [Ref(shape=obj.shape), Ref(shape=obj.shape, colour=obj.colour)]
            ref = None if form == "camera" else rng.choice(named)
            spec = QuestionSpec(form, ref)
            category = "object" if form == "camera" else "attribute"
            missing = GENERAL_FORMS[form]
            false_fact = f"the video has {missing}"
        slots = {"spec": spec, "ref": ref, "near": None, "general": True}
        items.append(Perturbation(category, "the video is silent and shows only shapes", false_fact, missing,
                                  slots))
    return items


def motion_phrase(motion: str) -> str:
    """How the caption and the qualifier checks say a motion: "moving up", "standing still"."""
    return "standing still" if motion == "still" else f"moving {motion}"


def describe_scene(scene: Scene) -> str:
    """Every object of `scene` from left to right (by start position) with all its attributes and what it
    touches: "large red square moving up touching the star, small blue star moving up touching the square,
    green circle standing still"."""
    parts = []
    for i in sorted(range(len(scene.objects)), key=lambda n: (scene.objects[n].x0, scene.objects[n].y0)):
        obj = scene.objects[i]
        touching = "".join(f" touching the {scene.objects[j].shape}" for j in scene.partners(i))
        parts.append(f"{obj.size} {obj.colour} {obj.shape} {motion_phrase(obj.motion)}{touching}")
    return ", ".join(parts)


def describe_item(scene: Scene) -> Fact:
    """The caption question of `scene` as an answerable item (slots: "spec")."""
    spec = QuestionSpec(DESCRIBE)
    answer = describe_scene(scene)
    return Fact(_fact_text(spec, answer), answer, {"spec": spec})


def verify_items(scene: Scene, rng: random.Random, num: int = 2) -> list[Fact]:
    """Qualifier checks of `scene` as answerable items (slots: "spec"): "Is the star small?".

    Up to `num` different objects, each with one attribute (colour, size or motion) drawn at random and
    stated truly or, with probability 1/2, as another value of the world, so "yes" and "no" are equally
    likely; in a clip of two or more objects the attribute may instead be touching another present object
    ("Is the star touching the square?"), the object it touches with probability 1/2 when it touches one.
    An object whose shape is not unique in the scene is not asked about.
    """
    facts = []
    for i in rng.sample(range(len(scene.objects)), min(num, len(scene.objects))):
        obj = scene.objects[i]
        others = [j for j in range(len(scene.objects)) if j != i]
        attribute = rng.choice(("colour", "size", "motion", "touching")[: 4 if others else 3])
        if attribute == "touching":
            partners = scene.partners(i)
            apart = [j for j in others if j not in partners]
            j = rng.choice(partners if partners and (not apart or rng.random() < 0.5) else apart)
            ref = Ref(shape=obj.shape, relation="touching", other=scene.objects[j].shape)
        else:
            value = getattr(obj, attribute)
            if rng.random() < 0.5:
                values = {"colour": COLOURS, "size": SIZES, "motion": MOTIONS}[attribute]
                value = rng.choice([v for v in values if v != value])
            ref = Ref(shape=obj.shape, **{attribute: value})
        spec = QuestionSpec(VERIFY, ref)
        answer = true_answer(scene, spec)
        if answer is not None:
            facts.append(Fact(_fact_text(spec, answer), answer, {"spec": spec}))
    return facts


def _fact_text(spec: QuestionSpec, answer: str) -> str:
    if spec.form == DESCRIBE:
        return f"the video shows {answer}"
    if spec.form == VERIFY:
        assert spec.ref is not None
        negation = "" if answer == "yes" else "not "
        return f"the {spec.ref.shape} is {negation}{spec.ref.predicate}"
    if spec.ref is None:
        return f"there are {answer} objects"
    if spec.form == "count":
        assert spec.relation is not None
        return f"{answer} objects are {RELATION_PHRASES[spec.relation]} {spec.ref.text}"
    if spec.form == "touch":
        return f"{spec.ref.text} is touching {NOTHING if answer == NOTHING else 'the ' + answer}"
    if spec.form == "direction":
        return f"{spec.ref.text} stays still" if answer == "still" else f"{spec.ref.text} moves {answer}"
    return f"{spec.ref.text} is {answer}" if spec.form != "shape" else f"{spec.ref.text} is a {answer}"




# ================================================================================= phrasing
# Fixed templates for the synthetic world's `QuestionSpec`s. Each form has two phrasings, picked by a
# hash of (seed, spec), so the choice is deterministic and independent of the order of items; the same
# phrasings serve answerable and unanswerable questions.

TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is {ref}?", "What is the colour of {ref}?"),
    "shape": ("What shape is {ref}?", "What is the shape of {ref}?"),
    "size": ("What size is {ref}?", "Is {ref} small or large?"),
    "direction": ("Which direction is {ref} moving?", "In which direction is {ref} moving?"),
    "count": ("How many objects are {relation} {ref}?", "How many objects can be seen {relation} {ref}?"),
    "total": ("How many objects are there?", "How many objects are in the video?"),
    "describe": ("What objects are in the video?", "Describe the objects in the video."),
    "verify": ("Is the {shape} {predicate}?", "Is the {shape} in the video {predicate}?"),
    "touch": ("What is {ref} touching?", "Which object is {ref} touching?"),
    "sound": ("What sound does {ref} make?", "What sound can be heard when {ref} moves?"),
    "speech": ("What does {ref} say?", "What words does {ref} say?"),
    "camera": ("Who is holding the camera?", "Who is filming the video?"),
}
_WORD = re.compile(r"[a-z0-9]+|[?.,]")


def split_words(text: str) -> list[str]:
    """Lowercased words with "?", "." and "," as separate tokens (the word tokenizer's rule)."""
    return _WORD.findall(text.lower())


def _template_key(spec: QuestionSpec) -> str:
    if spec.form == "count" and spec.ref is None:
        return "total"
    return spec.form


def unwarranted_refusal(spec: QuestionSpec) -> str:
    """A refusal of an answerable synthetic question, naming what it asks about (a DPO `rejected`).

    A qualifier check asks about the object its shape names ("Is the star small?": the star)."""
    if spec.ref is None:
        return REFUSAL_TEMPLATE.format(missing="object")
    return REFUSAL_TEMPLATE.format(missing=spec.ref.shape if spec.form == VERIFY else spec.ref.element)


class ShapesWriter(TemplateWriter):
    """Phrases synthetic question specs with fixed templates: offline, deterministic for a seed.

    Items are `Fact`s (answer: the short answer) or `Perturbation`s (answer: a refusal naming the
    missing element) whose `slots["spec"]` is a `QuestionSpec`; other items are phrased as
    `TemplateWriter` phrases them (real-data perturbations; anything else comes back as None).
    """

    def question(self, spec: QuestionSpec) -> str:
        templates = TEMPLATES[_template_key(spec)]
        # A string seed is hashed with SHA-512 by `random`, so the choice does not vary between runs.
        template = random.Random(f"{self.seed}|{spec!r}").choice(templates)
        text = template.format(
            ref=spec.ref.text if spec.ref else "",
            relation=RELATION_PHRASES.get(spec.relation or "", ""),
            shape=spec.ref.shape if spec.ref else "",
            predicate=spec.ref.predicate if spec.form == VERIFY and spec.ref else "",
        )
        return text[0].upper() + text[1:]

    def write(self, items: Sequence[Perturbation | Fact]) -> list[WrittenQuestion | None]:
        written: list[WrittenQuestion | None] = []
        for item in items:
            spec = item.slots.get("spec")
            if not isinstance(spec, QuestionSpec):
                written.extend(super().write([item]))
            elif isinstance(item, Fact):
                written.append(WrittenQuestion(self.question(spec), item.answer))
            else:
                refusal = REFUSAL_TEMPLATE.format(missing=item.missing_element)
                written.append(WrittenQuestion(self.question(spec), refusal))
        return written


def template_vocabulary() -> list[str]:
    """Every word the template writer can emit in a synthetic question, answer or rejected response.

    Lowercased, with "?", "." and "," as separate tokens, as `split_words` splits text.
    """
    texts = [REFUSAL_TEMPLATE.format(missing="")]
    texts += [t.format(ref="", relation="", shape="", predicate="")
              for group in TEMPLATES.values() for t in group]
    texts += [*SHAPES, *COLOURS, *SIZES, *MOTIONS, *COUNT_WORDS, NOTHING, *VERIFY_ANSWERS]
    texts += [*RELATION_PHRASES.values(), "the object moving still", "moving standing still ,"]
    texts += [*ABSENT_THINGS, *GENERAL_FORMS.values()]
    return sorted({word for text in texts for word in split_words(text)})


