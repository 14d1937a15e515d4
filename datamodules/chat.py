"""One client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, a local server), shared by the
chat question writer (`datamodules.writers.ChatWriter`) and the chat judge (`metrics.judges.ChatJudge`).

HTTP, retries and backoff are the `openai` package's: a failed attempt (timeout, no connection, HTTP 408,
409, 429 or 5xx) is retried up to `max_retries` times, waiting the server's Retry-After when it sends one,
else 0.5 s doubling up to 8 s. On top of that this module adds what both users need, once:

- the key rule: the key is read from the environment variable the caller names (`api_key_env`); a named
  variable that is unset is a `ChatError` at construction; with no variable named, a placeholder is sent
  (the openai client requires a string, and would otherwise read OPENAI_API_KEY behind the caller's back);
- stopping: HTTP 401, 403 or 404 (a wrong key, a forbidden or wrong model, a wrong URL), and
  `max_connection_failures` attempts in a row without an answer (a closed port, a hung server), raise one
  `ChatError` naming the endpoint and the status, and every request after it (in any thread) raises the
  same error at once, without being sent;
- redaction: the key is replaced by "***" (`redact`) in every reply and error message the client returns,
  so nothing stored from them (the reply cache, records' metadata, logs) can hold it;
- the reply cache (`ReplyCache`): replies keyed by a hash of the request body (model, messages, sampling
  settings), one JSON line each, appended as they arrive.

The `openai` package is imported when the first client is made (it takes most of a second), not when this
module is imported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from datamodules.errors import UserError

__all__ = [
    "NO_KEY",
    "ChatClient",
    "ChatError",
    "ChatRequestError",
    "ReplyCache",
    "api_key_from_env",
    "redact",
    "request_key",
]

NO_KEY = "EMPTY"  # sent when no key variable is named (vLLM's convention for "no key")
REDACTED = "***"
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MESSAGE_CHARS = 300  # an error body is shortened to this many characters in messages


class ChatError(UserError, RuntimeError):
    """The endpoint cannot be used at all: a key variable that is not set, HTTP 401/403/404, or no answer
    after several attempts in a row. The message is one line and never holds the key; both command lines
    print it as one line (a `UserError`: the user's server, key or setting to fix)."""


class ChatRequestError(Exception):
    """One request got no usable reply after the retries (HTTP 400 or 5xx, a timeout, a reply that is not a
    chat completion); other requests may still succeed. The message never holds the key."""


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` (an API key) replaced by "***"; the one redaction rule."""
    return text.replace(secret, REDACTED) if secret else text


def api_key_from_env(api_key_env: str | None, error_class: type[ChatError] = ChatError) -> str | None:
    """The key held by the environment variable named `api_key_env`; None when no variable is named.

    A named variable that is unset or empty raises `error_class`, and so does a value that is no variable
    name (a key given in its place, most likely), without echoing it."""
    if not api_key_env:
        return None
    if not _VARIABLE_NAME.fullmatch(api_key_env):
        raise error_class(
            "api_key_env: the value given is not an environment variable name (letters, digits and _); give "
            "the NAME of the variable that holds the key, e.g. OPENAI_API_KEY, never the key itself"
        )
    value = os.environ.get(api_key_env)
    if not value:
        raise error_class(f"the environment variable {api_key_env} (the API key) is not set")
    return value


def check_base_url(base_url: str, error_class: type[ChatError] = ChatError) -> None:
    """Refuse a URL that carries credentials (``http://user:KEY@host/v1``): it would be saved in
    config.yaml, W&B runs and logs. The URL is not echoed, since it holds the secret."""
    parsed = urlsplit(base_url)
    if parsed.username is not None or parsed.password is not None:
        raise error_class(
            "base_url: the URL carries credentials (user:key@host), which would be saved in config files and "
            "W&B runs; put the key in an environment variable and name it with api_key_env"
        )


def request_key(body: dict[str, Any]) -> str:
    """The cache key of a request: a SHA-256 of its body (model, messages, sampling settings)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _one_line(text: str, limit: int = _MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ============================================================================================ the cache
class ReplyCache:
    """Replies keyed by `request_key`, in memory and, with a `path`, in a JSONL file of ``{"key", "reply"}``
    lines. Each line is appended with one write on a file opened for appending, so lines of concurrent
    writers never interleave; a line cut short by an interrupted run is removed when the file is opened
    again. Replies are stored as given: `ChatClient` hands over redacted ones only.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _truncate_torn_line(self.path)
            with self.path.open(encoding="utf-8") as handle:
                for text in handle:
                    try:
                        entry = json.loads(text)
                        self._replies[str(entry["key"])] = str(entry["reply"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line of another format

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            if key in self._replies:
                return
            self._replies[key] = reply
            if self.path is not None:
                line = (json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n").encode("utf-8")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)

    def __len__(self) -> int:
        return len(self._replies)


def _truncate_torn_line(path: Path) -> None:
    """Cut a file back to its last complete line (an interrupted append leaves a partial one)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


# =========================================================================================== the client
class ChatClient:
    """Chat completions from one model at one OpenAI-compatible endpoint, through the `openai` package.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to
            ``{base_url}/chat/completions``.
        model: the model name sent in each request.
        api_key_env: the NAME of the environment variable holding the key (see the module's key rule).
        timeout: seconds per attempt.
        max_retries: retries after a failed attempt (the openai client's retry rule).
        max_connection_failures: attempts in a row without an answer (no connection, a timeout) after which
            the endpoint counts as unreachable and everything stops with a `ChatError`; 0 never stops.
        temperature, max_tokens: sampling settings sent with each request (None: the server's default).
        cache: replies already had; `complete` reads and fills it.
        error_class: the `ChatError` subclass raised (the writer's and the judge's own).
        name: who is asking, for messages ("chat writer", "chat judge").

    `stats` counts ``requests`` (HTTP attempts), ``retries`` and ``cache_hits``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        max_connection_failures: int = 3,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache: ReplyCache | None = None,
        error_class: type[ChatError] = ChatError,
        name: str = "chat client",
    ):
        if timeout <= 0 or max_retries < 0 or max_connection_failures < 0:
            raise error_class(f"{name}: timeout must be > 0, max_retries and max_connection_failures >= 0")
        check_base_url(base_url, error_class)
        self._key = api_key_from_env(api_key_env, error_class)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.timeout, self.max_retries = timeout, max_retries
        self.max_connection_failures = max_connection_failures
        self.cache = cache
        self.error_class, self.name = error_class, name
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()  # attempts of the request this thread is sending
        self._stop = threading.Event()
        self._fatal: ChatError | None = None
        self._failures_in_a_row = 0
        parts = _openai_parts()
        self._openai = parts.openai.OpenAI(
            base_url=self.base_url, api_key=self._key or NO_KEY, timeout=timeout, max_retries=max_retries,
            http_client=parts.openai.DefaultHttpxClient(transport=parts.Transport(self)),
        )

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    # ---------------------------------------------------------------------------------------------- API
    def redact(self, text: str) -> str:
        return redact(text, self._key)

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The request body for `messages` (what the cache key is a hash of)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The reply to `messages`: from the cache, else sent (and then cached)."""
        reply = self.cached(messages)
        if reply is None:
            reply = self.send(messages)
            self.remember(messages, reply)
        return reply

    def cached(self, messages: list[dict[str, str]]) -> str | None:
        """The cached reply to `messages`, or None (no cache, or not asked yet)."""
        if self.cache is None:
            return None
        reply = self.cache.get(request_key(self.body(messages)))
        if reply is not None:
            with self._lock:
                self.stats["cache_hits"] += 1
        return reply

    def remember(self, messages: list[dict[str, str]], reply: str) -> None:
        if self.cache is not None:
            self.cache.put(request_key(self.body(messages)), self.redact(reply))

    def send(self, messages: list[dict[str, str]]) -> str:
        """Send one request (with the openai client's retries) and return the reply text, key redacted.

        Raises the `ChatError` that stopped the client, if any (at once, nothing sent), a new one on HTTP
        401/403/404 or too many failed attempts in a row, and `ChatRequestError` for a request that got no
        usable reply."""
        self._check()
        parts = _openai_parts()
        openai = parts.openai
        self._local.attempts = 0
        try:
            completion = self._openai.chat.completions.create(**self.body(messages))
        except parts.Stopped:
            self._check()
            raise ChatRequestError(f"{self.name}: stopped") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
            self._give_up(f"{self.url} answered HTTP {error.status_code}: {self._describe(error)}")
            self._check()
        except openai.APIStatusError as error:
            status = f"HTTP {error.status_code} from {self.url}: {self._describe(error)}"
            raise self._request_error(status) from None
        except openai.APITimeoutError:
            self._check()
            raise self._request_error(f"no reply from {self.url} within {self.timeout:g} s") from None
        except openai.APIConnectionError as error:
            self._check()
            cause = error.__cause__ or error
            raise self._request_error(f"no connection to {self.url} ({_one_line(str(cause))})") from None
        except openai.OpenAIError as error:
            raise self._request_error(f"a bad reply from {self.url}: {_one_line(str(error))}") from None
        finally:
            self._count_retries()
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ChatRequestError(f"a reply from {self.url} that is not a chat completion")
        return self.redact(content)

    def stop(self) -> None:
        """Send nothing more: requests waiting for a retry give up at their next attempt."""
        self._stop.set()

    def resume(self) -> None:
        """Undo `stop` (a client stopped by a `ChatError` stays stopped)."""
        self._stop.clear()

    # ----------------------------------------------------------------------------------------- internals
    def _check(self) -> None:
        if self._fatal is not None:  # a copy: threads raising one instance would share its traceback
            raise type(self._fatal)(*self._fatal.args) from None  # no chained error: it may hold the key

    def _give_up(self, problem: str) -> None:
        """Stop the client for good with one error (the first one, when threads race)."""
        with self._lock:
            if self._fatal is None:
                self._fatal = self.error_class(self.redact(_one_line(f"{self.name}: {problem}", 600)))

    def _request_error(self, problem: str) -> ChatRequestError:
        attempts = getattr(self._local, "attempts", 0)
        tries = f"{attempts} attempt" + ("" if attempts == 1 else "s")
        return ChatRequestError(self.redact(f"{problem} (gave up after {tries})"))

    def _describe(self, error: Any) -> str:
        body = getattr(error, "body", None)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        if isinstance(body, dict):
            body = body.get("message") or body
        text = body if isinstance(body, str) else json.dumps(body) if body is not None else str(error)
        return self.redact(_one_line(text))

    def _count_retries(self) -> None:
        with self._lock:
            self.stats["retries"] += max(0, getattr(self._local, "attempts", 0) - 1)

    # called by the transport, in the sending thread, around each attempt
    def _before_attempt(self) -> None:
        if self._fatal is not None or self._stop.is_set():
            raise _openai_parts().Stopped()
        self._local.attempts = getattr(self._local, "attempts", 0) + 1
        with self._lock:
            self.stats["requests"] += 1

    def _answered(self) -> None:
        with self._lock:
            self._failures_in_a_row = 0

    def _no_answer(self, error: Exception) -> None:
        with self._lock:
            self._failures_in_a_row += 1
            failures = self._failures_in_a_row
        if self.max_connection_failures and failures >= self.max_connection_failures:
            self._give_up(f"no answer from {self.url} after {failures} attempts in a row "
                          f"({type(error).__name__}: {_one_line(str(error)) or 'no detail'})")
            raise _openai_parts().Stopped() from error


@functools.cache
def _openai_parts() -> SimpleNamespace:
    """The `openai` module, the transport class that watches each attempt, and the error with which it
    stops (made on first use, so that importing this module does not import openai)."""
    import httpx2
    import openai

    class Stopped(openai.OpenAIError):
        """Raised by the transport instead of an attempt; openai passes its own errors on, unretried."""

    class WatchingTransport(httpx2.BaseTransport):
        """httpx2's transport, reporting each attempt and each attempt without an answer to the client."""

        def __init__(self, client: ChatClient):
            self.client = client
            self.inner = httpx2.HTTPTransport()

        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            self.client._before_attempt()
            try:
                response = self.inner.handle_request(request)
            except httpx2.TransportError as error:  # refused, reset, timed out
                self.client._no_answer(error)
                raise
            self.client._answered()
            return response

        def close(self) -> None:
            self.inner.close()

    return SimpleNamespace(openai=openai, Transport=WatchingTransport, Stopped=Stopped)
