"""Perturbations: turn a true fact of a video into a false one that a question can presuppose.

Each perturbation is checked against what the video is known to show and must be false. The same
`Perturbation` type serves the synthetic world and the real sources (MOMA-LRG, DiDeMo).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


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
