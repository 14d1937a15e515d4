"""MOMA-LRG: scene-graph annotations turned into true facts, and object / relation perturbations of them.

Reads `anns.json`, the `taxonomy/` folder and `splits/standard.json` of a MOMA-LRG download; every
predicate instance becomes a concrete fact ("barber holding comb") of its video.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datamodules.perturb import (
    SKIP_NOT_IN_TAXONOMY,
    GraphFact,
    Skip,
    VideoGraph,
    normalise_name,
    perturb_entity,
    perturb_predicate,
    template_arity,
)
from datamodules.sources.common import AnnotationError, Candidate, interleave, load_json, require

# Predicate lists of an interaction, and the taxonomy file that lists each list's classes.
PREDICATE_FILES = {
    "attributes": "attribute",
    "relationships": "relationship",
    "intransitive_actions": "intransitive_action",
    "transitive_actions": "transitive_action",
}
SPLITS = ("train", "val", "test")
SKIP_DANGLING = "predicate names an entity id the interaction lacks"
SKIP_PLACEHOLDER = "placeholder class (unsure / unclassified)"
# Placeholder classes of the annotation tool; a question about an "unsure" is meaningless.
_PLACEHOLDER_CLASS = re.compile(r"^(unsure|unclassified)\b", re.IGNORECASE)


def is_placeholder(name: str) -> bool:
    return bool(_PLACEHOLDER_CLASS.match(name.strip()))


@dataclass(frozen=True)
class PredicateClass:
    """One predicate of a taxonomy file: its template, its characteristic key and its node types."""

    template: str
    characteristic: str
    node_types: tuple[str, ...]  # e.g. ("actor", "object"); free text, compared leniently


@dataclass(frozen=True)
class MomaTaxonomy:
    actor: dict[str, tuple[str, ...]]  # category -> class names
    object: dict[str, tuple[str, ...]]
    predicates: dict[str, tuple[PredicateClass, ...]]  # predicate list name ("relationships") -> classes

    def category(self, name: str, kind: str) -> tuple[str, tuple[str, ...]] | None:
        """The taxonomy category that holds `name` (by whole name), searched in its kind's file first."""
        key = normalise_name(name)
        tables = (self.actor, self.object) if kind == "actor" else (self.object, self.actor)
        for table in tables:
            for category, members in table.items():
                if any(normalise_name(member) == key for member in members):
                    return category, members
        return None

    def templates_for(self, fact: GraphFact, graph: VideoGraph) -> list[str]:
        """Templates of the fact's predicate type whose node types admit the fact's source and target."""
        kinds = (_kind(graph, fact.source), _kind(graph, fact.target) if fact.target is not None else None)
        classes = self.predicates.get(fact.predicate_type, ())
        return [p.template for p in classes if _admits(p.node_types, kinds)]


def _kind(graph: VideoGraph, name: str) -> str:
    key = normalise_name(name)
    return "actor" if any(normalise_name(actor) == key for actor in graph.actors) else "object"


def _admits(node_types: tuple[str, ...], kinds: tuple[str, str | None]) -> bool:
    """Whether a predicate's node types allow these entity kinds; types that name no kind allow all."""
    for node_type, kind in zip(node_types, kinds, strict=False):
        text = node_type.lower()
        if kind is not None and ("actor" in text or "object" in text) and kind not in text:
            return False
    return True


@dataclass(frozen=True)
class MomaVideo:
    graph: VideoGraph
    ids: frozenset[str]  # the activity id and the file name's stem: a split file may list either
    dangling: int = 0  # predicate instances dropped because they name an id the interaction lacks


def load_taxonomy(folder: str | os.PathLike) -> MomaTaxonomy:
    """Read `actor.json`, `object.json` and the four predicate files of a MOMA-LRG taxonomy folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotationError(folder, None, None, "no such taxonomy folder")
    entities = {}
    for kind in ("actor", "object"):
        path = folder / f"{kind}.json"
        data = load_json(path, "taxonomy")
        if not isinstance(data, dict):
            raise AnnotationError(path, None, None, "expected an object of category -> list of class names")
        table = {}
        for category, members in data.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise AnnotationError(path, f"category {category!r}", None, "expected a list of class names")
            table[category] = tuple(members)
        entities[kind] = table
    predicates = {}
    for list_name, stem in PREDICATE_FILES.items():
        path = folder / f"{stem}.json"
        data = load_json(path, "taxonomy")
        if not isinstance(data, dict):
            raise AnnotationError(path, None, None, "expected an object of characteristic -> list of entries")
        classes = []
        for characteristic, entries in data.items():
            if not isinstance(entries, list):
                raise AnnotationError(path, f"characteristic {characteristic!r}", None, "expected a list")
            for number, entry in enumerate(entries):
                if isinstance(entry, str):
                    entry = [entry]
                if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
                    raise AnnotationError(path, f"characteristic {characteristic!r}, entry {number}", None,
                                          "expected [template, node types...]")
                if "[src]" not in entry[0]:
                    raise AnnotationError(path, f"characteristic {characteristic!r}, entry {number}", None,
                                          f"template {entry[0]!r} has no [src] placeholder")
                types = tuple(" ".join(t) if isinstance(t, list) else str(t) for t in entry[1:])
                classes.append(PredicateClass(" ".join(entry[0].split()), characteristic, types))
        predicates[list_name] = tuple(classes)
    return MomaTaxonomy(entities["actor"], entities["object"], predicates)


def load_moma(path: str | os.PathLike) -> list[MomaVideo]:
    """Parse `anns.json` into one scene graph per video (actors, objects and concrete facts)."""
    path = Path(path)
    data = load_json(path, "annotation")
    if not isinstance(data, list):
        raise AnnotationError(path, None, None, "expected a list of videos")
    videos = []
    for number, video in enumerate(data):
        where = f"video {number}"
        file_name = require(path, where, video, "file_name", str)
        if not file_name.strip():
            raise AnnotationError(path, where, "file_name", "is empty")
        where = f"video {number} ({file_name})"
        activity = require(path, where, video, "activity", dict)
        activity_id = require(path, where + " activity", activity, "id", (str, int), optional=True)
        sub_activities = require(path, where + " activity", activity, "sub_activities", list)
        actors: set[str] = set()
        objects: set[str] = set()
        facts: dict[str, GraphFact] = {}
        dangling = 0
        for s, sub in enumerate(sub_activities):
            here = f"{where} sub_activities[{s}]"
            interactions = require(path, here, sub, "higher_order_interactions", list)
            for h, interaction in enumerate(interactions):
                here = f"{where} sub_activities[{s}].higher_order_interactions[{h}]"
                names: dict[str, str] = {}
                for kind, bucket in (("actors", actors), ("objects", objects)):
                    for e, entity in enumerate(require(path, here, interaction, kind, list)):
                        entity_id = require(path, f"{here} {kind}[{e}]", entity, "id", (str, int))
                        class_name = require(path, f"{here} {kind}[{e}]", entity, "class_name", str)
                        names[str(entity_id)] = class_name
                        bucket.add(class_name)
                for list_name in PREDICATE_FILES:
                    items = require(path, here, interaction, list_name, list, optional=True) or []
                    for p, item in enumerate(items):
                        spot = f"{here} {list_name}[{p}]"
                        template = " ".join(require(path, spot, item, "class_name", str).split())
                        source_id = require(path, spot, item, "source_id", (str, int))
                        target_id = require(path, spot, item, "target_id", (str, int), optional=True)
                        _, wants_target = template_arity(template)
                        if "[src]" not in template or wants_target != (target_id is not None):
                            raise AnnotationError(path, spot, "class_name",
                                                  f"template {template!r} does not fit its source/target ids")
                        source = names.get(str(source_id))
                        target = names.get(str(target_id)) if target_id is not None else None
                        if source is None or (target_id is not None and target is None):
                            dangling += 1
                            continue
                        fact = GraphFact(list_name, template, source, target)
                        facts.setdefault(normalise_name(fact.text), fact)
        graph = VideoGraph(file_name, frozenset(actors), frozenset(objects), tuple(facts.values()))
        ids = {Path(file_name).stem} | ({str(activity_id)} if activity_id is not None else set())
        videos.append(MomaVideo(graph, frozenset(ids), dangling))
    return videos


def load_splits(path: str | os.PathLike) -> dict[str, frozenset[str]]:
    """Read `splits/standard.json` ({"train": [ids], "val": [...], "test": [...]}): disjoint splits."""
    path = Path(path)
    data = load_json(path, "split")
    if not isinstance(data, dict):
        raise AnnotationError(path, None, None, "expected an object of split name -> list of video ids")
    splits = {}
    for name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str | int) for i in ids):
            raise AnnotationError(path, None, name, "expected a list of video ids")
        splits[name] = frozenset(str(i) for i in ids)
    names = sorted(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = splits[first] & splits[second]
            if shared:
                example = sorted(shared)[0]
                raise AnnotationError(path, None, second, f"video {example!r} is also in split {first!r}")
    return splits


def select_split(
    videos: list[MomaVideo], splits: dict[str, frozenset[str]], split: str, splits_path: str | os.PathLike
) -> list[MomaVideo]:
    """The videos of one split (matched by activity id or file-name stem)."""
    if split not in splits:
        known = ", ".join(sorted(splits))
        raise AnnotationError(splits_path, None, split, f"no such split (the file has {known})")
    return [video for video in videos if video.ids & splits[split]]


def object_candidates(
    videos: list[MomaVideo], taxonomy: MomaTaxonomy, rng: random.Random, split: str | None = None
) -> Iterator[Candidate | Skip]:
    """Object perturbations over all (entity, fact) sites, videos shuffled and visited round-robin."""

    def sites_of(video: MomaVideo) -> list[tuple]:
        graph, sites = video.graph, []
        for entity in sorted(graph.actors | graph.objects):
            kind = "actor" if entity in graph.actors else "object"
            sites.extend((video, entity, kind, fact) for fact in graph.facts_with(entity))
        return sites

    for site in _visit(videos, rng, sites_of):
        if isinstance(site, Skip):
            yield site
            continue
        video, entity, kind, fact = site
        if is_placeholder(entity) or _has_placeholder(fact):
            yield Skip(SKIP_PLACEHOLDER)
            continue
        found = taxonomy.category(entity, kind)
        if found is None:
            yield Skip(SKIP_NOT_IN_TAXONOMY)
            continue
        category, members = found
        pool = [m for m in members if not is_placeholder(m)]
        result = perturb_entity(video.graph, fact, entity, pool, rng)
        if isinstance(result, Skip):
            yield result
            continue
        meta = {"split": split, "taxonomy_category": category, "kind": kind}
        yield Candidate("moma", video.graph.video, result, meta)


def relation_candidates(
    videos: list[MomaVideo], taxonomy: MomaTaxonomy, rng: random.Random, split: str | None = None
) -> Iterator[Candidate | Skip]:
    """Relation perturbations over all facts, videos shuffled and visited round-robin."""
    for site in _visit(videos, rng, lambda video: [(video, fact) for fact in video.graph.facts]):
        if isinstance(site, Skip):
            yield site
            continue
        video, fact = site
        if _has_placeholder(fact):
            yield Skip(SKIP_PLACEHOLDER)
            continue
        result = perturb_predicate(video.graph, fact, taxonomy.templates_for(fact, video.graph), rng)
        if isinstance(result, Skip):
            yield result
            continue
        meta = {"split": split, "predicate_type": fact.predicate_type}
        yield Candidate("moma", video.graph.video, result, meta)


def _visit(
    videos: list[MomaVideo], rng: random.Random, sites_of: Callable[[MomaVideo], list[tuple]]
) -> Iterator[Skip | tuple]:
    """Videos in shuffled order: their dangling-reference skips first, then every video's sites (each list
    shuffled) round-robin, so that a `--num` limit samples across videos."""
    order = list(videos)
    rng.shuffle(order)
    yield from _dangling(order)
    per_video = []
    for video in order:
        sites = sites_of(video)
        rng.shuffle(sites)
        per_video.append(sites)
    yield from interleave(per_video)


def _dangling(videos: list[MomaVideo]) -> Iterator[Skip]:
    for video in videos:
        for _ in range(video.dangling):
            yield Skip(SKIP_DANGLING)


def _has_placeholder(fact: GraphFact) -> bool:
    return is_placeholder(fact.source) or (fact.target is not None and is_placeholder(fact.target))
