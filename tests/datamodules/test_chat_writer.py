"""The chat writer against a real OpenAI-compatible HTTP server on loopback, and resumable generation.

The server (http.server in a thread, port 0) answers each request through a per-test `responder`, so a
test scripts well-formed replies, "Not applicable", garbage, HTTP errors, slow replies and a dying server.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datamodules.__main__ import main
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
    chat_prompt,
    parse_reply,
)

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "sk-test-0123456789-do-not-leak"

# A responder maps (false fact, attempt number for that fact) to (HTTP status, reply text, delay in s).
Responder = Callable[[str, int], tuple[int, str, float]]


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
                    status, text, delay = server.responder(fact, attempt)
                    time.sleep(delay)
                    if status == 200:
                        payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": text}}]}
                    else:
                        payload = {"error": {"message": text}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
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
    writer = ChatWriter(server.base_url, "m", concurrency=4, timeout=0.5, max_retries=2, backoff=0.01)
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
    writer = ChatWriter(server.base_url, "nope", max_retries=3, backoff=0.01)
    (outcome,) = writer.write_outcomes([item("x")])
    assert outcome.status == FAILED and "HTTP 400" in outcome.error and "unknown model" in outcome.error
    assert server.requests == 1


def test_connection_refused_is_retried_then_failed(serve) -> None:
    server = serve(lambda fact, attempt: (200, good_reply(fact), 0))
    url = server.base_url
    server.close()
    writer = ChatWriter(url, "m", max_retries=2, backoff=0.01, timeout=1)
    (outcome,) = writer.write_outcomes([item("x")])
    assert outcome.status == FAILED and writer.stats.requests == 3


def test_concurrency_limit_is_respected(serve) -> None:
    server = serve(lambda fact, attempt: (200, good_reply(fact), 0.05))
    writer = ChatWriter(server.base_url, "m", concurrency=3)
    outcomes = writer.write_outcomes([item(f"fact {i}") for i in range(15)])
    assert all(o.status == WRITTEN for o in outcomes)
    assert [o.written.question for o in outcomes] == [f"When does the video show fact {i}?"
                                                      for i in range(15)]
    assert 2 <= server.max_in_flight <= 3


def test_api_key_comes_from_the_named_variable_and_is_never_written(serve, tmp_path, monkeypatch) -> None:
    def responder(fact: str, attempt: int) -> tuple[int, str, float]:
        return (500, f"echo {SECRET}", 0) if fact == "bad" else (200, good_reply(fact), 0)

    server = serve(responder)
    monkeypatch.setenv("UVQA_TEST_KEY", SECRET)
    cache = tmp_path / "cache.jsonl"
    writer = ChatWriter(server.base_url, "m", "UVQA_TEST_KEY", cache_path=cache, max_retries=0)
    outcomes = writer.write_outcomes([item("ok"), item("bad")])
    assert server.authorizations == [f"Bearer {SECRET}"] * 2
    assert SECRET not in repr(writer) and SECRET not in cache.read_text()
    assert SECRET not in outcomes[1].error and "***" in outcomes[1].error
    monkeypatch.delenv("UVQA_TEST_KEY")
    with pytest.raises(ChatWriterError, match="UVQA_TEST_KEY"):
        ChatWriter(server.base_url, "m", "UVQA_TEST_KEY")


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
            "--concurrency", "4", "--max-retries", "1", "--backoff", "0.01", "--timeout", "2",
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
