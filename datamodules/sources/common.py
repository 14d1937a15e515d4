"""Shared pieces of the real-data sources: annotation errors, JSON loading, the generation candidate.

A source turns its annotation files into `Candidate`s (a video and a false fact about it) or `Skip`s
(a site that gave no false fact, with the reason); `generate.py` sends the candidates to a writer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.perturb import Perturbation
from datamodules.records import JSONProblem, RecordError, parse_json


class AnnotationError(RecordError):
    """A user error in an annotation file: the message names the file, the item and the field."""

    def __init__(self, path: str | os.PathLike, where: str | None, field_name: str | None, problem: str):
        self._init_args = (path, where, field_name, problem)
        self.path, self.line, self.field = str(path), None, field_name
        location = str(path) + (f", {where}" if where else "")
        what = f"field '{field_name}': " if field_name else ""
        ValueError.__init__(self, f"{location}: {what}{problem}")


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing, malformed or hostile file (see `records.parse_json`) is an
    `AnnotationError` naming it and, where known, the line or the place in the document."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, None, None, f"no such {what} file")
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except JSONProblem as problem:
        where = f"line {problem.line}" if problem.line is not None else (
            f"at {problem.where}" if problem.where else None)
        raise AnnotationError(path, where, None, problem.problem) from None
    except UnicodeDecodeError:
        raise AnnotationError(path, None, None, "not UTF-8 text") from None


def refuse_overwriting_inputs(outputs: Iterable[str | os.PathLike | None],
                              inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise an `AnnotationError` when an output path is one of the input files (same resolved path, or the
    same file through a link): writing it would destroy the input before it is read in full."""
    existing = [Path(p) for p in inputs if p is not None]
    for output in outputs:
        if output is None:
            continue
        output = Path(output)
        for given in existing:
            same = output.resolve() == given.resolve()
            if not same and output.exists() and given.exists():
                same = os.path.samefile(output, given)
            if same:
                raise AnnotationError("command line", None, None,
                                      f"the output {output} is the input {given}: it would be overwritten; "
                                      "choose another output path")


def require(
    path: Path, where: str, data: Any, name: str, kind: type | tuple[type, ...], optional: bool = False
) -> Any:
    """`data[name]`, checked to be of `kind`; raises an `AnnotationError` naming the field otherwise."""
    if not isinstance(data, dict):
        raise AnnotationError(path, where, None, f"expected a JSON object, got {type(data).__name__}")
    if name not in data or data[name] is None:
        if optional:
            return None
        raise AnnotationError(path, where, name, "missing")
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise AnnotationError(path, where, name, f"expected {names}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the bytes of the given files (folders: their files in sorted order)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            digest.update(member.name.encode())
            digest.update(member.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Candidate:
    """A false fact about one video, waiting for a question writer."""

    source: str  # "moma" | "didemo"
    video: str  # the video's file name, as the record will reference it
    perturbation: Perturbation
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Stable record id: the same video and false fact always give the same id."""
        key = f"{self.video}\n{self.perturbation.category}\n{self.perturbation.false_fact}".encode()
        return f"{self.source}-{self.perturbation.category}-{hashlib.sha1(key).hexdigest()[:12]}"


def interleave(groups: Iterable[list[Any]]) -> Iterator[Any]:
    """Round-robin over the groups: the first item of each, then the second of each, ...

    Spreads generated items over videos instead of exhausting one video first.
    """
    groups = [list(group) for group in groups]
    longest = max((len(group) for group in groups), default=0)
    for position in range(longest):
        for group in groups:
            if position < len(group):
                yield group[position]
