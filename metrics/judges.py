"""Judges: label one response to one test item as refused, correct and reason_ok (docs/design.md section 6).

One interface, `Judge.judge(...)` / `Judge.judge_many(...)`, with three ways to decide whether an answer
to an answerable question is correct: exact normalised match, token overlap, or an LLM through any
OpenAI-compatible chat-completions endpoint (`datamodules.chat`). Refusal is always the rule-based
`is_refusal`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from datamodules.chat import ChatClient, ChatError, ChatRequestError, ReplyCache, request_key
from metrics.refusal import NUMBER_WORDS, is_refusal, reason_ok

__all__ = [
    "ChatJudge",
    "ChatJudgeError",
    "ExactMatchJudge",
    "Judge",
    "JudgeItem",
    "Judgement",
    "LexicalJudge",
    "normalize_answer",
    "parse_verdict",
    "token_f1",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    """The judge's labels for one response. For an unanswerable item `correct == refused`;
    `reason_ok` is True only for a refusal of an unanswerable item that names the missing element."""

    refused: bool
    correct: bool
    reason_ok: bool


@dataclass(frozen=True)
class JudgeItem:
    """What a judge needs to know about one test item and the response to it."""

    question: str
    gold: str
    response: str
    answerable: bool
    missing_element: str | None = None


class Judge(ABC):
    """Base judge. Subclasses implement `answer_matches(question, gold, response)`; the rest is shared:

    - `refused` comes from `refusal_detector` (default: the rule-based `is_refusal`);
    - answerable item: `correct = not refused and answer_matches(...)`, `reason_ok = False`;
    - unanswerable item: `correct = refused`, `reason_ok = refused and reason_ok(response, missing_element)`.
    """

    def __init__(self, refusal_detector: Callable[[str], bool] = is_refusal) -> None:
        self.refusal_detector = refusal_detector

    @abstractmethod
    def answer_matches(self, question: str, gold: str, response: str) -> bool:
        """Whether a (non-refusal) response to an answerable question matches the gold answer."""

    def judge(
        self, question: str, gold: str, response: str, answerable: bool, missing_element: str | None = None
    ) -> Judgement:
        """Judge one response."""
        return self.judge_many([JudgeItem(question, gold, response, answerable, missing_element)])[0]

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        """Judge a batch of responses (a chat judge sends the needed requests concurrently)."""
        refused = [bool(self.refusal_detector(item.response)) for item in items]
        to_match = [i for i, item in enumerate(items) if item.answerable and not refused[i]]
        matches = dict(zip(to_match, self._match_many([items[i] for i in to_match]), strict=True))
        out = []
        for i, item in enumerate(items):
            if item.answerable:
                out.append(Judgement(refused=refused[i], correct=matches.get(i, False), reason_ok=False))
            else:
                named = refused[i] and reason_ok(item.response, item.missing_element)
                out.append(Judgement(refused=refused[i], correct=refused[i], reason_ok=named))
        return out

    def _match_many(self, items: Sequence[JudgeItem]) -> list[bool]:
        return [self.answer_matches(item.question, item.gold, item.response) for item in items]


# ---------------------------------------------------------------------------------------------------------
# Normalisation shared by the exact and lexical judges

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NUMBER_WORDS = {
    **NUMBER_WORDS,
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
    "once": "1",
    "twice": "2",
    "first": "1st",
    "second": "2nd",
    "third": "3rd",
}


def normalize_answer(text: str) -> str:
    """Lower-case, straighten quotes, drop punctuation and articles, spell numbers as digits, and collapse
    whitespace: "The THREE red circles." -> "3 red circles"."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<!\d)\.(?!\d)|[^\w\s.]", " ", text)  # keep decimal points only
    text = _ARTICLES.sub(" ", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(words)


class ExactMatchJudge(Judge):
    """Correct when the normalised response equals the normalised gold answer (the synthetic world, whose
    gold answers are exact). With `contains=True`, also when the normalised gold occurs in the response
    as a whole-word span ("red" in "the circle is red")."""

    def __init__(self, contains: bool = False, refusal_detector: Callable[[str], bool] = is_refusal) -> None:
        super().__init__(refusal_detector)
        self.contains = contains

    def answer_matches(self, question: str, gold: str, response: str) -> bool:
        gold_n, response_n = normalize_answer(gold), normalize_answer(response)
        if not gold_n:
            return False
        if gold_n == response_n:
            return True
        return self.contains and f" {gold_n} " in f" {response_n} "


def token_f1(gold: str, response: str) -> float:
    """SQuAD-style token F1 between the normalised texts (bag of words, counts clipped)."""
    gold_tokens, response_tokens = normalize_answer(gold).split(), normalize_answer(response).split()
    if not gold_tokens or not response_tokens:
        return float(gold_tokens == response_tokens)
    common = sum((Counter(gold_tokens) & Counter(response_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(response_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


_YES_NO = re.compile(r"^(yes|no)\b")


class LexicalJudge(Judge):
    """A documented lexical fallback for free-form answers when no LLM judge is available.

    - If the gold answer starts with "yes" or "no", the response is correct when it starts with the same
      word (a yes/no question is decided by its first word, not by the explanation after it).
    - Otherwise the response is correct when the token F1 (`token_f1`: normalised words, bag of words)
      between gold and response is at least `threshold` (default 0.5), or when the whole normalised gold
      answer occurs in the response and is at most `short_answer_words` words long ("red" in "it is red").

    It under-credits paraphrases ("crimson" for "red") and over-credits answers that repeat the
    question's words; prefer `ChatJudge` for reported free-form numbers.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        short_answer_words: int = 3,
        refusal_detector: Callable[[str], bool] = is_refusal,
    ) -> None:
        super().__init__(refusal_detector)
        self.threshold = threshold
        self.short_answer_words = short_answer_words

    def answer_matches(self, question: str, gold: str, response: str) -> bool:
        gold_n, response_n = normalize_answer(gold), normalize_answer(response)
        gold_yes_no = _YES_NO.match(gold_n)
        if gold_yes_no:
            response_yes_no = _YES_NO.match(response_n)
            return bool(response_yes_no) and response_yes_no.group(1) == gold_yes_no.group(1)
        if gold_n and len(gold_n.split()) <= self.short_answer_words and f" {gold_n} " in f" {response_n} ":
            return True
        return token_f1(gold, response) >= self.threshold


# ---------------------------------------------------------------------------------------------------------
# LLM judge through an OpenAI-compatible chat-completions endpoint

CHAT_JUDGE_SYSTEM = (
    "You grade answers to questions about a video. You are given the question, the correct (gold) answer "
    "and a model's response. Reply with exactly one word: yes if the response answers the question and "
    "agrees with the gold answer, no otherwise."
)
CHAT_JUDGE_TEMPLATE = (
    "Question: {question}\nGold answer: {gold}\nResponse: {response}\nIs the response correct?"
)


class ChatJudgeError(ChatError):
    """The chat judge got no verdict: for one item after the retries (with ``on_error="raise"``), or for any
    item because the endpoint refuses (HTTP 401/403/404) or does not answer (raised whatever `on_error`)."""


_VERDICT = re.compile(r"^\W*(yes|no|correct|incorrect|true|false)\b", re.IGNORECASE)
_VERDICT_VALUE = {"yes": True, "correct": True, "true": True, "no": False, "incorrect": False, "false": False}


def parse_verdict(reply: str) -> bool | None:
    """Read a yes/no verdict from the start of a chat reply; None when there is none."""
    match = _VERDICT.match(reply.strip())
    return _VERDICT_VALUE[match.group(1).lower()] if match else None


class ChatJudge(Judge):
    """Correctness judged by an LLM through any OpenAI-compatible chat-completions endpoint (OpenAI,
    vLLM, a local server), through the shared `datamodules.chat.ChatClient` (the openai package).

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``;
            requests go to ``{base_url}/chat/completions``.
        model: the model name sent in each request.
        api_key_env: the NAME of the environment variable that holds the API key, e.g. "OPENAI_API_KEY"
            (read once, here; never stored in the judge's repr, logged or written to the cache). A named
            variable that is unset raises `ChatJudgeError`; None (the default) sends no key (a local server).
        max_workers: the most requests in flight at once.
        max_retries: retries of a failed attempt (timeout, connection error, HTTP 408/409/429/5xx; by the
            openai client, which waits the server's Retry-After when it sends one), and, separately, new
            requests after a reply without a yes/no verdict.
        max_connection_failures: attempts in a row without an answer after which the endpoint counts as
            unreachable and judging stops with `ChatJudgeError` (0: never).
        timeout: seconds per request.
        cache_path: optional JSONL reply cache (`datamodules.chat.ReplyCache`): replies with a verdict are
            keyed by a hash of the model, the prompt and the sampling settings, so a rerun sends no request
            twice. Lines are appended as they come, so an interrupted run keeps what it had. Without it,
            replies are cached in memory for the judge's lifetime.
        on_error: "raise" (default) raises `ChatJudgeError` when an item gets no verdict after the retries;
            "incorrect" counts such an item as incorrect and logs a warning (see `stats`). HTTP 401/403/404
            and an unreachable endpoint raise whatever `on_error` says: no item can get a verdict.

    `stats` counts requests, cache hits, retries and failures.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        max_workers: int = 8,
        max_retries: int = 3,
        timeout: float = 60.0,
        cache_path: str | os.PathLike | None = None,
        on_error: str = "raise",
        system_prompt: str = CHAT_JUDGE_SYSTEM,
        template: str = CHAT_JUDGE_TEMPLATE,
        max_tokens: int = 4,
        max_connection_failures: int = 3,
        refusal_detector: Callable[[str], bool] = is_refusal,
    ) -> None:
        super().__init__(refusal_detector)
        if on_error not in {"raise", "incorrect"}:
            raise ValueError(f"ChatJudge: on_error must be 'raise' or 'incorrect', got {on_error!r}")
        self.max_workers = max(1, int(max_workers))
        self.max_retries = max(0, int(max_retries))
        self.on_error = on_error
        self.system_prompt = system_prompt
        self.template = template
        self.client = ChatClient(
            base_url, model, api_key_env, timeout=timeout, max_retries=self.max_retries,
            max_connection_failures=max_connection_failures, temperature=0, max_tokens=max_tokens,
            cache=ReplyCache(cache_path), error_class=ChatJudgeError, name="chat judge",
        )
        self.url, self.model = self.client.url, model
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChatJudge(url={self.url!r}, model={self.model!r})"

    @property
    def stats(self) -> Counter[str]:
        """requests (HTTP attempts), retries, cache_hits and failures (items without a verdict)."""
        with self._lock:
            counts = Counter(self._counts)
        counts.update(self.client.stats)
        return counts

    # -- requests -----------------------------------------------------------------------------------------
    def messages(self, question: str, gold: str, response: str) -> list[dict[str, str]]:
        """The chat messages sent for one item."""
        user = self.template.format(question=question, gold=gold, response=response)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        return request_key(self.client.body(messages))

    def _verdict(self, messages: list[dict[str, str]]) -> bool | None:
        cached = self.client.cached(messages)
        if cached is not None and parse_verdict(cached) is not None:
            return parse_verdict(cached)
        for ask in range(self.max_retries + 1):
            if ask:
                with self._lock:
                    self._counts["retries"] += 1
            try:
                reply = self.client.send(messages)  # a ChatJudgeError (401, unreachable) ends the run
            except ChatRequestError as error:
                problem = str(error)
                break
            verdict = parse_verdict(reply)
            if verdict is not None:
                self.client.remember(messages, reply)
                return verdict
            problem = f"a reply without a yes/no verdict after {ask + 1} attempt(s)"
        with self._lock:
            self._counts["failures"] += 1
        message = f"chat judge at {self.url}: {problem}"
        if self.on_error == "raise":
            raise ChatJudgeError(message)
        log.warning("%s; counted as incorrect", message)
        return None

    def answer_matches(self, question: str, gold: str, response: str) -> bool:
        return bool(self._verdict(self.messages(question, gold, response)))

    def _match_many(self, items: Sequence[JudgeItem]) -> list[bool]:
        if not items:
            return []
        prompts = [self.messages(item.question, item.gold, item.response) for item in items]
        unique: dict[str, list[dict[str, str]]] = {}
        for messages in prompts:
            unique.setdefault(self.cache_key(messages), messages)
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(unique))) as pool:
            verdicts = dict(zip(unique, pool.map(self._verdict, unique.values()), strict=True))
        return [bool(verdicts[self.cache_key(messages)]) for messages in prompts]
