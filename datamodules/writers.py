"""Question writers: turn facts (true, or perturbed and false) into a question and its gold response.

All writers share one interface, `QuestionWriter.write(items)`, batched so that a chat writer can send
requests concurrently. An item a writer cannot phrase sensibly comes back as None (dropped, counted).
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from datamodules.chat import ChatClient, ChatError, ChatRequestError, ReplyCache
from datamodules.perturb import Perturbation
from datamodules.records import REFUSAL_TEMPLATE


@dataclass(frozen=True)
class WrittenQuestion:
    question: str
    answer: str  # the gold response: for a perturbation, a refusal that names the missing element


class QuestionWriter(Protocol):
    def write(self, items: Sequence[Perturbation]) -> list[WrittenQuestion | None]: ...


# ============================================================================ real-data writers
# Outcomes of writing an item, template phrasing of real-data perturbations (MOMA-LRG, DiDeMo), and a
# chat writer for any OpenAI-compatible chat-completions endpoint (datamodules.chat).

WRITTEN, NOT_APPLICABLE, UNPARSABLE, FAILED = "written", "not_applicable", "unparsable", "failed"


@dataclass(frozen=True)
class WriteOutcome:
    """What became of one item: `written` (with the question), `not_applicable`, `unparsable` or `failed`."""

    status: str
    written: WrittenQuestion | None = None
    reply: str | None = None  # the writer's raw reply, when there was one
    error: str | None = None  # why it failed (never holds the API key)


def iter_outcomes(
    writer: QuestionWriter, items: Sequence[Perturbation]
) -> Iterator[tuple[int, WriteOutcome]]:
    """(index, outcome) per item, as they finish: a writer's own `write_iter` when it has one, else `write`.

    A plain writer's None means it declined the item, counted as not applicable.
    """
    own = getattr(writer, "write_iter", None)
    if own is not None:
        yield from own(items)
        return
    for index, written in enumerate(writer.write(items)):
        yield index, WriteOutcome(WRITTEN, written) if written is not None else WriteOutcome(NOT_APPLICABLE)


REAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "What colour is the {missing} in the video?",
        "Where is the {missing} in the video?",
        "What happens to the {missing} in the video?",
        "How big is the {missing} in the video?",
    ),
    "relation": (
        "Why is the {fact} in the video?",
        "At what point of the video is the {fact}?",
        "What happens right after the {fact}?",
    ),
    "attribute_phrase": (
        "What is the {phrase} doing in the video?",
        "Where is the {phrase} in the video?",
        "What happens to the {phrase} in the video?",
    ),
    "attribute": ("What happens right after {clause}?", "What happens just before {clause}?"),
}


def real_question(item: Perturbation, seed: int = 0) -> WrittenQuestion | None:
    """Template phrasing of a real-data perturbation (object, relation, attribute); deterministic for a seed.

    object: a question about the absent entity; relation: about the false relation; attribute: about the
    noun the swapped adjective modifies ("the pinkish light"), or about the whole false description.
    """
    fact = item.false_fact.strip().rstrip(".")
    phrase = item.slots.get("phrase")
    if item.category == "object":
        key, answer = "object", REFUSAL_TEMPLATE.format(missing=item.missing_element)
    elif item.category == "relation":
        key, answer = "relation", f"The question is unanswerable because the video does not show the {fact}."
    elif item.category == "attribute" and phrase:
        key, answer = "attribute_phrase", REFUSAL_TEMPLATE.format(missing=phrase)
    elif item.category == "attribute":
        clause = fact[:1].lower() + fact[1:]
        key = "attribute"
        answer = f"The question is unanswerable because the video does not show that {clause}."
    else:
        return None
    template = random.Random(f"{seed}|{item.false_fact}").choice(REAL_TEMPLATES[key])
    text = template.format(missing=item.missing_element, fact=fact, phrase=phrase,
                           clause=fact[:1].lower() + fact[1:])
    return WrittenQuestion(text[:1].upper() + text[1:], answer)


class TemplateWriter:
    """Phrases real-data perturbations (MOMA-LRG, DiDeMo) with `real_question`: offline, deterministic.

    Anything else comes back as None. The synthetic world's `ShapesWriter` extends it to question specs.
    """

    def __init__(self, seed: int | str = 0):
        self.seed = seed  # a string seed lets a caller vary phrasings per video: f"{seed}:{video}"

    def write(self, items: Sequence[Perturbation]) -> list[WrittenQuestion | None]:
        return [real_question(item, self.seed) if isinstance(item, Perturbation) else None for item in items]




_TAG = re.compile(r"<\|\s*(start|end)\s+of\s+(question|answer)\s*\|>", re.IGNORECASE)
_NOT_APPLICABLE = re.compile(r"^\W*(not\s+applicable|none)\b", re.IGNORECASE)


def parse_reply(reply: str) -> WriteOutcome:
    """Parse a writer reply in the paper's tagged format, tolerant of whitespace, case and a missing end tag.

    `<|Start of Question|> q <|End of Question|> <|Start of Answer|> a <|End of Answer|>` -> written;
    "Not applicable" (or "None") instead of the format, or as the question -> not applicable; else unparsable.
    """
    tags = list(_TAG.finditer(reply))

    def section(name: str) -> str | None:
        for number, tag in enumerate(tags):
            if tag.group(1).lower() == "start" and tag.group(2).lower() == name:
                end = tags[number + 1].start() if number + 1 < len(tags) else len(reply)
                text = " ".join(reply[tag.end():end].split())
                if len(text) > 1 and text[0] == "[" and text[-1] == "]":
                    text = text[1:-1].strip()
                return text.strip("'\"` ") or None
        return None

    question, answer = section("question"), section("answer")
    if question is not None and _NOT_APPLICABLE.match(question) and len(question) < 40:
        return WriteOutcome(NOT_APPLICABLE, reply=reply)
    if question is not None and answer is not None:
        return WriteOutcome(WRITTEN, WrittenQuestion(question, answer), reply=reply)
    if not tags and _NOT_APPLICABLE.match(reply.strip()):
        return WriteOutcome(NOT_APPLICABLE, reply=reply)
    return WriteOutcome(UNPARSABLE, reply=reply)


_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_FORMAT = (
    "If the false fact is ungrammatical, makes no sense, or says the same as one of the true facts, reply "
    "with exactly: Not applicable\n"
    "Otherwise reply in exactly this format, and nothing else:\n"
    "<|Start of Question|>\n[question]\n<|End of Question|>\n<|Start of Answer|>\n[answer]\n<|End of Answer|>"
)
_TASKS = {
    "object": (
        "A video is described by the true facts below. The false fact mentions '{missing}', which does not "
        "appear anywhere in the video; everything the video shows is: {entities}.\n"
        "Write one question about the video that takes the false fact for granted, so that it cannot be "
        "answered from the video. It may ask about the {missing}'s colour, shape, size, state, number, "
        "location, purpose or parts, about what happens with it, or when. Mention the false fact in the "
        "question. Then write the answer: say that the question is unanswerable and explain that there is "
        "no {missing} in the video."
    ),
    "relation": (
        "A video is described by the true facts below. The false fact names a relation or action that does "
        "not happen in the video, although the entities in it do appear.\n"
        "Write one question about the video that takes the false fact for granted, so that it cannot be "
        "answered from the video. It may ask about the colour, shape, state, size, material, use, number, "
        "location or parts of the objects involved, or about when or why it happens. Mention the false fact "
        "in the question. Then write the answer: say that the question is unanswerable and explain that the "
        "video does not show {missing}."
    ),
    "attribute": (
        "A video is described by the true description below. The false description is the same except that "
        "it says '{missing}' where the video shows '{original}'.\n"
        "Write one question about the video that takes the false description for granted, so that it cannot "
        "be answered from the video. It may ask about actions, states, numbers, locations, relations, timing "
        "or parts. Mention the '{missing}' attribute in the question. Then write the answer: say that the "
        "question is unanswerable and explain that nothing in the video is {missing} in that way."
    ),
}


def chat_prompt(item: Perturbation) -> str:
    """The instruction sent for one perturbation: the true facts, the false one, the task and the format."""
    slots = item.slots
    true_facts = slots.get("related_facts") or [item.true_fact]
    entities = ", ".join(slots.get("entities") or []) or "(not listed)"
    task = _TASKS[item.category].format(
        missing=item.missing_element, entities=entities, original=slots.get("attribute", item.true_fact)
    )
    label = "Description" if item.category == "attribute" else "Facts"
    return (
        f"{_PREAMBLE}\n\n<|Start Of Instruction|>\n{task}\n"
        f"<|Start of True {label}|>\n" + "\n".join(f"- {fact}" for fact in true_facts)
        + f"\n<|End of True {label}|>\n"
        f"<|Start of False {label}|>\n- {item.false_fact}\n<|End of False {label}|>\n"
        f"{_FORMAT}\n<|End Of Instruction|>"
    )


class ChatWriterError(ChatError):
    """The chat writer cannot go on: an API key variable that is not set, an endpoint that refuses (HTTP
    401/403/404) or that does not answer attempt after attempt. One line, never holding the key."""


@dataclass
class ChatStats:
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    written: int = 0
    not_applicable: int = 0
    unparsable: int = 0
    failed: int = 0


class ChatWriter:
    """Question writer backed by an OpenAI-compatible chat-completions endpoint, through the shared
    `datamodules.chat.ChatClient` (the openai package).

    Requests run concurrently (at most `concurrency` at a time). A failed attempt (timeout, no connection,
    HTTP 408/409/429/5xx) is retried by the openai client, up to `max_retries` times, waiting the server's
    Retry-After when it sends one; any other HTTP error fails the item at once. Each item's outcome is
    `written`, `not_applicable`, `unparsable` or `failed`, counted in `stats`.

    The run stops with `ChatWriterError` (from `write_iter`, so from `generate`) when the endpoint answers
    HTTP 401, 403 or 404, or leaves `max_connection_failures` attempts in a row without an answer. The API
    key is read from the environment variable named `api_key_env` (named but unset: `ChatWriterError`) and
    sent only in the Authorization header; it is redacted from replies and errors, so it is never cached,
    logged or written. Replies are cached by a hash of the request (model, messages, sampling settings)
    when `cache_path` is given.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        max_connection_failures: int = 3,
        temperature: float = 1.0,
        max_tokens: int | None = None,
        system_prompt: str = "You are a helpful and harmless assistant.",
        cache_path: str | os.PathLike | None = None,
    ):
        if concurrency < 1:
            raise ChatWriterError("chat writer: concurrency must be >= 1")
        self.client = ChatClient(
            base_url, model, api_key_env, timeout=timeout, max_retries=max_retries,
            max_connection_failures=max_connection_failures, temperature=temperature, max_tokens=max_tokens,
            cache=ReplyCache(cache_path) if cache_path is not None else None,
            error_class=ChatWriterError, name="chat writer",
        )
        self.url, self.model = self.client.url, model
        self.concurrency = concurrency
        self.system_prompt = system_prompt
        self.cache = self.client.cache
        self._outcomes: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        return f"ChatWriter(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # ------------------------------------------------------------------------------------------ API
    @property
    def stats(self) -> ChatStats:
        """Requests, retries and cache hits (the client's) and the outcomes so far."""
        with self._stats_lock:
            outcomes = dict(self._outcomes)
        sent = self.client.stats
        return ChatStats(requests=sent["requests"], cache_hits=sent["cache_hits"], retries=sent["retries"],
                         **outcomes)

    def messages(self, item: Perturbation) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": chat_prompt(item)}]

    def request_body(self, item: Perturbation) -> dict[str, Any]:
        return self.client.body(self.messages(item))

    def write(self, items: Sequence[Perturbation]) -> list[WrittenQuestion | None]:
        return [outcome.written for outcome in self.write_outcomes(items)]

    def write_outcomes(self, items: Sequence[Perturbation]) -> list[WriteOutcome]:
        outcomes: list[WriteOutcome | None] = [None] * len(items)
        for index, outcome in self.write_iter(items):
            outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    def write_iter(self, items: Sequence[Perturbation]) -> Iterator[tuple[int, WriteOutcome]]:
        """(index, outcome) per item in completion order, with at most `concurrency` requests in flight.

        Stopping the iteration early (an exception, Ctrl-C, `close()`) cancels the items not yet sent, and
        requests waiting for a retry give up at their next attempt. A `ChatWriterError` (the endpoint
        refuses or does not answer) is raised from here as soon as one request meets it.
        """
        self.client.resume()
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="chat-writer")
        pending: dict[Future, int] = {}
        queue = iter(enumerate(items))
        try:
            while True:
                while len(pending) < self.concurrency * 2:
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    pending[pool.submit(self._write_one, nxt[1])] = nxt[0]
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            self.client.stop()
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.client.stop()

    # ------------------------------------------------------------------------------------- internals
    def _write_one(self, item: Perturbation) -> WriteOutcome:
        try:
            reply = self.client.complete(self.messages(item))  # the key is redacted from it
        except ChatRequestError as error:  # a ChatWriterError is not an item's: it ends the run
            self._count(FAILED)
            return WriteOutcome(FAILED, error=str(error))
        outcome = parse_reply(reply)
        self._count(outcome.status)
        return outcome

    def _count(self, status: str) -> None:
        with self._stats_lock:
            self._outcomes[status] += 1
