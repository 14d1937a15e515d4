"""Generate unanswerable QA records from real annotations (MOMA-LRG, DiDeMo) with a question writer.

`generate` appends each finished item to `OUT.partial` as it goes and skips finished items on restart, so
an interrupted run resumes to the output of an uninterrupted one; the output is written atomically at the end,
and not at all when no record was generated. A chat endpoint that refuses (HTTP 401/403/404) or does not
answer stops the run at once with one line (`ChatWriterError`, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.perturb import Skip, normalise_name
from datamodules.records import QARecord, RecordError, record_from_dict, write_records
from datamodules.sources.common import AnnotationError, Candidate, files_digest, refuse_overwriting_inputs
from datamodules.writers import (
    FAILED,
    NOT_APPLICABLE,
    UNPARSABLE,
    WRITTEN,
    ChatWriter,
    ChatWriterError,
    QuestionWriter,
    iter_outcomes,
)

SKIP_DUPLICATE = "duplicate false fact"
CATEGORIES_OF = {"moma": ("object", "relation"), "didemo": ("attribute",)}
PARTIAL_SUFFIX = ".partial"
_PARTIAL_VERSION = 1


@dataclass
class GenerationSummary:
    """Counts of one `generate` run; `written` is what the output holds."""

    written: int = 0
    not_applicable: int = 0
    unparsable: int = 0
    failed: int = 0
    skipped: Counter = field(default_factory=Counter)  # perturbation site -> reason it gave no false fact
    resumed: int = 0  # items taken from the partial file of an earlier run
    exhausted: bool = False  # the annotations ran out of sites before `num` records were written
    failures: list[str] = field(default_factory=list)  # first few failure messages

    def lines(self, num: int) -> list[str]:
        lines = [f"written: {self.written}" + (f" of {num} asked" if self.written < num else "")]
        lines += [
            f"dropped as not applicable: {self.not_applicable}",
            f"dropped as unparsable: {self.unparsable}",
            f"failed after retries: {self.failed}",
        ]
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            lines.append(f"perturbation sites skipped: {reasons}")
        if self.resumed:
            lines.append(f"resumed: {self.resumed} items taken from an interrupted run")
        if self.exhausted and self.written < num:
            lines.append("the annotations ran out of perturbation sites")
        return lines


class _PartialLog:
    """`OUT.partial`: a header line with the run's fingerprint, then one JSON line per finished item."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):  # an interrupted append left a torn last line
            data = data[: data.rfind(b"\n") + 1]
            path.write_bytes(data)
        lines = data.decode("utf-8", "replace").splitlines()
        if lines:
            try:
                header = json.loads(lines[0])
                entries = [json.loads(text) for text in lines[1:]]
            except json.JSONDecodeError as error:
                raise AnnotationError(path, None, None, f"is not a partial file of generate ({error.msg}); "
                                      "delete it to start over") from None
            found = header.get("fingerprint") if isinstance(header, dict) else None
            if found != fingerprint:
                old = found if isinstance(found, dict) else {}
                differs = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise AnnotationError(path, None, differs[0] if differs else None,
                                      "was left by a run with other arguments or inputs; rerun with those, "
                                      "or delete it to start over")
            self.entries = {entry["id"]: entry for entry in entries}
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            header = {"partial_version": _PARTIAL_VERSION, "fingerprint": fingerprint}
            path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        self._handle = path.open("a", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        self.entries[entry["id"]] = entry
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def generate(
    candidates: Iterable[Candidate | Skip],
    writer: QuestionWriter,
    out: str | Path,
    num: int,
    fingerprint: dict[str, Any] | None = None,
    writer_meta: dict[str, Any] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> GenerationSummary:
    """Write the first `num` records that `writer` phrases from `candidates` (in their order) to `out`
    (nothing at all when there are none).

    Finished items go to `out.partial` as they finish; a rerun with the same fingerprint skips them, so
    an interrupted run resumes to the same output. Items that failed (after the writer's retries) are
    not recorded there, so a rerun retries them; the partial file is kept until a run has no failures.
    """
    out = Path(out)
    partial_path = out.with_name(out.name + PARTIAL_SUFFIX)
    log = _PartialLog(partial_path, fingerprint or {})
    summary = GenerationSummary()
    order: list[str] = []  # candidate ids in sequence order
    failed_now: set[str] = set()
    seen: set[tuple[str, str]] = set()
    stream: Iterator[Candidate | Skip] = iter(candidates)
    prefix = [0, 0]  # [position in `order` up to which every item is settled, records among them]

    def settled(item_id: str) -> bool:
        return item_id in log.entries or item_id in failed_now

    def determined() -> bool:
        while prefix[0] < len(order) and prefix[1] < num and settled(order[prefix[0]]):
            entry = log.entries.get(order[prefix[0]])
            prefix[1] += entry is not None and entry["status"] == WRITTEN
            prefix[0] += 1
        return prefix[1] >= num

    bar = tqdm(total=num, desc="generate", unit="q", disable=None if progress else True, file=sys.stderr)
    try:
        while not determined():
            batch: list[Candidate] = []
            while len(batch) < batch_size:
                candidate = next(stream, None)
                if candidate is None:
                    summary.exhausted = True
                    break
                if isinstance(candidate, Skip):
                    summary.skipped[candidate.reason] += 1
                    continue
                key = (candidate.video, normalise_name(candidate.perturbation.false_fact))
                if key in seen:
                    summary.skipped[SKIP_DUPLICATE] += 1
                    continue
                seen.add(key)
                order.append(candidate.id)
                if candidate.id in log.entries:
                    summary.resumed += 1
                    _count(summary, log.entries[candidate.id]["status"], bar)
                    if determined():  # the items gathered so far come after the output's last record
                        batch.clear()
                        break
                    continue
                batch.append(candidate)
            if batch:
                for index, outcome in iter_outcomes(writer, [c.perturbation for c in batch]):
                    candidate = batch[index]
                    if outcome.status == FAILED:
                        failed_now.add(candidate.id)
                        if len(summary.failures) < 5:
                            summary.failures.append(f"{candidate.id}: {outcome.error}")
                    else:
                        record = _record(candidate, outcome.written, outcome.reply, writer_meta)
                        log.append({"id": candidate.id, "status": outcome.status,
                                    "record": asdict(record) if record is not None else None})
                    _count(summary, outcome.status, bar)
            elif summary.exhausted:
                break
    finally:
        bar.close()
        log.close()
    records = []
    for item_id in order:
        entry = log.entries.get(item_id)
        if entry is not None and entry["status"] == WRITTEN and len(records) < num:
            records.append(record_from_dict(entry["record"], partial_path))
    if records:  # an empty output would pass for a dataset
        write_records(out, records)
    summary.written = len(records)
    if not failed_now:
        partial_path.unlink(missing_ok=True)
    return summary


def _count(summary: GenerationSummary, status: str, bar: tqdm) -> None:
    if status == WRITTEN:
        bar.update(1)
    elif status == NOT_APPLICABLE:
        summary.not_applicable += 1
    elif status == UNPARSABLE:
        summary.unparsable += 1
    elif status == FAILED:
        summary.failed += 1
    bar.set_postfix(na=summary.not_applicable, bad=summary.unparsable, failed=summary.failed, refresh=False)


def _record(
    candidate: Candidate, written: Any, reply: str | None, writer_meta: dict[str, Any] | None
) -> QARecord | None:
    if written is None:
        return None
    p = candidate.perturbation
    meta = {"true_fact": p.true_fact, "false_fact": p.false_fact, **candidate.meta, **(writer_meta or {})}
    if reply is not None:
        meta["writer_reply"] = reply
    data = {
        "id": candidate.id,
        "video": candidate.video,
        "question": written.question,
        "answer": written.answer,
        "answerable": False,
        "category": p.category,
        "missing_element": p.missing_element,
        "rejected": getattr(written, "rejected", None),
        "source": candidate.source,
        "meta": json.loads(json.dumps(meta, default=str)),
    }
    return record_from_dict(data)


# ================================================================================================ CLI
def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate unanswerable questions from MOMA-LRG or DiDeMo annotations",
        description="Perturb true facts of real annotations (object/relation: MOMA-LRG, attribute: DiDeMo) "
        "and have a question writer phrase a question that presupposes the false fact, with a refusal. "
        "An interrupted run resumes from OUT.partial when rerun with the same arguments.",
    )
    parser.add_argument("--source", required=True, choices=sorted(CATEGORIES_OF))
    parser.add_argument("--annotations", required=True, type=Path,
                        help="MOMA-LRG anns.json, or a DiDeMo file such as train_data.json")
    parser.add_argument("--taxonomy", type=Path,
                        help="MOMA-LRG taxonomy folder (default: taxonomy/ beside anns.json)")
    parser.add_argument("--splits", type=Path,
                        help="MOMA-LRG split file (default: splits/standard.json beside anns.json)")
    parser.add_argument("--split", choices=("train", "val", "test"),
                        help="which split to draw videos from; MOMA-LRG default train, DiDeMo default "
                        "the split its file name says (train_data.json -> train)")
    parser.add_argument("--category", required=True, choices=("object", "relation", "attribute"))
    parser.add_argument("--writer", default="template", choices=("template", "chat"))
    parser.add_argument("--num", type=int, required=True, help="number of records to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default 0)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl")
    chat = parser.add_argument_group("chat writer (--writer chat)")
    chat.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    chat.add_argument("--model", help="model name")
    chat.add_argument("--api-key-env", metavar="NAME",
                      help="name of the environment variable that holds the API key (never logged)")
    chat.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    chat.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    chat.add_argument("--max-retries", type=int, default=4,
                      help="retries per request (default 4); a retry waits the server's Retry-After, else "
                      "0.5 s doubling up to 8 s (the openai client's rule)")
    chat.add_argument("--max-connection-failures", type=int, default=3, metavar="N",
                      help="stop after N attempts in a row without an answer (refused, timed out; default "
                      "3; 0: never)")
    chat.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    chat.add_argument("--max-tokens", type=int, help="reply length limit (default: the server's)")
    chat.add_argument("--cache", type=Path, help="reply cache file (default: OUT.jsonl.chat-cache.jsonl)")
    chat.add_argument("--no-cache", action="store_true", help="do not cache replies")
    parser.set_defaults(func=run_generate)
    return parser


def add_import_videochatgpt_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import-videochatgpt",
        help="import Video-ChatGPT instruction QA as answerable records",
        description="Convert a Video-ChatGPT QA file (a list of {video_id, q, a}) into answerable records.",
    )
    parser.add_argument("--input", required=True, type=Path, help="e.g. VideoInstruct_Dataset.json")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--video-ext", default=".mp4",
                        help="extension added to video ids that have none (default .mp4)")
    parser.set_defaults(func=run_import_videochatgpt)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    """The `generate` command; user errors print one message and return 2."""
    try:
        summary = _generate_from_args(args)
    except (RecordError, ChatWriterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume ({args.out}{PARTIAL_SUFFIX})", file=sys.stderr)
        return 130
    print(f"{args.out}: {args.source} {args.category} questions ({args.writer} writer)")
    for line in summary.lines(args.num):
        print(f"  {line}")
    if not summary.written:
        print(f"  no record was generated, so {args.out} was not written")
    if summary.failed:
        for failure in summary.failures:
            print(f"  failure: {failure}")
        print(f"  rerun the same command to retry them ({args.out}{PARTIAL_SUFFIX} keeps the rest)")
        return 1
    return 0 if summary.written else 1


def run_import_videochatgpt(args: argparse.Namespace) -> int:
    """The `import-videochatgpt` command; user errors print one message and return 2."""
    from datamodules.sources.videochatgpt import import_videochatgpt

    try:
        refuse_overwriting_inputs([args.out], [args.input])
        records, summary = import_videochatgpt(args.input, args.video_ext)
        write_records(args.out, records)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(summary.dropped.items())) or "none"
    print(f"{args.out}: wrote {summary.written} answerable records; dropped {dropped}")
    return 0


def _user_error(problem: str) -> AnnotationError:
    return AnnotationError("command line", None, None, problem)


def _generate_from_args(args: argparse.Namespace) -> GenerationSummary:
    if args.category not in CATEGORIES_OF[args.source]:
        allowed = ", ".join(CATEGORIES_OF[args.source])
        raise _user_error(f"--source {args.source} gives the categories {allowed}, not {args.category}")
    if args.num < 1:
        raise _user_error("--num must be at least 1")
    inputs_given = [args.annotations]
    if args.source == "moma":
        taxonomy = args.taxonomy or args.annotations.parent / "taxonomy"
        inputs_given += [args.splits or args.annotations.parent / "splits" / "standard.json"]
        inputs_given += sorted(taxonomy.glob("*")) if taxonomy.is_dir() else []
    outputs = [args.out, args.out.with_name(args.out.name + PARTIAL_SUFFIX)]
    if args.writer == "chat" and not args.no_cache:
        outputs.append(args.cache or args.out.with_name(args.out.name + ".chat-cache.jsonl"))
    refuse_overwriting_inputs(outputs, inputs_given)
    rng = random.Random(args.seed)
    if args.source == "moma":
        from datamodules.sources import moma

        taxonomy_dir = args.taxonomy or args.annotations.parent / "taxonomy"
        splits_path = args.splits or args.annotations.parent / "splits" / "standard.json"
        split = args.split or "train"
        videos = moma.select_split(moma.load_moma(args.annotations), moma.load_splits(splits_path), split,
                                   splits_path)
        taxonomy = moma.load_taxonomy(taxonomy_dir)
        inputs = [args.annotations, taxonomy_dir, splits_path]
        make = moma.object_candidates if args.category == "object" else moma.relation_candidates
        candidates = make(videos, taxonomy, rng, split)
    else:
        from datamodules.sources import didemo

        split = didemo.resolve_split(args.annotations, args.split)
        inputs = [args.annotations]
        candidates = didemo.attribute_candidates(didemo.load_didemo(args.annotations), rng, split)
    writer, writer_meta = _make_writer(args)
    fingerprint = {
        "source": args.source,
        "category": args.category,
        "split": split,
        "seed": args.seed,
        "writer": args.writer,
        "model": writer_meta.get("model"),
        "temperature": writer_meta.get("temperature"),
        "inputs": files_digest(inputs),
    }
    batch = 256 if args.writer == "template" else max(16, 4 * args.concurrency)
    return generate(candidates, writer, args.out, args.num, fingerprint, writer_meta, batch_size=batch)


def _make_writer(args: argparse.Namespace) -> tuple[QuestionWriter, dict[str, Any]]:
    if args.writer == "template":
        from datamodules.writers import TemplateWriter

        return TemplateWriter(seed=args.seed), {"writer": "template"}
    missing = [flag for flag, value in (("--base-url", args.base_url), ("--model", args.model)) if not value]
    if missing:
        raise _user_error(f"--writer chat needs {' and '.join(missing)}")
    if args.concurrency < 1:
        raise _user_error("--concurrency must be at least 1")
    if args.max_connection_failures < 0:
        raise _user_error("--max-connection-failures must be at least 0")
    cache = None if args.no_cache else (args.cache or args.out.with_name(args.out.name + ".chat-cache.jsonl"))
    writer = ChatWriter(
        args.base_url, args.model, args.api_key_env,
        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
        max_connection_failures=args.max_connection_failures, temperature=args.temperature,
        max_tokens=args.max_tokens, cache_path=cache,
    )
    return writer, {"writer": "chat", "model": args.model, "temperature": args.temperature}

