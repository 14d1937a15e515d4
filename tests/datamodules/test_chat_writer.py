"""The chat writer against a real OpenAI-compatible HTTP server on loopback, and resumable generation.

The server (http.server in a thread, port 0) answers each request through a per-test `responder`, so a
test scripts well-formed replies, "Not applicable", garbage, HTTP errors (401, 404, 429 with Retry-After,
5xx), slow replies, a dying server and a reply that echoes the API key it was sent.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datamodules.__main__ import main
from datamodules.chat import NO_KEY
from datamodules.perturb import Perturbation
from datamodules.records import read_records
from datamodules.sources.generate import _PartialLog
from datamodules.writers import (
    FAILED,
    NOT_APPLICABLE,
    UNPARSABLE,
    WRITTEN,
    ChatWriter,
    ChatWriterError,
    WrittenQuestion,
    chat_prompt,
    parse_reply,
)

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "sk-test-0123456789-do-not-leak"

# A responder maps (false fact, attempt number for that fact) to (HTTP status, reply text, delay in s), or
# to (HTTP status, reply text, delay in s, extra headers). "{key}" in the text becomes the bearer token the
# request carried (a server that echoes the API key).
Responder = Callable[[str, int], tuple]


def tagged(question: str, answer: str, spacing: str = "\n") -> str:
    return (f"<|Start of Question|>{spacing}{question}{spacing}<|End of Question|>{spacing}"
            f"<|Start of Answer|>{spacing}{answer}{spacing}<|End of Answer|>")


def good_reply(fact: str) -> str:
    return tagged(f"When does the video show {fact}?",
                  f"The question is unanswerable because the video does not show {fact}.")


def false_fact_of(prompt: str) -> str:
    found = re.search(r"<\|Start of False \w+\|>\n- (.*)\n<\|End of False", prompt)
    assert found, prompt
    return found.group(1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default listen backlog of 5 drops bursts of concurrent connects


class ChatServer:
    """A minimal chat-completions endpoint: POST /v1/chat/completions, replies scripted by `responder`."""

    def __init__(self, responder: Responder):
        self.responder = responder
        self.attempts: Counter[str] = Counter()
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.authorizations: list[str | None] = []
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fact = false_fact_of(body["messages"][-1]["content"])
                with server._lock:
                    server.requests += 1
                    server.attempts[fact] += 1
                    attempt = server.attempts[fact]
                    server.authorizations.append(self.headers.get("Authorization"))
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, text, delay, *extra = server.responder(fact, attempt)
                    headers = extra[0] if extra else {}
                    bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    text = text.replace("{key}", bearer)
                    time.sleep(delay)
                    if status == 200:
                        payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": text}}]}
                    else:
                        payload = {"error": {"message": text}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[ChatServer] = []

    def start(responder: Responder) -> ChatServer:
        servers.append(ChatServer(responder))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def item(fact: str, category: str = "relation") -> Perturbation:
    slots = {"related_facts": ["barber holding comb"]}
    return Perturbation(category, "barber holding comb", fact, fact, slots)


# --------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "reply",
    [
        tagged("What colour is the belt?", "The question is unanswerable because there is no belt."),
        tagged("What colour is the belt?", "The question is unanswerable because there is no belt.", " "),
        "Sure!\n<|start of question|>What colour is the belt?<|end of question|>\n\n"
        "<| Start Of Answer |>\n  The question is unanswerable because there is no belt.\n<|END OF ANSWER|>",
        # the end tag cut off by a stop sequence, and "[...]" kept from the format's placeholder
        "<|Start of Question|>\n[What colour is the belt?]\n<|End of Question|>\n<|Start of Answer|>\n"
        "The question is unanswerable because there is no belt.",
    ],
)
def test_parse_reply_tolerates_whitespace_case_and_a_missing_end_tag(reply: str) -> None:
    outcome = parse_reply(reply)
    assert outcome.status == WRITTEN
    assert outcome.written.question == "What colour is the belt?"
    assert outcome.written.answer == "The question is unanswerable because there is no belt."


@pytest.mark.parametrize("reply", ["Not applicable", "  not applicable.", "'Not Applicable'",
                                   "Not applicable: the relation is ungrammatical.",
                                   tagged("Not applicable", "Not applicable")])
def test_parse_reply_not_applicable(reply: str) -> None:
    assert parse_reply(reply).status == NOT_APPLICABLE


@pytest.mark.parametrize("reply", ["", "I cannot help with that.", "<|Start of Question|>\nOnly a question?",
                                   "Question: what colour? Answer: unanswerable."])
def test_parse_reply_unparsable(reply: str) -> None:
    assert parse_reply(reply).status == UNPARSABLE


def test_prompt_carries_true_and_false_facts_and_the_format() -> None:
    p = Perturbation("object", "barber holding comb", "barber holding belt", "belt",
                     {"related_facts": ["barber holding comb", "customer sitting"],
                      "entities": ["barber", "comb"]})
    prompt = chat_prompt(p)
    assert "- barber holding comb\n- customer sitting" in prompt and "barber holding belt" in prompt
    assert "'belt'" in prompt and "barber, comb" in prompt and "Not applicable" in prompt
    assert "<|Start of Question|>" in prompt and "<|End of Answer|>" in prompt


# ---------------------------------------------------------------------------------- against a server
def test_outcomes_of_each_kind_of_reply(serve, tmp_path: Path) -> None:
    def responder(fact: str, attempt: int) -> tuple[int, str, float]:
        if fact == "na":
            return 200, "Not applicable", 0
        if fact == "garbage":
            return 200, "I would rather talk about something else.", 0
        if fact == "flaky" and attempt == 1:
            return 500, "internal error", 0
        if fact == "slow once" and attempt == 1:
            return 200, good_reply(fact), 1.5
        if fact == "always slow":
            return 200, good_reply(fact), 1.5
        return 200, good_reply(fact), 0

    server = serve(responder)
    writer = ChatWriter(server.base_url, "m", concurrency=4, timeout=0.5, max_retries=2)
    facts = ["ok", "na", "garbage", "flaky", "slow once", "always slow"]
    outcomes = writer.write_outcomes([item(f) for f in facts])
    status = {f: o.status for f, o in zip(facts, outcomes, strict=True)}
    assert status == {"ok": WRITTEN, "na": NOT_APPLICABLE, "garbage": UNPARSABLE, "flaky": WRITTEN,
                      "slow once": WRITTEN, "always slow": FAILED}
    assert outcomes[0].written.question == "When does the video show ok?"
    assert server.attempts["flaky"] == 2 and server.attempts["slow once"] == 2
    assert server.attempts["always slow"] == 3  # one try and max_retries=2 retries
    assert "gave up after 3 attempts" in outcomes[-1].error
    stats = writer.stats
    assert (stats.written, stats.not_applicable, stats.unparsable, stats.failed) == (3, 1, 1, 1)
    assert stats.retries == 4
    assert writer.write([item("ok")])[0].question == "When does the video show ok?"  # the protocol's write


def test_client_errors_are_not_retried(serve) -> None:
    server = serve(lambda fact, attempt: (400, "bad request: unknown model", 0))
    writer = ChatWriter(server.base_url, "nope", max_retries=3)
    (outcome,) = writer.write_outcomes([item("x")])
    assert outcome.status == FAILED and "HTTP 400" in outcome.error and "unknown model" in outcome.error
    assert server.requests == 1


def closed_port_url() -> str:
    """The base URL of a loopback port that nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_closed_port_stops_the_writer_after_n_attempts_in_a_row() -> None:
    writer = ChatWriter(closed_port_url(), "m", concurrency=1, max_retries=5, timeout=1,
                        max_connection_failures=2)
    start = time.monotonic()
    with pytest.raises(ChatWriterError, match=r"no answer from http://127\.0\.0\.1:\d+/v1/chat/completions "
                       r"after 2 attempts in a row \(ConnectError"):
        writer.write_outcomes([item(f"fact {i}") for i in range(6)])
    assert writer.stats.requests == 2  # not 6 items x 6 attempts
    assert time.monotonic() - start < 3


def test_http_429_waits_the_retry_after_of_the_server(serve) -> None:
    def responder(fact: str, attempt: int) -> tuple:
        if attempt == 1:
            return 429, "rate limited", 0, {"Retry-After": "1"}
        return 200, good_reply(fact), 0

    server = serve(responder)
    writer = ChatWriter(server.base_url, "m", max_retries=1)
    start = time.monotonic()
    (outcome,) = writer.write_outcomes([item("x")])
    assert outcome.status == WRITTEN and server.attempts["x"] == 2 and writer.stats.retries == 1
    assert time.monotonic() - start >= 0.95  # the server's 1 s, not the client's own backoff (<= 0.5 s)


def test_concurrency_limit_is_respected(serve) -> None:
    # Each reply takes 0.25 s, so that requests overlap even on a loaded machine (at 0.05 s the lower bound
    # failed once while other tests ran).
    server = serve(lambda fact, attempt: (200, good_reply(fact), 0.25))
    writer = ChatWriter(server.base_url, "m", concurrency=3)
    outcomes = writer.write_outcomes([item(f"fact {i}") for i in range(9)])
    assert all(o.status == WRITTEN for o in outcomes)
    assert [o.written.question for o in outcomes] == [f"When does the video show fact {i}?"
                                                      for i in range(9)]
    assert 2 <= server.max_in_flight <= 3


def test_api_key_comes_from_the_named_variable_and_is_never_written(serve, tmp_path, monkeypatch) -> None:
    def responder(fact: str, attempt: int) -> tuple[int, str, float]:
        return (500, "echo {key}", 0) if fact == "bad" else (200, good_reply(fact), 0)

    server = serve(responder)
    monkeypatch.setenv("UVQA_TEST_KEY", SECRET)
    cache = tmp_path / "cache.jsonl"
    writer = ChatWriter(server.base_url, "m", "UVQA_TEST_KEY", cache_path=cache, max_retries=0)
    outcomes = writer.write_outcomes([item("ok"), item("bad")])
    assert server.authorizations == [f"Bearer {SECRET}"] * 2
    assert SECRET not in repr(writer) and SECRET not in cache.read_text()
    assert SECRET not in outcomes[1].error and "echo ***" in outcomes[1].error
    monkeypatch.delenv("UVQA_TEST_KEY")
    with pytest.raises(ChatWriterError, match="UVQA_TEST_KEY"):
        ChatWriter(server.base_url, "m", "UVQA_TEST_KEY")


def test_a_key_echoed_in_a_reply_is_neither_cached_nor_returned(serve, tmp_path, monkeypatch) -> None:
    server = serve(lambda fact, attempt: (200, tagged("Is {key} your key?", "Yes, {key}."), 0))
    monkeypatch.setenv("UVQA_TEST_KEY", SECRET)
    cache = tmp_path / "cache.jsonl"
    writer = ChatWriter(server.base_url, "m", "UVQA_TEST_KEY", cache_path=cache)
    (outcome,) = writer.write_outcomes([item("x")])
    assert outcome.written == WrittenQuestion("Is *** your key?", "Yes, ***.")
    assert SECRET not in outcome.reply and "***" in outcome.reply
    assert SECRET not in cache.read_text() and "***" in cache.read_text()


def test_without_a_key_variable_a_placeholder_is_sent_not_openai_api_key(serve, monkeypatch) -> None:
    server = serve(lambda fact, attempt: (200, good_reply(fact), 0))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the openai client's own fallback must not be used
    ChatWriter(server.base_url, "m").write_outcomes([item("x")])
    assert server.authorizations == [f"Bearer {NO_KEY}"]


def test_replies_are_cached_by_prompt(serve, tmp_path: Path) -> None:
    server = serve(lambda fact, attempt: (200, good_reply(fact), 0))
    cache = tmp_path / "cache.jsonl"
    items = [item(f"fact {i}") for i in range(5)]
    first = ChatWriter(server.base_url, "m", cache_path=cache).write_outcomes(items)
    assert server.requests == 5 and len(cache.read_text().splitlines()) == 5
    with cache.open("a") as handle:  # a line torn by an interrupted append is dropped on reopening
        handle.write('{"key": "abc", "rep')
    again = ChatWriter(server.base_url, "m", cache_path=cache)
    assert again.write_outcomes(items) == first
    assert server.requests == 5 and again.stats.cache_hits == 5
    ChatWriter(server.base_url, "other-model", cache_path=cache).write_outcomes(items[:1])
    assert server.requests == 6  # another model is another prompt


# ------------------------------------------------------------------------------------ generate + resume
def moma_args(out: Path, server: ChatServer, *extra: str) -> list[str]:
    return ["generate", "--source", "moma", "--annotations", str(FIXTURES / "moma" / "anns.json"),
            "--category", "relation", "--writer", "chat", "--base-url", server.base_url, "--model", "m",
            "--concurrency", "4", "--max-retries", "1", "--timeout", "2",
            "--num", "12", "--seed", "3",
            "--out", str(out), *extra]


def scripted(fact: str, attempt: int) -> tuple[int, str, float]:
    """Deterministic replies: some facts are "not applicable", some garbage, the rest questions."""
    digest = sum(map(ord, fact))
    if digest % 7 == 0:
        return 200, "Not applicable", 0
    if digest % 11 == 0:
        return 200, "no idea", 0
    return 200, good_reply(fact), 0.002


def test_generate_with_chat_writer_writes_valid_records(serve, tmp_path: Path, capsys) -> None:
    server = serve(scripted)
    out = tmp_path / "relation.jsonl"
    assert main(moma_args(out, server)) == 0
    records, _ = read_records(out)
    assert len(records) == 12 and len({r.id for r in records}) == 12
    assert all(r.source == "moma" and r.category == "relation" and not r.answerable for r in records)
    assert all(r.meta["split"] == "train" and r.meta["model"] == "m" for r in records)
    assert {r.video for r in records} <= {"Kx81vQz2mPo.mp4", "p0BzW4nTqLe.mp4", "Zr5uYt7wQ0c.mp4"}
    assert all(r.question == f"When does the video show {r.meta['false_fact']}?" for r in records)
    printed = capsys.readouterr().out
    assert "written: 12" in printed and "dropped as not applicable" in printed
    assert "failed after retries: 0" in printed
    assert not out.with_name(out.name + ".partial").exists()


def test_interrupted_run_resumes_to_the_uninterrupted_output(serve, tmp_path, monkeypatch, capsys) -> None:
    server = serve(scripted)
    reference = tmp_path / "reference" / "out.jsonl"
    assert main(moma_args(reference, server, "--no-cache")) == 0

    # Ctrl-C in the main thread (where a terminal delivers it) as the 6th finished item is logged: the
    # partial file keeps the 5 before it, the requests in flight are cancelled, no output is written.
    out = tmp_path / "run" / "out.jsonl"
    original = _PartialLog.append
    logged = Counter()

    def interrupting(self, entry):
        logged["n"] += 1
        if logged["n"] == 6:
            raise KeyboardInterrupt
        return original(self, entry)

    monkeypatch.setattr(_PartialLog, "append", interrupting)
    assert main(moma_args(out, server, "--no-cache")) == 130
    monkeypatch.setattr(_PartialLog, "append", original)
    partial = out.with_name(out.name + ".partial")
    kept = partial.read_text().splitlines()[1:]
    assert not out.exists() and len(kept) == 5
    with partial.open("a") as handle:  # and a torn last line, as a kill mid-write leaves
        handle.write('{"id": "moma-relation-')

    capsys.readouterr()
    assert main(moma_args(out, server, "--no-cache")) == 0
    assert out.read_text() == reference.read_text()
    assert f"resumed: {len(kept)} items" in capsys.readouterr().out  # finished items were not asked again
    assert not partial.exists()


def test_server_that_dies_mid_run_then_recovers(serve, tmp_path: Path, capsys) -> None:
    healthy = serve(scripted)
    reference = tmp_path / "reference.jsonl"
    assert main(moma_args(reference, healthy)) == 0

    state = {"served": 0, "dead": True}
    lock = threading.Lock()

    def dying(fact: str, attempt: int) -> tuple[int, str, float]:
        with lock:
            if state["dead"] and state["served"] >= 4:
                return 503, "server is shutting down", 0
            state["served"] += 1
        return scripted(fact, attempt)

    server = serve(dying)
    out = tmp_path / "out.jsonl"
    assert main(moma_args(out, server)) == 1  # some items failed after retries
    printed = capsys.readouterr().out
    assert re.search(r"failed after retries: [1-9]", printed) and "rerun the same command" in printed
    assert out.with_name(out.name + ".partial").exists()
    state["dead"] = False
    assert main(moma_args(out, server)) == 0
    assert out.read_text() == reference.read_text()


def test_partial_file_of_other_arguments_is_a_user_error(serve, tmp_path: Path, monkeypatch, capsys) -> None:
    server = serve(scripted)
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(ChatWriter, "_write_one", lambda self, p: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(moma_args(out, server)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    args = moma_args(out, server)
    args[args.index("--seed") + 1] = "4"
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "out.jsonl.partial" in error and "'seed'" in error and "Traceback" not in error


def test_missing_api_key_variable_exits_2(serve, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    server = serve(scripted)
    assert main(moma_args(tmp_path / "o.jsonl", server, "--api-key-env", "NO_SUCH_KEY_VAR")) == 2
    assert "NO_SUCH_KEY_VAR" in capsys.readouterr().err


def test_a_key_given_to_api_key_env_is_refused_and_never_printed(serve, tmp_path: Path, capfd) -> None:
    key = "sk-live-0123456789abcdefSECRET"
    server = serve(scripted)
    assert main(moma_args(tmp_path / "o.jsonl", server, "--api-key-env", key)) == 2
    captured = capfd.readouterr()
    assert key not in captured.out + captured.err
    assert captured.err.strip().splitlines()[-1].startswith("error: api_key_env: the value given is not")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and key in p.read_text(errors="replace")]


@pytest.mark.parametrize(("status", "message"), [(401, "Incorrect API key provided: {key}"),
                                               (403, "this key may not use model m"),
                                               (404, "The model `m` does not exist")])
def test_generate_stops_at_once_on_401_403_404(serve, tmp_path, capsys, monkeypatch, status, message) -> None:
    server = serve(lambda fact, attempt: (status, message, 0))
    monkeypatch.setenv("UVQA_TEST_KEY", SECRET)
    out = tmp_path / "o.jsonl"
    start = time.monotonic()
    assert main(moma_args(out, server, "--api-key-env", "UVQA_TEST_KEY", "--max-retries", "4")) == 2
    assert time.monotonic() - start < 2
    assert server.requests <= 4  # at most the requests already in flight (--concurrency 4), none retried
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: chat writer: ") and f"{server.base_url}/chat/completions" in lines[0]
    assert f"HTTP {status}" in lines[0] and "Traceback" not in captured.err
    assert SECRET not in captured.err + captured.out
    assert not out.exists()


def test_generate_stops_after_n_connection_failures_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    args = ["generate", "--source", "moma", "--annotations", str(FIXTURES / "moma" / "anns.json"),
            "--category", "relation", "--writer", "chat", "--base-url", closed_port_url(), "--model", "m",
            "--max-retries", "4", "--max-connection-failures", "3", "--num", "12", "--out", str(out)]
    start = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - start < 5  # without the stop: 12 items x 5 attempts with backoff
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(r"^error: chat writer: no answer from http://127\.0\.0\.1:\d+/v1/chat/completions "
                     r"after 3 attempts in a row", lines[0])
    assert not out.exists()


def test_generate_stops_when_a_hung_server_times_out_n_times_in_a_row(serve, tmp_path, capsys) -> None:
    server = serve(lambda fact, attempt: (200, good_reply(fact), 3.0))  # accepts, never answers in time
    out = tmp_path / "o.jsonl"
    args = moma_args(out, server, "--max-retries", "4")
    args[args.index("--timeout") + 1] = "0.3"
    start = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - start < 2.5  # without the stop: 12 items x 5 attempts of 0.3 s, with backoff
    err = capsys.readouterr().err
    assert "after 3 attempts in a row (ReadTimeout" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_generate_writes_no_output_when_nothing_was_generated(serve, tmp_path, capsys) -> None:
    server = serve(lambda fact, attempt: (200, "Not applicable", 0))
    out = tmp_path / "o.jsonl"
    assert main(moma_args(out, server)) == 1
    printed = capsys.readouterr().out
    assert "written: 0 of 12 asked" in printed and "was not written" in printed
    assert not out.exists()
    assert main(["stats", str(out)]) == 2  # nothing for `stats` to take for an empty dataset


def test_generate_keeps_an_echoed_key_out_of_records_and_cache(serve, tmp_path, monkeypatch) -> None:
    def echo(fact: str, attempt: int) -> tuple[int, str, float]:
        return 200, tagged(f"When does the video show {fact}?", "It does not; my key is {key}."), 0

    server = serve(echo)
    monkeypatch.setenv("UVQA_TEST_KEY", SECRET)
    out = tmp_path / "o.jsonl"
    assert main(moma_args(out, server, "--api-key-env", "UVQA_TEST_KEY")) == 0
    assert server.authorizations[0] == f"Bearer {SECRET}"
    records, _ = read_records(out)
    assert records and all("my key is ***" in r.meta["writer_reply"] for r in records)
    assert all(r.answer == "It does not; my key is ***." for r in records)
    cache = out.with_name(out.name + ".chat-cache.jsonl")
    assert "my key is ***" in cache.read_text()
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text(), path


def test_chat_writer_needs_a_url_and_a_model(tmp_path: Path, capsys) -> None:
    args = ["generate", "--source", "didemo", "--annotations", str(FIXTURES / "didemo" / "train_data.json"),
            "--category", "attribute", "--writer", "chat", "--num", "2", "--out", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert "--base-url and --model" in capsys.readouterr().err


def test_didemo_attribute_generation_with_chat_writer(serve, tmp_path: Path) -> None:
    server = serve(lambda fact, attempt: (200, good_reply(fact), 0))
    out = tmp_path / "attribute.jsonl"
    args = ["generate", "--source", "didemo", "--annotations", str(FIXTURES / "didemo" / "train_data.json"),
            "--category", "attribute", "--writer", "chat", "--base-url", server.base_url, "--model", "m",
            "--num", "5", "--seed", "0", "--out", str(out)]
    assert main(args) == 0
    records, _ = read_records(out)
    assert len(records) == 5 and all(r.source == "didemo" and r.category == "attribute" for r in records)
    assert all(r.meta["split"] == "train" and r.video.endswith((".mov", ".avi", ".mp4")) for r in records)
    prompt = server.bodies[0]["messages"][-1]["content"]
    assert "<|Start of True Description|>" in prompt and server.bodies[0]["model"] == "m"
    assert server.bodies[0]["temperature"] == 1.0
