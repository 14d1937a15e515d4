"""DiDeMo: moment descriptions of videos, and the attribute perturbations of them.

An annotation file (`train_data.json`, `val_data.json`, `test_data.json`) is a list of moments with
`video` (file name) and `description`. Its split is the file's: taken from the name or given by the user.
"""

from __future__ import annotations

import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datamodules.perturb import Skip, find_attribute_words, perturb_attribute_word
from datamodules.sources.common import AnnotationError, Candidate, interleave, load_json, require

SKIP_NO_ATTRIBUTE = "no attribute word in the description"
_SPLIT_IN_NAME = re.compile(r"(?<![a-z])(train|val|validation|test)(?![a-z])")


@dataclass(frozen=True)
class Moment:
    video: str  # file name, e.g. "68413968@N00_3072987342_f1998a1567.mpg"
    description: str
    index: int  # position in the annotation file


def load_didemo(path: str | os.PathLike) -> list[Moment]:
    """Read a DiDeMo annotation file; a moment without a video or a description is an error."""
    path = Path(path)
    data = load_json(path, "annotation")
    if not isinstance(data, list):
        raise AnnotationError(path, None, None, "expected a list of moments")
    moments = []
    for number, item in enumerate(data):
        where = f"moment {number}"
        video = require(path, where, item, "video", str)
        description = require(path, where, item, "description", str)
        for name, value in (("video", video), ("description", description)):
            if not value.strip():
                raise AnnotationError(path, where, name, "is empty")
        moments.append(Moment(video.strip(), " ".join(description.split()), number))
    return moments


def split_from_name(path: str | os.PathLike) -> str | None:
    """"train" / "val" / "test" when the file name says so as a word ("test_data.json"), else None."""
    found = {m.group(1) for m in _SPLIT_IN_NAME.finditer(Path(path).stem.lower())}
    found = {"val" if name == "validation" else name for name in found}
    return found.pop() if len(found) == 1 else None


def resolve_split(path: str | os.PathLike, split: str | None) -> str:
    """A file's split: `split` when given (it must not contradict the name), else the name's."""
    named = split_from_name(path)
    if split is None:
        if named is None:
            raise AnnotationError(path, None, None, "cannot tell its split from the file name; pass --split")
        return named
    if named is not None and named != split:
        raise AnnotationError(path, None, None, f"--split {split} contradicts the file name ({named})")
    return split


def attribute_candidates(
    moments: list[Moment], rng: random.Random, split: str | None = None
) -> Iterator[Candidate | Skip]:
    """Attribute perturbations over all attribute words, videos shuffled and visited round-robin.

    Every description of a video counts as known about it: a swapped-in value that any of them uses
    is dropped.
    """
    by_video: dict[str, list[Moment]] = defaultdict(list)
    for moment in moments:
        by_video[moment.video].append(moment)
    videos = sorted(by_video)
    rng.shuffle(videos)
    per_video = []
    for video in videos:
        sites: list[tuple[Moment, object]] = []
        for moment in by_video[video]:
            words = find_attribute_words(moment.description)
            sites.extend((moment, word) for word in words)
            if not words:
                sites.append((moment, None))
        rng.shuffle(sites)
        per_video.append(sites)
    for moment, word in interleave(per_video):
        if word is None:
            yield Skip(SKIP_NO_ATTRIBUTE)
            continue
        others = [m.description for m in by_video[moment.video] if m.index != moment.index]
        result = perturb_attribute_word(moment.description, word, rng, others)
        if isinstance(result, Skip):
            yield result
            continue
        yield Candidate("didemo", moment.video, result, {"split": split, "moment": moment.index})
