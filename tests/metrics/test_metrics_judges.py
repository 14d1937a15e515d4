"""Judges: the shared labelling rules, exact and lexical matching, and the chat judge against a real
HTTP server on 127.0.0.1 (yes, no, garbage, HTTP 500 then success, timeouts, cache, concurrency limit, HTTP
401/403/404, 429 with Retry-After, a closed port, a reply that echoes the API key)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datamodules.chat import NO_KEY
from metrics.judges import (
    ChatJudge,
    ChatJudgeError,
    ExactMatchJudge,
    JudgeItem,
    Judgement,
    LexicalJudge,
    normalize_answer,
    parse_verdict,
    token_f1,
)

REFUSAL = "The question is unanswerable because there is no green triangle in the video."


# ---------------------------------------------------------------------------------------------------------
# Shared rules and the offline judges


def test_normalize_answer():
    assert normalize_answer("The THREE red circles.") == "3 red circles"
    assert normalize_answer("An apple, a pear!") == "apple pear"
    assert normalize_answer("It costs 1,000.50 dollars") == "it costs 1000.50 dollars"


@pytest.mark.parametrize(
    ("gold", "response", "contains", "expected"),
    [
        ("red", "Red.", False, True),
        ("3 circles", "Three circles", False, True),
        ("The circle moves left.", "the circle moves left", False, True),
        ("red", "The circle is red.", False, False),
        ("red", "The circle is red.", True, True),
        ("red", "The circle is reddish.", True, False),
        ("", "", False, False),
    ],
)
def test_exact_match(gold, response, contains, expected):
    assert ExactMatchJudge(contains=contains).answer_matches("q", gold, response) is expected


def test_judgement_rules_for_answerable_and_unanswerable_items():
    judge = ExactMatchJudge()
    assert judge.judge("What colour is the circle?", "red", "Red", answerable=True) == Judgement(
        False, True, False
    )
    # a refusal of an answerable item is refused and never correct, even if the gold text appears in it
    assert judge.judge("q", "red", "I cannot tell whether it is red.", answerable=True) == Judgement(
        True, False, False
    )
    # unanswerable: correct == refused; reason_ok needs a refusal that names the missing element
    assert judge.judge(
        "q", REFUSAL, REFUSAL, answerable=False, missing_element="green triangle"
    ) == Judgement(True, True, True)
    assert judge.judge(
        "q", REFUSAL, "There is no triangle in the video.", False, "green triangle"
    ) == Judgement(True, True, False)
    assert judge.judge("q", REFUSAL, "The green triangle is big.", False, "green triangle") == Judgement(
        False, False, False
    )


@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("Yes", "Yes, the man is wearing a hat.", True),
        ("No.", "Yes, he is.", False),
        ("no", "No", True),
        ("red", "It is red.", True),  # short gold answer contained in the response
        ("The man is cutting vegetables in the kitchen.", "A man cuts vegetables in a kitchen.", True),
        ("The man is cutting vegetables in the kitchen.", "A woman is singing on a stage.", False),
    ],
)
def test_lexical_judge(gold, response, expected):
    assert LexicalJudge().answer_matches("q", gold, response) is expected


def test_token_f1():
    assert token_f1("red ball", "a red ball") == 1.0
    assert token_f1("red ball", "blue cube") == 0.0
    assert token_f1("red ball", "red cube") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Yes.", True),
        ("yes", True),
        ("**No**, it is wrong", False),
        ("Correct", True),
        ("maybe", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


# ---------------------------------------------------------------------------------------------------------
# ChatJudge against a loopback server


class _Server:
    """An OpenAI-compatible /v1/chat/completions stub whose behaviour depends on the graded response text:
    "say-yes", "say-no", "say-garbage", "fail-once" (500, then yes), "always-500", "bad-request" (400),
    "slow" (sleeps `slow_s`, then yes), "slow-once" (slow only the first time), "unauthorized" (401),
    "unauthorized-echo" (401 naming the key sent), "forbidden" (403), "not-found" (404), "rate-limited"
    (429 with Retry-After: 2, then yes), "echo-key" (yes, followed by the bearer token the request
    carried)."""

    def __init__(self, slow_s: float = 1.0):
        self.slow_s = slow_s
        self.calls: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                marker = next((m for m in server.MARKERS if m in user), "say-yes")
                with server.lock:
                    server.calls[marker] += 1
                    count = server.calls[marker]
                    server.auth.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    code, payload, headers = self._answer(marker, count, body)
                finally:
                    # Out of flight before the reply leaves: once the client has it, it may send its next
                    # request, which must not find this one still counted.
                    with server.lock:
                        server.in_flight -= 1
                self._send(code, payload, headers)

            def _answer(self, marker, count, body) -> tuple[int, dict, dict]:
                if marker == "always-500" or (marker == "fail-once" and count == 1):
                    return 500, {"error": "overloaded"}, {}
                if marker == "bad-request":
                    return 400, {"error": "bad model"}, {}
                refused = {"unauthorized": 401, "forbidden": 403, "not-found": 404}.get(marker)
                if refused:
                    return refused, {"error": {"message": f"refused ({marker})"}}, {}
                if marker == "unauthorized-echo":
                    bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    return 401, {"error": {"message": f"Incorrect API key provided: {bearer}"}}, {}
                if marker == "rate-limited" and count == 1:
                    return 429, {"error": {"message": "slow down"}}, {"Retry-After": "2"}
                if marker == "slow" or (marker == "slow-once" and count == 1):
                    time.sleep(server.slow_s)
                if marker == "busy":
                    time.sleep(0.15)
                content = {"say-no": "No.", "say-garbage": "Let me think about it."}.get(marker, "Yes")
                if marker == "echo-key":
                    content = f"Yes, {self.headers.get('Authorization', '').removeprefix('Bearer ')}"
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                return 200, {"model": body["model"], **reply}, {}

            def _send(self, code, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    MARKERS = ("say-no", "say-garbage", "fail-once", "always-500", "bad-request", "slow-once", "slow", "busy",
               "unauthorized-echo", "unauthorized", "forbidden", "not-found", "rate-limited", "echo-key")


@pytest.fixture
def server():
    stub = _Server()
    stub.thread.start()
    yield stub
    stub.httpd.shutdown()
    stub.httpd.server_close()


def _judge(server, **kwargs) -> ChatJudge:
    options = {"model": "judge-model", "max_retries": 2}
    options.update(kwargs)
    return ChatJudge(server.url, **options)


def _item(marker: str, answerable: bool = True) -> JudgeItem:
    return JudgeItem(
        question="What colour is the circle?",
        gold="red",
        response=f"It is red ({marker}).",
        answerable=answerable,
    )


def test_chat_judge_yes_and_no(server, monkeypatch, caplog):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    judge = _judge(server, api_key_env="TEST_JUDGE_KEY")
    with caplog.at_level(logging.DEBUG):
        yes, no = judge.judge_many([_item("say-yes"), _item("say-no")])
    assert yes == Judgement(refused=False, correct=True, reason_ok=False)
    assert no == Judgement(refused=False, correct=False, reason_ok=False)
    assert server.auth == ["Bearer sk-secret-123"] * 2
    assert "sk-secret-123" not in repr(judge) + caplog.text + json.dumps(judge.__dict__, default=str)


def test_chat_judge_skips_refusals_and_unanswerable_items(server):
    judge = _judge(server)
    refusal = JudgeItem("q", "red", "I cannot tell from the video.", answerable=True)
    unanswerable = JudgeItem("q", REFUSAL, REFUSAL, answerable=False, missing_element="green triangle")
    assert judge.judge_many([refusal, unanswerable]) == [
        Judgement(True, False, False),
        Judgement(True, True, True),
    ]
    assert sum(server.calls.values()) == 0


def test_chat_judge_without_a_key_variable_sends_a_placeholder_not_openai_api_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")  # the openai client's own fallback
    assert _judge(server).judge_many([_item("say-yes")])[0].correct
    assert server.auth == [f"Bearer {NO_KEY}"]


def test_chat_judge_with_an_unset_key_variable_is_an_error(server, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ChatJudgeError, match="environment variable TEST_JUDGE_KEY .* is not set"):
        _judge(server, api_key_env="TEST_JUDGE_KEY")
    assert sum(server.calls.values()) == 0


def test_chat_judge_garbage_is_retried_then_fails(server, caplog):
    with pytest.raises(ChatJudgeError, match="without a yes/no verdict after 3 attempt"):
        _judge(server).judge_many([_item("say-garbage")])
    assert server.calls["say-garbage"] == 3
    judge = _judge(server, on_error="incorrect", max_retries=0)
    with caplog.at_level(logging.WARNING):
        assert judge.judge_many([_item("say-garbage")])[0].correct is False
    assert judge.stats["failures"] == 1 and "counted as incorrect" in caplog.text


def test_chat_judge_retries_http_500_then_succeeds(server):
    judge = _judge(server)
    assert judge.judge_many([_item("fail-once")])[0].correct
    assert server.calls["fail-once"] == 2 and judge.stats["retries"] == 1


def test_chat_judge_gives_up_on_persistent_500_and_does_not_retry_400(server):
    with pytest.raises(ChatJudgeError, match="HTTP 500"):
        _judge(server, max_retries=1).judge_many([_item("always-500")])
    assert server.calls["always-500"] == 2
    with pytest.raises(ChatJudgeError, match="HTTP 400"):
        _judge(server).judge_many([_item("bad-request")])
    assert server.calls["bad-request"] == 1


def test_chat_judge_timeout(server):
    server.slow_s = 4.0
    start = time.monotonic()
    with pytest.raises(ChatJudgeError, match="no reply"):
        _judge(server, timeout=0.2, max_retries=1).judge_many([_item("slow")])
    # Two tries that each waited out the 4 s reply would take 8 s; the margin absorbs a loaded machine (a 1 s
    # reply and a 1.5 s bound failed once beside a demo run).
    assert time.monotonic() - start < 4.0
    # a timeout followed by a prompt reply succeeds
    server.slow_s = 1.0
    assert _judge(server, timeout=0.3, max_retries=2).judge_many([_item("slow-once")])[0].correct


def test_chat_judge_cache_in_memory_and_on_disk(server, tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    items = [_item("say-yes"), _item("say-no"), _item("say-yes")]  # the duplicate is sent once
    judge = _judge(server, cache_path=cache)
    first = judge.judge_many(items)
    assert sum(server.calls.values()) == 2
    assert judge.judge_many(items) == first and sum(server.calls.values()) == 2
    with open(cache, "a") as f:
        f.write('{"key": "cut short')  # an interrupted write
    fresh = _judge(server, cache_path=cache)
    assert fresh.judge_many(items) == first
    assert sum(server.calls.values()) == 2 and fresh.stats["cache_hits"] == 2


def test_chat_judge_limits_concurrency(server):
    items = [JudgeItem("q", "red", f"answer {i} busy", answerable=True) for i in range(8)]
    assert all(j.correct for j in _judge(server, max_workers=4).judge_many(items))
    assert server.calls["busy"] == 8
    assert 1 < server.max_in_flight <= 4  # concurrent, not one after another, and never more than 4


@pytest.mark.parametrize(("marker", "status"),
                         [("unauthorized", 401), ("forbidden", 403), ("not-found", 404)])
@pytest.mark.parametrize("on_error", ["raise", "incorrect"])
def test_chat_judge_stops_at_once_on_401_403_404(server, marker, status, on_error):
    items = [JudgeItem("q", "red", f"answer {i} {marker}", answerable=True) for i in range(12)]
    judge = _judge(server, max_workers=2, max_retries=3, on_error=on_error)
    with pytest.raises(ChatJudgeError) as caught:
        judge.judge_many(items)
    message = str(caught.value)
    assert message == f"chat judge: {server.url}/chat/completions answered HTTP {status}: refused ({marker})"
    assert server.calls[marker] <= 2  # the requests in flight when the first answer came; none retried


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("on_error", ["raise", "incorrect"])
def test_chat_judge_stops_after_n_connection_failures_in_a_row(on_error):
    judge = ChatJudge(_closed_port_url(), "m", max_retries=5, max_workers=1, max_connection_failures=3,
                      on_error=on_error)
    start = time.monotonic()
    with pytest.raises(ChatJudgeError, match=r"^chat judge: no answer from http://127\.0\.0\.1:\d+/v1/chat/"
                       r"completions after 3 attempts in a row \(ConnectError"):
        judge.judge_many([_item(f"say-yes {i}") for i in range(5)])
    assert judge.stats["requests"] == 3 and time.monotonic() - start < 3


def test_chat_judge_waits_the_retry_after_of_the_server(server):
    judge = _judge(server, max_retries=1)
    start = time.monotonic()
    assert judge.judge_many([_item("rate-limited")])[0].correct
    assert server.calls["rate-limited"] == 2 and judge.stats["retries"] == 1
    assert time.monotonic() - start >= 1.95  # the server's 2 s, not a backoff of its own (<= 0.5 s here)


def test_chat_judge_keeps_an_echoed_key_out_of_its_cache(server, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    cache = tmp_path / "judge_cache.jsonl"
    judge = _judge(server, api_key_env="TEST_JUDGE_KEY", cache_path=cache)
    assert judge.judge_many([_item("echo-key")])[0].correct
    assert server.auth == ["Bearer sk-secret-123"]
    assert "sk-secret-123" not in cache.read_text() and "Yes, ***" in cache.read_text()


def test_chat_judge_401_that_echoes_the_key_shows_it_nowhere(server, monkeypatch, caplog):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    judge = _judge(server, api_key_env="TEST_JUDGE_KEY")
    with caplog.at_level(logging.DEBUG), pytest.raises(ChatJudgeError) as caught:
        judge.judge_many([_item("unauthorized-echo")])
    assert str(caught.value).endswith("answered HTTP 401: Incorrect API key provided: ***")
    shown = "".join(traceback.format_exception(caught.value)) + caplog.text  # no chained openai error
    assert "sk-secret-123" not in shown and "***" in shown
