"""Perturbations: turn a true fact of a video into a false one that a question can presuppose.

Each perturbation is checked against what the video is known to show and must be false. The same
`Perturbation` type serves the synthetic world and the real sources (MOMA-LRG, DiDeMo).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from datamodules.shapes import COLOURS, MOTIONS, OPPOSITE, RELATIONS, SHAPES, SIZES, Scene


@dataclass(frozen=True)
class Perturbation:
    """A false fact about one video, ready for a question writer.

    `slots` carries structured pieces that a template writer needs (question form, referring
    expression, the attribute asked about...); a chat writer uses the facts themselves.
    """

    category: str  # "object" | "relation" | "attribute"
    true_fact: str  # e.g. "the red circle moves left" / "barber holding comb"
    false_fact: str  # the perturbed fact, false for this video
    missing_element: str  # what the question presupposes and the video lacks
    slots: dict[str, Any] = field(default_factory=dict)


# ================================================================================= the synthetic world
# Questions about a `shapes.Scene`: referring expressions resolved exactly against the scene, the three
# kinds of false reference (object, attribute, relation), each checked false, and question specs whose
# forms and wording are shared by answerable and unanswerable items (so wording never gives refusal away).

RELATION_PHRASES = {
    "left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"
}
COUNT_WORDS = ("zero", "one", "two", "three")
FORMS = ("colour", "shape", "size", "direction", "count", "where")
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
WHERE_ANSWERS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
_AXIS_PAIRS = {"left of": ("left of", "right of"), "above": ("above", "below")}


@dataclass(frozen=True)
class Ref:
    """A referring expression for one object of a synthetic scene: a shape with at most one qualifier.

    "the circle", "the red circle", "the small circle", "the circle moving left", "the still circle",
    "the red object" (no shape), "the circle to the left of the square" (`relation` to the `other` shape).
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
        """The qualifier as said of the object: "red", "small", "moving up", "standing still"."""
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
    there?"); `ref2` the object a "where" question compares it with; `relation` the relation counted
    (count) or the first relation of the asked axis, "left of" or "above" (where).
    """

    form: str
    ref: Ref | None = None
    ref2: Ref | None = None
    relation: str | None = None

    def refs(self) -> tuple[Ref, ...]:
        return tuple(r for r in (self.ref, self.ref2) if r is not None)


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
    if spec.form == "where":
        return tuple(WHERE_ANSWERS[r] for r in _AXIS_PAIRS[spec.relation or "left of"])
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
    if form == "where":
        return ref.relation is None
    return form == "count"


@lru_cache(maxsize=4096)
def _held(scene: Scene) -> frozenset[tuple[int, str, int]]:
    return frozenset(scene.relations())


def _offset(scene: Scene, k: int, relation: str, i: int, t: float) -> float:
    """How far object k lies in the direction of `relation` from object i at clip time t (pixels)."""
    (kx, ky), (ix, iy) = (scene.objects[n].position(t, scene.world.travel) for n in (k, i))
    return {"left of": ix - kx, "right of": kx - ix, "above": iy - ky, "below": ky - iy}[relation]


def resolve_ref(scene: Scene, ref: Ref) -> list[int]:
    """Indices of the scene's objects that `ref` truly describes (a relation must hold by the margin)."""
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

    None means: a reference does not pick out exactly one object, a count would include a borderline
    object, or the two objects of a "where" question are not clearly apart on the asked axis.
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
    if spec.form == "count":
        assert spec.relation is not None
        return _count_answer(scene, i, spec.relation)
    held = _held(scene)
    if spec.form == "where" and len(resolved) == 2:
        j = resolved[1][0]
        for relation in _AXIS_PAIRS[spec.relation or "left of"]:
            if i != j and (i, relation, j) in held:
                return WHERE_ANSWERS[relation]
    return None


def _count_answer(scene: Scene, i: int, relation: str) -> str | None:
    """How many objects stand in `relation` to object i, or None when one of them is borderline."""
    held = _held(scene)
    count = 0
    for k in range(len(scene.objects)):
        if k == i:
            continue
        if (k, relation, i) in held:
            count += 1
        elif any(_offset(scene, k, relation, i, t) > 0 for t in (0.0, 1.0)):
            return None  # partly in that direction but not by the margin: no exact count
    return COUNT_WORDS[count]


def is_false(scene: Scene, perturbation: Perturbation) -> bool:
    """The explicit check that a synthetic perturbation's reference is false for `scene`.

    object: its shape (or, for "the {colour} object", its colour) is absent from the scene;
    attribute: its shape is present but with another colour, size or motion;
    relation: both shapes are present and the opposite relation holds (`Scene.contradicts`).
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
    """A relation between two present objects whose opposite holds; None when no relation holds."""
    held = sorted(_held(scene))
    if not held:
        return None
    i, relation, j = rng.choice(held)
    false_relation = OPPOSITE[relation]
    a, b = scene.objects[i].shape, scene.objects[j].shape
    ref = Ref(shape=a, relation=false_relation, other=b)
    true_fact, false_fact = f"the {a} is {relation} the {b}", f"the {a} is {false_relation} the {b}"
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
        for i in refs:
            for relation in RELATIONS:
                if _count_answer(scene, i, relation) is not None:
                    specs += [QuestionSpec("count", ref, relation=relation) for ref in refs[i]]
        return specs
    if form == "where":
        specs = []
        for i, relation, j in sorted(_held(scene)):
            if relation not in _AXIS_PAIRS:  # "right of"/"below" are the same pairs seen from the other side
                continue
            for a, b in ((i, j), (j, i)):
                specs += [
                    QuestionSpec("where", ra, rb, relation=relation)
                    for ra in refs[a]
                    for rb in refs[b]
                    if form_fits("where", ra) and form_fits("where", rb)
                ]
        return specs
    return [QuestionSpec(form, ref) for i in refs for ref in refs[i] if form_fits(form, ref)]


def _spec_for_false_ref(
    scene: Scene, perturbation: Perturbation, rng: random.Random
) -> QuestionSpec | None:
    """A question that presupposes the perturbation's false reference, in a randomly chosen fitting form."""
    ref: Ref = perturbation.slots["ref"]
    near = perturbation.slots.get("near")
    forms = [form for form in FORMS if form_fits(form, ref)]
    rng.shuffle(forms)
    for form in forms:
        if form == "count":
            return QuestionSpec("count", ref, relation=rng.choice(RELATIONS))
        if form != "where":
            return QuestionSpec(form, ref)
        # The other object of a "where" question is a present one, described truly.
        others = [i for i in range(len(scene.objects)) if i != near]
        partners = [r for i in others for r in true_refs(scene, i) if form_fits("where", r)]
        if partners:
            partner, axis = rng.choice(partners), rng.choice(tuple(_AXIS_PAIRS))
            first, second = (ref, partner) if rng.random() < 0.5 else (partner, ref)
            return QuestionSpec("where", first, second, relation=axis)
    return None


def _hallucination(scene: Scene, spec: QuestionSpec, perturbation: Perturbation, rng: random.Random) -> str:
    """A plausible wrong answer: about the look-alike present object when there is one, else any answer."""
    near = perturbation.slots.get("near")
    ref: Ref = perturbation.slots["ref"]
    if near is not None and ref.shape is not None:
        plain = Ref(shape=ref.shape)
        swapped = QuestionSpec(
            spec.form,
            plain if spec.ref == ref else spec.ref,
            plain if spec.ref2 == ref else spec.ref2,
            spec.relation,
        )
        answer = true_answer(scene, swapped)
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


def motion_phrase(motion: str) -> str:
    """How the caption and the qualifier checks say a motion: "moving up", "standing still"."""
    return "standing still" if motion == "still" else f"moving {motion}"


def describe_scene(scene: Scene) -> str:
    """Every object of `scene` from left to right (by start position) with all its attributes:
    "large red square moving up, small blue star standing still"."""
    parts = []
    for obj in sorted(scene.objects, key=lambda o: (o.x0, o.y0)):
        parts.append(f"{obj.size} {obj.colour} {obj.shape} {motion_phrase(obj.motion)}")
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
    likely. An object whose shape is not unique in the scene is not asked about.
    """
    facts = []
    for i in rng.sample(range(len(scene.objects)), min(num, len(scene.objects))):
        obj = scene.objects[i]
        attribute = rng.choice(("colour", "size", "motion"))
        value = getattr(obj, attribute)
        if rng.random() < 0.5:
            value = rng.choice([v for v in {"colour": COLOURS, "size": SIZES, "motion": MOTIONS}[attribute]
                                if v != value])
        spec = QuestionSpec(VERIFY, Ref(shape=obj.shape, **{attribute: value}))
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
    if spec.form == "where":
        assert spec.ref2 is not None
        phrase = {"left": "to the left of", "right": "to the right of"}.get(answer, answer)
        return f"{spec.ref.text} is {phrase} {spec.ref2.text}"
    if spec.form == "direction":
        return f"{spec.ref.text} stays still" if answer == "still" else f"{spec.ref.text} moves {answer}"
    return f"{spec.ref.text} is {answer}" if spec.form != "shape" else f"{spec.ref.text} is a {answer}"


# ============================================================================= real sources (issue 6)
# MOMA-LRG scene graphs give the object and relation categories, DiDeMo descriptions the attribute
# category. Every match is by whole name or whole word, never by substring: a video that shows a
# "cupboard" does not show a "cup", and "redwood" holds no colour.

@dataclass(frozen=True)
class Skip:
    """Why a perturbation site gave no false fact; counted per reason in the generation summary."""

    reason: str


SKIP_NOT_IN_TAXONOMY = "entity not in the taxonomy"
SKIP_NO_ABSENT_ENTITY = "no absent entity of the same category"
SKIP_EQUALS_TRUE_FACT = "equals a true fact of the video"
SKIP_NO_OTHER_PREDICATE = "no other predicate of the same type"
SKIP_ANNOTATED = "new relation is annotated for the video"
SKIP_NO_OTHER_VALUE = "no other value of the attribute group"
SKIP_ATTRIBUTE_DESCRIBED = "new attribute is described for the video"

SOURCE_SLOT, TARGET_SLOT = "[src]", "[trg]"


def normalise_name(name: str) -> str:
    """Case- and space-insensitive form used for every whole-name comparison."""
    return " ".join(name.lower().split())


def render_fact(template: str, source: str, target: str | None = None) -> str:
    """Fill a MOMA predicate template: ("[src] holding [trg]", "barber", "comb") -> "barber holding comb"."""
    if TARGET_SLOT in template and target is None:
        raise ValueError(f"template {template!r} needs a target")
    text = template.replace(SOURCE_SLOT, source)
    if target is not None:
        text = text.replace(TARGET_SLOT, target)
    return " ".join(text.split())


def template_arity(template: str) -> tuple[bool, bool]:
    """Which placeholders a predicate template has: (has [src], has [trg])."""
    return SOURCE_SLOT in template, TARGET_SLOT in template


@dataclass(frozen=True)
class GraphFact:
    """One annotated predicate instance of a video's scene graph, e.g. "barber holding comb"."""

    predicate_type: str  # "attributes" | "relationships" | "intransitive_actions" | "transitive_actions"
    template: str  # "[src] holding [trg]"
    source: str  # class name of the source node
    target: str | None = None  # class name of the target node, None for unary predicates

    @property
    def text(self) -> str:
        return render_fact(self.template, self.source, self.target)


@dataclass(frozen=True)
class VideoGraph:
    """Everything a video is annotated to show: its actors, objects and predicate instances."""

    video: str  # the video's file name, as records reference it
    actors: frozenset[str]
    objects: frozenset[str]
    facts: tuple[GraphFact, ...]

    @property
    def entity_names(self) -> frozenset[str]:
        return frozenset(normalise_name(name) for name in self.actors | self.objects)

    @property
    def fact_texts(self) -> frozenset[str]:
        return frozenset(normalise_name(fact.text) for fact in self.facts)

    def facts_with(self, entity: str) -> list[GraphFact]:
        """Facts whose source or target is `entity` by whole name (never facts that merely contain it)."""
        key = normalise_name(entity)
        return [f for f in self.facts if key in (normalise_name(f.source), normalise_name(f.target or ""))]


def perturb_entity(
    graph: VideoGraph, fact: GraphFact, entity: str, category_members: Sequence[str], rng: random.Random
) -> Perturbation | Skip:
    """Object category: swap `entity` in `fact` for a member of its taxonomy category absent from the video.

    The replacement fills the entity's slot of the template (source or target), so no other word of the
    fact changes. Absence is a whole-name test against every actor and object of the video.
    """
    present = graph.entity_names
    pool = sorted({name for name in category_members if normalise_name(name) not in present})
    if not pool:
        return Skip(SKIP_NO_ABSENT_ENTITY)
    replacement = rng.choice(pool)
    key = normalise_name(entity)
    source = replacement if normalise_name(fact.source) == key else fact.source
    target = replacement if fact.target is not None and normalise_name(fact.target) == key else fact.target
    false_fact = render_fact(fact.template, source, target)
    if normalise_name(false_fact) in graph.fact_texts:
        return Skip(SKIP_EQUALS_TRUE_FACT)
    return Perturbation(
        category="object",
        true_fact=fact.text,
        false_fact=false_fact,
        missing_element=replacement,
        slots={
            "entity": entity,
            "replacement": replacement,
            "related_facts": sorted({f.text for f in graph.facts_with(entity)}),
            "entities": sorted(graph.actors | graph.objects),
        },
    )


def perturb_predicate(
    graph: VideoGraph, fact: GraphFact, templates: Iterable[str], rng: random.Random
) -> Perturbation | Skip:
    """Relation category: swap the predicate of `fact` for another template of the same predicate type.

    `templates` are the type's templates; only those with the same placeholders are used. The new fact
    is dropped when the video is annotated with it (then it is true, not unanswerable).
    """
    arity = template_arity(fact.template)
    own = " ".join(fact.template.split())
    pool = sorted({t for t in templates if template_arity(t) == arity and " ".join(t.split()) != own})
    if not pool:
        return Skip(SKIP_NO_OTHER_PREDICATE)
    template = rng.choice(pool)
    false_fact = render_fact(template, fact.source, fact.target)
    if normalise_name(false_fact) in graph.fact_texts:
        return Skip(SKIP_ANNOTATED)
    return Perturbation(
        category="relation",
        true_fact=fact.text,
        false_fact=false_fact,
        missing_element=false_fact,
        slots={
            "template": fact.template,
            "new_template": template,
            "source": fact.source,
            "target": fact.target,
            "related_facts": sorted({f.text for f in graph.facts if f.template == fact.template}),
        },
    )


# ------------------------------------------------------------------------------------------ attributes
@dataclass(frozen=True)
class AttributeGroup:
    """Values that may replace each other, and clusters of near-synonyms that must never do so.

    A value is never swapped for a member of one of its clusters, nor for a value that contains it or
    that it contains ("red" / "reddish"). Cluster members outside `values` are never picked at all.
    """

    name: str
    values: tuple[str, ...]
    near: tuple[frozenset[str], ...] = ()

    def near_synonyms(self, value: str) -> frozenset[str]:
        return frozenset().union(*(cluster for cluster in self.near if value in cluster))

    def replacements(self, value: str) -> list[str]:
        value = value.lower()
        near = self.near_synonyms(value)
        return [v for v in self.values if v != value and v not in near and v not in value and value not in v]


def _clusters(*groups: str) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(group.split()) for group in groups)


ATTRIBUTE_GROUPS: dict[str, AttributeGroup] = {
    group.name: group
    for group in (
        AttributeGroup(
            "colour",
            ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
             "grey", "silver", "gold", "golden", "beige", "tan", "navy", "teal", "maroon", "violet",
             "turquoise", "reddish", "greenish", "bluish", "yellowish", "brownish", "pinkish", "purplish"),
            _clusters(
                "red reddish crimson scarlet maroon burgundy",
                "orange orangish orangey",
                "yellow yellowish gold golden blond blonde",
                "green greenish olive lime teal turquoise",
                "blue bluish blueish navy teal turquoise cyan aqua",
                "purple purplish violet lavender lilac magenta",
                "pink pinkish magenta fuchsia",
                "brown brownish tan beige khaki",
                "black blackish",
                "white whitish whiteish ivory",
                "gray grey grayish greyish silver",
            ),
        ),
        AttributeGroup(
            "position",
            ("left", "right", "top", "bottom", "middle", "center", "centre", "front", "back"),
            _clusters("middle center centre", "top upper", "bottom lower"),
        ),
        AttributeGroup(
            "pattern",
            ("striped", "dotted", "spotted", "plaid", "checkered", "floral", "plain", "camouflage"),
            _clusters("dotted spotted polka-dot", "checkered plaid checked", "striped stripy"),
        ),
        AttributeGroup(
            "material",
            ("metal", "metallic", "wooden", "wood", "plastic", "glass", "paper", "cardboard", "leather",
             "fabric", "cloth", "fur", "furry", "stone", "brick", "rubber", "woolen"),
            _clusters(
                "metal metallic steel iron aluminum",
                "wood wooden",
                "paper cardboard",
                "cloth fabric cotton wool woolen denim knit",
                "fur furry",
                "stone rock concrete",
            ),
        ),
        AttributeGroup(
            "size",
            ("big", "small", "large", "tiny", "huge", "short", "long", "tall", "thick", "thin", "wide",
             "narrow"),
            _clusters("big large huge giant enormous", "small tiny little", "thick wide", "thin narrow"),
        ),
        AttributeGroup(
            "state",
            ("open", "closed", "empty", "full", "wet", "dry", "broken", "clean", "dirty", "old", "lit",
             "frozen", "burning", "folded"),
            _clusters("open opened", "closed shut", "full filled", "wet soaked", "broken damaged cracked",
                      "clean spotless", "dirty muddy", "old aged ancient"),
        ),
        AttributeGroup(
            "shape",
            ("round", "square", "rectangular", "triangular", "oval", "curved", "straight", "flat", "pointed",
             "cylindrical"),
            _clusters("round rounded roundish circular spherical oval", "square rectangular boxy",
                      "curved curvy bent", "pointed pointy"),
        ),
        AttributeGroup(
            "human state",
            ("happy", "sad", "angry", "tired", "bored", "excited", "scared", "surprised", "calm", "nervous",
             "hungry", "asleep", "awake", "naked", "confused"),
            _clusters(
                "happy glad cheerful joyful smiling",
                "sad unhappy upset crying",
                "angry mad furious upset",
                "tired sleepy exhausted asleep",
                "excited thrilled",
                "scared afraid frightened nervous",
                "surprised shocked",
                "calm relaxed",
                "naked nude shirtless",
            ),
        ),
    )
}
_GROUP_OF: dict[str, str] = {}
for _group in ATTRIBUTE_GROUPS.values():
    for _value in _group.values:
        assert _value not in _GROUP_OF, f"{_value!r} is in two attribute groups"
        _GROUP_OF[_value] = _group.name

# Words after which an adjective is not modifying a noun, and the context words that make a position or
# predicative adjective: "the man on the left", "the door is open", but not "he left" or "right after".
_FUNCTION_WORDS = frozenset(
    "a an the this that these those and or but nor so then than as of in on at to from by with without for "
    "into onto over under after before behind while when where who whom which what why how is are was were "
    "be been being am has have had do does did he she it they we you i him her them his its their our your "
    "my me us not no up down out off away again there here now just very too also once back".split()
)
_COPULAS = frozenset("is are was were be been being looks look looked seems seem appears appear becomes "
                     "become became gets get got turns turn turned".split())
_POSITION_CONTEXT = frozenset("the far top bottom upper lower".split())
_POSSESSIVES = frozenset("his her its their my your our".split())
_COLOUR_CONTEXT = frozenset("in wearing wears dressed painted".split())
_ATTRIBUTE_TOKEN = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*")


@dataclass(frozen=True)
class AttributeWord:
    """An adjective of a description that belongs to an attribute group, with where it stands."""

    start: int
    end: int
    word: str
    group: str
    head: str | None  # the noun it modifies when used attributively ("light" in "a red light")


def find_attribute_words(
    description: str, groups: dict[str, AttributeGroup] = ATTRIBUTE_GROUPS
) -> list[AttributeWord]:
    """Adjectives of `description` found by whole word in `groups`, used as attributes in context.

    A token counts when it modifies a following noun ("a red light"), follows a copula ("the door is
    open"), or, for positions, follows a determiner ("on the left"). So "redwood", "background",
    "he left" and "right after" are never attributes.
    """
    group_of = {value: group.name for group in groups.values() for value in group.values}
    tokens = list(_ATTRIBUTE_TOKEN.finditer(description))
    found = []
    for index, match in enumerate(tokens):
        word = match.group().lower()
        group = group_of.get(word)
        if group is None:
            continue
        prev_word = _neighbour(description, tokens, index, -1)
        next_word = _neighbour(description, tokens, index, +1)
        attributive = next_word is not None and next_word not in _FUNCTION_WORDS
        if group == "position":  # "on the left", "the top shelf", "his left hand"; not "his back"
            ok = prev_word in _POSITION_CONTEXT or (prev_word in _POSSESSIVES and attributive)
            head = None  # "the left waves": whether a noun follows a position is anyone's guess
        else:
            ok = attributive or prev_word in _COPULAS or (group == "colour" and prev_word in _COLOUR_CONTEXT)
            head = _head(description, tokens, index, group_of) if attributive else None
        if ok:
            found.append(AttributeWord(match.start(), match.end(), match.group(), group, head))
    return found


def _head(text: str, tokens: list[re.Match], index: int, group_of: dict[str, str]) -> str | None:
    """The words an attributive adjective modifies: "dog" in "small dog", "brown dog" in "small brown dog"."""
    words = []
    while True:
        word = _neighbour(text, tokens, index, +1)
        if word is None or word in _FUNCTION_WORDS:  # "a white cloth": "cloth" is a material and the noun
            return " ".join(words) or None
        words.append(word)
        if word not in group_of:
            return " ".join(words)
        index += 1


def _neighbour(text: str, tokens: list[re.Match], index: int, step: int) -> str | None:
    """The adjacent word, lower-cased, or None when punctuation or the text's edge is in between."""
    other = index + step
    if not 0 <= other < len(tokens):
        return None
    left, right = (tokens[other], tokens[index]) if step < 0 else (tokens[index], tokens[other])
    if text[left.end():right.start()].strip():
        return None
    return tokens[other].group().lower()


def perturb_attribute_word(
    description: str,
    site: AttributeWord,
    rng: random.Random,
    other_descriptions: Iterable[str] = (),
    groups: dict[str, AttributeGroup] = ATTRIBUTE_GROUPS,
) -> Perturbation | Skip:
    """Attribute category: swap one attribute word of `description` for another value of its group.

    Only that occurrence changes. The new value is never a near-synonym or a substring of the old one,
    and the perturbation is dropped when any description of the same video uses the new value (or a
    near-synonym of it): then the video may well show it.
    """
    pool = groups[site.group].replacements(site.word)
    if not pool:
        return Skip(SKIP_NO_OTHER_VALUE)
    replacement = rng.choice(pool)
    if site.word[:1].isupper():
        replacement = replacement[:1].upper() + replacement[1:]
    false_fact = description[: site.start] + replacement + description[site.end:]
    known = [description, *other_descriptions]
    if normalise_name(false_fact) in {normalise_name(text) for text in known}:
        return Skip(SKIP_EQUALS_TRUE_FACT)
    group = groups[site.group]
    lookalikes = {replacement.lower()} | group.near_synonyms(replacement.lower())
    if any(t.group().lower() in lookalikes for text in known for t in _ATTRIBUTE_TOKEN.finditer(text)):
        return Skip(SKIP_ATTRIBUTE_DESCRIBED)
    phrase = f"{replacement.lower()} {site.head}" if site.head else None
    return Perturbation(
        category="attribute",
        true_fact=description,
        false_fact=false_fact,
        missing_element=replacement.lower(),
        slots={"attribute": site.word.lower(), "replacement": replacement.lower(), "group": site.group,
               "phrase": phrase},
    )
