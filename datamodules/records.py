"""The files the project speaks (docs/design.md section 3): the record schema `QARecord` and its validated
JSONL I/O, the predictions file, the gold refusal and the one atomic writer.

Every reader validates each line and names the file, line and field of the first problem (hostile JSON
included: nesting too deep, numbers too long, text that is not valid Unicode); a file with no records is an
error; every writer is atomic (`atomic_write`: a temporary file in the same folder, then a rename), so an
interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from datamodules.errors import UserError

CATEGORIES = ("object", "relation", "attribute")
"""Unanswerability categories of a record, in the order of their ids in the metrics (0, 1, 2)."""

REFUSAL_OPENING = "The question is unanswerable"
"""The opening of every gold refusal; its mean log-probability given the video and question is the refusal
likelihood (docs/design.md section 6)."""

REFUSAL_TEMPLATE = REFUSAL_OPENING + " because there is no {missing} in the video."
"""The gold response of an unanswerable question whose missing element is `missing`."""


class RecordError(UserError, ValueError):
    """A user error in a record file: the message names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field_name: str | None, problem: str):
        self._init_args = (path, line, field_name, problem)
        self.path, self.line, self.field = str(path), line, field_name
        where = str(path) + (f", line {line}" if line is not None else "")
        what = f"field '{field_name}': " if field_name else ""
        ValueError.__init__(self, f"{where}: {what}{problem}")


class JSONProblem(ValueError):
    """Why a JSON text cannot be taken: `problem` (one line) and, when known, the `line` it is on."""

    def __init__(self, problem: str, line: int | None = None, where: str | None = None):
        self.problem, self.line, self.where = problem, line, where
        super().__init__(problem)


def _no_constant(name: str) -> Any:
    raise JSONProblem(f"non-standard JSON constant {name}")


def parse_json(text: str) -> Any:
    """`json.loads`, with every way a hostile text fails turned into a `JSONProblem`.

    Refused: malformed JSON, nesting deeper than the interpreter's recursion limit, integers longer than
    Python's conversion limit, NaN/Infinity, and text holding a lone UTF-16 surrogate ("\\ud800"), which
    no later UTF-8 writer or tokenizer accepts; `where` then gives its place, e.g. `meta.tags[2]`.
    """
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise JSONProblem(f"invalid JSON ({error.msg})", error.lineno) from None
    except RecursionError:
        raise JSONProblem("invalid JSON (nested too deeply)") from None
    except JSONProblem:
        raise
    except ValueError as error:  # "Exceeds the limit (4300 digits) for integer string conversion ..."
        raise JSONProblem(f"invalid JSON (a number too long: {str(error).split(';')[0]})") from None
    where = _lone_surrogate(data)
    if where is not None:
        raise JSONProblem("text with a lone UTF-16 surrogate (not valid Unicode)", where=where)
    return data


def _lone_surrogate(data: Any) -> str | None:
    """The place of the first string (or key) holding a lone surrogate; None when there is none.

    `json.loads` joins valid surrogate pairs into one character, so any surrogate left is a lone one, and
    UTF-8 cannot encode it. Iterative: the depth is whatever the parser accepted.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return where or "(top level)"
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if not _encodable(key):
                    return f"{where}.(a key)" if where else "(a key)"
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class QARecord:
    """One video QA item; see docs/design.md section 3 for the meaning of each field."""

    id: str
    video: str
    question: str
    answer: str
    answerable: bool
    category: str | None = None
    missing_element: str | None = None
    rejected: str | None = None
    source: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=False)


# field name -> (allowed types, may be null)
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), False),
    "video": ((str,), False),
    "question": ((str,), False),
    "answer": ((str,), False),
    "answerable": ((bool,), False),
    "category": ((str,), True),
    "missing_element": ((str,), True),
    "rejected": ((str,), True),
    "source": ((str,), False),
    "meta": ((dict,), False),
}
_REQUIRED = ("id", "video", "question", "answer", "answerable")
assert set(_SCHEMA) == {f.name for f in fields(QARecord)}


def record_from_dict(
    data: Any, path: str | os.PathLike = "<memory>", line: int | None = None, video_root: Path | None = None
) -> QARecord:
    """Validate one decoded JSON object and build the record; raises `RecordError` naming the field."""
    if not isinstance(data, dict):
        raise RecordError(path, line, None, f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise RecordError(path, line, unknown[0], "unknown field")
    for name in _REQUIRED:
        if name not in data:
            raise RecordError(path, line, name, "missing")
    for name, value in data.items():
        types, nullable = _SCHEMA[name]
        if value is None and nullable:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            expected = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise RecordError(path, line, name, f"expected {expected}, got {type(value).__name__}")
    for name in ("id", "video", "question", "answer"):
        if not data[name].strip():
            raise RecordError(path, line, name, "is empty")
    category = data.get("category")
    if data["answerable"]:
        if category is not None:
            raise RecordError(path, line, "category", "must be null for an answerable record")
    else:
        if category not in CATEGORIES:
            allowed = ", ".join(CATEGORIES)
            raise RecordError(path, line, "category", f"must be one of {allowed}, got {category!r}")
        if not (data.get("missing_element") or "").strip():
            problem = "an unanswerable record must name its missing element"
            raise RecordError(path, line, "missing_element", problem)
    if video_root is not None:
        root = video_root.resolve()
        resolved = (root / data["video"]).resolve()
        if not resolved.is_relative_to(root):
            problem = f"{data['video']!r} resolves outside the video root {root}"
            raise RecordError(path, line, "video", problem)
    return QARecord(**data)


def iter_records(
    path: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    skipped: list[RecordError] | None = None,
    allow_empty: bool = False,
) -> Iterator[QARecord]:
    """Yield validated records of a JSONL file; duplicate ids are errors, and so is a file without a single
    record line (blank lines aside) unless `allow_empty`.

    With `skip_invalid`, bad lines are appended to `skipped` (when given) instead of raising.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, None, "no such file")
    root = Path(video_root) if video_root is not None else path.parent
    seen: dict[str, int] = {}
    lines = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            lines += 1
            try:
                try:
                    data = parse_json(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise RecordError(path, number, None, "not valid UTF-8 text") from None
                except JSONProblem as problem:
                    raise RecordError(path, number, problem.where, problem.problem) from None
                record = record_from_dict(data, path, number, root)
                if record.id in seen:
                    problem = f"duplicate id {record.id!r} (first on line {seen[record.id]})"
                    raise RecordError(path, number, "id", problem)
            except RecordError as error:
                if not skip_invalid:
                    raise
                if skipped is not None:
                    skipped.append(error)
                continue
            seen[record.id] = number
            yield record
    if not lines and not allow_empty:
        raise RecordError(path, None, None, "the file holds no records")


def read_records(
    path: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    allow_empty: bool = False,
) -> tuple[list[QARecord], list[RecordError]]:
    """Read a whole JSONL file: (records, skipped errors). `skipped` is empty unless `skip_invalid`; a file
    without records is an error unless `allow_empty`."""
    skipped: list[RecordError] = []
    records = list(iter_records(path, video_root, skip_invalid, skipped, allow_empty))
    return records, skipped


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through a temporary file in the same folder and an atomic rename; returns the path.

    `content`: text (written as UTF-8), bytes, or a function that writes into the binary file it is given
    (e.g. `lambda f: figure.savefig(f, format="png")`). On any error the old file, if any, is left as it was
    and the temporary file is removed. The file gets the usual mode (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Atomically write dictionaries as JSONL; returns the number of lines."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_records(path: str | os.PathLike, records: Iterable[QARecord]) -> int:
    """Atomically write records as JSONL, refusing duplicate ids; returns the number written."""
    records = list(records)
    seen: set[str] = set()
    for index, record in enumerate(records, start=1):
        if record.id in seen:
            raise RecordError(path, index, "id", f"duplicate id {record.id!r}")
        seen.add(record.id)
    return write_jsonl(path, (asdict(record) for record in records))


def read_predictions(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a predictions file (JSONL, one object per item, as `predict` and `test` write them).

    Every row needs a non-empty string `id`, unique in the file, and a string in each field of `required`
    (e.g. ``("response",)`` where the responses are used); anything else is kept as it is. A missing file, a
    bad line, a missing field or a duplicate id raises `RecordError` naming the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, None, "no such predictions file")
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = parse_json(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise RecordError(path, number, None, "not valid UTF-8 text") from None
            except JSONProblem as problem:
                raise RecordError(path, number, problem.where, problem.problem) from None
            if not isinstance(row, dict):
                raise RecordError(path, number, None, f"expected a JSON object, got {type(row).__name__}")
            for key in ("id", *required):
                if not isinstance(row.get(key), str):
                    raise RecordError(path, number, key, "missing or not a string")
            if not row["id"].strip():
                raise RecordError(path, number, "id", "is empty")
            if row["id"] in seen:
                problem = f"duplicate id {row['id']!r} (first on line {seen[row['id']]})"
                raise RecordError(path, number, "id", problem)
            seen[row["id"]] = number
            rows.append(row)
    return rows


def _json_safe(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, NaN to None, +-inf to the largest float (which keeps the
    ranking of scores)."""
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(sys.float_info.max, value)
    return value


def write_predictions(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Atomically write prediction rows as JSONL (NaN as null, tensors as numbers); returns the row count.

    `read_predictions` reads them back."""
    return write_jsonl(path, (_json_safe(row) for row in rows))


def summarize_records(records: Iterable[QARecord]) -> dict[str, Any]:
    """Counts of a record set: records, answerable, unanswerable, and unanswerable per category."""
    summary: dict[str, Any] = {"records": 0, "answerable": 0, "unanswerable": 0}
    categories = dict.fromkeys(CATEGORIES, 0)
    for record in records:
        summary["records"] += 1
        if record.answerable:
            summary["answerable"] += 1
        else:
            summary["unanswerable"] += 1
            categories[record.category or ""] = categories.get(record.category or "", 0) + 1
    summary["categories"] = categories
    return summary
